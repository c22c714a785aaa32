"""The benchmark scripts still run (tiny random model, a few tokens; their timings are not checked)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,extra,marker", [("bench_generate.py", ["--no-compile"], "roofline"),
                                                 ("bench_roofline.py", [], "roofline"),
                                                 ("bench_train.py", [], "speed_ours_over_hf_plain"),
                                                 ("bench_batching.py", [], "answers identical"),
                                                 ("bench_packing.py", [], "speedup_policy"),
                                                 ("bench_allocator.py", [], "speedup_vs_glibc")])
def test_benchmark_smoke(script, extra, marker):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker in done.stdout


def test_bench_gpu_smoke_checks_decoding(tmp_path):
    """bench_gpu.py --smoke runs on the CPU too; its KV-cache decoding must match full recomputation."""
    import json

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tiny = json.loads(out.read_text())["shapes"]["tiny"]
    assert tiny["decode"]["rows_equal"] == tiny["decode"]["rows"] == 3
    assert tiny["parity"]["float32"]["max_abs_diff"] < 1e-4
