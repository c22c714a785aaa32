# ---
# jupyter:
#   jupytext:
#     formats: ipynb,scripts//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python (rlscratch)
#     language: python
#     name: rlscratch
# ---

# %% [markdown]
# # Chapter 6 — GRPO training: the loop, its records, and the reasoning model
#
# Chapter 5 built every part of the GRPO loss as a function on tensors. This chapter turns those
# parts into a training run that can last hours on a CPU: it samples answers from the model being
# trained, grades them with the chapter 2 verifier, updates the weights, and keeps enough records
# that the run can be stopped at any moment and continued exactly, watched while it runs, and
# evaluated the same way as every other method in the book.
#
# One **GRPO step** does five things:
#
# ```
#  P questions ──► generate G answers each ──► verifier: reward 0/1 ──► advantages within each group
#   (data order)    (the live policy, one         (chapter 2's rule)       (chapter 5)
#                    shared prefill per question)                               │
#                                                                              ▼
#   AdamW step ◄── gradient of the chapter 5 loss ◄── log-probs of the answers under the policy,
#   (warmup, cosine,   (micro-batches, one             the frozen reference (KL) and, when the batch is
#    clipped norm)      normaliser)                    reused, the policy before the update
# ```
#
# Everything else in this chapter is about making that step **cheap** (skip what carries no signal,
# pick questions that carry some), **faithful** (one loss whether the batch fits in memory or not),
# **observable** (metrics every step), and **durable** (checkpoints that resume bit for bit, a
# model folder any Hugging Face tool can load). The code is exported into `rlscratch.train`, and
# `python -m rlscratch.train` runs the same loop from a terminal: long runs belong there, and this
# notebook reads what they recorded.
#
# The sections:
#
# 1. the run's configuration and the three presets (GRPO, Dr. GRPO, DAPO);
# 2. the learning-rate schedule;
# 3. tasks: GSM8K, and a toy task on which a random model can learn in seconds;
# 4. the pre-pass that picks questions the model sometimes solves;
# 5. one step's rollouts; 6. the update, with gradient accumulation;
# 7. checkpoints; 8. the exported model folder; 9. metrics, evaluation and the loop; 10. the command line;
# 11. a complete toy run, interrupted and resumed; 12. the real run, read from its records;
# 13. scaling out: the same loop on several processes (GPUs, machines) with `torchrun`.

# %% [markdown]
# ## 0. Parameters
#
# Nothing in this notebook trains the real model: the real run is a terminal command (section 12)
# that takes hours, and this notebook reads its records. What runs here is a toy run of a tiny
# random-weight model, well under a minute, in both modes. `RUN_DIR` is where the notebook looks for
# the real run's records (set `RLSCRATCH_GRPO_RUN` to read another folder); runs live outside the
# work tree, in the cache folder, never in git.

# %%
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from rlscratch.model import cache_dir

SMOKE = os.environ.get("RLSCRATCH_SMOKE") == "1"  # the test suite's mode: the same toy run, tiny data
TOY_STEPS = 12 if SMOKE else 20  # optimizer steps of the toy run in section 11
SCALE_STEPS = 4  # steps of the 1- versus 2-process comparison in section 13
RUN_DIR = Path(os.environ.get("RLSCRATCH_GRPO_RUN", cache_dir() / "runs" / "grpo-gsm8k"))  # the real run's folder
WORK = Path(tempfile.mkdtemp(prefix="rlscratch-ch06-"))  # this notebook's own scratch runs
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
chapter_start = time.perf_counter()


def shown(text: object) -> str:
    """`text` as this notebook prints it: this machine's folders by name (WORK, ~) and the repository's
    relative to its root, not as absolute paths."""
    from rlscratch.results import REPO_ROOT

    text = str(text).replace(str(WORK), "WORK").replace(str(REPO_ROOT) + os.sep, "")
    if os.environ.get("RLSCRATCH_CACHE"):
        text = text.replace(str(cache_dir()), "$RLSCRATCH_CACHE")
    return text.replace(str(Path.home()), "~")


print(f"smoke={SMOKE} threads={torch.get_num_threads()} torch={torch.__version__}\nreal run folder: {shown(RUN_DIR)}")

# %% [markdown]
# ## 1. One configuration, three presets
#
# A run is defined by a few dozen numbers: which model and questions, how many answers per
# question, how long they may be, the loss's settings, the optimizer's. They all live in one
# dataclass, `TrainConfig`, which is saved as `config.json` in the run folder. Rerunning a command
# in a folder that holds a run with *other* settings is refused, because resuming it would mix two
# experiments.
#
# The loss settings come in named **presets**, the three published recipes that chapter 5 compared:
#
# | preset | advantages | aggregation | KL | clipping | zero-signal groups | truncated answers |
# |---|---|---|---|---|---|---|
# | `grpo` (Shao et al. 2024) | $(r - \bar r)/\sigma_{\text{group}}$ | sequence mean | $\beta = 0.04$, k3 | 0.2 / 0.2 | kept | rewarded like any answer |
# | `dr_grpo` (Liu et al. 2025) | $r - \bar r$ | constant normaliser | none | 0.2 / 0.2 | kept | rewarded like any answer |
# | `dapo` (Yu et al. 2025) | $(r - \bar r)/\sigma_{\text{group}}$ | token mean | none | 0.2 / **0.28** | dropped, batch refilled | masked out of the loss |
#
# A truncated answer's *reward* is always the evaluation's verdict (chapter 2's `score_response`:
# a response cut off by the token limit counts only if it had already stated its answer); DAPO's
# "overlong filtering" additionally removes such answers from the loss, so that the model is not
# punished for reasoning that was merely cut short.
#
# Presets set only loss settings; each task (section 3) brings its own defaults for sizes and the
# learning rate, and anything given explicitly wins over both. `validate` turns every setting that
# cannot work into one sentence that says what to change.

# %%
#| export: train
"""The GRPO training loop (chapter 6): rollouts from the live policy, rewards from the verifier, the
chapter 5 loss, evaluation through the chapter 2 harness, checkpoints that resume exactly, Hugging Face
export, and a command line (`python -m rlscratch.train --help`). Under `torchrun` the same loop runs
data-parallel over several processes (DDP, or FSDP2 with --fsdp); see `init_distributed`.

Testing hook: with RLSCRATCH_TRAIN_KILL_AFTER_STEP=k in the environment the process kills itself with
SIGKILL right after step k is complete, so that tests can show that rerunning the command resumes exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rlscratch.data import DataError, Problem, load_gsm8k
from rlscratch.evaluate import EvalSettings, evaluate, summarize
from rlscratch.generate import Completion, derive_seed, generate, pack_for_cpu, release_packed_weights
from rlscratch.grpo import (ADVANTAGE_SCALES, AGGREGATIONS, KL_ESTIMATORS, group_advantages, grpo_loss,
                            head_logprobs, loss_normalizer)
from rlscratch.model import (OFFLINE_MODEL, Qwen2Model, cache_dir, describe_hardware, hf_reference, hf_state_dict,
                             load_model, resolve_dtype)
from rlscratch.prompts import TEMPLATES, format_prompt, stop_strings
from rlscratch.verify import score_response


class ConfigError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a GRPO run. Saved as config.json in the run folder."""

    # what to train, on what
    model: str = OFFLINE_MODEL
    task: str = "gsm8k"  # "gsm8k" or "toy"
    preset: str = "grpo"  # the preset the loss settings came from (recorded, see PRESETS)
    template: str = "step_by_step"  # prompt template (rlscratch.prompts) for GSM8K questions
    train_problems: int | None = None  # candidate training questions: the first N (None: all)
    eval_problems: int = 200  # held-out test questions evaluated after each epoch (0: none)
    eval_max_new_tokens: int = 512
    eval_at_start: bool = True  # also evaluate the starting model (step 0)
    # the pre-pass: keep the questions the starting model sometimes solves
    prepass_samples: int = 4  # answers sampled per candidate question (0: no pre-pass, train on all)
    prepass_max_new_tokens: int | None = None  # None: max_new_tokens
    # rollouts
    prompts_per_step: int = 4  # P questions per step
    group_size: int = 8  # G answers per question
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 64  # sequences decoded together
    # the loss (set by the presets)
    advantage_scale: str = "group"  # "group" (GRPO), "batch" or "none" (Dr. GRPO)
    aggregation: str = "sequence"  # "sequence", "token" (DAPO) or "constant" (Dr. GRPO)
    beta: float = 0.04  # weight of the KL penalty to the starting model
    kl: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    mask_truncated: bool = False  # DAPO: answers cut off by max_new_tokens do not enter the loss
    drop_zero_signal: bool = False  # DAPO: groups of equal rewards leave the batch ...
    max_refills: int = 0  # ... and up to this many extra rounds of P questions refill it
    skip_zero_signal: bool = True  # no forward/backward for answers with advantage 0 (exact when beta = 0)
    track_kl: bool = False  # score the reference even when beta = 0, to report the KL
    # optimisation
    lr: float = 1e-6
    warmup_steps: int = 5  # optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm
    updates_per_batch: int = 1  # optimizer steps per batch of rollouts (> 1: PPO-style reuse, needs old log-probs)
    micro_batch_size: int = 4  # sequences per forward/backward pass (gradient accumulation)
    gradient_checkpointing: bool = False
    entropy_stride: int = 4  # policy entropy measured at every k-th answer token
    dtype: str = "auto"  # compute: "auto" (bf16 where native), "bfloat16" or "float32"; weights stay float32
    device: str = "cpu"
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2)
    # run length and records
    steps: int | None = None  # rollout steps; None: `epochs` passes over the training questions
    epochs: int = 1
    save_every: int = 10  # checkpoint every k steps (and at each epoch's end and the last step)
    keep_checkpoints: int = 2
    export_dtype: str = "float32"  # dtype of the exported Hugging Face folders
    seed: int = 0
    output_dir: str = ""  # "" -> ~/.cache/rlscratch/runs/<preset>-<task>
    wandb_mode: str = "offline"  # "offline" (sync later with `wandb sync`), "online" or "disabled"
    wandb_project: str = "rlscratch"


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(advantage_scale="group", aggregation="sequence", beta=0.04, kl="k3", clip_low=0.2, clip_high=0.2,
                 mask_truncated=False, drop_zero_signal=False, max_refills=0),
    "dr_grpo": dict(advantage_scale="none", aggregation="constant", beta=0.0, kl="k3", clip_low=0.2, clip_high=0.2,
                    mask_truncated=False, drop_zero_signal=False, max_refills=0),
    "dapo": dict(advantage_scale="group", aggregation="token", beta=0.0, kl="k3", clip_low=0.2, clip_high=0.28,
                 mask_truncated=True, drop_zero_signal=True, max_refills=2),
}

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "gsm8k": dict(model=OFFLINE_MODEL, max_new_tokens=300, lr=1e-6, warmup_steps=5, prompts_per_step=4,
                  group_size=8, eval_problems=200, eval_max_new_tokens=512, save_every=10, micro_batch_size=4,
                  entropy_stride=4),
    "toy": dict(model="tiny-random", max_new_tokens=1, temperature=0.25, lr=5e-3, warmup_steps=0, prompts_per_step=4,
                group_size=8, train_problems=64, eval_problems=16, eval_max_new_tokens=4, steps=20, save_every=5,
                micro_batch_size=32, entropy_stride=1, generation_batch_size=32),
}

# fields a rerun may change without making it another run (DDP and FSDP compute the same update and write
# the same checkpoints, so a run may switch between them)
RESUMABLE_CHANGES = ("wandb_mode", "wandb_project", "fsdp")


def default_output_dir(preset: str, task: str) -> Path:
    """Where a run's folder goes unless --output-dir says otherwise: the cache, outside any work tree."""
    return cache_dir() / "runs" / f"{preset}-{task}"


