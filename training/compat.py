"""gdGPT's configs (the seed project's) run here unchanged: YAML files, and the seed's keys mapped, accepted or
dropped with one warning line, or refused with a one-line reason.

- `.yml` / `.yaml` configs are read with PyYAML (safe loader; `1e-5` is a number, as in JSON and YAML 1.2).
- `use_flash_attn` -> `attn_implementation`: true "auto" (flash-attn's kernels where they run, else SDPA), false
  "sdpa" (PyTorch's attention; Bloom: "auto", its one exact ALiBi path).
- `aux_max_z_loss` (gdGPT's router z-loss for MoE models): accepted, with a warning that it has no effect here.
- DeepSpeed's `fp16` / `bf16` / `zero_optimization` sections are checked with this DeepSpeed's own models, so a key
  it rejects is one line at the config check instead of a traceback on every rank; `fp16.fused_optimizer` (read by
  gdGPT's patched DeepSpeed) is dropped with a warning. The sections this DeepSpeed removed, the `pipeline` keys
  that would change or be ignored by this pipeline, `torch_autocast`, and the settings of other sections that this
  trainer would ignore or that break it (`SECTION_PROBLEMS`, DeepSpeed's `activation_checkpointing`, the flops
  profiler, ...) are refused (`check_deepspeed_sections`); `deepspeed_refusal` runs DeepSpeed's own config class over
  the whole config, so any other value it refuses is one line too.
- `train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`: the missing ones derived as
  DeepSpeed derives them (`DeepSpeedConfig._set_batch_related_parameters`).
`optimizer.no_wd_kws` is training.optim's (`no_decay_patterns`), `dataloader_drop_last` training.batches'.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipeft import one_line

YAML_SUFFIXES = (".yml", ".yaml")
# gdGPT keys this project reads itself (the others are the project's or DeepSpeed's own)
GDGPT_KEYS = ("use_flash_attn", "aux_max_z_loss")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed sections checked with DeepSpeed's pydantic models, and keys of them dropped with a warning
CHECKED_SECTIONS = ("fp16", "bf16", "bfloat16", "zero_optimization")
DROPPED = {("fp16", "fused_optimizer"): "gdGPT's patched DeepSpeed chose the fused or unfused fp16 optimizer with it; "
                                        "DeepSpeed {version} picks it itself"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as JSON and YAML 1.2 do (YAML 1.1 reads a string), and
    refuses a key repeated in one mapping (PyYAML keeps the last value without a word)."""

    def flatten_mapping(self, node):  # noqa: ANN001, ANN201 (PyYAML's signature)
        self.flattened = getattr(self, "flattened", set()) | {id(node)}  # merged in place: its keys are not as written
        super().flatten_mapping(node)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if isinstance(node, yaml.MappingNode) and id(node) not in getattr(self, "flattened", ()):
            seen: set = set()
            for key_node, _ in node.value:  # as written: a merge key's (<<:) entries may be overridden here
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool, type(None))):  # others: the config check names them
                    continue
                if key in seen:  # as the dict keeps them: 1 and true are one key there
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping: only one of its values would be kept",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def parse_yaml(path: Path, text: str) -> object:
    """The YAML document in `text`; ValueError with one line naming the file and the line of the problem."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = one_line(getattr(e, "problem", None) or e, None)
        raise ValueError(f"{where}: invalid YAML ({what})") from None


def map_gdgpt_keys(raw: dict, path: Path) -> tuple[dict, list[str]]:
    """`raw` with gdGPT's keys turned into the project's (or removed), and the warnings to print once."""
    out, notes = {k: v for k, v in raw.items() if k not in GDGPT_KEYS}, []
    if "use_flash_attn" in raw:
        flag = raw["use_flash_attn"]
        if not isinstance(flag, bool):
            raise ValueError(f"{path}: 'use_flash_attn' must be true or false, got {json.dumps(flag)}")
        if "attn_implementation" in raw:
            raise ValueError(f"{path}: 'use_flash_attn' (gdGPT's) and 'attn_implementation' both choose the attention; "
                             "keep one")
        out["attn_implementation"] = "auto" if flag or _model_type(raw) == "bloom" else "sdpa"
    if "aux_max_z_loss" in raw:
        notes.append(f"{path}: 'aux_max_z_loss' (gdGPT's z-loss on MoE router logits) has no effect here: no model "
                     "family of this project has MoE routers; remove it to silence this warning")
    return out, notes


def _model_type(raw: dict) -> str | None:
    """model_path's config.json model_type, None when it cannot be read (the model checks report that)."""
    try:
        return json.loads((Path(str(raw.get("model_path"))) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_deepspeed_sections(ds: dict, path: Path) -> list[str]:
    """Check the DeepSpeed sections in CHECKED_SECTIONS with DeepSpeed's own config models, dropping the DROPPED
    keys from `ds` in place; refuse the sections and ZeRO keys this DeepSpeed has removed (`elasticity`, `amp`,
    `curriculum_learning`, `zero_optimization.mics_shard_size`, ...), which it would refuse on every rank once the
    model is built, and `unsupported_section_problem`'s. Returns the warnings; ValueError with one line for a value
    DeepSpeed would refuse."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfigError, _reject_removed_config_keys

    try:
        _reject_removed_config_keys(ds)
    except DeepSpeedConfigError as e:
        raise ValueError(f"{path}: {one_line(e, None)} (DeepSpeed {deepspeed.__version__})") from None
    if problem := unsupported_section_problem(ds):
        raise ValueError(f"{path}: {problem}")
    present = [s for s in CHECKED_SECTIONS if s in ds]
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config
    from pydantic import ValidationError

    getters = {"fp16": get_float16_config, "bf16": get_bfloat16_config, "bfloat16": get_bfloat16_config,
               "zero_optimization": get_zero_config}
    notes = []
    for section in present:
        body = ds[section]
        if section == "zero_optimization" and isinstance(body, bool):  # DeepSpeed's older form: true is stage 1
            ds[section] = body = {"stage": 1} if body else {}  # (DeepSpeed prints a 40-line deprecation for a bool)
        if not isinstance(body, dict):
            raise ValueError(f"{path}: '{section}' must be an object, got {json.dumps(body)}")
        if body.get("enabled") == "auto":  # DeepSpeed reads it as its default, off; HF Trainer fills it in
            raise ValueError(f"{path}: '{section}.enabled': \"auto\" is for HF Trainer's DeepSpeed integration, which "
                             "fills it in from its own arguments; DeepSpeed reads it as false: give true or false")
        if "enabled" in body and not isinstance(body["enabled"], bool):  # DeepSpeed reads "false" as false
            raise ValueError(f"{path}: '{section}.enabled' must be true or false, got {json.dumps(body['enabled'])}")
        for (sec, key), why in DROPPED.items():
            if sec == section and key in body:
                ds[section] = body = {k: v for k, v in body.items() if k != key}
                notes.append(f"{path}: '{section}.{key}' is not a key of DeepSpeed {deepspeed.__version__}: dropped "
                             f"({why.format(version=deepspeed.__version__)})")
        try:
            getters[section]({section: body})
        except (DeepSpeedConfigError, AssertionError) as e:  # AssertionError: a deprecated key with its replacement
            raise ValueError(f"{path}: '{section}': {one_line(e, None)}") from None
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in (section, *err["loc"]))
            what, got = _refused(err)
            raise ValueError(f"{path}: '{key}': {what} (DeepSpeed {deepspeed.__version__}), got {got}") from None
    return notes


def _refused(err: dict) -> tuple[str, str]:
    """What a DeepSpeed config model's (pydantic) error says of a value, and the value as JSON."""
    what = "not a key DeepSpeed accepts" if err["type"] == "extra_forbidden" else err["msg"]
    return what, json.dumps(err.get("input"), default=str)


# DeepSpeed's `pipeline` section (runtime/config.py get_pipeline_config) against this project's pipeline: the keys the
# engine reads that would change training, and the ones it does not read here, each with what to use instead;
# pipe_partitioned / grad_partitioned (activations split over tensor-parallel ranks: none here) have no effect
PIPELINE_KEYS = {
    "activation_checkpoint_interval": (0, "DeepSpeed would checkpoint every layer of a stage with its reentrant "
                                          "checkpoint, the embedding too, whose output then needs no gradient: the "
                                          "first stage's layers would not train; set \"use_grad_ckpt\": true (the "
                                          "decoder blocks, non-reentrant)"),
    "use_reentrant": (True, ""),  # DeepSpeed's default; false sets the non-reentrant checkpoint the project sets anyway
    "stages": ("auto", "the stages are model_topo's (process_topology dims)"),
    "partition": ("best", "the layers of each stage are model_topo.parts, or the project's cost balance"),
    "seed_layers": (False, "DeepSpeed reads it from PipelineModule's arguments, not from this section"),
    "pipe_partitioned": (True, ""),
    "grad_partitioned": (True, ""),
}


def unsupported_section_problem(ds: dict) -> str | None:
    """A DeepSpeed section that DeepSpeed would take and that would change or be ignored by this project's training,
    as one line: a `pipeline` key of its own meaning here, `torch_autocast` (a precision path not checked against
    transformers here; the "bf16" section is), the timers that stop the pipeline engine, DeepSpeed's own activation
    checkpointing, `SECTION_PROBLEMS`, the checkpoint writers, data efficiency and the comms logger."""
    if "pipeline" in ds:
        section = ds["pipeline"]
        if not isinstance(section, dict):
            return f"'pipeline' must be an object, got {json.dumps(section)}"
        for key, value in section.items():
            if key not in PIPELINE_KEYS:
                return f"'pipeline.{key}' is not a key of DeepSpeed's pipeline section ({', '.join(PIPELINE_KEYS)})"
            default, why = PIPELINE_KEYS[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                return f"'pipeline.{key}' must be true or false, got {json.dumps(value)}"
            if value != default and why:
                return f"'pipeline.{key}' {json.dumps(value)}: {why}; remove it"
    for name in ("torch_autocast", "flops_profiler", "activation_checkpointing",
                 *dict.fromkeys(n for n, _ in SECTION_PROBLEMS), "data_efficiency", "comms_logger"):
        if not isinstance(ds.get(name, {}), dict):
            return f"'{name}' must be an object, got {json.dumps(ds[name])}"
    if ds.get("torch_autocast", {}).get("enabled"):
        return ("'torch_autocast' is not a precision this project checks against transformers (its pipeline computes "
                "the loss and the head itself); use \"bf16\": {\"enabled\": true} with \"zero_optimization\": "
                "{\"stage\": 1}")
    if ds.get("wall_clock_breakdown") or ds.get("flops_profiler", {}).get("enabled"):
        key = "wall_clock_breakdown" if ds.get("wall_clock_breakdown") else "flops_profiler.enabled"
        return (f"'{key}' true stops DeepSpeed's pipeline engine at the first backward pass (it starts its backward "
                "timers twice: 'bwd_microstep timer has already been started'; the flops profiler turns "
                "wall_clock_breakdown on); remove it (metrics.jsonl records each step's time and data time)")
    section = ds.get("activation_checkpointing", {})
    defaults = _activation_checkpointing_defaults()
    for key, value in section.items():
        if key not in defaults:
            return (f"'activation_checkpointing.{key}' is not a key of DeepSpeed's activation_checkpointing section "
                    f"({', '.join(defaults)})")
        if value != defaults[key]:
            return (f"'activation_checkpointing.{key}' {json.dumps(value)}: DeepSpeed's activation_checkpointing section "
                    "configures deepspeed.checkpointing, which this pipeline does not use (the setting would do "
                    "nothing); set \"use_grad_ckpt\": true (the decoder blocks, non-reentrant) and remove it")
    for (name, key), why in SECTION_PROBLEMS.items():
        if (value := ds.get(name, {}).get(key)) is not None and value is not False:
            return f"'{name}.{key}' {json.dumps(value)}: {why}; remove it"
    if (writer := ds.get("checkpoint", {}).get("writer")) is not None and (problem := _writer_problem(writer)):
        return problem
    if _any_enabled(ds.get("data_efficiency", {})):
        return ("'data_efficiency' enabled: DeepSpeed's data efficiency (curriculum sampling, random-LTD) acts through "
                "its own data loader and layer conversion, which this project does not use (it would do nothing); "
                "remove it (group_by_length and packing order and fill the batches here)")
    if _any_enabled(ds.get("comms_logger", {})):
        return ("'comms_logger' enabled: DeepSpeed's communication logger prints nothing in this trainer (it reports "
                "through deepspeed.comm.log_summary(), which nothing here calls; \"verbose\" too prints nothing); "
                "remove it")
    return None


# DeepSpeed settings of sections it takes that this project's training would ignore or that break it (checked with
# DeepSpeed 0.19.8 over this project's pipeline), by (section, key): why
SECTION_PROBLEMS = {
    ("checkpoint", "use_node_local_storage"): "DeepSpeed then writes only each node's local rank 0's files, so the "
                                              "other stages' files are missing and every save fails; save_path is one "
                                              "directory all nodes share (see Several nodes)",
    ("checkpoint", "load_universal"): "this project resumes its own checkpoints (DeepSpeed's universal-checkpoint "
                                      "loader stops every resume: 'AdamW' object has no attribute 'update_lp_params')",
    ("compile", "deepcompile"): "this project does not compile its model (DeepSpeed compiles only when "
                                "engine.compile() is called; the setting would do nothing)",
}


def _writer_problem(writer: object) -> str | None:
    """DeepSpeed's `checkpoint.writer` (its checkpoint engines), as run with DeepSpeed 0.19.8 over this pipeline:
    "python" saves and resumes as the default torch.save engine; the others do not."""
    if not isinstance(writer, dict):
        return f"'checkpoint.writer' must be an object, got {json.dumps(writer)}"
    if writer.get("decoupled"):
        return ("'checkpoint.writer.decoupled' true: DeepSpeed's decoupled writer saves from a background process, so "
                "the files are not there when this trainer checks and renames the checkpoint: every save fails; remove it")
    kind = writer.get("type", "fast")  # DeepSpeed's default once "writer" is given
    if str(kind).lower() == "mock":
        return ("'checkpoint.writer.type' \"mock\": DeepSpeed's mock writer writes empty files: every checkpoint would "
                "be saved empty; remove 'writer'")
    if str(kind).lower() != "python":
        return (f"'checkpoint.writer.type' {json.dumps(kind)} (DeepSpeed's default once 'writer' is given): its fast "
                "writer is not checked with this pipeline (on CPU it stops every rank at the first save: 'Cannot access "
                "accelerator device'); remove 'writer' (torch.save), or give \"type\": \"python\"")
    return None


def _any_enabled(section: object) -> bool:
    """Whether a DeepSpeed section turns anything on: an "enabled": true at any depth."""
    if isinstance(section, dict):
        return section.get("enabled") is True or any(_any_enabled(v) for v in section.values())
    return False


def _activation_checkpointing_defaults() -> dict:
    """DeepSpeed's activation_checkpointing keys and their defaults, from its own config class."""
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig

    return dict(vars(DeepSpeedActivationCheckpointingConfig({})))


def _holders(node: object, loc: tuple[str, ...], value: object, at: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The key paths of the dicts nested in `node` (itself included) that hold the key path `loc`: those where it
    holds `value` (what DeepSpeed refused) when there are any, else those that hold its first key."""
    def dicts(n: object, where: tuple[str, ...]):
        if isinstance(n, dict):
            yield where, n
            for k, v in n.items():
                yield from dicts(v, where + (str(k),))

    def get(d: dict, path: tuple[str, ...]) -> object:
        for key in path:
            if not isinstance(d, dict) or key not in d:
                return _MISSING
            d = d[key]
        return d

    found = [(where, get(d, loc)) for where, d in dicts(node, at) if loc and loc[0] in d]
    return [w for w, v in found if v == value] or [w for w, _ in found]


_MISSING = object()


def deepspeed_refusal(ds: dict) -> str | None:
    """What DeepSpeed's own config class (as deepspeed.initialize builds it) refuses in `ds`, as one line: a bad value
    in a section passed through unchecked (`compile`, `communication_data_type`, `checkpoint.tag_validation`, ...)
    would otherwise stop every rank with a traceback once the model is built. The batch keys are left to the
    project's checks (they need the data-parallel size)."""
    import copy
    import logging

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger
    from pydantic import ValidationError

    probe = {k: v for k, v in copy.deepcopy(ds).items() if k not in BATCH_KEYS}
    probe.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)  # any data-parallel size fits
    level = logger.level
    logger.setLevel(logging.ERROR)  # its info and warning lines on every rank
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic's path starts inside the model that refused (e.g. DeepSpeedThroughputTimerConfig): the sections
        # of the user's config that hold it give the full key, when exactly one does
        loc = tuple(str(p) for p in err["loc"])
        holders = [h for h in _holders(probe, loc, err.get("input")) if not (h and h[0] in CHECKED_SECTIONS)]
        if len(holders) > 1:  # the same key and value in two sections: the one pydantic's model is named for
            holders = [h for h in holders if h and h[-1].replace("_", "") in e.title.lower()] or holders
        where = ".".join(holders[0] + loc) if len(holders) == 1 else f"{e.title} {'.'.join(loc)}"
        what, got = _refused(err)
        return f"DeepSpeed {deepspeed.__version__} refuses this config: '{where}': {what}, got {got}"
    except Exception as e:  # noqa: BLE001 -- DeepSpeed's checks raise ValueError, AssertionError, KeyError, ...
        # no key in the error (e.g. "'NoneType' object has no attribute 'get'"): the section without which it passes
        key = next((k for k in probe if k not in BATCH_KEYS and _accepted({n: v for n, v in probe.items() if n != k})),
                   None)
        return f"DeepSpeed {deepspeed.__version__} refuses this config: {one_line(e, named=True)}" + \
            (f" (in {key!r})" if key else "")
    finally:
        logger.setLevel(level)
    return None


def _accepted(probe: dict) -> bool:
    """Whether DeepSpeed's config class takes `probe` (its logger quieted by the caller)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(probe)
    except Exception:  # noqa: BLE001 -- whatever it raises, it refuses
        return False
    return True


def derive_batch(ds: dict, dp: int, path: Path) -> None:
    """Fill in the missing batch keys of `ds` as DeepSpeed does for data-parallel size `dp`, and check that the
    three agree (train_batch_size = micro x accumulation x dp). ValueError with one line."""
    tbs, micro, gas = (ds.get(k) for k in BATCH_KEYS)
    if tbs is not None and micro is not None and gas is None:
        gas = tbs // micro // dp
    elif tbs is not None and gas is not None and micro is None:
        micro = tbs // gas // dp
    elif tbs is not None and micro is None:
        micro, gas = tbs // dp, 1
    elif micro is not None and gas is None:
        gas = 1
    elif micro is None:
        raise ValueError(f"{path}: set 'train_micro_batch_size_per_gpu' or 'train_batch_size' (DeepSpeed's batch keys)")
    if tbs is None:
        tbs = micro * gas * dp
    if micro < 1 or gas < 1 or tbs != micro * gas * dp:
        given = " and ".join(f"{k} {ds[k]}" for k in BATCH_KEYS if k in ds)
        raise ValueError(f"{path}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} x "
                         f"gradient_accumulation_steps {gas} x data-parallel size {dp}"
                         + ("" if len([k for k in BATCH_KEYS if k in ds]) == 3 else
                            f" (derived from {given} as DeepSpeed does: no whole number fits)"))
    ds.update(zip(BATCH_KEYS, (tbs, micro, gas), strict=True))
