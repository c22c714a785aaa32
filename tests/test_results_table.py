"""tools/results_table.py: which answers of the book's results table are recorded, which are missing,
and how the self-consistency row reuses chapter 03's 20-sample run."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rlscratch.data import Problem

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def table_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("RLSCRATCH_RESULTS", str(tmp_path))
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_records(tmp_path, settings, ids, n=1, answer="3", interrupted=True):
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    name = settings.run_name("gsm8k")
    with open(runs / f"{name}.jsonl", "a") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "gold": "3", "responses": [f"so \\boxed{{{answer}}}"] * n, "finish": ["stop"] * n,
                                "extracted": [answer] * n, "mean_logprob": [-0.1] * n,
                                "tokens": [100] * n, "correct": [answer == "3"] * n, "seconds": 2.0}) + "\n")
        if interrupted:
            f.write('{"id": "cut short')  # an interrupted write: ignored


def test_plan_counts_what_is_missing(table_tool, tmp_path, capsys):
    problems = [Problem(id=f"gsm8k-test-{i}", question="q", answer="3", solution="", dataset="gsm8k", level=1)
                for i in range(4)]
    args = table_tool.parse(["--limit", "4", "--grpo-model", str(tmp_path / "no-run" / "final")])
    s = table_tool.settings(args)
    assert s["sc"].n == 10 and s["sc20"].n == 20 and s["sc"].temperature == 0.3 and s["cot"].template == "step_by_step"
    write_records(tmp_path, s["base"], ["gsm8k-test-0", "gsm8k-test-1"])
    write_records(tmp_path, s["sc20"], ["gsm8k-test-0"], n=20)  # chapter 03's run: its first 10 samples serve
    write_records(tmp_path, s["sc"], ["gsm8k-test-1"], n=10)
    missing = table_tool.plan(args, problems)
    assert missing == {"base": 2, "cot": 4, "sc": 20, "refine": 12, "grpo": 4}
    out = capsys.readouterr().out
    assert "no trained model" in out and "in all about" in out


def test_table_rows_keep_verdicts_for_pairing(table_tool, tmp_path):
    problems = [Problem(id=f"gsm8k-test-{i}", question="q", answer="3", solution="", dataset="gsm8k", level=1)
                for i in range(4)]
    args = table_tool.parse(["--limit", "4", "--grpo-model", str(tmp_path / "no-run" / "final")])
    s = table_tool.settings(args)
    write_records(tmp_path, s["base"], ["gsm8k-test-0", "gsm8k-test-1"], answer="3", interrupted=False)
    write_records(tmp_path, s["base"], ["gsm8k-test-2", "gsm8k-test-3"], answer="4")
    write_records(tmp_path, s["cot"], ["gsm8k-test-0", "gsm8k-test-2", "gsm8k-test-3"], answer="3", interrupted=False)
    write_records(tmp_path, s["cot"], ["gsm8k-test-1"], answer="5")
    rows = table_tool.table(args, problems)
    assert list(rows) == ["base (greedy)", "+ chain of thought"]  # the other rows have no records: left out
    base, cot = rows["base (greedy)"], rows["+ chain of thought"]
    assert base["verdicts"] == "1100" and cot["verdicts"] == "1011"
    assert base["accuracy"] == 0.5 and cot["accuracy"] == 0.75 and base["n"] == 4
    assert base["vs_cot"] == {"gained": 1, "lost": 2, "p": pytest.approx(1.0)}
    assert base["mean_tokens"] == 100 and base["cpu_minutes"] == pytest.approx(4 * 2.0 / 60)