def make_config(preset: str = "grpo", task: str = "gsm8k", **overrides: Any) -> TrainConfig:
    """A validated config: the dataclass defaults, then the task's defaults, then the preset's loss
    settings, then `overrides` (None values are ignored, so unset command-line flags change nothing)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if task not in TASK_DEFAULTS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASK_DEFAULTS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset", "task"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}")
    values = {**TASK_DEFAULTS[task], **PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = TrainConfig(preset=preset, task=task, **values)
    if not cfg.output_dir:
        cfg.output_dir = str(default_output_dir(preset, task))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError with one clear sentence for the first setting that cannot work."""
    checks = [
        (cfg.task in TASK_DEFAULTS, f"unknown task {cfg.task!r}; choose from {sorted(TASK_DEFAULTS)}"),
        (cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}"),
        (cfg.template in TEMPLATES, f"unknown template {cfg.template!r}; choose from {TEMPLATES}"),
        (cfg.group_size >= 2, f"group size {cfg.group_size}: GRPO compares answers within a group, and a group of "
                              "one has advantage 0 on every answer, so nothing would be learned; use --group-size >= 2"),
        (cfg.prompts_per_step >= 1, "--prompts-per-step must be >= 1"),
        (cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (cfg.temperature > 0, f"temperature {cfg.temperature}: rollouts must be sampled (temperature > 0); at 0 "
                              "every answer of a group is the same greedy answer and no group carries a signal"),
        (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"),
        (cfg.advantage_scale in ADVANTAGE_SCALES, f"--advantage-scale must be one of {ADVANTAGE_SCALES}"),
        (cfg.aggregation in AGGREGATIONS, f"--aggregation must be one of {AGGREGATIONS}"),
        (cfg.kl in KL_ESTIMATORS, f"--kl must be one of {KL_ESTIMATORS}"),
        (cfg.beta >= 0, "--beta must be >= 0"),
        (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0, "need 0 <= --clip-low < 1 and --clip-high >= 0"),
        (cfg.max_refills >= 0, "--max-refills must be >= 0"),
        (cfg.max_refills == 0 or cfg.drop_zero_signal, "--max-refills refills a batch whose zero-signal groups were "
                                                       "dropped: it needs --drop-zero-signal"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (0 <= cfg.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "Adam betas must be in [0, 1)"),
        (cfg.grad_clip > 0, "--grad-clip must be > 0"),
        (cfg.updates_per_batch >= 1, "--updates-per-batch must be >= 1"),
        (cfg.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
        (cfg.generation_batch_size >= 1, "--generation-batch-size must be >= 1"),
        (cfg.entropy_stride >= 1, "--entropy-stride must be >= 1"),
        (cfg.dtype in ("auto", "bfloat16", "float32"), "--dtype must be auto, bfloat16 or float32"),
        (cfg.export_dtype in ("bfloat16", "float32"), "--export-dtype must be bfloat16 or float32"),
        (cfg.steps is None or cfg.steps >= 1, "--steps must be >= 1"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.save_every >= 1, "--save-every must be >= 1"),
        (cfg.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
        (cfg.train_problems is None or cfg.train_problems >= 1, "--train-problems must be >= 1"),
        (cfg.eval_problems >= 0, "--eval-problems must be >= 0"),
        (cfg.eval_max_new_tokens >= 1, "--eval-max-new-tokens must be >= 1"),
        (cfg.prepass_samples == 0 or cfg.prepass_samples >= 2,
         f"--prepass-samples {cfg.prepass_samples}: the pre-pass keeps questions solved by some but not all of "
         "its samples, which needs >= 2 samples (or 0 to skip the pre-pass)"),
        (cfg.prepass_max_new_tokens is None or cfg.prepass_max_new_tokens >= 1, "--prepass-max-new-tokens must be >= 1"),
        (cfg.wandb_mode in ("offline", "online", "disabled"), "--wandb-mode must be offline, online or disabled"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA device is available here")


def loss_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments `grpo_loss` receives for this config (what a preset selects)."""
    return dict(beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl=cfg.kl,
                aggregation=cfg.aggregation, max_tokens=cfg.max_new_tokens)


# %% [markdown]
# The presets side by side, as `grpo_loss` will receive them, and what a config that cannot work
# says:

# %%
for name in PRESETS:
    c = make_config(name, "toy", output_dir=str(WORK / name))
    print(f"{name:8} advantages={c.advantage_scale:5} {loss_settings(c)} mask_truncated={c.mask_truncated} "
          f"drop_zero_signal={c.drop_zero_signal} refills={c.max_refills}")
try:
    make_config("grpo", "toy", group_size=1)
except ConfigError as err:
    print("ConfigError:", err)
assert make_config("dapo", "toy", clip_high=0.3).clip_high == 0.3  # explicit settings win over the preset

# %% [markdown]
# ## 2. The learning-rate schedule
#
# Two facts shape the schedule. At the start, Adam's second-moment estimates come from a handful
# of gradients and are unreliable, so its first steps can be far too large: a short **linear
# warmup** ramps the rate up. Later, the policy's own samples get better and the rewards less
# noisy, and smaller steps refine instead of overshooting: a **cosine decay** brings the rate down
# smoothly to a floor (`min_lr_ratio` of the peak) at the last step. The schedule is a pure
# function of the optimizer step, so it is trivially checkpointed and tested.

# %%
#| export: train
def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): (step + 1) / warmup_steps
    during the warmup, then a cosine from 1 at step `warmup_steps` down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_updates: int):
    """A LambdaLR applying `lr_factor` (step it once after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=cfg.warmup_steps, total_steps=total_updates, min_lr_ratio=cfg.min_lr_ratio))


# %%
import matplotlib.pyplot as plt

factors = [lr_factor(s, warmup_steps=10, total_steps=100, min_lr_ratio=0.1) for s in range(100)]
assert factors[0] == 0.1 and factors[9] == 1.0 and factors[10] == 1.0  # warmup reaches the peak
assert abs(factors[55] - 0.55) < 1e-12  # halfway through the decay: halfway between 1 and the floor
assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] > 0.1  # decays towards the floor
plt.figure(figsize=(5, 2.4))
plt.plot(factors)
plt.xlabel("optimizer step")
plt.ylabel("lr / peak lr")
plt.title("warmup 10 steps, cosine to 0.1 over 100")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The optimizer.** AdamW keeps two moving averages per weight. PyTorch's default implementation
# on the CPU loops over the weight tensors and updates each with a chain of operations (a square
# root of the second moment, a division, an addition, ...): each a pass over the tensor, some
# allocating a temporary of its size, up to 0.5 GB for this model's largest (the 151,936 × 896
# embedding and head; on a GPU the default does all tensors at once, and its temporaries are
# model-sized, 2.5 GB here). The *fused* kernel does the whole update in one pass over each tensor,
# with no temporaries. One catch: the fused kernel writes the weights without bumping their version
# counters, the numbers PyTorch keeps to notice in-place changes, and two things in this book watch
# those counters: the packed generation weights of chapter 1 (repacked when the weights change) and
# `weights_fingerprint`. A hook run after every step bumps them.

# %%
#| export: train
def make_optimizer(params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused into one pass per tensor where PyTorch has the kernel (CPU, CUDA); every step then
    marks the weights as changed in place, as the unfused implementation does."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    if fused:
        trained = [p for p in params if p.requires_grad]
        optimizer.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(trained))
    return optimizer


# %% [markdown]
# Check: three steps on the same gradients, fused and default, agree to rounding (in float64: in
# float32, rounding noise in gradients that are zero in exact arithmetic, such as the key biases',
# which a softmax ignores, is magnified by Adam into steps as large as real ones, so a float32
# comparison would measure the noise, not the optimizer); a bare fused step leaves the version
# counters as they were, and ours bumps them, so the fingerprint of the weights follows.

# %%
from rlscratch.model import weights_fingerprint  # noqa: E402

net, _ = load_model("tiny-random", dtype=torch.float64)
twin, bare = copy.deepcopy(net), copy.deepcopy(net)
optimizers = {"fused + hook": (net, make_optimizer(net.parameters(), lr=1e-3)),
              "default": (twin, torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.0)),  # CPU: a for-loop
              "bare fused": (bare, torch.optim.AdamW(bare.parameters(), lr=1e-3, weight_decay=0.0, fused=True))}
versions = {name: m.lm_head.weight._version for name, (m, _) in optimizers.items()}
fingerprint = weights_fingerprint(net)
batch = torch.randint(0, net.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
for _ in range(3):
    for m, opt in optimizers.values():
        m(batch).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
gap = max((a - b).abs().max().item() for a, b in zip(net.parameters(), twin.parameters()))
bumps = {name: m.lm_head.weight._version - versions[name] for name, (m, _) in optimizers.items()}
print(f"fused vs default AdamW after 3 steps (float64): max |difference| {gap:.1e}; "
      f"in-place changes seen on lm_head.weight: {bumps}")
assert gap < 1e-12 and bumps == {"fused + hook": 3, "default": 3, "bare fused": 0}
assert weights_fingerprint(net) != fingerprint

# %% [markdown]
# ## 3. Tasks: GSM8K, and a toy a random model can learn
#
# A task says where the questions come from, how a question becomes a prompt, and what an answer
# earns. For **GSM8K** the reward is the evaluation's own verdict: `score_response`, the one scoring
# rule of chapter 2, with the answer's truncation passed along, so that training optimises exactly
# what the evaluation measures. A truncated answer earns 1 only if it had already stated the right
# answer.
#
# The tests, the smoke mode and this notebook also need a run that takes seconds, on a model with
# random weights, and still shows learning. A random model never solves arithmetic, so its reward
# would always be 0: every group would have zero signal and nothing would move. The **toy task**
# therefore rewards something a random policy does often by chance and can learn to do always:
# *the reply starts with an ASCII letter*. About a fifth of the 152k tokens of Qwen's vocabulary
# start with one, so a random policy earns the reward on roughly one answer in five, most groups of
# 8 answers contain both outcomes, and the policy gradient can move probability towards tokens that
# start with letters.
#
# Two settings make it learnable in a few steps, and both are visible in the config:
#
# * **One-token answers.** The reward depends only on the first token. Longer answers would give
#   every later token the same advantage although it has nothing to do with the reward: pure noise
#   in the gradient.
# * **Sampling at temperature 0.25.** A random model's next-token distribution is practically
#   uniform over 152k tokens (the cell below prints its entropy next to the uniform maximum
#   $\ln 151936 \approx 11.93$ nats). A rewarded token then starts with probability about
#   $1/150{,}000$ and must gain some $\ln 150{,}000 \approx 12$ in logit before it is sampled
#   noticeably more often. Dividing the logits by 0.25 makes the same model four times sharper, more
#   like a trained model's distribution, and every logit change four times larger; training scores
#   the answers at the same temperature, so the loss is the policy gradient of the tempered policy.
#
# It is honest about what it shows: the loop's machinery (sampling, rewards, advantages, loss,
# optimizer, checkpoints) moves the policy towards rewarded behaviour. It says nothing about
# reasoning, and the prompt's words mean nothing to a random model. The toy's answers always fill
# their one-token budget, but the budget cannot cut an answer short (the answer is its first
# character), so no toy answer counts as truncated.

# %%
#| export: train
class Gsm8kTask:
    """GSM8K word problems; reward 1 when the final answer is right (chapter 2's scoring rule)."""

    name = "gsm8k"

    def __init__(self, template: str = "step_by_step"):
        self.template = template
        self.stop = stop_strings(template)

    def problems(self, cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
        """(candidate training questions, held-out evaluation questions)."""
        try:
            train = load_gsm8k("train", limit=cfg.train_problems)
            test = load_gsm8k("test", limit=cfg.eval_problems) if cfg.eval_problems else []
        except DataError as err:
            raise ConfigError(f"GSM8K is not available: {err}") from None
        return train, test

    def prompt(self, tokenizer, problem: Problem) -> str:
        return format_prompt(tokenizer, problem.question, self.template)

    def truncated(self, completion: Completion) -> bool:
        return completion.finish_reason == "length"

    def reward(self, problem: Problem, completion: Completion) -> float:
        return float(score_response(completion.text, problem.answer, truncated=self.truncated(completion)).correct)


TOY_TOPICS = ("a fruit", "a colour", "an animal", "a country", "a city", "a tool", "a planet", "a season",
              "a river", "a metal", "a sport", "a flower", "a bird", "a fish", "an instrument", "a vegetable")


class ToyTask:
    """Reward 1 when the reply's first character is an ASCII letter: a random policy earns it about one
    time in five (a fifth of Qwen's vocabulary starts with one) and can learn to earn it always."""

    name = "toy"
    stop = None

    def problems(self, cfg: TrainConfig) -> tuple[list[Problem], list[Problem]]:
        def make(split: str, i: int) -> Problem:
            topic = TOY_TOPICS[i % len(TOY_TOPICS)]
            return Problem(id=f"toy-{split}-{i}", question=f"Name {topic} in one word (#{i}).", answer="",
                           solution="", dataset="toy", level=1)

        train = [make("train", i) for i in range(cfg.train_problems or 64)]
        return train, [make("test", 1000 + i) for i in range(cfg.eval_problems)]

    def prompt(self, tokenizer, problem: Problem) -> str:
        return format_prompt(tokenizer, problem.question, "chat")

    def truncated(self, completion: Completion) -> bool:
        return False  # the answer is the first character: the length budget never cuts it off

    def reward(self, problem: Problem, completion: Completion) -> float:
        first = completion.text[:1]
        return float(first.isascii() and first.isalpha())


def make_task(cfg: TrainConfig) -> Gsm8kTask | ToyTask:
    """The task `cfg.task` names."""
    return Gsm8kTask(cfg.template) if cfg.task == "gsm8k" else ToyTask()


# %% [markdown]
# A check of both rewards on hand-made answers, then the random model's first-token entropy and the
# toy reward's base rate: sample 64 replies at the toy's temperature and count.

# %%
from rlscratch.model import load_model


def fake(text: str, finish: str = "stop") -> Completion:
    return Completion(0, 0, text, [0], [0.0], finish)


gsm, toy = Gsm8kTask(), ToyTask()
question = Problem("q", "What is 6 * 7?", "42", "", "gsm8k", 1)
assert gsm.reward(question, fake("6 * 7 = 42, so the answer is \\boxed{42}.")) == 1.0
assert gsm.reward(question, fake("The answer is \\boxed{41}.")) == 0.0
assert gsm.reward(question, fake("First, 6 * 7 = 42", "length")) == 0.0  # cut off before stating an answer
assert [toy.reward(None, fake(t)) for t in ("Apple", " apple", "7", "", "élan")] == [1.0, 0.0, 0.0, 0.0, 0.0]

tiny, tiny_tok = load_model("tiny-random", dtype=torch.float32)
toy_cfg = make_config("grpo", "toy", output_dir=str(WORK / "probe"))
toy_train, _ = ToyTask().problems(toy_cfg)
prompt = ToyTask().prompt(tiny_tok, toy_train[0])
with torch.no_grad():
    first_logits = tiny(torch.tensor([tiny_tok.encode(prompt)]))[0, -1]
for t in (1.0, toy_cfg.temperature):
    p = torch.softmax(first_logits / t, -1)
    print(f"first-token entropy at temperature {t}: {-(p * p.log()).sum():.2f} nats (uniform: {math.log(len(p)):.2f})")
replies = generate(tiny, tiny_tok, [prompt], max_new_tokens=1, temperature=toy_cfg.temperature, n=64, seed=0)
base_rate = sum(ToyTask().reward(None, c) for c in replies) / len(replies)
print(f"random model: {base_rate:.0%} of 64 replies start with a letter; e.g. {[c.text for c in replies[:6]]}")
assert 0.05 < base_rate < 0.5

# %% [markdown]
# ## 4. The pre-pass: train on questions the model sometimes solves
#
# A group whose answers all earn the same reward has advantage 0 on every answer (chapter 5,
# section 2.3): it costs a full generation and, done naively, a forward and backward pass, and
# contributes nothing to the policy gradient. How often that happens depends on each question's
# pass rate $p$: with $G$ independent answers, a group is all-wrong with probability $(1-p)^G$ and
# all-right with probability $p^G$, so it carries a signal with probability $1 - p^G - (1-p)^G$.
# Chapter 3's records put numbers on it (chapter 5, section 2.3): over 40 test questions × 20
# samples at T = 0.3 the model was right 22% of the time, 16 questions were never solved, and only
# 43-45% of groups of 8 would have carried any signal.
#
# So before training, a cheap **pre-pass** samples a few answers (`prepass_samples`, default 4)
# for each candidate question with the starting model, and keeps the questions solved by some but
# not all of them. A question solved 0 times out of 4 may still be solvable, and one solved 4 times
# may still be missed, so the filter is not perfect, but it removes most of the dead weight at a
# fraction of a training step's cost. The pre-pass records every question's rewards
# (`prepass.jsonl`, resumable) and a summary (`prepass.json`): the histogram of pass counts and the
# expected share of signal-carrying groups before and after filtering.

# %%
#| export: train
def signal_fraction(pass_rates: list[float], group_size: int) -> float:
    """Expected share of groups of `group_size` answers whose rewards are not all equal, if each question's
    answers succeed independently with its pass rate (0/1 rewards): mean of 1 - p^G - (1 - p)^G."""
    if not pass_rates:
        return 0.0
    return sum(1 - p**group_size - (1 - p)**group_size for p in pass_rates) / len(pass_rates)


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a line cut short by a kill is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _encode(tokenizer, task, problems: list[Problem]) -> list[list[int]]:
    return [tokenizer.encode(task.prompt(tokenizer, p), add_special_tokens=False) for p in problems]


def prepass(model, tokenizer, task, problems: list[Problem], cfg: TrainConfig, run_dir: Path,
            autocast=contextlib.nullcontext, log=print) -> dict:
    """Sample `cfg.prepass_samples` answers per question with the current (starting) model and keep the
    questions solved by some but not all of them. Resumable; the summary is saved as prepass.json."""
    summary_path, records_path = run_dir / "prepass.json", run_dir / "prepass.jsonl"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    k = cfg.prepass_samples
    done = {r["id"]: r for r in _read_jsonl(records_path)}
    todo = [p for p in problems if p.id not in done]
    if todo and records_path.exists() and not records_path.read_text().endswith("\n"):
        with open(records_path, "a", encoding="utf-8") as f:
            f.write("\n")  # end a line cut short by a kill: the next record starts a line of its own
    started = last = time.perf_counter()

    def save(i: int, answers: list[Completion]) -> None:  # question i's k answers are done: record them at once
        nonlocal last
        problem, now = todo[i], time.perf_counter()
        done[problem.id] = {"id": problem.id, "rewards": [task.reward(problem, c) for c in answers],
                            "tokens": [len(c.token_ids) for c in answers],
                            "truncated": [task.truncated(c) for c in answers],
                            "seconds": now - last}  # wall-clock since the previous record: they add up to the time
        last = now
        with open(records_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(done[problem.id]) + "\n")
        if len(done) % max(1, len(problems) // 10) == 0:  # about ten progress lines
            log(f"pre-pass: {len(done)}/{len(problems)} questions, {now - started:.0f} s")

    if todo:  # one call: a finished question's rows go to the next question at once (chapter 1)
        with autocast():
            generate(model, tokenizer, _encode(tokenizer, task, todo),
                     max_new_tokens=cfg.prepass_max_new_tokens or cfg.max_new_tokens, temperature=cfg.temperature,
                     top_p=cfg.top_p, n=k, stop=task.stop, seed=[derive_seed(cfg.seed, "prepass", p.id) for p in todo],
                     batch_size=cfg.generation_batch_size, on_prompt_done=save)
    rates = {p.id: sum(done[p.id]["rewards"]) / k for p in problems}
    kept = [p.id for p in problems if 0 < rates[p.id] < 1]
    histogram = [0] * (k + 1)
    for p in problems:
        histogram[round(rates[p.id] * k)] += 1
    tokens = [t for p in problems for t in done[p.id]["tokens"]]
    summary = {"samples": k, "questions": len(problems), "histogram": histogram, "kept": kept,
               "signal_fraction_all": signal_fraction(list(rates.values()), cfg.group_size),
               "signal_fraction_kept": signal_fraction([rates[i] for i in kept], cfg.group_size),
               "mean_tokens": sum(tokens) / max(1, len(tokens)),
               "seconds": sum(done[p.id].get("seconds", 0.0) for p in problems)}  # over every session of it
    _write_json(summary_path, summary)
    return summary


# %% [markdown]
# What the filter buys, as a function of the pass rate, for groups of 8: a question the model
# solves 22% of the time gives a useful group 86% of the time, one it solves 2% of the time only
# 15%. (The toy task's pre-pass runs in section 11; the real one's histogram is in section 12.)

# %%
for p in (0.0, 0.02, 0.1, 0.22, 0.5, 0.9, 1.0):
    print(f"pass rate {p:4.2f}: {signal_fraction([p], 8):5.1%} of groups of 8 carry a signal")
assert signal_fraction([0.0, 1.0], 8) == 0.0 and abs(signal_fraction([0.5], 2) - 0.5) < 1e-12

# %% [markdown]
# ## 5. One step's rollouts
#
# The questions come from a **data order**: each epoch is a fresh permutation of the training
# questions, seeded by (run seed, epoch), and the run's position in it is one integer, the number of
# questions consumed so far. That integer is all a checkpoint needs to continue the order exactly.
#
# Each question's $G$ answers are sampled in one `generate` call with `n=G`, so the question's
# prompt is prefilled once and its cache shared (chapter 1). The sampling seed of each question is
# derived from (run seed, step, position, question id), never from a global random state: the same
# step draws the same answers whatever the batch size, the other questions in the batch, or
# whether the run was restarted in between.
#
# Rewards make groups; groups whose rewards are all equal are flagged. Under DAPO's dynamic
# sampling (`drop_zero_signal`) they leave the batch and up to `max_refills` more rounds of $P$
# questions are sampled until $P$ groups with signal are found.
#
# **Several processes.** A run may also be spread over several processes, one per GPU (section 13
# starts them with `torchrun`). Each process is told its *rank* $r$ among $N$; `Dist` keeps the two
# numbers and the few collective operations the loop needs. The $P$ questions of a round are split
# into $N$ contiguous shares; process $r$ samples the $G$ answers of its share's questions (a group
# never straddles two processes, so its advantages need no communication), and then every process
# receives every group, in question order. From there each process holds exactly the batch a single
# process would have sampled, since every seed derives from the question's position and not from
# who sampled it, and the batch's statistics, advantages and normaliser are computed identically
# everywhere. With one process, `Dist()` is rank 0 of 1 and every collective returns its input.

# %%
#| export: train
@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a run: rank `rank` of `world` processes (under torchrun), else rank 0 of 1.
    The methods other than `share` are collectives: every process calls them, in the same order."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder: logs, metrics, evaluations, checkpoints, exports."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's contiguous share of `items` (shares differ in size by at most one)."""
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in rank order (the inverse of `share`)."""
        if self.world == 1:
            return list(items)
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every process."""
        return value if self.world == 1 else self.gather([value])[0]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes (in rank order, so every process gets the same floats)."""
        if self.world == 1:
            return values
        parts = self.gather([values])
        return {k: sum(part[k] for part in parts) for k in values}

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class DataOrder:
    """The training questions in a fresh seeded permutation per epoch; `at(position)` is the question at
    that position of the endless sequence epoch 0, epoch 1, ..."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ConfigError("no training questions")
        self.problems, self.seed, self._orders = problems, seed, {}

    def __len__(self) -> int:
        return len(self.problems)

    def at(self, position: int) -> Problem:
        epoch, index = divmod(position, len(self.problems))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._orders[epoch] = torch.randperm(len(self.problems), generator=generator).tolist()
        return self.problems[self._orders[epoch][index]]


@dataclasses.dataclass
class Group:
    """One question's G answers and their rewards."""

    problem: Problem
    position: int  # in the data order
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    rank: int = 0  # the process that sampled the group, and trains on it

    @property
    def has_signal(self) -> bool:
        return len(set(self.rewards)) > 1


def sample_groups(model, tokenizer, task, order: DataOrder, positions: list[int], cfg: TrainConfig, step: int,
                  autocast=contextlib.nullcontext, rank: int = 0) -> list[Group]:
    """G answers from the live policy for the question at each data-order position, with their rewards."""
    if not positions:
        return []
    problems = [order.at(i) for i in positions]
    prompt_ids = _encode(tokenizer, task, problems)
    with autocast():
        completions = generate(model, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.group_size, stop=task.stop,
                               seed=[derive_seed(cfg.seed, "rollout", step, i, p.id) for i, p in zip(positions, problems)],
                               batch_size=cfg.generation_batch_size)
    G = cfg.group_size
    return [Group(p, i, ids, completions[k * G:(k + 1) * G], [task.reward(p, c) for c in completions[k * G:(k + 1) * G]],
                  rank) for k, (p, i, ids) in enumerate(zip(problems, positions, prompt_ids))]


def collect_groups(model, tokenizer, task, order: DataOrder, cursor: int, cfg: TrainConfig, step: int,
                   autocast=contextlib.nullcontext, dist: Dist = Dist()) -> tuple[list[Group], list[Group], int]:
    """(groups to train on, every group sampled, new cursor) for one step: P questions, and with
    `drop_zero_signal` up to `max_refills` more rounds until P groups carry a signal. With several
    processes each samples its share of a round's questions, and all return every group."""
    P = cfg.prompts_per_step
    kept: list[Group] = []
    sampled: list[Group] = []
    for round_ in range(1 + cfg.max_refills):
        mine = dist.share(list(range(cursor, cursor + P)))
        groups = dist.gather(sample_groups(model, tokenizer, task, order, mine, cfg, step, autocast, dist.rank))
        cursor += P
        sampled += groups
        kept += [g for g in groups if g.has_signal] if cfg.drop_zero_signal else groups
        if not cfg.drop_zero_signal or len(kept) >= P:
            break
    return kept[:P], sampled, cursor


# %% [markdown]
# One step of the toy task on the random model: four questions, eight answers each.

# %%
order = DataOrder(toy_train, seed=0)
assert [order.at(i).id for i in range(64)] != [p.id for p in toy_train]  # shuffled ...
assert sorted(order.at(i).id for i in range(64)) == sorted(p.id for p in toy_train)  # ... a permutation
kept, sampled, cursor = collect_groups(tiny, tiny_tok, ToyTask(), order, 0, toy_cfg, step=1)
for g in kept:
    print(f"{g.problem.question!r:40} rewards {g.rewards}  signal={g.has_signal}")
again, _, _ = collect_groups(tiny, tiny_tok, ToyTask(), order, 0, dataclasses.replace(toy_cfg, generation_batch_size=8),
                             step=1)
assert [c.token_ids for g in again for c in g.completions] == [c.token_ids for g in kept for c in g.completions]
print("same answers with another generation batch size:", True)

# %% [markdown]
# ## 6. The update: skipping, old and reference log-probs, micro-batches
#
# Each answer becomes a training sequence (prompt + answer tokens) carrying its group's advantage.
# Three things decide what each costs:
#
# * **Zero advantage, zero gradient.** An answer with advantage 0 has a per-token objective of
#   exactly 0 whatever its log-probs (chapter 5, section 3), so with $\beta = 0$ its forward and
#   backward passes can be skipped *without changing the update at all*, provided the loss keeps
#   the whole batch's normaliser (the answer still counts in the denominator). With $\beta > 0$ the
#   answer would still have contributed its KL penalty: skipping it then drops that part of the
#   KL's pull (`--no-skip-zero-signal` keeps it). Every step reports how many sequences and tokens
#   were skipped.
# * **Reference and old log-probs.** The KL penalty needs the frozen starting model's log-probs of
#   the same tokens (computed without gradients, only when $\beta > 0$ or `track_kl`). The clipped
#   ratio needs the log-probs under the policy that *sampled* the answers: with one optimizer step per
#   batch that policy is the current one, the ratio is exactly 1 and `logp.detach()` serves; with
#   `updates_per_batch > 1` the second update no longer is, so the old log-probs are scored once,
#   before the first update.
# * **Each prompt once.** The 8 answers of a group continue the same prompt, and a GSM8K prompt (chat
#   template, system prompt, question) is about 100 tokens against answers of about 230. Scoring each
#   answer as its own prompt + answer row sends the prompt through the model 8 times and pads every
#   row to the longest in its micro-batch. Instead, `pack_answers` writes the prompt once and the
#   answers after it, in one row, and tells the attention who may see whom: each answer token sees
#   the prompt and the earlier tokens of its own answer, never another answer, and keeps the position
#   it had when it was sampled (the prompt's length plus its index in the answer). The log-probs are
#   then exactly those of the separate rows (checked below), for fewer tokens: at micro-batches of
#   4 answers, roughly 100 + 4 x 230 instead of 4 x (100 + the longest answer).
# * **Gradient accumulation.** A batch of 32 answers of 300 tokens through a 0.5B model, with
#   gradients, needs more memory than a laptop has to spare. It is split into micro-batches whose gradients add up before one optimizer
#   step. Each micro-batch's loss is divided by the **whole batch's** normaliser (chapter 5, section
#   5.2), so the sum of the micro-batch losses *is* the batch loss, and $k$ micro-batches give the
#   same update as one large batch, up to float rounding. The same argument carries the batch
#   across processes (section 13): each process accumulates the gradient of its share, every share
#   divided by the whole batch's normaliser, and the shares' gradients are summed.
#
# Weights stay in float32 (the "master" copy the optimizer updates: a bf16 weight cannot absorb an
# update smaller than its rounding step, about 0.4% of its size, and most updates are smaller);
# forward passes run under `torch.autocast` in bfloat16 where the hardware computes it natively.
#
# The entropy of the policy (how spread its next-token distribution is; a collapse to near 0 is a
# classic failure of RL fine-tuning) is computed from the logits of every `entropy_stride`-th
# answer token, from the final hidden states the forward pass computes anyway.

# %%
#| export: train
@dataclasses.dataclass
class Rollout:
    """One answer as a training sequence."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]  # recorded while sampling (temperature 1)
    advantage: float
    in_loss: bool  # False: masked out of the loss (a truncated answer under mask_truncated)


def make_rollouts(groups: list[Group], task, cfg: TrainConfig) -> list[Rollout]:
    """Answers of `groups` as sequences with their group-relative advantages."""
    if not groups:
        return []
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    advantages = group_advantages(rewards, cfg.group_size, scale=cfg.advantage_scale).tolist()
    answers = [(g, c) for g in groups for c in g.completions]
    return [Rollout(g.prompt_ids, c.token_ids, c.logprobs, a, not (cfg.mask_truncated and task.truncated(c)))
            for (g, c), a in zip(answers, advantages)]


def batch_normalizer(rollouts: list[Rollout], cfg: TrainConfig) -> float:
    """The whole batch's loss denominator (`rlscratch.grpo.loss_normalizer`), shared by every micro-batch."""
    lengths = [len(r.completion_ids) if r.in_loss else 0 for r in rollouts]
    mask = torch.arange(max(lengths, default=0) or 1)[None, :] < torch.tensor(lengths or [0])[:, None]
    return loss_normalizer(mask, cfg.aggregation, max_tokens=cfg.max_new_tokens)


@dataclasses.dataclass
class MicroBatch:
    """Answers packed for one forward pass. Each row holds a prompt once, then the answers that continue
    it, one after another, then padding: `visible` lets each answer token see the prompt and its own
    answer's earlier tokens, and `positions` are those the token had when it was sampled. Log-probs
    come out per answer, (A, C): answer a's tokens in row a, left-aligned, `completion_mask` 1 on them."""
    input_ids: torch.Tensor  # (R, L)
    positions: torch.Tensor  # (R, L)
    visible: torch.Tensor  # (R, L, L) bool: query t may attend to key s
    predictors: torch.Tensor  # (N,) index into the flattened (R * L) states: the state before each answer token
    targets: torch.Tensor  # (N,) the answer tokens, answer after answer
    completion_mask: torch.Tensor  # (A, C)
    sampler_logprobs: torch.Tensor  # (A, C)
    advantages: torch.Tensor  # (A,)
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None


def trained_rollouts(rollouts: list[Rollout], cfg: TrainConfig) -> list[Rollout]:
    """The rollouts that go through the model: in the loss, and (with skip_zero_signal) a non-zero advantage."""
    return [r for r in rollouts if r.in_loss and (r.advantage != 0 or not cfg.skip_zero_signal)]


def pack_answers(rollouts: list[Rollout], pad_id: int, device: str | torch.device = "cpu") -> MicroBatch:
    """`rollouts` as one `MicroBatch`: the answers to the same prompt share one row and one copy of it."""
    if not rollouts or any(not r.prompt_ids or not r.completion_ids for r in rollouts):
        raise ValueError("pack_answers needs rollouts, each with prompt and answer tokens")
    rows: dict[tuple[int, ...], list[int]] = {}  # prompt -> indices of its answers, in order of appearance
    for a, r in enumerate(rollouts):
        rows.setdefault(tuple(r.prompt_ids), []).append(a)
    width = max(len(p) + sum(len(rollouts[a].completion_ids) for a in answers) for p, answers in rows.items())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -2)  # -1: prompt, a: answer a, -2: padding
    predictors = [[] for _ in rollouts]
    for row, (prompt, answers) in enumerate(rows.items()):
        n = len(prompt)
        ids[row, :n], positions[row, :n], segment[row, :n] = torch.tensor(prompt), torch.arange(n), -1
        start = n
        for a in answers:
            answer = rollouts[a].completion_ids
            end = start + len(answer)
            ids[row, start:end], segment[row, start:end] = torch.tensor(answer), a
            positions[row, start:end] = torch.arange(n, n + len(answer))
            # answer token 0 is predicted by the prompt's last state, token t by the answer's own token t-1
            predictors[a] = [row * width + n - 1] + list(range(row * width + start, row * width + end - 1))
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)
    visible = causal & same & (segment[:, :, None] != -2) & (segment[:, None, :] != -2)
    lengths = [len(r.completion_ids) for r in rollouts]
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    sampler = torch.zeros(mask.shape).masked_scatter(mask, torch.tensor(
        [x for r in rollouts for x in r.sampler_logprobs], dtype=torch.float32))
    return MicroBatch(ids.to(device), positions.to(device), visible.to(device),
                      torch.tensor([i for p in predictors for i in p], device=device),
                      torch.tensor([t for r in rollouts for t in r.completion_ids], device=device),
                      mask.long().to(device), sampler.to(device),
                      torch.tensor([r.advantage for r in rollouts], dtype=torch.float32, device=device))


def micro_batches(rollouts: list[Rollout], cfg: TrainConfig, pad_id: int, device: str = "cpu") -> list[MicroBatch]:
    """`rollouts`, `cfg.micro_batch_size` answers at a time, packed (`pack_answers`)."""
    return [pack_answers(rollouts[start:start + cfg.micro_batch_size], pad_id, device)
            for start in range(0, len(rollouts), cfg.micro_batch_size)]


def answer_logprobs(model, mb: MicroBatch, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (A, C) of the micro-batch's answer tokens, 0 at padding; the final hidden states (N, hidden)
    that predicted them). One forward pass over the packed rows, then the head on those states only."""
    hidden = model(mb.input_ids, positions=mb.positions, visible=mb.visible, return_hidden=True)
    states = hidden.flatten(0, 1)[mb.predictors]
    values = head_logprobs(model.lm_head, states, mb.targets, temperature=temperature)
    logp = torch.zeros(mb.completion_mask.shape, dtype=values.dtype, device=values.device)
    return logp.masked_scatter(mb.completion_mask.bool(), values), states


@torch.no_grad()
def score(model, batches: list[MicroBatch], cfg: TrainConfig, autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Per-token log-probs (A, C) of each micro-batch's answers under `model`, without gradients."""
    with autocast():
        return [answer_logprobs(model, mb, temperature=cfg.temperature)[0] for mb in batches]


def _entropy(model, states: torch.Tensor, cfg: TrainConfig) -> tuple[float, int]:
    """Sum and count of the policy's next-token entropy at every `entropy_stride`-th answer token, from
    the final hidden states (N, hidden) that predicted the answer tokens."""
    states = states[::cfg.entropy_stride]
    total = 0.0
    for i in range(0, states.shape[0], 256):
        z = model.lm_head(states[i:i + 256]).float() / cfg.temperature
        total += float((torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).sum())
    return total, states.shape[0]


def _accumulating(model, sync: bool):
    """Gradient accumulation over processes: the backward passes of all micro-batches but the last add to
    this process's own gradients; the last one's also sums them over the processes (DDP all-reduces,
    FSDP reduce-scatters). A no-op for a model on one process."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _idle_batch(device: torch.device) -> MicroBatch:
    """A one-token stand-in for a process that has no micro-batch left while others still do: its loss
    is multiplied by 0, but its forward and backward passes keep the processes' collectives in step."""
    return pack_answers([Rollout([0], [0], [0.0], 0.0, True)], pad_id=0, device=device)


def update_step(model, batches: list[MicroBatch], normalizer: float, cfg: TrainConfig,
                optimizer: torch.optim.Optimizer, autocast=contextlib.nullcontext, dist: Dist = Dist()) -> dict[str, Any]:
    """One optimizer step on the sum of the micro-batches' losses (each divided by the batch's
    `normalizer`), with gradient clipping. Returns the step's statistics.

    With several processes `model` is the DDP- or FSDP-wrapped policy, `batches` this process's share
    and `normalizer` the whole batch's: the gradients are summed over the processes (not averaged),
    so the update, and the statistics returned, are those of one process holding the whole batch."""
    core = model.module if isinstance(model, DistributedDataParallel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # zeros, not None: AdamW then treats a step without trained sequences like any other
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    sums = dict(loss=0.0, tokens=0, clip=0.0, clip_low=0.0, clip_high=0.0, kl=0.0, entropy=0.0, entropy_n=0,
                gap=0.0, with_ref=int(bool(batches) and batches[0].ref_logp is not None))
    # every process runs as many micro-batches as the busiest one (idle ones run stand-ins)
    passes = len(batches) if dist.world == 1 else max(dist.gather([len(batches)]))
    for i in range(passes):
        idle = i >= len(batches)
        mb = _idle_batch(core.lm_head.weight.device) if idle else batches[i]
        with _accumulating(model, sync=i == passes - 1):
            with autocast():
                logp, states = answer_logprobs(model, mb, temperature=cfg.temperature)
                if not idle:
                    old = mb.old_logp if mb.old_logp is not None else logp.detach()
                    loss, stats = grpo_loss(logp, old, mb.advantages, mb.completion_mask, ref_logp=mb.ref_logp,
                                            normalizer=normalizer, **loss_settings(cfg))
            if idle:  # a stand-in: zero gradient, no statistics
                (logp.sum() * 0.0).backward()
                continue
            with torch.no_grad(), autocast():  # before the backward pass, while FSDP still holds the head whole
                entropy, count = _entropy(core, states.detach(), cfg)
            loss.backward()
        n = int(stats["tokens"])
        valid = mb.completion_mask.bool()
        sums["loss"] += float(loss.detach())
        sums["tokens"] += n
        sums["clip"] += float(stats["clip_fraction"]) * n
        sums["clip_low"] += float(stats["clip_low_fraction"]) * n
        sums["clip_high"] += float(stats["clip_high_fraction"]) * n
        sums["kl"] += float(stats["kl_mean"]) * n if "kl_mean" in stats else 0.0
        sums["entropy"] += entropy
        sums["entropy_n"] += count
        sums["gap"] += float((logp.detach() - mb.sampler_logprobs).abs()[valid].sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    sums = dist.sum(sums)
    n = sums["tokens"]
    return {"loss": sums["loss"], "grad_norm": float(grad_norm), "tokens_trained": n,
            "clip_fraction": sums["clip"] / n if n else None,
            "clip_low_fraction": sums["clip_low"] / n if n else None,
            "clip_high_fraction": sums["clip_high"] / n if n else None,
            "kl": sums["kl"] / n if n and sums["with_ref"] else None,
            "entropy": sums["entropy"] / sums["entropy_n"] if sums["entropy_n"] else None,
            "logprob_gap": sums["gap"] / n if n and cfg.temperature == 1.0 else None}


# %% [markdown]
# **Check: packing.** The toy step's answers, packed four to a micro-batch, against each answer scored
# alone in its own left-padded row (chapter 5's `sequence_logprobs`): the log-probs must agree to float
# rounding, and fewer token positions go through the model.

# %%
from rlscratch.grpo import completion_batch, sequence_logprobs

toy_rollouts = make_rollouts(kept, ToyTask(), toy_cfg)
packed_batches = micro_batches(toy_rollouts, dataclasses.replace(toy_cfg, micro_batch_size=4), pad_id=0)
worst, packed_positions, separate_positions = 0.0, 0, 0
with torch.no_grad():
    for start, mb in zip(range(0, len(toy_rollouts), 4), packed_batches):
        part = toy_rollouts[start:start + 4]
        rows = completion_batch([r.prompt_ids for r in part], [r.completion_ids for r in part], pad_id=0)
        alone = sequence_logprobs(tiny, rows.input_ids, rows.attention_mask, rows.completion_mask)
        alone = alone[rows.completion_mask.bool()]  # answer after answer, as packed
        packed = answer_logprobs(tiny, mb)[0][mb.completion_mask.bool()]
        worst = max(worst, (packed - alone).abs().max().item())
        packed_positions += mb.input_ids.numel()
        separate_positions += rows.input_ids.numel()
print(f"{len(toy_rollouts)} answers in {len(packed_batches)} packed micro-batches: max |log-prob difference| "
      f"{worst:.1e}; token positions through the model {packed_positions} packed vs {separate_positions} separate")
assert worst < 1e-5 and packed_positions < separate_positions

# %% [markdown]
# **Check: accumulation.** The same batch of rollouts (the toy step above, plus a fifth group whose
# answers all earned 0), as one micro-batch and as micro-batches of 3, on two copies of a float32
# model: after one optimizer step their weights must agree to float rounding. The same holds for
# skipping the zero-advantage answers with $\beta = 0$. The check steps with plain SGD, whose update is the gradient itself: Adam's first step
# divides each gradient entry by its own magnitude, so for entries that are practically 0 it turns
# rounding noise of $10^{-12}$ into steps of the full learning rate, and would hide what we test.

# %%
def one_update(cfg, rollouts):
    m = copy.deepcopy(tiny)  # a fresh copy of the random model each time
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    trained = trained_rollouts(rollouts, cfg)
    batches = micro_batches(trained, cfg, pad_id=0)
    if cfg.beta > 0:
        for mb, ref in zip(batches, score(tiny, batches, cfg)):
            mb.ref_logp = ref
    stats = update_step(m, batches, batch_normalizer(rollouts, cfg), cfg, opt)
    return m, stats, len(trained)


dead = dataclasses.replace(kept[0], rewards=[0.0] * len(kept[0].rewards))  # the same answers, all graded wrong
rollouts = make_rollouts(kept + [dead], ToyTask(), toy_cfg)  # four groups with a signal, one without
for preset in PRESETS:
    base = dataclasses.replace(make_config(preset, "toy", output_dir=str(WORK / "x")), skip_zero_signal=False)
    whole, s_whole, n_whole = one_update(dataclasses.replace(base, micro_batch_size=len(rollouts)), rollouts)
    parts, s_parts, _ = one_update(dataclasses.replace(base, micro_batch_size=3), rollouts)
    diff = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), parts.parameters()))
    line = (f"{preset:8} gradient norm {s_whole['grad_norm']:.6f} vs {s_parts['grad_norm']:.6f}; "
            f"max |weight difference| {diff:.1e}")
    assert diff < 1e-6, line
    if base.beta == 0:
        skipped, s_skip, n_skip = one_update(dataclasses.replace(base, skip_zero_signal=True), rollouts)
        diff_skip = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), skipped.parameters()))
        line += f"; skipping {n_whole - n_skip} of {n_whole} answers changes the weights by {diff_skip:.1e}"
        assert diff_skip < 1e-6
    print(line)

# %% [markdown]
# ## 7. Checkpoints that resume exactly
#
# A three-hour run on a shared laptop will be interrupted. A checkpoint holds everything the next
# steps depend on:
#
# * the weights and the optimizer's state (AdamW's two moving averages per weight: without them the
#   first steps after a restart would be different, and larger);
# * the scheduler's state and the step counters;
# * the position in the data order;
# * the random number generators' states (Python, NumPy, PyTorch). The loop draws its samples from
#   derived seeds, so it needs none of them, but any code that ever draws from a global generator
#   would otherwise silently diverge after a restart.
#
# It is written **atomically**: into a temporary folder first, renamed into place only when
# complete, so a kill during the save leaves the previous checkpoint intact and the half-written one
# is ignored. Only the last few are kept. On restart the loop loads the newest complete one and
# drops the metric lines written after it; the steps after it are recomputed, exactly as they were
# the first time.

# %%
#| export: train
CHECKPOINTS = "checkpoints"


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and PyTorch (and CUDA) random generators' states, as checkpointable values."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from `rng_state()`'s value."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write `state` (it must hold "step") to run_dir/checkpoints/step-NNNNNN atomically; keep the last `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:06d}"
    for stale in root.glob(".tmp-*"):  # saves that a kill interrupted
        shutil.rmtree(stale)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp-*` folders are not checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint folder `path` (tensors on the CPU; plain values only, no pickled code)."""
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


# %% [markdown]
# A round trip: save a model, optimizer and generator state, scramble them, load, compare.

# %%
ckpt_dir = WORK / "ckpt-check"
no_kl = dataclasses.replace(toy_cfg, beta=0.0)
m1 = copy.deepcopy(tiny)
opt1 = torch.optim.AdamW(m1.parameters(), lr=1e-3)
update_step(m1, micro_batches(trained_rollouts(rollouts, no_kl), no_kl, 0), batch_normalizer(rollouts, no_kl), no_kl, opt1)
torch.manual_seed(123)
for step in (1, 2, 3):
    save_checkpoint(ckpt_dir, {"step": step, "model": m1.state_dict(), "optimizer": opt1.state_dict(), "rng": rng_state()})
expected_draw = torch.rand(3)
(ckpt_dir / CHECKPOINTS / ".tmp-step-000004").mkdir()  # a save that was killed half-way
print("kept:", [p.name for p in list_checkpoints(ckpt_dir)])
state = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
m2 = copy.deepcopy(tiny)
opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
m2.load_state_dict(state["model"])
opt2.load_state_dict(state["optimizer"])
set_rng_state(state["rng"])
assert state["step"] == 3 and [p.name for p in list_checkpoints(ckpt_dir)] == ["step-000002", "step-000003"]
assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
assert all(torch.equal(opt1.state[p1]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
           for p1, p2 in zip(m1.parameters(), m2.parameters()))
assert torch.equal(torch.rand(3), expected_draw)
print("weights, optimizer moments and the generator's next draws all restored exactly")

# %% [markdown]
# ## 8. The trained model as a Hugging Face folder
#
# The result of training should outlive this code: the run writes the final model (and the model
# at the end of each earlier epoch) as a standard Hugging Face folder, `config.json` +
# `model.safetensors` + the tokenizer's files, which `transformers`, vLLM, llama.cpp's converter or
# any other tool loads without `rlscratch`. Our model fuses q/k/v and gate/up into single matrices
# (chapter 1); `hf_state_dict` splits them back into Hugging Face's names, and the configuration
# comes from `hf_reference`, the same `transformers` description chapter 1 checks logits against.
# With tied embeddings the output head is the embedding matrix and is stored once.

# %%
#| export: train
def export_hf(model, tokenizer, folder: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save `model` (and `tokenizer`) as a Hugging Face folder that `transformers.AutoModelForCausalLM`
    and `rlscratch.model.load_model` both load; written to a temporary folder, then renamed into place."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    hf_config = hf_reference(model).config  # transformers' own configuration of these weights
    hf_config.architectures = ["Qwen2ForCausalLM"]
    hf_config.dtype = str(dtype).removeprefix("torch.")
    hf_config.save_pretrained(str(tmp))
    tied = model.config.tie_word_embeddings
    tensors = {}
    for name, t in hf_state_dict(model).items():
        if tied and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu", dtype)  # copies only where the device or dtype differ
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        # q/k/v and gate/up are views into one fused weight, and safetensors wants every tensor to own its
        # memory: only those are copied (a third of the weights, not all of them at once on top of training)
        tensors[name] = t if whole and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# %% [markdown]
# **Check:** export the model updated in section 7, load the folder with `transformers` and with
# `load_model`, and compare logits on a prompt.

# %%
import transformers

transformers.utils.logging.disable_progress_bar()
folder = export_hf(m1, tiny_tok, WORK / "exported")
print(sorted(p.name for p in folder.iterdir()))
ids = torch.tensor([tiny_tok.encode("Name a fruit in one word.")])
with torch.no_grad():
    ours = m1(ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)(ids).logits
    reloaded = load_model(folder, dtype=torch.float32)[0](ids)
print(f"max |logit difference|: transformers {(ours - theirs).abs().max():.1e}, load_model {(ours - reloaded).abs().max():.1e}")
assert torch.allclose(ours, theirs, atol=1e-4) and torch.equal(ours, reloaded)

# %% [markdown]
# ## 9. Metrics, evaluation, and the loop
#
# **Metrics.** One JSON line per optimizer step goes to `metrics.jsonl` in the run folder (and to
# Weights & Biases when it is installed: offline by default, so nothing leaves the machine until
# `wandb sync`). What each one is for:
#
# | metric | what it tells |
# |---|---|
# | `reward_mean`, `reward_std` | is the policy improving; is there still variety to learn from |
# | `zero_signal_fraction` | share of groups with all-equal rewards: wasted samples |
# | `sequences_skipped`, `tokens_skipped` | what skipping them saved in the update |
# | `response_length`, `truncation_rate` | longer reasoning or rambling; answers hitting the budget |
# | `kl` | how far the policy has moved from the starting model (per token, the config's estimator) |
# | `entropy` | how spread the policy's choices are; a fall to near 0 means it stopped exploring |
# | `clip_fraction` | share of tokens whose ratio was clipped: 0 with one update per batch |
# | `loss`, `grad_norm`, `lr` | the optimisation itself; `grad_norm` is taken before clipping, so it shows how often the clip acts |
# | `logprob_gap` | mean \|training log-prob − sampler log-prob\|: 0 up to rounding in float32, bf16's size otherwise |
# | `time_generation`, `time_reference`, `time_policy` | where the step's time goes |
# | `rss_GB`, `peak_rss_GB` | the process's resident memory after the step, and its highest since the process started (pre-pass and evaluations included; a resumed run counts from its restart): memory that grows from step to step shows in the first, what the machine must hold in the second |
#
# `kl`, `entropy`, `clip_fraction` and `logprob_gap` are measured on the answers that went through
# the update (not on skipped ones), and are empty (`null`) when none did.
#
# **Evaluation.** At the end of each epoch (and before training, and after the last step if that is
# not an epoch's end) the model answers the held-out GSM8K test questions greedily with the
# chapter 3 chain-of-thought prompt, through the chapter 2 harness: the records are JSON lines in
# the run folder's `evals/`, keyed by the weights' fingerprint like every other run of the book, and
# a summary line goes to `evals.jsonl`. The same model at the end of each epoch is exported as a
# Hugging Face folder `epoch-N/`, the last as `final/`.

# %%
#| export: train
class RunLog:
    """metrics.jsonl (one line per optimizer step) and, if installed and enabled, Weights & Biases."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, log=print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if cfg.wandb_mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log("wandb is not installed: metrics go to metrics.jsonl only (pip install wandb to log them there too)")
            return
        id_file = Path(run_dir) / "wandb_id.txt"  # the same W&B run across restarts
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        try:
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb_mode,
                                    id=id_file.read_text().strip(), resume="allow", name=Path(run_dir).name,
                                    config=dataclasses.asdict(cfg))
        except Exception as err:  # e.g. online mode without a login: keep training, say so once
            log(f"wandb could not start ({type(err).__name__}: {err}); metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["optimizer_step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def process_memory() -> dict[str, float | None]:
    """This process's resident memory now (`rss_GB`) and its highest so far (`peak_rss_GB`), in GB (1e9
    bytes); None where the system does not say (the first needs Linux's /proc)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        now = None
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    except ImportError:  # Windows
        peak = None
    if peak is not None and now is not None:
        peak = max(peak, now)  # Linux updates its high-water mark lazily: it can trail the current figure
    return {"rss_GB": now, "peak_rss_GB": peak}


MEASUREMENTS = ("time_generation", "time_reference", "time_policy", "generated_tokens_per_s", "rss_GB", "peak_rss_GB",
                "machine")


def computed_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record without what the machine measured (times, memory) and its name: the part on which
    two runs of the same computation (straight and resumed, one process and several) must agree."""
    return {k: v for k, v in record.items() if k not in MEASUREMENTS}


def _memory_note() -> str:
    rss = process_memory()["rss_GB"]
    return "" if rss is None else f" | memory {rss:.1f} GB"


def _truncate_jsonl(path: Path, keep) -> None:
    """Rewrite a JSON-lines file with only the complete lines for which keep(row) is true."""
    if path.exists():
        rows = [r for r in _read_jsonl(path) if keep(r)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)


def evaluate_policy(model, tokenizer, task, problems: list[Problem], cfg: TrainConfig, run_dir: Path,
                    autocast=contextlib.nullcontext) -> dict[str, Any]:
    """Greedy answers to the held-out questions: GSM8K through the chapter 2 harness (records in
    run_dir/evals), the toy task by its reward. Returns the summary."""
    folder = Path(run_dir) / "evals"
    with autocast():
        if task.name == "gsm8k":
            settings = EvalSettings(model=cfg.model, template=cfg.template, max_new_tokens=cfg.eval_max_new_tokens)
            records = evaluate(model, tokenizer, problems, settings, batch_size=cfg.generation_batch_size,
                               run_dir=folder, progress=False)
            s = summarize(records)
            return {k: s[k] for k in ("n", "accuracy", "ci95", "mean_tokens", "truncated_rate", "extraction_rate")}
        completions = generate(model, tokenizer, _encode(tokenizer, task, problems),
                               max_new_tokens=cfg.eval_max_new_tokens, temperature=0.0, stop=task.stop,
                               batch_size=cfg.generation_batch_size)
    rewards = [task.reward(p, c) for p, c in zip(problems, completions)]
    return {"n": len(problems), "accuracy": sum(rewards) / len(rewards),
            "mean_tokens": sum(len(c.token_ids) for c in completions) / len(completions),
            "examples": [c.text for c in completions[:4]]}


# %% [markdown]
# **Several processes, the model's side.** Section 5 split the sampling; the rest of the
# machinery for a run over several processes (section 13 explains when and how to start one) is
# here, so that the loop below can use it. With one process every function in this cell returns
# its input or does nothing, so everything in this chapter runs exactly as before.
#
# * `init_distributed` joins the process group that `torchrun` describes in the environment: NCCL
#   between GPUs, gloo between CPUs, each process on the GPU of its local rank.
# * `wrap_policy` turns the model into what the update trains: PyTorch's `DistributedDataParallel`
#   (a full replica per process, gradients all-reduced during the last micro-batch's backward
#   pass), or with `--fsdp` the model sharded in place by FSDP2's `fully_shard` (each transformer
#   block, then the rest: embeddings, final norm, head), so that each process stores only its
#   $1/N$ of the weights, gradients and AdamW state. Both frameworks *average* gradients over the
#   processes; ours must be *summed*, because each process's loss is already divided by the whole
#   batch's normaliser (section 6), and its gradient is a share of the batch gradient, not an
#   estimate of it.
# * `full_weights` gives a sharded model its whole weights for a while. Under FSDP every forward
#   pass gathers the shards of each block from all processes, so all processes must run the same
#   number of forward passes; generation (whose length depends on the answers) and scoring cannot
#   promise that. Inside `full_weights` the weights are gathered once and kept, and each process
#   runs as many passes as it needs. `whole_model` goes one step further for what rank 0 does alone
#   (evaluation, export): an ordinary copy of the model, gathered from the shards.
# * `policy_state` and `load_policy_state` read and write checkpoints in the one-process format
#   (full tensors, the optimizer state indexed by parameter), whatever the number of processes, so a
#   run can be resumed by 1, 2 or 8 processes, with or without FSDP.

# %%
#| export: train
DIST_TIMEOUT = datetime.timedelta(hours=2)  # the longest any process waits while rank 0 works alone (pre-pass, eval)


def init_distributed(cfg: TrainConfig) -> tuple[Dist, str]:
    """Join the process group `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL between GPUs, gloo between CPUs. Returns this process's `Dist` and
    the device it computes on (cuda:LOCAL_RANK on GPUs). Without torchrun: `Dist()` and `cfg.device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or (world == 1 and not cfg.fsdp):
        if cfg.fsdp:
            raise ConfigError("--fsdp shards the model over the processes that torchrun starts: launch with "
                              "torchrun --nproc_per_node N -m rlscratch.train ... (N = 1 works too)")
        return Dist(), cfg.device
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def _sum_gradients(group, bucket):
    """DDP communication hook: sum the processes' gradients (DDP's own hook averages them)."""
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class ReplicatedPolicy(DistributedDataParallel):
    """DDP whose `lm_head` is the wrapped model's: `answer_logprobs` applies the head in chunks outside
    `forward`, and the gradients it produces are all-reduced with the rest."""

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.module.lm_head


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2, in place: each transformer block is one unit, the rest (embeddings, norm, head) the root;
    gradients are summed over the processes (FSDP's default averages them)."""
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)  # a sum ...
            unit.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM (gloo has no pre-multiplied sum)
    return model


def wrap_policy(model, cfg: TrainConfig, dist: Dist, device: str) -> torch.nn.Module:
    """What the update trains: `model` itself on one process; with several, a DDP replica, or with
    `cfg.fsdp` the model sharded in place; either way gradients are summed over the processes."""
    if cfg.fsdp:
        return shard_model(model)
    if dist.world == 1:
        return model
    replica = ReplicatedPolicy(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None)
    replica.register_comm_hook(None, _sum_gradients)
    return replica


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """Inside: a sharded (FSDP) model's whole weights on every process, gathered once and kept between
    forward passes, so that each process may run any number of them alone (sampling, scoring). Every
    process must enter it. A no-op for a model that is not sharded."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    inner = [m for m in units if m is not model]  # the root keeps its own setting (whole after forward)
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def whole_model(model: torch.nn.Module, dist: Dist):
    """Inside: on rank 0 an ordinary (unsharded) model with the policy's current weights, None on the
    other processes; for what rank 0 does alone with the whole model (evaluation, export). Under FSDP a
    temporary copy gathered from the shards (a collective: every process enters); otherwise the model."""
    if not isinstance(model, FSDPModule):
        yield model if dist.is_main else None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        yield None
        return
    with torch.device("meta"):
        copy_ = Qwen2Model(model.config)
    copy_.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        copy_.lm_head.weight = copy_.embed_tokens.weight
    copy_.to(model.lm_head.weight.device).eval()
    pack_for_cpu(copy_)
    yield copy_


def policy_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) in the one-process format. Under FSDP the shards are gathered to
    rank 0's CPU (a collective: every process calls it; the others get empty dictionaries)."""
    if not isinstance(model, FSDPModule):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, by_name = get_state_dict(model, optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return model_state, {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return model_state, {"state": {index[k]: v for k, v in by_name["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in by_name["param_groups"]]}


def load_policy_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Restore a checkpoint's optimizer state (one-process format). Under FSDP every process keeps its
    own shard of each tensor (each process read the whole checkpoint: no communication)."""
    if isinstance(model, FSDPModule):
        from torch.distributed.tensor import distribute_tensor

        params = list(model.parameters())

        def shard(value, p):
            if not torch.is_tensor(value) or value.dim() == 0:  # AdamW's step counter
                return value
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)

        optimizer_state = {**optimizer_state, "state": {i: {k: shard(v, params[i]) for k, v in s.items()}
                                                        for i, s in optimizer_state["state"].items()}}
    optimizer.load_state_dict(optimizer_state)


# %% [markdown]
# The loop itself, `train(cfg)`, puts sections 3 to 8 in order. Its structure, read from the top:
#
# 1. check the settings, refuse a folder holding another run's settings, load the questions and the
#    model (float32 weights, packed for the CPU's matrix kernels; a frozen copy as the reference);
# 2. run (or reload) the pre-pass with the starting weights, and fix the data order;
# 3. restore the newest checkpoint, if any, and drop the records written after it;
# 4. each step: rollouts → rewards → advantages → (reference / old log-probs) → `updates_per_batch`
#    optimizer steps → one metrics line each; at an epoch's end evaluate and export; every
#    `save_every` steps (and at epochs' ends and the last step) checkpoint;
# 5. evaluate and export the final model.
#
# Step $s$'s samples depend only on the weights and on seeds derived from $s$, so a run restarted
# from a checkpoint recomputes exactly the steps it lost.

# %%
#| export: train
def autocast_dtype(cfg: TrainConfig) -> torch.dtype:
    """bfloat16 where asked or (auto) where the device computes it natively; else float32."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.dtype) or resolve_dtype("auto", cfg.device)


def _check_run_folder(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a folder whose run started with other settings; record the settings."""
    path = run_dir / "config.json"
    current = dataclasses.asdict(cfg)
    started = list_checkpoints(run_dir) or any((run_dir / f).exists() for f in
                                               ("metrics.jsonl", "evals.jsonl", "prepass.jsonl"))
    if path.exists() and started:
        saved = json.loads(path.read_text())
        defaults = dataclasses.asdict(TrainConfig())  # a setting added after the run started had its default
        changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {current[k]!r}" for k in changed[:4])
            raise ConfigError(f"{run_dir} holds a run with other settings ({details}); rerun with the same "
                              "settings to resume it, or choose another --output-dir")
    _write_json(path, current)


def train(cfg: TrainConfig, *, log=print) -> dict[str, Any]:
    """Run (or resume) the GRPO run `cfg` describes, in `cfg.output_dir`. Returns a summary. Under
    torchrun every process calls it (and it joins their process group); rank 0 alone logs and writes."""
    validate(cfg)
    had_group = torch.distributed.is_initialized()
    dist, device = init_distributed(cfg)
    try:
        return _train(cfg, dist, device, log if dist.is_main else lambda line: None)
    finally:
        if not had_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist, device: str, log) -> dict[str, Any]:
    run_dir = Path(cfg.output_dir).expanduser()
    refused = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            _check_run_folder(run_dir, cfg)
        except ConfigError as err:
            refused = str(err)
    refused = dist.broadcast(refused)  # every process stops with rank 0's verdict
    if refused:
        raise ConfigError(refused)
    task = make_task(cfg)
    candidates, eval_set = task.problems(cfg)
    try:
        model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=device)
    except (OSError, ValueError, ConnectionError) as err:
        raise ConfigError(f"cannot load model {cfg.model!r}: {err}") from None
    use_bf16 = autocast_dtype(cfg) == torch.bfloat16
    device_type = torch.device(device).type
    autocast = partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=use_bf16)
    if not cfg.fsdp:
        pack_for_cpu(model)  # faster CPU generation from the live float32 weights; no-op elsewhere
    model.gradient_checkpointing = cfg.gradient_checkpointing
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if dist.world > 1:
        log(f"{dist.world} processes ({torch.distributed.get_backend()}, {'FSDP' if cfg.fsdp else 'DDP'}): each "
            f"samples and trains about {cfg.prompts_per_step / dist.world:g} of the {cfg.prompts_per_step} questions "
            "of a step")

    if cfg.prepass_samples:  # rank 0 alone (the others wait), before any sharding
        pre = dist.broadcast(prepass(model, tokenizer, task, candidates, cfg, run_dir, autocast, log)
                             if dist.is_main else None)
        keep = set(pre["kept"])
        train_set = [p for p in candidates if p.id in keep]
        if not train_set:
            raise ConfigError(f"the pre-pass kept no question (pass counts out of {cfg.prepass_samples}: "
                              f"{pre['histogram']}); use more or other questions, or --prepass-samples 0")
        log(f"pre-pass: kept {len(train_set)} of {len(candidates)} questions; expected groups with signal "
            f"{pre['signal_fraction_all']:.0%} -> {pre['signal_fraction_kept']:.0%}")
    else:
        train_set = candidates
    order = DataOrder(train_set, cfg.seed)
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(train_set) / cfg.prompts_per_step)
    reference = None
    if cfg.beta > 0 or cfg.track_kl:
        reference = copy.deepcopy(model).requires_grad_(False)

    step, optimizer_step, cursor, epochs_done, last_eval = 0, 0, 0, 0, None
    checkpoints = list_checkpoints(run_dir)
    state = load_checkpoint(checkpoints[-1]) if checkpoints else None  # every process reads it
    if state is not None:
        model.load_state_dict(state["model"])
    policy = wrap_policy(model, cfg, dist, device)  # DDP, FSDP (the model itself, sharded), or the model
    if reference is not None and cfg.fsdp:
        shard_model(reference)
    optimizer = make_optimizer(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total_steps * cfg.updates_per_batch)
    if state is not None:
        load_policy_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, optimizer_step, cursor = state["step"], state["optimizer_step"], state["cursor"]
        epochs_done, last_eval = state["epochs_done"], state["last_eval"]
        log(f"resuming {run_dir} from step {step}")
        del state
    runlog, machine = None, describe_hardware()  # every step's record names the CPU its times come from
    if dist.is_main:
        _truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r["optimizer_step"] <= optimizer_step)
        _truncate_jsonl(run_dir / "evals.jsonl", lambda r: bool(checkpoints) and r["step"] <= step)
        runlog = RunLog(run_dir, cfg, log)

    def run_eval(label: str) -> None:
        nonlocal last_eval
        if not eval_set:
            return
        with whole_model(model, dist) as whole:
            if whole is not None:  # rank 0
                t0 = time.perf_counter()
                summary = evaluate_policy(whole, tokenizer, task, eval_set, cfg, run_dir, autocast)
                row = {"label": label, "step": step, "optimizer_step": optimizer_step, "epoch": cursor / len(order),
                       **summary, "seconds": time.perf_counter() - t0}
                with open(run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"eval {label}: accuracy {summary['accuracy']:.1%} on {summary['n']} questions")
        last_eval = step

    def export(folder: Path) -> None:
        # the evaluation's packed copies (2 bytes a parameter) are not held through the export and the
        # checkpoint that follows: the next step's sampling packs the weights again, in a second or two
        release_packed_weights(model)
        with whole_model(model, dist) as whole:
            if whole is not None:  # rank 0
                export_hf(whole, tokenizer, folder, dtype=getattr(torch, cfg.export_dtype))

    def checkpoint() -> None:
        model_state, optimizer_state = policy_state(model, optimizer)
        if dist.is_main:
            save_checkpoint(run_dir, {
                "step": step, "optimizer_step": optimizer_step, "cursor": cursor, "epochs_done": epochs_done,
                "last_eval": last_eval, "model": model_state, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(cfg)},
                keep=cfg.keep_checkpoints)
        dist.barrier()  # the checkpoint is complete before any process goes on

    if step == 0 and cfg.eval_at_start and last_eval is None:
        run_eval("start")
    while step < total_steps:
        step += 1
        t0 = time.perf_counter()
        with full_weights(model):
            groups, sampled, cursor = collect_groups(model, tokenizer, task, order, cursor, cfg, step, autocast, dist)
        release_packed_weights(model)  # the update is about to change the weights: free their stale packed copies
        t_gen = time.perf_counter() - t0
        rollouts = make_rollouts(groups, task, cfg)  # the whole batch, on every process
        trained = trained_rollouts(rollouts, cfg)
        normalizer = batch_normalizer(rollouts, cfg)
        ranks = [g.rank for g in groups for _ in g.completions]
        mine = trained_rollouts([r for r, rank in zip(rollouts, ranks) if rank == dist.rank], cfg)
        batches = micro_batches(mine, cfg, pad_id, device)  # this process's share of the update
        t0 = time.perf_counter()
        if reference is not None:
            with full_weights(reference):
                for mb, ref in zip(batches, score(reference, batches, cfg, autocast)):
                    mb.ref_logp = ref
        if cfg.updates_per_batch > 1:
            with full_weights(model):
                for mb, old in zip(batches, score(model, batches, cfg, autocast)):
                    mb.old_logp = old
        t_ref = time.perf_counter() - t0
        answers = [c for g in sampled for c in g.completions]
        rewards = torch.tensor([r for g in sampled for r in g.rewards])
        lengths = [len(c.token_ids) for c in answers]
        common = {
            "step": step, "epoch": cursor / len(order),
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "zero_signal_fraction": sum(not g.has_signal for g in sampled) / len(sampled),
            "groups_sampled": len(sampled), "groups_trained": len(groups),
            "response_length": sum(lengths) / len(lengths), "response_length_max": max(lengths),
            "truncation_rate": sum(c.finish_reason == "length" for c in answers) / len(answers),
            "sequences_trained": len(trained), "sequences_skipped": len(rollouts) - len(trained),
            "tokens_skipped": sum(len(r.completion_ids) for r in rollouts) - sum(len(r.completion_ids) for r in trained),
        }
        for update in range(cfg.updates_per_batch):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            stats = update_step(policy, batches, normalizer, cfg, optimizer, autocast, dist)
            scheduler.step()
            optimizer_step += 1
            if runlog is not None:
                runlog.write({**common, "optimizer_step": optimizer_step, "update": update, "lr": lr, **stats,
                              "time_generation": t_gen if update == 0 else 0.0,
                              "time_reference": t_ref if update == 0 else 0.0,
                              "time_policy": time.perf_counter() - t0, "machine": machine, **process_memory(),
                              "generated_tokens_per_s": sum(lengths) / t_gen if update == 0 and t_gen > 0 else None})
        log(f"step {step}/{total_steps}: reward {common['reward_mean']:.3f} zero-signal "
            f"{common['zero_signal_fraction']:.0%} length {common['response_length']:.0f} loss {stats['loss']:+.4f} "
            f"grad {stats['grad_norm']:.3f} lr {lr:.2e} | gen {t_gen:.1f}s ref {t_ref:.1f}s "
            f"policy {time.perf_counter() - t0:.1f}s" + _memory_note())
        epoch_end = cursor // len(order) > epochs_done
        if epoch_end:
            epochs_done = cursor // len(order)
        if epoch_end or step == total_steps:
            run_eval(f"epoch-{epochs_done}" if epoch_end else "final")
            if step < total_steps:
                export(run_dir / f"epoch-{epochs_done}")
        if step % cfg.save_every == 0 or epoch_end or step == total_steps:
            checkpoint()
        if os.environ.get("RLSCRATCH_TRAIN_KILL_AFTER_STEP") == str(step):  # testing hook, see the module docstring
            os.kill(os.getpid(), signal.SIGKILL)
    final = run_dir / "final"
    if not dist.broadcast(final.exists()):
        export(final)
    if runlog is not None:
        runlog.close()
    dist.barrier()
    return {"run_dir": str(run_dir), "steps": step, "optimizer_steps": optimizer_step, "final": str(final),
            "evals": _read_jsonl(run_dir / "evals.jsonl")}


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's records (config, metrics, evaluations, pre-pass), or None if it holds no run."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.json").exists():
        return None
    prepass_path = run_dir / "prepass.json"
    return {"config": json.loads((run_dir / "config.json").read_text()),
            "metrics": _read_jsonl(run_dir / "metrics.jsonl"), "evals": _read_jsonl(run_dir / "evals.jsonl"),
            "prepass": json.loads(prepass_path.read_text()) if prepass_path.exists() else None,
            "checkpoints": [p.name for p in list_checkpoints(run_dir)], "final": (run_dir / "final").exists()}


# %% [markdown]
# ## 10. The command line
#
# `python -m rlscratch.train` builds a `TrainConfig` from its flags (the preset and task defaults
# fill in everything not given) and calls `train`. Every mistake that can be caught before the run
# starts is one line on stderr and a non-zero exit status: an unknown flag (argparse), a config that
# cannot work, a model or dataset that cannot be loaded. Rerunning the same command continues the
# run from its last checkpoint; rerunning a finished one just reports it.

# %%
#| export: train
def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag maps to a TrainConfig field of the same name."""
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items())
    tasks = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in TASK_DEFAULTS.items())
    p = argparse.ArgumentParser(
        prog="python -m rlscratch.train",
        description="Train a language model with GRPO on verifiable rewards (chapter 6 of rlscratch). Rerun the "
                    "same command to resume from the last checkpoint. Unset flags take the task's defaults, then "
                    "the preset's loss settings, then TrainConfig's defaults. Several processes (data parallel): "
                    "start the same command with torchrun, e.g. 'torchrun --nproc_per_node 8 -m rlscratch.train "
                    "--device cuda ...' (8 GPUs of one machine) or, on each of 2 machines, 'torchrun --nnodes 2 "
                    "--node_rank K --nproc_per_node 8 --master_addr HOST0 --master_port 29500 -m rlscratch.train "
                    "...'. Each step's --prompts-per-step questions are then split over the processes (every "
                    "group of --group-size answers on one process; the samples do not depend on the number of "
                    "processes), gradients are summed over them (DDP, or FSDP with --fsdp) and the update equals "
                    "one process's with the same global batch; rank 0 alone logs, evaluates and writes the run "
                    "folder, which must be visible to every process (a shared file system across machines). "
                    "NCCL on GPUs, gloo on CPUs.",
        epilog=f"presets -- {presets}. task defaults -- {tasks}. Quick check: python -m rlscratch.train "
               "--model tiny-random --task toy --steps 20 --output-dir /tmp/toy; the same on two CPU processes: "
               "torchrun --nproc_per_node 2 -m rlscratch.train --model tiny-random --task toy --steps 20 "
               "--output-dir /tmp/toy2")
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("run")

    def add(flag: str, help: str, **kw) -> None:  # adds to the current group `g`
        g.add_argument(flag, dest=flag.removeprefix("--").replace("-", "_"), default=None, help=help, **kw)

    add("--model", "model to train: a Hub id, a Hugging Face folder, a .gguf file, 'offline:qwen2.5-coder-0.5b-"
        "instruct' or 'tiny-random' (default: the task's)")
    g.add_argument("--preset", default="grpo", choices=sorted(PRESETS), help="loss recipe (default: grpo)")
    g.add_argument("--task", default="gsm8k", choices=sorted(TASK_DEFAULTS),
                   help="gsm8k (the real task) or toy (seconds-long check with a tiny model) (default: gsm8k)")
    add("--steps", "rollout steps (default: --epochs passes over the training questions)", type=int)
    add("--epochs", "passes over the training questions when --steps is not given (default: 1)", type=int)
    add("--save-every", "checkpoint every K steps", type=int)
    add("--keep-checkpoints", "number of checkpoints kept (default: 2)", type=int)
    add("--output-dir", "run folder: checkpoints, metrics.jsonl, evals, final/ (default: "
        "~/.cache/rlscratch/runs/<preset>-<task>)")
    add("--seed", "run seed: data order and every sample derive from it (default: 0)", type=int)
    g = p.add_argument_group("questions and evaluation")
    add("--template", f"prompt template for GSM8K, one of {TEMPLATES} (default: step_by_step)")
    add("--train-problems", "use the first N training questions as candidates (default: all)", type=int)
    add("--eval-problems", "held-out test questions evaluated at each epoch's end (0: none)", type=int)
    add("--eval-max-new-tokens", "answer budget in evaluation", type=int)
    add("--eval-at-start", "also evaluate the starting model (default: yes)", action=B)
    add("--prepass-samples", "answers per question in the pre-pass that keeps questions solved sometimes "
        "(0: no pre-pass) (default: 4)", type=int)
    add("--prepass-max-new-tokens", "answer budget in the pre-pass (default: --max-new-tokens)", type=int)
    g = p.add_argument_group("rollouts")
    add("--prompts-per-step", "P: questions per step", type=int)
    add("--group-size", "G: answers sampled per question (>= 2)", type=int)
    add("--max-new-tokens", "answer budget in training", type=int)
    add("--temperature", "sampling temperature (> 0) (default: 1.0)", type=float)
    add("--top-p", "nucleus sampling mass (default: 1.0)", type=float)
    add("--generation-batch-size", "sequences decoded together", type=int)
    g = p.add_argument_group("loss (set by --preset; a flag overrides it)")
    add("--advantage-scale", f"advantage scaling, one of {ADVANTAGE_SCALES}")
    add("--aggregation", f"loss aggregation, one of {AGGREGATIONS}")
    add("--beta", "KL penalty weight", type=float)
    add("--kl", f"KL estimator, one of {KL_ESTIMATORS}")
    add("--clip-low", "lower clip range of the ratio", type=float)
    add("--clip-high", "upper clip range of the ratio", type=float)
    add("--mask-truncated", "leave answers cut off by the token budget out of the loss", action=B)
    add("--drop-zero-signal", "drop groups whose rewards are all equal from the batch", action=B)
    add("--max-refills", "extra rounds of questions to refill a batch after dropping groups", type=int)
    add("--skip-zero-signal", "skip forward/backward of answers with advantage 0 (exact when beta = 0) "
        "(default: yes)", action=B)
    add("--track-kl", "report the KL to the starting model even when beta = 0 (costs a reference pass)", action=B)
    g = p.add_argument_group("optimisation")
    add("--lr", "peak learning rate", type=float)
    add("--warmup-steps", "optimizer steps of linear warmup", type=int)
    add("--min-lr-ratio", "final learning rate of the cosine decay, relative to --lr (default: 0.1)", type=float)
    add("--weight-decay", "AdamW weight decay (default: 0)", type=float)
    add("--adam-beta1", "AdamW beta1 (default: 0.9)", type=float)
    add("--adam-beta2", "AdamW beta2 (default: 0.99)", type=float)
    add("--grad-clip", "maximum global gradient norm (default: 1.0)", type=float)
    add("--updates-per-batch", "optimizer steps per batch of rollouts (default: 1)", type=int)
    add("--micro-batch-size", "sequences per forward/backward pass (per process); gradients accumulate to the "
        "same update",
        type=int)
    add("--gradient-checkpointing", "recompute each block in the backward pass to save memory", action=B)
    add("--entropy-stride", "measure the policy's entropy at every k-th answer token", type=int)
    add("--dtype", "compute dtype: auto (bfloat16 where native), bfloat16 or float32; weights stay float32")
    add("--device", "cpu or cuda (default: cpu); under torchrun each process takes the GPU of its LOCAL_RANK")
    add("--fsdp", "under torchrun, shard the weights, gradients and AdamW state over the processes (FSDP2 "
        "fully_shard) instead of a full replica on each (DDP); for models whose training state does not fit one "
        "device. Checkpoints stay in the one-process format (default: no)", action=B)
    add("--export-dtype", "dtype of the exported Hugging Face folders: float32 or bfloat16 (default: float32)")
    add("--wandb-mode", "Weights & Biases: offline, online or disabled (default: $WANDB_MODE, else offline)")
    add("--wandb-project", "Weights & Biases project (default: rlscratch)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config of parsed command-line flags (unset flags: task and preset defaults)."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("preset", "task")}
    if overrides.get("wandb_mode") is None:
        overrides["wandb_mode"] = os.environ.get("WANDB_MODE", "offline")
    return make_config(args.preset, args.task, **overrides)


def main(argv: list[str] | None = None) -> int:
    """The command line's entry point; returns the exit status."""
    args = build_parser().parse_args(argv)  # a bad flag: argparse prints one line and exits with status 2
    try:
        cfg = config_from_args(args)
        summary = train(cfg)
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops, rank 0 says why
            print(f"python -m rlscratch.train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(f"done: {summary['steps']} steps in {summary['run_dir']}; model in {summary['final']}")
    return 0


TCMALLOC = "libtcmalloc_minimal.so.4"
LIBRARY_DIRS = (Path(sys.prefix) / "lib", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
                Path("/usr/lib64"), Path("/usr/lib"))


def allocator_environment(environ: dict[str, str], search: tuple[Path, ...] = LIBRARY_DIRS) -> dict[str, str] | None:
    """The environment in which to restart the command line under tcmalloc, or None to go on as it is (tcmalloc
    already loaded, not installed, or `RLSCRATCH_MALLOC=system`). glibc's malloc maps every block above 32 MB
    afresh and unmaps it when freed, and a step frees and reallocates such blocks all the time; under tcmalloc,
    which keeps them, a step's scoring ran 1.4 times as fast (benchmarks/bench_allocator.py)."""
    if environ.get("RLSCRATCH_MALLOC", "tcmalloc") == "system" or "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    found = next((d / TCMALLOC for d in search if (d / TCMALLOC).exists()), None)
    if found is None:
        return None
    return {**environ, "LD_PRELOAD": ":".join(filter(None, [str(found), environ.get("LD_PRELOAD", "")]))}


if __name__ == "__main__" and "__file__" in globals():  # `python -m rlscratch.train`, not this notebook
    restart = allocator_environment(dict(os.environ))
    if restart is not None:  # the same process (same PID, for torchrun and kill), now with tcmalloc loaded
        os.execve(sys.executable, [sys.executable, "-m", "rlscratch.train", *sys.argv[1:]], restart)
    sys.exit(main())


# %% [markdown]
# The help text, and two of the clear errors:

# %%
parser = build_parser()
help_text = parser.format_help()
print(help_text[:1500], "...")
fields = {f.name for f in dataclasses.fields(TrainConfig)}
flags = {a.dest for a in parser._actions} - {"help"}
assert fields == flags, fields ^ flags  # every setting has a flag, every flag a setting
for argv in (["--task", "toy", "--group-size", "1"], ["--task", "toy", "--model", "/no/such/model", "--output-dir",
                                                       str(WORK / "missing-model"), "--wandb-mode", "disabled"]):
    print(f"{shown(' '.join(argv))!r} -> exit status {main(argv)}")

# %% [markdown]
# ## 11. A complete toy run, interrupted and resumed
#
# Now the whole loop on the toy task: the tiny random model, 64 candidate questions, a pre-pass of
# 4 answers each, then `TOY_STEPS` steps of 4 questions × 8 one-token answers with the `grpo`
# preset and run seed 2, a checkpoint every 2 steps, a greedy evaluation on 16 held-out prompts before
# training and at each epoch's end. To show that resuming works, the run is first stopped after step
# 5 (as if killed: the loop is simply not continued), then the same configuration is run again; it
# resumes from the step-4 checkpoint and recomputes step 5. A second, uninterrupted run in another folder
# must end with the same weights and the same metrics (the tests do the same with a real
# `SIGKILL`).

# %%
def toy_config(folder: str, **kw):
    return make_config("grpo", "toy", steps=TOY_STEPS, save_every=2, keep_checkpoints=1, seed=2,
                       output_dir=str(WORK / folder), wandb_mode="disabled", dtype="float32", **kw)


class Stop(Exception):
    pass


def stop_after_5(line: str) -> None:
    print(line)
    if line.startswith("step 5/"):
        raise Stop  # the run ends here as a kill would end it: nothing more is written


try:
    train(toy_config("toy-interrupted"), log=stop_after_5)
except Stop:
    print("-- stopped after step 5; checkpoints:", read_run(WORK / "toy-interrupted")["checkpoints"])
resumed = train(toy_config("toy-interrupted"), log=lambda line: print(shown(line)))
straight = train(toy_config("toy-straight"), log=lambda line: None)

# %%
run_a, run_b = read_run(WORK / "toy-interrupted"), read_run(WORK / "toy-straight")
assert [computed_metrics(r) for r in run_a["metrics"]] == [computed_metrics(r) for r in run_b["metrics"]]
w_a = load_model(WORK / "toy-interrupted" / "final", dtype=torch.float32)[0].state_dict()
w_b = load_model(WORK / "toy-straight" / "final", dtype=torch.float32)[0].state_dict()
w_0 = tiny.state_dict()  # the starting weights (section 3's copy, never trained)
print("max |weight difference| interrupted vs straight:", max((w_a[k] - w_b[k]).abs().max().item() for k in w_a))
print("max |weight change| during training:", max((w_a[k] - w_0[k]).abs().max().item() for k in w_a))
print("pre-pass:", {k: v for k, v in run_a["prepass"].items() if k != "kept"})
for e in run_a["evals"]:
    print(f"eval {e['label']:6} (step {e['step']:2}): {e['accuracy']:.0%} of {e['n']} greedy replies start with a "
          f"letter, e.g. {e['examples'][:2]}")

# %%
def curve(ax, rows, key, label=None, **kw):
    """Plot a metric against the step, leaving out steps where it was not measured (None)."""
    xs = [r["step"] for r in rows if r.get(key) is not None]
    ax.plot(xs, [r[key] for r in rows if r.get(key) is not None], label=label or key, **kw)


fig, axes = plt.subplots(1, 3, figsize=(12, 3))
curve(axes[0], run_a["metrics"], "reward_mean", marker="o")
curve(axes[0], run_a["metrics"], "zero_signal_fraction", marker=".")
axes[0].legend()
axes[0].set_title("toy reward (32 answers per step)")
curve(axes[1], run_a["metrics"], "entropy", marker="o")
axes[1].set_title("policy entropy at T = 0.25 (nats)")
curve(axes[2], run_a["metrics"], "kl", marker="o")
axes[2].set_title("KL to the start (k3, per token)")
for ax in axes:
    ax.set_xlabel("step")
plt.tight_layout()
plt.show()
for r in run_a["metrics"][:10]:
    print(f"step {r['step']}: reward {r['reward_mean']:.2f}, zero-signal groups {r['zero_signal_fraction']:.0%}, "
          f"answers trained {r['sequences_trained']}, skipped {r['sequences_skipped']}")

# %% [markdown]
# What the toy run shows, and what it does not. The random policy starts near its base rate (about
# a fifth of its replies start with a letter); within a few steps the reward reaches 1 as
# probability moves onto the letter-initial tokens it happened to sample and was rewarded for; the
# entropy falls as the policy concentrates and the KL to the starting model grows. Once every answer
# earns 1, every group has zero signal: nothing is left to learn, the update skips every answer
# (so entropy and KL are no longer measured), and only AdamW's momentum still moves the weights.
# A GSM8K question the model always solves ends the same way, which is why the pre-pass drops
# them. The greedy evaluation on held-out prompts tells the same story, and the interrupted and
# the straight runs agree to the bit. None of this is reasoning: it is the machinery, checked end
# to end.
#
# ## 12. The real run
#
# The real run trains Qwen2.5-Coder-0.5B-Instruct (the offline model) on GSM8K training questions
# with the `grpo` preset, for 3 epochs over a subset chosen by the pre-pass, evaluating after each
# epoch on 200 held-out test questions. It runs in a terminal, where it can be stopped and restarted
# at will (each restart resumes from the last checkpoint):
#
# ```bash
# python -m rlscratch.train --model offline:qwen2.5-coder-0.5b-instruct --preset grpo --task gsm8k \
#     --train-problems 128 --epochs 3 --prompts-per-step 4 --group-size 8 --max-new-tokens 300 \
#     --lr 1e-6 --save-every 2 --eval-problems 200 --output-dir ~/.cache/rlscratch/runs/grpo-gsm8k --seed 0
# ```
#
# How the settings were chosen. $P = 4$ questions × $G = 8$ answers, the 300-token budget and the
# learning rate $10^{-6}$ are the GSM8K task's defaults (`TASK_DEFAULTS`, section 1), fixed before
# this run began. The rate comes from chapter 5's pilots on its arithmetic training problems, where
# $10^{-5}$ collapsed the policy in one step (DeepSeekMath's GRPO runs used $10^{-6}$ too). Two
# checks on GSM8K training questions came afterwards: the run's own pre-pass shows how well $G$ and
# the budget fit, and a pilot at $3 \times 10^{-6}$, run after the main run had finished, tries a
# larger rate (both below). They inform the next run, not this one. The test questions play no part
# in any choice: they are only evaluated.
#
# Budget on this 2-core CPU (AMD EPYC, bf16): the pre-pass samples 4 answers for each of 128
# candidate questions and keeps the 42 solved sometimes; 3 epochs over them are
# $\lceil 3 \cdot 42 / 4 \rceil = 32$ steps of 4 questions, at a median of 3.1 minutes each (101
# minutes in all), plus four evaluations of 200 test questions. The run was stopped and resumed
# several times (twice killed by the out-of-memory killer; "Memory from step to step", later in
# this section, looks for the cause); every restart continued from the last checkpoint. The
# pre-pass too was interrupted and resumed, and the time printed below counts only its last session,
# the questions it still had to do. The cells below read the run folder's records (or their copy
# kept with the book), so re-executing this notebook never retrains.

# %%
import json
import shutil
import textwrap

from rlscratch.evaluate import compare_paired, wilson_interval
from rlscratch.model import OFFLINE_SHA256
from rlscratch.results import results_dir

RECORDS = WORK / "records" if SMOKE else results_dir() / "grpo-gsm8k"  # the run's small records, kept in git
PILOT_DIR = Path(os.environ.get("RLSCRATCH_GRPO_PILOT", cache_dir() / "runs" / "grpo-gsm8k-lr3e-6"))
PILOT_RECORDS = WORK / "pilot-records" if SMOKE else results_dir() / "grpo-gsm8k-lr3e-6"


def copy_run_records(run_dir: Path, target: Path) -> None:
    """Copy a run's small records into `target`: settings, metrics, pre-pass and each evaluation's answers
    (named by its label); never checkpoints or models. An evaluation's answers are found by content: the
    harness file whose first n records give the accuracy and mean length that evals.jsonl recorded."""
    (target / "evals").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "evals.jsonl", "prepass.json", "prepass.jsonl"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, target / name)
    answers = [_read_jsonl(f) for f in sorted((run_dir / "evals").glob("*.jsonl"))]
    for e in _read_jsonl(run_dir / "evals.jsonl"):
        for records in answers:
            head = records[:e["n"]]
            if len(head) == e["n"] and "correct" in head[0]:
                s = summarize(head)
                if math.isclose(s["accuracy"], e["accuracy"]) and math.isclose(s["mean_tokens"], e["mean_tokens"]):
                    (target / "evals" / f"{e['label']}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in head))
                    break


def load_run(run_dir: Path, records: Path) -> dict[str, Any] | None:
    """The run in `run_dir` (after copying its records to `records`), else the copy in `records`, else None."""
    if read_run(run_dir) is not None:
        copy_run_records(Path(run_dir).expanduser(), records)
        return read_run(run_dir)
    return read_run(records)


def eval_answers(records: Path, label: str) -> list[dict] | None:
    """The per-question answers of the evaluation `label`, from a run's copied records (None if absent)."""
    path = records / "evals" / f"{label}.jsonl"
    return _read_jsonl(path) if path.exists() else None


real = load_run(RUN_DIR, RECORDS)
if SMOKE and real is None:  # the test suite has no real run: exercise the same cells on the toy run's records
    RUN_DIR = WORK / "toy-interrupted"
    real = load_run(RUN_DIR, RECORDS)
if real is None:
    print(f"no run recorded yet in {shown(RUN_DIR)} or {shown(RECORDS)}: start one with the command above (or set "
          "RLSCRATCH_GRPO_RUN to a run folder), then re-execute this section")
else:
    c = real["config"]
    print(f"{shown(RUN_DIR) if read_run(RUN_DIR) else shown(RECORDS)}: model {c['model']}, preset {c['preset']}, "
          f"task {c['task']}, P={c['prompts_per_step']} x G={c['group_size']}, max_new_tokens={c['max_new_tokens']}, "
          f"lr={c['lr']}, beta={c['beta']}")
    print(f"{len(real['metrics'])} optimizer steps recorded; checkpoints {real['checkpoints']}; "
          f"final model exported: {real['final']}")
    print("records kept with the book:", sorted(str(p.relative_to(RECORDS)) for p in RECORDS.glob("**/*.json*")))

# %% [markdown]
# **The pre-pass.** How many training questions the starting model solved 0, 1, …, k times out of
# k, which were kept, and what that does to the share of groups with a signal.

# %%
if real is None or real["prepass"] is None:
    print("no pre-pass recorded yet")
else:
    pre = real["prepass"]
    k = pre["samples"]
    plt.figure(figsize=(5, 2.6))
    plt.bar(range(k + 1), pre["histogram"], color=["grey"] + ["tab:blue"] * (k - 1) + ["grey"])
    plt.xlabel(f"answers right out of {k}")
    plt.ylabel("questions")
    plt.title(f"pre-pass: {len(pre['kept'])} of {pre['questions']} kept (blue)")
    plt.tight_layout()
    plt.show()
    print(f"expected share of groups of {real['config']['group_size']} with a signal: all questions "
          f"{pre['signal_fraction_all']:.0%}, kept questions {pre['signal_fraction_kept']:.0%}; the pre-pass took "
          f"{pre['seconds'] / 60:.1f} min")

# %% [markdown]
# **Checking two settings: group size and token budget.** The pre-pass, run on training questions
# with the settings already fixed, shows at no extra cost how well they fit. A group carries a signal
# only if its $G$ answers disagree, and from each question's pre-pass pass rate $p$ the chance of
# that is $1 - p^G - (1-p)^G$ (section 4's `signal_fraction`), for any $G$, without sampling more.
# The budget has to leave room for right answers, and the pre-pass answers (sampled at $T = 1$ under
# the same 300-token budget) say how long those are; they cannot say how many more a longer budget
# would have let through.

# %%
pre_answers = _read_jsonl(RECORDS / "prepass.jsonl") if real is not None else []
if not pre_answers:
    print("no pre-pass answers recorded")
else:
    k = len(pre_answers[0]["rewards"])
    rates = [sum(r["rewards"]) / k for r in pre_answers]
    kept = [x for x in rates if 0 < x < 1]
    print(f"pre-pass: {len(pre_answers)} questions x {k} answers at T={real['config']['temperature']}, "
          f"at most {real['config']['max_new_tokens']} new tokens")
    print(f"{'group size G':>12} {'signal share, all questions':>28} {'kept questions':>15}")
    for g in (2, 4, 8, 16):
        print(f"{g:12d} {signal_fraction(rates, g):28.0%} {signal_fraction(kept, g):15.0%}")
    lengths = [(t, bool(r), bool(cut)) for a in pre_answers for t, r, cut in zip(a["tokens"], a["rewards"], a["truncated"])]
    right = sorted(t for t, r, _ in lengths if r)
    print(f"truncated at the budget: {sum(c for *_, c in lengths) / len(lengths):.0%} of {len(lengths)} answers; "
          f"right answers: {len(right)}, median length {right[len(right) // 2] if right else float('nan')} tokens, "
          f"90th percentile {right[int(0.9 * (len(right) - 1))] if right else float('nan')}")
    plt.figure(figsize=(6, 2.6))
    plt.hist([[t for t, r, _ in lengths if r], [t for t, r, _ in lengths if not r]], bins=20, stacked=True,
             label=["right", "wrong"], color=["tab:green", "tab:grey"])
    plt.axvline(real["config"]["max_new_tokens"], color="k", ls=":", label="budget")
    plt.xlabel("answer length (tokens)")
    plt.ylabel("answers")
    plt.title("pre-pass answers by length")
    plt.legend()
    plt.tight_layout()
    plt.show()

# %% [markdown]
# Over all 128 candidates only 30% of groups of 8 would carry a signal (33% of groups of 16); over
# the kept questions 93% do. Doubling to $G = 16$ would buy 6 points more at twice the sampling cost
# per question, while $G = 4$ would lose 19, so $G = 8$ holds up, with the pre-pass doing most of the
# work. The budget is tight: 42% of the sampled answers ran into the 300 tokens. The right ones
# mostly fit (median 225 tokens), but their 90th percentile, 289, sits just under the limit, so some
# answers on their way to being right were probably cut off, how many this pre-pass cannot tell. A
# truncated answer earns a reward only if it already stated one, so the budget also pushes towards
# finishing sooner; the length curves below show what happened. (Greedy answers are tidier: at
# evaluation, with 512 tokens, 3.5% hit the limit.)
#
# **Pilot: learning rate.** The same command with `--lr 3e-6` and its own output folder, stopped
# after 6 steps (about 20 minutes at some 3 minutes a step); it reuses the main run's pre-pass and
# start evaluation, so it trains on the same 42 questions in the same order. Step 1 samples the same
# answers in both runs (same weights, same seeds); from step 2 on the policies differ. Six steps of
# 32 answers cannot rank learning rates by reward: with only 4 questions a step, the reward swings
# widely from one step to the next (left plot below). What we look at instead is whether the larger
# rate moves the policy faster away from the start (KL) and whether it collapses like chapter 5's
# $10^{-5}$ did (entropy, length, gradient norm).

# %%
pilot = load_run(PILOT_DIR, PILOT_RECORDS)
if SMOKE and pilot is None:
    pilot = real  # exercise the cell on the toy run
if pilot is None or real is None or not pilot["metrics"]:
    print(f"no learning-rate pilot recorded in {shown(PILOT_DIR)}")
else:
    steps = min(len(pilot["metrics"]), len(real["metrics"]))
    runs_compared = {f"lr {real['config']['lr']:g} (main run)": real["metrics"][:steps],
                     f"lr {pilot['config']['lr']:g} (pilot)": pilot["metrics"][:steps]}
    keys = ("reward_mean", "kl", "entropy", "grad_norm", "clip_fraction", "response_length")
    print(f"first {steps} steps, same seed, questions and samples at step 1; mean over the steps:")
    print(f"{'run':24}" + "".join(f"{key:>16}" for key in keys))
    for name, rows_ in runs_compared.items():
        print(f"{name:24}" + "".join(f"{sum(r[key] or 0 for r in rows_) / steps:16.4g}" for key in keys))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for name, rows_ in runs_compared.items():
        for ax, key in zip(axes, ("reward_mean", "kl", "entropy")):
            curve(ax, rows_, key, name, marker="o")
    for ax, title in zip(axes, ("reward (32 answers per step)", "KL to the start (k3, per token)", "entropy (nats)")):
        ax.set(title=title, xlabel="step")
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# Over the first 6 steps the two rates show no clear difference in reward (0.37 per step at
# $3 \times 10^{-6}$ against 0.39 at $10^{-6}$; untested, and well within the step-to-step swings of
# the left plot), and neither collapsed: entropy (0.27 against 0.28 nats), gradient norm (1.87
# against 1.84) and length (236 against 226 tokens) stay alike. (The clipped fraction is 0 in both by
# construction: with one update per batch the ratio is exactly 1, so it cannot show a difference
# here.) What differs is how fast the policy leaves the start: the KL to the reference averages
# 0.0038 per token over the six steps at $3 \times 10^{-6}$ against 0.0015 at $10^{-6}$, 2.5 times as
# much, and the middle plot shows the gap growing from step 3 on. The warm-up (5 steps) raises both
# rates until step 5, so only the last two of the six steps ran at the full rate: the pilot shows a
# three times larger rate stable through the warm-up and two steps beyond, no more. The main run kept
# its KL around 0.02 per token or below for all 32 steps (the curves below) without moving accuracy,
# so there is room to move further; whether that buys accuracy, six steps cannot say. A larger rate
# is the first change to try in the next run.
#
# %% [markdown]
# **Training curves**, per step from `metrics.jsonl`: reward, answer length and truncation, KL and
# entropy, and where each step's time went.

# %%
if real is None or not real["metrics"]:
    print("no training steps recorded yet")
else:
    rows = real["metrics"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6))
    curve(axes[0, 0], rows, "reward_mean")
    curve(axes[0, 0], rows, "zero_signal_fraction")
    axes[0, 0].legend()
    curve(axes[0, 1], rows, "response_length")
    axes[0, 1].set_ylabel("tokens")
    twin = axes[0, 1].twinx()
    curve(twin, rows, "truncation_rate")
    twin.set_ylabel("truncation rate")
    curve(axes[1, 0], rows, "kl")
    axes[1, 0].set_ylabel("KL to the start (per token)")
    twin = axes[1, 0].twinx()
    curve(twin, rows, "entropy")
    twin.set_ylabel("entropy (nats)", color="tab:orange")
    twin.get_lines()[0].set_color("tab:orange")
    for key in ("time_generation", "time_reference", "time_policy"):
        curve(axes[1, 1], rows, key, key.removeprefix("time_"))
    axes[1, 1].set_ylabel("seconds")
    axes[1, 1].legend()
    for ax in axes.flat:
        ax.set_xlabel("step")
    plt.tight_layout()
    plt.show()
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
    print(f"first {len(head)} vs last {len(tail)} steps: reward {mean(head, 'reward_mean'):.3f} -> "
          f"{mean(tail, 'reward_mean'):.3f}, length {mean(head, 'response_length'):.0f} -> "
          f"{mean(tail, 'response_length'):.0f}, truncated {mean(head, 'truncation_rate'):.0%} -> "
          f"{mean(tail, 'truncation_rate'):.0%}")
    step_time = [r["time_generation"] + r["time_reference"] + r["time_policy"] for r in rows if r["update"] == 0]
    print(f"mean step time {sum(step_time) / len(step_time):.1f} s: generation "
          f"{mean(rows, 'time_generation'):.1f} s, reference {mean(rows, 'time_reference'):.1f} s, "
          f"policy {mean(rows, 'time_policy'):.1f} s")

