"""How close batch-1 decoding gets to the weight-streaming roofline, measured side by side in one run.

    python benchmarks/bench_roofline.py            # the real offline model
    python benchmarks/bench_roofline.py --smoke    # tiny random model (checks the script)

Three measurements alternate --repeats times (this machine's bandwidth drifts over seconds):
  decode   packed batch-1 decode steps alone: (n - 1) tokens / (time for n tokens - time for 1 token)
  stream   the same packed model's matrix products and nothing else (no attention, norms or Python
           loop), n times back to back: the sustained rate at which this model's weights can be read
  burst    short bf16 GEMV bursts over 0.56 GB of synthetic matrices (as in bench_generate.py)
Each is the best of its repeats. Results: benchmarks/results/bench_roofline.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import QUESTION, gemv_bandwidth, timed  # noqa: E402

from rlscratch.generate import PackedLinear, chat_prompt, generate, pack_for_cpu, packing_works  # noqa: E402
from rlscratch.model import OFFLINE_MODEL, describe_hardware, load_model, resolve_dtype  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_roofline.json"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.new_tokens, args.out = "tiny-random", 8, os.devnull
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = resolve_dtype("auto")
    can_pack = packing_works(dtype)
    print(f"{describe_hardware()}\ndtype {dtype}; oneDNN weight packing: {'yes' if can_pack else 'no (plain product)'}")
    model, tok = load_model(args.model, dtype=dtype)
    packed = pack_for_cpu(model)
    prompt = chat_prompt(tok, QUESTION)
    n = args.new_tokens
    products = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    inputs = [torch.randn(1, m.in_features, dtype=dtype) for m in products]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in products)

    def decode(new_tokens):
        generate(packed, tok, [prompt], max_new_tokens=new_tokens, ignore_eos=True)

    def stream():
        with torch.inference_mode():
            for _ in range(n):
                for m, x in zip(products, inputs):
                    m(x)

    decode(4), stream()  # warm-up
    best = {"decode_s": float("inf"), "prefill_s": float("inf"), "stream_s": float("inf"), "burst": 0.0}
    for _ in range(args.repeats):
        best["prefill_s"] = min(best["prefill_s"], timed(lambda: decode(1)))
        best["decode_s"] = min(best["decode_s"], timed(lambda: decode(n)))
        best["stream_s"] = min(best["stream_s"], timed(stream))
        best["burst"] = max(best["burst"], gemv_bandwidth(dtype, packed=can_pack))
    decode_rate = (n - 1) / (best["decode_s"] - best["prefill_s"])
    stream_bw = weight_bytes * n / best["stream_s"]
    result = {
        "date": datetime.date.today().isoformat(), "machine": describe_hardware(), "dtype": str(dtype)[6:],
        "packing": can_pack, "model": args.model, "new_tokens": n, "repeats": args.repeats,
        "weight_bytes": weight_bytes, "decode_tokens_per_s": decode_rate,
        "sustained_stream_GBps": stream_bw / 1e9, "burst_gemv_GBps": best["burst"] / 1e9,
        "roofline_sustained_tokens_per_s": stream_bw / weight_bytes,
        "roofline_burst_tokens_per_s": best["burst"] / weight_bytes,
    }
    result["fraction_of_sustained_roofline"] = decode_rate / result["roofline_sustained_tokens_per_s"]
    result["fraction_of_burst_roofline"] = decode_rate / result["roofline_burst_tokens_per_s"]
    for key, value in result.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    if args.out != os.devnull:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
