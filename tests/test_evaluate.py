import json

import pytest

import rlscratch.evaluate as E
from rlscratch.data import Problem
from rlscratch.prompts import TEMPLATES, format_prompt

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i), solution="", dataset="gsm8k",
                    level=1 + i % 3) for i in range(5)]


def test_templates(tokenizer):
    assert format_prompt(tokenizer, "Q?", "plain") == "Q?"
    chat = format_prompt(tokenizer, "Q?", "chat")
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    assert "\\boxed{}" in format_prompt(tokenizer, "Q?", "step_by_step")
    assert {"plain", "chat", "step_by_step", "few_shot", "plain_few_shot", "think"} == set(TEMPLATES)
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(tokenizer, "Q?", "fancy")


def stopped_after(saved: int, real_generate):
    """`generate` that raises KeyboardInterrupt once `saved` problems were handed to the caller (a user's Ctrl-C)."""
    def generate(model, tok, prompts, *, on_prompt_done, **kw):
        count = []

        def save_then_stop(i, samples):
            on_prompt_done(i, samples)
            count.append(i)
            if len(count) == saved:
                raise KeyboardInterrupt

        return real_generate(model, tok, prompts, on_prompt_done=save_then_stop, **kw)

    return generate


def test_resume_after_interruption(tiny_model, tokenizer, tmp_path, monkeypatch):
    settings = E.EvalSettings(model="tiny", max_new_tokens=4)
    full = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "a", progress=False)

    real_generate = E.generate
    monkeypatch.setattr(E, "generate", stopped_after(2, real_generate))  # the user stops the run
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "b", progress=False)
    log = next((tmp_path / "b").glob("*.jsonl"))
    assert len(log.read_text().splitlines()) == 2  # the finished problems were saved
    monkeypatch.setattr(E, "generate", real_generate)
    resumed = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "b", progress=False)
    assert [r["id"] for r in resumed] == [p.id for p in PROBLEMS]
    assert [r["responses"] for r in resumed] == [r["responses"] for r in full]
    assert sorted(json.loads(line)["id"] for line in log.read_text().splitlines()) == sorted(p.id for p in PROBLEMS)

    # a complete rerun generates nothing
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("recomputed a finished run"))
    again = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "b", progress=False)
    assert again == resumed


def test_half_written_line_is_redone(tiny_model, tokenizer, tmp_path):
    settings = E.EvalSettings(model="tiny", max_new_tokens=3)
    E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], settings, run_dir=tmp_path, progress=False)
    log = next(tmp_path.glob("*.jsonl"))
    log.write_text(log.read_text()[:-25])
    records = E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], settings, run_dir=tmp_path, progress=False)
    assert [r["id"] for r in records] == ["p0", "p1"]
    good_lines = []
    for line in log.read_text().splitlines():
        try:
            good_lines.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    assert sorted(good_lines) == ["p0", "p1"]