# %% [markdown]
# **Accuracy after each epoch**, on the same 200 held-out test questions (greedy, the chapter 3
# chain-of-thought prompt, at most 512 tokens), each compared with the start question by question:
# how many answers went wrong → right (*gained*) and right → wrong (*lost*), and the exact McNemar p of
# chapter 2. Also the answers' mean length, how many hit the token limit, and how many boxed their
# answer.

# %%
answers = {e["label"]: eval_answers(RECORDS, e["label"]) for e in real["evals"]} if real else {}
start_answers = answers.get("start")
if not start_answers:
    print("no per-question evaluation records (the toy task keeps none)")
else:
    start_by_id = {r["id"]: r for r in start_answers}
    print(f"{'eval':8} {'step':>4} {'accuracy':>9} {'95% CI':>16} {'gained':>6} {'lost':>5} {'p vs start':>10} "
          f"{'tokens':>6} {'truncated':>9} {'boxed':>6}")
    eval_rows = []
    for e in real["evals"]:
        recs = answers[e["label"]]
        if recs is None:
            continue
        assert [r["id"] for r in recs] == [r["id"] for r in start_answers]  # the same questions, in the same order
        now = [bool(r["correct"][0]) for r in recs]
        paired = compare_paired(now, [bool(start_by_id[r["id"]]["correct"][0]) for r in recs])
        gained, lost = paired["wins"], paired["losses"]
        row = {"label": e["label"], "step": e["step"], "n": len(recs), "accuracy": sum(now) / len(recs),
               "ci95": wilson_interval(sum(now), len(recs)), "gained": gained, "lost": lost,
               "p": paired["p_value"], "tokens": sum(r["tokens"][0] for r in recs) / len(recs),
               "truncated": sum(r["finish"][0] == "length" for r in recs) / len(recs),
               "boxed": sum(r["rules"][0] == "boxed" for r in recs) / len(recs)}
        eval_rows.append(row)
        print(f"{row['label']:8} {row['step']:4d} {row['accuracy']:9.1%} [{row['ci95'][0]:5.1%}, {row['ci95'][1]:5.1%}] "
              f"{gained:6d} {lost:5d} {row['p']:10.3f} {row['tokens']:6.0f} {row['truncated']:9.1%} {row['boxed']:6.1%}")
    assert all(math.isclose(r["accuracy"], e["accuracy"]) for r, e in zip(eval_rows, real["evals"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3))
    xs = [r["step"] for r in eval_rows]
    acc = [r["accuracy"] for r in eval_rows]
    axes[0].errorbar(xs, acc, yerr=[[a - r["ci95"][0] for a, r in zip(acc, eval_rows)],
                                    [r["ci95"][1] - a for a, r in zip(acc, eval_rows)]], marker="o", capsize=3)
    axes[0].set(xlabel="step", ylabel="accuracy", title=f"held-out accuracy, n={eval_rows[0]['n']} (95% Wilson)")
    axes[1].bar([x - 0.4 for x in xs[1:]], [r["gained"] for r in eval_rows[1:]], 0.8, color="tab:green", label="wrong → right")
    axes[1].bar([x + 0.4 for x in xs[1:]], [-r["lost"] for r in eval_rows[1:]], 0.8, color="tab:red", label="right → wrong")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xlabel="step", ylabel="questions", title="flips against the start")
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# **What the run did.** No significant difference in accuracy: 28.0% at the start, then 24.0%, 29.5%
# and again 28.0% after the three epochs (n = 200; against the start, exact McNemar p = 0.17, 0.68
# and 1.00; at the end 13 gained and 13 lost). The training reward of the last three steps (0.47)
# against the first three (0.43) is no evidence either way: 96 answers each, not to the same
# questions. At evaluation the answers' mean length went from 291 to 271 tokens, the truncated ones
# from 3.5% to 2.0% (7 and 4 of 200) and the boxed ones from 96.5% to 98.0%: small changes, not
# tested. The KL to the start stayed around 0.02 per token or below. So 32 steps at a learning rate
# of at most $10^{-6}$ did not measurably change what the model solves, yet they changed every greedy
# answer's wording: below, not one of the 200 final answers is the same text as at the start, and 26
# verdicts flipped, 13 each way. That churn is the noise floor any claimed gain must clear.

