"""What a model family declares, and the registry that picks one from `config.json`'s `model_type`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from . import cost
from .hf_io import CheckpointError
from .keymap import KeyMap
from .pipeline import ModelConfigError, build_specs

ROPE_EXTENDING = ("linear", "dynamic", "yarn", "longrope", "llama3")  # rope types whose factor extends the context


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type
    config_class: type
    hf_model_class: type  # the transformers reference (tests, demo)
    key_map: KeyMap
    prepare_config: Callable  # sets what the pipeline needs (attention implementation) and returns the config
    layer_specs: Callable  # config -> [LayerSpec | TiedLayerSpec]: embed, N blocks, norm, head
    block_class: type  # decoder block module (activation checkpointing, balance)
    presets: dict[str, dict] = field(default_factory=dict)  # named configs for `convert_model.py init`
    lora_targets: tuple[str, ...] = ()  # linear modules of a block that LoRA may adapt ("all-linear")
    # whether `layer_types` says which layers apply `sliding_window` (Qwen2); Mistral's code applies it in every
    # layer whatever layer_types says (MistralConfig keeps them only to warn)
    window_per_layer_type: bool = True

    @staticmethod
    def num_blocks(config) -> int:
        return config.num_hidden_layers

    def unit_sizes(self, config) -> list[int]:
        """Specs per unit: the embedding, each block, then the head unit (final norm + LM head)."""
        return [1] * (self.num_blocks(config) + 1) + [2]

    def unit_costs(self, config, seq_len: int | None = None) -> list[float]:
        """Per-token multiply-adds per unit, the auto-balance weights: see models/cost.py (the one cost model)."""
        return cost.unit_costs(self, config, seq_len)

    @staticmethod
    def max_positions(config) -> tuple[int | None, str]:
        """The longest sequence the model's positions cover, and how: `max_position_embeddings`, or the length
        its rope scaling covers (factor x the original length, for the types that extend it); None: no limit
        (ALiBi)."""
        limit = getattr(config, "max_position_embeddings", None)
        if limit is None:
            return None, "no position limit"
        rope = _rope(config)
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings", limit)
        if rope.get("rope_type", rope.get("type")) in ROPE_EXTENDING and factor and original >= limit:
            scaled = int(factor * original)  # else max_position_embeddings already states the scaled length
            if scaled > limit:  # (Llama-3.1: 8192 original x 8, max_position_embeddings 131072)
                return scaled, f"{rope.get('rope_type', rope.get('type'))} rope scaling x{factor:g} of {original}"
        return limit, "max_position_embeddings"

    @staticmethod
    def rope_switch_length(config) -> int | None:
        """The sequence length past which the rope frequencies of a whole batch change with its longest position
        (transformers' "dynamic" and "longrope": the scaling follows max(position_ids) + 1), None if they never do.
        Packed segments longer than it would change their neighbours' positions' encoding."""
        rope = _rope(config)
        kind = rope.get("rope_type", rope.get("type"))
        if kind == "dynamic":
            return getattr(config, "max_position_embeddings", None)
        if kind == "longrope":
            return rope.get("original_max_position_embeddings", getattr(config, "max_position_embeddings", None))
        return None

    def sliding_window(self, config) -> int | None:
        """The window of the model's sliding-window attention layers (Mistral-7B-v0.1; Qwen2 with
        `use_sliding_window`), None when every layer attends to the whole sequence. The pipeline's attention does not
        implement the window: it is exact only for sequences of at most this many tokens (HF: key k is visible
        to query q when q - k < window), so longer ones are refused (the config check, models.attention)."""
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if window is None or (self.window_per_layer_type and types is not None and "sliding_attention" not in types):
            return None
        return int(window)

    def init_layer(self, module: nn.Module, config, layer_idx: int, seed: int) -> None:
        """Fresh weights for pipeline layer `layer_idx`, seeded per layer so any partition gives the same model."""
        init_like_transformers(module, config.initializer_range, torch.Generator().manual_seed(seed * 100_003 + layer_idx))

    def load_config(self, directory: str | Path):
        """`directory`'s config.json, prepared for the pipeline and checked (`check_config`); a config transformers
        rejects is a CheckpointError naming the file."""
        where = Path(directory) / "config.json"
        with config_errors(where):
            config = self.prepare_config(self.config_class.from_pretrained(str(directory)))
        return self.check_config(config, where)

    def check_config(self, config, where: str | Path):
        """`config`, once every layer builds from it (on the meta device: no memory); what transformers rejects (an
        unknown `hidden_act` or rope type, ...) is a CheckpointError naming `where`."""
        for key in (*POSITIVE_SIZES, "num_hidden_layers"):  # (a zero one failed in torch's arithmetic, naming no key)
            value, least = getattr(config, key, None), 0 if key == "num_hidden_layers" else 1
            if isinstance(value, int) and not isinstance(value, bool) and value < least:
                raise CheckpointError(f"{where}: {key} must be >= {least}, got {value}")
        pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
        if isinstance(pad, int) and isinstance(vocab, int) and not -vocab <= pad < vocab:
            raise CheckpointError(f"{where}: pad_token_id {pad} is not below vocab_size {vocab} (a token added to the "
                                  "tokenizer without resizing the embeddings?)")
        heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
        if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
            raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} "
                                  "(each key/value head serves a whole group of query heads)")
        rope = _rope(config)
        for key, value in rope.items():  # (a string factor failed in torch's arithmetic, naming no key)
            if key in ROPE_NUMBERS and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CheckpointError(f"{where}: rope_parameters.{key} must be a number, got {json.dumps(value)}")
        if rope.get("rope_type", rope.get("type")) == "longrope":  # transformers only warns; torch fails later
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            want = int(head_dim * (rope.get("partial_rotary_factor") or 1.0)) // 2
            for key in ("short_factor", "long_factor"):
                if isinstance(rope.get(key), list) and len(rope[key]) != want:
                    raise CheckpointError(f"{where}: rope_parameters.{key} has {len(rope[key])} entries, one per "
                                          f"rotary pair of the head: {want} (head_dim {head_dim} / 2)")
        with config_errors(where, config):
            meta_layers(self, config)
        return config


POSITIVE_SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings", "sliding_window")  # >= 1 where set (num_hidden_layers: >= 0)
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "partial_rotary_factor")


def _rope(config) -> dict:
    """The config's rope parameters (transformers 5's `rope_parameters`, older `rope_scaling`), {} if none."""
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def meta_layers(family: ModelFamily, config) -> dict[int, nn.Module]:
    """{layer index: module} for every spec that owns a layer file, built on the meta device (no memory)."""
    with torch.device("meta"):
        owned, _ = build_specs(family.layer_specs(config))
    return owned


@contextmanager
def config_errors(where: str | Path, config=None) -> Iterator[None]:
    """What transformers and huggingface_hub raise for a model config they reject, as one CheckpointError line naming
    `where` (with `config`, an unknown value is named by its key)."""
    try:
        yield
    except (CheckpointError, ModelConfigError):
        raise
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError, OSError,
            AssertionError, RuntimeError) as e:  # torch's Embedding asserts padding_idx < num_embeddings; rope
        # parameters transformers only warns about (longrope factors of the wrong length) fail in torch ops
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        problem = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # huggingface_hub's: "...:\n  cause"
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):  # transformers' lookup of a value, or
            # its own message ("Missing required keys in `rope_parameters` ...")
            keys = [k for k, v in _flat(config.to_dict() if config is not None else {}) if v == e.args[0]]
            problem = f"{' / '.join(keys)} {e.args[0]!r} is not one transformers knows" if keys else e.args[0]
        raise CheckpointError(f"{where}: {problem[:300]}") from None


def _flat(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of a nested dict's leaves."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@torch.no_grad()
def init_like_transformers(module: nn.Module, std: float, gen: torch.Generator) -> None:
    """transformers' init for these families (PreTrainedModel._init_weights): normal(0, std) linear and
    embedding weights, zero biases and padding rows, norms to weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std, generator=gen)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__:
            m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str | None, where: str = "config.json") -> ModelFamily:
    if model_type not in FAMILIES:
        raise ModelConfigError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
