import pytest
import torch

from rlscratch.generate import (KVCache, PackedLinear, can_pack_for_cpu, chat_prompt, compute_dtype, derive_seed,
                                generate, generate_without_cache, pack_for_cpu, packing_works, sample_next_token,
                                stop_token_ids, stream, top_p_filter, unpack_for_cpu)
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
    assert out[0].finish_reason == "stop_string" and stop_text not in out[0].text
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


def _tiny(tokenizer, dtype=torch.float32, tied=False, seed=1):
    torch.manual_seed(seed)
    model = Qwen2Model(tiny_config(vocab_size=len(tokenizer), tie_word_embeddings=tied)).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper logits: greedy paths are not ties
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_matches_plain(tokenizer, prompts, dtype, tied):
    """Packing is in place, shares the parameters, keeps outputs, and steps aside where the CPU cannot pack."""
    model = _tiny(tokenizer, dtype, tied)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    ids = torch.tensor([tokenizer.encode(prompts[1])])
    with torch.no_grad():
        plain = model(ids).float()
    greedy_plain = generate(model, tokenizer, prompts, max_new_tokens=8, ignore_eos=True)
    assert pack_for_cpu(model) is model
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert {name: p for name, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert list(model.state_dict()) == keys_before
    with torch.no_grad():
        packed = model(ids).float()
    assert torch.allclose(plain, packed, atol=1e-4 if dtype == torch.float32 else 2e-2)
    greedy_packed = generate(model, tokenizer, prompts, max_new_tokens=8, ignore_eos=True)
    if dtype == torch.bfloat16 or not packing_works(dtype):  # same kernel without the per-call reorder
        assert torch.equal(plain, packed)
    assert [c.token_ids for c in greedy_plain] == [c.token_ids for c in greedy_packed]
    # still trainable: with gradients enabled the plain product runs and gradients reach the parameters
    model.train()
    model(ids).float().sum().backward()
    assert model.layers[0].mlp.gate_up_proj.weight.grad is not None
    assert unpack_for_cpu(model) is model and type(model.lm_head) is torch.nn.Linear
    assert {name: p for name, p in model.named_parameters()} == params_before


def test_packed_weights_follow_optimizer_steps(tokenizer, prompts):
    """After an optimizer step, generation from the packed model uses the new weights (no re-pack call)."""
    model = pack_for_cpu(_tiny(tokenizer))
    reference = _tiny(tokenizer)  # the same initial weights, never packed
    before = generate(model, tokenizer, prompts, max_new_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in before] == [c.token_ids for c in generate(reference, tokenizer, prompts,
                                                                          max_new_tokens=6, ignore_eos=True)]
    ids = torch.tensor([tokenizer.encode(prompts[0])])
    for m in (model, reference):  # one identical large step on both
        optimizer = torch.optim.SGD(m.parameters(), lr=50.0)
        m.train()
        torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).backward()
        optimizer.step()
        m.eval()
    after = generate(model, tokenizer, prompts, max_new_tokens=6, ignore_eos=True)
    expected = generate(reference, tokenizer, prompts, max_new_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]  # the step did change the output
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-4)


def test_packed_model_copies_and_pickles_without_the_packed_cache(tokenizer, prompts):
    import copy
    import io

    model = pack_for_cpu(_tiny(tokenizer))
    ids = torch.tensor([tokenizer.encode(prompts[0])])
    with torch.no_grad():
        out = model(ids)
    clone = copy.deepcopy(model)
    assert clone.lm_head._packed is None and clone.lm_head.weight is not model.lm_head.weight
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with torch.no_grad():
        assert torch.allclose(clone(ids), out)


def test_packing_never_raises_and_falls_back():
    """float64 (no oneDNN packing) runs the plain product; the probe says so instead of raising."""
    assert not packing_works(torch.float64)
    model = pack_for_cpu(Qwen2Model(tiny_config(vocab_size=300)).double().eval())
    assert not can_pack_for_cpu(model)
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        packed = model(ids)
    unpack_for_cpu(model)
    with torch.no_grad():
        assert torch.equal(packed, model(ids))


