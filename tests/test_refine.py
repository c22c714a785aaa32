"""Chapter 04: confidence scores, AUROC, the multi-turn prompts and the refine loop's bookkeeping and resume."""
import json
import math
import random

import pytest

import rlscratch.evaluate as E
import rlscratch.refine as R
from rlscratch.data import Problem
from rlscratch.generate import Completion
from rlscratch.prompts import chat_messages, format_prompt, render_chat
from rlscratch.generate import generate
from rlscratch.refine import (answer_char_span, auroc, calibrated, calibration_error, choose_round, confidence_scores,
                              feedback_message, final_rounds, flips, mcnemar_exact, record_confidences,
                              refinement_messages, reliability_bins, response_confidence, response_logprobs,
                              round_table, self_refine, token_span)

# ---------------------------------------------------------------- confidence scores


def test_confidence_scores_on_known_logprobs():
    s = confidence_scores([-0.1, -0.5, -0.2, -1.0], answer=(1, 3))
    assert s["total"] == pytest.approx(-1.8) and s["mean"] == pytest.approx(-0.45)
    assert s["min"] == -1.0 and s["answer"] == pytest.approx(-0.7)
    assert confidence_scores([-0.2, -0.3])["answer"] == -math.inf  # no boxed answer
    assert confidence_scores([0.0, 0.0], answer=(0, 2)) == {"total": 0.0, "mean": 0.0, "min": 0.0, "answer": 0.0}
    with pytest.raises(ValueError):
        confidence_scores([])


def test_summed_score_is_length_biased_and_mean_is_not():
    short, long = confidence_scores([math.log(0.9)] * 50), confidence_scores([math.log(0.9)] * 200)
    assert short["total"] - long["total"] == pytest.approx(-150 * math.log(0.9))
    assert short["mean"] == pytest.approx(long["mean"]) and short["min"] == pytest.approx(long["min"])


def test_answer_char_span():
    text = "So 6 * 7 = 42.\n\nThe answer is \\boxed{42}."
    start, end = answer_char_span(text)
    assert text[start:end] == "42" and text[start - 1] == "{"
    text = "First \\boxed{3}, then I fix it: \\boxed{ 5 }"
    start, end = answer_char_span(text)
    assert text[start:end] == "5" and start > text.index("\\boxed{ 5")  # the last box, stripped
    assert answer_char_span("\\boxed{x}") == (7, 8)  # not the x inside "\boxed"
    assert answer_char_span("\\fbox{b}") == (6, 7)  # not the b inside "\fbox"
    assert answer_char_span("the answer is 42") is None  # no box: an answer, but not from a box
    assert answer_char_span("$x = \\boxed{3}$ or $x = \\boxed{-4}$") is None  # joined boxes: no single span
    assert answer_char_span("\\boxed{}") is None
    invented = "\\boxed{7}<|im_end|>\n<|im_start|>user\n\\boxed{9}"
    assert answer_char_span(invented) == (7, 8)  # like the verifier, ignore an invented next turn


def test_token_span_through_the_real_tokenizer(tokenizer):
    for text, answer in [("Each box has 4 + 3 = 7 apples, so \\boxed{1,234}.", "1,234"),
                         ("3 × 4 = 12 → ½ of 24 is \\boxed{12}", "12"),  # multi-byte characters before the answer
                         ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}")]:
        chars = answer_char_span(text)
        ids = tokenizer.encode(text, add_special_tokens=False)
        first, last = token_span(tokenizer, ids, chars)
        covered = tokenizer.decode(ids[first:last])
        assert answer in covered and len(covered) <= len(answer) + 2  # tokens may straddle the braces
        assert answer not in tokenizer.decode(ids[first + 1:last]) and answer not in tokenizer.decode(ids[first:last - 1])
    ids = tokenizer.encode("so \\boxed{42}", add_special_tokens=False)
    first, last = token_span(tokenizer, ids, answer_char_span("so \\boxed{42}"))
    assert tokenizer.decode(ids[first:last]) == "42"  # Qwen: digits are tokens of their own
    ids = tokenizer.encode("\\boxed{5}", add_special_tokens=False)
    assert token_span(tokenizer, ids, (0, 100)) is None  # beyond the decoded text
    assert token_span(tokenizer, ids, (3, 3)) is None


