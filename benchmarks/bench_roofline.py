"""How close batch-1 decoding gets to the memory roofline, plain and packed, measured side by side in one run.

    python benchmarks/bench_roofline.py            # the real offline model
    python benchmarks/bench_roofline.py --smoke    # tiny random model (checks the script)

The roofline is the machine's: a batch-1 decode step reads every weight once, so it can run at most
at (memory bandwidth) / (bytes of weights per token) tokens/s. The bandwidth is measured once per
repeat with a pure memory stream (a sum over a 1 GB float32 tensor, `rlscratch.generate.memory_bandwidth`),
never through a matrix product, whose kernel costs are what the engine is judged on. Four measurements
alternate --repeats times (this machine's speed drifts), each the best of its repeats:
  stream    the memory bandwidth
  plain     batch-1 decode steps alone with plain nn.Linear weights: (n - 1) / (time for n tokens - time for 1)
  packed    the same with weights packed by `pack_for_cpu`
  products  the packed model's matrix products and nothing else (no attention, norms, sampling or
            Python loop), once per token: the ceiling of this way of computing them
Every rate is reported as a fraction of the one roofline. Results: benchmarks/results/bench_roofline.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import QUESTION, timed  # noqa: E402

from rlscratch.generate import (chat_prompt, generate, memory_bandwidth, pack_for_cpu, packing_works,  # noqa: E402
                                weight_bytes_per_token)
from rlscratch.model import OFFLINE_MODEL, describe_hardware, load_model, resolve_dtype  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-gb", type=float, default=1.0, help="size of the memory stream (>= 1 GB)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_roofline.json"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.new_tokens, args.stream_gb, args.out = "tiny-random", 8, 0.05, os.devnull
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = resolve_dtype("auto")
    can_pack = packing_works(dtype)
    print(f"{describe_hardware()}\ndtype {dtype}; oneDNN weight packing: {'yes' if can_pack else 'no (plain product)'}")
    plain, tok = load_model(args.model, dtype=dtype)
    packed = pack_for_cpu(copy.deepcopy(plain))  # packing is in place: a second model, the same weights
    prompt = chat_prompt(tok, QUESTION)
    n = args.new_tokens
    layers = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features, dtype=dtype) for m in layers]
    weight_bytes = weight_bytes_per_token(plain)

    def decode(model, new_tokens):
        generate(model, tok, [prompt], max_new_tokens=new_tokens, ignore_eos=True)

    def products():
        with torch.inference_mode():
            for _ in range(n):
                for m, x in zip(layers, inputs):
                    m(x)

    decode(plain, 4), decode(packed, 4), products()  # warm-up (and packing)
    best = {"bandwidth": 0.0, "products_s": float("inf")}
    for engine in ("plain", "packed"):
        best[f"{engine}_prefill_s"] = best[f"{engine}_decode_s"] = float("inf")
    for _ in range(args.repeats):
        best["bandwidth"] = max(best["bandwidth"], memory_bandwidth(args.stream_gb))
        for engine, model in (("plain", plain), ("packed", packed)):
            best[f"{engine}_prefill_s"] = min(best[f"{engine}_prefill_s"], timed(lambda: decode(model, 1)))
            best[f"{engine}_decode_s"] = min(best[f"{engine}_decode_s"], timed(lambda: decode(model, n)))
        best["products_s"] = min(best["products_s"], timed(products))
    roofline = best["bandwidth"] / weight_bytes
    result = {
        "date": datetime.date.today().isoformat(), "machine": describe_hardware(), "dtype": str(dtype)[6:],
        "packing": can_pack, "model": args.model, "new_tokens": n, "repeats": args.repeats,
        "stream_gigabytes": args.stream_gb, "weight_bytes": weight_bytes,
        "memory_bandwidth_GBps": best["bandwidth"] / 1e9, "roofline_tokens_per_s": roofline,
    }
    for engine in ("plain", "packed"):
        rate = (n - 1) / (best[f"{engine}_decode_s"] - best[f"{engine}_prefill_s"])
        result[f"{engine}_decode_tokens_per_s"] = rate
        result[f"{engine}_fraction_of_roofline"] = rate / roofline
    result["packed_products_only_tokens_per_s"] = n / best["products_s"]
    result["packed_products_only_fraction_of_roofline"] = result["packed_products_only_tokens_per_s"] / roofline
    for key, value in result.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    if args.out != os.devnull:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
