"""rlscratch.grpo: hand-computed cases for every function, padding, float64, gradients, accumulation."""
import math

import pytest
import torch

from rlscratch.grpo import (AGGREGATIONS, KL_ESTIMATORS, clipped_surrogate, completion_batch, group_advantages,
                            grpo_loss, head_logprobs, kl_penalty, loss_normalizer, sequence_logprobs, token_logprobs)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- token_logprobs

def test_token_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    out = token_logprobs(logits, torch.tensor([1, 0]))
    assert torch.allclose(out, torch.tensor([math.log(0.75), math.log(0.5)]))
    # temperature 2: logits (0, ln 3 / 2) -> p(1) = sqrt3 / (1 + sqrt3)
    out_t = token_logprobs(logits[:1], torch.tensor([1]), temperature=2.0)
    assert abs(out_t.item() - math.log(math.sqrt(3) / (1 + math.sqrt(3)))) < 1e-6


def test_token_logprobs_matches_log_softmax_and_computes_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50) * 4
    targets = torch.randint(0, 50, (2, 5))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, targets, temperature=0.7), expected, atol=1e-6)
    low = logits.bfloat16()
    out = token_logprobs(low, targets)
    assert out.dtype == torch.float32
    assert torch.equal(out, token_logprobs(low.float(), targets))  # float32 math on the bf16 values
    assert token_logprobs(logits.double(), targets).dtype == torch.float64


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), temperature=0.0)


# ---------------------------------------------------------------- group_advantages

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    s2 = 1 / math.sqrt(2)  # groups of 2: centred +-0.5, sample std sqrt(0.5)
    assert torch.allclose(group_advantages(r, 2), torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s2 + 1e-6))
    s4 = math.sqrt(1 / 3)  # one group of 4: centred +-0.5, sample std sqrt(4 * 0.25 / 3)
    assert torch.allclose(group_advantages(r, 4), torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s4 + 1e-6))
    assert torch.allclose(group_advantages(r, 2, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(group_advantages(r, 2, scale="batch"), torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s4 + 1e-6))
    # one success in four: mean 1/4, std 1/2 -> (1.5, -0.5, -0.5, -0.5)
    one = group_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0]), 4, eps=0.0)
    assert torch.allclose(one, torch.tensor([-0.5, 1.5, -0.5, -0.5]))


def test_group_advantages_equal_groups_are_exactly_zero():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, 2, scale=scale)
        assert a[0] == 0 and a[1] == 0 and a[4] == 0 and a[5] == 0 and a[2] < 0 < a[3]
    # 0.1 three times: its float64 mean is not exactly 0.1, yet the advantages must be exactly 0
    tenths = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.1], dtype=torch.float64)
    assert tenths[:3].mean() != tenths[0]
    for scale in ("group", "batch", "none"):
        a = group_advantages(tenths, 3, scale=scale)
        assert (a[:3] == 0).all() and a.dtype == torch.float64
        assert abs(a[3:].sum()) < 1e-12


def test_group_advantages_accepts_bool_and_int_rewards():
    assert torch.equal(group_advantages(torch.tensor([True, False]), 2, scale="none"), torch.tensor([0.5, -0.5]))
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32


@pytest.mark.parametrize("rewards, group_size, scale", [
    (torch.ones(5), 2, "group"),  # not a multiple
    (torch.ones(4), 1, "group"),  # group of one has no baseline
    (torch.ones(4), 0, "group"),
    (torch.ones(4), 2.0, "group"),
    (torch.ones(4), 2, "std"),  # unknown scale
    (torch.ones(2, 2), 2, "group"),  # not 1-D
    (torch.ones(0), 2, "group"),
    (torch.tensor([1.0, NAN]), 2, "group"),
])
def test_group_advantages_bad_input(rewards, group_size, scale):
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size, scale=scale)


# ---------------------------------------------------------------- kl_penalty

