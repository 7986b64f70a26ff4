"""QLoRA: the decoder blocks' linear layers as bitsandbytes 4-bit layers (NF4 / FP4), under LoRA adapters.

Training config: "quantization": {"load_in_4bit": true, "bnb_4bit_quant_type": "nf4" | "fp4",
"bnb_4bit_use_double_quant": bool, "bnb_4bit_compute_dtype": "bfloat16" | "float16" | "float32"} (BitsAndBytesConfig's
own key names and defaults); it requires a "lora" section. Each stage builds one block at a time, loads its layer file
and replaces every `nn.Linear` of the block by a `bitsandbytes.nn.Linear4bit` quantised on the stage's device, so
neither the model nor a full-precision copy of the stage is ever held. The embedding, norms and LM head stay as
they are, as transformers' `from_pretrained(quantization_config=BitsAndBytesConfig(...))` leaves them; the packed
weights are bit-identical to transformers' (the same `Params4bit` quantisation of the same tensors).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.pipe import LayerSpec
from torch import nn

from pipeft import one_line

from .family import ModelFamily
from .hf_io import LAYER_FILE
from .pipeline import layer_file_problem

BNB_PACKAGE, BNB_MIN = "bitsandbytes", (0, 46)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_KEYS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
DEFAULTS = {"load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": "float32"}  # a "quantization" section's keys left out


@dataclass(frozen=True)
class QuantSettings:
    quant_type: str = "nf4"
    double_quant: bool = False  # BitsAndBytesConfig's default
    compute_dtype: str = "float32"  # BitsAndBytesConfig's default

    @classmethod
    def from_info(cls, section: dict) -> QuantSettings:
        """The settings a checkpoint or an adapter dir records (`as_config`)."""
        section = {**DEFAULTS, **section}
        return cls(section["bnb_4bit_quant_type"], bool(section["bnb_4bit_use_double_quant"]),
                   section["bnb_4bit_compute_dtype"])

    def as_config(self) -> dict:
        """BitsAndBytesConfig's keyword arguments (JSON), as the config section and the exports spell them."""
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": self.double_quant, "bnb_4bit_compute_dtype": self.compute_dtype}

    def bnb_config(self):
        """transformers' BitsAndBytesConfig for loading the HF base the same way."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**{**self.as_config(), "bnb_4bit_compute_dtype": COMPUTE_DTYPES[self.compute_dtype]})

    def describe(self) -> str:
        return (f"4-bit {self.quant_type}, {'double quantisation' if self.double_quant else 'no double quantisation'}, "
                f"compute {self.compute_dtype}")


def require_bitsandbytes():
    """The bitsandbytes module; ValueError naming the package and the version needed when it is missing or too old."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version(BNB_PACKAGE)
    except PackageNotFoundError:
        found = None
    need = ".".join(map(str, BNB_MIN))
    hint = f"pip install '{BNB_PACKAGE}>={need}' (or the project's extra: pip install '.[qlora]')"
    if found is None:
        raise ValueError(f"quantization needs the package {BNB_PACKAGE} >= {need}, which is not installed; {hint}")
    parts = tuple(int(p) for p in (found.split("+")[0].split(".") + ["0", "0"])[:2] if p.isdigit())
    if parts < BNB_MIN:
        raise ValueError(f"quantization needs {BNB_PACKAGE} >= {need} (4-bit layers on CPU and GPU); "
                         f"installed: {found}; {hint}")
    import bitsandbytes

    return bitsandbytes


def quantizable(module: nn.Module) -> list[str]:
    """Names of the linear layers transformers' bitsandbytes integration converts: exactly `nn.Linear`."""
    return [n for n, m in module.named_modules() if type(m) is nn.Linear]