# %%
if start_answers and len(eval_rows) > 1:
    final_answers = answers[eval_rows[-1]["label"]]
    pairs = list(zip(start_answers, final_answers))
    flipped_up = [(a, b) for a, b in pairs if b["correct"][0] and not a["correct"][0]]
    flipped_down = [(a, b) for a, b in pairs if a["correct"][0] and not b["correct"][0]]
    same_text = sum(a["responses"][0] == b["responses"][0] for a, b in pairs)
    print(f"start -> {eval_rows[-1]['label']}: {same_text} of {len(pairs)} answers word for word the same; "
          f"{len(flipped_up)} wrong -> right, {len(flipped_down)} right -> wrong")
    for title, group in (("gained", flipped_up), ("lost", flipped_down)):
        if group:
            a, b = group[0]
            print(f"\n--- {title}: {a['id']} (gold {a['gold']}): start answered {a['extracted'][0]} in {a['tokens'][0]} "
                  f"tokens, now {b['extracted'][0]} in {b['tokens'][0]} tokens; the end of the new answer:")
            print(textwrap.indent(textwrap.fill(b["responses"][0][-400:], 100), "    "))

# %% [markdown]
# ### Does GRPO beat inference-time scaling?
#
# The book's question, asked on the problems where all three methods have records: chapter 3's
# first 200 test questions (its self-consistency run sampled 20 answers each; its first 10 are an
# N = 10 vote). The greedy chain of thought here is the GRPO run's own start evaluation: 28.0% on
# these 200, where chapter 3's greedy run of the same model and prompt got 28.5%. The two computed
# differently (float32 weights under bf16 autocast here, other batches), and in bf16 such differences
# can flip a near-tie between two tokens (chapter 1, section 4.2), after which a greedy answer takes
# another path.

