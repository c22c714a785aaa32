"""The book's results table: five rows on the same GSM8K test problems (issue: the first 500).

    python tools/results_table.py --plan          # what is recorded, what is missing, and its CPU estimate
    python tools/results_table.py --rows base cot # generate the missing records of some rows (resumable)
    python tools/results_table.py                 # all missing rows, then the table

Every row is a recorded harness run (data/results/runs), so an interrupted run resumes and a finished
one is only read. The table goes to data/results/results_table.json under "gsm8k_first_<limit>" and is
printed as Markdown. Rows:

- base: greedy, the `chat` template (no reasoning prompt), chapter 02;
- cot: greedy, chapter 03's prompt chosen on train (`--cot-template`);
- sc: majority vote of N=10 samples at chapter 03's temperature chosen on train; for problems that a
  20-sample run of chapter 03 already answered, its first 10 samples are the N=10 run (sample j of a
  problem draws from derive_seed(seed, j) whatever n is), so they are not generated twice;
- refine: chapter 04's deployable variant, K=2 rounds of calibrated confidence feedback, the most
  confident round (settings read from data/results/04_refine_settings.json, written by chapter 04);
- grpo: chapter 06's trained model (`--grpo-model`, the run's exported final folder), greedy, `cot`'s prompt.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from rlscratch.data import load_gsm8k
from rlscratch.evaluate import EvalSettings, compare_paired, evaluate, load_records, wilson_interval
from rlscratch.model import OFFLINE_MODEL, OFFLINE_SHA256, cache_dir, describe_hardware
from rlscratch.results import results_dir
from rlscratch.scaling import majority_vote
from rlscratch.verify import answers_match

ROWS = {"base": "base (greedy)", "cot": "+ chain of thought", "sc": "+ self-consistency (N=10)",
        "refine": "+ self-refinement (K=2)", "grpo": "+ GRPO (3 epochs)"}
TOKENS_PER_ANSWER = 290  # a typical GSM8K answer of this model, for estimates before anything is recorded
TOKENS_PER_SECOND = 115  # greedy GSM8K answers at 32 rows on a 2-core Zen 4 (benchmarks/results/bench_batching.json)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", action="store_true", help="only report what is recorded and what is missing")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to generate")
    p.add_argument("--limit", type=int, default=500, help="the first LIMIT GSM8K test problems")
    p.add_argument("--cot-template", default="step_by_step", help="chapter 03's prompt, chosen on train")
    p.add_argument("--sc-temperature", type=float, default=0.3, help="chapter 03's temperature, chosen on train")
    p.add_argument("--sc-seed", type=int, default=2, help="chapter 03's self-consistency seed")
    p.add_argument("--grpo-model", default=str(cache_dir() / "runs" / "grpo-gsm8k" / "final"))
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def settings(args) -> dict[str, EvalSettings]:
    base = EvalSettings(model=OFFLINE_MODEL, template="chat", max_new_tokens=512, weights=OFFLINE_SHA256)
    cot = dataclasses.replace(base, template=args.cot_template)
    sc = dataclasses.replace(cot, temperature=args.sc_temperature, n=10, seed=args.sc_seed)
    return {"base": base, "cot": cot, "sc": sc, "sc20": dataclasses.replace(sc, n=20)}


def refine_settings() -> dict:
    path = results_dir() / "04_refine_settings.json"
    if not path.exists():
        sys.exit(f"{path} is missing: execute chapter 04 first (it records the score and calibration it chose)")
    return json.loads(path.read_text())


def grpo_settings(args):
    """(the trained model, its evaluation settings), or None before the run has exported it. The settings are
    the training run's own evaluation settings (template, token budget) with the exported weights' fingerprint,
    run with bf16 autocast where native, as the run evaluated. The run's own evaluations are not reused: they
    cover only its first problems, and their fingerprint is that of the live training model."""
    import torch

    from rlscratch.model import load_model, weights_fingerprint

    final = Path(args.grpo_model).expanduser()
    if not (final / "config.json").exists():
        print(f"no trained model in {final} yet")
        return None
    run_config = json.loads((final.parent / "config.json").read_text())
    model, tokenizer = load_model(final, dtype=torch.float32)
    s = EvalSettings(model=run_config["model"], template=run_config["template"],
                     max_new_tokens=run_config["eval_max_new_tokens"], weights=weights_fingerprint(model))
    return (model, tokenizer), s


def refine_round(s: dict[str, EvalSettings], r: int) -> dict:
    """The records of self-refinement round r (0: the first answers) with chapter 04's settings."""
    if r == 0:
        return load_records(dataclasses.replace(s["cot"], stage="refine-r0"), "gsm8k")
    if not (results_dir() / "04_refine_settings.json").exists():
        return {}  # chapter 04 has not chosen its score yet: nothing of these rounds can be recorded
    score = refine_settings()["score"]
    return load_records(dataclasses.replace(s["cot"], stage=f"refine-confidence-{score}-r{r}"), "gsm8k")


