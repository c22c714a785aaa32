"""Verifier agreement with labels and speed, ours and Hugging Face math-verify side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_verify.py     # needs RLSCRATCH_DATA (MATH-500, GSM8K) and math-verify
    python benchmarks/bench_verify.py --hard                # only the hard set

Two sets of cases:

* **hard** (`benchmarks/verify_hard_cases.json`): real responses from the chapter 02/03 runs and
  hand-written answers and responses of every kind the verifier must handle (and must reject),
  each labelled by reading it. Both verifiers get the full response: ours through `score_response`
  (which also knows whether the response was cut off by the token limit), math-verify through
  `parse(response)` against `parse("$gold$")`.
* **easy**: every MATH-500 and the first 500 GSM8K gold answers against (a) themselves, (b) a
  reformatted twin (\\dfrac, spaces, dollar signs, "x = ..."), (c) another problem's gold.

Reports, per set and verifier: agreement with the labels, false positives (a wrong answer accepted:
in a reward, the fatal kind), false negatives, cases/s, our worst latency; and every case where
either verifier disagrees with the label.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from rlscratch.data import load_gsm8k, load_math500
from rlscratch.verify import answers_match, score_response

HERE = Path(__file__).parent
PATHOLOGICAL = ["9^{9^{9^9}}", "{" * 10_000, "\\frac{" * 5000, "(" * 50_000 + "1" + ")" * 50_000, "1" * 100_000,
                "x^" * 30_000 + "2", "\\sqrt{" * 5000 + "2", "(10^{10})!", "2^{2^{2^{2^{2^{2}}}}}", "e^{e^{e^{e^{e}}}}",
                "\\exp(\\exp(\\exp(\\exp(10))))", "(x^{999})^{999}", "\\sin(10^{1999})", "x^{x^{x^{x}}}"]


def reformat(answer: str, rng: random.Random) -> str:
    """An equivalent spelling of a gold answer, as a model might write it."""
    variants = [answer.replace("\\frac", "\\dfrac"), f"${answer}$", answer.replace(" ", ""),
                f" {answer} ", answer.replace("\\left", "").replace("\\right", "")]
    if "=" not in answer and "," not in answer:
        variants.append(f"x = {answer}")
    return rng.choice(variants)


def easy_cases() -> list[dict]:
    rng = random.Random(0)
    golds = [p.answer for p in load_math500()] + [p.answer for p in load_gsm8k("test", limit=500)]
    cases = []
    for i, gold in enumerate(golds):
        other = golds[(i + 7) % len(golds)]
        cases += [{"pred": gold, "gold": gold, "label": True}, {"pred": reformat(gold, rng), "gold": gold, "label": True}]
        if other != gold:
            cases.append({"pred": other, "gold": gold, "label": False})
    return cases


def tally(verdicts: list[bool], labels: list[bool]) -> dict:
    n = len(labels)
    return {"agreement": sum(v == lab for v, lab in zip(verdicts, labels)) / n,
            "false_positives": sum(v and not lab for v, lab in zip(verdicts, labels)),
            "false_negatives": sum(lab and not v for v, lab in zip(verdicts, labels))}


def run(cases: list[dict], ours, theirs) -> dict:
    labels = [c["label"] for c in cases]
    ours_v, theirs_v, latencies = [], [], []
    t0 = time.perf_counter()
    for c in cases:
        t = time.perf_counter()
        ours_v.append(ours(c))
        latencies.append(time.perf_counter() - t)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs_v = [theirs(c) for c in cases]
    theirs_s = time.perf_counter() - t0
    by_kind = defaultdict(lambda: [0, 0, 0])
    for c, o, m in zip(cases, ours_v, theirs_v):
        row = by_kind[c.get("kind", "all")]
        row[0] += 1
        row[1] += o == c["label"]
        row[2] += m == c["label"]
    return {
        "cases": len(cases),
        "ours": {**tally(ours_v, labels), "cases_per_s": len(cases) / ours_s, "worst_ms": 1000 * max(latencies)},
        "math_verify": {**tally(theirs_v, labels), "cases_per_s": len(cases) / theirs_s},
        "by_kind": {k: {"cases": n, "ours": a / n, "math_verify": b / n} for k, (n, a, b) in sorted(by_kind.items())},
        "wrong": [{**{k: (v[-300:] if k == "response" else v) for k, v in c.items()}, "ours": o, "math_verify": m}
                  for c, o, m in zip(cases, ours_v, theirs_v) if o != c["label"] or m != c["label"]],
    }


def report(name: str, result: dict) -> None:
    o, m = result["ours"], result["math_verify"]
    print(f"\n== {name} set: {result['cases']} cases")
    print(f"{'':14}{'agreement':>10}{'false +':>9}{'false -':>9}{'cases/s':>10}{'worst ms':>10}")
    print(f"{'ours':14}{o['agreement']:>10.2%}{o['false_positives']:>9}{o['false_negatives']:>9}{o['cases_per_s']:>10.0f}"
          f"{o['worst_ms']:>10.1f}")
    print(f"{'math-verify':14}{m['agreement']:>10.2%}{m['false_positives']:>9}{m['false_negatives']:>9}{m['cases_per_s']:>10.0f}")
    if len(result["by_kind"]) > 1:
        print("by kind (agreement): " + ", ".join(f"{k} {v['ours']:.0%}/{v['math_verify']:.0%} (n={v['cases']})"
                                                   for k, v in result["by_kind"].items()))
    print(f"cases where either verifier disagrees with the label ({len(result['wrong'])}):")
    for w in result["wrong"]:
        text = w.get("pred") or w["response"][-90:]
        print(f"  label={w['label']!s:5} ours={w['ours']!s:5} math-verify={w['math_verify']!s:5} | {text!r} | gold {w['gold']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hard", action="store_true", help="only the hard set")
    args = parser.parse_args()
    try:
        from math_verify import parse, verify
    except ImportError:
        sys.exit("pip install math-verify")

    def math_verify_says(gold: str, response: str) -> bool:
        try:
            return bool(verify(parse(f"${gold}$"), parse(response)))
        except Exception:
            return False

    results = {}
    hard = json.loads((HERE / "verify_hard_cases.json").read_text())["cases"]
    results["hard"] = run(hard, lambda c: score_response(c["response"], c["gold"], truncated=c["truncated"]).correct,
                          lambda c: math_verify_says(c["gold"], c["response"]))
    report("hard", results["hard"])
    if not args.hard:
        results["easy"] = run(easy_cases(), lambda c: answers_match(c["pred"], c["gold"]),
                              lambda c: math_verify_says(c["gold"], f"${c['pred']}$"))
        report("easy", results["easy"])
    worst = 0.0
    for s in PATHOLOGICAL:
        t0 = time.perf_counter()
        answers_match(s, "2"), answers_match(s, s), score_response(s, "2")
        worst = max(worst, time.perf_counter() - t0)
    results["worst_pathological_ms"] = 1000 * worst
    print(f"\nworst of {len(PATHOLOGICAL)} pathological inputs (three calls each): {1000 * worst:.1f} ms")
    if not args.hard:
        out = HERE / "results" / "bench_verify.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