def test_kl_penalty_by_hand():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert abs(kl_penalty(lp, ref, "k1").item() - math.log(2)) < 1e-6
    assert abs(kl_penalty(lp, ref, "k2").item() - 0.5 * math.log(2) ** 2) < 1e-6
    assert abs(kl_penalty(lp, ref, "k3").item() - (0.5 + math.log(2) - 1)) < 1e-6  # ref/p - log(ref/p) - 1
    assert abs(kl_penalty(ref, lp).item() - (2 - math.log(2) - 1)) < 1e-6
    same = torch.tensor([-1.3, -0.2])
    assert all((kl_penalty(same, same, k) == 0).all() for k in KL_ESTIMATORS)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_kl_estimators_average_to_the_exact_kl():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(20, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(20, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum()
    mean = {k: (p * kl_penalty(p.log(), q.log(), k)).sum() for k in KL_ESTIMATORS}
    assert abs(mean["k1"] - exact) < 1e-12 and abs(mean["k3"] - exact) < 1e-12
    assert abs(mean["k2"] - exact) > 1e-3  # k2 is biased
    assert (kl_penalty(p.log(), q.log(), "k3") >= 0).all()


# ---------------------------------------------------------------- clipped_surrogate

def test_clipped_surrogate_asymmetric_by_hand():
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 0.95, 1.25])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    out = clipped_surrogate(ratio, adv, clip_low=0.1, clip_high=0.3)
    # A>0: min(1.5, 1.3)=1.3; min(0.5, 0.9)=0.5. A<0: min(-0.5, -0.9)=-0.9; min(-1.5, -1.3)=-1.5; inside: ratio*A
    assert torch.allclose(out, torch.tensor([1.3, 0.5, -0.9, -1.5, 1.9, -2.5]))
    with pytest.raises(ValueError):
        clipped_surrogate(ratio, adv, clip_low=-0.1)


# ---------------------------------------------------------------- grpo_loss

def hand_case(dtype=torch.float32):
    """Ratios (1, 1.5 | pad) with A=+1 and (0.5, 1, 1) with A=-1; the pad holds nan."""
    logp = torch.log(torch.tensor([[1.0, 1.5, NAN], [0.5, 1.0, 1.0]], dtype=dtype))
    return logp, torch.zeros(2, 3, dtype=dtype), torch.tensor([1.0, -1.0], dtype=dtype), torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("aggregation, expected", [("sequence", -1 / 12), ("token", 0.12), ("constant", 0.075)])
def test_grpo_loss_by_hand(aggregation, expected):
    # per token: (1, min(1.5, 1.2)) and (min(-0.5, -0.8), -1, -1)
    logp, old, adv, mask = hand_case()
    loss, stats = grpo_loss(logp, old, adv, mask, aggregation=aggregation, max_tokens=4)
    assert abs(loss.item() - expected) < 1e-6
    assert abs(stats["clip_low_fraction"].item() - 0.2) < 1e-6 and abs(stats["clip_high_fraction"].item() - 0.2) < 1e-6
    assert abs(stats["clip_fraction"].item() - 0.4) < 1e-6 and abs(stats["ratio_mean"].item() - 1.0) < 1e-6
    assert not any(v.requires_grad for v in stats.values())


def test_grpo_loss_asymmetric_clipping_and_kl_by_hand():
    logp, old, adv, mask = hand_case()
    # clip_low 0.6 lets ratio 0.5 be clipped at 0.4 -> min(-0.5, -0.4) = -0.5; clip_high 0.3: min(1.5, 1.3) = 1.3
    loss, stats = grpo_loss(logp, old, adv, mask, clip_low=0.6, clip_high=0.3, aggregation="token")
    assert abs(loss.item() - -(1 + 1.3 - 0.5 - 1 - 1) / 5) < 1e-6
    assert stats["clip_low_fraction"].item() == 0 and abs(stats["clip_high_fraction"].item() - 0.2) < 1e-6
    # beta * k3 with ref_logp = logp - log 2 on every token: k3 = 0.5 + log 2 - 1 each
    ref = torch.where(mask.bool(), logp - math.log(2), torch.tensor(INF))
    loss_kl, stats_kl = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, aggregation="token")
    assert abs(loss_kl.item() - (0.12 + 0.1 * (math.log(2) - 0.5))) < 1e-6
    assert abs(stats_kl["kl_mean"].item() - (math.log(2) - 0.5)) < 1e-6


