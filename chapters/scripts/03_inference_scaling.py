# ---
# jupyter:
#   jupytext:
#     formats: ipynb,scripts//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (rlscratch)
#     language: python
#     name: rlscratch
# ---

# %% [markdown]
# # Chapter 3 — Inference-time scaling: chain of thought, sampling, self-consistency
#
# Training a model is expensive; *asking it better* is cheap. This chapter leaves the weights alone
# and spends more computation at inference time, measuring what each extra token buys:
#
# 1. **chain-of-thought prompting** — ask for the reasoning, or show worked examples;
# 2. **temperature** — how sampling trades single-answer accuracy for diversity;
# 3. **self-consistency** (Wang et al. 2023) — sample many solutions and take a majority vote over
#    their final answers, grouped by mathematical equivalence.
#
# Every *choice* in this chapter (which prompt, which temperature) is made on GSM8K **train**
# problems; the **test** problems only ever report. Every response goes through chapter 2's harness,
# so it is recorded, resumable, and reused when the notebook is re-executed. The stored outputs come
# from a real run of Qwen2.5-Coder-0.5B-Instruct on a 2-core CPU.

# %% [markdown]
# ## 0. Parameters
#
# Two sets of problems, kept apart on purpose:
#
# * `N_SELECT` GSM8K **train** problems (the first 200) are where we *choose*: the prompt template
#   (section 1) and the sampling temperature (section 2).
# * `N_TEST` GSM8K **test** problems (the first 200, chapter 2's baseline problems) only *report*.
#   All results rows are measured on the same test problems, so they can be compared problem by problem.
#
# Why the split matters: with 200 problems, two similar prompts differ by a few points by chance
# alone, and the best of five noisy accuracies is biased upwards (the "winner's curse"). Had we
# picked the template on the test problems, its test accuracy would overstate what it does on new
# problems. Picked on train, the choice may be lucky or unlucky, but the test numbers stay honest.
#
# **CPU budget.** A chain-of-thought response is about 290 tokens, and chapter 1's engine generated
# about 150-160 tokens/s here (2-core Zen 4 CPU, bf16, 32-64 rows decoding together), so one response
# costs about 2 s. The generation times recorded in this run's records (section 4 prints them):
#
# | section | what is generated | responses | measured |
# |---|---|---:|---:|
# | 1 | 5 templates × 200 train problems, greedy | 1,000 | 47 min |
# | 1 | the chosen template on 200 test problems, greedy (`chat` is chapter 2's run, reused) | 200 | 6 min |
# | 2 | 3 temperatures × 200 train problems × 5 samples | 3,000 | 103 min |
# | 3 | 200 test problems × 20 samples | 4,000 | 122 min |
#
# About 4.6 hours in all, once; re-executing the notebook reuses the records and takes under a minute. **On a GPU** use `N_SELECT = 1000`, `N_TEST = 1319` (all
# of GSM8K test), `SC_N = 40` and `BATCH_SIZE = 128`.

# %%
import os
import tempfile
import time

import torch

SMOKE = os.environ.get("RLSCRATCH_SMOKE") == "1"
MODEL = "tiny-random" if SMOKE else "offline:qwen2.5-coder-0.5b-instruct"
DEVICE = "cpu"
N_SELECT = 3 if SMOKE else 200  # GSM8K train problems: the prompt ablation and the temperature sweep choose here
N_TEST = 3 if SMOKE else 200  # GSM8K test problems: every reported result (the first 200, as in chapter 2)
TEMPLATES = ("chat", "think", "step_by_step", "few_shot", "plain_few_shot")
TEMPERATURES = (0.3, 1.0) if SMOKE else (0.3, 0.6, 1.0)
SWEEP_N = 2 if SMOKE else 5  # samples per train problem at each temperature
SC_N = 5 if SMOKE else 20  # samples per test problem for self-consistency
VOTE_N = min(10, SC_N)  # the concrete self-consistency run of the results table: majority of the first 10
MAX_NEW_TOKENS = 12 if SMOKE else 512
BATCH_SIZE = 4 if SMOKE else 64  # rows decoded together (our recorded greedy runs of section 1 used 32: same answers
# in float32; in bf16 a different batch can flip a near-tie between two tokens, chapter 1 section 4.2)
if SMOKE:
    os.environ["RLSCRATCH_RESULTS"] = tempfile.mkdtemp()
torch.set_num_threads(max(1, os.cpu_count() or 1))
chapter_start = time.perf_counter()

from rlscratch.data import load_gsm8k
from rlscratch.evaluate import EvalSettings, compare_paired, evaluate, summarize
from rlscratch.generate import pack_for_cpu
from rlscratch.model import load_model
from rlscratch.prompts import GSM8K_COT_EXEMPLARS

model, tokenizer = load_model(MODEL, device=DEVICE)
model = pack_for_cpu(model)  # chapter 1: identical outputs, faster decoding on a CPU (no-op elsewhere)
select = load_gsm8k("train", limit=N_SELECT)
test = load_gsm8k("test", limit=N_TEST)
assert {p.id.split("-")[1] for p in select} == {"train"} and {p.id.split("-")[1] for p in test} == {"test"}
# the few-shot exemplars are Wei et al.'s own questions: none of them may be a problem we select on
assert not {q for q, _ in GSM8K_COT_EXEMPLARS} & {p.question for p in select + test}
print(f"model {MODEL}; {len(select)} GSM8K train problems to choose on, {len(test)} test problems to report on")

# %% [markdown]
# ## 1. Chain of thought
#
# A model that writes its reasoning before its answer gets to use more computation per problem:
# every generated token is another forward pass whose result the next tokens can build on. Wei et
# al. (2022) showed that eight worked examples ("few-shot chain of thought") unlock this in large
# models; Kojima et al. (2022) found that the single sentence "Let's think step by step" does much
# of the same ("zero-shot chain of thought"). Instruction-tuned models like ours were trained on
# step-by-step answers, so the baseline already reasons; the question is whether asking helps more.
#
# ### 1.1 Choosing a prompt on train problems
#
# Five templates, greedy decoding, the same `N_SELECT` train problems:
#
# | template | what the model sees |
# |---|---|
# | `chat` | the question (the chapter 2 baseline) |
# | `think` | the question + "Let's think step by step." |
# | `step_by_step` | the question + "Please reason step by step, and put your final answer within \boxed{}." |
# | `few_shot` | Wei et al.'s 8 GSM8K exemplars as earlier chat turns, then the question |
# | `plain_few_shot` | the same 8 exemplars as raw `Q: … A: …` text, no chat template |
#
# Two ablations are built in: *boxed instruction or not* (`step_by_step` vs `think`) and *chat
# template or raw text* (`few_shot` vs `plain_few_shot`). The rule for the choice was fixed before
# the run: the highest accuracy on train, and among equal accuracies the template with fewer tokens
# (the cheaper one). Applied to all five templates, that rule picked `chat`, the base prompt itself,
# which would make the book's "+ chain of thought" row a copy of its base row. So, after seeing the
# train results (and before any test problem was generated), the choice is made by the same rule
# among the four templates that *ask for* reasoning or show it; the printout names both winners.

# %%
ablation = {}
for template in TEMPLATES:
    settings = EvalSettings(model=MODEL, template=template, max_new_tokens=MAX_NEW_TOKENS)
    ablation[template] = evaluate(model, tokenizer, select, settings, batch_size=BATCH_SIZE)
assert all(len(r["responses"]) == 1 and r["id"].startswith("gsm8k-train-") for recs in ablation.values() for r in recs)

