"""The GRPO training loop (rlscratch.train): schedule, presets, errors, accumulation, checkpoints, export,
and whole toy runs through the command line, killed and resumed. Tiny models only."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlscratch import train as T
from rlscratch.data import DataError, Problem
from rlscratch.generate import Completion
from rlscratch.model import Qwen2Model, load_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent
TIMING = T.MEASUREMENTS  # what the machine measured (times, memory): differs between runs of the same work


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny operations: one thread each is fastest on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), wandb_mode="disabled", dtype="float32")
    return T.make_config(kw.pop("preset", "grpo"), "toy", **{**base, **kw})


# ---------------------------------------------------------------- schedule


def test_lr_schedule_values():
    f = lambda s: T.lr_factor(s, warmup_steps=4, total_steps=24, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, the first step is not 0
    assert f(4) == 1.0  # the peak, where the cosine starts
    assert f(14) == pytest.approx(0.55, abs=1e-12)  # half way through the decay: half way to the floor
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # the floor, and it stays there
    assert all(f(s) > f(s + 1) for s in range(4, 23))
    assert T.lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0  # no warmup

    cfg = dataclasses.replace(T.TrainConfig(), lr=2e-3, warmup_steps=2, min_lr_ratio=0.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = T.make_scheduler(opt, cfg, total_updates=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2e-3 * T.lr_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.0) for s in range(6)]
    assert seen == pytest.approx(expected) and seen[:3] == pytest.approx([1e-3, 2e-3, 2e-3])
    assert seen[3] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


# ---------------------------------------------------------------- presets, config, errors


def test_presets_select_the_right_loss_settings(tmp_path):
    grpo, dr, dapo = (toy_config(tmp_path, preset=p) for p in ("grpo", "dr_grpo", "dapo"))
    assert (grpo.advantage_scale, grpo.beta, grpo.kl, grpo.aggregation) == ("group", 0.04, "k3", "sequence")
    assert (grpo.clip_low, grpo.clip_high, grpo.mask_truncated, grpo.drop_zero_signal) == (0.2, 0.2, False, False)
    assert (dr.advantage_scale, dr.beta, dr.aggregation) == ("none", 0.0, "constant")
    assert (dapo.advantage_scale, dapo.beta, dapo.aggregation) == ("group", 0.0, "token")
    assert (dapo.clip_low, dapo.clip_high, dapo.mask_truncated, dapo.drop_zero_signal) == (0.2, 0.28, True, True)
    assert dapo.max_refills > 0
    # what grpo_loss receives; dr_grpo's constant normaliser is the answer budget
    assert T.loss_settings(dr) == dict(beta=0.0, clip_low=0.2, clip_high=0.2, kl="k3", aggregation="constant",
                                       max_tokens=dr.max_new_tokens)
    assert T.loss_settings(grpo)["beta"] == 0.04 and T.loss_settings(dapo)["clip_high"] == 0.28
    # explicit settings win over the preset, None means "not given"
    assert toy_config(tmp_path, preset="grpo", beta=0.0).beta == 0.0
    assert toy_config(tmp_path, preset="dapo", clip_high=None).clip_high == 0.28
    # the task's defaults apply under every preset
    assert grpo.model == dr.model == "tiny-random" and grpo.lr == dapo.lr == T.TASK_DEFAULTS["toy"]["lr"]


def test_preset_advantages_and_masks(tmp_path):
    """make_rollouts applies the preset's advantage scaling and DAPO's truncation mask."""
    def group(rewards, finish):
        cs = [Completion(0, j, "x", [5] * (j + 1), [-1.0] * (j + 1), f) for j, f in enumerate(finish)]
        return T.Group(Problem("p", "q", "1", "", "gsm8k", 1), 0, [1, 2], cs, rewards)

    groups = [group([1.0, 0.0, 0.0, 0.0], ["stop", "length", "stop", "stop"]),
              group([0.0, 0.0, 0.0, 0.0], ["stop"] * 4)]
    task = T.Gsm8kTask()
    grpo = dataclasses.replace(toy_config(tmp_path, preset="grpo"), group_size=4)
    dr = dataclasses.replace(toy_config(tmp_path, preset="dr_grpo"), group_size=4)
    dapo = dataclasses.replace(toy_config(tmp_path, preset="dapo"), group_size=4)
    r_grpo, r_dr, r_dapo = (T.make_rollouts(groups, task, c) for c in (grpo, dr, dapo))
    assert [r.advantage for r in r_dr] == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert [r.advantage for r in r_grpo] == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], rel=1e-5)
    assert [r.in_loss for r in r_dapo] == [True, False, True, True] + [True] * 4  # the truncated answer
    assert all(r.in_loss for r in r_grpo)
    # zero-advantage answers are skipped but still counted by the normaliser
    assert len(T.trained_rollouts(r_grpo, grpo)) == 4
    assert len(T.trained_rollouts(r_grpo, dataclasses.replace(grpo, skip_zero_signal=False))) == 8
    assert len(T.trained_rollouts(r_dapo, dapo)) == 3
    assert T.batch_normalizer(r_grpo, grpo) == 8  # sequence mean: every answer of the batch
    assert T.batch_normalizer(r_dapo, dapo) == (1 + 3 + 4) + (1 + 2 + 3 + 4)  # token mean: tokens in the loss
    assert T.batch_normalizer(r_dr, dr) == 8 * dr.max_new_tokens


@pytest.mark.parametrize("overrides, message", [
    (dict(group_size=1), "group size 1"),
    (dict(temperature=0.0), "temperature > 0"),
    (dict(prepass_samples=1), ">= 2 samples"),
    (dict(max_refills=2), "needs --drop-zero-signal"),
    (dict(aggregation="mean"), "--aggregation must be one of"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(colour="red"), "unknown setting"),
])
def test_impossible_configs_give_one_clear_message(tmp_path, overrides, message):
    with pytest.raises(T.ConfigError, match=message) as err:
        toy_config(tmp_path, **overrides)
    assert "\n" not in str(err.value)
    with pytest.raises(T.ConfigError, match="unknown preset"):
        T.make_config("ppo", "toy")


def test_cli_flags_document_every_setting():
    parser = T.build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    assert {a.dest for a in actions} == {f.name for f in dataclasses.fields(T.TrainConfig)}
    help_text = parser.format_help()
    for a in actions:
        assert a.help and a.option_strings[0] in help_text
    for preset in T.PRESETS:
        assert preset in help_text


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--task", "toy", "--bogus-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus-flag" in capsys.readouterr().err

    def run(*argv):
        status = T.main(["--task", "toy", "--wandb-mode", "disabled", "--output-dir", str(tmp_path / "r"), *argv])
        err = capsys.readouterr().err.strip()
        return status, err

    status, err = run("--group-size", "1")
    assert status == 1 and err.count("\n") == 0 and "group size 1" in err and "--group-size >= 2" in err
    status, err = run("--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "m"))
    assert status == 1 and err.count("\n") == 0 and "cannot load model" in err

    def no_hub(name, config, split, tried):
        raise DataError(f"could not load {name} {split}: looked in {tried}, then the Hugging Face Hub failed")

    monkeypatch.setenv("RLSCRATCH_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr("rlscratch.data._from_hub", no_hub)
    status = T.main(["--task", "gsm8k", "--model", "tiny-random", "--wandb-mode", "disabled",
                     "--output-dir", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.count("\n") == 0 and "GSM8K is not available" in err


def test_the_update_runs_without_stale_packed_weights(tmp_path, monkeypatch):
    """Generation packs the policy's weights for fast decoding; the update changes them, so their packed
    copies are freed before it (they would only hold memory) and rebuilt by the next step's generation."""
    from rlscratch.generate import PackedLinear, packing_works

    if not packing_works(torch.float32):
        pytest.skip("oneDNN packing does not apply on this CPU")
    real_collect, real_update, seen = T.collect_groups, T.update_step, []

    def collect(model, *args, **kwargs):
        out = real_collect(model, *args, **kwargs)
        seen.append(("generated", sum(m._packed is not None for m in model.modules() if isinstance(m, PackedLinear))))
        return out

    def update(model, *args, **kwargs):
        seen.append(("update", sum(m._packed is not None for m in model.modules() if isinstance(m, PackedLinear))))
        return real_update(model, *args, **kwargs)

    monkeypatch.setattr(T, "collect_groups", collect)
    monkeypatch.setattr(T, "update_step", update)
    T.train(toy_config(tmp_path, steps=2, prepass_samples=0, eval_problems=0, save_every=5), log=lambda s: None)
    generated = [n for what, n in seen if what == "generated"]
    assert len(generated) == 2 and min(generated) > 0  # generation used packed weights
    assert [n for what, n in seen if what == "update"] == [0, 0]