def test_packing_probe_failure_is_a_fallback(monkeypatch, tokenizer, prompts):
    """A CPU whose oneDNN rejects the dtype (e.g. bf16 on AVX2) gets the plain product, not an error."""
    import rlscratch.generate as G

    def refuse(*args, **kwargs):
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(G, "_PACKING_WORKS", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    assert not G.packing_works(torch.bfloat16)
    model = pack_for_cpu(_tiny(tokenizer, torch.bfloat16))
    out = generate(model, tokenizer, prompts[:1], max_new_tokens=4)
    assert len(out[0].token_ids) >= 1


def test_packing_under_autocast_follows_master_weights(tokenizer, prompts):
    """float32 master weights under bf16 autocast: packed (bf16) decoding equals autocast's plain product."""
    if not packing_works(torch.bfloat16):
        pytest.skip("this CPU cannot pack bf16 weights (no AVX-512)")
    model = _tiny(tokenizer)
    ids = torch.tensor([tokenizer.encode(prompts[1])])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids)
        pack_for_cpu(model)
        packed = model(ids)
    assert plain.dtype == packed.dtype == torch.bfloat16
    assert torch.allclose(plain.float(), packed.float(), atol=2e-2, rtol=2e-2)


def test_sampling_is_batch_size_invariant(tiny_model, tokenizer, prompts):
    """Each sample draws from its own generator: batch size and neighbours do not change it."""
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=11)
    whole = generate(tiny_model, tokenizer, prompts, batch_size=9, **kw)
    split = generate(tiny_model, tokenizer, prompts, batch_size=3, **kw)
    assert [c.token_ids for c in whole] == [c.token_ids for c in split]
    # one seed per prompt: prompt 2 alone with its seed equals prompt 2 inside the batch
    seeds = [derive_seed(11, "problem", i) for i in range(3)]
    batch = generate(tiny_model, tokenizer, prompts, **{**kw, "seed": seeds})
    alone = generate(tiny_model, tokenizer, prompts[2:], **{**kw, "seed": seeds[2:]})
    assert [c.token_ids for c in batch[6:]] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in batch}) > 3  # the samples differ from each other


def test_derive_seed_is_stable():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
    assert derive_seed(12, 3) != derive_seed(1, 23)  # parts are separated, not concatenated
    assert 0 <= derive_seed("x") < 2**63


def test_stop_string_cuts_tokens_and_logprobs(tiny_model, tokenizer, prompts):
    free = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=12, ignore_eos=True)[0]
    stop_text = tokenizer.decode(free.token_ids[3:5])
    out = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=12, stop=[stop_text], ignore_eos=True)[0]
    assert out.finish_reason == "stop_string"
    assert len(out.token_ids) == len(out.logprobs) <= 5
    decoded = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert stop_text in decoded and stop_text not in tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
    assert out.text == decoded[:decoded.find(stop_text)]
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


def test_finish_reasons(tiny_model, tokenizer, prompts):
    eos = sorted(stop_token_ids(tokenizer))
    forced = _tiny(tokenizer)
    with torch.no_grad():  # make the end-of-turn token the certain next token
        forced.lm_head.weight.zero_()
        forced.lm_head.weight[eos[0]] = 1.0
    out = generate(forced, tokenizer, prompts[:1], max_new_tokens=5)[0]
    assert out.finish_reason == "stop" and out.token_ids == [eos[0]]
    assert generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=3, ignore_eos=True)[0].finish_reason == "length"


def test_kv_cache_follows_autocast(tiny_model):
    assert compute_dtype(tiny_model) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(tiny_model) == torch.bfloat16


