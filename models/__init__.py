"""Model families as DeepSpeed pipeline spec lists, and the shared pipeline machinery."""

from . import bloom, llama, mistral, qwen2  # noqa: F401  (register the families)
from .family import FAMILIES, ModelFamily, get_family
from .pipeline import (
    LAYER_FILE,
    ModelConfigError,
    PipelineModel,
    SequentialModel,
    causal_lm_loss,
    parse_topology,
    plan_stages,
)

__all__ = [
    "FAMILIES", "LAYER_FILE", "ModelConfigError", "ModelFamily", "PipelineModel", "SequentialModel",
    "causal_lm_loss", "get_family", "parse_topology", "plan_stages",
]
