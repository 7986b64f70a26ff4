"""Bloom family as a pipeline spec list: embedding + its LayerNorm, N BloomBlocks, final LayerNorm, and the
LM head tied to the word embeddings.

Between stages: (hidden [B,T,H] float, position_ids [B,T] int64, segment_ids [B,T] int64); the norm
emits hidden alone, the head emits logits [B,T,V]. ALiBi and the segment-aware additive mask are built
from the int64 tensors once per micro-batch on each stage and shared by its blocks (models/attention.py);
the attention itself is transformers' exact eager ALiBi attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import BloomBlock, _get_alibi_slopes

from .attention import CONTEXTS, additive_mask
from .family import ModelFamily, register
from .keymap import KeyMap

# HF key (as save_pretrained writes it) -> (slot, local key). Published checkpoints (bigscience/bloom*)
# store the same keys without "transformer."; import accepts both. Block-local keys are BloomBlock's own.
KEY_MAP = KeyMap(
    table={
        "transformer.word_embeddings.weight": ("embed", "word_embeddings.weight"),
        "transformer.word_embeddings_layernorm.weight": ("embed", "word_embeddings_layernorm.weight"),
        "transformer.word_embeddings_layernorm.bias": ("embed", "word_embeddings_layernorm.bias"),
        "transformer.h.{}.input_layernorm.weight": ("block", "input_layernorm.weight"),
        "transformer.h.{}.input_layernorm.bias": ("block", "input_layernorm.bias"),
        "transformer.h.{}.self_attention.query_key_value.weight": ("block", "self_attention.query_key_value.weight"),
        "transformer.h.{}.self_attention.query_key_value.bias": ("block", "self_attention.query_key_value.bias"),
        "transformer.h.{}.self_attention.dense.weight": ("block", "self_attention.dense.weight"),
        "transformer.h.{}.self_attention.dense.bias": ("block", "self_attention.dense.bias"),
        "transformer.h.{}.post_attention_layernorm.weight": ("block", "post_attention_layernorm.weight"),
        "transformer.h.{}.post_attention_layernorm.bias": ("block", "post_attention_layernorm.bias"),
        "transformer.h.{}.mlp.dense_h_to_4h.weight": ("block", "mlp.dense_h_to_4h.weight"),
        "transformer.h.{}.mlp.dense_h_to_4h.bias": ("block", "mlp.dense_h_to_4h.bias"),
        "transformer.h.{}.mlp.dense_4h_to_h.weight": ("block", "mlp.dense_4h_to_h.weight"),
        "transformer.h.{}.mlp.dense_4h_to_h.bias": ("block", "mlp.dense_4h_to_h.bias"),
        "transformer.ln_f.weight": ("norm", "weight"),
        "transformer.ln_f.bias": ("norm", "bias"),
        "lm_head.weight": ("head", "weight"),  # only with tie_word_embeddings=false; skipped on import when tied
    },
    optional_prefix="transformer.",
)


def prepare_config(config: BloomConfig) -> BloomConfig:
    """A hand-built or AutoConfig-loaded config has no attention implementation, which makes HF's attention
    silently non-causal; Bloom has only the eager path (ALiBi is added to the scores)."""
    config._attn_implementation = "eager"
    return config


def alibi_bias(position_ids: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B,T] int64 -> [B*H, 1, T]: slope_h * key position, as BloomBlock expects.

    HF's build_alibi_tensor uses the same slopes times cumsum(mask) - 1; softmax is shift-invariant per
    query row, so positions restarting at 0 per packed segment (and after left padding) are equivalent."""
    b, t = position_ids.shape
    slopes = _get_alibi_slopes(num_heads, position_ids.device)  # fp32 [H]
    return (slopes[None, :, None] * position_ids[:, None, :]).reshape(b * num_heads, 1, t).to(dtype)


class BloomEmbeddingPipe(nn.Module):
    """Word embeddings + their LayerNorm (one unit, layer file 0); also the tied LM head's weight."""

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, inputs):
        input_ids, position_ids, segment_ids = inputs
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids)), position_ids, segment_ids


class BloomBlockPipe(BloomBlock):
    def forward(self, inputs):
        hidden, position_ids, segment_ids = inputs
        pair, dtype = (position_ids, segment_ids), hidden.dtype
        alibi = CONTEXTS.get(pair, ("alibi", self.num_heads, dtype), lambda: alibi_bias(position_ids, self.num_heads, dtype))
        mask = CONTEXTS.get(pair, ("mask", dtype), lambda: additive_mask(segment_ids, dtype))
        hidden = super().forward(hidden, alibi, mask)[0]  # (hidden, attn weights)
        return hidden, position_ids, segment_ids


class BloomNormPipe(nn.LayerNorm):
    def __init__(self, config: BloomConfig):
        super().__init__(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, inputs):
        return super().forward(inputs[0])


class BloomHeadPipe(nn.Linear):
    def __init__(self, config: BloomConfig):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)


def tied_head_forward(embedding: BloomEmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.word_embeddings.weight)


tied_head_forward.linear_weight = "word_embeddings.weight"  # the loss computes the head in chunks (models.pipeline)


def layer_specs(config: BloomConfig) -> list:
    config = prepare_config(config)
    n = config.num_hidden_layers
    if config.tie_word_embeddings:  # every published Bloom
        tied = "word_embeddings.weight"
        embed = TiedLayerSpec("embed", BloomEmbeddingPipe, config, tied_weight_attr=tied)
        head = TiedLayerSpec("embed", BloomEmbeddingPipe, config, forward_fn=tied_head_forward, tied_weight_attr=tied)
    else:
        embed, head = LayerSpec(BloomEmbeddingPipe, config), LayerSpec(BloomHeadPipe, config)
    return [embed, *(LayerSpec(BloomBlockPipe, config, i) for i in range(n)), LayerSpec(BloomNormPipe, config), head]


FAMILY = register(ModelFamily(
    model_type="bloom",
    config_class=BloomConfig,
    hf_model_class=BloomForCausalLM,
    key_map=KEY_MAP,
    prepare_config=prepare_config,
    layer_specs=layer_specs,
    block_class=BloomBlockPipe,
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    presets={"tiny": dict(hidden_size=64, n_layer=4, n_head=4)},
))