def parse_quantization(section, family: ModelFamily, config, lora) -> QuantSettings:
    """The config's "quantization" section against the model and the LoRA settings (a `LoraSettings` or None);
    ValueError with a one-line message naming the key. Builds nothing but one block on the meta device."""
    if not isinstance(section, dict):
        raise ValueError(f"'quantization' must be an object, got {json.dumps(section)}")
    if lora is None and all(k in _KEYS for k in section):
        raise ValueError("'quantization' needs a 'lora' section: the 4-bit base is frozen and only adapters train (QLoRA)")
    settings = settings_of(section)
    with torch.device("meta"):
        block = family.block_class(family.prepare_config(config), 0)
    linears = quantizable(block)
    if not linears:
        raise ValueError(f"quantization: a {family.model_type} block ({family.block_class.__name__}) has no nn.Linear "
                         "layer bitsandbytes can quantise")
    # the HF names of every block's 4-bit weights, matched as training matches them (LoraSettings.saves: peft's
    # rule), so that "mlp", "layers.5.mlp.down_proj" and "model.layers.0.self_attn" are all caught here
    quantized = [hf.format(i) for hf, (slot, local) in family.key_map.table.items()
                 if slot == "block" and local.rsplit(".", 1)[0] in linears for i in range(family.num_blocks(config))]
    for key in quantized:
        if name := lora.saved_by(key):
            raise ValueError(f"lora.modules_to_save: {name!r} holds 4-bit layers under 'quantization' "
                             f"({key.removesuffix('.weight')}), which cannot be trained whole")
    require_bitsandbytes()
    return settings


def settings_of(section: dict, prefix: str = "quantization.") -> QuantSettings:
    """The settings of a "quantization" section, or of an adapter dir's QUANT_FILE: its keys and values checked
    (ValueError naming `prefix` + the key: a config's "quantization.", a file's "FILE: ")."""
    if unknown := [k for k in section if k not in _KEYS]:
        raise ValueError(f"{prefix.rstrip('.: ')}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(_KEYS)}")
    section = {**DEFAULTS, **section}
    if section["load_in_8bit"] is not False:
        raise ValueError(f"{prefix}load_in_8bit is not supported; use \"load_in_4bit\": true (QLoRA)")
    if section.get("load_in_4bit") is not True:
        raise ValueError(f"{prefix}load_in_4bit must be true, got {json.dumps(section.get('load_in_4bit'))}")
    qt = section["bnb_4bit_quant_type"]
    if not isinstance(qt, str) or qt not in QUANT_TYPES:
        raise ValueError(f"{prefix}bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {json.dumps(qt)}")
    dq = section["bnb_4bit_use_double_quant"]
    if not isinstance(dq, bool):
        raise ValueError(f"{prefix}bnb_4bit_use_double_quant must be true or false, got {json.dumps(dq)}")
    cd = section["bnb_4bit_compute_dtype"]
    if not isinstance(cd, str) or cd not in COMPUTE_DTYPES:
        raise ValueError(f"{prefix}bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                         f"got {json.dumps(cd)}")
    return QuantSettings(qt, dq, cd)


# ---------------------------------------------------------------------------------------------- layers


def quantize_linears(module: nn.Module, settings: QuantSettings, device: torch.device | str | None = None,
                     skip: nn.Module | None = None, dtype: torch.dtype | None = None) -> int:
    """Replace every `nn.Linear` of `module` (see `quantizable`) but `skip` by a frozen bitsandbytes `Linear4bit`
    holding its weight (cast to `dtype` first, if given) quantised on `device` (default: where the weight is), as
    transformers' `Bnb4bitQuantize` does; biases are kept. Marks `module` as loaded in 4 bits (peft then wraps these layers with its bitsandbytes
    LoRA layers). Returns the count."""
    bnb = require_bitsandbytes()
    names = [n for n in quantizable(module) if module.get_submodule(n) is not skip]
    for name in names:
        lin = module.get_submodule(name)
        dev = device if device is not None else lin.weight.device
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, COMPUTE_DTYPES[settings.compute_dtype],
                              compress_statistics=settings.double_quant, quant_type=settings.quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(dev, dtype or lin.weight.dtype), requires_grad=False, blocksize=q.weight.blocksize,
                                     compress_statistics=settings.double_quant, quant_type=settings.quant_type,
                                     quant_storage=q.weight.quant_storage, module=q).to(dev)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(dev), requires_grad=False)
        # bitsandbytes' CPU inference shortcut (eval mode, AVX512-BF16) repacks the weight in place with bf16 block
        # scales: an evaluation would change the base that later steps train on. Keep the one exact format.
        q.support_avx512bf16_for_cpu = False
        module.set_submodule(name, q)
    module.is_loaded_in_4bit = True
    return len(names)


