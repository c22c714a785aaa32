# ---
# jupyter:
#   jupytext:
#     formats: ipynb,scripts//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (rlscratch)
#     language: python
#     name: rlscratch
# ---

# %% [markdown]
# # Chapter 5 — The parts of GRPO, each derived and checked
#
# Chapter 3 ended with a gap: among twenty sampled solutions the right answer was often there
# (pass@20 of 60%) while a single sample found it a fifth of the time. Reinforcement learning with a
# verifiable reward closes that gap from the other side: sample several answers to a question, grade
# each with the verifier of chapter 2, and make the model more likely to write the ones that beat their
# siblings and less likely to write the others.
#
# **Group Relative Policy Optimization** (GRPO, Shao et al. 2024, the DeepSeekMath paper) is PPO
# (Schulman et al. 2017) with the value network replaced by a simple baseline: the mean reward of
# all the answers sampled for the same question. Its loss is built from a handful of parts, and this
# chapter builds each one as a small function on tensors, derives why it has the form it has, and
# checks it on examples small enough to do by hand:
#
# 1. **scoring a completion**: the per-token log-probabilities of sampled tokens, with gradients, in
#    bounded memory despite a 152k-word vocabulary;
# 2. **rewards and advantages**: a 0/1 reward from the verifier, made relative within each group;
# 3. **the clipped surrogate**: PPO's importance ratio and clipping, with separate lower and upper
#    ranges (Yu et al. 2025, DAPO);
# 4. **a KL penalty** to a frozen reference model, estimated from sampled tokens (Schulman 2020);
# 5. **how to average** the per-token terms, and the length bias each choice brings (Liu et al.
#    2025, "Dr. GRPO");
# 6. **gradient checks** of the whole loss against a hand derivation and finite differences;
# 7. a first real run.
#
# The functions are exported into `rlscratch.grpo`, which imports nothing but PyTorch: it takes
# tensors and returns tensors, so every piece can be tested without a model. Chapter 6 assembles them
# into the training loop.
#
# **Where the loss comes from, in one paragraph.** We want to raise the expected reward
# $J(\theta) = \mathbb{E}_{o \sim \pi_\theta(\cdot|q)}[R(o)]$ of the policy $\pi_\theta$ (our model)
# over its own completions $o$ to questions $q$. The policy-gradient identity turns the gradient of
# an expectation over samples into an expectation we can estimate from samples:
# $\nabla J = \mathbb{E}[R(o)\,\nabla \log \pi_\theta(o|q)]$, and $\log \pi_\theta(o|q) = \sum_t
# \log \pi_\theta(o_t | q, o_{<t})$ is a sum over the completion's tokens. Subtracting from $R$ any
# baseline $b$ that does not depend on $o$ leaves the expectation unchanged (because
# $\mathbb{E}[\nabla \log \pi_\theta(o|q)] = 0$) but can shrink its variance a lot; $A = R - b$ is the
# **advantage**. Everything below is machinery around this estimator: sections 1 and 2 compute
# $\log \pi_\theta(o_t|\dots)$ and $A$; sections 3 to 5 make the update safe to repeat, anchored, and
# sensibly averaged.

# %% [markdown]
# ## 0. Parameters
#
# Most of this chapter works on small tensors and runs in seconds anywhere. Sections 1 and 7 use
# the real model: section 1 for a handful of short completions, section 7 for a first training run
# (about 11 minutes of a 2-core CPU; its record is cached in `data/results/`, so re-executing the
# chapter takes under a minute). With `RLSCRATCH_SMOKE=1` a tiny random-weight model stands in.

# %%
import math
import os

import torch

SMOKE = os.environ.get("RLSCRATCH_SMOKE") == "1"  # tiny random model, used by the test suite
MODEL = "tiny-random" if SMOKE else "offline:qwen2.5-coder-0.5b-instruct"
DEVICE = "cpu"
NEW_TOKENS = 8 if SMOKE else 48  # tokens per sampled completion in section 1's checks
SCORE_BATCH = (2, 64) if SMOKE else (4, 256)  # (sequences, tokens) for section 1's memory measurement
CHUNK_SIZE = 256  # positions per slice of the vocabulary head

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
print(f"smoke={SMOKE} model={MODEL} threads={torch.get_num_threads()} torch={torch.__version__}")

# %% [markdown]
# ## 1. Scoring a completion
#
# Every term of the GRPO loss is a function of one quantity: $\log \pi_\theta(o_t \mid q, o_{<t})$,
# the log-probability the model gives each token of a sampled completion. The sampler of chapter 1
# already recorded these numbers while generating, so why compute them again?
#
# * The sampler ran without gradients. The loss needs $\nabla_\theta \log \pi_\theta$, so the
#   tokens must go through the model again with autograd on.
# * After the first optimizer step the weights have changed: the recorded numbers then belong to the
#   *old* policy $\pi_{\text{old}}$ (section 3 uses exactly that).
# * A frozen copy of the starting model, the *reference*, scores the same tokens for the KL penalty
#   (section 4).
#
# So we need one function: given a batch of prompt+completion token ids (of different lengths,
# padded), return the log-probability of every completion token, in one forward pass.
#
# ### 1.1 From logits to the log-probability of one token
#
# The model gives logits $z$ over the vocabulary; sampling at temperature $\tau$ draws from
# $\mathrm{softmax}(z/\tau)$, so the log-probability of the chosen token $y$ is
# $z_y/\tau - \log\sum_v e^{z_v/\tau}$. Two details matter:
#
# * **The temperature must match the sampler's.** The policy that produced the tokens is
#   $\mathrm{softmax}(z/\tau)$, not $\mathrm{softmax}(z)$; a ratio of probabilities (section 3)
#   between different temperatures is meaningless. (Chapter 1's `Completion.logprobs` are recorded at
#   temperature 1, so they can serve as the old log-probs when sampling at $\tau = 1$.)
# * **Float32, even when the model computes in bfloat16.** bfloat16 keeps 8 significant bits: between
#   8 and 16 its representable numbers are 0.0625 apart. A log-probability near -10 could only move in
#   steps of 0.0625, a probability ratio in steps of about 6%, while PPO's clipping (section 3)
#   reacts to changes of 20%. We cast the logits to float32 before the log-sum-exp and return
#   float32.
#
# We compute $z_y - \operatorname{logsumexp}(z)$ directly instead of `log_softmax(z)[y]`: the
# result is the same, but it never materialises a second vocabulary-wide tensor of log-probabilities.

