"""Verifier speed and agreement with Hugging Face math-verify, side by side in one run.

    python benchmarks/bench_verify.py            # needs RLSCRATCH_DATA (MATH-500, GSM8K) and math-verify

Cases: every MATH-500 and the first 500 GSM8K gold answers against (a) themselves, (b) a reformatted
twin (\\dfrac, spaces, dollar signs, "x = ..."), (c) a wrong answer (another problem's gold).
Reports cases/s for both verifiers, our worst-case latency on pathological strings, and every
disagreement.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from rlscratch.data import load_gsm8k, load_math500
from rlscratch.verify import answers_match

PATHOLOGICAL = ["9^{9^{9^9}}", "{" * 10_000, "\\frac{" * 5000, "(" * 50_000 + "1" + ")" * 50_000, "1" * 100_000,
                "x^" * 30_000 + "2", "\\sqrt{" * 5000 + "2", "(10^{10})!", "2^{2^{2^{2^{2^{2}}}}}"]


def reformat(answer: str, rng: random.Random) -> str:
    """An equivalent spelling of a gold answer, as a model might write it."""
    variants = [answer.replace("\\frac", "\\dfrac"), f"${answer}$", answer.replace(" ", ""),
                f" {answer} ", answer.replace("\\left", "").replace("\\right", "")]
    if "=" not in answer and "," not in answer:
        variants.append(f"x = {answer}")
    return rng.choice(variants)


def main() -> None:
    try:
        from math_verify import parse, verify
    except ImportError:
        sys.exit("pip install math-verify")

    def theirs(pred, gold):
        try:
            return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
        except Exception:
            return False

    rng = random.Random(0)
    golds = [p.answer for p in load_math500()] + [p.answer for p in load_gsm8k("test", limit=500)]
    cases = []
    for i, gold in enumerate(golds):
        cases += [(gold, gold, True), (reformat(gold, rng), gold, True), (golds[(i + 7) % len(golds)], gold, False)]
    cases = [c for c in cases if not (c[2] is False and c[0] == c[1])]

    t0 = time.perf_counter()
    ours = [answers_match(p, g) for p, g, _ in cases]
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mv = [theirs(p, g) for p, g, _ in cases]
    mv_s = time.perf_counter() - t0
    worst = 0.0
    for s in PATHOLOGICAL:
        t0 = time.perf_counter()
        answers_match(s, "2")
        worst = max(worst, time.perf_counter() - t0)

    disagreements = [(p, g, e, o, m) for (p, g, e), o, m in zip(cases, ours, mv) if o != m]
    result = {
        "cases": len(cases),
        "ours_cases_per_s": len(cases) / ours_s, "math_verify_cases_per_s": len(cases) / mv_s,
        "ours_accuracy_vs_label": sum(o == e for o, (_, _, e) in zip(ours, cases)) / len(cases),
        "math_verify_accuracy_vs_label": sum(m == e for m, (_, _, e) in zip(mv, cases)) / len(cases),
        "agreement": 1 - len(disagreements) / len(cases),
        "worst_pathological_ms": 1000 * worst,
        "disagreements": [dict(zip(("pred", "gold", "label", "ours", "math_verify"), d)) for d in disagreements],
    }
    for k, v in result.items():
        if k != "disagreements":
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"\n{len(disagreements)} disagreements (pred | gold | label | ours | math-verify):")
    for d in disagreements:
        print(f"  {d[0]!r} | {d[1]!r} | {d[2]} | {d[3]} | {d[4]}")
    out = Path(__file__).parent / "results" / "bench_verify.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