def random_batch(seed=0, B=5, T=6, dtype=torch.float64, lengths=(6, 3, 1, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, T, generator=g, dtype=dtype) * 0.5 - 1
    old = logp + torch.rand(B, T, generator=g, dtype=dtype) * 1.2 - 0.6  # ratios 0.55 .. 1.8
    ref = logp + torch.randn(B, T, generator=g, dtype=dtype) * 0.5
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_never_affects_value_or_gradient(aggregation):
    logp, old, ref, adv, mask = random_batch()
    pad = ~mask.bool()
    opts = dict(beta=0.1, aggregation=aggregation, max_tokens=6)
    results = []
    for fill in (0.0, NAN, INF, -INF, 123.0):
        x = torch.where(pad, fill, logp).requires_grad_()
        loss, stats = grpo_loss(x, torch.where(pad, fill, old), adv, mask, ref_logp=torch.where(pad, -fill, ref), **opts)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[pad] == 0).all()
        results.append((loss.detach(), grad, stats["ratio_mean"], stats["kl_mean"]))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_fully_padded_row_with_nan_advantage():
    logp, old, ref, adv, mask = random_batch(lengths=(6, 3, 0, 4, 5))
    adv[2] = NAN
    x = logp.clone().requires_grad_()
    loss, _ = grpo_loss(x, old, adv, mask, aggregation="sequence")
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[2] == 0).all()


def hand_gradient(logp, old, adv, mask, ref, *, beta, clip_low, clip_high, kl, aggregation, max_tokens):
    m = mask.bool()
    rho = torch.exp(logp - old)
    A = adv[:, None]
    clipped = ((A > 0) & (rho > 1 + clip_high)) | ((A < 0) & (rho < 1 - clip_low))
    delta = ref - logp
    k_prime = {"k1": torch.ones_like(delta), "k2": -delta, "k3": 1 - torch.exp(delta)}[kl]
    L = m.sum(1, keepdim=True).to(logp.dtype)
    c = {"sequence": 1 / (mask.shape[0] * L), "token": 1 / L.sum(),
         "constant": torch.tensor(1 / (mask.shape[0] * max_tokens), dtype=logp.dtype)}[aggregation]
    return torch.where(m, -c * ((~clipped) * rho * A - beta * k_prime), 0.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl", KL_ESTIMATORS)
def test_gradient_matches_hand_derivation(aggregation, kl):
    logp, old, ref, adv, mask = random_batch(seed=1)
    rho = torch.exp(logp - old)[mask.bool()]
    assert (rho < 0.8).any() and (rho > 1.28).any()  # both clipping regions are exercised
    opts = dict(beta=0.05, clip_low=0.2, clip_high=0.28, kl=kl, aggregation=aggregation, max_tokens=6)
    x = logp.clone().requires_grad_()
    loss, _ = grpo_loss(x, old, adv, mask, ref_logp=ref, **opts)
    assert loss.dtype == torch.float64
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(grad, hand_gradient(logp, old, adv, mask, ref, **opts), atol=1e-14, rtol=0)


def test_on_policy_gradient_is_minus_weight_times_advantage():
    logp, _, _, adv, mask = random_batch(seed=2)
    x = logp.clone().requires_grad_()
    loss, stats = grpo_loss(x, logp, adv, mask, aggregation="token")
    (grad,) = torch.autograd.grad(loss, x)
    expected = torch.where(mask.bool(), -adv[:, None] / mask.sum(), 0.0)
    assert torch.allclose(grad, expected, atol=1e-15) and stats["clip_fraction"] == 0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck(aggregation):
    logp, old, ref, adv, mask = random_batch(seed=3)
    rho = torch.exp(logp - old)
    for bound in (0.8, 1.28):  # keep away from the clipping kinks
        old = torch.where((rho - bound).abs() < 1e-3, old + 0.01, old)
    for kl in KL_ESTIMATORS:
        def f(x):
            return grpo_loss(x, old, adv, mask, ref_logp=ref, beta=0.05, clip_low=0.2, clip_high=0.28, kl=kl,
                             aggregation=aggregation, max_tokens=6)[0]
        assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def test_old_and_ref_logp_are_constants():
    logp, old, ref, adv, mask = random_batch(seed=4)
    x = logp.clone().requires_grad_()
    o, r = old.clone().requires_grad_(), ref.clone().requires_grad_()
    loss, _ = grpo_loss(x, o, adv, mask, ref_logp=r, beta=0.1)
    loss.backward()
    assert o.grad is None and r.grad is None and x.grad is not None


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_add_up_to_the_full_batch(aggregation):
    logp, old, ref, adv, mask = random_batch(seed=5, B=6, T=7, lengths=(7, 1, 4, 6, 2, 5))
    opts = dict(beta=0.1, clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_tokens=7)
    x = logp.clone().requires_grad_()
    full, _ = grpo_loss(x, old, adv, mask, ref_logp=ref, **opts)
    (g_full,) = torch.autograd.grad(full, x)
    Z = loss_normalizer(mask, aggregation, max_tokens=7)
    for splits in ([slice(0, 2), slice(2, 6)], [slice(0, 1), slice(1, 4), slice(4, 6)]):
        micro = sum(grpo_loss(x[s], old[s], adv[s], mask[s], ref_logp=ref[s], normalizer=Z, **opts)[0] for s in splits)
        (g_micro,) = torch.autograd.grad(micro, x)
        assert torch.allclose(micro, full, atol=1e-14) and torch.allclose(g_micro, g_full, atol=1e-14)
    own = sum(grpo_loss(x[s], old[s], adv[s], mask[s], ref_logp=ref[s], **opts)[0] for s in (slice(0, 2), slice(2, 6)))
    assert not torch.allclose(own / 2, full)  # each micro-batch's own denominator gives a different step


def test_loss_normalizer():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert loss_normalizer(mask, "sequence") == 3 and loss_normalizer(mask, "token") == 5
    assert loss_normalizer(mask, "constant", max_tokens=8) == 24
    assert loss_normalizer(torch.zeros(2, 3), "token") == 1  # no valid tokens: no division by zero
    with pytest.raises(ValueError):
        loss_normalizer(mask, "constant")
    with pytest.raises(ValueError):
        loss_normalizer(mask, "mean")


def test_float32_and_float64_agree():
    logp, old, ref, adv, mask = random_batch(seed=6)
    for aggregation in AGGREGATIONS:
        l64, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, aggregation=aggregation, max_tokens=6)
        l32, _ = grpo_loss(logp.float(), old.float(), adv.float(), mask, ref_logp=ref.float(), beta=0.1,
                           aggregation=aggregation, max_tokens=6)
        assert l64.dtype == torch.float64 and l32.dtype == torch.float32 and abs(l64.item() - l32.item()) < 1e-5


