"""Self-consistency cost: N samples of one prompt with a shared prefill vs N independent generations.

    python benchmarks/bench_self_consistency.py            # real offline model
    python benchmarks/bench_self_consistency.py --smoke    # tiny random model

Rows, measured side by side in one run (each generates N x --new-tokens tokens, end-of-turn ignored):
  shared prefill      generate([prompt], n=N): the prompt runs once, its KV cache is copied N times
  batched, no sharing generate([prompt] * N): one batch, but the prompt is processed N times
  sequential          N separate generate([prompt]) calls at batch 1
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rlscratch.data import load_gsm8k
from rlscratch.generate import generate
from rlscratch.model import OFFLINE_MODEL, load_model
from rlscratch.prompts import format_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--template", default="few_shot", help="a long few-shot prompt shows the prefill cost best")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.new_tokens = "tiny-random", 8
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model(args.model)
    try:
        question = load_gsm8k("test", limit=1)[0].question
    except Exception:  # no data directory: any word problem will do
        question = "A farmer has 17 sheep and buys 5 more each week for 3 weeks. How many sheep does he have?"
    prompt = format_prompt(tok, question, args.template)
    kw = dict(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True, seed=0, batch_size=args.n)
    generate(model, tok, [prompt], **{**kw, "max_new_tokens": 2})  # warm-up
    rows = []
    for name, run in [
        ("shared prefill (n=N)", lambda: generate(model, tok, [prompt], n=args.n, **kw)),
        ("batched, prompt repeated", lambda: generate(model, tok, [prompt] * args.n, **kw)),
        ("sequential, batch 1", lambda: [generate(model, tok, [prompt], **kw) for _ in range(args.n)]),
    ]:
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        rows.append({"name": name, "seconds": seconds, "tokens_per_s": args.n * args.new_tokens / seconds})
        print(f"{name:28} {rows[-1]['tokens_per_s']:7.1f} tokens/s ({seconds:.1f}s)", flush=True)
    result = {"model": args.model, "n": args.n, "prompt_tokens": len(tok.encode(prompt)),
              "new_tokens": args.new_tokens, "rows": rows,
              "shared_over_repeated": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
              "shared_over_sequential": rows[0]["tokens_per_s"] / rows[2]["tokens_per_s"]}
    print(f"prompt {result['prompt_tokens']} tokens; shared prefill is {result['shared_over_repeated']:.2f}x the "
          f"repeated-prompt batch and {result['shared_over_sequential']:.2f}x sequential generation")
    if not args.smoke:
        out = Path(__file__).parent / "results" / "bench_self_consistency.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
