"""The roofline's two inputs: the bytes a decode step reads, and the measured memory bandwidth."""
import math

import torch

from rlscratch.generate import memory_bandwidth, pack_for_cpu, weight_bytes_per_token
from rlscratch.model import Qwen2Model, tiny_config


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def test_weight_bytes_skip_the_embedding_lookup_but_count_the_head():
    untied = Qwen2Model(tiny_config(vocab_size=1000, tie_word_embeddings=False)).to(torch.bfloat16)
    total = sum(_bytes(p) for p in untied.parameters())
    assert weight_bytes_per_token(untied) == total - _bytes(untied.embed_tokens.weight)
    tied = Qwen2Model(tiny_config(vocab_size=1000, tie_word_embeddings=True))
    # tied: the one table is listed once among the parameters, but the head multiplies by all of it
    assert weight_bytes_per_token(tied) == sum(_bytes(p) for p in tied.parameters())
    assert weight_bytes_per_token(untied) == weight_bytes_per_token(tied.to(torch.bfloat16))


def test_packing_does_not_change_the_bytes_read():
    model = Qwen2Model(tiny_config(vocab_size=1000)).to(torch.bfloat16)
    before = weight_bytes_per_token(model)
    assert weight_bytes_per_token(pack_for_cpu(model)) == before


def test_memory_bandwidth_is_a_finite_rate():
    rate = memory_bandwidth(gigabytes=0.01, repeats=2)
    assert math.isfinite(rate) and rate > 1e6  # bytes per second; any machine streams more than 1 MB/s