# %%
#| export: grpo
"""The parts of GRPO as functions on tensors: per-token log-probs, group-relative advantages, KL
estimators, the clipped surrogate and its aggregation into a loss. Imports only torch."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("sequence", "token", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets`: logits (..., V) and targets (...) -> (...).

    Computed in float32 (float64 stays float64) whatever the logits' dtype, as z_y - logsumexp(z) so
    that no second vocabulary-wide tensor is materialised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


# %% [markdown]
# A check we can do by hand: logits $(2, 1, 0.1)$ give $\log(e^2 + e^1 + e^{0.1}) = \log 11.21 =
# 2.417$, so token 0 has log-probability $2 - 2.417 = -0.417$. At temperature 2 the logits halve.
# The result is float32 even from bfloat16 logits.

# %%
z = torch.tensor([[2.0, 1.0, 0.1]])
by_hand = 2 - math.log(math.exp(2) + math.exp(1) + math.exp(0.1))
assert abs(token_logprobs(z, torch.tensor([0])).item() - by_hand) < 1e-6
by_hand_t2 = 1 - math.log(math.exp(1) + math.exp(0.5) + math.exp(0.05))
assert abs(token_logprobs(z, torch.tensor([0]), temperature=2.0).item() - by_hand_t2) < 1e-6
assert token_logprobs(z.bfloat16(), torch.tensor([0])).dtype == torch.float32
print(f"log p(token 0) = {by_hand:.4f} at T=1, {by_hand_t2:.4f} at T=2")

# %% [markdown]
# ### 1.2 A batch of completions
#
# A GRPO batch holds $G$ completions for each of several prompts, all of different lengths. As in
# chapter 1's sampler we pad **on the left**, so that every sequence ends at the last column; the
# model's attention mask hides the padding and its positions start at each row's first real token.
# Besides the attention mask we need a **completion mask** marking which tokens were generated: only
# those are scored and trained on. `completion_batch` builds the tensors from token-id lists (and
# places the sampler's recorded log-probs in the same layout when given).

# %%
#| export: grpo
class CompletionBatch(NamedTuple):
    """Left-padded prompt+completion tensors, all (B, T)."""

    input_ids: torch.Tensor  # token ids, `pad_id` in the padding
    attention_mask: torch.Tensor  # 1 for real tokens (prompt and completion), 0 for padding
    completion_mask: torch.Tensor  # 1 for completion tokens only
    logprobs: torch.Tensor | None  # the given per-token log-probs at completion positions, 0 elsewhere


def completion_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                     logprobs: list[list[float]] | None = None, device: str | torch.device = "cpu") -> CompletionBatch:
    """Left-pad each prompt + completion to a common length (the layout `sequence_logprobs` scores)."""
    if len(prompt_ids) != len(completion_ids) or (logprobs is not None and len(logprobs) != len(completion_ids)):
        raise ValueError("prompt_ids, completion_ids (and logprobs) need one entry per sequence")
    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("every sequence needs at least one prompt token")
    if logprobs is not None and any(len(lp) != len(c) for lp, c in zip(logprobs, completion_ids)):
        raise ValueError("logprobs needs one value per completion token")
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    ids, attention, completion, values = [], [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        pad = width - len(p) - len(c)
        ids.append([pad_id] * pad + list(p) + list(c))
        attention.append([0] * pad + [1] * (len(p) + len(c)))
        completion.append([0] * (pad + len(p)) + [1] * len(c))
        if logprobs is not None:
            values.append([0.0] * (pad + len(p)) + [float(x) for x in logprobs[i]])

    def tensor(rows, dtype):
        return torch.tensor(rows, dtype=dtype, device=device)

    return CompletionBatch(tensor(ids, torch.long), tensor(attention, torch.long), tensor(completion, torch.long),
                           None if logprobs is None else tensor(values, torch.float32))


# %%
toy = completion_batch([[11, 12, 13], [21]], [[14, 15], [22, 23, 24]], pad_id=0, logprobs=[[-0.5, -1.0], [-2, -3, -4]])
print(toy.input_ids, toy.completion_mask, toy.logprobs, sep="\n")
assert toy.input_ids.tolist() == [[11, 12, 13, 14, 15], [0, 21, 22, 23, 24]]
assert toy.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
assert toy.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
assert toy.logprobs[1].tolist() == [0, 0, -2, -3, -4]

# %% [markdown]
# ### 1.3 The vocabulary head, in chunks
#
# The obvious implementation runs the model, gets logits for every position and applies
# `token_logprobs`. The trouble is the size of those logits: the vocabulary has 151,936 entries, so a
# modest GRPO batch of 16 completions × 512 positions holds $16 \cdot 512 \cdot 151{,}936 \cdot 4$
# bytes = 5.0 GB of float32 logits, and autograd keeps them until the backward pass (which needs
# them to rebuild the softmax). Yet we need only *one* number per position.
#
# So the scoring function splits the model at its last layer:
#
# 1. run the transformer body once: hidden states $(B, T, 896)$, small;
# 2. keep only the positions that predict a completion token. Position $t$'s logits predict token
#    $t+1$, so the hidden state at $t-1$ scores completion token $t$; prompt positions never reach the
#    head at all;
# 3. apply the head (`lm_head`) to `chunk_size` of those positions at a time and keep only the
#    gathered log-probabilities;
# 4. for the backward pass, which needs each chunk's softmax, either keep nothing but the chunk's
#    *input* and recompute its logits then (the idea of **activation checkpointing**: one chunk of
#    logits exists at a time), or keep the chunk's logits as the matrix product produced them.
#    Without one of the two, autograd would keep every chunk's logits in float32.
#
# Which of the two in step 4 is a trade of memory for time. Recomputing runs the head's forward
# twice; for our model the head is 28% of the multiply-adds per token (section 1.5 prints it), and a
# forward-and-backward pass costs about three forwards, so it adds roughly a tenth to the scoring
# step. Keeping the logits costs their memory, which depends on the number format the CPU computes
# in: in bfloat16 they take 2 bytes each, half of what plain autograd keeps in float32 (0.6 GB for
# 2,048 completion tokens, e.g. 8 answers of 256 tokens, instead of 1.2 GB). In float32 the kept
# logits would be as large as plain autograd's, so there we keep memory bounded by one chunk and pay
# the recomputation. That matters most on CPUs without native bfloat16, which train in float32 and
# have the least memory to spare. So `head_logprobs` keeps the logits where the matrix products run
# in 16 bits and recomputes them in float32 (`head_logprobs(..., keep_logits=...)` overrides that;
# `sequence_logprobs` always takes the default).
#
# Both ways run through one small custom autograd function, `HeadLogprobs`, whose backward pass we
# write ourselves. It needs the gradient of each log-prob with respect to the logits. With $z$ the
# logits divided by the temperature $t$, $\log p_y = z_y - \log\sum_v e^{z_v}$ has gradient
# $\mathbb{1}[v = y] - \mathrm{softmax}(z)_v$ with respect to $z_v$, so $(\mathbb{1}[v = y] -
# \mathrm{softmax}(z)_v)/t$ with respect to the raw logit, times the incoming gradient
# (`logit_gradient`). With kept logits, the function writes that gradient over them in place (they
# are not needed again) and then needs just two matrix products, one for the hidden states' gradient
# and one for the head weight's. With recomputed logits, it computes one chunk's logits again, turns
# them into their gradient in place, and adds that chunk's share of the weight's gradient to a
# running sum in place (`addmm_`). Written by hand, the recomputing path is also leaner than
# wrapping each chunk in `torch.utils.checkpoint`: there, autograd computes a full-size weight
# gradient for every chunk (151,936 × 896 floats, 0.54 GB) and then adds it to the running sum, and
# keeps several chunk-sized intermediates of `log_softmax` alive at once. (The kept logits live on
# the function's context object, not in `save_for_backward`, so tools that watch autograd's saved
# tensors, like `saved_for_backward_mb` below, do not see them; that check runs in float32, where
# nothing is kept anyway.) Under `torch.no_grad()` (the
# reference model, or the sampler's old log-probs) there is no backward pass, and nothing is kept or
# recomputed.
#
# One more detail decides the speed of everything that is not a matrix product here. A chunk of 256
# positions has 39 million logits, 156 MB (148 MiB) in float32: written as a chain of element-wise operations
# (convert, divide by $t$, subtract the log-sum-exp, exponentiate, multiply), every step would stream
# the whole chunk through memory. `torch.log_softmax` and `torch.softmax` instead work one row of
# 151,936 values at a time while it sits in the CPU's cache, so the forward pass uses the first and the
# backward pass the second, and one multiplication writes the finished gradient, rounded once, back
# in the compute format. (At a temperature other than 1 the division by $t$ remains a pass of its
# own; GRPO samples, and so scores, at temperature 1 in this book's runs.)
#
# The model interface this relies on is small: `model(input_ids, attention_mask=...,
# return_hidden=True)` returns the final normalised hidden states, and `model.lm_head` maps them to
# logits. `rlscratch.grpo` never imports the model class; any module with that interface works.
# Steps 3 and 4 live in a function of their own, `head_logprobs`, because chapter 6 applies them to
# hidden states it lays out differently (several answers after one shared prompt).

# %%
#| export: grpo
def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """Per-token log-probs (B, T) of the completion tokens under `model`; 0 where `completion_mask` is 0.

    Entry t is log p(input_ids[:, t] | input_ids[:, :t]) at `temperature`, in float32. Only positions
    that predict a completion token go through the vocabulary head, `chunk_size` at a time
    (`head_logprobs`): the (B, T, vocab) logits never exist, and at most the completion positions' logits
    are kept for the backward pass, in 16 bits. `model(ids, attention_mask=..., return_hidden=True)` must
    return the final hidden states (B, T, hidden) and `model.lm_head` map them to logits.
    """
    if not input_ids.shape == attention_mask.shape == completion_mask.shape or input_ids.dim() != 2:
        raise ValueError("input_ids, attention_mask and completion_mask must all be (B, T)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scored = completion_mask.bool()
    if scored[:, 0].any():
        raise ValueError("a completion token in the first column has no position to predict it")
    if (scored & ~attention_mask.bool()).any():
        raise ValueError("completion tokens must be attended (attention_mask 1)")
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)
    predicts = scored[:, 1:]  # the hidden state at t-1 scores token t
    states = hidden[:, :-1][predicts]  # (N, hidden), N = number of completion tokens
    values = head_logprobs(model.lm_head, states, input_ids[:, 1:][predicts], temperature=temperature,
                           chunk_size=chunk_size)
    return torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)


def head_logprobs(lm_head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, *,
                  temperature: float = 1.0, chunk_size: int = 256, keep_logits: bool | None = None) -> torch.Tensor:
    """log p(targets[i] | states[i]) (N,) in float32 from final hidden states (N, hidden), through the
    vocabulary head `chunk_size` rows at a time. With gradients on, the backward pass (`HeadLogprobs`)
    either recomputes each chunk's logits (no more than one chunk of logits exists at once) or reuses them,
    kept in the compute precision. `keep_logits=None` keeps them where that precision is 16-bit. A head
    other than `nn.Linear(bias=False)` goes through autograd with each chunk checkpointed."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def head(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_logprobs(lm_head(h), y, temperature=temperature)

    track = torch.is_grad_enabled() and (states.requires_grad or lm_head.weight.requires_grad)
    if track and isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and states.shape[0]:
        device = states.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(states.dtype, lm_head.weight.dtype))
        keep = dtype.itemsize <= 2 if keep_logits is None else keep_logits
        return HeadLogprobs.apply(states, lm_head.weight, targets, dtype, temperature, chunk_size, keep)
    pieces = [checkpoint(head, states[i:i + chunk_size], targets[i:i + chunk_size], use_reentrant=False) if track
              else head(states[i:i + chunk_size], targets[i:i + chunk_size])
              for i in range(0, states.shape[0], chunk_size)]
    dtype = torch.promote_types(states.dtype, torch.float32)
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=dtype)


def logit_gradient(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, temperature: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """d/d logits of sum_i grad[i] * log softmax(logits[i] / temperature)[targets[i]], computed in float32 at
    least and written to `out` (which may be `logits` itself): (one-hot(targets) - softmax) * grad / T."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    z = logits if temperature == 1 else logits.to(wide) / temperature
    p = torch.softmax(z, -1, dtype=wide)  # one row at a time, in cache: no pass over memory per operation
    p.scatter_add_(-1, targets[:, None].long(), p.new_full((p.shape[0], 1), -1.0))  # softmax - one-hot
    return torch.mul(p, grad[:, None].to(wide) / -temperature, out=out)  # times -grad / T, rounded once


class HeadLogprobs(torch.autograd.Function):
    """`token_logprobs(states @ weight.T / temperature, targets)` with its backward pass written by hand, the
    logits computed `chunk_size` rows at a time in `dtype`. With `keep` the logits are kept (on ctx, unseen by
    saved-tensor hooks) and the backward pass turns them, in place, into the gradient of the logits
    (`logit_gradient`), then needs two matrix products. Without, it recomputes one chunk of logits at a time
    and adds that chunk's share to the head weight's gradient in place."""

    @staticmethod
    def forward(ctx, states, weight, targets, dtype, temperature, chunk_size, keep):
        wide = torch.promote_types(dtype, torch.float32)  # softmax arithmetic: float32 at least
        n, c = states.shape[0], chunk_size
        with torch.autocast(states.device.type, enabled=False):
            s, w = states.to(dtype), weight.to(dtype)
            logits = s.new_empty(n if keep else min(n, c), w.shape[0])  # all rows, or one chunk's
            values = torch.empty(n, dtype=wide, device=s.device)
            for i in range(0, n, c):
                z = torch.matmul(s[i:i + c], w.t(), out=logits[i:i + c] if keep else logits[:min(c, n - i)])
                z = z if temperature == 1 else z.to(wide) / temperature
                values[i:i + c] = torch.log_softmax(z, -1, dtype=wide).gather(-1, targets[i:i + c, None].long())[:, 0]
        ctx.save_for_backward(s, w, targets)
        ctx.logits = logits if keep else None
        ctx.keep, ctx.temperature, ctx.chunk_size = keep, temperature, chunk_size
        ctx.dtypes = states.dtype, weight.dtype
        return values

    @staticmethod
    def backward(ctx, grad):
        if ctx.keep and ctx.logits is None:
            raise RuntimeError("HeadLogprobs: the backward pass overwrites the kept logits, so it runs once "
                               "(no retain_graph=True through it; use keep_logits=False for that)")
        s, w, targets = ctx.saved_tensors
        c, t = ctx.chunk_size, ctx.temperature
        need_states, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(s.device.type, enabled=False):
            if ctx.keep:
                logits, ctx.logits = ctx.logits, None
                for i in range(0, s.shape[0], c):
                    rows = logits[i:i + c]
                    logit_gradient(rows, targets[i:i + c], grad[i:i + c], t, out=rows)
                grad_states = logits @ w if need_states else None
                grad_weight = logits.t() @ s if need_weight else None
            else:
                grad_states = torch.empty_like(s) if need_states else None
                grad_weight = torch.zeros(w.shape, dtype=grad.dtype, device=w.device) if need_weight else None
                for i in range(0, s.shape[0], c):
                    z = s[i:i + c] @ w.t()
                    dz = logit_gradient(z, targets[i:i + c], grad[i:i + c], t, out=z)
                    if need_states:
                        torch.matmul(dz, w, out=grad_states[i:i + c])
                    if need_weight and dz.dtype == grad_weight.dtype:
                        grad_weight.addmm_(dz.t(), s[i:i + c])  # no weight-sized temporary
                    elif need_weight:
                        grad_weight += dz.t() @ s[i:i + c]
        return (None if grad_states is None else grad_states.to(ctx.dtypes[0]),
                None if grad_weight is None else grad_weight.to(ctx.dtypes[1]), None, None, None, None, None)


# %% [markdown]
# ### 1.4 Checks on a float32 model
#
# First on a tiny random model in float32, where two correct computations must agree to rounding
# error: against the logits of the full vocabulary computed directly, values and gradients, with a
# chunk size small enough to cut the batch into several chunks.

# %%
import time

from rlscratch.generate import chat_prompt, generate
from rlscratch.model import load_model

tiny32, tokenizer = load_model("tiny-random", dtype=torch.float32)
tiny32.train()  # training mode, as in the GRPO step (the model has no dropout, so nothing changes)
gen = torch.Generator().manual_seed(0)
prompts_ids = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 9, 3)]
completions_ids = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (7, 2, 11)]
batch = completion_batch(prompts_ids, completions_ids, pad_id=tokenizer.pad_token_id)


def full_logits_logprobs(model, batch, temperature=1.0):
    """The obvious implementation: every position through the head, then select the completion tokens."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    lp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature=temperature)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * batch.completion_mask


for temperature in (1.0, 0.7):
    ours = sequence_logprobs(tiny32, *batch[:3], temperature=temperature, chunk_size=4)
    ours.sum().backward()
    grads_ours = [p.grad.clone() for p in (tiny32.lm_head.weight, tiny32.embed_tokens.weight)]
    tiny32.zero_grad()
    direct = full_logits_logprobs(tiny32, batch, temperature)
    direct.sum().backward()
    grads_direct = [p.grad.clone() for p in (tiny32.lm_head.weight, tiny32.embed_tokens.weight)]
    tiny32.zero_grad()
    value_diff = (ours - direct).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_direct))
    print(f"T={temperature}: max |difference| of log-probs {value_diff:.1e}, of gradients {grad_diff:.1e}")
    assert value_diff < 1e-5 and grad_diff < 1e-5
    assert (ours[batch.completion_mask == 0] == 0).all() and (ours[batch.completion_mask == 1] < 0).all()

# %% [markdown]
# That float32 model took the recomputing path. The kept-logits path (`keep_logits=True`, the one
# bfloat16 training takes) must give the same values and gradients; in float64 the two agree to
# rounding, and both agree with plain autograd through the full logits. (That bfloat16 under
# autocast does take it, with results equal to the recomputing path's up to bfloat16 rounding, is
# checked in `tests/test_grpo.py`.)

