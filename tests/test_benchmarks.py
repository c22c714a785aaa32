"""The benchmark scripts still run (tiny random model, a few tokens; their timings are not checked)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,extra,marker", [("bench_generate.py", ["--no-compile"], "roofline"),
                                                 ("bench_roofline.py", [], "roofline"),
                                                 ("bench_train.py", [], "speed_ours_over_hf_plain")])
def test_benchmark_smoke(script, extra, marker):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker in done.stdout