def plan(args, problems) -> dict[str, int]:
    """Missing generated answers per row (estimates for rows whose records depend on earlier ones)."""
    ids = [p.id for p in problems]
    s = settings(args)
    sc20 = load_records(s["sc20"], "gsm8k")
    base, cot = load_records(s["base"], "gsm8k"), load_records(s["cot"], "gsm8k")
    missing = {"base": sum(i not in base for i in ids), "cot": sum(i not in cot for i in ids)}
    sc = load_records(s["sc"], "gsm8k")
    missing["sc"] = 10 * sum(i not in sc and i not in sc20 for i in ids)
    rounds = [refine_round(s, r) for r in range(3)]
    missing["refine"] = sum(i not in recs for recs in rounds for i in ids)  # an upper bound: a later round
    # re-asks only the problems that `self_refine` sends back
    trained = grpo_settings(args)
    grpo = {} if trained is None else load_records(trained[1], "gsm8k")
    missing["grpo"] = len(ids) if trained is None else sum(i not in grpo for i in ids)
    print(f"plan for the first {len(ids)} GSM8K test problems on {describe_hardware()}:")
    total = 0
    for row, answers in missing.items():
        seconds = answers * TOKENS_PER_ANSWER / TOKENS_PER_SECOND
        total += seconds
        print(f"  {ROWS[row]:28} {answers:6d} answers to generate, about {seconds / 3600:.1f} h")
    print(f"  in all about {total / 3600:.1f} h of CPU (estimate: {TOKENS_PER_ANSWER} tokens per answer at "
          f"{TOKENS_PER_SECOND} tokens/s)")
    return missing


def generate_rows(args, problems) -> None:
    from rlscratch.generate import pack_for_cpu
    from rlscratch.model import load_model
    from rlscratch.refine import self_refine

    s = settings(args)
    model, tokenizer = load_model(OFFLINE_MODEL)
    model = pack_for_cpu(model)
    run = dict(batch_size=args.batch_size)
    for row in ("base", "cot"):
        if row in args.rows:
            evaluate(model, tokenizer, problems, s[row], **run)
    if "sc" in args.rows:
        sc20 = load_records(s["sc20"], "gsm8k")
        rest = [p for p in problems if p.id not in sc20]
        if rest:
            evaluate(model, tokenizer, rest, s["sc"], **run)
    if "refine" in args.rows:
        r = refine_settings()
        self_refine(model, tokenizer, problems, rounds=2, feedback="confidence", select="confidence", score=r["score"],
                    calibration=r["calibration"], model_name=OFFLINE_MODEL, template=r["template"],
                    max_new_tokens=r["max_new_tokens"], batch_size=args.batch_size)
    if "grpo" in args.rows:
        import torch

        from rlscratch.model import resolve_dtype

        trained = grpo_settings(args)
        if trained is not None:
            (policy, tok), grpo = trained
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_dtype("auto") == torch.bfloat16):
                evaluate(pack_for_cpu(policy), tok, problems, grpo, **run)