print(f"GSM8K train, first {len(select)} problems, greedy")
print(f"{'template':16} {'accuracy':>9} {'95% CI':>15} {'tokens':>7} {'extracted':>9} {'cut off':>9}")
ablation_summary = {}
for template, records in ablation.items():
    s = ablation_summary[template] = summarize(records)
    print(f"{template:16} {s['accuracy']:9.1%} [{s['ci95'][0]:5.1%}, {s['ci95'][1]:5.1%}] {s['mean_tokens']:7.0f} "
          f"{s['extraction_rate']:9.0%} {s['truncated_rate']:9.0%}")
def train_rank(template: str) -> tuple[float, float]:
    return ablation_summary[template]["accuracy"], -ablation_summary[template]["mean_tokens"]


BEST = max((t for t in TEMPLATES if t != "chat"), key=train_rank)  # a chain-of-thought prompt, chosen on train
print(f"\nbest of all five on train: {max(TEMPLATES, key=train_rank)}; "
      f"chosen chain-of-thought template (best of the other four): {BEST}")

# %%
import collections

import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
acc = [ablation_summary[t]["accuracy"] for t in TEMPLATES]
err = [[a - ablation_summary[t]["ci95"][0] for t, a in zip(TEMPLATES, acc)],
       [ablation_summary[t]["ci95"][1] - a for t, a in zip(TEMPLATES, acc)]]
from matplotlib.patches import Patch

axes[0].bar(TEMPLATES, acc, yerr=err, capsize=4, color=["C1" if t == BEST else "C0" for t in TEMPLATES])
axes[0].set(title=f"GSM8K train, n={len(select)}, greedy", ylabel="accuracy (95% Wilson interval)", ylim=(0, 0.5))
axes[0].legend(handles=[Patch(color="C1", label=f"chosen: {BEST}"), Patch(color="C0", label="other templates")],
               fontsize=8)
axes[0].tick_params(axis="x", labelsize=8)
axes[1].scatter([ablation_summary[t]["mean_tokens"] for t in TEMPLATES], acc)
for i, (t, a) in enumerate(zip(TEMPLATES, acc)):  # labels staggered: some templates sit close together
    x = ablation_summary[t]["mean_tokens"]
    right = x < sum(ablation_summary[u]["mean_tokens"] for u in TEMPLATES) / len(TEMPLATES)  # short answers: label right
    axes[1].annotate(t, (x, a), xytext=(15 if right else -75, 12 - 14 * (i % 3)), textcoords="offset points",
                     fontsize=8, arrowprops=dict(arrowstyle="-", lw=0.5))
axes[1].set(title="accuracy vs response length", xlabel="mean generated tokens", ylabel="accuracy", ylim=(0, 0.5))
plt.tight_layout()
plt.show()
for template, records in ablation.items():
    print(f"{template:16} extraction rules: {dict(collections.Counter(r['rules'][0] for r in records))}")

# %% [markdown]
# Intervals of about ±6 points (at n = 200 and accuracies near 25%) overlap for most pairs of templates, but every template saw the
# same problems, so a sharper question is possible: how many problems does a template solve that
# `chat` misses, and how many the other way round? If a template were no better than `chat`, each of
# these *discordant* problems would be a coin flip, and the exact McNemar test (chapter 2) gives the
# probability of a split at least as uneven. On train these counts only describe; the choice above
# was made by accuracy alone.

# %%
for t, other in [(t, "chat") for t in TEMPLATES[1:]] + [("few_shot", "plain_few_shot")]:
    c = compare_paired([r["correct"][0] for r in ablation[t]], [r["correct"][0] for r in ablation[other]])
    print(f"{t:16} vs {other}: solves {c['wins']:3d} that {other} misses, misses {c['losses']:3d} that {other} "
          f"solves, exact McNemar p = {c['p_value']:.3f}")

# %% [markdown]
# What the train run shows:
#
# * **The chosen template**, `step_by_step`, solves 27.5% of the 200 train problems (294 tokens per
#   answer) against 28.0% for `chat` (282 tokens): 11 problems it solves that `chat` misses, 12 the
#   other way round, exact McNemar p = 1.00. Asking for step-by-step reasoning and a boxed answer
#   changes nothing measurable on train. Even unasked, 197 of `chat`'s 200 train answers (98.5%) put
#   their result in `\boxed{}`: the model was tuned on answers of that form.
# * **"Let's think step by step"** (`think`, 26.5% on train) changes little either: 12 problems gained
#   and 15 lost against `chat`, p = 0.70. The instruction-tuned model already reasons step by step
#   when simply asked the question.
# * **Few-shot exemplars** (`few_shot` 17.5%, 123 tokens per answer; `plain_few_shot` 11.0%, 117 tokens).
#   Wei et al.'s exemplars are terse ("… 21 - 15 = 6. The answer is 6."), and the model imitates them:
#   its answers are less than half as long, and clearly worse (`few_shot` against `chat`: 16 gained,
#   37 lost, p = 0.005; `plain_few_shot`: 7 against 41, p < 0.001). Few-shot prompting was invented for
#   *base* models that had never seen an instruction; an instruct model reasons better in the style it
#   was tuned on.
# * **Chat template or raw text** (`few_shot` vs `plain_few_shot`): the same exemplars inside the chat
#   template do better, 17.5% against 11.0% (20 problems against 7, p = 0.02). Without its chat
#   template the instruct model is a worse few-shot learner than with it.
#
# ### 1.2 What a response looks like
#
# Printed, a response is LaTeX source. Rendered (as chapter 2 did for MATH), it reads like the
# solution it tries to be. Here is the first train response of the chosen template that uses LaTeX.
# Dollar signs need care: GSM8K is full of prices, and a bare `$` in Markdown opens a formula, so
# they are escaped before the model's `\(`, `\[` delimiters become Markdown's `$`, `$$`.

# %%
import re

from IPython.display import Markdown, display


def as_markdown(text: str) -> str:
    """A response for Markdown display: bare $ (prices) escaped, then the LaTeX delimiters \\( \\) and \\[ \\] as $ and $$."""
    text = re.sub(r"(?<!\\)\$", r"\\$", text)
    for old, new in (("\\[", "$$"), ("\\]", "$$"), ("\\(", "$"), ("\\)", "$")):
        text = text.replace(old, new)
    return text


assert as_markdown("pay $5 so \\(x = \\$5\\)") == "pay \\$5 so $x = \\$5$"
shown = next((r for r in ablation[BEST] if "\\(" in r["responses"][0] or "\\[" in r["responses"][0]), ablation[BEST][0])
print(f"{shown['id']}: gold {shown['gold']!r}; extracted {shown['extracted'][0]!r} by rule {shown['rules'][0]}; "
      f"correct: {shown['correct'][0]}")
display(Markdown(as_markdown(shown["responses"][0])))

# %% [markdown]
# ### 1.3 The choice, checked on test problems
#
# Now, and only now, the test problems: the chosen template against the base `chat` prompt, greedy,
# on the first `N_TEST` test problems. `chat`'s records are chapter 2's baseline run, reused. The
# paired counts and the exact McNemar p-value say whether the difference is more than chance.

# %%
test_runs = {}
for template in dict.fromkeys(("chat", BEST)):  # one run if the base prompt itself was chosen
    settings = EvalSettings(model=MODEL, template=template, max_new_tokens=MAX_NEW_TOKENS)
    test_runs[template] = evaluate(model, tokenizer, test, settings, batch_size=BATCH_SIZE)
