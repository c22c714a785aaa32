"""Decode speed, side by side in one run: naive, KV cache, packed weights, batched, compiled, and HF generate.

    python benchmarks/bench_generate.py                 # the real offline model, 256 new tokens
    python benchmarks/bench_generate.py --smoke         # tiny random model, seconds (checks the script)

Every row generates exactly --new-tokens tokens per sequence (end-of-turn ignored) from the same
chat prompt, on the same weights in the same dtype (--dtype auto: bfloat16 where the CPU computes it
natively, float32 elsewhere; the CPU and dtype are printed and recorded). tokens/s counts generated tokens (prefill included in
the time); each row is the best of --repeats runs, and for each batch size our engine and
transformers' run alternately (the machine's speed drifts over minutes).
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

from rlscratch.generate import chat_prompt, generate, generate_without_cache, pack_for_cpu, packing_works
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


def gemv_bandwidth(dtype: torch.dtype, packed: bool = False, total_bytes: float = 560e6, repeats: int = 4) -> float:
    """Best bytes/s of matrix-vector products streaming weight matrices that total far more than
    the CPU caches, over two shapes: the MLP's (4864 x 896) and the output layer's (151936 x 896).

    packed: the weights prepacked for oneDNN, as `pack_for_cpu` does (no reorder on every call).
    """
    best = 0.0
    size = torch.empty(0, dtype=dtype).element_size()
    for rows, cols in ((4864, 896), (151936, 896)):
        count = max(1, int(total_bytes // (rows * cols * size)))
        weights = [torch.randn(rows, cols, dtype=dtype) for _ in range(count)]
        x = torch.randn(1, cols, dtype=dtype)
        if packed:
            weights = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
            products = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in weights]  # noqa: E731
        else:
            products = lambda: [x @ w.T for w in weights]  # noqa: E731
        products()  # warm-up
        best = max(best, count * rows * cols * size / timed(products, repeats))
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
    best_bandwidth = {"plain": 0.0, "packed": 0.0}
    best_prefill_only = float("inf")  # packed, batch 1, one new token: the prefill and setup cost
    for b in [int(x) for x in args.batches.split(",")]:
        # the machine's speed drifts: alternate the engines and keep each one's best time
        best = {"ours": float("inf"), "packed": float("inf"), "hf": float("inf")}
        for _ in range(args.repeats):
            best["ours"] = min(best["ours"], timed(lambda: ours(model, b)))
            best["packed"] = min(best["packed"], timed(lambda: ours(packed, b)))
            if b in hf_batches:
                best["hf"] = min(best["hf"], timed(lambda: hf_run(b)))
            if b == 1:  # the roofline's inputs, measured next to the batch-1 runs they bound
                best_bandwidth["plain"] = max(best_bandwidth["plain"], gemv_bandwidth(dtype))
                if can_pack:
                    best_bandwidth["packed"] = max(best_bandwidth["packed"], gemv_bandwidth(dtype, packed=True))
                best_prefill_only = min(best_prefill_only, timed(lambda: ours(packed, 1, new_tokens=1)))
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

    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    plain_bw, packed_bw = best_bandwidth["plain"], best_bandwidth["packed"]
    bandwidth = max(plain_bw, packed_bw)  # the fastest weight streaming measured is the honest bound
    by_name = {r["name"]: r["tokens_per_s"] for r in rows}
    summary = {
        "kv_cache_over_naive": by_name["rlscratch KV cache, batch 1"] / by_name["naive (no cache), batch 1"],
        "weight_bytes": weight_bytes, "gemv_bandwidth_GBps": plain_bw / 1e9,
        "packed_gemv_bandwidth_GBps": packed_bw / 1e9, "roofline_tokens_per_s": bandwidth / weight_bytes,
    }
    packed_b1 = next(r for r in rows if r["name"] == "rlscratch KV cache + packed weights, batch 1")
    # decode steps alone: (n - 1) further tokens in (time for n tokens - time for 1 token)
    summary["packed_batch1_decode_only_tokens_per_s"] = (n_new - 1) / (packed_b1["seconds"] - best_prefill_only)
    summary["packed_batch1_decode_only_fraction_of_roofline"] = (
        summary["packed_batch1_decode_only_tokens_per_s"] / summary["roofline_tokens_per_s"])
    for engine, label in (("plain", "rlscratch KV cache"), ("packed", "rlscratch KV cache + packed weights")):
        summary[f"{engine}_batch1_fraction_of_roofline"] = by_name[f"{label}, batch 1"] / summary["roofline_tokens_per_s"]
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
