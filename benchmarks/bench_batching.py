"""Continuous batching against fixed batches, on real GSM8K prompts whose answers differ in length.

    python benchmarks/bench_batching.py              # real offline model, first 64 GSM8K train problems
    python benchmarks/bench_batching.py --smoke      # tiny random model, a few made-up prompts

Rows, measured side by side in one run (same prompts, greedy, end-of-turn respected, --batch rows):
  fixed batches   one generate() call per group of --batch prompts: a group runs until its longest answer ends
  continuous      one generate() call for all prompts: a finished row takes the next waiting prompt
The two must produce the same answers (in bf16 a near-tie can flip one: the count of identical ones is reported).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rlscratch.generate import generate
from rlscratch.model import OFFLINE_MODEL, describe_hardware, load_model
from rlscratch.prompts import format_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--template", default="step_by_step")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.smoke:
        args.model, args.problems, args.batch, args.max_new_tokens = "tiny-random", 6, 2, 8
        questions = [f"What is {i} + {i * 7}?" + " Think carefully." * i for i in range(args.problems)]
    else:
        from rlscratch.data import load_gsm8k

        questions = [p.question for p in load_gsm8k("train", limit=args.problems)]
    model, tok = load_model(args.model)
    prompts = [format_prompt(tok, q, args.template) for q in questions]
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    generate(model, tok, prompts[:2], max_new_tokens=2)  # warm-up (and weight packing)
    groups = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    rows, outputs = [], {}
    for name, run in [("fixed batches", lambda: [c for g in groups for c in generate(model, tok, g, **kw)]),
                      ("continuous", lambda: generate(model, tok, prompts, **kw))]:
        t0 = time.perf_counter()
        outputs[name] = run()
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in outputs[name])
        rows.append({"name": name, "seconds": round(seconds, 2), "generated_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 2)})
        print(f"{name:15} {rows[-1]['tokens_per_s']:7.1f} tokens/s ({tokens} tokens in {seconds:.1f}s)", flush=True)
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["fixed batches"], outputs["continuous"]))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": describe_hardware(), "model": args.model,
              "template": args.template, "problems": len(prompts), "batch": args.batch,
              "max_new_tokens": args.max_new_tokens, "rows": rows, "identical_answers": same,
              "continuous_over_fixed": round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)}
    print(f"{result['machine']}\ncontinuous batching: {result['continuous_over_fixed']:.2f}x the fixed batches; "
          f"{same} of {len(prompts)} answers identical")
    if not args.smoke:
        out = Path(__file__).parent / "results" / "bench_batching.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