# %%
import copy

tiny64 = copy.deepcopy(tiny32).double()
states64 = torch.randn(10, tiny64.config.hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
targets64 = torch.randint(0, tiny64.config.vocab_size, (10,), generator=gen)
weights64 = torch.randn(10, dtype=torch.float64, generator=gen)
results = {}
for name, fn in [("recomputed", lambda: head_logprobs(tiny64.lm_head, states64, targets64, temperature=0.7,
                                                       chunk_size=4, keep_logits=False)),
                 ("kept", lambda: head_logprobs(tiny64.lm_head, states64, targets64, temperature=0.7,
                                                chunk_size=4, keep_logits=True)),
                 ("plain autograd", lambda: token_logprobs(tiny64.lm_head(states64), targets64, temperature=0.7))]:
    tiny64.zero_grad()
    states64.grad = None
    values = fn()
    (values * weights64).sum().backward()
    results[name] = (values.detach(), states64.grad.clone(), tiny64.lm_head.weight.grad.clone())
for name in ("kept", "plain autograd"):
    gaps = [(a - b).abs().max().item() for a, b in zip(results[name], results["recomputed"])]
    print(f"{name:>14} vs recomputed: values {gaps[0]:.0e}, hidden-state gradients {gaps[1]:.0e}, "
          f"head-weight gradients {gaps[2]:.0e}")
    assert max(gaps) < 1e-12

# %% [markdown]
# Now the memory. `torch.autograd.graph.saved_tensors_hooks` lets us see every tensor autograd keeps
# for the backward pass; we add up their sizes (counting shared storage once, and leaving out the
# model's own weights, which some operations save by reference but which exist anyway) for the direct
# computation and for `sequence_logprobs`, on a batch of `SCORE_BATCH` sequences whose second half
# is the completion.

# %%
def saved_for_backward_mb(fn, model: torch.nn.Module) -> float:
    """Mebibytes (2**20 bytes) of tensors autograd saves for the backward pass while running fn(), not
    counting `model`'s parameters (saved by reference, not copied)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


B, T = SCORE_BATCH
long_batch = completion_batch(torch.randint(0, 1000, (B, T // 2), generator=gen).tolist(),
                              torch.randint(0, 1000, (B, T // 2), generator=gen).tolist(), pad_id=0)
mb_direct = saved_for_backward_mb(lambda: full_logits_logprobs(tiny32, long_batch), tiny32)
mb_chunked = saved_for_backward_mb(lambda: sequence_logprobs(tiny32, *long_batch[:3], chunk_size=CHUNK_SIZE), tiny32)
vocab = tiny32.config.vocab_size
one_chunk_mb = CHUNK_SIZE * vocab * 4 / 2**20
print(f"{B} x {T} tokens, vocabulary {vocab:,}: saved for backward {mb_direct:,.1f} MiB directly, "
      f"{mb_chunked:,.1f} MiB chunked")
print(f"transient peak of the chunked head: about one chunk of float32 logits = {CHUNK_SIZE} x {vocab:,} x 4 bytes "
      f"= {one_chunk_mb:,.0f} MiB (plus temporaries of the same size), whatever the batch")
assert mb_chunked < mb_direct / 5

# %% [markdown]
# In the stored run (4 × 256 tokens) the direct computation keeps 603 MiB for the backward pass and
# the chunked one 10 MiB, about 60 times less. What remains is the body's activations, which a hidden
# size of 64 keeps tiny here (for the real model they grow with its hidden size of 896, but stay far
# below 152k-wide logits). In float32, as here, the head's memory is one chunk of logits at a time, a
# bound set by `chunk_size` rather than by the batch; in bfloat16 it also keeps the completion
# positions' 16-bit logits (step 4 above).
#
# The last check in float32 is the one the rest of the book leans on: the log-probs that training
# computes equal the ones the sampler recorded while generating the same tokens (chapter 1's
# `Completion.logprobs`, temperature 1), even though the sampler computed them one token at a time
# through the KV cache and we compute them all at once.

# %%
def score_completions(model, tokenizer, prompts, completions, **kwargs):
    """Our log-probs for `generate`'s completions, and the sampler's, as (B, T) tensors with their mask."""
    prompt_ids = [tokenizer.encode(prompts[c.prompt_index], add_special_tokens=False) for c in completions]
    b = completion_batch(prompt_ids, [c.token_ids for c in completions], pad_id=tokenizer.pad_token_id,
                         logprobs=[c.logprobs for c in completions])
    with torch.no_grad():
        ours = sequence_logprobs(model, *b[:3], **kwargs)
    return ours, b


questions = ["What is 17 * 23?", "Name three prime numbers.", "Write one sentence about the sea."]
prompts = [chat_prompt(tokenizer, q) for q in questions]
tiny_completions = generate(tiny32, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, n=2, seed=0)
ours, b = score_completions(tiny32, tokenizer, prompts, tiny_completions)
mask = b.completion_mask.bool()
diff32 = (ours - b.logprobs)[mask].abs().max().item()
print(f"float32 tiny model, {mask.sum().item()} sampled tokens: max |ours - sampler| = {diff32:.1e}")
assert diff32 < 1e-4

# %% [markdown]
# ### 1.5 The real model
#
# Now the model we will train, in its working precision (bfloat16 where the CPU computes it
# natively). We sample two completions for each of three questions at temperature 1 and compare three
# scorings of the same tokens: the sampler's records, `sequence_logprobs`, and `transformers`'
# `Qwen2ForCausalLM` holding the same weights. A float32 copy of the model tells us which differences
# come from rounding.

# %%
import copy

from rlscratch.model import hf_reference

model, tokenizer = load_model(MODEL, device=DEVICE)
dtype = next(model.parameters()).dtype
c = model.config
# multiply-adds per token ~ weights used in matrix products: all of them but the embedding table (a lookup),
# unless it is tied to the head (then parameters() lists the shared tensor once, and it is the head)
matmul_weights = sum(p.numel() for p in model.parameters()) - (0 if c.tie_word_embeddings else model.embed_tokens.weight.numel())
head_share = model.lm_head.weight.numel() / matmul_weights
print(f"{MODEL}: {dtype}, vocabulary {c.vocab_size:,}, hidden {c.hidden_size}; "
      f"the head is {head_share:.0%} of the multiply-adds per token")

t0 = time.perf_counter()
completions = generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, n=2, seed=1)
ours, b = score_completions(model, tokenizer, prompts, completions, chunk_size=CHUNK_SIZE)
mask = b.completion_mask.bool()
with torch.no_grad():
    hf = hf_reference(model)
    hf_logits = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    theirs = torch.cat([torch.zeros_like(ours[:, :1]), token_logprobs(hf_logits[:, :-1], b.input_ids[:, 1:])], 1)
    del hf, hf_logits
    model32 = copy.deepcopy(model).float()  # the same weights, computed in float32
    exact = sequence_logprobs(model32, *b[:3])
    del model32


def gap(a, b):
    d = (a - b)[mask].abs()
    return f"max {d.max().item():.3f}, mean {d.mean().item():.4f}"


print(f"{mask.sum().item()} sampled tokens ({time.perf_counter() - t0:.0f} s)")
print(f"ours ({dtype}) vs sampler ({dtype}):        {gap(ours, b.logprobs)}")
print(f"ours ({dtype}) vs transformers ({dtype}):   {gap(ours, theirs)}")
print(f"ours ({dtype}) vs float32 model:              {gap(ours, exact)}")
print(f"sampler ({dtype}) vs float32 model:           {gap(b.logprobs, exact)}")
for completion in completions[:2]:
    print(repr(completion.text[:120]))
assert (ours - b.logprobs)[mask].abs().max() < (0.5 if dtype == torch.bfloat16 else 1e-3)

# %% [markdown]
# In float32 the training-time scoring and the sampler agree to $2 \cdot 10^{-6}$ (section 1.4). In
# bfloat16 the stored run has them differ by 0.01 on average and by up to 0.08 on single tokens, and
# `transformers` differs from ours by as much. Each bfloat16 computation is a little closer to the
# float32 computation of the same weights (mean differences 0.006 and 0.008) than to the other: neither
# is wrong, both carry bfloat16 rounding, rounded differently. The sampler computes one
# position at a time through the KV cache, the training pass all positions in one large matrix
# product, and bfloat16 rounds the hidden states after every layer, so different orders of summation
# give different roundings that add up over 24 layers.
#
# This matters for section 3: the importance ratio $\exp(\log\pi_\theta - \log\pi_{\text{old}})$
# between the sampler's records and a bfloat16 training pass is not exactly 1 even before any update:
# a difference of 0.08 is a ratio of 1.08, two fifths of the way to the clipping bound of 1.2 that
# PPO uses.
# A training loop should therefore take the old log-probs from the same training-time function
# (`sequence_logprobs` under `torch.no_grad()`, before the first update), so that the ratio starts at
# exactly 1 and measures only what the updates changed.

# %% [markdown]
# ## 2. Rewards and advantages
#
# ### 2.1 A verifiable reward
#
# The reward is the verifier of chapter 2: 1 if the final answer of the completion is equivalent to
# the reference answer, 0 otherwise. It needs no reward model and cannot be flattered by style. We use
# the package's `rlscratch.verify.grade`, the same rule that scored every evaluation so far (a
# response cut off by the token limit earns nothing for a guessed last number: pass
# `truncated=True`), so training optimises exactly the number the benchmarks report.

# %%
from rlscratch.verify import grade

group_texts = ["16 - 3 - 4 = 9 eggs, 9 * 2 = 18, so \\boxed{18}.", "She makes \\boxed{\\$18}.",
               "The answer is \\boxed{20}.", "I am not sure."]
rewards = torch.tensor([float(grade(text, "18")) for text in group_texts])
print(rewards)
assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]

# %% [markdown]
# ### 2.2 Group-relative advantages
#
# GRPO samples a *group* of $G$ completions for each question and uses the group's mean reward as
# the baseline of the policy gradient. In PPO a separate value network, as large as the policy,
# learns to predict the expected reward; the group mean estimates the same thing for this one question
# without any extra network. Shao et al. (2024) also divide by the group's standard deviation:
#
# $$A_i = \frac{r_i - \operatorname{mean}(r_1, \dots, r_G)}{\operatorname{std}(r_1, \dots, r_G) + \epsilon}.$$
#
# Every token of completion $i$ then receives the same advantage $A_i$. Three choices of the
# denominator appear in practice, and `group_advantages` offers all three:
#
# | `scale` | denominator | used by |
# |---|---|---|
# | `"group"` | the group's std | GRPO (Shao et al. 2024) |
# | `"none"` | 1 | Dr. GRPO (Liu et al. 2025) |
# | `"batch"` | the std of all rewards in the batch | a middle ground: one scale for every group |
#
# Liu et al. (2025) argue against the per-group std: a question that the model almost always solves
# (or almost never) has a small std, so dividing by it gives that question's few informative samples
# large advantages. The per-group std thus weights questions by how *consistent* the model is on them
# rather than by how much there is to learn. Dropping the division removes that bias; the batch std
# keeps advantages at a fixed overall scale without reweighting groups against each other.
#
# The std is the sample standard deviation (dividing by $G - 1$, `torch.std`'s default). A group whose
# rewards are all equal gets advantage exactly 0, not $0/\epsilon$ of a rounding error.

# %%
#| export: grpo
def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Advantages (B,) of `rewards` (B,), laid out group after group: each reward minus its group's mean.

    scale: "group" divides by the group's std + eps (GRPO), "batch" by the std of all rewards + eps,
    "none" not at all (Dr. GRPO). std is the sample std (n - 1). Groups of equal rewards give exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.dim() != 1 or rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    groups = r.view(-1, group_size)
    tied = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    advantages = torch.where(tied, 0.0, groups - groups.mean(dim=1, keepdim=True))
    if scale == "group":
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (r.std() + eps)
    return advantages.reshape(-1)


# %% [markdown]
# Three groups of four by hand. Group 1 has one success: mean $\frac14$, centred rewards
# $(\frac34, -\frac14, -\frac14, -\frac14)$, sample std $\sqrt{(\frac9{16} + 3\cdot\frac1{16})/3} =
# \frac12$, so $A = (1.5, -0.5, -0.5, -0.5)$. Group 2 has two: mean $\frac12$, std
# $\sqrt{4 \cdot \frac14 / 3} = 0.577$, so $A = \pm 0.866$. Group 3 is all correct: zero.

# %%
rewards = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1.0])
table = {scale: group_advantages(rewards, 4, scale=scale) for scale in ADVANTAGE_SCALES}
print("reward  " + " ".join(f"{r:6.0f}" for r in rewards.tolist()))
for scale, a in table.items():
    print(f"{scale:7} " + " ".join(f"{x:6.3f}" for x in a.tolist()))
assert torch.allclose(table["group"][:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
assert torch.allclose(table["group"][4:8], torch.tensor([1, 1, -1, -1]) * 0.5 / math.sqrt(1 / 3), atol=1e-5)
assert torch.allclose(table["none"][:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
assert (table["batch"] * (rewards.std() + 1e-6)).allclose(table["none"])
assert all((a[8:] == 0).all() for a in table.values())  # the all-correct group: exactly zero
assert all(abs(a.view(-1, 4).sum(1)).max() < 1e-6 for a in table.values())  # each group sums to zero

# %% [markdown]
# The table shows the difficulty effect of the per-group std: the lone success of group 1 gets
# $A = 1.5$, the two successes of group 2 get 0.87; without the std they get 0.75 and 0.5. Every
# group's advantages sum to zero: the baseline makes the update *relative*, pushing some completions
# up and others down by the same total amount.
#
# ### 2.3 Groups without signal
#
# The last group above shows the catch. If all $G$ completions get the same reward, every advantage
# is zero and the group contributes nothing to the policy gradient, yet its $G$ completions cost as
# much to generate as any other. With a success probability $p$ for a question, that happens with
# probability $p^G + (1 - p)^G$. DAPO (Yu et al. 2025) responds with *dynamic sampling*: keep sampling
# until the batch is filled with groups that have both successes and failures.
#
# How common are such groups for our model? Chapter 3 already sampled 20 solutions to each of 40
# GSM8K test problems (step-by-step prompt, temperature 0.3). Its records hold every response and its
# grade, so we can count without generating anything. First a check that `grade` reproduces the
# recorded grades.

# %%
import json

from rlscratch.results import results_dir

runs = sorted((results_dir() / "runs").glob("gsm8k-step_by_step-t0.3-n20-*.jsonl"))
assert runs, "chapter 3's self-consistency records are missing"
first_40 = {f"gsm8k-test-{i}" for i in range(40)}  # the problems this section was written on (chapter 3 may add more)
records = {r["id"]: r for r in map(json.loads, filter(str.strip, runs[0].read_text().splitlines())) if r["id"] in first_40}
records = sorted(records.values(), key=lambda r: int(r["id"].rsplit("-", 1)[1]))
correct = torch.tensor([r["correct"] for r in records], dtype=torch.float64)  # (problems, 20)
regraded = [[grade(text, r["gold"], truncated=finish == "length") for text, finish in zip(r["responses"], r["finish"])]
            for r in records[:5]]
assert regraded == [r["correct"] for r in records[:5]]
per_problem = correct.mean(1)
print(f"{runs[0].name}: {len(records)} problems x {correct.shape[1]} samples, mean accuracy {per_problem.mean():.1%}")
print(f"problems never solved: {(per_problem == 0).sum().item()}, always solved: {(per_problem == 1).sum().item()}")

# %% [markdown]
# For group sizes 4, 8 and 16 we cut each problem's 20 samples into disjoint groups (5, 2 and 1 of
# them) and count the groups whose advantages are not all zero. Since the split is arbitrary we also
# compute the exact expectation over all ways to choose $G$ of the 20 samples: with $c$ of the 20
# correct, a random subset is all correct with probability $\binom{c}{G} / \binom{20}{G}$ and all wrong
# with probability $\binom{20-c}{G} / \binom{20}{G}$.

# %%
import matplotlib.pyplot as plt

n_samples = correct.shape[1]
signal_rows = []
for G in (4, 8, 16):
    groups = correct[:, : n_samples // G * G].reshape(-1, G)
    has_signal = (group_advantages(groups.reshape(-1), G) != 0).view(-1, G).any(1)
    counts = correct.sum(1).long().tolist()
    expected = sum(1 - (math.comb(c_, G) + math.comb(n_samples - c_, G)) / math.comb(n_samples, G)
                   for c_ in counts) / len(counts)
    signal_rows.append((G, len(groups), has_signal.double().mean().item(), expected))
    assert has_signal.tolist() == [0 < g.sum().item() < G for g in groups]
print(f"{'G':>3} {'groups':>7} {'with signal':>12} {'expected over all subsets':>26}")
for G, n_groups, frac, expected in signal_rows:
    print(f"{G:3d} {n_groups:7d} {frac:12.1%} {expected:26.1%}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].hist(per_problem.numpy(), bins=21, range=(-0.025, 1.025), color="C0")
axes[0].set(xlabel="fraction of the 20 samples that are correct", ylabel="problems",
            title="per-problem accuracy (chapter 3, T=0.3)")
axes[1].plot([r[0] for r in signal_rows], [r[3] for r in signal_rows], "o-", label="expected (all subsets)")
axes[1].plot([r[0] for r in signal_rows], [r[2] for r in signal_rows], "s", label="disjoint groups")
axes[1].set(xlabel="group size G", ylabel="fraction of groups with signal", ylim=(0, 1), xticks=[4, 8, 16],
            title="groups whose advantages are not all zero")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The histogram explains the numbers: many problems sit at the two ends. In the stored run 16 of the
# 40 problems were never solved in 20 samples and one was always solved, so at most 23 of 40 (57.5%)
# can give signal with any group size up to 20. A larger group rescues the problems in between, which a
# small group often sees all wrong (most of them are solved only a few times in 20), so the fraction
# with signal rises with $G$: about a third of the groups of 4, 43-45% of the groups of 8, and 54-58%
# of the groups of 16, close to the ceiling. Two thirds of the rollouts of groups of 4 would teach
# nothing. For training this means that the difficulty of the questions matters as much as the group
# size, and that the share of zero-signal groups is worth logging at every step.

# %% [markdown]
# ## 3. The clipped surrogate
#
# Generating completions is the expensive part of a GRPO step, so we would like to take more than
# one gradient step per batch of rollouts: split the batch into several minibatches, or pass over it
# twice. After the first step, though, the policy $\pi_\theta$ is no longer the policy
# $\pi_{\text{old}}$ that generated the tokens. Importance sampling corrects for that: an expectation
# over $\pi_\theta$ equals an expectation over $\pi_{\text{old}}$ of the same quantity weighted by the
# **ratio**
#
# $$\rho_t = \frac{\pi_\theta(o_t \mid q, o_{<t})}{\pi_{\text{old}}(o_t \mid q, o_{<t})} = \exp(\log\pi_\theta - \log\pi_{\text{old}}),$$
#
# so the per-token objective becomes $\rho_t A$. Its gradient at $\theta = \theta_{\text{old}}$ is
# $A \nabla \log \pi_\theta$, the policy gradient, because $\nabla\rho = \rho\,\nabla\log\pi_\theta$
# and $\rho = 1$ there. Further from $\theta_{\text{old}}$ the correction grows unreliable (the
# weights become extreme), so the update should not move too far. PPO (Schulman et al. 2017) enforces
# that with a clipped objective:
#
# $$\min\big(\rho_t A,\ \operatorname{clip}(\rho_t, 1 - \epsilon_{\text{low}}, 1 + \epsilon_{\text{high}})\,A\big).$$
#
# When the advantage is positive, raising the token's probability pays only until $\rho = 1 +
# \epsilon_{\text{high}}$; beyond that the objective is flat and its gradient zero. When the advantage
# is negative, lowering the probability pays only until $\rho = 1 - \epsilon_{\text{low}}$. The
# minimum makes the bound one-sided: if a step went the *wrong* way (a bad token became more likely),
# the unclipped term is the smaller one, and the gradient keeps pushing back at full strength.
#
# PPO uses one $\epsilon$ (0.2) for both sides. DAPO (Yu et al. 2025) raises only the upper one
# ("clip-higher", $\epsilon_{\text{low}} = 0.2$, $\epsilon_{\text{high}} = 0.28$). The reason is
# asymmetry in probability: with $\epsilon = 0.2$ a token at probability 0.9 can reach the cap of 1
# in one batch, while a rare but good token at 0.01 can only grow to 0.012. Symmetric clipping thus
# favours what the model already prefers, and the distribution sharpens (its entropy collapses)
# before the rare good continuations have been learned.

# %%
#| export: grpo
def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, *, clip_low: float = 0.2,
                      clip_high: float = 0.2) -> torch.Tensor:
    """PPO's per-token objective min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), elementwise."""
    if not (0 <= clip_low <= 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)


# %% [markdown]
# A plot of the objective and its slope against the ratio, for $A = +1$ and $A = -1$, with DAPO's
# ranges. The slope comes from autograd, so the plot also checks where the gradient vanishes.

# %%
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
ratio = torch.linspace(0.01, 2.0, 400, dtype=torch.float64, requires_grad=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, A in zip(axes, (1.0, -1.0)):
    objective = clipped_surrogate(ratio, torch.tensor(A, dtype=torch.float64), clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    (slope,) = torch.autograd.grad(objective.sum(), ratio)
    r, o, s = ratio.detach().numpy(), objective.detach().numpy(), slope.numpy()
    ax.plot(r, o, label="objective")
    ax.plot(r, s, "--", label="d objective / d ratio")
    ax.plot(r, r * A, ":", color="gray", label="unclipped ratio * A")
    ax.axvspan(1 - CLIP_LOW, 1 + CLIP_HIGH, color="C2", alpha=0.12, label="trust region")
    ax.set(title=f"A = {A:+.0f}", xlabel="ratio = pi_theta / pi_old")
    ax.legend(fontsize=8)
    flat = (r > 1 + CLIP_HIGH) if A > 0 else (r < 1 - CLIP_LOW)
    assert (s[flat] == 0).all() and (s[~flat] == A).all()  # zero slope exactly where clipped, else A
axes[0].set_ylabel("per-token objective")
plt.tight_layout()
plt.show()

# %% [markdown]
# For $A > 0$ (left) the objective rises with the ratio up to $1.28$ and is flat after it; below the
# trust region it keeps its full slope: a good token that became *less* likely is pushed back up
# without limit. For $A < 0$ (right) the objective is flat below $0.8$ (the bad token is already
# suppressed enough) and keeps its slope above: a bad token that became more likely is always pushed
# down. A few values by hand, with the asymmetric ranges:

# %%
values = {(1.5, +1): 1.28, (0.5, +1): 0.5, (0.5, -1): -0.8, (1.5, -1): -1.5, (1.1, -1): -1.1}
for (r, A), expected in values.items():
    got = clipped_surrogate(torch.tensor(r), torch.tensor(float(A)), clip_low=CLIP_LOW, clip_high=CLIP_HIGH).item()
    print(f"ratio {r}, A {A:+d}: {got:+.2f}")
    assert abs(got - expected) < 1e-6

# %% [markdown]
# ## 4. A KL penalty to a frozen reference
#
# Rewards that only check the final answer say nothing about everything else in the text. A policy
# that drifts far from the model we started from can lose fluency, forget the answer format, or find
# odd ways to please the verifier. GRPO (Shao et al. 2024) therefore subtracts $\beta\,
# \mathrm{KL}(\pi_\theta \,\|\, \pi_{\text{ref}})$ from the objective, where $\pi_{\text{ref}}$ is a
# frozen copy of the starting model. (Many recent recipes for verifiable rewards, DAPO among them, set
# $\beta = 0$; so does the default of our loss.)
#
# The exact KL at one position needs both models' full distributions over 151,936 tokens, exactly the
# vocabulary-wide tensors section 1 avoided. Instead we *estimate* it from what we have: the two
# log-probabilities of the sampled token. With $x \sim \pi_\theta$ and
# $r = \pi_{\text{ref}}(x) / \pi_\theta(x)$, Schulman (2020) compares three estimators:
#
# | | formula | mean | properties |
# |---|---|---|---|
# | k1 | $-\log r$ | KL (unbiased) | negative for many samples, high variance |
# | k2 | $\frac12 (\log r)^2$ | $\approx$ KL when the distributions are close | always $\ge 0$, low variance, biased |
# | k3 | $(r - 1) - \log r$ | KL (unbiased) | always $\ge 0$, low variance when close |
#
# k3 is k1 plus $r - 1$, a term with mean zero ($\mathbb{E}_{x\sim\pi_\theta}[r] =
# \sum_x \pi_{\text{ref}}(x) = 1$) that is negatively correlated with k1 and cancels much of its
# noise; and since $\log r \le r - 1$ it is never negative. It is the estimator of the DeepSeekMath
# paper. In terms of log-probs, with $\delta = \log\pi_{\text{ref}} - \log\pi_\theta$:
# k1 $= -\delta$, k2 $= \delta^2/2$, k3 $= e^{\delta} - \delta - 1$ (computed as `expm1(δ) - δ`,
# which stays accurate when $\delta$ is tiny).

# %%
#| export: grpo
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Elementwise estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With d = ref_logp - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (Schulman 2020).
    """
    delta = ref_logp - logp
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")


# %% [markdown]
# By hand for one token with $\pi_\theta = 0.5$ and $\pi_{\text{ref}} = 0.25$: $\delta = -\log 2$, so
# k1 $= 0.693$, k2 $= 0.240$, k3 $= 0.5 + 0.693 - 1 = 0.193$. Then a stronger check: weighting each
# outcome of a small categorical distribution by its probability, k1 and k3 must average to the exact
# KL, to rounding, and k2 must not.

# %%
gen = torch.Generator().manual_seed(4)  # this section's random numbers, the same in every mode
lp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
by_hand = {"k1": math.log(2), "k2": 0.5 * math.log(2) ** 2, "k3": 0.5 + math.log(2) - 1}
for kind, expected in by_hand.items():
    assert abs(kl_penalty(lp, ref, kind).item() - expected) < 1e-6
print({kind: round(kl_penalty(lp, ref, kind).item(), 4) for kind in KL_ESTIMATORS})

p = torch.softmax(torch.randn(50, dtype=torch.float64, generator=gen), 0)
q = torch.softmax(torch.randn(50, dtype=torch.float64, generator=gen), 0)
exact_kl = (p * (p.log() - q.log())).sum().item()
means = {kind: (p * kl_penalty(p.log(), q.log(), kind)).sum().item() for kind in KL_ESTIMATORS}
print(f"exact KL {exact_kl:.6f}; expectation of each estimator: " + ", ".join(f"{k} {v:.6f}" for k, v in means.items()))
assert abs(means["k1"] - exact_kl) < 1e-12 and abs(means["k3"] - exact_kl) < 1e-12 and abs(means["k2"] - exact_kl) > 1e-3

# %% [markdown]
# ### 4.1 Bias and variance by sampling
#
# In training we never average over all outcomes: each token is one sample. So we draw tokens from
# $\pi_\theta$ and look at each estimator's mean and standard deviation, relative to the exact KL, for
# pairs of distributions from close to far apart. Here $\pi_\theta$ is a random categorical
# distribution over 1,000 outcomes and $\pi_{\text{ref}}$ the same logits plus Gaussian noise of
# scale $\sigma$.

# %%
N_DRAWS = 100_000
print(f"{'sigma':>5} {'exact KL':>9} | {'mean / KL':^26} | {'std / KL':^26}")
print(f"{'':>5} {'':>9} | {'k1':>8} {'k2':>8} {'k3':>8} | {'k1':>8} {'k2':>8} {'k3':>8}")
kl_rows = {}
for sigma in (0.1, 0.3, 1.0, 2.0):
    logits = torch.randn(1000, dtype=torch.float64, generator=gen)
    logp_all = torch.log_softmax(logits, 0)
    ref_all = torch.log_softmax(logits + sigma * torch.randn(1000, dtype=torch.float64, generator=gen), 0)
    exact = (logp_all.exp() * (logp_all - ref_all)).sum().item()
    x = torch.multinomial(logp_all.exp(), N_DRAWS, replacement=True, generator=gen)
    est = {kind: kl_penalty(logp_all[x], ref_all[x], kind) for kind in KL_ESTIMATORS}
    kl_rows[sigma] = {kind: (e.mean().item() / exact, e.std().item() / exact) for kind, e in est.items()}
    print(f"{sigma:5.1f} {exact:9.4f} | " + " ".join(f"{kl_rows[sigma][k][0]:8.3f}" for k in KL_ESTIMATORS) + " | "
          + " ".join(f"{kl_rows[sigma][k][1]:8.2f}" for k in KL_ESTIMATORS))
assert all(abs(row["k3"][0] - 1) < 0.1 and row["k3"][1] < row["k1"][1] for s, row in kl_rows.items() if s <= 1)

# %% [markdown]
# What the table shows (ratios to the exact KL, so 1.000 is unbiased):
#
# * **k1** is unbiased, but when the distributions are close its standard deviation is many times the
#   KL itself (20 times at $\sigma = 0.1$): per token it is mostly noise, and often negative.
# * **k2** has a small spread and almost no bias while the distributions are close; as they separate
#   it overestimates (by 27% at $\sigma = 1$, nearly 2× at $\sigma = 2$).
# * **k3** stays unbiased at every distance, with the smallest or nearly the smallest spread up to
#   $\sigma = 1$. That combination is why GRPO uses it. Far apart ($\sigma = 2$) its spread grows past
#   k1's: the large ratios of the next section start to appear.
#
# ### 4.2 Why k3 needs care when the ratio is large
#
# k3 grows like $r = \pi_{\text{ref}}/\pi_\theta$ itself, exponentially in the log-ratio. Large
# ratios come from tokens the *reference* finds likely but the *policy* has pushed down. Those are
# rarely sampled, precisely because the policy finds them unlikely, so they show up as rare, huge
# values: a heavy tail. The gradient is affected too: $\partial\,\mathrm{k3} / \partial \log\pi_\theta =
# 1 - r$, unbounded. A small example: the policy gives a token probability 0.001 that the reference
# gives 0.5.

# %%
logp_all = torch.tensor([0.999, 0.001], dtype=torch.float64).log()
ref_all = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
exact = (logp_all.exp() * (logp_all - ref_all)).sum().item()
x = torch.multinomial(logp_all.exp(), N_DRAWS, replacement=True, generator=gen)
k3 = kl_penalty(logp_all[x], ref_all[x], "k3")
grad_rare = 1 - math.exp(ref_all[1] - logp_all[1])
print(f"exact KL {exact:.3f}; k3 over {N_DRAWS:,} draws: mean {k3.mean():.3f}, std {k3.std():.3f}, max {k3.max():.1f}")
print(f"the rare token: k3 = {kl_penalty(logp_all[1], ref_all[1]).item():.1f}, gradient wrt its log-prob {grad_rare:.0f}; "
      f"drawn {(x == 1).sum().item()} times (expected {N_DRAWS * logp_all[1].exp().item():.0f})")
common = x == 0
print(f"k3 without the rare draws: mean {k3[common].mean():.3f}, std {k3[common].std():.3f}")
assert k3.max() > 100 * exact

# %% [markdown]
# Every draw of the common token gives the same 0.193, so all of the estimator's variance, and most
# of its value, comes from the rare token, about 0.1% of the draws, each worth 493. Even over 100,000
# draws the mean (0.646) is 6% below the exact KL (0.685), because the rare token came up 92 times
# instead of the expected 100. In a training batch of a few thousand tokens it appears a few times or
# not at all, each time with a penalty hundreds of times the average and a gradient of about $-500$ on
# its log-probability: a sudden spike in the loss. Two
# consequences: keep $\beta$ small, and watch the largest per-token KL, not only the mean. A safeguard
# is to clamp $\delta$ (say to $\pm 10$) before the exponential; our `kl_penalty` computes the
# estimator exactly and leaves such a choice to the caller.
#
# One more subtlety, because we *differentiate* the estimator. In expectation over the sampled tokens,
# the gradient of $\beta \cdot$k1 is zero ($\mathbb{E}[\nabla\log\pi_\theta] = 0$): as a penalty k1
# does nothing on average. The gradient of k2 is $(\log\pi_\theta - \log\pi_{\text{ref}})\nabla \log
# \pi_\theta$, whose expectation is exactly $\nabla\,\mathrm{KL}(\pi_\theta\|\pi_{\text{ref}})$; the
# gradient of k3, $(1 - r)\nabla\log\pi_\theta$, has expectation $\nabla\,\mathrm{KL}(\pi_{\text{ref}}
# \| \pi_\theta)$, the KL in the other direction. Both pull the policy towards the reference (both KLs
# are zero only when the distributions agree), but an estimator with the right *value* need not have
# the right *gradient*. We check all three statements exactly on a small categorical distribution:

# %%
theta = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
ref_all = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=gen), 0)
logp_all = torch.log_softmax(theta, 0)
probs = logp_all.exp().detach()
true_forward = torch.autograd.grad((logp_all.exp() * (logp_all - ref_all)).sum(), theta, retain_graph=True)[0]
true_reverse = torch.autograd.grad((ref_all.exp() * (ref_all - logp_all)).sum(), theta, retain_graph=True)[0]
for kind, target in (("k1", torch.zeros(6, dtype=torch.float64)), ("k2", true_forward), ("k3", true_reverse)):
    # the expected gradient over x ~ pi_theta, with the sampling distribution held fixed (as in training)
    expected = torch.autograd.grad((probs * kl_penalty(logp_all, ref_all, kind)).sum(), theta, retain_graph=True)[0]
    print(f"{kind}: expected gradient {expected.numpy().round(4)}")
    assert torch.allclose(expected, target, atol=1e-12)
print(f"grad KL(pi||ref) {true_forward.numpy().round(4)}\ngrad KL(ref||pi) {true_reverse.numpy().round(4)}")

# %% [markdown]
# The same comparison on the real model needs a policy that has moved away from its reference; we
# get one in section 7, after a short training run, and repeat the table there on real tokens.

# %% [markdown]
# ## 5. Putting the loss together, and how to average it
#
# Per token the objective is now
#
# $$o_{i,t} = \min\big(\rho_{i,t} A_i,\ \operatorname{clip}(\rho_{i,t}, 1-\epsilon_{\text{low}}, 1+\epsilon_{\text{high}})A_i\big) - \beta\, k(\log\pi_\theta, \log\pi_{\text{ref}})_{i,t},$$
#
# and the loss is minus an average of $o_{i,t}$ over the valid (completion) tokens of the batch. The
# choice of average turns out to matter. With $B$ sequences, $L_i$ valid tokens in sequence $i$ and
# a generation budget of `max_tokens`:
#
# | `aggregation` | loss | each token's weight | from |
# |---|---|---|---|
# | `"sequence"` | $-\frac1B \sum_i \frac1{L_i} \sum_t o_{i,t}$ | $\frac1{B L_i}$ | GRPO (Shao et al. 2024) |
# | `"token"` | $-\frac{1}{\sum_i L_i} \sum_{i,t} o_{i,t}$ | $\frac1{\sum_i L_i}$ | DAPO (Yu et al. 2025) |
# | `"constant"` | $-\frac{1}{B \cdot \texttt{max\_tokens}} \sum_{i,t} o_{i,t}$ | $\frac1{B\cdot\texttt{max\_tokens}}$ | Dr. GRPO (Liu et al. 2025) |
#
# Two implementation rules. **Padding must be invisible**: padded positions may hold anything
# (zeros, stale values, even `inf` or `nan` from a padded log-prob), and must change neither the loss
# nor any gradient. Multiplying by the mask is not enough, because $0 \cdot \mathrm{nan} =
# \mathrm{nan}$, in the forward pass and in the backward; `grpo_loss` replaces every padded input
# (log-probs and advantages) with zero through `torch.where` before any arithmetic, which makes the
# padded positions' objective exactly zero and their gradient exactly zero.
# **The denominator must be settable**: when a batch is too large for memory and is processed as
# several micro-batches whose gradients accumulate, each micro-batch must divide by the *whole*
# batch's denominator, or the sum of the micro-batch losses is not the batch's loss. `loss_normalizer`
# computes that denominator from a mask, and `grpo_loss(..., normalizer=...)` accepts it.
#
# `old_logp` and `ref_logp` are constants of the loss: gradients flow only through `logp`. The loss
# also returns a few detached statistics worth logging at every step.

# %%
#| export: grpo
def loss_normalizer(mask: torch.Tensor, aggregation: str = "sequence", max_tokens: int | None = None) -> float:
    """The denominator `grpo_loss` divides by for a batch with this (B, T) mask.

    "sequence": B; "token": the number of valid tokens; "constant": B * max_tokens. For gradient
    accumulation compute it on the whole batch and pass it to every micro-batch's `grpo_loss`.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "sequence":
        return float(mask.shape[0])
    if aggregation == "token":
        return float(max(int(mask.bool().sum()), 1))
    if max_tokens is None or max_tokens < 1:
        raise ValueError("aggregation='constant' needs max_tokens >= 1 (the generation budget)")
    return float(mask.shape[0] * max_tokens)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, clip_low: float = 0.2, clip_high: float = 0.2,
              kl: str = "k3", aggregation: str = "sequence", max_tokens: int | None = None,
              normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and detached statistics. logp, old_logp, ref_logp, mask: (B, T); advantages: (B,).

    Per valid token: min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) - beta * kl_penalty,
    with ratio = exp(logp - old_logp); the loss is minus its aggregate ("sequence": mean over sequences
    of each one's token mean; "token": sum / number of valid tokens; "constant": sum / (B * max_tokens)).
    `normalizer` replaces the batch's own denominator (see `loss_normalizer`) so that micro-batch losses
    add up to the full batch's. Padded positions (mask 0) never affect the loss or its gradient, whatever
    they hold. Gradients flow through `logp` only. Computes in float32, or float64 for float64 inputs.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must share one (B, T) shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    if normalizer is None:
        normalizer = loss_normalizer(mask, aggregation, max_tokens)
    elif aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    valid = mask.bool()
    dtype = torch.promote_types(logp.dtype, torch.float32)

    def clean(x: torch.Tensor) -> torch.Tensor:  # padding may hold nan/inf: replace it before any arithmetic
        return torch.where(valid, x.to(dtype), 0.0)

    logp = clean(logp)
    ratio = torch.exp(logp - clean(old_logp.detach()))
    adv = clean(advantages.detach()[:, None].expand_as(valid))
    objective = clipped_surrogate(ratio, adv, clip_low=clip_low, clip_high=clip_high)
    kl_values = None
    if ref_logp is not None:
        kl_values = kl_penalty(logp, clean(ref_logp.detach()), kl)
        if beta != 0:
            objective = objective - beta * kl_values
    # padded positions now hold ratio 1, advantage 0 and KL 0: their objective is exactly 0
    lengths = valid.sum(dim=1)
    if aggregation == "sequence":
        total = (objective.sum(dim=1) / lengths.clamp(min=1)).sum()
    else:
        total = objective.sum()
    loss = -total / normalizer

    with torch.no_grad():
        count = lengths.sum().clamp(min=1)
        low = valid & (adv < 0) & (ratio < 1 - clip_low)
        high = valid & (adv > 0) & (ratio > 1 + clip_high)
        stats = {"clip_low_fraction": low.sum() / count, "clip_high_fraction": high.sum() / count,
                 "clip_fraction": (low | high).sum() / count,
                 "ratio_mean": torch.where(valid, ratio, 0.0).sum() / count,
                 "ratio_max": torch.where(valid, ratio, 0.0).max(),
                 "tokens": lengths.sum()}
        if kl_values is not None:
            stats["kl_mean"] = torch.where(valid, kl_values, 0.0).sum() / count
            stats["kl_max"] = torch.where(valid, kl_values, 0.0).max()
    return loss, {k: v.detach() for k, v in stats.items()}


# %% [markdown]
# A value by hand for each aggregation. Two sequences, the first with 2 valid tokens (ratios 1 and
# 1.5, $A = +1$), the second with 3 (ratios 0.5, 1, 1, $A = -1$), clipping at $\pm 0.2$. Per token:
# $(1, \min(1.5, 1.2) = 1.2)$ and $(\min(-0.5, -0.8) = -0.8, -1, -1)$. Then
#
# * sequence: $-\frac12\big(\frac{1 + 1.2}{2} + \frac{-0.8 - 1 - 1}{3}\big) = -\frac12(1.1 - 0.9\overline{3}) = -0.08\overline{3}$;
# * token: $-\frac{2.2 - 2.8}{5} = 0.12$;
# * constant with `max_tokens` = 4: $-\frac{-0.6}{2 \cdot 4} = 0.075$.
#
# The padded position holds `nan` to show it cannot leak. Two of the five tokens are clipped: one at
# the top, one at the bottom.

# %%
nan = float("nan")
logp_hand = torch.log(torch.tensor([[1.0, 1.5, nan], [0.5, 1.0, 1.0]]))
old_hand = torch.zeros(2, 3)
mask_hand = torch.tensor([[1, 1, 0], [1, 1, 1]])
adv_hand = torch.tensor([1.0, -1.0])
for aggregation, expected in (("sequence", -1 / 12), ("token", 0.12), ("constant", 0.075)):
    loss, stats = grpo_loss(logp_hand, old_hand, adv_hand, mask_hand, aggregation=aggregation, max_tokens=4)
    print(f"{aggregation:9}: loss {loss.item():+.4f} (by hand {expected:+.4f})")
    assert abs(loss.item() - expected) < 1e-6
print({k: round(v.item(), 3) for k, v in stats.items()})
expected_stats = {"clip_low_fraction": 0.2, "clip_high_fraction": 0.2, "clip_fraction": 0.4, "ratio_mean": 1.0, "ratio_max": 1.5}
assert all(abs(stats[k].item() - v) < 1e-6 for k, v in expected_stats.items()) and stats["tokens"].item() == 5

# %% [markdown]
# ### 5.1 The length bias, on a worked example
#
# Take one short response of 5 tokens and one long one of 50, both with advantage $A = +1$, on-policy
# (ratio 1, so no clipping), and a generation budget of 64 tokens. The gradient of the loss with
# respect to each token's log-prob is minus that token's weight times $A$ (section 6 derives this), so
# autograd reads the weights off directly.

# %%
lengths = (5, 50)
T_max = 64
mask_ex = torch.zeros(2, T_max)
for i, n in enumerate(lengths):
    mask_ex[i, :n] = 1
print(f"{'aggregation':12} {'weight/token':>24} {'total weight':>24}")
print(f"{'':12} {'short':>11} {'long':>12} {'short':>11} {'long':>12}")
weights = {}
for aggregation in AGGREGATIONS:
    logp_ex = torch.zeros(2, T_max, requires_grad=True)
    loss, _ = grpo_loss(logp_ex, torch.zeros(2, T_max), torch.ones(2), mask_ex, aggregation=aggregation, max_tokens=T_max)
    (grad,) = torch.autograd.grad(loss, logp_ex)
    w = -grad
    weights[aggregation] = w
    print(f"{aggregation:12} {w[0, 0]:11.4f} {w[1, 0]:12.4f} {w[0].sum():11.3f} {w[1].sum():12.3f}")
assert torch.allclose(weights["sequence"][0, :5], torch.full((5,), 1 / 10)) and torch.allclose(weights["sequence"][1, :50], torch.full((50,), 1 / 100))
assert torch.allclose(weights["token"][mask_ex.bool()], torch.full((55,), 1 / 55))
assert torch.allclose(weights["constant"][mask_ex.bool()], torch.full((55,), 1 / 128))
assert all((w[~mask_ex.bool()] == 0).all() for w in weights.values())

# %% [markdown]
# * **Sequence mean** gives each *response* the same total weight (0.5 each), so a token of the short
#   response weighs ten times a token of the long one. Liu et al. (2025) point out what that does to
#   wrong answers ($A < 0$): the penalty per token is smaller the longer the response, so long wrong
#   answers are discouraged least, and for correct answers the short ones are reinforced most. The
#   result is a pressure toward long *incorrect* responses, which shows up as response length growing
#   during training without the accuracy to match.
# * **Token mean** gives every token the same weight (1/55), so the long response carries ten times
#   the weight of the short one, as its tokens number ten times as many. But the weight depends on how
#   many tokens the *whole batch* has, which changes from step to step.
# * **Constant** (1/128 here) gives every token the same weight at every step: the loss is a plain
#   sum, scaled by a number fixed in advance. It is the token mean with the batch-dependent denominator
#   replaced by the largest it could be.
#
# ### 5.2 Micro-batches
#
# A batch that does not fit in memory is split into micro-batches whose gradients add up before one
# optimizer step. For that to be the *same* step as on the whole batch, the micro-batch losses must
# add up to the batch's loss. Each micro-batch gets the whole batch's `loss_normalizer`; we check
# values and gradients for every aggregation, with micro-batches of unequal sizes and lengths, and
# show what goes wrong for the token mean when each micro-batch divides by its own count instead.

# %%
gen = torch.Generator().manual_seed(5)
B, T = 6, 7
lp_full = (torch.randn(B, T, dtype=torch.float64, generator=gen) * 0.1 - 1).requires_grad_()
old_full = lp_full.detach() + torch.randn(B, T, dtype=torch.float64, generator=gen) * 0.2
ref_full = lp_full.detach() + torch.randn(B, T, dtype=torch.float64, generator=gen) * 0.2
mask_full = (torch.arange(T) < torch.tensor([7, 1, 4, 6, 2, 5])[:, None]).long()
adv_full = torch.randn(B, dtype=torch.float64, generator=gen)
splits = [slice(0, 2), slice(2, 6)]
for aggregation in AGGREGATIONS:
    kwargs = dict(ref_logp=ref_full, beta=0.1, clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_tokens=T)
    full, _ = grpo_loss(lp_full, old_full, adv_full, mask_full, **kwargs)
    (g_full,) = torch.autograd.grad(full, lp_full)
    Z = loss_normalizer(mask_full, aggregation, max_tokens=T)
    micro = [grpo_loss(lp_full[s], old_full[s], adv_full[s], mask_full[s], **{**kwargs, "ref_logp": ref_full[s]},
                       normalizer=Z)[0] for s in splits]
    (g_micro,) = torch.autograd.grad(sum(micro), lp_full)
    own = [grpo_loss(lp_full[s], old_full[s], adv_full[s], mask_full[s], **{**kwargs, "ref_logp": ref_full[s]})[0]
           for s in splits]
    print(f"{aggregation:9}: full {full.item():+.6f}, sum of micro-batches {sum(micro).item():+.6f}, "
          f"mean of micro-batches with their own denominators {sum(own).item() / len(own):+.6f}")
    assert torch.allclose(sum(micro), full, atol=1e-12) and torch.allclose(g_micro, g_full, atol=1e-12)

# %% [markdown]
# With the whole batch's denominator the micro-batches reproduce the full batch to rounding error, in
# value and gradient. With their own denominators they do not, except by coincidence: for the token
# mean the two micro-batches have 8 and 17 tokens, and averaging their means weights a token of the
# first about twice as much as a token of the second.
#
# ## 6. Gradient checks
#
# Finally the whole loss against an independent derivation. Write $c_{i,t}$ for the weight of token
# $(i, t)$ from the table of section 5 ($\frac1{BL_i}$, $\frac1{\sum L}$ or $\frac1{B\cdot
# \texttt{max\_tokens}}$, or 1 / `normalizer`), $m_{i,t}$ for the mask and $\ell_{i,t} = \log
# \pi_\theta(o_{i,t})$, so that $L = -\sum_{i,t} c_{i,t} m_{i,t} o_{i,t}$. Since $\rho = \exp(\ell -
# \ell_{\text{old}})$, we have $\partial\rho / \partial\ell = \rho$, and:
#
# * **The clipped term.** If the minimum picks the clipped branch and that branch is flat, the term
#   is a constant: this happens exactly when $A > 0$ and $\rho > 1 + \epsilon_{\text{high}}$, or $A <
#   0$ and $\rho < 1 - \epsilon_{\text{low}}$. Everywhere else the term equals $\rho A$ (inside the
#   range both branches agree), with derivative $\rho A$.
# * **The KL term**, with $\delta = \ell_{\text{ref}} - \ell$: k1 $= -\delta$ has derivative 1; k2
#   $= \delta^2/2$ has derivative $-\delta$; k3 $= e^\delta - \delta - 1$ has derivative $1 - e^\delta$.
#
# Together:
#
# $$\frac{\partial L}{\partial \ell_{i,t}} = -c_{i,t}\, m_{i,t} \Big(\mathbb{1}[\text{not clipped}]\,\rho_{i,t} A_i - \beta\,k'(\delta_{i,t})\Big).$$
#
# On-policy ($\rho = 1$, $\beta = 0$) this is $-c_{i,t} A_i$: the policy gradient with a baseline,
# each token weighted by its aggregation weight. We implement the formula separately and compare it to
# autograd for every aggregation and estimator, with asymmetric clipping, padding holding `nan`, and
# ratios on both sides of both clipping bounds.

# %%
def hand_gradient(logp, old_logp, advantages, mask, ref_logp, *, beta, clip_low, clip_high, kl, aggregation, max_tokens):
    """dL/dlogp from the formula above (NumPy-style, no autograd)."""
    m = mask.bool()
    lp, old, ref = (torch.where(m, x, 0.0) for x in (logp, old_logp, ref_logp))
    rho = torch.exp(lp - old)
    A = advantages[:, None]
    clipped = ((A > 0) & (rho > 1 + clip_high)) | ((A < 0) & (rho < 1 - clip_low))
    delta = ref - lp
    k_prime = {"k1": torch.ones_like(delta), "k2": -delta, "k3": -torch.expm1(delta)}[kl]
    L = m.sum(1, keepdim=True).double()
    c = {"sequence": 1 / (mask.shape[0] * L), "token": 1 / L.sum(), "constant": 1 / (mask.shape[0] * max_tokens)}[aggregation]
    return torch.where(m, -c * ((~clipped) * rho * A - beta * k_prime), 0.0)


gen = torch.Generator().manual_seed(6)
B, T = 5, 6
g64 = dict(dtype=torch.float64, generator=gen)
lp = (torch.randn(B, T, **g64) * 0.5 - 1).requires_grad_()
old = lp.detach() + torch.rand(B, T, **g64) * 1.2 - 0.6  # ratios from 0.55 to 1.8: all regions
ref = lp.detach() + torch.randn(B, T, **g64) * 0.5
mask_g = (torch.arange(T) < torch.tensor([6, 3, 1, 4, 5])[:, None]).long()
adv_g = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9], dtype=torch.float64)
old[mask_g == 0] = nan
ref[mask_g == 0] = nan
rho = torch.exp(lp.detach() - old)[mask_g.bool()]
print(f"valid tokens below 1 - clip_low: {(rho < 0.8).sum().item()}, above 1 + clip_high: {(rho > 1.28).sum().item()}")
assert (rho < 0.8).any() and (rho > 1.28).any()
worst = 0.0
for aggregation in AGGREGATIONS:
    for kind in KL_ESTIMATORS:
        opts = dict(beta=0.05, clip_low=0.2, clip_high=0.28, kl=kind, aggregation=aggregation, max_tokens=T)
        loss, _ = grpo_loss(lp, old, adv_g, mask_g, ref_logp=ref, **opts)
        (auto,) = torch.autograd.grad(loss, lp)
        hand = hand_gradient(lp.detach(), old, adv_g, mask_g, ref, **opts)
        worst = max(worst, (auto - hand).abs().max().item())
        assert torch.isfinite(auto).all() and (auto[mask_g == 0] == 0).all()
print(f"autograd vs the hand derivation, 3 aggregations x 3 estimators: max |difference| {worst:.1e}")
assert worst < 1e-12

# %% [markdown]
# And against finite differences: `torch.autograd.gradcheck` perturbs each input entry by $10^{-6}$
# in float64 and compares the numerical slope with autograd's. The clipping kinks are the only
# non-differentiable points, so we move any ratio that lies within $10^{-3}$ of a bound away from it.

# %%
old_fd = torch.where(mask_g.bool(), old, 0.0)
rho = torch.exp(lp.detach() - old_fd)
for bound in (0.8, 1.28):
    near = (rho - bound).abs() < 1e-3
    old_fd = torch.where(near, old_fd + 0.01, old_fd)
for aggregation in AGGREGATIONS:
    for kind in KL_ESTIMATORS:
        def f(x, aggregation=aggregation, kind=kind):
            return grpo_loss(x, old_fd, adv_g, mask_g, ref_logp=torch.where(mask_g.bool(), ref, 0.0), beta=0.05,
                             clip_low=0.2, clip_high=0.28, kl=kind, aggregation=aggregation, max_tokens=T)[0]
        assert torch.autograd.gradcheck(f, (lp.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-8)
print("gradcheck passed for 3 aggregations x 3 estimators")

# %% [markdown]
# ## 7. A first real run
#
# Every part is checked; now we connect them and let the real model learn. The loop is the smallest
# that deserves the name GRPO: for each step, take $P$ prompts, sample $G$ completions of each from
# the *current* model, reward them with the chapter 2 verifier, turn rewards into group advantages,
# score the same tokens with gradients, and take one AdamW step on the clipped loss. No reference
# model, no schedule, no checkpoints: chapter 6 adds those.
#
# **The task** must show learning within about a quarter of an hour on two CPU cores, so each
# completion must be short and the reward must sometimes be earned from the start (a group whose
# answers are all wrong teaches nothing, section 2.3). Two-digit multiplication with a strict
# budget does both: "What is 47 × 86? Put the final answer in \boxed{}", at most 64 new tokens. The
# instruct model likes to explain its arithmetic at length, so many answers run out of tokens before
# the box and earn 0 (a truncated response without a stated answer counts as no answer, the rule of
# chapter 2); some are short enough and right. What the policy can learn here is a mix of *format*
# (box the answer), *length* (finish within budget) and *correctness*: we measure all three rather
# than guess which one moved.
#
# Settings: $P = 4$ prompts × $G = 8$ samples per step at temperature 1, AdamW, float32 master
# weights with bf16 matrix products where the CPU has them, token-mean aggregation, no KL term.
# The learning rate came from two short pilots on *training* problems (the same generator, another
# split): at $10^{-5}$ a single step collapsed the policy into short wrong guesses (training reward
# 0.125 at step 0, then 0 for five steps in a row, every completion about 12 tokens, none boxed); at
# $10^{-6}$ the training reward stayed above zero (0.44, 0.16, 0.09 over the next three steps) while
# the answers also got much shorter. Adam's first steps move *every* weight by about the learning
# rate, whatever the gradient's size, so a rate that is tame for supervised fine-tuning can be
# violent here. Before and after training we
# evaluate greedy decoding on 64 held-out problems. The run's record (rewards, lengths, timings,
# sample answers) is cached in `data/results/`, so re-executing the notebook does not retrain.

# %%
import json
import random

from rlscratch.generate import chat_prompt, derive_seed, pack_for_cpu
from rlscratch.model import resolve_dtype
from rlscratch.results import cached_result
from rlscratch.verify import score_response

FIRST_RUN = dict(steps=3 if SMOKE else 16, prompts=2 if SMOKE else 4, group=4 if SMOKE else 8,
                 max_new_tokens=16 if SMOKE else 64, lr=1e-6, eval_problems=8 if SMOKE else 64, seed=0)


def multiplication(index: int, split: str) -> tuple[str, str]:
    """Problem `index` of a split ("train" or "test"): a two-digit product and its answer."""
    rng = random.Random(derive_seed("multiply", split, index))
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return f"What is {a} × {b}? Put the final answer in \\boxed{{}}.", str(a * b)


def reward_of(completion, gold: str) -> float:
    return float(score_response(completion.text, gold, truncated=completion.finish_reason == "length").correct)


def greedy_accuracy(policy, n: int) -> dict:
    problems = [multiplication(i, "test") for i in range(n)]
    prompts = [chat_prompt(tokenizer, q) for q, _ in problems]
    outs = generate(policy, tokenizer, prompts, max_new_tokens=FIRST_RUN["max_new_tokens"], batch_size=32)
    rewards = [reward_of(o, gold) for o, (_, gold) in zip(outs, problems)]
    return {"accuracy": sum(rewards) / n, "boxed": sum("\\boxed" in o.text for o in outs) / n,
            "truncated": sum(o.finish_reason == "length" for o in outs) / n,
            "length": sum(len(o.token_ids) for o in outs) / n, "samples": [o.text for o in outs[:3]]}


def first_run() -> dict:
    """The minimal GRPO loop of this chapter; returns its record (no weights are kept)."""
    cfg = FIRST_RUN
    policy, _ = load_model(MODEL, dtype=torch.float32, device=DEVICE)  # float32 master weights
    compute = resolve_dtype("auto", DEVICE)
    autocast = torch.autocast(DEVICE, dtype=compute, enabled=compute != torch.float32)
    pack_for_cpu(policy)  # fast generation; the packed weights follow every optimizer step
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["lr"], weight_decay=0.0)
    record = {"settings": cfg, "compute_dtype": str(compute), "steps": []}
    with autocast:
        record["before"] = greedy_accuracy(policy.eval(), cfg["eval_problems"])
    for step in range(cfg["steps"]):
        t0 = time.perf_counter()
        problems = [multiplication(step * cfg["prompts"] + i, "train") for i in range(cfg["prompts"])]
        prompts = [chat_prompt(tokenizer, q) for q, _ in problems]
        policy.eval()
        with autocast:
            outs = generate(policy, tokenizer, prompts, n=cfg["group"], temperature=1.0,
                            max_new_tokens=cfg["max_new_tokens"], batch_size=len(prompts) * cfg["group"],
                            seed=[derive_seed(cfg["seed"], step, i) for i in range(len(prompts))])
        t1 = time.perf_counter()
        rewards = torch.tensor([reward_of(o, problems[o.prompt_index][1]) for o in outs])
        advantages = group_advantages(rewards, cfg["group"])
        prompt_ids = [tokenizer.encode(prompts[o.prompt_index], add_special_tokens=False) for o in outs]
        batch = completion_batch(prompt_ids, [o.token_ids for o in outs], pad_id=tokenizer.pad_token_id)
        policy.train()
        with autocast:
            logp = sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.completion_mask,
                                     chunk_size=CHUNK_SIZE)
        loss, stats = grpo_loss(logp, logp.detach(), advantages, batch.completion_mask, aggregation="token")
        optimizer.zero_grad(set_to_none=True)
        if advantages.abs().sum() > 0:  # all-equal groups everywhere: no signal, skip the update
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
            optimizer.step()
        else:
            grad_norm = 0.0
        row = {"step": step, "reward": rewards.mean().item(), "loss": loss.item(), "grad_norm": grad_norm,
               "length": sum(len(o.token_ids) for o in outs) / len(outs),
               "truncated": sum(o.finish_reason == "length" for o in outs) / len(outs),
               "boxed": sum("\\boxed" in o.text for o in outs) / len(outs),
               "signal_groups": int((rewards.view(-1, cfg["group"]).std(1) > 0).sum()),
               "generate_s": t1 - t0, "update_s": time.perf_counter() - t1}
        record["steps"].append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    policy.eval()
    del optimizer  # frees the optimizer state (twice the weights) before loading the reference model
    with autocast:
        record["after"] = greedy_accuracy(policy, cfg["eval_problems"])
    record["kl"] = kl_on_real_tokens(policy, autocast)
    return record


