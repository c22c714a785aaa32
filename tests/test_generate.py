import pytest
import torch

from rlscratch.generate import (KVCache, PackedLinear, chat_prompt, generate, generate_without_cache, pack_for_cpu,
                                sample_next_token, stream, top_p_filter)
from rlscratch.model import Qwen2Model, tiny_config

PROMPTS = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "Hi"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [chat_prompt(tokenizer, q) for q in PROMPTS]


def test_cache_matches_full_recompute(tiny_model, tokenizer, prompts):
    ids = tokenizer.encode(prompts[0])
    naive = generate_without_cache(tiny_model, ids, 12)
    cached = generate(tiny_model, tokenizer, [ids], max_new_tokens=12)[0]
    assert cached.token_ids == naive[: len(cached.token_ids)]
    assert len(cached.token_ids) == 12 or cached.finish_reason == "stop"


def test_cache_logits_match_full_pass(tiny_model, tokenizer, prompts):
    ids = torch.tensor([tokenizer.encode(prompts[1])])
    with torch.no_grad():
        full = tiny_model(ids)
        cache = KVCache(tiny_model.config, 1, ids.shape[1], dtype=torch.float32)
        first = tiny_model(ids[:, :-3], cache=cache)
        rest = [tiny_model(ids[:, i:i + 1], cache=cache) for i in range(ids.shape[1] - 3, ids.shape[1])]
    stepped = torch.cat([first] + rest, 1)
    assert torch.allclose(full, stepped, atol=1e-4)
    assert cache.length == ids.shape[1] and int(cache.seen) == ids.shape[1]


def test_batched_greedy_equals_single(tiny_model, tokenizer, prompts):
    batched = generate(tiny_model, tokenizer, prompts, max_new_tokens=10)
    single = [generate(tiny_model, tokenizer, [p], max_new_tokens=10)[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.prompt_index for b in batched] == [0, 1, 2]


def test_batches_split_by_batch_size(tiny_model, tokenizer, prompts):
    whole = generate(tiny_model, tokenizer, prompts, max_new_tokens=6)
    split = generate(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert [w.token_ids for w in whole] == [s.token_ids for s in split]


def test_finished_rows_are_dropped(tiny_model, tokenizer, prompts):
    """A row stopped by a stop string no longer goes through the model."""
    free = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=8)[0]
    stop_text = tokenizer.decode(free.token_ids[:2])
    batch_rows = []
    hook = tiny_model.embed_tokens.register_forward_hook(lambda m, i, o: batch_rows.append(i[0].shape[0]))
    out = generate(tiny_model, tokenizer, prompts[:1] + prompts[1:2], max_new_tokens=8, stop=[stop_text])
    hook.remove()
    assert out[0].finish_reason == "stop" and stop_text not in out[0].text
    if out[1].finish_reason == "length":  # the second row ran on alone
        assert batch_rows[-1] == 1


def test_n_samples_share_one_prefill(tiny_model, tokenizer, prompts):
    shapes = []
    hook = tiny_model.embed_tokens.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    out = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=3, n=5, temperature=1.0, seed=0)
    hook.remove()
    assert shapes[0] == (1, len(tokenizer.encode(prompts[0])))
    assert shapes[1][0] == 5
    assert [o.sample_index for o in out] == list(range(5))