@pytest.mark.parametrize("change", [
    dict(aggregation="mean"), dict(kl="k5", ref_logp=torch.zeros(2, 3)), dict(beta=0.1),
    dict(aggregation="constant"), dict(ref_logp=torch.zeros(2, 4)),
])
def test_grpo_loss_bad_arguments(change):
    logp, old, adv, mask = hand_case()
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, **change)


def test_grpo_loss_bad_shapes():
    logp, old, adv, mask = hand_case()
    with pytest.raises(ValueError):
        grpo_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv[:1], mask)
    with pytest.raises(ValueError):
        grpo_loss(logp[0], old[0], adv, mask[0])


# ---------------------------------------------------------------- completion_batch and sequence_logprobs

def test_completion_batch_left_pads():
    b = completion_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0, logprobs=[[-1.0], [-2.0, -3.0, -4.0]])
    assert b.input_ids.tolist() == [[0, 1, 2, 4], [3, 5, 6, 7]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert b.completion_mask.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert b.logprobs.tolist() == [[0, 0, 0, -1], [0, -2, -3, -4]]
    assert completion_batch([[1]], [[2]], pad_id=0).logprobs is None
    for bad in (dict(prompt_ids=[[]], completion_ids=[[1]]), dict(prompt_ids=[[1]], completion_ids=[[1], [2]]),
                dict(prompt_ids=[[1]], completion_ids=[[2, 3]], logprobs=[[-1.0]])):
        with pytest.raises(ValueError):
            completion_batch(pad_id=0, **bad)


def full_logits_logprobs(model, batch, temperature=1.0):
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    lp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature=temperature)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * batch.completion_mask


