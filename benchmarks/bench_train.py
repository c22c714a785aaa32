"""Training speed and memory, side by side: forward + backward + AdamW, rlscratch vs transformers.

    python benchmarks/bench_train.py                  # the real offline model, 8 sequences x 384 tokens
    python benchmarks/bench_train.py --smoke          # tiny random model, seconds (checks the script)

An AVX2-only CPU, emulated on an AVX-512 one (torch's kernels, oneDNN and MKL all limited to AVX2, so
`dtype="auto"` computes in float32, as it does on such a machine):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_train.py --batch 4 --out benchmarks/results/bench_train_avx2.json

The workload is one GRPO-like optimizer step: every sequence is a 128-token prompt plus a 256-token
completion; the loss is the advantage-weighted mean log-probability of the completion tokens (exactly
what chapter 6 optimizes, without the clipping arithmetic, which costs nothing next to the model).
Both engines hold the same float32 master weights and run their matrix products in the same type:
bf16 under `torch.autocast` where the CPU computes bf16 natively, float32 elsewhere. Both take the
training loop's optimizer (fused AdamW, from `rlscratch.train.make_optimizer`) and run under its memory allocator (tcmalloc where installed,
as `python -m rlscratch.train` does; `--allocator system` keeps glibc's malloc).

* rlscratch: log-probs through `rlscratch.grpo.sequence_logprobs` (the 152k-vocabulary head applied a
  chunk of positions at a time, never materialising all logits), fused q/k/v and gate/up products;
* transformers: `Qwen2ForCausalLM` on the same weights, full logits, `log_softmax`, gather.

Each configuration runs in a child process of its own (peak memory is a per-process quantity); the
configurations alternate for --rounds rounds and each keeps its best time and its lowest peak. Also
reported: the fraction of the CPU's measured matrix-multiply peak reached, counting 6 x (matrix
parameters) FLOPs per token.
Results: benchmarks/results/bench_train.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlscratch.model import OFFLINE_MODEL, describe_hardware, hf_reference, load_model, resolve_dtype
from rlscratch.train import allocator_environment, make_optimizer

CONFIGS = {
    "rlscratch": dict(engine="ours", checkpointing=False),
    "transformers": dict(engine="hf", checkpointing=False),
    "rlscratch + activation checkpointing": dict(engine="ours", checkpointing=True),
    "transformers + activation checkpointing": dict(engine="hf", checkpointing=True),
}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matrix product in `dtype` (the CPU's practical peak)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def child(args: argparse.Namespace) -> None:
    """One configuration: load, one warm-up step, --steps timed steps; print a JSON line."""
    from rlscratch.grpo import sequence_logprobs

    config = CONFIGS[args.config]
    torch.set_num_threads(os.cpu_count() or 1)
    compute = resolve_dtype("auto")
    model, _ = load_model(args.model, dtype=torch.float32)  # float32 master weights
    model.train()
    vocab = model.config.vocab_size
    matrix_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and not n.startswith("embed_tokens"))
    if model.config.tie_word_embeddings:
        matrix_params += model.lm_head.weight.numel()
    if config["engine"] == "hf":
        model = hf_reference(model).train()
        if config["checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing = config["checkpointing"]
    optimizer = make_optimizer(model.parameters(), lr=1e-6)  # the training loop's: fused AdamW
    g = torch.Generator().manual_seed(0)
    B, P, C = args.batch, args.prompt_tokens, args.completion_tokens
    ids = torch.randint(0, vocab, (B, P + C), generator=g)
    attention = torch.ones_like(ids)
    attention[: B // 2, : P // 4] = 0  # half the rows left-padded, as in real batches
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, P:] = True
    advantages = torch.randn(B, generator=g)

    def step() -> None:
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
            if config["engine"] == "hf":
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                mask = completion[:, 1:]
            else:
                logp = sequence_logprobs(model, ids, attention, completion)
                mask = completion
        logp = logp.float()
        loss = -(torch.where(mask, logp, 0.0) * advantages[:, None]).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state
    best = float("inf")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    tokens = B * (P + C)
    print(json.dumps({"config": args.config, "seconds": best, "tokens_per_s": tokens / best,
                      "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "flops_per_s": 6 * matrix_params * tokens / best, "compute_dtype": str(compute)[6:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=OFFLINE_MODEL)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, one round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child, after one warm-up (the best counts: the first after the warm-up still runs slow)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--allocator", choices=("training", "system"), default="training",
                        help="training: the allocator python -m rlscratch.train picks (tcmalloc where installed); "
                             "system: glibc's malloc")
    parser.add_argument("--child", dest="config", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_train.json"))
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.prompt_tokens, args.completion_tokens = "tiny-random", 2, 8, 8
        args.rounds, args.out = 1, os.devnull
    if args.config:
        return child(args)
    hardware = describe_hardware()
    compute = resolve_dtype("auto")
    peak = matmul_peak(compute)
    environment = dict(os.environ)
    if args.allocator == "system":
        environment["LD_PRELOAD"] = ":".join(p for p in environment.get("LD_PRELOAD", "").split(":")
                                             if p and "tcmalloc" not in p)
    else:
        environment = allocator_environment(environment) or environment
    allocator = "tcmalloc" if "tcmalloc" in environment.get("LD_PRELOAD", "") else "glibc malloc"
    print(f"allocator for every configuration: {allocator}")
    print(f"{hardware}\nmatrix products in {compute} (float32 master weights); measured matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; {args.batch} x ({args.prompt_tokens} + {args.completion_tokens}) tokens", flush=True)
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in configs:
            command = [sys.executable, __file__, "--child", name, "--model", args.model, "--batch", str(args.batch),
                       "--prompt-tokens", str(args.prompt_tokens), "--completion-tokens", str(args.completion_tokens),
                       "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=environment)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:<42} {row['tokens_per_s']:7.1f} tokens/s  peak {row['peak_rss_GB']:5.1f} GB", flush=True)
            lowest_peak = min(row["peak_rss_GB"], best.get(name, row)["peak_rss_GB"])  # over every round
            if name not in best or row["seconds"] < best[name]["seconds"]:
                best[name] = row
            best[name]["peak_rss_GB"] = lowest_peak
    for row in best.values():
        row["fraction_of_matmul_peak"] = row["flops_per_s"] / peak
    summary = {}
    for suffix in ("", " + activation checkpointing"):
        ours, hf = best.get("rlscratch" + suffix), best.get("transformers" + suffix)
        if ours and hf:
            key = suffix.strip(" +").replace(" ", "_") or "plain"
            summary[f"speed_ours_over_hf_{key}"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            summary[f"peak_memory_ours_over_hf_{key}"] = ours["peak_rss_GB"] / hf["peak_rss_GB"]
    print("\n| configuration | tokens/s | peak memory (GB) | of matmul peak |\n|---|---:|---:|---:|")
    for name, row in best.items():
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['peak_rss_GB']:.1f} | {row['fraction_of_matmul_peak']:.0%} |")
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    if args.out != os.devnull:
        result = {"date": datetime.date.today().isoformat(), "machine": hardware, "compute_dtype": str(compute)[6:],
                  "matmul_peak_GFLOPs": peak / 1e9, "allocator": allocator, "optimizer": "AdamW (fused)",
                  "model": args.model, "batch": args.batch,
                  "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
                  "rows": best, "summary": summary}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