def test_record_contents(tiny_model, tokenizer, tmp_path):
    settings = E.EvalSettings(model="tiny", max_new_tokens=3, temperature=1.0, n=2, seed=3)
    [record] = E.evaluate(tiny_model, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    for key in ("prompt", "responses", "extracted", "rules", "correct", "tokens", "seconds", "finish", "mean_logprob"):
        assert key in record
    assert len(record["responses"]) == 2 and all(t <= 3 for t in record["tokens"])


def test_truncated_fallback_is_not_an_answer():
    """grade_record applies rlscratch.verify.score_response (tested against grade() in test_verify.py)."""
    base = {"gold": "4", "responses": ["... and so on, 2 + 2 = 4"]}
    assert E.grade_record({**base, "finish": ["stop"]})["correct"] == [True]
    cut = E.grade_record({**base, "finish": ["length"]})
    assert cut["extracted"] == [None] and cut["rules"] == ["truncated"] and cut["correct"] == [False]
    boxed = E.grade_record({"gold": "4", "responses": ["\\boxed{4} and then more"], "finish": ["length"]})
    assert boxed["correct"] == [True]  # a stated answer counts even if the text ran on


def test_loaded_runs_are_regraded(tiny_model, tokenizer, tmp_path):
    """Records keep raw responses; a stale verdict in the file is recomputed when the run is loaded."""
    settings = E.EvalSettings(model="tiny", max_new_tokens=3)
    E.evaluate(tiny_model, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    log = next(tmp_path.glob("*.jsonl"))
    record = json.loads(log.read_text())
    log.write_text(json.dumps({**record, "correct": ["stale"], "extracted": ["stale"]}) + "\n")
    [again] = E.evaluate(tiny_model, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    assert again["correct"] == record["correct"] and again["extracted"] == record["extracted"]
    on_disk = [json.loads(line) for line in log.read_text().splitlines()]  # the stale verdict was rewritten
    assert len(on_disk) == 1 and on_disk[0]["correct"] == record["correct"] and on_disk[0]["responses"] == record["responses"]


def test_run_names_differ_with_settings():
    a, b = E.EvalSettings(model="m"), E.EvalSettings(model="m", temperature=0.7)
    assert a.run_name("gsm8k") != b.run_name("gsm8k")
    assert a.run_name("gsm8k") == E.EvalSettings(model="m").run_name("gsm8k")
    assert E.EvalSettings(model="m", weights="aa").run_name("gsm8k") != E.EvalSettings(model="m", weights="bb").run_name("gsm8k")


def test_sampled_runs_resume_and_batch_sizes_draw_the_same_samples(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Each problem's samples come from a seed derived from (run seed, problem id): an interrupted and
    resumed run, and runs with other batch sizes, give exactly the samples of one uninterrupted run."""
    settings = E.EvalSettings(model="tiny", max_new_tokens=6, temperature=1.0, n=2, seed=7)
    whole = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "a", progress=False)
    assert len({tuple(r["responses"]) for r in whole}) > 1 and any(len(set(r["responses"])) > 1 for r in whole)  # really sampled
    wider = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=8, run_dir=tmp_path / "b", progress=False)
    assert [r["responses"] for r in wider] == [r["responses"] for r in whole]

    real_generate = E.generate
    monkeypatch.setattr(E, "generate", stopped_after(2, real_generate))
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=2, run_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(E, "generate", real_generate)
    resumed = E.evaluate(tiny_model, tokenizer, PROBLEMS, settings, batch_size=6, run_dir=tmp_path / "c", progress=False)
    assert [r["responses"] for r in resumed] == [r["responses"] for r in whole]


def test_runs_are_keyed_by_the_weights(tiny_model, tokenizer, tmp_path):
    """A model with other weights (e.g. after training) never reuses the records of the one it started from."""
    import copy

    import torch

    from rlscratch.model import weights_fingerprint

    settings = E.EvalSettings(model="tiny", max_new_tokens=3)
    E.evaluate(tiny_model, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    [meta] = tmp_path.glob("*.settings.json")
    assert json.loads(meta.read_text())["weights"] == weights_fingerprint(tiny_model)
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        trained.lm_head.weight.add_(0.01)  # one "optimizer step"
    assert weights_fingerprint(trained) != weights_fingerprint(tiny_model)
    E.evaluate(trained, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # a second run, not the first one's records
    E.evaluate(tiny_model, tokenizer, PROBLEMS[:1], settings, run_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # the original weights find their run again


def test_load_records_reads_a_run_without_a_model(tiny_model, tokenizer, tmp_path):
    from rlscratch.model import weights_fingerprint

    settings = E.EvalSettings(model="tiny", max_new_tokens=3, weights=weights_fingerprint(tiny_model))
    assert E.load_records(settings, "gsm8k", run_dir=tmp_path) == {}
    records = E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], settings, run_dir=tmp_path, progress=False)
    loaded = E.load_records(settings, "gsm8k", run_dir=tmp_path)
    assert list(loaded) == ["p0", "p1"] and [loaded[r["id"]]["responses"] for r in records] == [r["responses"] for r in records]
    other = E.EvalSettings(model="tiny", max_new_tokens=4, weights=settings.weights)
    assert E.load_records(other, "gsm8k", run_dir=tmp_path) == {}
    with pytest.raises(ValueError, match="weights"):
        E.load_records(E.EvalSettings(model="tiny"), "gsm8k", run_dir=tmp_path)


def test_bad_problem_lists(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no problems"):
        E.evaluate(tiny_model, tokenizer, [], E.EvalSettings(model="m"), run_dir=tmp_path)
    mixed = [PROBLEMS[0], Problem(id="m", question="q", answer="1", solution="", dataset="math", level=1)]
    with pytest.raises(ValueError, match="one dataset"):
        E.evaluate(tiny_model, tokenizer, mixed, E.EvalSettings(model="m"), run_dir=tmp_path)


def test_summary_and_interval():
    low, high = E.wilson_interval(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    assert E.wilson_interval(0, 10)[0] == 0.0 and E.wilson_interval(10, 10)[1] == 1.0
    records = [{"correct": [i % 2 == 0], "level": 1 + i % 2, "subject": "A", "tokens": [10], "extracted": ["1"],
                "finish": ["stop"], "seconds": 1.0} for i in range(10)]
    s = E.summarize(records)
    assert s["n"] == 10 and s["accuracy"] == 0.5 and s["by_level"][1]["accuracy"] == 1.0
    assert s["by_level"][2]["accuracy"] == 0.0 and s["mean_tokens"] == 10 and s["problems_per_min"] == 60


@pytest.mark.parametrize("wins,losses,p", [
    (0, 0, 1.0), (1, 0, 1.0), (3, 3, 1.0),
    (5, 0, 2 / 2 ** 5), (0, 5, 2 / 2 ** 5), (6, 0, 2 / 2 ** 6),
    (9, 4, 2 * (1 + 13 + 78 + 286 + 715) / 2 ** 13),  # C(13, 0..4)
    (10, 3, 2 * (1 + 13 + 78 + 286) / 2 ** 13), (2, 11, 2 * (1 + 13 + 78) / 2 ** 13),
    (4, 1, 2 * (1 + 5) / 2 ** 5),
])
def test_mcnemar_exact_matches_hand_computed_values(wins, losses, p):
    assert E.mcnemar_exact(wins, losses) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_is_exact_far_in_the_tail():
    # 60 wins, 0 losses: 2 / 2^60, which a normal approximation would not give
    assert E.mcnemar_exact(60, 0) == 2 / 2 ** 60
    assert E.mcnemar_exact(500, 480) == pytest.approx(E.mcnemar_exact(480, 500), rel=1e-12)
    with pytest.raises(ValueError):
        E.mcnemar_exact(-1, 3)


def test_compare_paired_counts_discordant_problems():
    first = [True, True, False, False, True, True]
    second = [True, False, True, False, False, False]
    result = E.compare_paired(first, second)
    assert (result["n"], result["wins"], result["losses"], result["both"], result["neither"]) == (6, 3, 1, 1, 1)
    assert result["p_value"] == E.mcnemar_exact(3, 1) == 2 * (1 + 4) / 2 ** 4
    assert E.compare_paired(second, first)["wins"] == 1  # swapping the runs swaps wins and losses
    with pytest.raises(ValueError):
        E.compare_paired([True], [True, False])


def test_runs_recorded_before_stages_keep_their_names():
    """`stage` joined EvalSettings later: a run without one keeps the name and settings file it had."""
    from pathlib import Path

    runs = Path(__file__).resolve().parent.parent / "data" / "results" / "runs"
    metas = sorted(runs.glob("*.settings.json"))
    assert metas, "no recorded runs to check against"
    for meta in metas:
        settings = E.EvalSettings(**json.loads(meta.read_text()))
        name = meta.name.removesuffix(".settings.json")
        assert settings.run_name(name.split("-", 1)[0]) == name
        if not settings.stage:
            assert json.dumps(settings.key(), indent=1) == meta.read_text()
    staged = E.EvalSettings(model="m", stage="refine-r1")
    assert "-refine-r1-" in staged.run_name("gsm8k") and staged.run_name("gsm8k") != E.EvalSettings(model="m").run_name("gsm8k")


def test_own_prompts_need_a_stage_and_are_recorded(tiny_model, tokenizer, tmp_path):
    prompts = [format_prompt(tokenizer, p.question + " Be brief.", "chat") for p in PROBLEMS[:2]]
    with pytest.raises(ValueError, match="stage"):
        E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], E.EvalSettings(model="tiny", max_new_tokens=3), run_dir=tmp_path,
                   prompts=prompts, progress=False)
    settings = E.EvalSettings(model="tiny", max_new_tokens=3, stage="brief")
    with pytest.raises(ValueError, match="2 problems"):
        E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], settings, run_dir=tmp_path, prompts=prompts[:1], progress=False)
    records = E.evaluate(tiny_model, tokenizer, PROBLEMS[:2], settings, run_dir=tmp_path, prompts=prompts,
                         progress=False, token_logprobs=True)
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert len(r["token_ids"][0]) == len(r["logprobs"][0]) == r["tokens"][0]
        assert sum(r["logprobs"][0]) / r["tokens"][0] == pytest.approx(r["mean_logprob"][0], abs=1e-3)


def test_records_are_reused_only_for_their_prompt(tiny_model, tokenizer, tmp_path, monkeypatch):
    settings = E.EvalSettings(model="tiny", max_new_tokens=3, stage="s")
    first = [format_prompt(tokenizer, p.question, "chat") for p in PROBLEMS[:3]]
    E.evaluate(tiny_model, tokenizer, PROBLEMS[:3], settings, run_dir=tmp_path, prompts=first, progress=False)
    calls = []
    real_generate = E.generate
    monkeypatch.setattr(E, "generate", lambda m, t, prompts, **kw: calls.append(list(prompts)) or real_generate(m, t, prompts, **kw))
    changed = [first[0], format_prompt(tokenizer, "Something else?", "chat"), first[2]]
    records = E.evaluate(tiny_model, tokenizer, PROBLEMS[:3], settings, run_dir=tmp_path, prompts=changed, progress=False)
    assert calls == [[changed[1]]] and [r["prompt"] for r in records] == changed
    calls.clear()  # records without per-token log-probs are redone when they are asked for
    records = E.evaluate(tiny_model, tokenizer, PROBLEMS[:3], settings, run_dir=tmp_path, prompts=changed, progress=False,
                         token_logprobs=True)
    assert len(calls) == 1 and len(calls[0]) == 3 and all("logprobs" in r for r in records)
    log = next(tmp_path.glob("*.jsonl"))
    calls.clear()
    again = E.evaluate(tiny_model, tokenizer, PROBLEMS[:3], settings, run_dir=tmp_path, prompts=changed, progress=False,
                       token_logprobs=True)
    assert calls == [] and again == records
    assert sorted(json.loads(line)["id"] for line in log.read_text().splitlines()) == ["p0", "p1", "p2"]  # one each