# %%
from rlscratch.scaling import majority_vote
from rlscratch.verify import answers_match


def find_run(directory: Path, **settings) -> list[dict]:
    """The records of the recorded harness run in `directory` whose settings match, the one with most samples."""
    found = []
    for path in directory.glob("*.settings.json"):
        s = json.loads(path.read_text())
        if all(s.get(k) == v for k, v in settings.items()) and "stage" not in s:
            found.append((s["n"], path.with_name(path.name.replace(".settings.json", ".jsonl"))))
    return _read_jsonl(max(found)[1]) if found else []


SC_N = 10
chapter3 = results_dir() / "runs"
table_file = results_dir() / "results_table.json"
chapter3_rows = json.loads(table_file.read_text()).get("chapter03_gsm8k_first_200", {}) if table_file.exists() else {}
sc_row = next((row for name, row in chapter3_rows.items() if name.startswith("+ self-consistency")), None)
SC_TEMPLATE, SC_TEMPERATURE = (sc_row["template"], sc_row["temperature"]) if sc_row else ("step_by_step", 0.3)
print(f"chapter 3's self-consistency setting: template {SC_TEMPLATE}, T = {SC_TEMPERATURE}"
      + ("" if sc_row else " (chapter 3's table is missing: a default)"))
sampled = [r for r in find_run(chapter3, template=SC_TEMPLATE, temperature=SC_TEMPERATURE, weights=OFFLINE_SHA256)
           if len(r["extracted"]) >= SC_N]
