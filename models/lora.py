"""LoRA inside the pipeline: adapters injected per decoder block with peft, PEFT-format export and merge.

Training config: "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": [...] | "all-linear",
"modules_to_save": [...]?, "adapter_path": PEFT_DIR?}. The base is frozen; only adapter weights train and are checkpointed
(with `lora_config.json` naming the base). Adapter keys map to PEFT's through the family's key table:
block-local "self_attn.q_proj.lora_A.default.weight" of pipeline layer i <->
"base_model.model.model.layers.{i-1}.self_attn.q_proj.lora_A.weight".
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from packaging.version import Version
from safetensors.torch import load_file

from pipeft import one_line

from .family import ModelFamily
from .hf_io import (
    LAYER_FILE,
    LAYER_GLOB,
    CheckpointError,
    copy_side_files,
    hf_source_of,
    load_torch_file,
    read_json,
    save_safetensors,
)
from .keymap import KeyMapError
from .outdir import atomic_output_dir

LORA_FILE = "lora_config.json"
ADAPTER = "default"  # peft's adapter name inside the modules
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.(?:default\.)?weight$")
_KEYS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "adapter_path")
DEFAULTS = {"r": 8, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": [], "adapter_path": None}
NO_BLOCKS = ("the model has no decoder blocks (num_hidden_layers 0): LoRA adapts the blocks' linear layers, so "
             "nothing would train; train it in full")


def with_defaults(section: dict) -> dict:
    """A "lora" section with every key's default filled in ("alpha": its r)."""
    out = {**DEFAULTS, **section}
    return {**out, "alpha": out.get("alpha", out["r"])}


BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # peft's init_lora_weights that rewrite the base weights
TIED_OWNERS = ("embed_tokens", "word_embeddings", "lm_head")  # HF modules that own a tied embedding weight


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # module names inside a decoder block (resolved from "all-linear")
    adapter_path: str | None = None  # start from this PEFT adapter instead of fresh adapters
    modules_to_save: tuple[str, ...] = ()  # HF modules trained whole (peft's rule: the module name ends with one)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_info(cls, info: dict) -> LoraSettings:
        """The settings a LoRA checkpoint's lora_config.json records (see `lora_info`)."""
        return cls(info["r"], info["alpha"], info["dropout"], tuple(info["target_modules"]),
                   modules_to_save=tuple(info.get("modules_to_save", ())))

    def peft_config(self, with_modules_to_save: bool = True):
        """peft's LoraConfig. Injection into pipeline blocks leaves `modules_to_save` out: the pipeline trains those
        modules' own weights instead of peft's wrapped copies (the same numbers, plain keys)."""
        from peft import LoraConfig

        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha  # as peft writes it
        return LoraConfig(r=self.r, lora_alpha=alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM",
                          modules_to_save=list(self.modules_to_save) or None if with_modules_to_save else None)

    def saves(self, hf_key: str) -> bool:
        """Whether the HF tensor `hf_key` belongs to a module trained whole (`modules_to_save`): peft's rule, a module
        whose name ends with one of them is trained whole, its submodules with it ("mlp": every block's MLP)."""
        return self.saved_by(hf_key) is not None

    def saved_by(self, hf_key: str) -> str | None:
        """The entry of `modules_to_save` that trains the HF tensor `hf_key` whole (`saves`), or None."""
        module = hf_key.rsplit(".", 1)[0]
        return next((m for name in _module_and_parents(module) for m in self.modules_to_save if peft_saves(name, m)),
                    None)


def peft_saves(name: str, entry: str) -> bool:
    """Whether the installed peft trains the module `name` whole for the `modules_to_save` entry `entry`: peft >= 0.22
    matches whole name components (`name` is `entry` or ends with "." + entry: "norm" is `model.norm` only), earlier
    peft any ending ("norm" also every block's `input_layernorm`); training, export and peft's loading then agree."""
    return name.endswith(entry) and (len(name) == len(entry) or not _peft_matches_components()
                                     or name.endswith("." + entry))


@functools.cache
def _peft_matches_components() -> bool:
    return Version(importlib.metadata.version("peft")) >= Version("0.22")


