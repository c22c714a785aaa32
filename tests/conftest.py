"""Shared fixtures: tiny random-weight models (no download) and the offline tokenizer."""
import pytest
import torch

from rlscratch.model import Qwen2Config, Qwen2Model, build_model, load_tokenizer, offline_gguf_path

torch.set_num_threads(2)


def hf_pair(model_type: str = "qwen2", tied: bool = False, vocab_size: int = 512):
    """A random transformers model of a tiny config and our model with the same weights (float32)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=tied)
    if model_type == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    elif model_type == "qwen3":
        hf_cfg = transformers.Qwen3Config(**common, head_dim=16)
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf = hf.float().eval()
    cfg = Qwen2Config.from_hf(hf_cfg.to_dict())
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    return hf, build_model(cfg, state, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer():
    path = offline_gguf_path()
    return load_tokenizer(path.parent, path.name)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A float32 2-layer random model over the real Qwen2.5 vocabulary."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = Qwen2Model(cfg).float().eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy paths are not all ties
        model.lm_head.weight.mul_(20)
    return model
