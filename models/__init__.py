"""Model families as DeepSpeed pipeline spec lists, and the shared pipeline machinery."""

import logging
import os
import sys

# Nothing is fetched from the network here (models, tokenizers: local_files_only). bitsandbytes' CPU backend, which
# peft imports, looks a kernel up on the Hugging Face Hub when it is imported (CPUs with AVX512-BF16) and warns when
# it cannot have it (it computes without it): the Hub is offline unless the user says otherwise (set before
# transformers imports huggingface_hub, which reads it once; where something imported it before, its constant too),
# and that warning is not shown.
if "HF_HUB_OFFLINE" not in os.environ:
    os.environ["HF_HUB_OFFLINE"] = "1"
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from . import bloom, llama, mistral, qwen2  # noqa: E402, F401  (register the families)
from .family import FAMILIES, ModelFamily, get_family  # noqa: E402
from .hf_io import LAYER_FILE  # noqa: E402
from .pipeline import (  # noqa: E402
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