def _module_and_parents(module: str) -> list[str]:
    """`module` and the modules holding it: "model.layers.1.mlp" -> "model", "model.layers", "model.layers.1",
    "model.layers.1.mlp"."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _leaf_of(target: str, family: ModelFamily) -> str:
    """A `target_modules` entry as the block's linear it names: peft matches a name as a suffix of module paths, so
    "self_attn.q_proj" is "q_proj"; a name of one block's module ("layers.0.self_attn.q_proj") or of none is
    returned as it is (refused: the pipeline adapts every block)."""
    if "." not in target:
        return target
    modules = {k.rsplit(".", 1)[0] for k in family.key_map.table if "{}" in k}  # "model.layers.{}.self_attn.q_proj"
    leaves = {m.rsplit(".", 1)[1] for m in modules if f".{m}".endswith(f".{target}")}
    return leaves.pop() if len(leaves) == 1 else target


def parse_lora(section: dict, family: ModelFamily, config=None) -> LoraSettings:
    """The config's "lora" section; ValueError with a one-line message naming the key. With the model's `config`,
    `modules_to_save` is also checked against its tied embedding."""
    if not isinstance(section, dict):
        raise ValueError(f"'lora' must be an object, got {json.dumps(section)}")
    if unknown := [k for k in section if k not in _KEYS]:
        raise ValueError(f"lora: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_KEYS)}")
    section = with_defaults(section)
    if config is not None and family.num_blocks(config) == 0:
        raise ValueError(f"lora: {NO_BLOCKS} (no 'lora' section)")
    r = section["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"lora.r must be a positive integer, got {json.dumps(r)}")
    width = getattr(config, "hidden_size", None) if config is not None else None
    if r > (width or 65536):  # a rank past the layers' width adds nothing but memory (a huge one: torch's overflow)
        raise ValueError(f"lora.r {r} is above the model's hidden_size {width}: an adapter of a higher rank than its "
                         "layer's width adds nothing" if width else f"lora.r must be at most 65536, got {r}")
    alpha = section["alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"lora.alpha must be a number > 0, got {json.dumps(alpha)}")
    dropout = section["dropout"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {json.dumps(dropout)}")
    targets = section["target_modules"]
    known = family.lora_targets
    if targets == "all-linear":
        targets = list(known)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"lora.target_modules must be \"all-linear\" or a non-empty list of names, got {json.dumps(targets)}")
    targets = [_leaf_of(t, family) for t in targets]
    if bad := [t for t in targets if t not in known]:
        raise ValueError(f"lora.target_modules: {', '.join(map(repr, bad))} not in a {family.model_type} block "
                         f"(known: {', '.join(known)})")
    saves = section["modules_to_save"]
    if not isinstance(saves, list) or not all(isinstance(m, str) and m for m in saves):
        raise ValueError(f"lora.modules_to_save must be a list of module names, got {json.dumps(saves)}")
    # every module (leaves: tensors' modules; and their parents) of every block index, as peft matches names
    blocks = range(family.num_blocks(config)) if config is not None else range(1000)
    leaves = {k.rsplit(".", 1)[0].replace("{}", str(i)): slot for k, (slot, _) in family.key_map.table.items()
              for i in (blocks if "{}" in k else [0])}
    modules = {m for leaf in leaves for m in _module_and_parents(leaf)}
    for m in saves:
        hits = [name for name in modules if peft_saves(name, m)]
        if not hits:
            raise ValueError(f"lora.modules_to_save: {m!r} names no module of a {family.model_type} model "
                             f"(e.g. {', '.join(sorted(leaves)[:4])})")
        hit = set(hits)
        covered = [leaf for leaf in leaves if hit.intersection(_module_and_parents(leaf))]  # the hits and what they hold
        if adapted := next((c for c in covered for t in targets if c == t or c.endswith(f".{t}")), None):
            raise ValueError(f"lora.modules_to_save: {m!r} names {adapted}, which lora.target_modules adapts; a module "
                             "is either adapted or trained whole (peft refuses both)")
        if config is not None and getattr(config, "tie_word_embeddings", False) and \
                (tied := next((c for c in covered if leaves[c] in ("embed", "head")), None)):
            what = "the tied embedding/LM head, which peft would untie" if tied.endswith(TIED_OWNERS) else \
                "in the pipeline's tied embedding module (shared with the LM head's stage)"
            raise ValueError(f"lora.modules_to_save: {m!r} names {tied}, {what}; not supported with tied embeddings")
    path = section["adapter_path"]
    settings = LoraSettings(r, float(alpha), float(dropout), tuple(dict.fromkeys(targets)), path, tuple(saves))
    if path is not None:
        _check_adapter(path, settings)
    return settings


def _check_adapter(path, settings: LoraSettings) -> None:
    """A PEFT LoRA adapter dir whose rank and scaling are the configured ones (else its effect would change)."""
    if not isinstance(path, str):
        raise ValueError(f"lora.adapter_path must be a string, got {json.dumps(path)}")
    d = Path(path)
    if not (d / "adapter_model.safetensors").is_file() or not (d / "adapter_config.json").is_file():
        raise ValueError(f"lora.adapter_path {path}: no adapter_config.json + adapter_model.safetensors (a PEFT adapter dir?)")
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"lora.adapter_path {path}: unreadable adapter_config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"lora.adapter_path {path}: adapter_config.json holds {json.dumps(cfg)[:40]}, not an object "
                         "(a PEFT adapter config)")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError(f"lora.adapter_path {path}: only plain LoRA adapters are supported (no rsLoRA or DoRA)")
    if per_module := [k for k in ("alpha_pattern", "rank_pattern", "lora_bias") if cfg.get(k)]:
        raise ValueError(f"lora.adapter_path {path}: the adapter sets {', '.join(per_module)} (a rank, scale or bias of "
                         "its own for some modules), which these adapters do not have: only one r and alpha for all")
    if (bias := cfg.get("bias", "none")) != "none":
        raise ValueError(f"lora.adapter_path {path}: the adapter's bias is {json.dumps(bias)}: LoRA bias modes are not "
                         "supported (bias must be \"none\")")
    if some := [f"{k} {json.dumps(cfg[k])}" for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
                if cfg.get(k) not in (None, [], "")]:
        raise ValueError(f"lora.adapter_path {path}: the adapter sets {', '.join(some)} (adapters in some layers only), "
                         "which is not supported: the pipeline adapts every layer")
    init = cfg.get("init_lora_weights", True)
    if cfg.get("loftq_config") or (isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)):
        raise ValueError(f"lora.adapter_path {path}: the adapter's init_lora_weights is {json.dumps(init)}: peft "
                         "changes the base as it loads such an adapter (PiSSA, OLoRA, CorDA and LoftQ subtract their "
                         "initial adapters from it), while these adapters add to the base as it is; convert it to a "
                         "plain LoRA adapter first (peft: save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...))")
    alpha = cfg.get("lora_alpha", 0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):  # (float(None) was a traceback)
        raise ValueError(f"lora.adapter_path {path}: adapter_config.json's lora_alpha must be a number, got "
                         f"{json.dumps(alpha)}")
    if (cfg.get("r"), float(alpha)) != (settings.r, settings.alpha):
        raise ValueError(f"lora.adapter_path {path}: the adapter has r {cfg.get('r')}, alpha {cfg.get('lora_alpha')}; "
                         f"the config says r {settings.r}, alpha {settings.alpha:g} (set lora.r and lora.alpha to the adapter's)")
    theirs = cfg.get("target_modules")  # a list of names; a string is a regex or "all-linear": the keys check it
    if isinstance(theirs, list):  # peft matches names as suffixes: "self_attn.q_proj" is "q_proj" here
        theirs = sorted({str(t).rsplit(".", 1)[-1] for t in theirs})
        if theirs != sorted(set(settings.target_modules)):
            raise ValueError(f"lora.adapter_path {path}: the adapter adapts {theirs}; lora.target_modules says "
                             f"{sorted(set(settings.target_modules))} (set lora.target_modules to the adapter's)")
    if sorted(cfg.get("modules_to_save") or []) != sorted(settings.modules_to_save):
        raise ValueError(f"lora.adapter_path {path}: the adapter's modules_to_save {cfg.get('modules_to_save') or []} "
                         f"differ from lora.modules_to_save {list(settings.modules_to_save)}")


def adapter_keys(path: str | Path) -> list[str]:
    """The tensor names of a PEFT adapter dir's adapter_model.safetensors; CheckpointError when it does not read."""
    from safetensors import safe_open

    f = Path(path) / "adapter_model.safetensors"
    try:
        with safe_open(str(f), "pt") as st:
            return list(st.keys())  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type, or an OSError
        raise CheckpointError(f"{f}: unreadable, the file is corrupt or truncated ({one_line(e)})") from None


