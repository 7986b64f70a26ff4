"""Llama family as a pipeline spec list: embedding, N LlamaDecoderLayers, final RMSNorm, LM head. The blocks
(RopeBlockPipe), the spec list (rope_layer_specs) and the key table serve every Llama-shaped family (qwen2.py,
mistral.py).

Between stages: (hidden [B,T,H] float, position_ids [B,T] int64, segment_ids [B,T] int64); the
norm emits hidden alone, the head emits logits [B,T,V]. RoPE cos/sin and the attention context (row
kind, mask / cu_seqlens / block mask: models/attention.py) are built from the int64 tensors once per
micro-batch on each stage and shared by its blocks.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .attention import CONTEXTS, PIPEFT_ATTENTION, attn_context
from .family import ModelFamily, register
from .keymap import KeyMap

# HF key -> (slot, local key). Block-local keys are LlamaDecoderLayer's own.
KEY_MAP = KeyMap(
    table={
        "model.embed_tokens.weight": ("embed", "weight"),
        "model.layers.{}.self_attn.q_proj.weight": ("block", "self_attn.q_proj.weight"),
        "model.layers.{}.self_attn.k_proj.weight": ("block", "self_attn.k_proj.weight"),
        "model.layers.{}.self_attn.v_proj.weight": ("block", "self_attn.v_proj.weight"),
        "model.layers.{}.self_attn.o_proj.weight": ("block", "self_attn.o_proj.weight"),
        "model.layers.{}.self_attn.q_proj.bias": ("block", "self_attn.q_proj.bias"),  # attention_bias=True
        "model.layers.{}.self_attn.k_proj.bias": ("block", "self_attn.k_proj.bias"),
        "model.layers.{}.self_attn.v_proj.bias": ("block", "self_attn.v_proj.bias"),
        "model.layers.{}.self_attn.o_proj.bias": ("block", "self_attn.o_proj.bias"),
        "model.layers.{}.mlp.gate_proj.weight": ("block", "mlp.gate_proj.weight"),
        "model.layers.{}.mlp.up_proj.weight": ("block", "mlp.up_proj.weight"),
        "model.layers.{}.mlp.down_proj.weight": ("block", "mlp.down_proj.weight"),
        "model.layers.{}.mlp.gate_proj.bias": ("block", "mlp.gate_proj.bias"),  # mlp_bias=True
        "model.layers.{}.mlp.up_proj.bias": ("block", "mlp.up_proj.bias"),
        "model.layers.{}.mlp.down_proj.bias": ("block", "mlp.down_proj.bias"),
        "model.layers.{}.input_layernorm.weight": ("block", "input_layernorm.weight"),
        "model.layers.{}.post_attention_layernorm.weight": ("block", "post_attention_layernorm.weight"),
        "model.norm.weight": ("norm", "weight"),
        "lm_head.weight": ("head", "weight"),  # absent when tie_word_embeddings
    },
    ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"),  # old or torch.save'd
    optional_prefix="model.",  # a base model's save_pretrained (LlamaModel, Qwen2Model), as transformers loads it
)


def prepare_config(config):
    """A hand-built or AutoConfig-loaded config has no attention implementation, which makes HF's
    attention silently non-causal: pin one (sdpa unless eager was asked for)."""
    if config._attn_implementation not in ("sdpa", "eager"):
        config._attn_implementation = "sdpa"
    return config


class LlamaEmbeddingPipe(nn.Embedding):
    def __init__(self, config: LlamaConfig):
        super().__init__(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, inputs):
        input_ids, position_ids, segment_ids = inputs
        return super().forward(input_ids), position_ids, segment_ids


class RMSNorm(LlamaRMSNorm):
    """transformers' Llama RMSNorm (Qwen2's and Mistral's have its forward) computed by torch's `F.rms_norm`: one
    fused kernel forward and one backward on CUDA, which save the input and the reciprocal RMS only (the 0.87B `--gpu`
    bench stepped 1.16-1.17x faster on an H200), torch's composite elsewhere. Bit-identical to transformers' in fp32 on
    the CPU (tested); CUDA's fused kernel sums in its own order, so there it equals it to rounding, not bit for bit. In
    half precision the weight multiplies before the one rounding (transformers rounds, then multiplies). A weight of
    another dtype than the input keeps transformers' forward (and its dtype promotion)."""

    NAMES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # the classes whose forward this computes

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != hidden_states.dtype:
            return super().forward(hidden_states)
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def fresh_rope(rotary: nn.Module) -> nn.Module:
    """`rotary` as a fresh model has it. transformers' "dynamic" rope keeps the frequencies of the longest batch it
    has seen and uses them for a later batch between the original length and that one: a row's encoding would
    depend on the batches before it (evaluations included) and change at a resume. Reset, each micro-batch is
    encoded by its own longest position only, as transformers encodes a batch with a fresh model."""
    if "dynamic" in str(getattr(rotary, "rope_type", "")) and rotary.max_seq_len_cached != rotary.original_max_seq_len:
        rotary.register_buffer("inv_freq", rotary.original_inv_freq.to(rotary.inv_freq.device), persistent=False)
        rotary.max_seq_len_cached = rotary.original_max_seq_len
    return rotary