def test_seeded_sampling_is_reproducible(tiny_model, tokenizer, prompts):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, n=3)
    a = generate(tiny_model, tokenizer, prompts, seed=7, **kw)
    b = generate(tiny_model, tokenizer, prompts, seed=7, **kw)
    c = generate(tiny_model, tokenizer, prompts, seed=8, **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_logprobs_are_under_the_unmodified_model(tiny_model, tokenizer, prompts):
    out = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=6, temperature=0.7, top_k=5, seed=0)[0]
    ids = tokenizer.encode(prompts[0])
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids + out.token_ids]))[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(expected, torch.tensor(out.logprobs), atol=1e-4)


def test_stream_yields_the_generated_text(tiny_model, tokenizer, prompts):
    pieces = list(stream(tiny_model, tokenizer, prompts[1], max_new_tokens=10))
    assert "".join(pieces) == generate(tiny_model, tokenizer, prompts[1:2], max_new_tokens=10)[0].text


@pytest.mark.parametrize("bad,match", [
    (dict(prompts=[]), "empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=["x" * 10]), None),
    (dict(n=2), "temperature"),
    (dict(top_p=0.0, temperature=1.0), "sampling"),
    (dict(prompts="a bare string"), "list"),
    (dict(prompts=[[]]), "empty"),
])
def test_bad_inputs_are_rejected(tiny_model, tokenizer, bad, match):
    kwargs = dict(prompts=["Hello"], max_new_tokens=4)
    kwargs.update(bad)
    if match is None:  # sanity: a valid call in the same table
        assert generate(tiny_model, tokenizer, **kwargs)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        generate(tiny_model, tokenizer, **kwargs)


def test_prompt_longer_than_context(tiny_model, tokenizer):
    long_prompt = [5] * (tiny_model.config.max_position_embeddings - 2)
    with pytest.raises(ValueError, match="context"):
        generate(tiny_model, tokenizer, [long_prompt], max_new_tokens=4)


def test_top_p_properties():
    torch.manual_seed(0)
    for _ in range(50):
        probs = torch.softmax(torch.randn(4, 1000) * torch.rand(4, 1) * 8, -1)
        p = float(torch.rand(1)) * 0.98 + 0.01
        out = top_p_filter(probs, p)
        kept = out > 0
        assert torch.allclose(out.sum(-1), torch.ones(4), atol=1e-5)  # renormalized
        assert ((probs * kept).sum(-1) >= p - 1e-5).all()  # mass kept >= p
        assert kept.gather(-1, probs.argmax(-1, keepdim=True)).all()  # argmax kept
        # minimal: dropping the least likely kept token would fall below p
        smallest = torch.where(kept, probs, torch.full_like(probs, 2.0)).min(-1).values
        assert ((probs * kept).sum(-1) - smallest < p + 1e-6).all()
        assert torch.allclose(out[kept], (probs[kept] / (probs * kept).sum(-1).repeat_interleave(kept.sum(-1))), atol=1e-5)


def test_top_p_long_tail_uses_full_sort():
    probs = torch.full((1, 5000), 1 / 5000)  # the top 256 hold only 5% of the mass
    out = top_p_filter(probs, 0.5)
    assert int((out > 0).sum()) in (2500, 2501)  # float32 cumsum rounding at the boundary


def test_sample_next_token_modes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample_next_token(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_next_token(logits, temperature=1.0, top_p=0.3, generator=g).item() for _ in range(50)}
    assert draws == {1}
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=-1.0)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_matches_plain(tokenizer, prompts, dtype, tied):
    torch.manual_seed(1)
    model = Qwen2Model(tiny_config(vocab_size=len(tokenizer), tie_word_embeddings=tied)).to(dtype).eval()
    fast = pack_for_cpu(model)
    assert fast is not model
    assert isinstance(fast.lm_head, PackedLinear) and isinstance(fast.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(fast.layers[0].self_attn.qkv_proj, PackedLinear) and fast.layers[0].self_attn.q_proj is None
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    ids = torch.tensor([tokenizer.encode(prompts[1])])
    with torch.inference_mode():
        plain, packed = model(ids).float(), fast(ids).float()
    assert torch.allclose(plain, packed, atol=1e-4 if dtype == torch.float32 else 2e-2)
    greedy_plain = generate(model, tokenizer, prompts, max_new_tokens=8, ignore_eos=True)
    greedy_packed = generate(fast, tokenizer, prompts, max_new_tokens=8, ignore_eos=True)
    if dtype == torch.bfloat16:  # same oneDNN kernel without the per-call reorder: bit-identical
        assert torch.equal(plain, packed)
        assert [c.token_ids for c in greedy_plain] == [c.token_ids for c in greedy_packed]
    # the original is untouched and still trainable
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.requires_grad
    assert model.layers[0].self_attn.qkv_proj is None and model.layers[0].mlp.gate_up_proj is None
    model(ids).float().sum().backward()
    assert model.layers[0].mlp.up_proj.weight.grad is not None


def test_pack_for_cpu_falls_back_where_it_does_not_apply():
    model = Qwen2Model(tiny_config()).double()
    assert pack_for_cpu(model) is model
