"""Mistral (model_type "mistral"): Llama's pipeline and key table with MistralDecoderLayer. Its `sliding_window`
(4096 in Mistral-7B-v0.1, null from v0.2 on) is not implemented by the pipeline's attention: a `max_seq_len` above
it is refused (ModelFamily.sliding_window), so training is exact or does not start."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding

from .family import ModelFamily, register
from .llama import KEY_MAP, LORA_TARGETS, RopeBlockPipe, prepare_config, rope_layer_specs


class MistralBlockPipe(RopeBlockPipe, MistralDecoderLayer):
    """MistralDecoderLayer as a pipeline block (see RopeBlockPipe)."""

    rotary_class = MistralRotaryEmbedding


def layer_specs(config: MistralConfig) -> list:
    return rope_layer_specs(config, MistralBlockPipe)


FAMILY = register(ModelFamily(
    model_type="mistral",
    config_class=MistralConfig,
    hf_model_class=MistralForCausalLM,
    key_map=KEY_MAP,
    prepare_config=prepare_config,
    layer_specs=layer_specs,
    block_class=MistralBlockPipe,
    lora_targets=LORA_TARGETS,
    window_per_layer_type=False,
    presets={
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                     sliding_window=None),
    },
))
