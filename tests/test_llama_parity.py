"""The Llama pipeline spec list: the tied embedding / head and RoPE's fp32 inv_freq. Numerics against
LlamaForCausalLM for every attention path and row kind: test_attention.py."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from tests.helpers import llama_config, sequential_from_hf


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(name)).float()
    return hf, sequential_from_hf(hf)


def test_tied_config_shares_one_weight():
    hf, seq = _pair("gqa_tied")
    assert hf.config.tie_word_embeddings
    assert len(seq.layers) == hf.config.num_hidden_layers + 2  # embed, blocks, norm; the head reuses the embedding
    params = {id(p) for p in seq.parameters()}
    assert len(params) == sum(1 for _ in hf.parameters())


def test_inv_freq_stays_fp32_when_cast_to_bf16():
    _, seq = _pair("gqa_llama3_rope")
    ref = seq.layers["1"].rotary.inv_freq.clone()
    seq.to(torch.bfloat16)
    block = seq.layers["1"]
    assert block.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert block.rotary.inv_freq.dtype == torch.float32 and torch.equal(block.rotary.inv_freq, ref)