def _rope_value(config, key: str) -> object:
    """`key` of the config's rope parameters, else the config's own."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get(key, getattr(config, key, None))


class RopeBlockPipe:
    """Mixin over a Llama-shaped transformers decoder layer (RMSNorm, RoPE attention, gated MLP: Llama, Qwen2,
    Mistral) whose attention runs models.attention's path for the rows (`config.attn_implementation` of the
    pipeline, default "auto"); the HF config itself is left as it is. `rotary_class`: the family's RoPE."""

    rotary_class: type = LlamaRotaryEmbedding

    def __init__(self, config, layer_idx: int):
        attn_config = copy.copy(config)
        attn_config._attn_implementation = PIPEFT_ATTENTION
        super().__init__(attn_config, layer_idx)
        for name in ("input_layernorm", "post_attention_layernorm"):  # same weight, one fused kernel where it runs
            norm = getattr(self, name)
            if type(norm).__name__ in RMSNorm.NAMES:
                setattr(self, name, RMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon))
        self.config = config  # the model's config: its identity keys the per-stage RoPE cache
        self.attn_impl = getattr(config, "pipeft_attn_implementation", "auto")
        self.attn_dropout = bool(getattr(config, "attention_dropout", 0.0))  # "auto" then avoids FlexAttention
        # Outside the module tree: .to(dtype) never touches it, so inv_freq stays fp32 as in HF.
        object.__setattr__(self, "rotary", self.rotary_class(config))
        pairs, head_dim = self.rotary.inv_freq.shape[-1], self.self_attn.head_dim
        if 2 * pairs != head_dim:  # transformers builds it, then its attention fails at the first forward
            factor = _rope_value(config, "partial_rotary_factor")
            family = type(self).__name__.removesuffix("BlockPipe")
            raise ValueError(f"partial_rotary_factor {factor}: the rope gives {pairs} of the head's {head_dim // 2} "
                             f"rotary pairs, but {family}'s attention rotates the whole head (head_dim {head_dim})")

    def forward(self, inputs):
        hidden, position_ids, segment_ids = inputs
        if self.rotary.inv_freq.device != hidden.device:
            self.rotary.to(hidden.device)
        pair = (position_ids, segment_ids)
        cos_sin = CONTEXTS.get(pair, ("rope", id(self.config), hidden.dtype),
                               lambda: fresh_rope(self.rotary)(hidden, position_ids), owner=self.config)
        ctx = attn_context(position_ids, segment_ids, self.attn_impl, hidden.dtype, self.attn_dropout)
        hidden = super().forward(hidden, position_ids=position_ids, position_embeddings=cos_sin, pipeft_ctx=ctx)
        return hidden, position_ids, segment_ids


class LlamaBlockPipe(RopeBlockPipe, LlamaDecoderLayer):
    """LlamaDecoderLayer as a pipeline block (see RopeBlockPipe)."""


class LlamaNormPipe(RMSNorm):
    def __init__(self, config: LlamaConfig):
        super().__init__(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, inputs):
        return super().forward(inputs[0])


class LlamaHeadPipe(nn.Linear):
    def __init__(self, config: LlamaConfig):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)


def tied_head_forward(embedding: LlamaEmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.weight)


tied_head_forward.linear_weight = "weight"  # the loss computes the head in chunks (models.pipeline)


def rope_layer_specs(config, block_class: type = LlamaBlockPipe) -> list:
    """Embedding, N `block_class` blocks, RMSNorm, LM head (tied to the embedding when `tie_word_embeddings`): the
    spec list of every Llama-shaped family."""
    config = prepare_config(config)
    n = config.num_hidden_layers
    if config.tie_word_embeddings:
        embed = TiedLayerSpec("embed", LlamaEmbeddingPipe, config, tied_weight_attr="weight")
        head = TiedLayerSpec("embed", LlamaEmbeddingPipe, config, forward_fn=tied_head_forward, tied_weight_attr="weight")
    else:
        embed, head = LayerSpec(LlamaEmbeddingPipe, config), LayerSpec(LlamaHeadPipe, config)
    return [embed, *(LayerSpec(block_class, config, i) for i in range(n)), LayerSpec(LlamaNormPipe, config), head]


def layer_specs(config: LlamaConfig) -> list:
    return rope_layer_specs(config, LlamaBlockPipe)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FAMILY = register(ModelFamily(
    model_type="llama",
    config_class=LlamaConfig,
    hf_model_class=LlamaForCausalLM,
    key_map=KEY_MAP,
    prepare_config=prepare_config,
    layer_specs=layer_specs,
    block_class=LlamaBlockPipe,
    lora_targets=LORA_TARGETS,
    presets={
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
    },
))