def kl_on_real_tokens(policy, autocast, problems: int = 4, samples: int = 4) -> dict:
    """Section 4's estimators on tokens the trained policy samples, against the exact per-position KL
    to the starting model (full distributions over the vocabulary, float32)."""
    reference, _ = load_model(MODEL, dtype=torch.float32, device=DEVICE)  # the starting weights
    prompts = [chat_prompt(tokenizer, multiplication(i, "test")[0]) for i in range(problems)]
    with autocast:
        outs = generate(policy, tokenizer, prompts, n=samples, temperature=1.0,
                        max_new_tokens=FIRST_RUN["max_new_tokens"], seed=[derive_seed("kl", i) for i in range(problems)])
    prompt_ids = [tokenizer.encode(prompts[o.prompt_index], add_special_tokens=False) for o in outs]
    batch = completion_batch(prompt_ids, [o.token_ids for o in outs], pad_id=tokenizer.pad_token_id)
    mask = batch.completion_mask.bool()
    with torch.no_grad():  # full float32 distributions at every position that predicts a completion token
        logp_all, ref_all = (torch.log_softmax(m.lm_head(m(batch.input_ids, attention_mask=batch.attention_mask,
                                                            return_hidden=True)[:, :-1][mask[:, 1:]]).float(), -1)
                             for m in (policy, reference))
    del reference
    targets = batch.input_ids[:, 1:][mask[:, 1:]]
    exact = (logp_all.exp() * (logp_all - ref_all)).sum(-1)  # KL(policy || reference) at each position
    logp, ref = logp_all.gather(-1, targets[:, None])[:, 0], ref_all.gather(-1, targets[:, None])[:, 0]
    rows = {kind: {"mean": kl_penalty(logp, ref, kind).mean().item(), "std": kl_penalty(logp, ref, kind).std().item(),
                   "max": kl_penalty(logp, ref, kind).max().item()} for kind in KL_ESTIMATORS}
    return {"tokens": int(mask.sum()), "exact_mean": exact.mean().item(), "exact_std": exact.std().item(),
            "exact_max": exact.max().item(), "estimators": rows}