def test_fused_adamw_matches_the_default_and_marks_the_weights_changed():
    """The training loop's AdamW is fused; its steps equal the default (on the CPU, for-loop) ones and, unlike a bare
    fused step, bump the weights' version counters, which packed generation weights and
    weights_fingerprint watch."""
    from rlscratch.model import weights_fingerprint

    net, _ = load_model("tiny-random", dtype=torch.float64)
    twin = Qwen2Model(net.config).to(torch.float64)
    twin.load_state_dict(net.state_dict())
    fused = T.make_optimizer(net.parameters(), lr=1e-3, weight_decay=0.1)
    default = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    version, fingerprint = net.lm_head.weight._version, weights_fingerprint(net)
    batch = torch.randint(0, net.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in ((net, fused), (twin, default)):
            model(batch).logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert net.lm_head.weight._version == version + 3
    assert weights_fingerprint(net) != fingerprint


def test_run_folder_with_other_settings_is_refused(tmp_path):
    cfg = toy_config(tmp_path, model=str(tmp_path / "no-such-model"))
    with pytest.raises(T.ConfigError, match="cannot load model"):
        T.train(cfg)  # a run that never started ...
    with pytest.raises(T.ConfigError, match="cannot load model"):
        T.train(dataclasses.replace(cfg, model=str(tmp_path / "another")))  # ... does not block its folder
    (Path(cfg.output_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "optimizer_step": 1}) + "\n")
    with pytest.raises(T.ConfigError, match="other settings.*lr"):
        T.train(dataclasses.replace(cfg, lr=1.0))  # one that did, does
    assert T.read_run(tmp_path / "nothing-here") is None