def check_adapter_keys(path: str | Path, family: ModelFamily, num_blocks: int, targets: tuple[str, ...]) -> None:
    """Every tensor of a PEFT adapter maps to a block of this model, and the adapter has an A and a B for exactly the
    modules `targets` adapt in every block (CheckpointError naming the first that does not fit): one adapting fewer
    (a regex target_modules, exclude_modules) would leave the others to start fresh without a word."""
    for key in (keys := adapter_keys(path)):
        pipeline_key(family, key, num_blocks)
    have = {f"{m['module']}.{m['part']}" for k in keys if (m := _LORA_KEY.match(k.removeprefix("base_model.model.")))}
    want = {f"{hf.removesuffix('.weight').format(i)}.{part}" for hf, (slot, local) in family.key_map.table.items()
            if slot == "block" and local.endswith(".weight") and local.removesuffix(".weight").rsplit(".", 1)[-1]
            in targets for i in range(num_blocks) for part in ("lora_A", "lora_B")}
    by_block = lambda name: [int(t) if t.isdigit() else t for t in name.split(".")]  # noqa: E731 (layers.2 < 10)
    if missing := sorted(want - have, key=by_block):
        raise CheckpointError(f"lora.adapter_path {path}: the adapter has no {missing[0]} ({len(missing)} of the {len(want)} adapter "
                              f"tensors lora.target_modules {list(targets)} needs are missing): it adapts fewer "
                              "modules, and those would start fresh; set lora.target_modules to what it adapts")
    if extra := sorted(have - want, key=by_block):
        raise CheckpointError(f"lora.adapter_path {path}: the adapter adapts {extra[0].rsplit('.', 1)[0]}, which lora.target_modules "
                              f"{list(targets)} does not; set lora.target_modules to what it adapts")