if SMOKE:  # never mix smoke-model results into the real ones
    import tempfile

    os.environ["RLSCRATCH_RESULTS"] = tempfile.mkdtemp()
run = cached_result(f"05_first_run_{MODEL.replace(':', '_').replace('/', '_')}", first_run)

# %% [markdown]
# The reward per step, and what moved with it: the share of answers that ran out of tokens, the
# share that used the box, and the mean length. Each point is 32 samples (4 problems × 8), so
# single steps are noisy; watch the trend.

# %%
import matplotlib.pyplot as plt

steps = run["steps"]
xs = [r["step"] for r in steps]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ax1.plot(xs, [r["reward"] for r in steps], "o-", label="reward (fraction correct)")
ax1.plot(xs, [r["truncated"] for r in steps], "s--", label="ran out of tokens")
ax1.plot(xs, [r["boxed"] for r in steps], "^:", label="used \\boxed{}")
ax1.set(xlabel="optimizer step", ylabel="fraction of 32 samples", ylim=(-0.05, 1.05), title="training samples")
ax1.legend(fontsize=8)
ax2.plot(xs, [r["length"] for r in steps], "o-", color="C3")
ax2.set(xlabel="optimizer step", ylabel="tokens per completion", title="completion length")
plt.tight_layout()
plt.show()
before, after = run["before"], run["after"]
n_eval = run["settings"]["eval_problems"]
print(f"greedy, {n_eval} held-out problems     before   after")
for key, label in (("accuracy", "accuracy"), ("boxed", "used \\boxed{}"), ("truncated", "ran out of tokens"),
                   ("length", "mean tokens")):
    fmt = "{:8.1f}" if key == "length" else "{:8.1%}"
    print(f"{label:<32}" + fmt.format(before[key]) + fmt.format(after[key]))