# ---------------------------------------------------------------- the update


def _small_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2Model(tiny_config(vocab_size=512, max_position_embeddings=64)).float()


def _rollouts(n_groups=3, G=4, seed=1):
    """Random prompts/answers of different lengths; group 1 has equal rewards (zero signal)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(n_groups):
        rewards = [0.0] * G if k == 1 else [float(x) for x in torch.randint(0, 2, (G,), generator=g)]
        rewards[0] = 1.0 - rewards[1] if k != 1 and len(set(rewards)) == 1 else rewards[0]
        prompt = torch.randint(3, 512, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        completions = []
        for j in range(G):
            ids = torch.randint(3, 512, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            completions.append(Completion(k, j, "", ids, [-2.0] * len(ids), "stop"))
        groups.append(T.Group(Problem(f"p{k}", "q", "1", "", "gsm8k", 1), k, prompt, completions, rewards))
    return groups


def _one_step(cfg, groups, micro_batch_size, optimizer="adamw"):
    cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_size, grad_clip=1e9)
    model = _small_model()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1.0))
    rollouts = T.make_rollouts(groups, T.Gsm8kTask(), cfg)
    batches = T.micro_batches(T.trained_rollouts(rollouts, cfg), cfg, pad_id=0)
    if cfg.beta > 0:
        reference = _small_model(seed=7)  # another model, so that the KL term is not zero
        for mb, ref in zip(batches, T.score(reference, batches, cfg)):
            mb.ref_logp = ref
    stats = T.update_step(model, batches, T.batch_normalizer(rollouts, cfg), cfg, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    return model, grads, stats


def _separate_logprobs(model, rollouts):
    """Each answer scored alone, prompt + answer in its own (left-padded) row: what packing must reproduce."""
    from rlscratch.grpo import completion_batch, sequence_logprobs

    b = completion_batch([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id=0)
    full = sequence_logprobs(model, b.input_ids, b.attention_mask, b.completion_mask, chunk_size=3)
    width = max(len(r.completion_ids) for r in rollouts)
    return torch.stack([torch.cat([row[-len(r.completion_ids):], row.new_zeros(width - len(r.completion_ids))])
                        for row, r in zip(full, rollouts)])


@pytest.mark.parametrize("tied", [False, True])
def test_packed_answers_score_like_separate_sequences(tied):
    torch.manual_seed(0)
    model = Qwen2Model(tiny_config(vocab_size=512, max_position_embeddings=64, tie_word_embeddings=tied)).float()
    p1, p2 = [5, 9, 2, 7], [3, 8]
    # two prompts, interleaved, answers of different lengths (one of a single token)
    rollouts = [T.Rollout(p, c, [-1.0] * len(c), a, True) for p, c, a in
                [(p1, [11, 12, 13], 1.0), (p2, [20, 21, 22, 23, 24], -1.0), (p1, [14], 0.5), (p1, [15, 16], -0.5)]]
    mb = T.pack_answers(rollouts, pad_id=0)
    assert mb.input_ids.shape == (2, 4 + 3 + 1 + 2)  # one row per prompt, each prompt once
    assert mb.input_ids[0].tolist() == p1 + [11, 12, 13, 14, 15, 16]
    assert mb.input_ids[1].tolist() == p2 + [20, 21, 22, 23, 24] + [0] * 3
    assert mb.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 4, 5]  # each answer starts where its prompt ends
    assert mb.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    packed, states = T.answer_logprobs(model, mb)
    separate = _separate_logprobs(model, rollouts)
    assert packed.shape == separate.shape == (4, 5) and states.shape == (11, model.config.hidden_size)
    assert torch.allclose(packed, separate, atol=1e-5), (packed - separate).abs().max()
    assert (packed[mb.completion_mask == 0] == 0).all() and (packed[mb.completion_mask == 1] < 0).all()
    # the same gradients, through the shared prompt too
    weights = torch.randn(packed.shape)
    grads = []
    for logp in (packed, separate):
        model.zero_grad()
        (logp * weights).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) < 1e-5


def test_pack_answers_and_the_models_layout_checks():
    with pytest.raises(ValueError, match="needs rollouts"):
        T.pack_answers([], pad_id=0)
    with pytest.raises(ValueError, match="needs rollouts"):
        T.pack_answers([T.Rollout([1], [], [], 1.0, True)], pad_id=0)
    model = _small_model()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="go together"):
        model(ids, positions=torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"\(B, T, T\)"):
        model(ids, positions=torch.arange(3)[None], visible=torch.ones(1, 3, 2, dtype=torch.bool))
    # a causal `visible` is the ordinary forward pass
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None]
    assert torch.allclose(model(ids, positions=torch.arange(3)[None], visible=causal), model(ids), atol=1e-6)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo"])
def test_accumulating_micro_batches_gives_the_same_update(tmp_path, preset):
    cfg = dataclasses.replace(toy_config(tmp_path, preset=preset), group_size=4, max_new_tokens=8, temperature=1.0,
                              skip_zero_signal=False)
    groups = _rollouts()
    # plain SGD, so that the weights show the gradient itself (Adam's first step divides it by its own size)
    whole_model, whole_grads, whole = _one_step(cfg, groups, micro_batch_size=12, optimizer="sgd")
    for size in (1, 5):
        model, grads, stats = _one_step(cfg, groups, micro_batch_size=size, optimizer="sgd")
        assert stats["loss"] == pytest.approx(whole["loss"], rel=1e-6, abs=1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(grads, whole_grads)) < 1e-6
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), whole_model.parameters()))
        assert diff < 1e-6, (size, diff)
    assert whole["grad_norm"] > 0 and any(g.abs().sum() > 0 for g in whole_grads)
    if preset == "grpo":
        assert whole["kl"] > 0  # the reference differs from the policy


def test_skipping_zero_signal_answers_is_exact_without_kl(tmp_path):
    cfg = dataclasses.replace(toy_config(tmp_path, preset="dr_grpo"), group_size=4, max_new_tokens=8, temperature=1.0)
    groups = _rollouts()
    _, all_grads, all_stats = _one_step(dataclasses.replace(cfg, skip_zero_signal=False), groups, 12, "sgd")
    _, skip_grads, skip_stats = _one_step(cfg, groups, 12, "sgd")
    assert skip_stats["tokens_trained"] < all_stats["tokens_trained"]  # something was skipped ...
    assert max((a - b).abs().max().item() for a, b in zip(all_grads, skip_grads)) < 1e-7  # ... and nothing changed
    assert skip_stats["loss"] == pytest.approx(all_stats["loss"], abs=1e-7)


def test_bf16_autocast_keeps_float32_master_weights(tmp_path):
    cfg = dataclasses.replace(toy_config(tmp_path, preset="dr_grpo"), group_size=4, max_new_tokens=8, temperature=1.0)
    model = _small_model()
    before = [p.detach().clone() for p in model.parameters()]
    rollouts = T.make_rollouts(_rollouts(), T.Gsm8kTask(), cfg)
    batches = T.micro_batches(T.trained_rollouts(rollouts, cfg), cfg, pad_id=0)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    stats = T.update_step(model, batches, T.batch_normalizer(rollouts, cfg), cfg,
                          torch.optim.AdamW(model.parameters(), lr=1e-3), autocast)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stats["logprob_gap"] is not None and math.isfinite(stats["loss"])


# ---------------------------------------------------------------- rollouts and the pre-pass


class AlternatingTask(T.ToyTask):
    """Deterministic rewards: questions with an even number never earn anything (zero signal), the others
    reward every other sample."""

    def reward(self, problem, completion):
        return 0.0 if int(problem.id.rsplit("-", 1)[1]) % 2 == 0 else float(completion.sample_index % 2)


def test_drop_zero_signal_refills_the_batch(tmp_path, tiny_model, tokenizer):
    cfg = dataclasses.replace(toy_config(tmp_path, preset="dapo"), prompts_per_step=3, group_size=2, max_refills=2)
    problems, _ = AlternatingTask().problems(dataclasses.replace(cfg, train_problems=10))
    order = T.DataOrder(problems, seed=0)
    kept, sampled, cursor = T.collect_groups(tiny_model, tokenizer, AlternatingTask(), order, 0, cfg, step=1)
    signal = sum(g.has_signal for g in sampled)
    assert all(g.has_signal for g in kept) and len(kept) == min(3, signal)
    assert cursor == len(sampled) and len(sampled) in (3, 6, 9)  # whole rounds of P questions, at most 1 + 2
    assert len(sampled) == 9 or len(kept) == 3  # it stops refilling as soon as the batch is full
    plain = dataclasses.replace(cfg, drop_zero_signal=False, max_refills=0)
    kept_plain, sampled_plain, cursor_plain = T.collect_groups(tiny_model, tokenizer, AlternatingTask(), order, 0,
                                                               plain, step=1)
    assert kept_plain == sampled_plain and len(sampled_plain) == 3 and cursor_plain == 3
    # the same step draws the same answers, whatever was asked around it
    assert [c.token_ids for c in sampled_plain[0].completions] == [c.token_ids for c in sampled[0].completions]


def test_prepass_keeps_questions_solved_sometimes_and_resumes(tmp_path, tiny_model, tokenizer, monkeypatch):
    cfg = dataclasses.replace(toy_config(tmp_path), prepass_samples=2, group_size=4, train_problems=8)
    problems, _ = AlternatingTask().problems(cfg)
    run_dir = tmp_path / "pre"
    run_dir.mkdir()
    summary = T.prepass(tiny_model, tokenizer, AlternatingTask(), problems, cfg, run_dir, log=lambda s: None)
    assert summary["kept"] == [p.id for p in problems if int(p.id.rsplit("-", 1)[1]) % 2]
    assert summary["histogram"] == [4, 4, 0] and summary["questions"] == 8
    assert summary["signal_fraction_all"] == pytest.approx(0.5 * (1 - 2 * 0.5**4))
    # resuming from the per-question records: nothing is generated again
    (run_dir / "prepass.json").unlink()
    monkeypatch.setattr(T, "generate", lambda *a, **k: pytest.fail("the pre-pass generated again"))
    again = T.prepass(tiny_model, tokenizer, AlternatingTask(), problems, cfg, run_dir, log=lambda s: None)
    assert again == summary and summary["seconds"] > 0  # its time counts the sessions that generated


def test_prepass_saves_each_question_as_it_finishes(tmp_path, tiny_model, tokenizer, monkeypatch):
    """Killed half-way, the pre-pass keeps every question whose answers were complete and asks only for the rest,
    with their own seeds: the records end equal to an uninterrupted pre-pass's."""
    cfg = dataclasses.replace(toy_config(tmp_path), prepass_samples=2, group_size=4, train_problems=8)
    problems, _ = AlternatingTask().problems(cfg)
    whole = tmp_path / "whole"
    whole.mkdir()
    T.prepass(tiny_model, tokenizer, AlternatingTask(), problems, cfg, whole, log=lambda s: None)
    real_generate, asked = T.generate, []

    def killed_after_three(model, tokenizer, prompts, *, on_prompt_done, **kwargs):
        asked.append(len(prompts))
        seen = []

        def save(i, answers):
            on_prompt_done(i, answers)
            seen.append(i)
            if len(seen) == 3:
                raise KeyboardInterrupt

        return real_generate(model, tokenizer, prompts, on_prompt_done=save, **kwargs)

    cut = tmp_path / "cut"
    cut.mkdir()
    monkeypatch.setattr(T, "generate", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        T.prepass(tiny_model, tokenizer, AlternatingTask(), problems, cfg, cut, log=lambda s: None)
    assert len(T._read_jsonl(cut / "prepass.jsonl")) == 3 and not (cut / "prepass.json").exists()
    monkeypatch.setattr(T, "generate", real_generate)
    resumed = T.prepass(tiny_model, tokenizer, AlternatingTask(), problems, cfg, cut, log=lambda s: None)
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows), key=lambda r: r["id"])
    assert strip(T._read_jsonl(cut / "prepass.jsonl")) == strip(T._read_jsonl(whole / "prepass.jsonl"))
    assert asked == [8] and resumed["kept"] == json.loads((whole / "prepass.json").read_text())["kept"]


