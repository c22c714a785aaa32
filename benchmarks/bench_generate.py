"""Decode speed, side by side in one run: naive, KV cache, packed weights, batched, compiled, and HF generate.

    python benchmarks/bench_generate.py                 # the real offline model, 256 new tokens
    python benchmarks/bench_generate.py --smoke         # tiny random model, seconds (checks the script)

Every row generates exactly --new-tokens tokens per sequence (end-of-turn ignored) from the same
chat prompt, on the same weights in the same dtype (--dtype auto: bfloat16 where the CPU computes it
natively, float32 elsewhere; the CPU and dtype are printed and recorded). tokens/s counts generated tokens (prefill included in
the time); each row is the best of --repeats runs, and for each batch size our engine and
transformers' run alternately (the machine's speed drifts over minutes).
The batch-1 rows are also reported as decode steps alone (prefill excluded: n tokens minus 1 token)
against the memory roofline: the bandwidth of a pure memory stream (a sum over 1 GB, best of 5,
`rlscratch.generate.memory_bandwidth`) over the bytes of weights a step reads.
Results: benchmarks/results/bench_generate.json (+ a markdown table on stdout).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from rlscratch.generate import (chat_prompt, generate, generate_without_cache, memory_bandwidth, pack_for_cpu,
                                packing_works, weight_bytes_per_token)
from rlscratch.model import OFFLINE_MODEL, describe_hardware, hf_reference, load_model, resolve_dtype

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` runs (the machine is shared; the minimum is the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--smoke", action="store_true", help="tiny random model and few tokens")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--hf-batches", default="1,8,16,32")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per row (naive: 1)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_generate.json"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.new_tokens, args.batches, args.hf_batches = "tiny-random", 8, "1,4", "1,4"
        args.out = os.devnull
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = resolve_dtype(args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    hardware = describe_hardware()
    can_pack = packing_works(dtype)
    print(f"{hardware}\ndtype {dtype}; oneDNN weight packing for {dtype}: {'yes' if can_pack else 'no (plain product)'}")
    model, tok = load_model(args.model, dtype=dtype)
    prompt = chat_prompt(tok, QUESTION)
    prompt_ids = tok.encode(prompt)
    n_new = args.new_tokens
    rows = []

    def record(name, batch, seconds, **extra):
        rows.append({"name": name, "batch": batch, "seconds": round(seconds, 3),
                     "tokens_per_s": round(batch * n_new / seconds, 2), **extra})
        print(f"{name:<48} {rows[-1]['tokens_per_s']:8.1f} tokens/s  ({seconds:.1f}s)", flush=True)

    def ours(m, b, new_tokens=n_new):
        generate(m, tok, [prompt] * b, max_new_tokens=new_tokens, batch_size=b, ignore_eos=True)

    packed = pack_for_cpu(copy.deepcopy(model))  # packing is in place: a second model, the same weights
    ours(model, 1), ours(packed, 1)  # warm-up
    record("naive (no cache), batch 1", 1, timed(lambda: generate_without_cache(model, prompt_ids, n_new)))

    hf = hf_reference(model)
    ids = torch.tensor([prompt_ids])

    def hf_run(b):
        batch = ids.repeat(b, 1)
        with torch.inference_mode():
            hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n_new, min_new_tokens=n_new,
                        do_sample=False, pad_token_id=tok.pad_token_id)

    hf_batches = {int(x) for x in args.hf_batches.split(",")}
    bandwidth = 0.0
    best_prefill_only = {"plain": float("inf"), "packed": float("inf")}  # batch 1, one new token: prefill and setup
    for b in [int(x) for x in args.batches.split(",")]:
        # the machine's speed drifts: alternate the engines and keep each one's best time
        best = {"ours": float("inf"), "packed": float("inf"), "hf": float("inf")}
        for _ in range(args.repeats):
            best["ours"] = min(best["ours"], timed(lambda: ours(model, b)))
            best["packed"] = min(best["packed"], timed(lambda: ours(packed, b)))
            if b in hf_batches:
                best["hf"] = min(best["hf"], timed(lambda: hf_run(b)))
            if b == 1:  # the roofline's bandwidth and the prefill times, measured next to the batch-1 runs
                bandwidth = max(bandwidth, memory_bandwidth(0.05 if args.smoke else 1.0))
                best_prefill_only["plain"] = min(best_prefill_only["plain"], timed(lambda: ours(model, 1, new_tokens=1)))
                best_prefill_only["packed"] = min(best_prefill_only["packed"], timed(lambda: ours(packed, 1, new_tokens=1)))
        record(f"rlscratch KV cache, batch {b}", b, best["ours"])
        record(f"rlscratch KV cache + packed weights, batch {b}", b, best["packed"])
        if b in hf_batches:
            record(f"transformers generate, batch {b}", b, best["hf"])
    del hf

    if not args.no_compile:
        compiled = torch.compile(model, dynamic=True)
        compile_s = timed(lambda: ours(compiled, 1))  # first call: compiles
        best_compiled = best_eager = float("inf")
        for _ in range(args.repeats):  # alternate with eager batch 1, as above
            best_compiled = min(best_compiled, timed(lambda: ours(compiled, 1)))
            best_eager = min(best_eager, timed(lambda: ours(model, 1)))
        record("rlscratch + torch.compile, batch 1", 1, best_compiled, compile_seconds=round(compile_s, 1),
               eager_same_phase_tokens_per_s=round(n_new / best_eager, 2))

    weight_bytes = weight_bytes_per_token(model)
    by_name = {r["name"]: r["tokens_per_s"] for r in rows}
    summary = {
        "kv_cache_over_naive": by_name["rlscratch KV cache, batch 1"] / by_name["naive (no cache), batch 1"],
        "weight_bytes": weight_bytes, "memory_bandwidth_GBps": bandwidth / 1e9,
        "roofline_tokens_per_s": bandwidth / weight_bytes,
    }
    for engine, label in (("plain", "rlscratch KV cache"), ("packed", "rlscratch KV cache + packed weights")):
        batch1 = next(r for r in rows if r["name"] == f"{label}, batch 1")
        # decode steps alone: (n - 1) further tokens in (time for n tokens - time for 1 token)
        rate = (n_new - 1) / (batch1["seconds"] - best_prefill_only[engine])
        summary[f"{engine}_batch1_decode_tokens_per_s"] = rate
        summary[f"{engine}_batch1_decode_fraction_of_roofline"] = rate / summary["roofline_tokens_per_s"]
        for b in [int(x) for x in args.hf_batches.split(",")]:
            if f"{label}, batch {b}" in by_name:
                summary[f"{engine}_over_hf_batch{b}"] = by_name[f"{label}, batch {b}"] / by_name[f"transformers generate, batch {b}"]
    compiled_row = next((r for r in rows if "torch.compile" in r["name"]), None)
    if compiled_row:
        summary["compile_over_eager_batch1"] = compiled_row["tokens_per_s"] / compiled_row["eager_same_phase_tokens_per_s"]
    result = {"date": datetime.date.today().isoformat(), "machine": f"{hardware}, {torch.get_num_threads()} threads",
              "arch": platform.machine(), "dtype": str(dtype).removeprefix("torch."), "packing": can_pack,
              "model": args.model,
              "prompt_tokens": len(prompt_ids), "new_tokens": n_new, "rows": rows, "summary": summary}
    print("\n| engine | batch | tokens/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['name'].rsplit(',', 1)[0]} | {r['batch']} | {r['tokens_per_s']:.1f} |")
    print("\n" + "\n".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    if args.out != os.devnull:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