def apply_lora(model, settings: LoraSettings, family: ModelFamily, seed: int, num_blocks: int) -> int:
    """Freeze every parameter of a PipelineModel (or SequentialModel-like module with `forward_funcs` and
    `_local_start`) but those of `modules_to_save`, and inject adapters into its decoder blocks, seeded per
    layer so any partition gets the same initial adapters. Returns the number of blocks that got adapters."""
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    blocks = 0
    for offset, layer in enumerate(model.forward_funcs):
        if isinstance(layer, family.block_class):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + model._local_start + offset)
                inject_adapter_in_model(settings.peft_config(with_modules_to_save=False), layer, adapter_name=ADAPTER)
            upcast_adapters(layer)
            blocks += 1
    for offset, layer in enumerate(model.forward_funcs):  # after injection: peft freezes all but its adapters
        if isinstance(layer, torch.nn.Module) and settings.modules_to_save:
            for local, p in layer.named_parameters():
                if "lora_" in local or ".base_layer." in local:  # adapters, and the frozen weights they adapt
                    continue
                if settings.saves(family.key_map.to_hf(model._local_start + offset, local, num_blocks)):
                    p.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad:
            p.model_parallel = True  # this stage's own (see PipelineModel): counted in the global gradient norm
    if hasattr(model, "ensure_trainable"):
        model.ensure_trainable()  # an embedding- or head-only stage (see PipelineModel.ensure_trainable)
    return blocks


def upcast_adapters(module: torch.nn.Module) -> None:
    """Cast float16 / bfloat16 adapter weights to fp32, in place, as peft's `get_peft_model` and
    `PeftModel.from_pretrained` do (`autocast_adapter_dtype`), which `inject_adapter_in_model` does not: a 4-bit
    layer's adapters are built in its compute dtype. A bf16 / fp16 engine casts them back (its optimizer keeps fp32
    master weights)."""
    for name, p in module.named_parameters():
        if "lora_" in name and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


# ---------------------------------------------------------------------------------------------- keys


def _module_hf_name(family: ModelFamily, layer_idx: int, module: str, num_blocks: int) -> str:
    return family.key_map.to_hf(layer_idx, f"{module}.weight", num_blocks).removesuffix(".weight")