def test_response_confidence_scores_the_answer_tokens(tokenizer):
    text = "6 * 7 = 42, so \\boxed{42}"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    chars = answer_char_span(text)
    first, last = token_span(tokenizer, ids, chars)
    logprobs = [-1.0 if first <= i < last else -0.1 for i in range(len(ids))]
    s = response_confidence(tokenizer, text, ids, logprobs)
    assert s["answer"] == pytest.approx(-(last - first)) and last - first == 2  # Qwen: one token per digit
    assert s["min"] == -1.0 and s["total"] == pytest.approx(sum(logprobs))
    record = {"id": "r", "responses": [text], "token_ids": [ids], "logprobs": [logprobs]}
    assert record_confidences(tokenizer, record) == [s]
    with pytest.raises(ValueError, match="token_logprobs"):
        record_confidences(tokenizer, {"id": "old", "responses": [text]})


# ---------------------------------------------------------------- AUROC, calibration, paired tests


def test_auroc_hand_cases_and_ties():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([3.0] * 5, [1, 0, 1, 0, 0]) == 0.5  # all tied: a coin
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 1, 0, 1]) == 0.875  # 1 + 0.5 + 1 + 1 of 4 pairs
    assert auroc([-math.inf, -math.inf, -1.0], [1, 0, 1]) == 0.75  # pairs: tie (0.5) and a win
    assert math.isnan(auroc([1.0, 2.0], [True, True])) and math.isnan(auroc([1.0], [False]))
    with pytest.raises(ValueError):
        auroc([1.0, float("nan")], [0, 1])
    with pytest.raises(ValueError):
        auroc([1.0], [0, 1])