seconds = sum(r["generate_s"] + r["update_s"] for r in steps)
print(f"{len(steps)} steps in {seconds / 60:.1f} min ({sum(r['generate_s'] for r in steps) / seconds:.0%} generating)")
for label, record in (("before", before), ("after", after)):
    for text in record["samples"][:2]:
        print(f"{label}: {text[:160]!r}")

# %% [markdown]
# **What it learned.** On the 64 held-out problems, greedy accuracy went from 12.5% (8 of 64) to
# 28.1% (18 of 64); a two-proportion test gives p ≈ 0.03 (unpaired: the run kept only the totals, so
# we cannot pair problems; for paired data this test is usually the conservative one). The mechanism
# is visible in the other rows: before training three answers in four ran out of the 64-token budget
# while explaining the multiplication, and a truncated answer earns nothing; after sixteen steps
# *no* answer is truncated, the mean length fell from about 59 to 14 tokens, and the model states a
# product directly ("69 × 95 equals 6505.", wrong by 50). It also stopped using `\boxed{}`, which
# the reward never required: the chapter 2 verifier accepts a final number without a box when the
# response is complete. So GRPO found the cheapest way to earn this reward, *finish within budget
# with a number*, not better arithmetic: about a quarter of the direct guesses are right. The first
# step did most of it (length 34 → 14 tokens; section 7's pilots showed the same), which is why the
# learning rate matters so much. The training reward per step is noisy (4 new problems each step,
# and most groups have one or no correct answer: `signal_groups` was 1-3 of 4) and has no clear
# trend after step 1; the held-out evaluation, with the same 64 problems before and after, is the
# measurement to trust.
#
# Chapter 6 repeats this on GSM8K with the pieces left out here: a KL penalty to the starting
# model, a learning-rate warm-up, a token budget that leaves room to reason, and an evaluation
# with the chain-of-thought prompt.