def peft_key(family: ModelFamily, layer_idx: int, local_key: str, num_blocks: int) -> str:
    """Pipeline adapter key (or a key of a module trained whole) -> PEFT's saved key."""
    m = _LORA_KEY.match(local_key)
    if m is None:
        return f"base_model.model.{family.key_map.to_hf(layer_idx, local_key, num_blocks)}"
    return f"base_model.model.{_module_hf_name(family, layer_idx, m['module'], num_blocks)}.{m['part']}.weight"


def pipeline_key(family: ModelFamily, key: str, num_blocks: int) -> tuple[int, str]:
    """PEFT's saved key -> (pipeline layer index, adapter key in the block)."""
    hf_key = key.removeprefix("base_model.model.")
    m = _LORA_KEY.match(hf_key)
    try:
        if m is None:  # a module trained whole (modules_to_save)
            return family.key_map.to_pp(hf_key, num_blocks)
        idx, local = family.key_map.to_pp(f"{m['module']}.weight", num_blocks)
    except KeyError as e:  # KeyMapError: another family, or more layers than this model has
        raise CheckpointError(f"adapter tensor {key!r} does not fit this {family.model_type} model: {e}") from None
    return idx, f"{local.removesuffix('.weight')}.{m['part']}.{ADAPTER}.weight"


def load_adapter_into(model, family: ModelFamily, path: str | Path, num_blocks: int) -> int:
    """Copy a PEFT adapter's weights into the adapters of this stage's blocks; returns tensors copied."""
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, local = pipeline_key(family, key, num_blocks)
        by_layer.setdefault(idx, {})[local] = t
    copied = 0
    for offset, layer in enumerate(model.forward_funcs):
        wanted = by_layer.get(model._local_start + offset, {})
        own = dict(layer.named_parameters()) if isinstance(layer, torch.nn.Module) else {}
        for local, t in wanted.items():
            if local not in own or own[local].shape != t.shape:
                raise CheckpointError(f"{path}: {local} of layer {model._local_start + offset} does not fit the "
                                      "configured adapters (r / target_modules differ?)")
            with torch.no_grad():
                own[local].copy_(t)
            copied += 1
    return copied


# ---------------------------------------------------------------------------------------------- export


def read_lora_info(tag_dir: Path) -> dict | None:
    """The LoRA description a LoRA checkpoint carries (None for a full checkpoint); CheckpointError naming the file
    when it is not one."""
    f = Path(tag_dir) / LORA_FILE
    if not f.is_file():
        return None
    info = read_json(f)
    if not isinstance(info, dict):
        raise CheckpointError(f"{f}: not a LoRA description (not a JSON object)")
    if missing := [k for k in ("r", "alpha", "dropout", "target_modules", "base_model_path") if k not in info]:
        raise CheckpointError(f"{f}: not a LoRA description (no {', '.join(missing)})")
    return info


def lora_info(settings: LoraSettings, base_model_path: str, quantization: dict | None = None,
              fingerprint: str | None = None) -> str:
    """lora_config.json: the adapters' settings, the base, its `base_fingerprint`, and (QLoRA) the base's 4-bit
    quantisation."""
    return json.dumps({**asdict(settings), "target_modules": list(settings.target_modules),
                       "modules_to_save": list(settings.modules_to_save),
                       "base_model_path": str(Path(base_model_path).resolve()),
                       **({"base_fingerprint": fingerprint} if fingerprint else {}),
                       **({"quantization": quantization} if quantization else {})}, indent=1)


FINGERPRINT_ELEMENTS = 4096  # of each tensor: a model fine-tuned from another differs in nearly every element


CONFIG_WRITER_KEYS = ("transformers_version", "_name_or_path")  # where and by what a config.json was written