def test_auroc_equals_pair_counting():
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(2, 25)
        scores = [rng.choice([-math.inf, -3.0, -1.0, -1.0, 0.0, rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        pos = [s for s, l in zip(scores, labels) if l]
        neg = [s for s, l in zip(scores, labels) if not l]
        if not pos or not neg:
            continue
        pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert auroc(scores, labels) == pytest.approx(pairs)
        assert auroc([-s for s in scores], labels) == pytest.approx(1 - pairs)  # reversed order


def test_reliability_bins_and_calibration_error():
    bins = reliability_bins([0.9, 0.1, 0.3, 0.2], [1, 0, 1, 0], bins=2)
    assert [b["count"] for b in bins] == [2, 2]
    assert bins[0]["mean_confidence"] == pytest.approx(0.15) and bins[0]["accuracy"] == 0.0
    assert bins[1]["mean_confidence"] == pytest.approx(0.6) and bins[1]["accuracy"] == 1.0
    assert (bins[0]["low"], bins[1]["high"]) == (0.1, 0.9)
    assert calibration_error(bins) == pytest.approx(0.5 * 0.15 + 0.5 * 0.4)
    assert len(reliability_bins([0.5, 0.6], [1, 0], bins=8)) == 2  # never an empty bin
    perfect = reliability_bins([0.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], bins=2)
    assert calibration_error(perfect) == 0.0


def test_calibrated_reads_the_bin_of_a_raw_score():
    bins = reliability_bins([-40.0, -30.0, -20.0, -12.0, -8.0, -2.0], [0, 0, 1, 0, 1, 1], bins=3)
    assert [(b["low"], b["high"], b["accuracy"]) for b in bins] == [(-40, -30, 0.0), (-20, -12, 0.5), (-8, -2, 1.0)]
    assert [calibrated(bins, s) for s in (-1e9, -35.0, -25.0, -20.0, -10.0, -8.0, 0.0)] == [0, 0, 0, 0.5, 0.5, 1, 1]
    assert calibrated(bins, -math.inf) == 0.0
    with pytest.raises(ValueError):
        calibrated([], -1.0)


def test_flips_and_exact_mcnemar():
    assert flips([1, 1, 0, 0, 0], [1, 0, 1, 1, 0]) == {"right_right": 1, "right_wrong": 1, "wrong_right": 2,
                                                       "wrong_wrong": 1}
    with pytest.raises(ValueError):
        flips([1], [1, 0])
    assert mcnemar_exact(9, 4) == pytest.approx(2 * (1 + 13 + 78 + 286 + 715) / 2 ** 13)  # 0.267
    assert mcnemar_exact(4, 9) == mcnemar_exact(9, 4)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64) and mcnemar_exact(10, 0) < 0.01


# ---------------------------------------------------------------- prompts


def test_multi_turn_prompt_through_the_chat_template(tokenizer):
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    first = render_chat(tokenizer, refinement_messages(question, []))
    assert first == format_prompt(tokenizer, question, "step_by_step")  # round 0 is the single-turn prompt
    feedback = feedback_message("confidence", confidence=0.4242)
    assert "42%" in feedback and feedback.endswith("within \\boxed{}.")
    turns = [("3 + 4 = 8, \\boxed{8}", feedback), ("3 + 4 = 7, \\boxed{7}", feedback_message("verifier"))]
    messages = refinement_messages(question, turns)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    prompt = render_chat(tokenizer, messages)
    assert prompt.startswith(first[:-len("<|im_start|>assistant\n")])
    assert prompt.endswith("<|im_start|>assistant\n")
    expected_tail = "".join(f"<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n{fb}<|im_end|>\n"
                            for answer, fb in turns) + "<|im_start|>assistant\n"
    assert prompt.endswith(expected_tail)
    assert prompt.count("<|im_start|>user") == 3


def test_prompt_helpers_refuse_malformed_conversations(tokenizer):
    with pytest.raises(ValueError, match="user turn"):
        render_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="user turn"):
        render_chat(tokenizer, [])
    with pytest.raises(ValueError, match="not a chat template"):
        chat_messages("q", "plain_few_shot")
    with pytest.raises(ValueError):
        feedback_message("confidence")  # needs the confidence
    with pytest.raises(ValueError):
        feedback_message("hint")
    assert len(chat_messages("q", "few_shot")) == 17  # 8 exemplar pairs + the question


# ---------------------------------------------------------------- the loop


PROBLEMS = [Problem(id=f"p{i}", question=f"Problem {name}: how many?", answer="7", solution="", dataset="gsm8k", level=1)
            for i, name in enumerate(["alpha", "beta", "gamma", "delta"])]
# what each problem's stub model answers in rounds 0, 1, 2, ... and how sure it is (per-token log-prob)
SCRIPT = {"alpha": [("7", -0.1)] * 4,  # right from the start
          "beta": [("5", -0.5), ("7", -0.2), ("7", -0.2), ("7", -0.2)],  # fixed in round 1
          "gamma": [("5", -0.3), ("6", -0.4), ("8", -0.6), ("9", -0.9)],  # never right
          "delta": [("7", -0.05), ("3", -0.7), ("3", -0.7), ("3", -0.7)]}  # talked out of a right answer


class StubEngine:
    """Stands in for `generate`: answers from SCRIPT by problem and round (the round = assistant turns so far).
    `rescore` stands in for `response_logprobs`: an answer scores `rescore_shift` more as a first answer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.lp_of, self.rescore_shift, self.rescored = tokenizer, [], {}, 0.0, []

    def rescore(self, model, tokenizer, prompt, token_ids):
        assert prompt.count("<|im_start|>assistant") == 1  # always the round-0 prompt
        self.rescored.append(prompt)
        name = next(n for n in SCRIPT if f"Problem {n}:" in prompt)
        return [self.lp_of.get((name, tuple(token_ids)), -0.3) + self.rescore_shift] * len(token_ids)

    def __call__(self, model, tokenizer, prompts, on_prompt_done=None, **kw):
        self.calls.append(list(prompts))
        out = []
        for k, prompt in enumerate(prompts):
            name = next(n for n in SCRIPT if f"Problem {n}:" in prompt)
            r = prompt.count("<|im_start|>assistant") - 1
            answer, lp = SCRIPT[name][r]
            text = f"Round {r}: the result is \\boxed{{{answer}}}"
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
            self.lp_of[name, tuple(ids)] = lp
            out.append(Completion(prompt_index=k, sample_index=0, text=text, token_ids=ids,
                                  logprobs=[lp] * len(ids), finish_reason="stop"))
            if on_prompt_done is not None:
                on_prompt_done(k, out[-1:])
        return out


@pytest.fixture
def stub(tokenizer, monkeypatch):
    engine = StubEngine(tokenizer)
    monkeypatch.setattr(E, "generate", engine)
    monkeypatch.setattr(E, "weights_fingerprint", lambda model: "stub-weights")
    monkeypatch.setattr(R, "response_logprobs", engine.rescore)
    monkeypatch.setattr(R, "weights_fingerprint", lambda model: "stub-weights")
    return engine


def run(tokenizer, tmp_path, **kw):
    args = dict(rounds=3, feedback="confidence", select="latest", score="mean", model_name="stub", run_dir=tmp_path,
                progress=False, batch_size=8)
    return self_refine(None, tokenizer, PROBLEMS, **{**args, **kw})


def test_verifier_feedback_refines_only_wrong_answers(tokenizer, tmp_path, stub):
    traces = run(tokenizer, tmp_path, feedback="verifier")
    assert [len(call) for call in stub.calls] == [4, 2, 1, 1]  # round 0: all; then only the wrong ones
    by_id = {t["id"]: t for t in traces}
    alpha, beta, gamma, delta = (by_id[p.id] for p in PROBLEMS)
    assert [e["generated"] > 0 for e in alpha["rounds"]] == [True, False, False, False]
    assert all(e["response"] == alpha["rounds"][0]["response"] and e["correct"] for e in alpha["rounds"])
    assert [e["correct"] for e in beta["rounds"]] == [False, True, True, True] and beta["rounds"][2]["generated"] == 0
    assert [e["answer"] for e in gamma["rounds"]] == ["5", "6", "8", "9"]
    assert all(e["correct"] for e in delta["rounds"])  # the oracle never sends back a right answer
    assert gamma["rounds"][0]["feedback"] == feedback_message("verifier") and alpha["rounds"][0]["feedback"] is None
    assert [e["round"] for e in gamma["rounds"]] == [0, 1, 2, 3]
    table = round_table(traces, score="mean")
    assert [row["accuracy"] for row in table] == [0.5, 0.75, 0.75, 0.75]
    assert [(row["wrong_right"], row["right_wrong"]) for row in table] == [(0, 0), (1, 0), (0, 0), (0, 0)]
    assert [row["new"] for row in table] == [4, 2, 1, 1]


def test_confidence_feedback_prompts_bookkeeping_and_selection(tokenizer, tmp_path, stub):
    traces = run(tokenizer, tmp_path)
    assert [len(call) for call in stub.calls] == [4, 4, 4, 4]  # deployable: every answer is refined
    delta = traces[3]
    last_prompt = next(p for p in stub.calls[3] if "Problem delta:" in p)
    for e in delta["rounds"][:3]:  # every earlier answer and its feedback are in the last round's prompt, in order
        assert f"<|im_start|>assistant\n{e['response']}<|im_end|>\n<|im_start|>user\n{e['feedback']}<|im_end|>" in last_prompt
    assert delta["rounds"][0]["feedback"] == feedback_message("confidence", confidence=math.exp(-0.05))
    assert "95%" in delta["rounds"][0]["feedback"]
    assert all(e["prompt_tokens"] < f["prompt_tokens"] for e, f in zip(delta["rounds"], delta["rounds"][1:]))
    # final answers: the latest round, or the most confident one
    assert [t["final"] for t in traces] == [3, 3, 3, 3]
    latest = final_rounds(traces, k=3, select="latest", score="mean")
    assert [e["correct"] for e in latest] == [True, True, False, False]
    picked = final_rounds(traces, k=3, select="confidence", score="mean")
    assert [e["round"] for e in picked] == [0, 1, 0, 0]  # earliest of equals; delta's confident round 0
    assert [e["correct"] for e in picked] == [True, True, False, True]
    assert choose_round(delta["rounds"], "confidence", "mean") == 0
    table = round_table(traces, score="mean")
    assert [row["accuracy"] for row in table] == [0.5, 0.5, 0.5, 0.5]
    assert (table[1]["wrong_right"], table[1]["right_wrong"], table[1]["changed"]) == (1, 1, 3)
    assert table[2]["changed"] == 1 and table[2]["p_vs_round0"] == 1.0  # 1 gained, 1 lost
    assert [row["selected_accuracy"] for row in table] == [0.5, 0.75, 0.75, 0.75]
    assert all(row["generated_per_problem"] > 0 for row in table)
    assert table[3]["mean_confidence"] == pytest.approx(sum(math.exp(lp) for lp in (-0.1, -0.2, -0.9, -0.7)) / 4)


def test_later_rounds_are_rescored_as_first_answers_and_the_feedback_is_calibrated(tokenizer, tmp_path, stub):
    stub.rescore_shift = -1.0  # as first answers, refined answers are less likely than in their conversation
    bins = reliability_bins([-2.0, -1.5, -0.5, -0.1], [0, 0, 1, 1], bins=2)  # P(correct): 0 below -0.5, else 1
    traces = run(tokenizer, tmp_path, calibration=bins, select="confidence")
    assert len(stub.rescored) == 3 * 4  # every refined answer, none of round 0 (already in that context)
    assert len((tmp_path / "rescored.jsonl").read_text().splitlines()) == 3 * 4
    stub.rescored.clear()
    assert run(tokenizer, tmp_path, calibration=bins, select="confidence") == traces and stub.rescored == []  # cached
    delta = traces[3]["rounds"]
    assert delta[0]["confidence"] == delta[0]["confidence_in_turn"] and delta[0]["confidence"]["mean"] == -0.05
    assert delta[1]["confidence_in_turn"]["mean"] == pytest.approx(-0.7)
    assert delta[1]["confidence"]["mean"] == pytest.approx(-1.7)  # re-scored
    assert delta[0]["feedback"] == feedback_message("confidence", confidence=1.0)  # -0.05: the upper bin
    assert delta[1]["feedback"] == feedback_message("confidence", confidence=0.0)  # -1.7: the lower bin
    assert "chance that this answer is right: 100%" in delta[0]["feedback"]
    # selection compares the re-scored answers: round 0 wins everywhere (the later rounds lost 1.0 each)
    assert [t["final"] for t in traces] == [0, 0, 0, 0]
    table = round_table(traces, score="mean", calibration=bins)
    assert table[0]["mean_confidence"] == pytest.approx(sum(calibrated(bins, lp) for lp in (-0.1, -0.5, -0.3, -0.05)) / 4)
    assert table[1]["mean_score"] == pytest.approx(table[1]["mean_score_in_turn"] - 1.0)


def test_round_table_counts_word_for_word_repeats():
    def entry(r, text, generated=5):
        conf = {"total": -1.0, "mean": -0.1, "min": -0.5, "answer": -0.01}
        return {"round": r, "response": text, "answer": text.strip()[-1], "correct": text.strip()[-1] == "7", "tokens": 5,
                "generated": generated, "prompt_tokens": 10, "seconds": 1.0, "confidence": conf,
                "confidence_in_turn": conf}
    traces = [{"rounds": [entry(0, "so 7"), entry(1, "so 7 "), entry(2, "so 7", generated=0)]},  # repeats; skipped
              {"rounds": [entry(0, "so 5"), entry(1, "hence 7"), entry(2, "hence 7")]}]
    table = round_table(traces, score="mean")
    assert [row["repeated"] for row in table] == [0, 1, 1]  # a round that was not refined repeats nothing
    assert [row["accuracy"] for row in table] == [0.5, 1.0, 1.0]


def test_rounds_resume_and_are_redone_when_an_earlier_answer_changes(tokenizer, tmp_path, stub, monkeypatch):
    real = StubEngine.__call__

    def interrupted(self, model, tok, prompts, **kw):
        if any(p.count("<|im_start|>assistant") == 3 for p in prompts):
            raise KeyboardInterrupt  # stopped in round 2
        return real(self, model, tok, prompts, **kw)

    monkeypatch.setattr(StubEngine, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer, tmp_path)
    assert [len(call) for call in stub.calls] == [4, 4]
    monkeypatch.setattr(StubEngine, "__call__", real)
    stub.calls.clear()
    resumed = run(tokenizer, tmp_path)
    assert [len(call) for call in stub.calls] == [4, 4]  # only rounds 2 and 3 were generated
    stub.calls.clear()
    assert run(tokenizer, tmp_path) == resumed and stub.calls == []  # complete: nothing generated

    # an earlier round's record changes (as if it had been generated again): later rounds built on it are redone
    [r0_file] = tmp_path.glob("*-refine-r0-*.jsonl")
    lines = [json.loads(line) for line in r0_file.read_text().splitlines()]
    lines[2]["responses"] = ["Round 0: on second thought \\boxed{5}"]
    r0_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    again = run(tokenizer, tmp_path)
    assert [len(call) for call in stub.calls] == [1, 1, 1]  # gamma's rounds 1-3, nothing else
    assert all("Problem gamma:" in call[0] for call in stub.calls)
    assert again[2]["rounds"][0]["response"].endswith("second thought \\boxed{5}")
    assert [t["rounds"] for i, t in enumerate(again) if i != 2] == [t["rounds"] for i, t in enumerate(resumed) if i != 2]


def test_bad_arguments(tokenizer, tmp_path):
    for kw in (dict(rounds=-1), dict(feedback="hint"), dict(select="vote"), dict(score="median")):
        with pytest.raises(ValueError):
            run(tokenizer, tmp_path, **kw)


def test_self_refine_with_a_tiny_model(tiny_model, tokenizer, tmp_path):
    """The real engine end to end: recorded token log-probs, and the round-0 answer inside the round-1 prompt."""
    problems = PROBLEMS[:2]
    traces = self_refine(tiny_model, tokenizer, problems, rounds=1, feedback="confidence", model_name="tiny",
                         max_new_tokens=4, run_dir=tmp_path, progress=False)
    for t in traces:
        r0, r1 = t["rounds"]
        assert 1 <= r0["generated"] <= 4 and 1 <= r1["generated"] <= 4 and r1["prompt_tokens"] > r0["prompt_tokens"]
        assert set(r0["confidence"]) == {"total", "mean", "min", "answer"} and r0["confidence"]["mean"] <= 0
    for t in traces:  # round 1 re-scored in round 0's context: the real forward pass, not the stub
        r1 = t["rounds"][1]
        assert r1["confidence"] != r1["confidence_in_turn"]
    [r1_file] = tmp_path.glob("*-refine-confidence-mean-r1-*.jsonl")
    records = [json.loads(line) for line in r1_file.read_text().splitlines()]
    for t, record in zip(traces, records):
        assert f"<|im_start|>assistant\n{t['rounds'][0]['response']}<|im_end|>" in record["prompt"]
        assert len(record["token_ids"][0]) == len(record["logprobs"][0]) == record["tokens"][0]


def test_response_logprobs_match_what_the_engine_recorded(tiny_model, tokenizer):
    """Scoring a generated answer in its own prompt gives back the engine's per-token log-probs."""
    prompt = format_prompt(tokenizer, "What is 2 + 3?", "step_by_step")
    [done] = generate(tiny_model, tokenizer, [prompt], max_new_tokens=12, temperature=1.0, seed=3)
    again = response_logprobs(tiny_model, tokenizer, prompt, done.token_ids)
    assert len(again) == len(done.logprobs) == len(done.token_ids)
    assert again == pytest.approx(done.logprobs, abs=1e-4)
    other = response_logprobs(tiny_model, tokenizer, format_prompt(tokenizer, "Name a color.", "step_by_step"),
                              done.token_ids)
    assert other != pytest.approx(done.logprobs, abs=1e-4)  # the context matters