# %% [markdown]
# **Section 4's estimators on real tokens.** The trained policy has moved away from the starting
# model, which gives us a real pair of distributions. We sample completions from the policy, compute
# the *exact* KL to the starting model at every position from the two full 151,936-way
# distributions, and compare the per-token estimators with it. In training only the sampled token's
# log-probs are available, which is why the estimators exist at all.

# %%
kl = run["kl"]
print(f"{kl['tokens']} sampled tokens; exact KL(policy || start) per position: mean {kl['exact_mean']:.4f}, "
      f"std {kl['exact_std']:.4f}, max {kl['exact_max']:.3f}")
print(f"{'estimator':>9} {'mean':>9} {'mean/exact':>11} {'std':>9} {'max':>9}")
for kind, row in kl["estimators"].items():
    print(f"{kind:>9} {row['mean']:9.4f} {row['mean'] / max(kl['exact_mean'], 1e-12):11.2f} {row['std']:9.4f} {row['max']:9.3f}")

# %% [markdown]
# After sixteen steps the policy is far from its start: 0.24 nats of KL per token on average, up to
# 1.4 at single positions. On these 267 tokens k1 lands close to the exact mean and k2 overestimates,
# as in the toy table of section 4.1. k3's mean is three times the exact value, but not because k3
# is biased: its standard deviation per token is 9.5, so the standard error of a 267-token mean is
# about 0.58, and the excess comes from a handful of tokens (the largest single value is 154) at
# which the starting model gave the sampled token a far *higher* probability than the policy now
# does. That is section 4.2's heavy tail, seen on real text: once the policy has moved this far, a
# k3 penalty is dominated by a few tokens, which is one reason GRPO keeps β small and the policy
# close to its reference.