if not (start_answers and len(eval_rows) > 1 and sampled):
    print("needs the run's evaluations and chapter 3's sampled answers")
else:
    final_by_id = {r["id"]: r for r in answers[eval_rows[-1]["label"]]}
    common = [r for r in sampled if r["id"] in final_by_id and r["id"] in start_by_id]
    votes = {r["id"]: answers_match(majority_vote(r["extracted"][:SC_N], logprobs=r["mean_logprob"][:SC_N]), r["gold"])
             for r in common}
    methods = {"+ chain of thought (greedy, start)": {i: bool(start_by_id[i]["correct"][0]) for i in votes},
               f"+ self-consistency (N={SC_N}, T={SC_TEMPERATURE})": votes,
               f"+ GRPO ({eval_rows[-1]['label']}, greedy)": {i: bool(final_by_id[i]["correct"][0]) for i in votes}}
    tokens = {"+ chain of thought (greedy, start)": [start_by_id[i]["tokens"][0] for i in votes],
              f"+ self-consistency (N={SC_N}, T={SC_TEMPERATURE})": [sum(r["tokens"][:SC_N]) for r in common],
              f"+ GRPO ({eval_rows[-1]['label']}, greedy)": [final_by_id[i]["tokens"][0] for i in votes]}
    n_common = len(votes)
    grpo_name = list(methods)[-1]
    print(f"the first {n_common} GSM8K test questions (chapter 3's), every method on the same questions")
    print(f"{'method':36} {'accuracy':>9} {'95% CI':>16} {'tokens/question':>15} {'GRPO gained':>11} {'lost':>5} {'p':>6}")
    for name, right in methods.items():
        k = sum(right.values())
        low, high = wilson_interval(k, n_common)
        line = f"{name:36} {k / n_common:9.1%} [{low:5.1%}, {high:5.1%}] {sum(tokens[name]) / n_common:15.0f}"
        if name != grpo_name:
            paired = compare_paired([methods[grpo_name][i] for i in votes], [right[i] for i in votes])
            line += f" {paired['wins']:11d} {paired['losses']:5d} {paired['p_value']:6.2f}"
        print(line)

# %% [markdown]
# On these 200 questions no method differs significantly from another. The trained model answered
# 28.0% right, exactly as many as greedy chain of thought at the start (13 gained, 13 lost, exact
# McNemar p = 1.00). Self-consistency answered 32.0%, and GRPO against it gained 10 and lost 18
# (p = 0.18). Self-consistency spent ten times the tokens of greedy decoding (2,886 against 291 per
# question; the trained model 271) for a lead that 200 questions cannot tell from chance: in chapter
# 3, against its own greedy run, it was 11 gained and 4 lost, p = 0.12. The 95% interval around 28.0%
# runs from 22.2% to 34.6%.
#
# ### Where a step's time goes
#
# Generation ran at 187 tokens/s, against 212 in the engine's benchmark (batch 32, 68-token prompts,
# 256 new tokens). The benchmark ran at another time, on a quiet machine, and the run's batches mix
# prompts and answers of uneven length, so read the two as the same order of magnitude, no more. The
# policy update, forward + backward + AdamW, took 65% of the run's time, the reference pass (forward
# only) 15%. The update's 45.8 tokens/s count completion tokens only, while the training benchmark
# counts prompt and completion tokens alike, a third of them prompt (128 of 384): its 71.2 tokens/s
# are about 47 completion tokens/s, close to the run's rate. The benchmark also says what to try next
# time: activation checkpointing (`--gradient-checkpointing`, not used by this run) trained at nearly
# the same speed (70.0 against 71.2 tokens/s) with a quarter less peak memory (12.5 against 16.5 GB).
# That leaves more headroom, but whether it would have spared the run its out-of-memory kills is
# untested; "Memory from step to step", below, measures the memory of each step and estimates what
# an epoch's end adds.

# %%
from rlscratch.results import REPO_ROOT

if real is None or not real["metrics"]:
    print("no training steps recorded yet")
else:
    first = [r for r in real["metrics"] if r["update"] == 0]
    phases = {"generation": sum(r["time_generation"] for r in first), "reference": sum(r["time_reference"] for r in first),
              "policy update": sum(r["time_policy"] for r in real["metrics"])}
    generated = sum(r["generated_tokens_per_s"] * r["time_generation"] for r in first if r["generated_tokens_per_s"])
    trained = sum(r["tokens_trained"] for r in real["metrics"])
    total = sum(phases.values())
    print(f"{len(first)} steps, {total / 60:.0f} min in all, {total / len(first) / 60:.2f} min per step "
          f"(median {sorted(r['time_generation'] + r['time_reference'] + r['time_policy'] for r in first)[len(first) // 2] / 60:.2f})")
    rates = {"generation": generated / phases["generation"], "reference": trained / phases["reference"],
             "policy update": trained / phases["policy update"]}
    what = {"generation": "generated tokens/s (32 answers per step, shared prefill)",
            "reference": "trained completion tokens/s (forward only)",
            "policy update": "trained completion tokens/s (forward + backward + AdamW)"}
    for name, seconds in phases.items():
        print(f"  {name:14} {seconds / total:4.0%} of the time, {rates[name]:6.1f} {what[name]}")
    bench = REPO_ROOT / "benchmarks" / "results"
    # the run was on a Zen 4 machine: set it beside the benchmarks measured there with the run's code of
    # 2026-11-24 (bench_train.json holds a later measurement with later code)
    if (bench / "bench_generate.json").exists() and (bench / "bench_train_zen4.json").exists():
        gen = {r["name"]: r["tokens_per_s"] for r in json.loads((bench / "bench_generate.json").read_text())["rows"]}
        tr = json.loads((bench / "bench_train_zen4.json").read_text())
        print(f"benchmarks on {tr['machine']}:")
        print(f"  generation, packed weights, batch 32: {gen.get('rlscratch KV cache + packed weights, batch 32')} tokens/s "
              f"(68-token prompts, 256 new tokens)")
        for name in ("rlscratch", "rlscratch + activation checkpointing", "transformers"):
            print(f"  training step, {name}: {tr['rows'][name]['tokens_per_s']:.1f} tokens/s, peak memory "
                  f"{tr['rows'][name]['peak_rss_GB']:.1f} GB ({tr['batch']} x {tr['prompt_tokens']} prompt + "
                  f"{tr['completion_tokens']} completion tokens, all counted)")

# %% [markdown]
# ### Each prompt once: the first steps re-timed
#
# The run above scored every answer in its own row, prompt included (the layout of chapter 5's
# `sequence_logprobs`). Section 6's `pack_answers` now writes each prompt once per micro-batch, with
# its answers after it. To see what that buys on the real model, the first 4 steps were run again
# with the packed layout, the same settings, seed and pre-pass, into another folder:
#
# ```bash
# python -m rlscratch.train --model offline:qwen2.5-coder-0.5b-instruct --preset grpo --task gsm8k \
#     --train-problems 128 --epochs 3 --prompts-per-step 4 --group-size 8 --max-new-tokens 300 \
#     --lr 1e-6 --save-every 100 --eval-problems 0 --no-eval-at-start --steps 4 \
#     --output-dir ~/.cache/rlscratch/runs/grpo-gsm8k-packed --seed 0 --wandb-mode disabled
# ```
#
# (its folder started with a copy of the main run's `prepass.json`, so it trains on the same
# questions in the same order). The answers are sampled again, by today's engine, so they are not
# the same answers: compare per trained token as well as per step.
#
# Step 1 is the clean comparison: the same starting weights and seed gave the very same 32 answers
# (8,115 answer tokens in both runs), and packing cut its reference pass from 36.5 to 34.6 s and its
# policy update from 166.7 to 155.4 s: 241 s became 233 s, 3% of the step. Over the 4 steps, per
# trained answer token, the reference pass ran 1.26 times and the update 1.19 times as fast, but
# steps 2-4 sampled other answers (the weights after step 1 differ by float rounding, enough to
# change some samples), so those ratios mix packing with different workloads. The gain is smaller
# than the token count suggests (a packed micro-batch here has about 30% fewer positions) for two
# reasons. The vocabulary head works on answer tokens only, so it costs the same in both layouts; in
# a `torch.profiler` trace of one packed micro-batch (not shown here) its log-softmax, forward and
# backward, took about a third of the CPU time. And a packed row's attention spans the whole row
# (about 1,100 positions for 4 answers of about 250 tokens) where each separate row spanned about 400.
# `benchmarks/bench_packing.py` measures the same two layouts side by side on one fixed workload
# (README, "Training"). The goal for a step of 32 answers, at most 3 minutes, is still not met: the
# median of these 4 steps is 181 s, and the two steps that trained all 32 answers took 233 and 200 s.

# %%
import statistics

PACKED_DIR = Path(os.environ.get("RLSCRATCH_GRPO_PACKED", cache_dir() / "runs" / "grpo-gsm8k-packed"))
PACKED_RECORDS = WORK / "packed-records" if SMOKE else results_dir() / "grpo-gsm8k-packed"
packed_run = load_run(PACKED_DIR, PACKED_RECORDS)
if real is None or packed_run is None:
    print(f"no re-timed steps in {shown(PACKED_DIR)} or {shown(PACKED_RECORDS)}: run the command above")
else:
    def step_times(metrics):
        return [(r["sequences_trained"], r["tokens_trained"], r["time_generation"], r["time_reference"],
                 r["time_policy"]) for r in metrics if r["update"] == 0]

    before, after = step_times(real["metrics"])[:len(packed_run["metrics"])], step_times(packed_run["metrics"])
    print("step | answers trained | answer tokens | generation s | reference s | policy s | step s   (separate rows -> packed)")
    for k, (b, a) in enumerate(zip(before, after), 1):
        print(f"{k:4} | {b[0]:3} -> {a[0]:3} | {b[1]:5} -> {a[1]:5} | {b[2]:5.1f} -> {a[2]:5.1f} | "
              f"{b[3]:5.1f} -> {a[3]:5.1f} | {b[4]:6.1f} -> {a[4]:6.1f} | {sum(b[2:]):6.1f} -> {sum(a[2:]):6.1f}")
    for name, i in (("reference", 3), ("policy", 4)):
        rate_b = sum(b[1] for b in before) / sum(b[i] for b in before)
        rate_a = sum(a[1] for a in after) / sum(a[i] for a in after)
        print(f"{name:9}: {rate_b:5.1f} -> {rate_a:5.1f} trained answer tokens/s ({rate_a / rate_b:.2f}x)")
    full = [sum(a[2:]) for a in after if a[0] == 32]
    print(f"packed steps: median {statistics.median(sum(a[2:]) for a in after):.0f} s; those training all 32 "
          f"answers: {', '.join(f'{t:.0f}' for t in full) or 'none'} s (the goal: at most 180 s)")