def base_fingerprint(base_dir: str | Path) -> str:
    """What identifies a pipeline dir's model without reading all of it: config.json (but the version that wrote it),
    and each layer file's tensors' names, dtypes, shapes and first FINGERPRINT_ELEMENTS values (memory-mapped)."""
    import hashlib

    base_dir = Path(base_dir)
    h = hashlib.sha256()
    config = read_json(base_dir / "config.json")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in CONFIG_WRITER_KEYS}
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(base_dir.glob(LAYER_GLOB)):
        h.update(f.name.encode())
        for key, t in sorted(load_torch_file(f).items()):
            h.update(f"{key} {t.dtype} {list(t.shape)}".encode())
            h.update(t.reshape(-1)[:FINGERPRINT_ELEMENTS].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_base(info: dict, where: Path) -> None:
    """A CheckpointError if the base a LoRA checkpoint recorded (`base_fingerprint`) is no longer what its
    base_model_path holds: its adapters would be merged into, or exported for, another model."""
    base = Path(info["base_model_path"])
    if info.get("base_fingerprint") and base.is_dir() and base_fingerprint(base) != info["base_fingerprint"]:
        raise CheckpointError(f"{where / LORA_FILE}: the base model {base} is not the one these adapters were trained "
                              "on (its config.json or weights changed since: base_fingerprint differs)")


def located_base(info: dict, base: str | Path, where: Path) -> dict:
    """`info` (lora_config.json's) with its base_model_path replaced by `base` (pp_to_hg --base: the base moved since
    training), proven the same base by its fingerprint (CheckpointError else)."""
    d, f = Path(base), where / LORA_FILE
    if not (d / "config.json").is_file():
        raise CheckpointError(f"--base {base}: not a pipeline model dir (no config.json)")
    if not info.get("base_fingerprint"):
        raise CheckpointError(f"--base {base}: {f} records no base_fingerprint that could prove it the base these "
                              "adapters were trained on")
    if base_fingerprint(d) != info["base_fingerprint"]:
        raise CheckpointError(f"--base {base}: not the base these adapters were trained on (its config.json or "
                              f"weights differ from {f}'s base_fingerprint)")
    return {**info, "base_model_path": str(d.resolve())}


MOVED = "moved? an export with pp_to_hg --base DIR names where it is now (demo.py: run it on the export)"


def check_adapter_pairs(f: Path, sd: dict[str, torch.Tensor], r: int) -> None:
    """Every adapter of a layer file is a lora_A [r, in] with its lora_B [out, r] (`r`: lora_config.json's); else a
    CheckpointError naming the file and the key (peft could not load the export, a merge would scale it wrongly)."""
    for local, t in sd.items():
        m = _LORA_KEY.match(local)
        if m is None:
            continue
        other = local.replace(f".{m['part']}.", ".lora_B." if m["part"] == "lora_A" else ".lora_A.")
        if other not in sd:
            raise CheckpointError(f"{f}: {local} has no {other} (an adapter needs both)")
        dim = 0 if m["part"] == "lora_A" else 1
        if t.dim() != 2 or t.shape[dim] != r:
            raise CheckpointError(f"{f}: {local} has shape {list(t.shape)}, not rank {r} as {LORA_FILE} says "
                                  f"({'[r, in]' if dim == 0 else '[out, r]'})")


def adapter_tensors(tag_dir: Path, family: ModelFamily, num_blocks: int, r: int) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor from a LoRA checkpoint's layer files (adapters and modules trained whole), each file checked
    (`check_adapter_pairs`, every key in the key table) before anything is written."""
    out = {}
    for idx in range(1, num_blocks + 1):
        if not (tag_dir / LAYER_FILE.format(idx)).is_file():
            raise CheckpointError(f"{tag_dir / LAYER_FILE.format(idx)}: missing (block {idx - 1})")
    for idx in range(num_blocks + 3):
        f = tag_dir / LAYER_FILE.format(idx)
        if not f.is_file():  # the LM head's file is absent with tied embeddings
            continue
        sd = load_torch_file(f)
        check_adapter_pairs(f, sd, r)
        for local, t in sd.items():
            try:
                out[peft_key(family, idx, local, num_blocks)] = t
            except KeyMapError as e:
                raise CheckpointError(f"{f}: {e}") from None
    if not out:
        raise CheckpointError(f"{tag_dir}: no LoRA weights in the layer files")
    return out


def export_peft(tag_dir: Path, info: dict, family: ModelFamily, config, save_path: Path, overwrite: bool,
                side_dir: Path | None = None, generation_config: str | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads, and the run's
    data_settings.json from `side_dir` (how training rendered prompts, for demo.py --adapter). A QLoRA checkpoint's
    adapter also gets quantization_config.json: the BitsAndBytesConfig to load its base with; a chat run's, the
    `generation_config` text (see convert.end_of_turn_generation_config) as generation_config.json."""
    settings = LoraSettings.from_info(info)
    sources = [tag_dir, side_dir, info["base_model_path"], hf_source_of(info["base_model_path"])]  # the adapter's base
    check_base(info, tag_dir)  # the base the adapter config names (pp_to_hg checked the target before)
    if not Path(info["base_model_path"]).is_dir():
        from .convert import log  # convert imports this module

        log(f"warning: {tag_dir / LORA_FILE}: base model {info['base_model_path']} not found: the adapter's "
            f"base_model_name_or_path names it as it was ({MOVED})")
    tensors = adapter_tensors(tag_dir, family, family.num_blocks(config), settings.r)
    with atomic_output_dir(save_path, overwrite, sources=sources) as tmp:
        cfg = settings.peft_config()
        # the HF model the base pipeline dir came from (what AutoPeftModelForCausalLM and llama.cpp's LoRA converter
        # load), else the pipeline dir itself
        cfg.base_model_name_or_path = hf_source_of(info["base_model_path"]) or info["base_model_path"]
        cfg.inference_mode = True  # as peft's save_pretrained writes it
        cfg.save_pretrained(str(tmp))
        save_safetensors({k: t.contiguous() for k, t in tensors.items()}, tmp / "adapter_model.safetensors")
        if side_dir is not None:
            copy_side_files(side_dir, tmp, ("data_settings.json",))
        if info.get("quantization"):
            from .quant import QUANT_FILE

            (tmp / QUANT_FILE).write_text(json.dumps(info["quantization"], indent=1) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(generation_config)
    from .convert import log

    if settings.modules_to_save:
        log(f"note: the adapter holds whole modules ({', '.join(settings.modules_to_save)}) beside its LoRA pairs: peft "
            "loads them; vLLM refuses such an adapter (modules_to_save), and llama.cpp does not take them (its "
            "convert_lora_to_gguf.py refuses them, or writes norms that llama.cpp ignores (Llama's) or refuses "
            "(Bloom's LayerNorm biases) at load): for vLLM and llama.cpp, export with --lora merge")
    if family.model_type == "bloom":
        log("note: vLLM serves no LoRA adapter on Bloom (its BloomForCausalLM does not support LoRA): for vLLM, export "
            "with --lora merge")
    return save_path


def merged_hf_tensors(tag_dir: Path, info: dict, family: ModelFamily, config, progress: bool = True
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's HF tensors with W + alpha/r * B @ A merged in (computed in fp32, stored in W's dtype), and
    the trained tensors of `modules_to_save` in place of theirs. A QLoRA checkpoint's 4-bit layers merge into their
    dequantised weights (not re-quantised, as peft's merge_and_unload on a 4-bit model does), also where no
    adapter sits: the model computes what training computed."""
    from .convert import iter_hf_tensors
    from .quant import QuantSettings, dequantized, quantizable

    n = family.num_blocks(config)
    settings = LoraSettings.from_info(info)
    adapters = adapter_tensors(tag_dir, family, n, settings.r)
    scale = settings.scale
    base = Path(info["base_model_path"])
    if not base.is_dir():
        raise CheckpointError(f"{tag_dir / LORA_FILE}: base model {base} not found (the LoRA checkpoint holds only "
                              f"adapters; {MOVED})")
    check_base(info, tag_dir)
    quant = QuantSettings.from_info(info["quantization"]) if info.get("quantization") else None
    if quant is not None:
        with torch.device("meta"):
            four_bit = {f"{n}.weight" for n in quantizable(family.block_class(config, 0))}
    used = 0
    for key, w in iter_hf_tensors(base, family, config, progress=progress):
        if quant is not None:
            idx, local = family.key_map.to_pp(key, n)
            if family.key_map.slot_of(idx, n)[0] == "block" and local in four_bit:
                w = dequantized(w, quant)
        if (whole := adapters.get(f"base_model.model.{key}")) is not None:
            yield key, whole.to(w.dtype)  # a bf16 run's copy of an fp32 base: one dtype, the config's
            used += 1
            continue
        a = adapters.get(f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight")
        if a is not None and key.endswith(".weight"):
            b = adapters[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"]
            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            used += 2
        yield key, w
    if used != len(adapters):
        raise CheckpointError(f"{tag_dir}: {len(adapters) - used} adapter tensors match no base weight")
