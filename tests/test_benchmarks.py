"""The benchmark scripts still run (tiny random model, a few tokens; their timings are not checked)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script,extra", [("bench_generate.py", ["--no-compile"]), ("bench_roofline.py", [])])
def test_benchmark_smoke(script, extra):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "roofline" in done.stdout