# %% [markdown]
# ### The memory allocator: the same steps under tcmalloc
#
# A profile of a packed micro-batch pointed at the vocabulary head's log-softmax. The measurements
# below point elsewhere, at a cost a profiler
# charges to whichever operator first touches new memory: page faults. A step allocates and frees the
# same large tensors over and over (one 256-token chunk of the head's 152k-wide logits is 78 MB in
# bf16, 156 MB in float32), and glibc's `malloc` serves each block above 32 MB with a fresh `mmap` and
# hands it back with `munmap`, so the kernel maps and zeroes those pages again every time. `benchmarks/bench_allocator.py` runs the same scoring work (the
# packed reference and policy passes of one 32-answer step, then AdamW) in three processes that differ
# only in the allocator, chosen with `LD_PRELOAD`, one run each: glibc took 22 million minor page
# faults, tcmalloc (which keeps freed pages for reuse) 2.5 million, and the work ran 1.40 times as fast
# (168.9 → 121.0 s in all: policy pass 131 → 91 s, reference 29.8 → 25.3 s, AdamW 7.9 → 4.5 s;
# identical log-probs; README, "Performance"). jemalloc with its default settings took 37 million
# faults and was no faster (0.93×; one run, and `bench_train.py`'s two rounds differed by up to 12%
# on this machine). The real steps below are the second measurement. The speedup needs no change to the training
# code, only to how the process is started,
#
# ```bash
# LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m rlscratch.train ...
# ```
#
# (Debian's `libtcmalloc-minimal4`). The first 4 steps of the run again, with the command of the
# previous subsection under tcmalloc, into another folder (again with a copy of the main run's
# `prepass.json`):

# %%
def compare_steps(before_metrics: list[dict], after_metrics: list[dict], label: str) -> None:
    """Print two runs of the same steps side by side: per-step phase times, phase totals, whether the runs did
    the same work (answer tokens, rewards, losses, gradient norms), and the step times against the goal."""
    before = [r for r in before_metrics if r["update"] == 0]
    after = [r for r in after_metrics if r["update"] == 0]
    phases = ("time_generation", "time_reference", "time_policy")
    print(f"step | answers trained | answer tokens | generation s | reference s | policy s | step s   ({label})")
    for k, (b, a) in enumerate(zip(before, after), 1):
        cells = " | ".join(f"{b[p]:5.1f} -> {a[p]:5.1f}" for p in phases)
        print(f"{k:4} | {b['sequences_trained']:3} -> {a['sequences_trained']:3} | {b['tokens_trained']:5} -> "
              f"{a['tokens_trained']:5} | {cells} | {sum(b[p] for p in phases):6.1f} -> {sum(a[p] for p in phases):6.1f}")
    for p in phases:
        total_before, total_after = sum(b[p] for b in before), sum(a[p] for a in after)
        print(f"{p[5:]:10}: {total_before:6.1f} -> {total_after:6.1f} s over {len(after)} steps "
              f"({total_before / total_after:.2f}x)")
    same = all(b[k] == a[k] for b, a in zip(before, after) for k in ("tokens_trained", "reward_mean", "loss", "grad_norm"))
    close = all(b["tokens_trained"] == a["tokens_trained"] and b["reward_mean"] == a["reward_mean"]
                and abs(b["grad_norm"] - a["grad_norm"]) <= 0.02 * b["grad_norm"] for b, a in zip(before, after))
    print(f"same answer tokens, rewards, losses and gradient norms at every step: {same}"
          + ("" if same else f"; same answer tokens and rewards, gradient norms within 2%: {close}"))
    step_seconds = [sum(a[p] for p in phases) for a in after]
    full = [t for t, a in zip(step_seconds, after) if a["sequences_trained"] == 32]
    print(f"{label.split(' -> ')[-1]} steps: median {statistics.median(step_seconds):.0f} s; those training all 32 "
          f"answers: {', '.join(f'{t:.0f}' for t in full) or 'none'} s (the goal: at most 180 s)")
    machines = {r.get("machine", "not recorded") for r in before + after}
    print("machine:", "; ".join(sorted(machines)))


# %%
TCMALLOC_DIR = Path(os.environ.get("RLSCRATCH_GRPO_TCMALLOC", cache_dir() / "runs" / "grpo-gsm8k-tcmalloc"))
TCMALLOC_RECORDS = WORK / "tcmalloc-records" if SMOKE else results_dir() / "grpo-gsm8k-tcmalloc"
tcmalloc_run = load_run(TCMALLOC_DIR, TCMALLOC_RECORDS)
if packed_run is None or tcmalloc_run is None:
    print(f"no tcmalloc steps in {shown(TCMALLOC_DIR)} or {shown(TCMALLOC_RECORDS)}: run the command above")
else:
    compare_steps(packed_run["metrics"], tcmalloc_run["metrics"], "glibc -> tcmalloc")

# %% [markdown]
# The allocator changes no number the model computes, and here it did not even change a sample: the
# two runs have the same answer-token counts, rewards, losses and gradient norms at every step (checked
# above), so this is a side-by-side comparison of the same work. Step 1 went from 233 to 191 s (its
# policy update from 155 to 119 s), step 2 from 201 to 151 s, and the median of the four from 181 to
# 138 s. Three of the four steps met the 3-minute goal; the heaviest, step 1 with 8,115 answer tokens,
# is still 11 s over it. Over the four steps the policy update ran 1.38 times as fast, generation 1.08
# and the reference pass 1.09 times (in step 1 the reference pass barely changed, 34.6 → 33.7 s,
# where the benchmark saw 1.18×). The command line now restarts itself under tcmalloc when the library is installed
# (`allocator_environment`, in the exported cell of section 10; `RLSCRATCH_MALLOC=system` keeps
# glibc), so the run's own command gets the faster allocator without remembering `LD_PRELOAD`.

# %% [markdown]
# ### Less memory: lean backward passes
#
# One more change cuts the memory a step holds, not its arithmetic. Chapter 1's model now keeps less
# for the backward pass: `RMSNormFunction` keeps its input and one number per row, and `SwiGLUDown`
# keeps the MLP's gate/up output and rebuilds `silu(gate) * up` in the backward pass instead of
# storing it (with its `silu`): about half of an MLP's saved activations, the widest ones in a block.
# (The run below still used PyTorch's default AdamW; the fused one of section 2 came next.)
#
# The tcmalloc runs above were timed on a Zen 4 machine. This session landed on a **Zen 5** (AMD
# family 26, twice the bf16 matrix throughput), so both sides of this comparison were run there, one
# after the other, with the same command, seed and pre-pass: first with the code as it was before
# this change (tcmalloc already in), then with it.

# %%
LEAN_BEFORE_DIR = Path(os.environ.get("RLSCRATCH_GRPO_LEAN_BEFORE", cache_dir() / "runs" / "zen5-before"))
LEAN_DIR = Path(os.environ.get("RLSCRATCH_GRPO_LEAN", cache_dir() / "runs" / "zen5-after"))
lean_before = load_run(LEAN_BEFORE_DIR, WORK / "lean-before-records" if SMOKE else results_dir() / "grpo-gsm8k-zen5-before")
lean_run = load_run(LEAN_DIR, WORK / "lean-records" if SMOKE else results_dir() / "grpo-gsm8k-zen5-lean")
if SMOKE and lean_run is None and tcmalloc_run is not None:  # the test suite: exercise the cell on any two runs
    lean_before, lean_run = tcmalloc_run, tcmalloc_run
if lean_before is None or lean_run is None:
    print(f"no runs in {shown(LEAN_BEFORE_DIR)} and {shown(LEAN_DIR)}: run the command above in both")
else:
    compare_steps(lean_before["metrics"], lean_run["metrics"], "before -> lean")

# %% [markdown]
# Step 1 is again the clean comparison: both runs sampled the same 32 answers (8,115 answer tokens)
# and computed the same loss (gradient norms 2.0225 and 2.0223: the rebuilt products round a little
# differently in bfloat16). It did not get faster: 104.8 s before, 108.9 s after,
# its policy update 67.1 then 69.8 s. Generation, whose code did not change, also took 3% longer
# (21.8 then 22.4 s), and this machine's timings drift by up to a tenth between runs, so the change
# costs at most a few percent of speed, if anything; rebuilding `silu(gate) * up` is two element-wise
# operations per layer, small next to the matrix products. From step 2 on the runs sampled other
# answers (the rebuilt products round differently, so the weights after step 1 differ in their last
# bits), and those steps compare different work. What the change bought is memory: in the training
# benchmark (`benchmarks/bench_train.py`, 8 sequences of 384 tokens, same machine, tcmalloc on both
# sides) the step's peak fell from 15.1 to 12.9 GB: headroom for larger micro-batches or longer
# answers. With activation checkpointing it stayed at 12.0 GB, because there the peak is set by
# AdamW's full-size temporaries in the optimizer step, after the activations are gone. On this Zen 5 machine every step
# of the run, the heaviest included, takes well under the 3-minute goal; on the Zen 4 machine of the
# run, the heaviest step's 191 s (tcmalloc, above) is what was measured, and this change was not timed
# there.

# %% [markdown]
# ### Fewer attention scores, kept head logits, AdamW in one pass
#
# Three changes aimed at speed came after it, each checked for equal results where it is introduced:
#
# * chapter 1's `KeyBlocks` cuts attention into blocks of 128 queries, each scored against only the
#   keys it may see: for a packed micro-batch row here (a prompt of a hundred-odd tokens, then four
#   answers of up to 300) that is about a third of the scores the whole mask computes, in the policy
#   update and the reference pass alike (generation uses the KV cache and is untouched);
# * chapter 5's `HeadLogprobs` keeps the vocabulary head's bfloat16 logits for the backward pass
#   instead of recomputing them: the head's forward product, a quarter of its matrix work in the
#   update (forward, recomputation, two backward products), is no longer run twice;
# * the optimizer is the fused AdamW of section 2.
#
# The first 4 steps once more, same machine, command, seed and pre-pass, against the lean run above:

# %%
SPEED_DIR = Path(os.environ.get("RLSCRATCH_GRPO_SPEED", cache_dir() / "runs" / "zen5-speed"))
speed_run = load_run(SPEED_DIR, WORK / "speed-records" if SMOKE else results_dir() / "grpo-gsm8k-zen5-speed")
if SMOKE and speed_run is None and lean_run is not None:  # the test suite: exercise the cell on any two runs
    speed_run = lean_run
if lean_run is None or speed_run is None:
    print(f"no runs in {shown(LEAN_DIR)} and {shown(SPEED_DIR)}: run the command above in both")
else:
    compare_steps(lean_run["metrics"], speed_run["metrics"], "lean -> faster")

# %% [markdown]
# Step 1 is the clean comparison again: the same 32 answers (8,115 tokens) and rewards; the gradient
# norm differs in the fourth digit (2.0223 against 2.0211), because blocks and kept logits round
# differently in bfloat16. It took 93.4 s instead of 108.9 s: the policy update 69.8 → 58.4 s, the
# reference pass 16.7 → 12.9 s, while generation, the unchanged control, took 22.4 → 22.2 s. So the
# three changes bought a sixth of the policy update, nearly a quarter of the reference pass and a
# seventh of the step. The reference pass computes no gradients and takes no optimizer step, so its
# share is `KeyBlocks`' alone. In memory, the training benchmark (`benchmarks/bench_train.py`, same
# machine) peaked at 13.5 GB with this code without activation checkpointing, 0.6 GB above the lean code's 12.9
# GB: the kept bfloat16 logits of its 2,048 answer tokens (2,048 × 151,936 × 2 bytes); with
# checkpointing, where the optimizer step sets the peak, 11.0 GB instead of 12.0 GB, the unfused
# AdamW's temporaries gone. (Two later refinements in chapters 1 and 5, the head's softmax work done
# row by row in cache and the SwiGLU gradient written in place, brought that peak to 13.1 GB; the
# README's Training table has the current figures.) Later steps sampled other answers (about the same number of tokens, 25,192
# against 25,537 over the four steps), and over the four the policy update ran 1.18 times and the
# reference pass 1.23 times as fast. On this Zen 5 machine the heaviest step now takes 93 s. The
# Zen 4 machine of the main run was not available to time it again: there its heaviest step measured
# 191 s before these changes (tcmalloc, above). The next subsection times it there.

# %% [markdown]
# ### Back on the Zen 4 machine
#
# A later session landed on a Zen 4 machine again (AMD family 25, the kind that ran the main run
# and the tcmalloc comparison above), so the question left open can be answered where it was asked.
# The same 4 steps, same command, seed and pre-pass, with today's code (the lean backward passes and
# the three speed changes above), against the tcmalloc run of the same machine kind:

# %%
ZEN4_DIR = Path(os.environ.get("RLSCRATCH_GRPO_ZEN4", cache_dir() / "runs" / "zen4-speed"))
zen4_run = load_run(ZEN4_DIR, WORK / "zen4-records" if SMOKE else results_dir() / "grpo-gsm8k-zen4-speed")
if SMOKE and zen4_run is None and tcmalloc_run is not None:  # the test suite: exercise the cell on any two runs
    zen4_run = tcmalloc_run
if tcmalloc_run is None or zen4_run is None:
    print(f"no runs in {shown(TCMALLOC_DIR)} and {shown(ZEN4_DIR)}: run the command above in both")
else:
    compare_steps(tcmalloc_run["metrics"], zen4_run["metrics"], "tcmalloc, 2026-11-25 -> today's code")

# %% [markdown]
# Step 1 is the clean comparison once more: the same 32 answers (8,115 tokens) and reward (0.344),
# with gradient norms 2.0225 and 2.0212 (the new code rounds a little differently in bfloat16). It
# took 162.7 s instead of 190.6 s: the policy update 118.7 → 96.3 s, the reference pass 33.7 → 25.1 s.
# Generation, whose code did not change, took 41.4 s against 38.2 s, 8% slower: this is another
# virtual machine on another day, which is why the benchmarks of this book always time the two sides
# in one run. Steps 2-4 sampled other answers (step 3 trained all 32, 7,410 tokens, where the earlier
# run had a zero-signal group and trained 24 answers, 4,917 tokens), so their times compare different
# work; per trained token
# over the four steps, the update took 11.2 ms against 13.9 ms and the reference pass 3.1 ms against
# 3.7 ms. The question left open above has its answer: on the Zen 4 machine too, every one of the
# four steps now takes less than 3 minutes, the heaviest 163 s, against 93 s on the Zen 5.

# %% [markdown]
# ### Memory from step to step
#
# The main run was killed twice by the out-of-memory killer (above), and memory that grows from
# step to step was the suspect. Since then every step's record holds the process's resident memory
# after the step (`rss_GB`) and its highest so far (`peak_rss_GB`), and the same command ran 8 steps
# on the Zen 4 machine (`--steps 8`, another folder, the same pre-pass) to watch them. Under tcmalloc
# freed memory stays with the process for reuse, so the memory after a step is close to the highest
# the process has needed so far:

# %%
MEMORY_DIR = Path(os.environ.get("RLSCRATCH_GRPO_MEMORY", cache_dir() / "runs" / "zen4-memory"))
memory_run = load_run(MEMORY_DIR, WORK / "memory-records" if SMOKE else results_dir() / "grpo-gsm8k-zen4-memory")
if SMOKE and memory_run is None:  # the test suite: exercise the cell on the toy run
    memory_run = read_run(WORK / "toy-straight")
if memory_run is None or memory_run["metrics"][0].get("rss_GB") is None:
    print(f"no run with memory records in {shown(MEMORY_DIR)}: run the command above with --steps 8")
else:
    rows_ = [r for r in memory_run["metrics"] if r["update"] == 0]
    print(f"{'step':>4} {'answers':>7} {'tokens':>6} {'step s':>7} {'memory GB':>9} {'highest GB':>10}")
    for r in rows_:
        print(f"{r['step']:4d} {r['sequences_trained']:7d} {r['tokens_trained']:6d} "
              f"{r['time_generation'] + r['time_reference'] + r['time_policy']:7.1f} {r['rss_GB']:9.1f} "
              f"{r['peak_rss_GB']:10.1f}")
    print("machine:", rows_[0]["machine"])
    fig, ax = plt.subplots(figsize=(5, 2.6))
    curve(ax, rows_, "rss_GB", "after the step", marker="o")
    curve(ax, rows_, "peak_rss_GB", "highest so far", ls=":")
    ax.set(xlabel="step", ylabel="GB", title="the training process's resident memory", ylim=(0, None))
    ax.legend(loc="lower right", fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# Memory rises twice and then stays flat. After step 1 the process holds 15.3 GB, AdamW's two averages
# (8 bytes a parameter, 5.0 GB) included: the first optimizer step creates them at the end of step 1,
# after its backward pass, partly in memory the allocator had kept from that pass. Step 2's backward
# pass is the first to run beside them, hence 18.5 GB, 3.2 GB more and not 5.0. A further 0.6 GB came
# with step 4 (which trained fewer tokens than step 3: a new pattern of block sizes for the allocator,
# most likely, though nothing here shows it), and from there to step 8 nothing grew. So 8 steps show
# no leak, only a working set of about 19 GB at the peak of a step: 2.5 GB each for the policy's
# weights, its gradients and the frozen reference, 5.0 GB for AdamW, 1.3 GB for the reference's
# packed bfloat16 copy, the rest activations and the allocator's reserve.
#
# The main run did more than these steps: at each epoch's end it evaluated, exported the model and
# wrote a checkpoint, and those moments hold tensors a step does not: the evaluation's packed copies
# of the policy (1.3 GB), kept until the next step's sampling, and the export's copy of every weight
# (2.5 GB in float32). With a step's activations gone by then, that is about 18 GB of tensors, less
# than a step's peak, so by this count the epoch's end should not have overflowed this machine
# (25 GB, 23.5 GiB) either; the main run's kills stay unexplained. It ran older code under glibc's
# allocator, which this run does not reproduce, and no record says where the kills struck; the next
# long run records its memory at every step. Both extra copies are gone all the same: `export_hf`
# now copies only the q/k/v and gate/up slices of the fused weights, which the file format needs as
# tensors of their own (0.9 GB; in a separate measurement, not stored here, the same export left the
# process 0.9 GB larger under tcmalloc instead of 2.5 GB), and the loop frees the packed copies before
# exporting.
#
# The timings agree with the run above: steps 1-4 sampled the very same answers as there (the same
# token counts) and took 4-12% longer (step 1: 169 s against 163 s), this machine's drift from one
# run to the next; the heaviest new step, step 7 with 7,915 answer tokens, took 163 s.

# %% [markdown]
# ### On a GPU
#
# Everything above runs unchanged on one GPU with `--device cuda`: bf16 autocast with float32
# master weights, the same checkpoints and records. With the memory and speed of a single modern
# GPU the run would use **Qwen2.5-1.5B-Instruct** (`--model Qwen/Qwen2.5-1.5B-Instruct`, or the
# Math variant), **the full GSM8K training set** (7,473 questions: `--train-problems` unset, the
# pre-pass over all of them), 16 questions × 8 answers per step with a 512-token budget
# (`--prompts-per-step 16 --max-new-tokens 512 --generation-batch-size 128 --micro-batch-size 16`),
# and evaluation on all 1,319 test questions (`--eval-problems 1319`). Full fine-tuning of 1.5B
# parameters with AdamW needs about 1.5 × 10⁹ × 16 bytes ≈ 24 GB for weights, gradients and optimizer
# state, plus the frozen reference (6 GB) and activations, which fits a 40-80 GB card. These are
# the settings one GPU would use; this book's recorded numbers come from the CPU.
#
# What such a run costs, estimated from rates measured on an NVIDIA H100 80GB with random weights of
# the real shapes (`benchmarks/bench_gpu.py`, stored in `benchmarks/results/bench_gpu.json`): for
# Qwen2.5-1.5B our engine generated 1,770 tokens/s at batch 64 (`transformers`: 2,120) and trained at
# 16,400 tokens/s with 33 GB peak (`transformers`: 14,000 tokens/s, 39 GB). A step of 16 × 8 answers
# of up to 512 tokens is then about 35-40 s of generation and about 5 s of reference and policy
# passes, so roughly 45 s per step. A pre-pass of 4 answers for each of the 7,473 training questions
# (about 12 M tokens) takes about 2 hours at batch 64; if, as here, about a third of the questions
# are kept, an epoch is about 155 steps, 2 hours. These are estimates from component rates, not a
# measured run. For several GPUs or machines, see section 13.

# %% [markdown]
# ## 13. Scaling out: several GPUs, several machines
#
# On one GPU the loop above is limited by generation: a step samples $P \times G$ answers one
# token at a time, and the update waits for them. The standard way to go faster is **data
# parallelism**: $N$ processes, one per GPU, each holding the model, each sampling and training on
# $1/N$ of the step's questions, with the gradients combined before every optimizer step. PyTorch
# starts the processes with `torchrun`, which tells each its rank; the loop needs no other launcher.
# What changes, all built in sections 5, 6 and 9:
#
# * the $P$ questions of a step are split into $N$ contiguous shares; every group of $G$ answers is
#   sampled by one process, with the seed derived from (run seed, step, position, question), so
#   the answers are the ones a single process would have drawn;
# * every process then receives every group: rewards, advantages, the batch normaliser and the
#   logged statistics are those of the whole batch (DAPO's refill decisions too);
# * each process trains on the answers of its own groups; gradients are **summed** over processes
#   (DDP's all-reduce, or FSDP's reduce-scatter), and processes that run out of micro-batches run
#   zero-weight stand-ins, so that all take part in every exchange;
# * rank 0 alone runs the pre-pass and the evaluations, and writes `metrics.jsonl`, wandb,
#   checkpoints and exports; every process reads the checkpoint when the run resumes, so the run
#   folder must be visible to all of them (on several machines, a shared file system).
#
# The result: with the same `--prompts-per-step` and seed, $N$ processes compute the run one
# process computes, up to the order in which floats are added. Checkpoints hold full tensors in
# the one-process format, so a run may be resumed by another number of processes, or switch
# between DDP and FSDP.
#
# **Commands.** One GPU, then 8 GPUs of one machine, then 2 machines of 8 GPUs (the same command
# on each, `K` = 0 on the first and 1 on the second; `HOST0` is the first machine's address). Keep
# `--prompts-per-step` a multiple of the number of processes, or some of them idle during sampling:
#
# ```bash
# python -m rlscratch.train --device cuda --model Qwen/Qwen2.5-1.5B-Instruct --task gsm8k \
#     --prompts-per-step 16 --group-size 8 --max-new-tokens 512 --generation-batch-size 128 \
#     --micro-batch-size 16 --eval-problems 1319 --output-dir runs/gsm8k-1.5b
# torchrun --nproc_per_node 8 -m rlscratch.train --device cuda --model Qwen/Qwen2.5-1.5B-Instruct \
#     --task gsm8k --prompts-per-step 64 ... --output-dir /shared/runs/gsm8k-1.5b
# torchrun --nnodes 2 --node_rank K --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \
#     -m rlscratch.train --device cuda ... --prompts-per-step 128 --output-dir /shared/runs/gsm8k-1.5b
# ```
#
# Rerunning the same command resumes the run. The processes talk over NCCL between GPUs and gloo
# between CPUs (chosen from `--device`); `torchrun --nproc_per_node 2 -m rlscratch.train --model
# tiny-random --task toy ...` runs the toy task on two CPU processes, as below.
#
# **Memory.** With DDP (the default under `torchrun`) every process holds what one process holds:
# float32 weights (4 bytes per parameter), their gradients (4), AdamW's two averages (8) and, with a
# KL term, the float32 reference (4): about 20 bytes per parameter, 10 GB for 0.5B parameters,
# 30 GB for 1.5B, 140 GB for 7B, plus activations and the generation cache. `--fsdp` shards all of
# these (FSDP2's `fully_shard`, one unit per transformer block): $20/N$ bytes per parameter stay on
# each process. Three things are still whole, one at a time: each process loads the model
# whole before sharding it; sampling and scoring gather the whole float32 policy, or reference, for
# their duration (4 bytes per parameter, because the number of forward passes differs between
# processes and FSDP needs them equal); and rank 0 evaluates and exports from a gathered copy.
# Checkpoints are written whole by rank 0 and read whole by every process into CPU memory. So FSDP
# here fits models whose *training state* is too big for one GPU but whose weights are not (7B on
# 8 × 80 GB GPUs: about 18 GB of shards plus 28 GB of gathered weights per GPU); it does not shard
# generation.
#
# **Speed.** Generation and the update each take about $1/N$ of one process's time (each process
# samples $P/N$ questions and trains on their answers), plus one exchange of gradients per optimizer
# step: a ring all-reduce moves about $2 \times 4$ bytes per parameter in and out of every GPU, some
# 4 GB for 0.5B parameters, milliseconds over NVLink but a noticeable part of a step between
# machines. A step lasts as long as its slowest process (the one with the longest answers). Not sped
# up: the pre-pass and the evaluations, which rank 0 runs alone while the others wait. FSDP adds an
# all-gather of each block's weights for every forward and backward pass, so it is slower than DDP
# where DDP fits. None of this has been measured on GPUs for this book (there was none to measure
# on); the tests run two CPU processes with gloo: DDP and FSDP against one process, and a run killed
# under `torchrun` and resumed.
#
# **Check: one process against two.** The toy run of section 11 (grpo preset, micro-batches of 4,
# `SCALE_STEPS` steps) on one process, on two with DDP, and on two with FSDP, each launched as a
# terminal command. The rewards must be identical at every step, because the answers are; the
# weights agree to rounding, except for one kind of weight explained below. One caveat: weights equal
# up to rounding give the same sample only when the random draw is not within rounding of the
# boundary between two tokens. A draw that is can go either way, and two runs part from that step on.
# With this toy's large learning rate that is not rare: seeds 1, 2 and 4 met such a draw within 8
# steps (inputs, weights and reference log-probs equal up to it), seeds 0 and 3 did not. Since chapter
# 1's RMSNorm and SwiGLU got hand-written backward passes, which round a little differently, seed 3
# meets one at step 8 under FSDP (same rewards, other answers, weights 7e-4 apart after it). Since
# chapter 5's vocabulary head got its hand-written float32 backward pass (which sums the head weight's
# gradient in another order), seed 0 meets one at step 2 and seed 3 at step 5 (DDP), seed 7 at step 6
# (FSDP); seeds 5, 8, 9 and 10 keep the same rewards but their losses part at step 2 or 3; seed 6
# meets none within the test suite's 8 steps, DDP and FSDP alike, but in 7 steps of this check it
# kept equal rewards while the weights parted (9e-3). This check uses seed 6 and 4 steps.

# %%
import socket
import subprocess
import sys

from safetensors.torch import load_file

import rlscratch


def toy_command(folder: str, processes: int, *extra: str) -> list[str]:
    """The toy run as a command: a plain process, or `processes` processes under torchrun on a free port."""
    launcher = [sys.executable]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                     "--master_port", str(port)]
    return [*launcher, "-m", "rlscratch.train", "--model", "tiny-random", "--task", "toy", "--preset", "grpo",
            "--steps", str(SCALE_STEPS), "--seed", "6", "--lr", "0.005", "--dtype", "float32", "--micro-batch-size", "4",
            "--eval-problems", "4", "--wandb-mode", "disabled", "--output-dir", str(WORK / folder), *extra]


