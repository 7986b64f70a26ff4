"""Qwen2 / Qwen2.5 (model_type "qwen2"): Llama's pipeline with Qwen2DecoderLayer (q/k/v projections with biases,
o_proj without) and Llama's key table (it lists the optional biases). Small Qwen models tie the LM head to the
embedding (`tie_word_embeddings`), handled as for Llama. A sliding window (`use_sliding_window`) is not implemented
by the pipeline's attention: a `max_seq_len` above it is refused (ModelFamily.sliding_window)."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from .family import ModelFamily, register
from .llama import KEY_MAP, LORA_TARGETS, RopeBlockPipe, prepare_config, rope_layer_specs


class Qwen2BlockPipe(RopeBlockPipe, Qwen2DecoderLayer):
    """Qwen2DecoderLayer as a pipeline block (see RopeBlockPipe)."""

    rotary_class = Qwen2RotaryEmbedding


def layer_specs(config: Qwen2Config) -> list:
    return rope_layer_specs(config, Qwen2BlockPipe)


FAMILY = register(ModelFamily(
    model_type="qwen2",
    config_class=Qwen2Config,
    hf_model_class=Qwen2ForCausalLM,
    key_map=KEY_MAP,
    prepare_config=prepare_config,
    layer_specs=layer_specs,
    block_class=Qwen2BlockPipe,
    lora_targets=LORA_TARGETS,
    presets={  # tied like Qwen2.5-0.5B / 1.5B / 3B
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    },
))