class QuantizedBlockSpec(LayerSpec):
    """A decoder block's LayerSpec that, when DeepSpeed builds it, loads the block's layer file and quantises it."""

    def __init__(self, spec: LayerSpec, layer_idx: int, model_path: str | Path, settings: QuantSettings):
        super().__init__(spec.typename, *spec.module_args, **spec.module_kwargs)
        self.layer_idx, self.path, self.settings = layer_idx, Path(model_path), settings

    def build(self, log: bool = False):  # noqa: ARG002 (DeepSpeed's signature)
        from deepspeed.accelerator import get_accelerator

        module = self.typename(*self.module_args, **self.module_kwargs)
        path = self.path / LAYER_FILE.format(self.layer_idx)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            module.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001 - raised by PipelineModel.load_layer_files on every rank at once
            module.load_problem = layer_file_problem(path, e)
            return module
        dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), None)  # quantise the weights as stored
        quantize_linears(module, self.settings, get_accelerator().current_device_name(), dtype=dtype)
        del sd
        module.loaded_from = str(path)  # PipelineModel.load_layer_files skips it
        return module


def quantized_specs(specs: list, family: ModelFamily, model_path: str | Path, settings: QuantSettings) -> list:
    """The spec list with every decoder block replaced by a `QuantizedBlockSpec`."""
    return [QuantizedBlockSpec(s, i, model_path, settings) if isinstance(s, LayerSpec) and s.typename is family.block_class
            else s for i, s in enumerate(specs)]


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (not peft's LoRA layer around one); False while bitsandbytes is not loaded."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def logical_numel(p: torch.Tensor) -> int:
    """A parameter's element count; for a 4-bit weight, that of the matrix it stands for (not of the packed bytes)."""
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()


def base_memory(model: nn.Module) -> dict[str, int]:
    """This process's frozen weights: 4-bit layers, their bytes (packed weights + quantisation state) and what the
    same frozen weights would take unquantised (the layer files' dtype)."""
    layers, q_bytes, full_bytes = 0, 0, 0
    for m in model.modules():
        if is_4bit(m):
            layers += 1
            qs = m.weight.quant_state
            full_bytes += qs.shape.numel() * torch.empty(0, dtype=qs.dtype).element_size()
            q_bytes += m.weight.numel() * m.weight.element_size()
            q_bytes += sum(t.numel() * t.element_size() for t in qs.as_dict(packed=True).values() if torch.is_tensor(t))
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and n != "grad_placeholder"
              and getattr(p, "quant_state", None) is None]
    plain = sum(p.numel() * p.element_size() for p in frozen)
    return {"layers": layers, "quantized": q_bytes + plain, "unquantized": full_bytes + plain}


# ---------------------------------------------------------------------------------------------- export, demo


def dequantized(weight: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """What a 4-bit layer computes with in place of `weight`: quantised as training quantised it, dequantised
    (in `weight`'s dtype). Used to merge adapters into the dequantised base, as peft does."""
    bnb = require_bitsandbytes()
    p = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, compress_statistics=settings.double_quant,
                          quant_type=settings.quant_type).to("cpu")
    return bnb.functional.dequantize_4bit(p.data, p.quant_state).to(weight.dtype)


def quantize_hf_model(model: nn.Module, settings: QuantSettings) -> int:
    """An HF causal LM's linear layers as 4-bit layers, the LM head excepted (as transformers does); in place."""
    return quantize_linears(model, settings, skip=model.get_output_embeddings())


QUANT_FILE = "quantization_config.json"  # in an exported adapter dir: how to load its base


def read_quant_file(directory: Path) -> QuantSettings | None:
    """The settings an exported adapter dir's QUANT_FILE records (its base quantised so), None without one;
    ValueError naming the file when it cannot be read or holds what `settings_of` refuses."""
    f = Path(directory) / QUANT_FILE
    if not f.is_file():
        return None
    try:
        section = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable, the file is corrupt or truncated ({one_line(e, 120, named=True)})") from None
    if not isinstance(section, dict):
        raise ValueError(f"{f}: not a JSON object")
    return settings_of(section, f"{f}: ")


def saved_quantization(section: dict | None) -> dict | None:
    """The config's "quantization" section as a checkpoint records it (every key spelled out), None without one."""
    return None if section is None else QuantSettings.from_info(section).as_config()