def make_small_model(tied: bool):
    """A float32 2-layer model with a 512-word vocabulary, in training mode (fast)."""
    from rlscratch.model import Qwen2Model, tiny_config

    torch.manual_seed(0)
    model = Qwen2Model(tiny_config(vocab_size=512, tie_word_embeddings=tied)).float().train()
    if not tied:
        with torch.no_grad():  # logits spread enough that sampled tokens have varied probabilities
            model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def small_model():
    return make_small_model(tied=False)


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logprobs_match_full_logits(tied):
    small_model = make_small_model(tied)
    batch = completion_batch([[5, 9, 2, 7], [3], [8, 8]], [[11, 12], [13, 14, 15, 16, 17], [1]], pad_id=0)
    for temperature, chunk_size in ((1.0, 3), (0.6, 1), (1.0, 256)):
        ours = sequence_logprobs(small_model, *batch[:3], temperature=temperature, chunk_size=chunk_size)
        ours.sum().backward()
        g_ours = [p.grad.clone() for p in small_model.parameters()]
        small_model.zero_grad()
        direct = full_logits_logprobs(small_model, batch, temperature)
        direct.sum().backward()
        g_direct = [p.grad.clone() for p in small_model.parameters()]
        small_model.zero_grad()
        assert ours.shape == batch.input_ids.shape and ours.dtype == torch.float32
        assert torch.allclose(ours, direct, atol=1e-5)
        assert (ours[batch.completion_mask == 0] == 0).all() and (ours[batch.completion_mask == 1] < 0).all()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_direct))
    with torch.no_grad():
        frozen = sequence_logprobs(small_model, *batch[:3], chunk_size=2)
    assert not frozen.requires_grad and torch.allclose(frozen, ours.detach())


