"""The Llama pipeline spec list: the tied embedding / head and RoPE's fp32 inv_freq; every rope scaling against
LlamaForCausalLM past its original length. Numerics for every attention path and row kind: test_attention.py."""

from __future__ import annotations

import pytest
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


def test_rms_norm_is_transformers_rms_norm_through_one_fused_op():
    """Every Llama-shaped family's norms (the blocks' two, the final one) are models.llama.RMSNorm: F.rms_norm, one
    fused kernel forward and one backward on CUDA. Against transformers' RMSNorm: bit-identical output and gradients
    in fp32; in bf16 within one rounding; a weight of another dtype keeps transformers' forward exactly."""
    from torch.nn import functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from models import get_family
    from models.llama import RMSNorm
    from models.pipeline import SequentialModel
    from tests.helpers import tiny_config

    for family, name in (("llama", "gqa_tied"), ("qwen2", "tied"), ("mistral", "window")):
        seq = SequentialModel(get_family(family).layer_specs(tiny_config(family, name)))
        norms = [m for m in seq.modules() if "RMSNorm" in type(m).__name__ or type(m).__name__.endswith("NormPipe")]
        assert len(norms) == 2 * seq.layers["1"].config.num_hidden_layers + 1, family
        assert all(isinstance(m, RMSNorm) for m in norms), (family, {type(m).__name__ for m in norms})
    calls = []
    original = F.rms_norm
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ours, theirs = RMSNorm(64, eps=1e-5).to(dtype), LlamaRMSNorm(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            theirs.weight.normal_(1.0, 0.5)
            ours.weight.copy_(theirs.weight)
        x = torch.randn(3, 7, 64, dtype=dtype) * 3
        g = torch.randn(3, 7, 64, dtype=dtype)
        outs = []
        for norm in (ours, theirs):
            xi = x.clone().requires_grad_()
            F.rms_norm = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
            try:
                y = norm(xi)
            finally:
                F.rms_norm = original
            y.backward(g)
            outs.append((y.detach(), xi.grad, norm.weight.grad))
        assert len(calls) == 1  # ours ran F.rms_norm, transformers' did not
        calls.clear()
        for a, b in zip(*outs, strict=True):
            if dtype == torch.float32:
                assert torch.equal(a, b)
            else:  # one bf16 rounding apart at most (the weight gradient sums 21 such products)
                torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2 ** -7 * 21)
    mixed = RMSNorm(64).float()  # fp32 weight, bf16 input: transformers' forward, its promotion to fp32
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(mixed(x), LlamaRMSNorm(64).float()(x)) and mixed(x).dtype == torch.float32


HEAD_DIM = 16  # the tiny configs' 64 / 4 heads
ROPES = {  # rope_parameters -> max_position_embeddings; rows of 40 positions pass the original 16 of each
    "linear": ({"rope_type": "linear", "factor": 4.0}, 16),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 16),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.8,
              "beta_fast": 16.0, "beta_slow": 2.0}, 64),
    "longrope": ({"rope_type": "longrope", "original_max_position_embeddings": 16,
                  "short_factor": [1.0 + i / 10 for i in range(HEAD_DIM // 2)],
                  "long_factor": [2.0 + i for i in range(HEAD_DIM // 2)]}, 64),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 64),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_scalings_past_the_original_length_match_transformers(rope):
    """Logits, loss and every gradient against LlamaForCausalLM (fp32, atol 1e-5) for each rope scaling, on
    right-padded rows past original_max_position_embeddings, and packed segments against each alone (but for
    dynamic / longrope, which encode a row by its longest position: packing is refused there, training.config)."""
    from models import causal_lm_loss
    from tests.helpers import make_batch
    from tests.test_attention import ATOL, _assert_grads_match, _hf_forward, packed_batch

    params, positions = ROPES[rope]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config("gqa_tied", max_position_embeddings=positions,
                                       rope_parameters={**params, "rope_theta": 10000.0})).float()
    seq = sequential_from_hf(hf)
    ids, mask, pos, seg, labels = make_batch(hf.config.vocab_size, [40, 31, 15], 40, "right")
    out = _hf_forward(hf, ids, mask, pos, labels)
    out.loss.backward()
    logits = seq((ids, pos, seg))
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits[mask.bool()], out.logits[mask.bool()], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
    _assert_grads_match(seq, hf)
    if rope in ("dynamic", "longrope"):
        return
    (ids, pos, seg, labels), (alone, mask, alone_labels), where = packed_batch(hf.config.vocab_size, lengths=(20, 13, 20),
                                                                               width=40)
    with torch.no_grad():
        theirs = _hf_forward(hf, alone, mask, (mask.cumsum(-1) - 1).clamp(min=0), alone_labels).logits
        ours = seq((ids, pos, seg))
    for k, (row, at) in enumerate(where):
        n = int(mask[k].sum())
        torch.testing.assert_close(ours[row, at:at + n], theirs[k, :n], atol=ATOL, rtol=0)