env = {**os.environ, "OMP_NUM_THREADS": "1",  # one thread per process; the same rlscratch as this notebook
       "PYTHONPATH": os.pathsep.join([str(Path(rlscratch.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
scaled = {}
for name, folder, processes, extra in (("1 process", "scale-1", 1, ()), ("2 processes, DDP", "scale-2", 2, ()),
                                       ("2 processes, FSDP", "scale-2-fsdp", 2, ("--fsdp",))):
    done = subprocess.run(toy_command(folder, processes, *extra), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_run(WORK / folder)["metrics"]
    step_time = sorted(r["time_generation"] + r["time_reference"] + r["time_policy"] for r in rows)[len(rows) // 2]
    scaled[name] = dict(rows=rows, weights=load_file(str(WORK / folder / "final" / "model.safetensors")),
                        step_time=step_time)
    print(f"{name:18}: rewards {[r['reward_mean'] for r in rows]}; median step {step_time:.2f} s")

# %% [markdown]
# The weights. The **key-projection biases** are the one exception to agreement: a bias added to
# every key raises all of a query's attention scores by the same amount, which the softmax ignores,
# so their true gradient is exactly 0 and the computed one is rounding noise. AdamW divides each
# gradient entry by its own running size (plus $\epsilon = 10^{-8}$), so it turns that noise into
# steps of up to the learning rate, and a different order of summation gives different noise. These
# biases cannot change any output, which the logits of the exported models confirm.

# %%
one = scaled["1 process"]
start = hf_state_dict(tiny)  # the starting weights, as the exported folders name them
moved = max((one["weights"][k] - start[k]).abs().max().item() for k in start)
prompts = torch.tensor([tiny_tok.encode(f"Name {topic} in one word.") for topic in ("a fruit", "a city")])


def final_logits(folder: str) -> torch.Tensor:
    with torch.no_grad():
        return load_model(WORK / folder / "final", dtype=torch.float32)[0](prompts)


for name, folder in (("2 processes, DDP", "scale-2"), ("2 processes, FSDP", "scale-2-fsdp")):
    other = scaled[name]
    assert [r["reward_mean"] for r in other["rows"]] == [r["reward_mean"] for r in one["rows"]]
    diffs = {k: (one["weights"][k] - other["weights"][k]).abs().max().item() for k in start}
    rest = max(v for k, v in diffs.items() if "k_proj.bias" not in k)
    biases = max(v for k, v in diffs.items() if "k_proj.bias" in k)
    logits = (final_logits("scale-1") - final_logits(folder)).abs().max().item()
    print(f"{name}: identical rewards; max |weight difference| {rest:.1e} (key biases {biases:.1e}); "
          f"max |logit difference| {logits:.1e}; the training moved weights by up to {moved:.1e}")
    assert rest < 1e-5 and logits < 1e-4
times = {name: r["step_time"] for name, r in scaled.items()}
print("median seconds per step:", {k: round(v, 2) for k, v in times.items()})

# %% [markdown]
# On this machine the two processes share two CPU cores (with whatever else runs there), and each
# step of the toy task is milliseconds of arithmetic under seconds of fixed costs, so the step times
# above say nothing about speed: they show what the processes cost in exchanges and stand-ins, not
# what $N$ GPUs gain. The claim this check supports is the other one: the same samples, the same
# rewards and the same update, whatever the number of processes.

# %% [markdown]
# ## 14. The book's results table: the first 500 GSM8K test questions
#
# Every comparison so far rested on 200 questions or fewer, and on 200 questions a 95% interval is
# about ±6 points wide: the 3-4 point leads we saw (self-consistency over greedy decoding, in chapter 3
# and in section 12) could not be told from chance. The book closes with one table measured on more
# questions: the first 500 GSM8K test questions, every row on exactly the same ones, which narrows
# the intervals to about ±4 points; a paired test gets 2.5 times as many questions, and so about 2.5
# times as many on which two methods disagree. The rows are the book's five stages:
#
# - **base**: greedy decoding with the plain chat prompt (chapter 2);
# - **+ chain of thought**: greedy decoding with chapter 3's reasoning prompt (`step_by_step`, chosen
#   on training questions);
# - **+ self-consistency (N=10)**: a majority vote over 10 answers sampled at chapter 3's temperature
#   (T = 0.3, also chosen on training questions);
# - **+ self-refinement (K=2)**: chapter 4's deployable variant: a first answer, then two rounds of
#   calibrated confidence feedback (three answers), keeping the one the model is most confident in;
# - **+ GRPO (3 epochs)**: this chapter's trained model, greedy, with the chain-of-thought prompt.
#
# `tools/results_table.py` produced them. It is a thin script over the harness of chapter 2: every row
# is a recorded, resumable run in `data/results/runs/` (one line per question), so the records of
# earlier chapters are reused (for the first 200 questions, the first 10 of chapter 3's 20 samples per
# question: sample j gets the same seed whatever N is) and a killed run continues where it stopped. The table itself, with each row's
# question-by-question verdicts, is stored in `data/results/results_table.json`; this section only
# reads it.

# %%
table_file = results_dir() / "results_table.json"
book_table = json.loads(table_file.read_text()).get("gsm8k_first_500") if table_file.exists() else None
if not book_table or len(book_table["rows"]) < 5:
    print("the 500-question table is not complete yet: python tools/results_table.py (hours of CPU)")
else:
    book_rows = book_table["rows"]
    n_book = len(book_table["problem_ids"])
    assert all(len(e["verdicts"]) == e["n"] == n_book for e in book_rows.values())  # same questions, every row
    print(f"GSM8K test, the first {n_book} questions; measured on {book_table['machine']}")
    print(f"{'method':28} {'accuracy':>8} {'95% CI':>16} {'tokens':>7} {'CPU min':>8}  this row vs chain of thought")
    for name, e in book_rows.items():
        vs = e.get("vs_cot")
        versus = f"{vs['gained']:3d} gained, {vs['lost']:3d} lost, p = {vs['p']:.3f}" if vs else ""
        print(f"{name:28} {e['accuracy']:8.1%} [{e['ci95'][0]:5.1%}, {e['ci95'][1]:5.1%}] {e['mean_tokens']:7.0f} "
              f"{e['cpu_minutes']:8.0f}  {versus}")
    print(f"in all {sum(e['cpu_minutes'] for e in book_rows.values()) / 60:.1f} CPU hours")

    fig, (ax_acc, ax_tok) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    names = list(book_rows)[::-1]
    acc = [book_rows[k]["accuracy"] * 100 for k in names]
    low = [a - book_rows[k]["ci95"][0] * 100 for a, k in zip(acc, names)]
    high = [book_rows[k]["ci95"][1] * 100 - a for a, k in zip(acc, names)]
    ax_acc.barh(names, acc, xerr=[low, high], color="tab:blue", capsize=4)
    ax_acc.set_xlabel(f"GSM8K accuracy, first {n_book} test questions (%, 95% CI)")
    ax_tok.barh(names, [book_rows[k]["mean_tokens"] for k in names], color="tab:gray")
    ax_tok.set_xlabel("tokens generated per question")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# The p-values above pair each row with greedy chain of thought question by question (exact McNemar
# test on the questions where exactly one of the two is right). The book's question pairs two other
# rows: the trained model against self-consistency; for completeness, each technique against the one
# it builds on, and self-refinement against its own first answers.

# %%
if book_table and len(book_table["rows"]) == 5:
    verdicts = {name: [c == "1" for c in e["verdicts"]] for name, e in book_rows.items()}
    base_name, cot_name, sc_name, refine_name, grpo_name_500 = book_rows
    pairs = [(cot_name, base_name), (sc_name, cot_name), (refine_name, cot_name), (grpo_name_500, cot_name),
             (grpo_name_500, sc_name)]
    round0_files = sorted((results_dir() / "runs").glob("gsm8k-step_by_step-refine-r0-*.jsonl"))
    if round0_files:  # self-refinement's first answers: the same greedy chain of thought, generated in another run
        first_answers = {r["id"]: bool(r["correct"][0]) for r in _read_jsonl(round0_files[0])}
        verdicts["refinement's round 0"] = [first_answers[i] for i in book_table["problem_ids"]]
        pairs += [(refine_name, "refinement's round 0"), ("refinement's round 0", cot_name)]
    for first, second in pairs:
        paired = compare_paired(verdicts[first], verdicts[second])
        print(f"{first:28} vs {second:28}: {paired['wins']:3d} gained, {paired['losses']:3d} lost, "
              f"p = {paired['p_value']:.4f}")

# %% [markdown]
# Read against the question the book set out with, the table says:
#
# - **Self-consistency is the one gain that 500 questions confirm.** Voting over 10 samples answered
#   34.6% against greedy chain of thought's 31.0%: 36 questions gained, 18 lost, exact McNemar
#   p = 0.020. Chapter 3 predicted it on training questions (a vote of five samples at T = 0.3 beat
#   greedy decoding there, 23 questions against 7, p = 0.005, on the same questions T was chosen on),
#   and it is one of the two tests this table was built for, with GRPO against self-consistency. The
#   price is ten times the tokens (2,884 against 288 per question) and ten times the time.
# - **The reasoning prompt alone is not a significant gain** over the plain chat prompt: 31.0% against
#   28.4% (chain of thought gained 39 questions and lost 26, p = 0.14).
# - **Self-refinement did not help**: 29.0%, against chain of thought 10 questions gained and 20 lost
#   (p = 0.099), at 3.5 times the tokens. The gap is not refinement's doing: keeping the most confident
#   of its three answers (the first and two revisions) kept the verdict of its first answer on every one
#   of the 500 questions, as in chapter 4 on 40, and that first answer is the same greedy chain of
#   thought generated in another run (other batches, so bf16 roundings differ and near-ties flip), which
#   scored 29.0% where the chain-of-thought row scored 31.0% (printed above). Two greedy runs of one
#   prompt differing by 10 against 20 questions is the churn of section 12's exercise 1, not a skill.
#   Its minutes count generation only; re-scoring the revisions as first answers (the confidence it
#   compares) took roughly 20 minutes more, an estimate from the log's pace, not a recorded time.
# - **GRPO changed nothing measurable.** The trained model answered exactly as many questions as greedy
#   chain of thought, 31.0%, with 37 gained and 37 lost (p = 1.00), in slightly shorter answers (271
#   against 288 tokens), as on the 200 questions of section 12. Against self-consistency it gained 29
#   and lost 47 (p = 0.0505, at the threshold, not below it): at a tenth of the inference compute it is
#   where greedy decoding was, 3.6 points behind the vote.
#
# So, on this budget (32 GRPO steps on 42 training questions, about 100 minutes of a 2-core CPU), RL
# training did not beat inference-time scaling: sampling ten answers and voting did better than the
# trained model, and the training itself did not move greedy accuracy. That is a statement about
# this run, not about GRPO: DeepSeekMath's GRPO stage sampled 64 answers for each of about 144,000
# GSM8K- and MATH-style questions (Shao et al. 2024), and section 12 costs out a single GPU's run.
#
# The "CPU min" column is wall-clock minutes of generation on the 2-core machine, summed over the
# questions; the whole table took about 5.2 such hours. The self-consistency row reuses chapter 3's
# samples for the first 200 questions, counted at their share of that run's time, and for about 20
# minutes of its run other work shared the machine, so its time is somewhat inflated. A MATH-500
# column would cost more: the base model's answers there are longer (369 tokens per problem in
# chapter 2, against 281 here; it scored 8.0% on 100 problems), so, if time grows with the tokens
# generated, the five rows on all 500 problems would take about 6-7 hours at this table's rates,
# self-consistency alone about 3.5. That is not in this book's budget; the greedy rows (base, chain of
# thought, GRPO, about 20 minutes each) are the affordable first step.
#
# For context only: Qwen reports 49.6% on GSM8K for Qwen2.5-0.5B-Instruct (Qwen2.5 technical report,
# 2024). That is another model (the general instruct model, where this book uses the Coder variant,
# and unquantized, where ours comes from a 4-8 bit GGUF file), measured with Qwen's own prompts,
# answer extraction and harness on the GSM8K test set. It is not a row of this table, and the gap
# cannot be credited to the model, the quantization or the harness separately.

# %% [markdown]
# ## Summary
#
# The loop of this chapter is complete and checked: presets, schedule, pre-pass, skipped zero-signal
# groups, accumulation that equals one big batch, checkpoints that resume bit for bit (section 11;
# the real run was interrupted several times and each time continued from its last checkpoint), a
# Hugging Face export, and the same loop under `torchrun`.
#
# The real run on a 2-core CPU gives no evidence yet that GRPO helps: 32 GRPO steps on 42 training
# questions (101 minutes) left GSM8K test accuracy where it was (28.0% → 28.0%, n = 200, exact
# McNemar p = 1.00; no significant difference after any epoch). Against self-consistency with
# N = 10 on the same 200 questions, the trained model is 4 points behind (28.0% against 32.0%; 10
# gained, 18 lost, p = 0.18), at a tenth of the tokens, and self-consistency's own lead over greedy
# decoding is not significant either (chapter 3: p = 0.12). So on this budget GRPO did not beat
# inference-time scaling; neither technique is a gain that 200 questions can confirm. What might change that is scale: many more
# questions and steps (the GPU settings above), and a larger learning rate (the GSM8K pilot ran
# $3 \times 10^{-6}$ stably for 6 steps, the last two at the full rate, with 2.5 times the KL to the
# start). The book's results table (section 14) repeats the comparison on 500 questions: the trained
# model still equals greedy chain of thought (31.0% both; 37 gained, 37 lost, n = 500, p = 1.00), and
# self-consistency's lead over chain of thought is now significant (34.6%; 36 gained, 18 lost,
# p = 0.020); against the trained model it is at the threshold (47 gained, 29 lost, p = 0.0505).
#
# ## Exercises
#
# Solutions are in the collapsed cells below each exercise (click to expand). Both read the run's
# records only.
#
# **1. How much does greedy decoding churn?** Between two consecutive evaluations the weights move a
# little, yet many greedy answers change. For each pair of consecutive evaluations, count the answers
# whose text changed, the verdicts that flipped each way, and the exact McNemar p. Which of the
# changes in accuracy could be churn alone?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
if start_answers and len(eval_rows) > 1:
    labels = [r["label"] for r in eval_rows]
    uneven = []
    for before, after in zip(labels, labels[1:]):
        pairs = list(zip(answers[before], answers[after]))
        changed = sum(a["responses"][0] != b["responses"][0] for a, b in pairs)
        paired = compare_paired([b["correct"][0] for a, b in pairs], [a["correct"][0] for a, b in pairs])
        print(f"{before:8} -> {after:8}: {changed:3d} of {len(pairs)} texts changed, {paired['wins']:2d} wrong -> right, "
              f"{paired['losses']:2d} right -> wrong, p = {paired['p_value']:.2f}")
        if paired["p_value"] < 0.05:
            uneven.append(f"{before} -> {after} ({paired['wins']} vs {paired['losses']}, p = {paired['p_value']:.3f})")
    print(f"uneven at p < 0.05 (uncorrected, {len(labels) - 1} tests): {', '.join(uneven) or 'none'}")
# Most texts change between any two evaluations: a small change of the weights moves one token's
# ranking somewhere in a long answer, and greedy decoding then follows a different path. Flips in both
# directions are the result; only a clear excess of one direction (a small p) is a change of skill.
# A transition listed as uneven is one such excess; with several tests, one p near 0.01 can still be
# chance (multiply it by the number of tests for a Bonferroni bound), and a gain in one epoch says
# nothing by itself about the start-to-end comparison, which the chapter tests directly.

# %% [markdown]
# **2. Did training change short and long answers alike?** Split the 200 evaluation questions by the
# length of the *starting* model's answer into three equal groups, and compare accuracy at the start
# and after the last epoch within each group.

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
if start_answers and len(eval_rows) > 1:
    last = {r["id"]: r for r in answers[eval_rows[-1]["label"]]}
    by_length = sorted(start_answers, key=lambda r: r["tokens"][0])
    for g in range(3):
        group = by_length[g * len(by_length) // 3:(g + 1) * len(by_length) // 3]
        before = sum(r["correct"][0] for r in group) / len(group)
        after = sum(last[r["id"]]["correct"][0] for r in group) / len(group)
        print(f"start answers of {group[0]['tokens'][0]:3d}-{group[-1]['tokens'][0]:3d} tokens ({len(group)} questions): "
              f"accuracy {before:.0%} -> {after:.0%}")
# Long starting answers are the harder questions (more steps), and the ones the 300-token training
# budget cut most often; compare the groups' changes with their sizes before reading anything into them.

# %%
import shutil

shutil.rmtree(WORK)  # this notebook's scratch runs: checkpoints hold optimizer state, about 1 GB
print(f"chapter executed in {(time.perf_counter() - chapter_start) / 60:.1f} min")