def test_generation_under_autocast_with_float32_master_weights(tokenizer, prompts):
    """The training setting: float32 weights, bf16 autocast; cache and packing follow autocast."""
    model = pack_for_cpu(_tiny(tokenizer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, n=2, seed=3)
        again = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, n=2, seed=3)
    assert len(out) == 6 and all(len(o.token_ids) == len(o.logprobs) >= 1 for o in out)
    assert all(torch.isfinite(torch.tensor(o.logprobs)).all() for o in out)
    assert [o.token_ids for o in out] == [o.token_ids for o in again]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_add_rows_joins_caches_of_different_lengths(tiny_model, tokenizer, prompts):
    """Rows appended to a running cache decode exactly as they would alone, whichever cache is longer."""
    short, long = tokenizer.encode(prompts[2]), tokenizer.encode(prompts[1])
    for first, second in ((short, long), (long, short)):
        with torch.no_grad():
            def prefilled(ids, room):
                cache = KVCache(tiny_model.config, 1, len(ids) + room, dtype=torch.float32)
                tiny_model(torch.tensor([ids]), cache=cache)
                return cache

            a = prefilled(first, 8)
            for token in (5, 6, 7):  # a has decoded three tokens already
                tiny_model(torch.tensor([[token]]), cache=a)
            b = prefilled(second, 0)
            alone = [tiny_model(torch.tensor([[9]]), cache=prefilled(first + [5, 6, 7], 1))[0, -1],
                     tiny_model(torch.tensor([[9]]), cache=prefilled(second, 1))[0, -1]]
            a.add_rows(b, room=4)
            assert a.length == max(len(first) + 3, len(second)) and a.max_len == a.length + 4
            assert a.seen.tolist() == [len(first) + 3, len(second)]
            joined = tiny_model(torch.tensor([[9], [9]]), cache=a)[:, -1]
        assert torch.allclose(joined, torch.stack(alone), atol=1e-5)


def test_finished_rows_are_refilled_with_waiting_prompts(tiny_model, tokenizer, monkeypatch):
    """Continuous batching: a waiting prompt takes a finished row's place while the others decode on,
    and every output equals that prompt generated alone."""
    questions = ["What is 2 + 3?", "Hi", "Name a prime number larger than ten, please, and explain why it is prime.",
                 "Count to five.", "Why is the sky blue? Answer in one sentence.", "7 * 8 = ?"]
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    seeds = [derive_seed(3, i) for i in range(len(prompts))]  # sampled: greedy paths of this model look alike
    free = generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=10, temperature=1.0, seed=seeds[:1],
                    ignore_eos=True)[0]
    kw = dict(max_new_tokens=10, temperature=1.0, stop=[tokenizer.decode(free.token_ids[2:4])], ignore_eos=True)
    joins = []
    add_rows = KVCache.add_rows
    monkeypatch.setattr(KVCache, "add_rows", lambda self, other, room: (joins.append(self.k.shape[1]),
                                                                        add_rows(self, other, room)))
    rows_per_step, heard = [], []
    hook = tiny_model.embed_tokens.register_forward_hook(lambda m, i, o: rows_per_step.append(i[0].shape))
    together = generate(tiny_model, tokenizer, prompts, batch_size=2, seed=seeds, **kw,
                        on_prompt_done=lambda i, samples: heard.append((i, [s.token_ids for s in samples])))
    hook.remove()
    alone = [generate(tiny_model, tokenizer, [p], seed=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    assert together[0].finish_reason == "stop_string" and together[1].finish_reason == "length"  # 0 stops early ...
    assert joins and max(joins) >= 1  # ... and a waiting prompt joined rows still decoding
    assert max(shape[0] for shape in rows_per_step) <= 2
    assert sorted(heard) == sorted((c.prompt_index, [c.token_ids]) for c in together)


def test_on_prompt_done_hears_every_prompt_once_with_its_samples(tiny_model, tokenizer, prompts):
    heard = {}
    out = generate(tiny_model, tokenizer, prompts, max_new_tokens=5, temperature=1.0, n=3, seed=2, batch_size=4,
                   on_prompt_done=lambda i, samples: heard.setdefault(i, []).append(samples))
    assert sorted(heard) == [0, 1, 2] and all(len(calls) == 1 for calls in heard.values())
    assert [c for i in range(3) for c in heard[i][0]] == out