# %% [markdown]
# ## Summary
#
# `rlscratch.grpo` now holds every part of the GRPO loss, each a function on tensors:
#
# * `token_logprobs` and `sequence_logprobs`: log-probs of sampled tokens in float32, the vocabulary
#   head in chunks and on completion positions only (`head_logprobs`, with `HeadLogprobs`' hand-written
#   backward pass: its logits recomputed in float32, kept in 16 bits), so the batch × length × vocabulary
#   logits never exist; `completion_batch`
#   lays out prompts and completions for it. They match the sampler's records to $2 \cdot 10^{-6}$ in float32;
#   in bfloat16 the two differ by rounding.
# * `group_advantages`: group-relative advantages with the three scalings; groups of equal rewards
#   give exactly zero and, on our model's chapter 3 rollouts, are a large share of all groups.
# * `clipped_surrogate`: PPO's clipping with DAPO's separate lower and upper ranges.
# * `kl_penalty`: Schulman's k1, k2 and k3; k3 is unbiased and low-variance near the reference but
#   heavy-tailed far from it.
# * `grpo_loss` and `loss_normalizer`: the three aggregations and their length biases, padding that
#   cannot leak, and a denominator that makes micro-batches add up to the batch. Its gradient matches
#   the hand derivation and finite differences.
#
# Chapter 6 puts these parts into the training loop.
#
# ## Exercises
#
# Solutions are in hidden cells below each exercise (click to expand).
#
# **1. The difficulty bias.** In a group of $G = 8$ with $k$ correct answers, compute the advantage
# of a correct answer and of a wrong one under `scale="group"` and `scale="none"`, for $k = 1 \dots
# 7$. Which questions does the per-group std favour?

# %% jupyter={"source_hidden": true} tags=["hide-input"]
print(f"{'k':>2} {'group: right':>13} {'wrong':>7} {'total |A|':>10} {'none: right':>12} {'wrong':>7} {'total |A|':>10}")
for k in range(1, 8):
    r = torch.tensor([1.0] * k + [0.0] * (8 - k))
    g, n = group_advantages(r, 8, scale="group"), group_advantages(r, 8, scale="none")
    print(f"{k:2d} {g[0]:13.3f} {g[-1]:7.3f} {g.abs().sum():10.2f} {n[0]:12.3f} {n[-1]:7.3f} {n.abs().sum():10.2f}")
# Without the std a right answer gets 1 - k/8 and a wrong one -k/8; the group's total push, sum |A| =
# 2k(8-k)/8, is 4 at k = 4 but only 1.75 at k = 1 or 7. Dividing by the std sqrt(k(8-k)/56) makes the
# total sqrt(56 k (8-k)) / 4: 7.5 at k = 4 and 4.9 at k = 1 or 7. The extremes go from 44% to 66% of the
# middle question's weight: the per-group std favours questions the model almost always gets right (or
# wrong), relative to the unscaled advantages. And a lone right answer (k = 1) gets 2.47 with the std
# against 0.875 without.

# %% [markdown]
# **2. Why `torch.where`.** Write the sequence aggregation as `((objective * mask).sum(1) /
# mask.sum(1)).mean()` and feed it a log-prob of `nan` in a padded position. What happens to the loss
# and to the gradient, and what would that do to the model's parameters?

# %% jupyter={"source_hidden": true} tags=["hide-input"]
lp_x = torch.tensor([[-1.0, -1.1, nan]], requires_grad=True)
m_x = torch.tensor([[1.0, 1.0, 0.0]])
objective_x = torch.exp(lp_x - (-1.0)) * 1.0  # ratio * A with old log-probs -1 and A = 1 (ratios 1 and 0.9)
naive = -((objective_x * m_x).sum(1) / m_x.sum(1)).mean()
naive.backward()
print(f"multiplying by the mask: loss {naive.item()}, gradient {lp_x.grad.tolist()}")
lp_x.grad = None
safe, _ = grpo_loss(lp_x, torch.full((1, 3), -1.0), torch.ones(1), m_x)
safe.backward()
print(f"grpo_loss: loss {safe.item():.4f}, gradient {lp_x.grad.tolist()}")
# nan * 0 = nan in the forward pass, so the loss is nan, and the padded position's gradient is nan too.
# Backpropagated into the model, that nan would reach every parameter, and one optimizer step would
# turn all the weights into nan. torch.where selects instead of multiplying,
# so the padded value is never part of any arithmetic and its gradient is exactly 0.

# %% [markdown]
# **3. Clip-higher in numbers.** Suppose every update pushes a good token's ratio to the upper clip
# bound. How many updates does it take to raise its probability from 0.01 to 0.1 with
# $\epsilon_{\text{high}} = 0.2$, and with 0.28?

# %% jupyter={"source_hidden": true} tags=["hide-input"]
for eps_high in (0.2, 0.28):
    print(f"eps_high={eps_high}: {math.ceil(math.log(10) / math.log(1 + eps_high))} updates")
# Each update multiplies the probability by at most 1 + eps_high: log(10) / log(1.2) = 12.6 -> 13 updates,
# log(10) / log(1.28) = 9.3 -> 10 updates. A probability of 0.9 needs one update either way to hit 1.

# %% [markdown]
# **4. Token mean without the shared denominator.** Split a batch into two micro-batches with $n_1$
# and $n_2$ valid tokens and average their token-mean losses. What weight does each token get? When
# does it equal the full batch's token mean?

# %% jupyter={"source_hidden": true} tags=["hide-input"]
n1, n2 = 8, 17
print(f"weights: 1/(2 n1) = {1 / (2 * n1):.4f} for the first micro-batch, 1/(2 n2) = {1 / (2 * n2):.4f} "
      f"for the second; the full batch gives 1/(n1 + n2) = {1 / (n1 + n2):.4f} to every token")
# Averaging micro-batch means gives each micro-batch equal total weight, like the sequence mean does
# for sequences: tokens of the micro-batch with fewer tokens weigh more. It equals the full token mean
# only when n1 = n2 (then 1/(2 n1) = 1/(n1 + n2)).