def table(args, problems) -> dict:
    """The rows that are complete, as {name: {n, accuracy, ci95, tokens per problem, CPU minutes, p vs cot,
    verdicts ("1"/"0" per problem, in order)}}."""
    from rlscratch.model import load_model
    from rlscratch.refine import final_rounds, self_refine

    ids = [p.id for p in problems]
    s = settings(args)
    verdicts, tokens, seconds = {}, {}, {}
    for row in ("base", "cot"):
        recs = load_records(s[row], "gsm8k")
        if all(i in recs for i in ids):
            verdicts[row] = [bool(recs[i]["correct"][0]) for i in ids]
            tokens[row] = [recs[i]["tokens"][0] for i in ids]
            seconds[row] = [recs[i]["seconds"] for i in ids]
    sc, sc20 = load_records(s["sc"], "gsm8k"), load_records(s["sc20"], "gsm8k")
    if all(i in sc or i in sc20 for i in ids):
        def first10(i):
            r = sc20.get(i) or sc[i]
            share = 10 / len(r["extracted"])  # the 20-sample run's time, in proportion
            return r["extracted"][:10], r["mean_logprob"][:10], r["gold"], sum(r["tokens"][:10]), r["seconds"] * share
        rows = [first10(i) for i in ids]
        verdicts["sc"] = [answers_match(majority_vote(a, logprobs=lp), gold) for a, lp, gold, _, _ in rows]
        tokens["sc"] = [t for *_, t, _ in rows]
        seconds["sc"] = [sec for *_, sec in rows]
    trained = grpo_settings(args)
    if trained is not None:
        recs = load_records(trained[1], "gsm8k")
        if all(i in recs for i in ids):
            verdicts["grpo"] = [bool(recs[i]["correct"][0]) for i in ids]
            tokens["grpo"] = [recs[i]["tokens"][0] for i in ids]
            seconds["grpo"] = [recs[i]["seconds"] for i in ids]
    refine_rounds = [refine_round(s, r) for r in range(3)]
    if (results_dir() / "04_refine_settings.json").exists() and all(
            i in recs for recs in refine_rounds for i in ids):  # complete: only read here
        r = refine_settings()
        model, tokenizer = load_model(OFFLINE_MODEL)
        traces = self_refine(model, tokenizer, problems, rounds=2, feedback="confidence", select="confidence",
                             score=r["score"], calibration=r["calibration"], model_name=OFFLINE_MODEL,
                             template=r["template"], max_new_tokens=r["max_new_tokens"], progress=False)
        chosen = final_rounds(traces, k=2, select="confidence", score=r["score"])
        verdicts["refine"] = [e["correct"] for e in chosen]
        tokens["refine"] = [sum(e["generated"] for e in t["rounds"][:3]) for t in traces]
        seconds["refine"] = [sum(e["seconds"] for e in t["rounds"][:3]) for t in traces]
    out = {}
    for row, name in ROWS.items():
        if row not in verdicts:
            continue
        right = sum(verdicts[row])
        entry = {"n": len(ids), "accuracy": right / len(ids), "ci95": list(wilson_interval(right, len(ids))),
                 "mean_tokens": sum(tokens[row]) / len(ids), "cpu_minutes": sum(seconds[row]) / 60,
                 "verdicts": "".join("1" if v else "0" for v in verdicts[row])}  # problem by problem, for pairing
        if row != "cot" and "cot" in verdicts:
            paired = compare_paired(verdicts[row], verdicts["cot"])
            entry.update(vs_cot={"gained": paired["wins"], "lost": paired["losses"], "p": paired["p_value"]})
        out[name] = entry
    return out


def main(argv=None) -> int:
    args = parse(argv)
    problems = load_gsm8k("test", limit=args.limit)
    if len(problems) < args.limit:
        sys.exit(f"only {len(problems)} test problems available")
    missing = plan(args, problems)
    if args.plan:
        return 0
    if any(missing[row] for row in args.rows):
        started = time.perf_counter()
        generate_rows(args, problems)
        print(f"generated in {(time.perf_counter() - started) / 60:.1f} min")
    rows = table(args, problems)
    path = results_dir() / "results_table.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[f"gsm8k_first_{args.limit}"] = {"machine": describe_hardware(), "problem_ids": [p.id for p in problems],
                                          "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    os.replace(tmp, path)
    print(f"\n| method | GSM8K test, first {args.limit} | 95% CI | tokens / problem | CPU min | vs CoT (gained/lost, p) |")
    print("|---|---:|---|---:|---:|---|")
    for name, e in rows.items():
        vs = e.get("vs_cot")
        versus = f"{vs['gained']}/{vs['lost']}, p={vs['p']:.3g}" if vs else ""
        print(f"| {name} | {e['accuracy']:.1%} | [{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}] | {e['mean_tokens']:.0f} | "
              f"{e['cpu_minutes']:.0f} | {versus} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
