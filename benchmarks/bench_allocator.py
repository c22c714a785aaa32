"""Does the memory allocator matter for a GRPO step on a CPU? The same scoring work under glibc's malloc,
jemalloc and tcmalloc, each in its own process, the processes alternating in one run.

    python benchmarks/bench_allocator.py            # the real offline model, chapter 6's packed step
    python benchmarks/bench_allocator.py --smoke    # tiny random model, seconds (checks the script)

Why it might: a training step allocates and frees the same large tensors again and again (the head's
152k-wide logits of a chunk of tokens are tens to hundreds of MB). glibc's malloc serves every block above
its mmap threshold (at most 32 MB) with a fresh `mmap` and returns it with `munmap`, so the kernel zeroes
and maps those pages again on the next use: page faults, counted here as minor faults. jemalloc and
tcmalloc keep freed pages for reuse. The allocator is chosen per process with `LD_PRELOAD` (Debian's
`libjemalloc2` and `libtcmalloc-minimal4`); nothing in the code changes, so the log-probs must agree
exactly, which the script checks and records.

The workload is `bench_packing.py`'s packed layout (4 GSM8K training questions x 8 answers of 120-300
tokens, micro-batches of 4, bf16 autocast where native): the reference pass and the policy pass
(forward + backward) over all micro-batches, then one AdamW step, as `update_step` does. Results:
benchmarks/results/bench_allocator.json.
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

from rlscratch.train import LIBRARY_DIRS, TCMALLOC  # where the training command line looks for tcmalloc

ALLOCATORS = {"glibc": None, "jemalloc": "libjemalloc.so.2", "tcmalloc": TCMALLOC}


def find_library(name: str) -> str | None:
    return next((str(Path(d) / name) for d in LIBRARY_DIRS if (Path(d) / name).exists()), None)


def child(smoke: bool) -> dict:
    """One process's measurement (run under the allocator its parent preloaded)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_packing import run_layout, setup

    model, _, separate, packed, autocast, bf16 = setup(smoke)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_ref, values = run_layout(model, "packed", separate, packed, autocast, grad=False)
    faults1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_pol, _ = run_layout(model, "packed", separate, packed, autocast, grad=True)
    t0 = time.perf_counter()
    optimizer.step()
    t_opt = time.perf_counter() - t0
    faults2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return {"reference_s": t_ref, "policy_s": t_pol, "optimizer_s": t_opt,
            "minor_faults_reference": faults1 - faults0, "minor_faults_policy_and_optimizer": faults2 - faults1,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "logprob_checksum": float(sum(v.double().sum() for v in values)),
            "compute": "bf16 autocast" if bf16 else "float32"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few tokens")
    p.add_argument("--rounds", type=int, default=1, help="rounds of all allocators, alternating")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.smoke)), flush=True)
        return 0
    from rlscratch.model import describe_hardware

    libraries = {name: (find_library(lib) if lib else "") for name, lib in ALLOCATORS.items()}
    missing = [name for name, path in libraries.items() if path is None]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (Debian: apt-get install libjemalloc2 "
              "libtcmalloc-minimal4)")
    runs: dict[str, list[dict]] = {name: [] for name, path in libraries.items() if path is not None}
    for _ in range(args.rounds):
        for name in runs:
            env = {**os.environ, "LD_PRELOAD": libraries[name]} if libraries[name] else dict(os.environ)
            command = [sys.executable, __file__, "--child"] + (["--smoke"] if args.smoke else [])
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} child failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs[name].append(json.loads(line[len("RESULT "):]))
            r = runs[name][-1]
            print(f"{name:9} reference {r['reference_s']:6.1f} s  policy {r['policy_s']:6.1f} s  AdamW "
                  f"{r['optimizer_s']:5.1f} s  minor faults {r['minor_faults_reference'] + r['minor_faults_policy_and_optimizer']:>9}"
                  f"  peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
    checksums = {r["logprob_checksum"] for rs in runs.values() for r in rs}
    if len(checksums) != 1:
        print(f"WARNING: the processes' log-probs differ (sums {sorted(checksums)})")
    best = {name: {k: min(r[k] for r in rs) for k in ("reference_s", "policy_s", "optimizer_s")}
            for name, rs in runs.items()}
    for b in best.values():
        b["total_s"] = b["reference_s"] + b["policy_s"] + b["optimizer_s"]
    result = {
        "machine": describe_hardware(), "date": datetime.date.today().isoformat(), "smoke": args.smoke,
        "workload": "bench_packing's packed layout: 4 questions x 8 answers (120-300 tokens), micro-batches of 4; "
                    "reference pass, policy forward+backward, one AdamW step",
        "rounds": args.rounds, "identical_logprobs": len(checksums) == 1, "best_seconds": best, "runs": runs,
        "speedup_vs_glibc": {name: best["glibc"]["total_s"] / b["total_s"] for name, b in best.items()}
        if "glibc" in best else {},
    }
    print(json.dumps({k: result[k] for k in ("machine", "best_seconds", "speedup_vs_glibc")}, indent=1))
    if not args.smoke or args.out:
        out = Path(args.out or Path(__file__).parent / "results" / "bench_allocator.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