assert all(r["id"].startswith("gsm8k-test-") for recs in test_runs.values() for r in recs)
base_test, cot_test = summarize(test_runs["chat"]), summarize(test_runs[BEST])
greedy_correct = [r["correct"][0] for r in test_runs[BEST]]
cot_vs_base = compare_paired(greedy_correct, [r["correct"][0] for r in test_runs["chat"]])
print(f"GSM8K test, first {len(test)} problems, greedy")
print(f"{'template':16} {'train':>7} {'test':>7} {'test 95% CI':>16} {'tokens':>7}")
for t, s in dict((("chat", base_test), (BEST, cot_test))).items():  # one row if chat was chosen
    print(f"{t:16} {ablation_summary[t]['accuracy']:7.1%} {s['accuracy']:7.1%} [{s['ci95'][0]:5.1%}, {s['ci95'][1]:5.1%}] "
          f"{s['mean_tokens']:7.0f}")
print(f"\n{BEST} vs chat on test: solves {cot_vs_base['wins']} that chat misses, misses {cot_vs_base['losses']} that chat "
      f"solves (both {cot_vs_base['both']}, neither {cot_vs_base['neither']}); exact McNemar p = {cot_vs_base['p_value']:.3f}")
print(f"gain over chat: {ablation_summary[BEST]['accuracy'] - ablation_summary['chat']['accuracy']:+.1%} on train "
      f"(where it was chosen), {cot_test['accuracy'] - base_test['accuracy']:+.1%} on test")

# %% [markdown]
# On test, `step_by_step` gets 28.5% [22.7%, 35.1%] against 26.5% for `chat`: 12 problems gained
# and 8 lost, exact McNemar p = 0.50. That is no significant difference: on this evidence asking for
# reasoning is worth a few points or nothing, and 200 problems cannot tell which. On train it was 0.5
# points *behind* `chat`, on test it is 2.0 points ahead: differences of this size come and go with
# the problems drawn.
#
# The rest of the chapter samples with the chosen template.

# %% [markdown]
# ## 2. Temperature
#
# Greedy decoding gives one answer per problem. To vote we need *different* answers, which means
# sampling; but sampling too hot makes each answer worse. We measure both sides on the same
# `N_SELECT` train problems, with `SWEEP_N` samples per problem at each temperature:
#
# * **single-sample accuracy**: the mean correctness of individual samples;
# * **maj@5**: the accuracy of the majority vote over all 5 samples (exact: there is one 5-subset);
# * **pass@5**: is *any* of the 5 samples right? (an oracle: it needs the answer key);
# * **answer diversity**: distinct answers per problem (grouped by equivalence, so "0.5" and
#   "\frac12" count once) and the entropy (in bits) of the answers' distribution — 0 when all agree;
# * **cut at the token limit**: the share of samples that stopped because they hit `MAX_NEW_TOKENS`
#   (finish reason "length"). Chapter 2's rule gives a cut-off response no answer unless it already
#   stated one, so every such sample is a lost vote, and hot sampling tends to ramble.
#
# Cost: 3 temperatures × 200 problems × 5 samples = 3,000 responses of about 290 tokens; here they
# took 102.5 minutes, about 34 minutes per temperature (the table below prints the total). That is why
# the sweep has three temperatures and no top-p rows: each extra setting costs another half hour. (On a GPU, a top-p
# row is one more entry in the list below, e.g. `temperature=1.0, top_p=0.9`.)
#
# These measures, and the vote itself, live in `rlscratch.scaling`.

# %%
#| export: scaling
"""Inference-time scaling: equivalence-aware majority voting, pass@k, and self-consistency runs."""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

from rlscratch.evaluate import EvalSettings, evaluate
from rlscratch.verify import answers_match


def group_answers(answers: Sequence[str | None]) -> list[list[int]]:
    """Indices of `answers` grouped by mathematical equivalence (None answers are left out), in order of first appearance."""
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None or not str(answer).strip():
            continue
        for group in groups:
            if answers_match(answer, answers[group[0]]):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def majority_vote(answers: Sequence[str | None], *, logprobs: Sequence[float] | None = None) -> str | None:
    """The answer of the largest equivalence group, or None if no sample has an answer.

    Ties go to the group whose samples have the higher mean log-probability (per token) when
    `logprobs` (one per answer) is given, else to the group that appeared first.
    """
    groups = group_answers(answers)
    if not groups:
        return None

    def strength(order_and_group):
        order, group = order_and_group
        confidence = sum(logprobs[i] for i in group) / len(group) if logprobs is not None else 0.0
        return (len(group), confidence, -order)

    _, best = max(enumerate(groups), key=strength)
    return answers[best[0]]


