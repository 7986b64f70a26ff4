"""Model families as DeepSpeed pipeline spec lists, and the shared pipeline machinery."""

import logging
import os

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

# Nothing is fetched from the network here (models, tokenizers: local_files_only). bitsandbytes' CPU backend, which
# peft imports (lazily, after this), looks a kernel up on the Hugging Face Hub when it is imported (CPUs with
# AVX512-BF16) and warns when it cannot have it (it computes without it): offline unless the user says otherwise,
# and without the warning.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = [
    "FAMILIES", "LAYER_FILE", "ModelConfigError", "ModelFamily", "PipelineModel", "SequentialModel",
    "causal_lm_loss", "get_family", "parse_topology", "plan_stages",
]