def test_gsm8k_rewards_and_a_tiny_run_through_the_harness(tmp_path, monkeypatch, tokenizer):
    task = T.Gsm8kTask()
    problem = Problem("p", "What is 6 * 7?", "42", "", "gsm8k", 1)
    answer = lambda text, finish="stop": Completion(0, 0, text, [1], [0.0], finish)
    assert task.reward(problem, answer("So 6 * 7 = 42. The answer is \\boxed{42}.")) == 1.0
    assert task.reward(problem, answer("The answer is \\boxed{41}.")) == 0.0
    assert task.reward(problem, answer("6 * 7 = 42, and then", "length")) == 0.0  # cut off: a guess is no answer
    assert task.reward(problem, answer("The answer is \\boxed{42}. Also", "length")) == 1.0  # stated, then cut off
    assert "\\boxed{}" in task.prompt(tokenizer, problem)  # chapter 3's step_by_step prompt

    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("RLSCRATCH_DATA", str(tmp_path / "data"))
    cfg = T.make_config("dr_grpo", "gsm8k", model="tiny-random", output_dir=str(tmp_path / "run"), wandb_mode="disabled",
                        dtype="float32", steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, eval_problems=2,
                        eval_max_new_tokens=6, prepass_samples=0)
    T.train(cfg, log=lambda s: None)
    run = T.read_run(cfg.output_dir)
    assert [(e["label"], e["step"], e["n"]) for e in run["evals"]] == [("start", 0, 2), ("epoch-1", 2, 2)]
    assert all(m["reward_mean"] == 0 and m["zero_signal_fraction"] == 1 for m in run["metrics"])  # a random model
    assert all(m["sequences_skipped"] == 4 and m["sequences_trained"] == 0 for m in run["metrics"])
    records = sorted((Path(cfg.output_dir) / "evals").glob("gsm8k-step_by_step-t0.0-n1-*.jsonl"))
    assert records and all(len(T._read_jsonl(r)) == 2 for r in records)
    assert {"gold", "responses", "finish", "correct"} <= set(T._read_jsonl(records[0])[0])
    shutil.rmtree(cfg.output_dir)