def answer_entropy(answers: Sequence[str | None]) -> float:
    """Entropy in bits of the distribution of answers over equivalence groups (no-answer counts as one group)."""
    groups = group_answers(answers)
    sizes = [len(g) for g in groups] + ([sum(a is None for a in answers)] if None in answers else [])
    total = sum(sizes)
    return -sum(s / total * math.log2(s / total) for s in sizes if s) if total else 0.0


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` are right (Chen et al. 2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def vote_at_k(records: list[dict], k: int, *, subsets: int = 10, seed: int = 0) -> dict:
    """maj@k and pass@k over runs with n >= k samples per problem, overall and per problem.

    A problem's maj@k is the share of its k-subsets of samples whose majority vote is right. It is exact
    (every k-subset voted on) when there are at most max(subsets, n) of them: always for k = 1, where
    maj@1 = pass@1 = the mean single-sample accuracy, and for k = n (one subset: all samples). Otherwise it
    is the mean over `subsets` random k-subsets (seeded), an unbiased estimate of the exact value.
    Returns "k", "maj", "pass", "tokens_per_problem", "exact" (no subset was drawn at random) and
    "maj_by_problem", "pass_by_problem" (one value per record, e.g. for `bootstrap_interval`)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = random.Random(seed)
    maj, passes, tokens, exact = [], [], [], True
    for r in records:
        n = len(r["extracted"])
        if n < k:
            raise ValueError(f"record {r['id']} has {n} samples, fewer than k={k}")
        if math.comb(n, k) <= max(subsets, n):
            draws = [list(c) for c in itertools.combinations(range(n), k)]
        else:
            draws = [rng.sample(range(n), k) for _ in range(subsets)]
            exact = False
        wins = 0
        for idx in draws:
            vote = majority_vote([r["extracted"][i] for i in idx], logprobs=[r["mean_logprob"][i] for i in idx])
            wins += answers_match(vote, r["gold"])
        maj.append(wins / len(draws))
        passes.append(pass_at_k(n, sum(r["correct"]), k))
        tokens.append(k * sum(r["tokens"]) / n)
    count = max(1, len(records))
    return {"k": k, "maj": sum(maj) / count, "pass": sum(passes) / count, "tokens_per_problem": sum(tokens) / count,
            "exact": exact, "maj_by_problem": maj, "pass_by_problem": passes}


def vote_details(record: dict, k: int | None = None) -> dict:
    """The majority vote over a record's first `k` samples (all when None), and how close it was.

    Returns "k", "vote" (as `majority_vote` with the samples' mean log-probs), "correct" (the vote matches
    the gold answer), "group_sizes" (votes per equivalence group, largest first), "winner_votes",
    "runner_up_votes" (0 when all answers agree), "correct_votes" (samples that are right: a right answer
    outvoted has correct_votes > 0 and correct False) and "no_answer" (samples without an answer)."""
    n = len(record["extracted"])
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"record {record['id']} has {n} samples; cannot vote over the first {k}")
    answers = record["extracted"][:k]
    vote = majority_vote(answers, logprobs=record["mean_logprob"][:k])
    sizes = sorted((len(g) for g in group_answers(answers)), reverse=True)
    return {"k": k, "vote": vote, "correct": answers_match(vote, record["gold"]), "group_sizes": sizes,
            "winner_votes": sizes[0] if sizes else 0, "runner_up_votes": sizes[1] if len(sizes) > 1 else 0,
            "correct_votes": sum(bool(c) for c in record["correct"][:k]),
            "no_answer": sum(a is None or not str(a).strip() for a in answers)}


def sample_diversity(records: list[dict]) -> dict:
    """Single-sample accuracy, distinct answers, answer entropy, length and the share of samples cut off by the
    token limit (finish reason "length"), per problem and averaged."""
    count = max(1, len(records))
    return {
        "single_sample_accuracy": sum(sum(r["correct"]) / len(r["correct"]) for r in records) / count,
        "distinct_answers": sum(len(group_answers(r["extracted"])) for r in records) / count,
        "entropy_bits": sum(answer_entropy(r["extracted"]) for r in records) / count,
        "mean_tokens": sum(sum(r["tokens"]) / len(r["tokens"]) for r in records) / count,
        "length_rate": sum(sum(f == "length" for f in r["finish"]) / len(r["finish"]) for r in records) / count,
    }


def sweep(model, tokenizer, problems, settings_list: Sequence[EvalSettings], **evaluate_kwargs) -> list[dict]:
    """Evaluate each setting (recorded and resumable) and summarize it: `sample_diversity`, maj@n and pass@n
    over all n samples, and bootstrap 95% intervals over problems for single-sample accuracy and maj@n."""
    rows = []
    for settings in settings_list:
        records = evaluate(model, tokenizer, problems, settings, **evaluate_kwargs)
        votes = vote_at_k(records, settings.n)
        single = [sum(r["correct"]) / len(r["correct"]) for r in records]
        rows.append({"temperature": settings.temperature, "top_p": settings.top_p, "n": settings.n,
                     **sample_diversity(records), "maj_at_n": votes["maj"], "pass_at_n": votes["pass"],
                     "single_ci95": bootstrap_interval(single), "maj_ci95": bootstrap_interval(votes["maj_by_problem"]),
                     "seconds": sum(r["seconds"] for r in records)})
    return rows


def self_consistency(model, tokenizer, problems, *, n: int, temperature: float, top_p: float = 1.0,
                     template: str = "step_by_step", max_new_tokens: int = 512, seed: int = 0, model_name: str,
                     **evaluate_kwargs) -> list[dict]:
    """Sample n solutions per problem (one shared prefill each) and majority-vote their answers.

    Returns the harness records with "vote" and "vote_correct" (the vote over all n samples) added.
    """
    settings = EvalSettings(model=model_name, template=template, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, n=n, seed=seed)
    records = evaluate(model, tokenizer, problems, settings, **evaluate_kwargs)
    for r in records:
        r["vote"] = majority_vote(r["extracted"], logprobs=r["mean_logprob"])
        r["vote_correct"] = answers_match(r["vote"], r["gold"])
    return records


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of per-problem values (e.g. each problem's maj@N, 0/1 or a
    fraction over subsets): resample the problems with replacement `resamples` times. Seeded: the same
    values give the same interval."""
    if not values:
        raise ValueError("no values to bootstrap")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bad settings: level={level}, resamples={resamples}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[max(0, math.floor(tail * resamples))]
    high = means[min(resamples - 1, math.ceil((1 - tail) * resamples) - 1)]
    return low, high


# %% [markdown]
# Checks on the voting rules before we use them: equivalent spellings are one vote, `None` (no
# answer found) never wins, ties are broken by confidence and are deterministic. And `vote_at_k` is
# exact where it says so: on a made-up problem with six samples, maj@3 over all 20 of its 3-subsets
# equals a brute-force count, maj@1 is the mean single-sample accuracy, and maj@3 from 10 random
# subsets lands near the exact value.

# %%
assert majority_vote(["0.5", "\\frac12", "3", "1/2"]) == "0.5"  # three spellings of one half beat "3"
assert majority_vote([None, None, "7"]) == "7" and majority_vote([None, None]) is None and majority_vote([]) is None
assert majority_vote(["2", "3"]) == "2"  # a tie without log-probs: first seen
assert majority_vote(["2", "3"], logprobs=[-0.9, -0.2]) == "3"  # a tie: the more confident group
assert majority_vote(["2", "3", "3"], logprobs=[-0.01, -2.0, -2.0]) == "3"  # size beats confidence
assert [len(g) for g in group_answers(["1,2", "2, 1", "x=2", "2", None])] == [2, 2]
assert answer_entropy(["4", "4", "4"]) == 0 and abs(answer_entropy(["1", "2"]) - 1) < 1e-9
assert pass_at_k(5, 0, 3) == 0 and pass_at_k(5, 5, 1) == 1 and abs(pass_at_k(4, 1, 1) - 0.25) < 1e-12

toy = {"id": "toy", "gold": "4", "extracted": ["4", "5", "4", None, "5", "4"],
       "correct": [True, False, True, False, False, True], "mean_logprob": [-0.2, -0.1, -0.3, -1.0, -0.1, -0.4],
       "tokens": [100] * 6}
brute = [answers_match(majority_vote([toy["extracted"][i] for i in c], logprobs=[toy["mean_logprob"][i] for i in c]), "4")
         for c in itertools.combinations(range(6), 3)]
exact3 = vote_at_k([toy], 3, subsets=20)
assert exact3["exact"] and exact3["maj"] == sum(brute) / len(brute)
assert vote_at_k([toy], 1)["maj"] == vote_at_k([toy], 1)["pass"] == 3 / 6  # maj@1 = pass@1, exactly
sampled3 = vote_at_k([toy], 3, subsets=10)
assert not sampled3["exact"] and abs(sampled3["maj"] - exact3["maj"]) < 0.35
details = vote_details(toy)
assert (details["vote"], details["winner_votes"], details["runner_up_votes"], details["no_answer"]) == ("4", 3, 2, 1)
assert vote_details(toy, 2)["vote"] == "5"  # "4" and "5" tie 1-1; "5" was sampled with the higher log-prob
print(f"voting checks passed; maj@3 of the toy problem: exact {exact3['maj']:.3f}, from 10 random subsets "
      f"{sampled3['maj']:.3f}")

# %%
settings_list = [EvalSettings(model=MODEL, template=BEST, max_new_tokens=MAX_NEW_TOKENS, temperature=t, n=SWEEP_N,
                              seed=1) for t in TEMPERATURES]
sweep_rows = sweep(model, tokenizer, select, settings_list, batch_size=BATCH_SIZE)
greedy_select = ablation_summary[BEST]
print(f"GSM8K train, first {len(select)} problems x {SWEEP_N} samples per temperature, template {BEST}")
print(f"{'T':>6} {'single':>7} {'95% CI':>15} {'maj@' + str(SWEEP_N):>6} {'95% CI':>15} {'pass@' + str(SWEEP_N):>7} "
      f"{'distinct':>8} {'entropy':>7} {'cut':>5} {'tokens':>6}")
print(f"{'greedy':>6} {greedy_select['accuracy']:7.1%} {'':15} {'':6} {'':15} {'':7} {1.0:8.2f} {0.0:7.2f} "
      f"{greedy_select['truncated_rate']:5.1%} {greedy_select['mean_tokens']:6.0f}")
for r in sweep_rows:
    print(f"{r['temperature']:6.1f} {r['single_sample_accuracy']:7.1%} [{r['single_ci95'][0]:5.1%}, {r['single_ci95'][1]:5.1%}] "
          f"{r['maj_at_n']:6.1%} [{r['maj_ci95'][0]:5.1%}, {r['maj_ci95'][1]:5.1%}] {r['pass_at_n']:7.1%} "
          f"{r['distinct_answers']:8.2f} {r['entropy_bits']:7.2f} {r['length_rate']:5.1%} {r['mean_tokens']:6.0f}")
assert all(r["n"] == SWEEP_N and r["single_sample_accuracy"] <= r["pass_at_n"] for r in sweep_rows)
print(f"\ngeneration time of the sweep: {sum(r['seconds'] for r in sweep_rows) / 60:.1f} min")
greedy_train = [r["correct"][0] for r in ablation[BEST]]
for settings in settings_list:  # the vote against greedy decoding, problem by problem (records are read, not generated)
    votes = vote_at_k(evaluate(model, tokenizer, select, settings, progress=False), SWEEP_N)["maj_by_problem"]
    assert set(votes) <= {0.0, 1.0}  # all n samples: one vote per problem, ties broken by log-prob
    c = compare_paired([v == 1.0 for v in votes], greedy_train)
    print(f"T = {settings.temperature}: maj@{SWEEP_N} solves {c['wins']} problems that greedy misses, misses "
          f"{c['losses']} that greedy solves, exact McNemar p = {c['p_value']:.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
T = [r["temperature"] for r in sweep_rows]


def with_errors(values, intervals):
    return [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]


single = [r["single_sample_accuracy"] for r in sweep_rows]
maj = [r["maj_at_n"] for r in sweep_rows]
axes[0].errorbar(T, single, yerr=with_errors(single, [r["single_ci95"] for r in sweep_rows]), fmt="o-", capsize=3,
                 label="single sample")
axes[0].errorbar(T, maj, yerr=with_errors(maj, [r["maj_ci95"] for r in sweep_rows]), fmt="s-", capsize=3,
                 label=f"majority of {SWEEP_N} (maj@{SWEEP_N})")
axes[0].plot(T, [r["pass_at_n"] for r in sweep_rows], "^--", label=f"any of {SWEEP_N} right (pass@{SWEEP_N})")
axes[0].scatter([0.0], [greedy_select["accuracy"]], color="k", zorder=3, label="greedy")
axes[0].set(xlabel="temperature (0 = greedy)", ylabel="accuracy (95% bootstrap interval)",
            title=f"accuracy vs temperature (train, n={len(select)})", ylim=(0, 0.6))
axes[0].legend(fontsize=8)
axes[1].plot(T, [r["distinct_answers"] for r in sweep_rows], "o-", color="C2", label="distinct answers")
axes[1].plot(T, [r["entropy_bits"] for r in sweep_rows], "o-", color="C3", label="answer entropy (bits)")
axes[1].scatter([0.0, 0.0], [1.0, 0.0], color="k", marker="D", zorder=3, label="greedy (one answer)")
axes[1].set(xlabel="temperature", ylabel=f"per problem, over {SWEEP_N} samples", title="diversity of the sampled answers")
axes[1].legend(fontsize=8)
cut = [greedy_select["truncated_rate"]] + [r["length_rate"] for r in sweep_rows]
bars = axes[2].bar(["greedy"] + [str(t) for t in T], [100 * c for c in cut], color="C4")
axes[2].bar_label(bars, fmt="%.1f%%", fontsize=8)
axes[2].set(xlabel="temperature", ylabel="share of samples (%)", title=f"cut off at {MAX_NEW_TOKENS} tokens")
plt.tight_layout()
plt.show()

# %% [markdown]
# The general picture: at very low temperature the samples barely differ, so voting cannot fix
# anything (not the case for this model: even T = 0.3 scatters widely, as the table shows); at high temperature single samples get worse, until the right answer no longer holds
# a plurality. The useful range is in between, where diversity rises faster than single-sample
# accuracy falls.
#
# In this run: single-sample accuracy is 26.7% at T = 0.3, 24.5% at T = 0.6 and 16.0% at
# T = 1.0, against 27.5% for greedy decoding; maj@5 is 35.5%, 34.0% and 24.0%, pass@5 46.5%,
# 47.5% and 42.0%. Even at T = 0.3, five samples give 3.3 distinct answers per problem
# (3.65 at T = 0.6, 4.11 at T = 1.0): the model is far less sure of itself than its greedy answers
# suggest. The share of samples cut off at the token limit grows from 2.0% (greedy) to 2.8%, 4.2%
# and 5.9%, so part of what heat costs is samples that never finish: votes lost before the vote.
# Against greedy decoding on the same problems, the vote of five samples at T = 0.3 solves 23
# problems greedy misses and misses 7 it solves (exact McNemar p = 0.005; at T = 0.6: 24 against 11,
# p = 0.04): on train, voting helps, by about 8 points. At T = 1.0 the vote is no longer better than
# greedy (15 against 22, p = 0.32): single samples have fallen to 16%, and although pass@5 is
# still 42%, the right answer wins the vote on only about half of the problems where it appears (24.0%
# against 42.0%). Between T = 0.3 and T = 0.6 the difference in maj@5 (1.5 points) is far inside the ±6-7
# point intervals. At T = 1.0, single samples are clearly worse (their interval does not overlap those
# of T = 0.3 and 0.6) and maj@5 is 11.5 points below T = 0.3's.
#
# We take the temperature whose maj@5 was best on train, breaking ties by single-sample accuracy.

# %%
SC_TEMPERATURE = max(sweep_rows, key=lambda r: (r["maj_at_n"], r["single_sample_accuracy"]))["temperature"]
print(f"self-consistency temperature, chosen on train: {SC_TEMPERATURE}")

# %% [markdown]
# ## 3. Self-consistency
#
# Self-consistency samples *N* reasoning paths for each problem and returns the answer most of them
# reach. Different wrong reasoning paths tend to reach different wrong answers, while correct paths
# agree, so the vote filters noise. Three implementation details matter:
#
# * answers are grouped by **equivalence** with chapter 2's verifier, not by string;
# * a tie goes to the group with the **higher mean log-probability** (the model's own confidence),
#   then to the group seen first, so the result is deterministic;
# * the N samples of a problem **share one prefill**: `generate(..., n=N)` runs the prompt once and
#   copies its KV-cache rows (chapter 1).
#
# We draw `SC_N` = 20 samples for each of the `N_TEST` test problems, once, at the temperature chosen on
# train (122 minutes of CPU in our run), and compute from them, for N ∈ {1, 5, 10, 20}:
#
# * **maj@N**, the accuracy of a vote over N samples. A problem's maj@N is the probability that N of
#   its samples, chosen at random, vote right; `vote_at_k` computes it per problem:
#   * **N = 1 exactly**: all 20 one-sample "votes", so maj@1 is the mean single-sample accuracy over all
#     20 samples (= pass@1);
#   * **N = 20 exactly**: there is only one 20-subset;
#   * **N = 5 and 10 by sampling**: there are C(20, 5) = 15,504 and C(20, 10) = 184,756 subsets per
#     problem, so `vote_at_k` votes on 10 random ones and averages. That average is an unbiased
#     estimate of the exact value; its extra noise on the mean over 200 problems is at most
#     0.5/√(10 · 200) ≈ 1.1 points (one standard deviation, in the worst case where every problem's
#     vote is a coin flip), small next to the interval below.
# * a **95% interval** for maj@N from a bootstrap over problems: resample the 200 problems with
#   replacement, 2,000 times, and take the middle 95% of the resampled means (`bootstrap_interval`);
# * the **oracle pass@N** (is *any* of the N samples right?): the gap between the two is what a
#   perfect answer-selector could still gain.

# %%
sc_records = self_consistency(model, tokenizer, test, n=SC_N, temperature=SC_TEMPERATURE, template=BEST,
                              max_new_tokens=MAX_NEW_TOKENS, seed=2, model_name=MODEL,
                              batch_size=BATCH_SIZE)  # 3 problems x 20 samples decode together; a finished one's rows go to the next
sc_seconds = sum(r["seconds"] for r in sc_records)
ks = sorted({k for k in (1, 5, 10, 20) if k <= SC_N} | {SC_N})
curve = []
for k in ks:
    c = vote_at_k(sc_records, k)
    c["ci95"] = bootstrap_interval(c["maj_by_problem"])
    curve.append(c)
single_all = sum(sum(r["correct"]) for r in sc_records) / sum(len(r["correct"]) for r in sc_records)
assert curve[0]["k"] == 1 and curve[0]["exact"] and abs(curve[0]["maj"] - single_all) < 1e-12  # maj@1 = pass@1
assert curve[-1]["exact"] and all(r["vote_correct"] == m for r, m in zip(sc_records, curve[-1]["maj_by_problem"]))
print(f"GSM8K test, first {len(test)} problems x {SC_N} samples at T={SC_TEMPERATURE} ({BEST}); generation took "
      f"{sc_seconds / 60:.1f} min ({sum(sum(r['tokens']) for r in sc_records) / max(sc_seconds, 1e-9):.0f} tokens/s)")
print(f"{'N':>3} {'maj@N':>7} {'95% CI':>16} {'':6} {'pass@N':>7} {'tokens/problem':>15}")
for c in curve:
    print(f"{c['k']:3d} {c['maj']:7.1%} [{c['ci95'][0]:5.1%}, {c['ci95'][1]:5.1%}] {'exact' if c['exact'] else 'subs.':6} "
          f"{c['pass']:7.1%} {c['tokens_per_problem']:15.0f}")
print(f"greedy {BEST} on the same problems: {cot_test['accuracy']:.1%} [{cot_test['ci95'][0]:.1%}, "
      f"{cot_test['ci95'][1]:.1%}], {cot_test['mean_tokens']:.0f} tokens/problem")

# %%
fig, ax = plt.subplots(figsize=(7, 4))
x = [c["tokens_per_problem"] for c in curve]
ax.errorbar(x, [c["maj"] for c in curve], yerr=with_errors([c["maj"] for c in curve], [c["ci95"] for c in curve]),
            fmt="o-", capsize=3, label="self-consistency (maj@N, 95% bootstrap)")
ax.plot(x, [c["pass"] for c in curve], "s--", label="oracle (pass@N)")
# greedy decoding as a line with its interval as a band: its point would sit on top of N = 1 (both ~290 tokens)
ax.axhline(cot_test["accuracy"], color="k", lw=1, ls=":", label=f"greedy {BEST}, {cot_test['mean_tokens']:.0f} tokens")
ax.axhspan(*cot_test["ci95"], color="k", alpha=0.08, label="greedy's 95% Wilson interval")
for c in curve:
    ax.annotate(f"N={c['k']}", (c["tokens_per_problem"], c["maj"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
ax.set_xscale("log")
ax.set_xticks(x, [f"{v:,.0f}" for v in x])
ax.minorticks_off()
ax.set(xlabel="generated tokens per problem (log scale)", ylabel="accuracy",
       title=f"GSM8K test, n={len(test)}, T={SC_TEMPERATURE}", ylim=(0, 0.8))
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# maj@N goes from 25.9% [21.5%, 30.4%] at N = 1 to 32.9% [27.4%, 38.5%] at N = 5, 32.5% [26.5%, 38.1%]
# at N = 10 and 34.0% [27.5%, 40.5%] at N = 20, against 28.5% [22.7%, 35.1%] for greedy decoding with the
# same prompt, at 1/20 of the tokens of N = 20. A single sample at T = 0.3 (maj@1) is 2.6 points below
# greedy, well inside both intervals: sampling may cost a little accuracy per answer, which voting
# first has to win back. In this run the curve rises from N = 1 to N = 5 and then stays within about
# a point up to N = 20, while the tokens grow fourfold (no test separates N = 5 from N = 20). Every
# maj@N interval overlaps greedy's. (maj@5 and maj@10 here average the votes of 10 random subsets
# per problem; section 3.2 uses one concrete vote, the first 10 samples, which gives 32.0% instead of
# 32.5%.)
#
# The oracle is the other story: with 20 samples the right answer is among them for 63.0% of the
# problems, nearly twice what the vote achieves (34.0%). Part of that gap is knowledge the vote fails
# to select: the right answer is sampled, just not most often. Part is scatter: 20 samples spread over
# many answers (section 3.1's example has 12) sometimes hit the right one by chance. Closing the gap needs a
# better *selector* than counting (a verifier or a reward model), or a better *generator* that puts
# more mass on correct solutions, which is what reinforcement learning with a verifiable reward will
# train for.
#
# ### 3.1 One problem, step by step
#
# What does a vote look like from the inside? We follow one problem through it, chosen by a rule
# rather than by hand: the first test problem whose two largest answer groups *tie*, so that the
# tie-break decides; if no problem has a tie, the one with the closest vote.

# %%
all_votes = [vote_details(r) for r in sc_records]
ties = [i for i, d in enumerate(all_votes) if d["runner_up_votes"] and d["runner_up_votes"] == d["winner_votes"]]
contested = [i for i, d in enumerate(all_votes) if d["runner_up_votes"]]
if ties:
    pick, why = ties[0], "the first problem whose two largest groups tie"
elif contested:
    pick = min(contested, key=lambda i: (all_votes[i]["winner_votes"] - all_votes[i]["runner_up_votes"], i))
    why = "no tie anywhere; the closest vote"
else:
    pick, why = 0, "no problem has two answer groups; the first problem"
r, d = sc_records[pick], all_votes[pick]
groups = group_answers(r["extracted"])
group_of = {i: g for g, members in enumerate(groups) for i in members}
print(f"{r['id']} ({why}), gold answer {r['gold']!r}; {len(ties)} of {len(sc_records)} problems have a tie at the top")
print(f"question: {test[pick].question}\n")
print(f"{'sample':>6} {'answer':>14} {'group':>5} {'mean log-prob':>13} {'finish':>7} right")
for i, (answer, lp, finish, ok) in enumerate(zip(r["extracted"], r["mean_logprob"], r["finish"], r["correct"])):
    print(f"{i:6d} {str(answer)[:14]:>14} {group_of.get(i, '-'):>5} {lp:13.3f} {finish:>7} {'yes' if ok else ''}")
print(f"\n{'group':>5} {'spellings':>24} {'votes':>5} {'mean log-prob':>13} right")
for g, members in enumerate(groups):
    spellings = ", ".join(sorted({str(r['extracted'][i]) for i in members}))
    mean_lp = sum(r["mean_logprob"][i] for i in members) / len(members)
    print(f"{g:5d} {spellings[:24]:>24} {len(members):5d} {mean_lp:13.3f} {'yes' if r['correct'][members[0]] else ''}")
by_count = majority_vote(r["extracted"])
print(f"\nno answer: {d['no_answer']} samples. Vote by count, ties to the first seen: {by_count!r}; with the log-prob "
      f"tie-break: {d['vote']!r} ({'right' if d['correct'] else 'wrong'})")
assert d["vote"] == r["vote"] == majority_vote(r["extracted"], logprobs=r["mean_logprob"])
assert sorted((len(m) for m in groups), reverse=True) == d["group_sizes"]

# %% [markdown]
# The 20 samples give twelve different answers, each a plain integer in one spelling (the verifier
# had nothing to merge here), and the largest groups, 50 and 40, have three votes each. Counting alone
# would return 50, the first seen; the tie-break returns 40, whose samples have the higher mean
# log-probability (−0.113 against −0.119 per token, a hair's difference). Both are wrong: the gold
# answer, 20, is in none of the 20 samples, so no rule for counting votes could have found it. The mean
# log-probability is a weak tie-breaker: chapter 4 measures how well such scores tell right answers
# from wrong ones.
#
# ### 3.2 Does voting beat greedy decoding?
#
# The curve above compares averages. The fair test of "self-consistency with N = 10" is a concrete
# run of it, compared problem by problem with greedy chain of thought on the same test problems. For
# each problem we take the majority of its **first 10** samples. That is what a run with `n=10` and
# the same seed would have done: the engine gives sample j of a problem its own random generator,
# seeded from the problem and j (chapter 1), so the first 10 samples draw the same random numbers
# whatever n is. Then the exact McNemar test on the problems where the vote and greedy disagree.

# %%
first_votes = [vote_details(r, VOTE_N) for r in sc_records]
vote_correct = [v["correct"] for v in first_votes]
sc_vs_greedy = compare_paired(vote_correct, greedy_correct)
sc_row_tokens = sum(sum(r["tokens"][:VOTE_N]) for r in sc_records) / len(sc_records)
print(f"majority of the first {VOTE_N} samples: {sum(vote_correct) / len(vote_correct):.1%} "
      f"({sc_row_tokens:.0f} tokens/problem); greedy {BEST}: {cot_test['accuracy']:.1%} ({cot_test['mean_tokens']:.0f})")
print(f"the vote solves {sc_vs_greedy['wins']} problems greedy misses and misses {sc_vs_greedy['losses']} that greedy "
      f"solves (both {sc_vs_greedy['both']}, neither {sc_vs_greedy['neither']}); exact McNemar p = "
      f"{sc_vs_greedy['p_value']:.3f}")
same = sum(answers_match(v["vote"], g["extracted"][0]) for v, g in zip(first_votes, test_runs[BEST]))
print(f"the vote agrees with the greedy answer on {same} of {len(test)} problems")

# %% [markdown]
# To see *why* the vote wins or does not, look at its margins. For each problem: the winning
# answer's share of the 10 votes, and where the right answer was — the winner, present but outvoted,
# or absent from all 10 samples.

# %%
import numpy as np

share = np.array([v["winner_votes"] / VOTE_N for v in first_votes])
kind = np.array(["vote right" if v["correct"] else "right answer outvoted" if v["correct_votes"] else
                 "right answer absent" for v in first_votes])
bins = np.arange(-0.5, VOTE_N + 1.5) / VOTE_N
fig, ax = plt.subplots(figsize=(8, 3.8))
ax.hist([share[kind == k] for k in ("vote right", "right answer outvoted", "right answer absent")], bins=bins,
        stacked=True, color=["C2", "C1", "C7"], label=["vote right", "right answer outvoted", "right answer absent"])
ax.set(xlabel=f"winning answer's share of the {VOTE_N} votes", ylabel="problems",
       title=f"vote margins, GSM8K test (n={len(test)}, T={SC_TEMPERATURE})")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for k in ("vote right", "right answer outvoted", "right answer absent"):
    mask = kind == k
    print(f"{k:22}: {mask.sum():4d} problems, mean winning share {share[mask].mean() if mask.any() else float('nan'):.2f}")
outvoted = [v for v in first_votes if v["correct_votes"] and not v["correct"]]
if outvoted:
    print(f"when outvoted, the right answer had {sum(v['correct_votes'] for v in outvoted) / len(outvoted):.1f} of "
          f"{VOTE_N} votes on average, the winner {sum(v['winner_votes'] for v in outvoted) / len(outvoted):.1f}")
disagree = [i for i, (v, g) in enumerate(zip(vote_correct, greedy_correct)) if v != g]
print(f"on the {len(disagree)} problems where vote and greedy disagree, the winning share is "
      f"{share[disagree].mean() if disagree else float('nan'):.2f} on average (all problems: {share.mean():.2f})")

# %% [markdown]
# On these 200 problems, self-consistency with N = 10 is not significantly better than greedy chain
# of thought: it solves 11 problems that greedy misses and misses 4 that greedy solves (32.0% against
# 28.5%, exact McNemar p = 0.12). On train, the vote of five samples at the same temperature did beat
# greedy (23 against 7, p = 0.005, about 8 points); on test the direction is the same but the gain is
# smaller (3.5 points for this vote of 10; maj@5 on test is 32.9%, 4.4 points), and 200 problems cannot tell it from chance. Some of the difference between the
# two splits is chance (each interval spans about ±6 points), and some may be selection: T = 0.3 was
# chosen for its maj@5 on those very train problems.
#
# The margins show where a vote can and cannot help. On 87 problems the right answer is absent from
# all 10 samples, and no way of counting can find it. On 49 it is present but outvoted, with 1.6 of
# 10 votes on average against the winner's 3.6: a small minority that counting will not promote. The
# vote is right on 64 problems, usually with a clear majority (a mean winning share of 0.68). And
# where the vote and greedy decoding disagree, the winning share is only 0.39 on average (0.45 over all
# problems): the gains and the losses tend to come from split votes among small groups, close to a
# coin flip. This model's samples scatter over many answers (3.3 distinct answers in five samples on
# train), so the winner of a vote over 10 holds, on average, fewer than half of the votes (0.45).
#
# ## 4. Results so far
#
# Three rows on the same first `N_TEST` GSM8K test problems, so they can be compared problem by
# problem: the base prompt, the chain-of-thought prompt chosen on train (greedy), and self-consistency
# with N = 10 at the temperature chosen on train (the majority of the first 10 samples, section 3.2).
# Each row has a 95% Wilson interval (every row is one 0/1 result per problem) and its generated
# tokens per problem; each row after the first is also compared, paired, with the row above it.

# %%
import json

from rlscratch.evaluate import wilson_interval
from rlscratch.results import results_dir

def results_rows(n: int) -> dict:
    """The three rows on the first n test problems, each after the first compared with the row above."""
    base_correct = [r["correct"][0] for r in test_runs["chat"][:n]]
    wins = sum(vote_correct[:n])
    return {
        "base": {**summarize(test_runs["chat"][:n]), "template": "chat"},
        "+ chain of thought": {**summarize(test_runs[BEST][:n]), "template": BEST,
                               "vs_previous_row": compare_paired(greedy_correct[:n], base_correct)},
        f"+ self-consistency (N={VOTE_N})": {
            "n": n, "accuracy": wins / n, "ci95": list(wilson_interval(wins, n)), "template": BEST,
            "mean_tokens": sum(sum(r["tokens"][:VOTE_N]) for r in sc_records[:n]) / n, "temperature": SC_TEMPERATURE,
            "vs_previous_row": compare_paired(vote_correct[:n], greedy_correct[:n])},
    }


n_test = len(test)
rows = results_rows(n_test)
assert rows["+ chain of thought"]["vs_previous_row"] == cot_vs_base and rows["base"]["accuracy"] == base_test["accuracy"]
print(f"GSM8K test, first {n_test} problems")
print(f"{'method':30} {'accuracy':>9} {'95% CI':>16} {'tokens/problem':>15}  paired with the row above")
for name, s in rows.items():
    paired = s.get("vs_previous_row")
    versus = f"  +{paired['wins']} -{paired['losses']}, p = {paired['p_value']:.3f}" if paired else ""
    print(f"{name:30} {s['accuracy']:9.1%} [{s['ci95'][0]:5.1%}, {s['ci95'][1]:5.1%}] {s['mean_tokens']:15.0f}{versus}")
minutes = {
    "prompt ablation (train)": sum(r["seconds"] for recs in ablation.values() for r in recs) / 60,
    "chosen template (test)": sum(r["seconds"] for r in test_runs[BEST]) / 60 if BEST != "chat" else 0.0,
    "temperature sweep (train)": sum(r["seconds"] for r in sweep_rows) / 60,
    "self-consistency (test)": sc_seconds / 60,
}
print("\ngeneration time recorded for this chapter's runs: " + ", ".join(f"{k} {v:.0f} min" for k, v in minutes.items())
      + f"; total {sum(minutes.values()):.0f} min")
print(f"this execution of the notebook took {(time.perf_counter() - chapter_start) / 60:.1f} min (recorded runs are reused)")
if not SMOKE:
    table_path = results_dir() / "results_table.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    keep = ("n", "accuracy", "ci95", "mean_tokens", "template", "temperature", "vs_previous_row")
    # the same rows on the first 40 problems too: chapter 4 compares its refinement with them there
    for n, table_rows in ((n_test, rows), (40, results_rows(40))):
        table[f"chapter03_gsm8k_first_{n}"] = {name: {k: s[k] for k in keep if k in s} for name, s in table_rows.items()}
    table_path.write_text(json.dumps(table, indent=1))

# %% [markdown]
# On the first 200 GSM8K test problems: the base prompt 26.5% [20.9%, 33.0%] at 282 tokens per problem,
# chain of thought (`step_by_step`, greedy) 28.5% [22.7%, 35.1%] at 287, and self-consistency with N = 10
# at T = 0.3 32.0% [25.9%, 38.8%] at 2,886. Neither step is a significant gain on 200 problems: chain of
# thought over the base prompt +12 −8 (p = 0.50), self-consistency over chain of thought +11 −4
# (p = 0.12). The cost column is the other half of the story: self-consistency spends about 10 times
# the tokens of greedy decoding.
#
# ## Exercises
#
# Solutions are in the collapsed cells below each exercise (click to expand). None of them generates
# anything: they reuse the recorded runs.
#
# **1. How lucky was the template choice?** The prompt was chosen on 200 train problems. Resample those
# problems with replacement 1,000 times and apply the same rule to each resample (the highest accuracy
# among the four reasoning templates, then fewer tokens). How often does each template win? And how
# often would the base prompt `chat` have beaten all four? What does that say about the choice?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
import random

rng = random.Random(0)
correct = {t: [r["correct"][0] for r in ablation[t]] for t in TEMPLATES}
tokens = {t: [r["tokens"][0] for r in ablation[t]] for t in TEMPLATES}
reasoning = [t for t in TEMPLATES if t != "chat"]
winners, chat_first = collections.Counter(), 0
for _ in range(1000):
    idx = [rng.randrange(len(select)) for _ in range(len(select))]
    key = lambda t: (sum(correct[t][i] for i in idx), -sum(tokens[t][i] for i in idx))
    winners[max(reasoning, key=key)] += 1
    chat_first += max(TEMPLATES, key=key) == "chat"
print("the rule's winner:", {t: f"{winners[t] / 10:.1f}%" for t in reasoning})
print(f"chat best of all five: {chat_first / 10:.1f}%")
# A template that wins most resamples was a stable choice; if two share the wins, the choice between them
# was a coin flip. In our run `step_by_step` won about 63% of the resamples and `think` about 37%: close
# to a coin flip, and it matters little which one we took, since their train accuracies differ by one
# point. `chat` would have been best of all five in about half of the resamples, which is why the rule
# had to say what to do when the base prompt wins (section 1.1). That is exactly why the test
# comparison of section 1.3 is needed and the train ranking is not reported as a result.

# %% [markdown]
# **2. Weighted votes.** Instead of one vote per sample, give each sample the weight
# $e^{\text{mean log-prob}}$ (its geometric-mean token probability) and pick the group with the largest
# total weight. On the first 10 samples of each test problem, compare this weighted vote with the
# plain count (paired, exact McNemar).

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
weighted_correct = []
for r in sc_records:
    answers = r["extracted"][:VOTE_N]
    grouped = group_answers(answers)
    if not grouped:
        weighted_correct.append(False)
        continue
    best = max(grouped, key=lambda g: sum(math.exp(r["mean_logprob"][i]) for i in g))
    weighted_correct.append(answers_match(answers[best[0]], r["gold"]))
c = compare_paired(weighted_correct, vote_correct)
print(f"weighted {sum(weighted_correct) / len(weighted_correct):.1%} vs count {sum(vote_correct) / len(vote_correct):.1%}: "
      f"+{c['wins']} -{c['losses']}, p = {c['p_value']:.3f}")
# Only votes whose groups are close in size can change: a group of 7 samples outweighs one of 3 unless
# the 3 are far more confident. In our run the two rules give the same verdict on every problem: the samples'
# mean log-probabilities vary little (from -0.08 to -0.20 in section 3.1's example), so their weights
# differ by little (0.82 to 0.92) and weighting is nearly counting. A weight that separates samples more (chapter 4's confidence scores) could
# change votes; whether it helps is the paired test's question.

# %% [markdown]
# **3. Agreement as confidence.** A vote that is nearly unanimous may deserve more trust than a split one.
# Group the test problems by the winning answer's share of all 20 votes (below 0.5, 0.5 to 0.8, 0.8 and
# above) and report the vote's accuracy in each group. Could a deployed system use this without an
# answer key?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
for low, high in ((0.0, 0.5), (0.5, 0.8), (0.8, 1.01)):
    group = [v for v in all_votes if low <= v["winner_votes"] / v["k"] < high]
    if group:
        print(f"winning share [{low:.1f}, {min(high, 1.0):.1f}{']' if high > 1 else ')'}: {len(group):4d} problems, vote accuracy "
              f"{sum(v['correct'] for v in group) / len(group):.1%}")
# Agreement needs no answer key, only the samples already drawn, so a deployed system can use it: answer
# when the vote is clear, and spend more (more samples, a bigger model, a human) when it is split. If the
# accuracy rises with the share, agreement is a confidence score; chapter 4 compares it with scores from
# log-probabilities.

# %% [markdown]
# **4. How often does the tie-break decide?** Among the votes over the first 10 samples, count the ties
# between the two largest groups. How would accuracy change if ties went to the group seen first
# instead of the more confident one?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
tied = [i for i, v in enumerate(first_votes) if v["runner_up_votes"] and v["runner_up_votes"] == v["winner_votes"]]
first_seen = [answers_match(majority_vote(r["extracted"][:VOTE_N]), r["gold"]) for r in sc_records]
print(f"{len(tied)} ties in {len(first_votes)} votes; accuracy with the log-prob tie-break "
      f"{sum(vote_correct) / len(vote_correct):.1%}, with first-seen {sum(first_seen) / len(first_seen):.1%}; "
      f"problems whose verdict differs between the two rules: {sum(a != b for a, b in zip(vote_correct, first_seen))}")
# Only tied votes can differ between the two rules, so the accuracies differ by at most the number of
# ties divided by the number of problems. The tie-break must be deterministic (a rerun gives the same
# vote); how much it moves accuracy is bounded by how often votes tie.

# %% [markdown]
# ## Summary
#
# `rlscratch.scaling` now holds `majority_vote` (equivalence-aware, deterministic ties),
# `group_answers`, `pass_at_k`, `vote_at_k` (maj@N exact at N = 1 and N = n, averaged over random
# subsets in between, per problem for intervals), `vote_details` (a vote's margins), `sample_diversity`,
# `sweep`, `self_consistency` and `bootstrap_interval`, all built on the recorded, resumable harness of
# chapter 2.
#
# The method matters as much as the numbers: every choice (prompt, temperature) was made on train
# problems, every comparison of methods on test problems comes with a paired test, and a difference that the test
# cannot tell from chance is reported as none. For this model, on 200 test problems, neither the
# reasoning prompt (+2.0 points, p = 0.50) nor a vote over 10 samples (+3.5 points over greedy chain of
# thought, p = 0.12) is a significant gain, although on train the vote over five samples was (p = 0.005).
# Inference-time scaling buys accuracy with tokens, when it buys any, and here it buys little for ten
# times the tokens, while the right answer is among 20 samples for 63% of the problems. Chapter 4
# spends the extra tokens differently, asking the model to check and revise its own answer; chapters 5
# and 6 buy accuracy with learning instead, training the model to produce in one sample what
# self-consistency needs many samples to find.
