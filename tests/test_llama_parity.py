"""The Llama pipeline spec list, run sequentially, against transformers' LlamaForCausalLM holding the
same weights: logits, loss and every gradient (fp32), with no/right/left padding; and causality."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from models import causal_lm_loss, get_family
from tests.helpers import (
    LLAMA_CONFIGS,
    assert_causal,
    assert_segments_isolated,
    llama_config,
    make_batch,
    sequential_from_hf,
)

ATOL = 1e-5
PADDINGS = {"none": [12, 12, 12], "right": [12, 9, 5], "left": [12, 7, 4]}


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(name)).float()
    return hf, sequential_from_hf(hf)


def _grads_by_hf_name(seq, config) -> dict[str, torch.Tensor]:
    family = get_family("llama")
    n = family.num_blocks(config)
    return {family.key_map.to_hf(int(idx), k, n): p.grad for idx, mod in seq.layers.items()
            for k, p in mod.named_parameters()}


@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_logits_loss_and_grads_match_transformers(name, padding):
    hf, seq = _pair(name)
    ids, mask, pos, seg, labels = make_batch(hf.config.vocab_size, PADDINGS[padding], 12, "left" if padding == "left" else "right")

    out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    out.loss.backward()
    logits = seq((ids, pos, seg))
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
    ours = _grads_by_hf_name(seq, hf.config)
    theirs = {k: p.grad for k, p in hf.named_parameters()}
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k, g in theirs.items():
        assert g is not None and ours[k] is not None, k
        torch.testing.assert_close(ours[k], g, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_tied_config_shares_one_weight():
    hf, seq = _pair("gqa_tied")
    assert hf.config.tie_word_embeddings
    assert len(seq.layers) == hf.config.num_hidden_layers + 2  # embed, blocks, norm; the head reuses the embedding
    params = {id(p) for p in seq.parameters()}
    assert len(params) == sum(1 for _ in hf.parameters())


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_future_tokens_never_change_earlier_logits(name):
    assert_causal(_pair(name, seed=1)[1])


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_packed_segments_are_isolated(name):
    assert_segments_isolated(_pair(name, seed=2)[1], atol=ATOL)


def test_inv_freq_stays_fp32_when_cast_to_bf16():
    _, seq = _pair("gqa_llama3_rope")
    ref = seq.layers["1"].rotary.inv_freq.clone()
    seq.to(torch.bfloat16)
    block = seq.layers["1"]
    assert block.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert block.rotary.inv_freq.dtype == torch.float32 and torch.equal(block.rotary.inv_freq, ref)