def test_sequence_logprobs_with_the_models_own_checkpointing():
    """The model's block checkpointing (for training memory) composes with the head's chunk checkpointing."""
    batch = completion_batch([[5, 9, 2], [3]], [[11, 12, 13], [14, 15]], pad_id=0)
    grads = []
    for flag in (False, True):
        model = make_small_model(tied=False)
        model.gradient_checkpointing = flag
        out = sequence_logprobs(model, *batch[:3], chunk_size=2)
        out.sum().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_sequence_logprobs_keeps_one_chunk_of_logits(small_model):
    """Autograd saves no vocabulary-wide tensor: the chunks are checkpointed."""
    batch = completion_batch([[1, 2, 3]] * 4, [list(range(10, 40))] * 4, pad_id=0)
    widest = []

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == 512:
            widest.append(t.numel() // 512)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logprobs(small_model, *batch[:3], chunk_size=8)
    assert widest == []  # not even one chunk's logits: they are recomputed in the backward pass
    widest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits_logprobs(small_model, batch)
    assert max(widest) >= 4 * 32  # the direct computation keeps the logits of every position


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 3), (0.6, 1), (1.3, 256)])
def test_kept_logits_give_the_same_values_and_gradients(temperature, chunk_size):
    """HeadLogprobs (logits kept, gradient written over them) = recomputation = plain autograd, in float64."""
    torch.manual_seed(3)
    head = torch.nn.Linear(6, 40, bias=False).double()
    states = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    targets, weights = torch.randint(0, 40, (7,)), torch.randn(7, dtype=torch.float64)
    results = []
    for run in (lambda: head_logprobs(head, states, targets, temperature=temperature, chunk_size=chunk_size,
                                      keep_logits=True),
                lambda: head_logprobs(head, states, targets, temperature=temperature, chunk_size=chunk_size,
                                      keep_logits=False),
                lambda: token_logprobs(head(states), targets, temperature=temperature)):
        head.zero_grad()
        states.grad = None
        values = run()
        (values * weights).sum().backward()
        results.append((values.detach(), states.grad.clone(), head.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_logits_are_kept_in_16_bits_and_recomputed_in_float32():
    head = torch.nn.Linear(16, 64, bias=False)
    states = torch.randn(5, 16, requires_grad=True)
    targets = torch.randint(0, 64, (5,))
    assert head_logprobs(head, states, targets, chunk_size=2).grad_fn.logits is None  # float32: nothing kept
    outputs = {}
    for keep in (None, False):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = head_logprobs(head, states, targets, chunk_size=2, keep_logits=keep)
        kept = values.grad_fn.logits
        outputs[keep] = (None if kept is None else (kept.dtype, tuple(kept.shape)), values.detach())
        values.sum().backward()
        outputs[keep] += (head.weight.grad.clone(),)
    assert outputs[None][0] == (torch.bfloat16, (5, 64)) and outputs[False][0] is None
    # the same bf16 products either way; the kept path sums the weight gradient in one product (float32 inside)
    torch.testing.assert_close(outputs[None][1], outputs[False][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs[None][2], outputs[False][2], rtol=2e-2, atol=1e-3)


def test_recomputed_logits_allow_a_second_backward_pass():
    """Recomputing (float32) overwrites nothing: a second backward pass adds the same gradients again."""
    head = torch.nn.Linear(8, 30, bias=False)
    states = torch.randn(7, 8, requires_grad=True)
    values = head_logprobs(head, states, torch.randint(0, 30, (7,)), chunk_size=3)
    weights = torch.randn(7)
    (values * weights).sum().backward(retain_graph=True)
    first = head.weight.grad.clone(), states.grad.clone()
    (values * weights).sum().backward()
    torch.testing.assert_close(head.weight.grad, 2 * first[0])
    torch.testing.assert_close(states.grad, 2 * first[1])


def test_kept_logits_refuse_a_second_backward_pass():
    head = torch.nn.Linear(4, 9, bias=False)
    values = head_logprobs(head, torch.randn(3, 4), torch.tensor([1, 2, 3]), keep_logits=True)
    values.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        values.sum().backward()


def test_sequence_logprobs_bad_masks(small_model):
    batch = completion_batch([[1, 2]], [[3, 4]], pad_id=0)
    first = batch.completion_mask.clone()
    first[0, 0] = 1
    with pytest.raises(ValueError):
        sequence_logprobs(small_model, batch.input_ids, batch.attention_mask, first)
    with pytest.raises(ValueError):
        sequence_logprobs(small_model, batch.input_ids, torch.zeros_like(batch.attention_mask), batch.completion_mask)
    with pytest.raises(ValueError):
        sequence_logprobs(small_model, batch.input_ids, batch.attention_mask, batch.completion_mask[:, 1:])


class DigitTokenizer:
    """Just enough of a tokenizer for `generate` on token-id prompts: id 0 pads, id 511 ends a turn."""

    pad_token_id, eos_token_id, unk_token_id = 0, 511, None

    def convert_tokens_to_ids(self, token):
        return None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_sequence_logprobs_equal_the_samplers(small_model):
    """Training-mode log-probs of generated tokens equal the ones the sampler recorded (float32)."""
    from rlscratch.generate import generate

    prompts = [[5, 9, 2, 7, 100], [3, 4], [300, 301, 302]]  # different lengths: the sampler pads them too
    completions = generate(small_model, DigitTokenizer(), prompts, max_new_tokens=8, temperature=1.0, n=3, seed=3)
    keep = [8, 3, 5, 1, 8, 6, 2, 7, 4]  # score prefixes of varied lengths: their log-probs are the sampler's too
    batch = completion_batch([prompts[c.prompt_index] for c in completions],
                             [c.token_ids[:k] for c, k in zip(completions, keep)], pad_id=0,
                             logprobs=[c.logprobs[:k] for c, k in zip(completions, keep)])
    ours = sequence_logprobs(small_model, *batch[:3], chunk_size=5)
    assert ours.requires_grad
    mask = batch.completion_mask.bool()
    assert mask.sum() == sum(keep) and len({tuple(c.token_ids) for c in completions}) == 9
    assert batch.logprobs[mask].std() > 0.5  # not all near-certain tokens: the comparison means something
    assert (ours - batch.logprobs)[mask].abs().max() < 1e-4