# ---------------------------------------------------------------- checkpoints and export


def test_checkpoint_round_trip(tmp_path):
    model = _small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = T.make_scheduler(opt, dataclasses.replace(T.TrainConfig(), warmup_steps=2), total_updates=10)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    sched.step()
    import random

    import numpy as np
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    for step in (2, 4, 6):
        T.save_checkpoint(tmp_path, {"step": step, "cursor": 3 * step, "model": model.state_dict(),
                                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                     "rng": T.rng_state()}, keep=2)
    draws = (torch.rand(2), random.random(), float(np.random.rand()))
    (tmp_path / T.CHECKPOINTS / ".tmp-step-000008").mkdir()  # a save killed half-way is not a checkpoint
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]

    state = T.load_checkpoint(T.list_checkpoints(tmp_path)[-1])
    model2 = _small_model(seed=3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = T.make_scheduler(opt2, dataclasses.replace(T.TrainConfig(), warmup_steps=2), total_updates=10)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    T.set_rng_state(state["rng"])
    assert state["step"] == 6 and state["cursor"] == 18
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(2), draws[0]) and random.random() == draws[1] and float(np.random.rand()) == draws[2]


@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_export_loads_with_identical_logits(tmp_path, tokenizer, tied):
    import transformers

    torch.manual_seed(0)
    model = Qwen2Model(tiny_config(tie_word_embeddings=tied)).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # not the initial values: biases and norms too
            p.add_(torch.randn_like(p) * 0.02)
    folder = T.export_hf(model, tokenizer, tmp_path / "final")
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    ids = torch.tensor([tokenizer.encode("Natalia sold clips to 48 of her friends.")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        theirs = hf(ids, attention_mask=mask).logits
        reloaded, tok = load_model(folder, dtype=torch.float32)
        again = reloaded(ids, attention_mask=mask)
    assert hf.config.tie_word_embeddings == tied
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours, again) and len(tok) == len(tokenizer)


# ---------------------------------------------------------------- whole runs: the command line, kill, resume


def _cli(out_dir, *extra, kill_after=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RLSCRATCH_TRAIN_KILL_AFTER_STEP", None)
    if kill_after is not None:
        env["RLSCRATCH_TRAIN_KILL_AFTER_STEP"] = str(kill_after)
    argv = [sys.executable, "-m", "rlscratch.train", "--model", "tiny-random", "--task", "toy", "--preset", "grpo",
            "--steps", "8", "--save-every", "4", "--output-dir", str(out_dir), "--seed", "4", "--lr", "0.005",
            "--dtype", "float32",
            "--eval-problems", "4", "--wandb-mode", "disabled", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


# what a run folder held before the distributed settings existed (rlscratch before torchrun support): the
# checkpoint's keys, and config.json without the settings added since (their defaults apply on resume)
CHECKPOINT_KEYS_V1 = {"step", "optimizer_step", "cursor", "epochs_done", "last_eval", "model", "optimizer",
                      "scheduler", "rng", "config"}
SETTINGS_ADDED_SINCE_V1 = ("fsdp",)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The same toy command run straight through, and run with a SIGKILL after step 6 and then rerun. Before
    the rerun, the killed run's config.json is rewritten as an older rlscratch wrote it, without the
    settings added since: the rerun must still accept and resume it."""
    root = tmp_path_factory.mktemp("toy-runs")
    straight = _cli(root / "straight")
    killed = _cli(root / "killed", kill_after=6)
    state_after_kill = T.read_run(root / "killed")
    config_path = root / "killed" / "config.json"
    old_config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in SETTINGS_ADDED_SINCE_V1}
    config_path.write_text(json.dumps(old_config, indent=1))
    resumed = _cli(root / "killed")
    yield root, straight, killed, state_after_kill, resumed
    shutil.rmtree(root, ignore_errors=True)  # checkpoints with optimizer state: about 1 GB


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def test_toy_cli_run_earns_rewards_and_changes_weights(toy_runs):
    root, straight, *_ = toy_runs
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = T.read_run(root / "straight")
    metrics = run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    required = {"step", "reward_mean", "reward_std", "zero_signal_fraction", "response_length", "truncation_rate",
                "kl", "entropy", "clip_fraction", "loss", "grad_norm", "lr", "machine", *TIMING}
    assert required <= set(metrics[0])
    assert "cores" in metrics[0]["machine"]  # every step's times name their CPU
    if sys.platform == "linux":  # memory after each step and the high-water mark, in GB (/proc, getrusage)
        assert all(0.05 < m["rss_GB"] <= m["peak_rss_GB"] < 64 for m in metrics)
        assert [m["peak_rss_GB"] for m in metrics] == sorted(m["peak_rss_GB"] for m in metrics)
    assert max(m["reward_mean"] for m in metrics) > 0 and metrics[0]["kl"] == pytest.approx(0, abs=1e-6)
    # learnable within a few steps (with this seed and rate the rise spans the kill point of the next test)
    assert metrics[-1]["reward_mean"] > metrics[0]["reward_mean"] + 0.2
    assert run["evals"][-1]["accuracy"] > run["evals"][0]["accuracy"]
    pre = run["prepass"]
    assert sum(pre["histogram"]) == pre["questions"] == 64 and 0 < len(pre["kept"]) < 64
    assert [e["label"] for e in run["evals"]][0] == "start" and run["evals"][-1]["step"] == 8
    # the exported weights moved away from the starting model's
    start, _ = load_model("tiny-random", dtype=torch.float32)
    from rlscratch.model import hf_state_dict

    final = _final_weights(root / "straight")
    initial = hf_state_dict(start)
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > 1e-3


def test_killed_run_resumes_to_the_same_weights_and_metrics(toy_runs):
    root, straight, killed, after_kill, resumed = toy_runs
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert after_kill["checkpoints"] == ["step-000004"] and len(after_kill["metrics"]) == 6  # steps 5-6 were lost
    assert not after_kill["final"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "from step 4" in resumed.stdout
    a, b = _final_weights(root / "straight"), _final_weights(root / "killed")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING and k != "seconds"} for r in rows]
    run_a, run_b = T.read_run(root / "straight"), T.read_run(root / "killed")
    assert strip(run_a["metrics"]) == strip(run_b["metrics"])
    assert strip(run_a["evals"]) == strip(run_b["evals"])


def test_run_folders_of_older_versions_resume(toy_runs):
    """The killed run's folder had an old-style config.json (fixture) and a checkpoint of the old format;
    the rerun resumed it (previous test) and recorded the new settings' defaults."""
    root, *_ = toy_runs
    state = T.load_checkpoint(T.list_checkpoints(root / "killed")[-1])
    assert set(state) == CHECKPOINT_KEYS_V1  # the format did not change
    assert {k: json.loads((root / "killed" / "config.json").read_text())[k] for k in SETTINGS_ADDED_SINCE_V1} == {
        k: getattr(T.TrainConfig(), k) for k in SETTINGS_ADDED_SINCE_V1}
    # a setting missing from an older config.json compares as its default (here one that is not resumable)
    cfg = T.config_from_args(T.build_parser().parse_args(["--task", "toy", "--output-dir", str(root / "x")]))
    folder = root / "old-folder"
    folder.mkdir()
    saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "track_kl"}
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "metrics.jsonl").write_text("")
    T._check_run_folder(folder, cfg)  # track_kl=False is the default: accepted
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(T.ConfigError, match="track_kl: False -> True"):
        T._check_run_folder(folder, dataclasses.replace(cfg, track_kl=True))


def test_updates_per_batch_reuse_rollouts_with_old_logprobs(tmp_path):
    cfg = toy_config(tmp_path, steps=2, updates_per_batch=2, prepass_samples=0, eval_problems=0, save_every=5,
                     beta=0.0)
    T.train(cfg, log=lambda s: None)
    rows = T.read_run(cfg.output_dir)["metrics"]
    assert [(r["step"], r["update"], r["optimizer_step"]) for r in rows] == [(1, 0, 1), (1, 1, 2), (2, 0, 3), (2, 1, 4)]
    assert rows[0]["clip_fraction"] == 0.0  # the first update is on-policy: every ratio is 1
    assert rows[1]["loss"] != rows[0]["loss"]  # the second sees ratios != 1
    assert [r["lr"] for r in rows] == pytest.approx(
        [cfg.lr * T.lr_factor(s, warmup_steps=0, total_steps=4, min_lr_ratio=cfg.min_lr_ratio) for s in range(4)])
    shutil.rmtree(cfg.output_dir)


def test_command_line_restarts_under_tcmalloc_when_installed(tmp_path):
    from rlscratch.train import TCMALLOC, allocator_environment

    empty, lib_dir = tmp_path / "empty", tmp_path / "lib"
    empty.mkdir()
    lib_dir.mkdir()
    (lib_dir / TCMALLOC).write_bytes(b"")
    assert allocator_environment({"PATH": "/bin"}, search=(empty,)) is None  # not installed: go on as it is
    env = allocator_environment({"PATH": "/bin", "LD_PRELOAD": "other.so"}, search=(empty, lib_dir))
    assert env == {"PATH": "/bin", "LD_PRELOAD": f"{lib_dir / TCMALLOC}:other.so"}
    assert allocator_environment(env, search=(lib_dir,)) is None  # already loaded: no restart loop
    assert allocator_environment({"RLSCRATCH_MALLOC": "system"}, search=(lib_dir,)) is None  # the user's choice
