"""Resuming a run: which checkpoint, and what changed in the config since it was saved.

Every checkpoint holds the run's config as loaded (`run_config.json`) and a manifest of its files with their
sizes (`manifest.json`). At resume:
- the tag `latest` names is checked (its trainer_state.json readable, every file of the manifest present
  with its size); a damaged one is passed over for the newest intact earlier tag, with a line saying so;
- with no `latest` (a run killed between its first tag's rename and `latest`'s write, or `latest` deleted) the
  newest complete tag is resumed, with a line saying so, and rank 0 then names it in `latest` (`name_resumed`:
  `best` and rotation as after its save);
- the config in force is compared with the saved one key by key (`config_changes`, on the `effective` settings:
  spellings DeepSpeed treats alike are equal). Each change is applied from the resume step on, or refused with the
  reason (`RESUME_RULES`; the README lists them). Changes that break the exact data order are refused unless
  "allow_data_change_on_resume" is true;
- a full run's checkpoint records the model config it was built with (`MODEL_CONFIG_FILE`): a model_path whose
  config.json differs is refused, naming the keys (a LoRA checkpoint's base_fingerprint covers its base).
Everything here runs before any process group exists, except where the trainer calls it.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import MISSING, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.lora import CONFIG_WRITER_KEYS, LoraSettings, base_fingerprint, read_lora_info
from models.lora import with_defaults as lora_defaults
from models.outdir import latest_tag, run_tags
from models.quant import DEFAULTS as QUANT_DEFAULTS
from models.quant import saved_quantization
from training.batches import DROP_LAST
from training.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TAG,
    Checkpoints,
    RunState,
    atomic_write_text,
    saved_eval_fingerprint,
    tag_of,
)
from training.compat import BATCH_KEYS, DROPPED, map_gdgpt_keys

if TYPE_CHECKING:
    from training.config import TrainConfig

RUN_CONFIG_FILE = "run_config.json"
MODEL_CONFIG_FILE = "model_config.json"  # a full run's: `model_config` of model_path, compared at resume
# config.json keys that do not change what training computes: who wrote it, and what serving reads
MODEL_CONFIG_IGNORED = (*CONFIG_WRITER_KEYS, "torch_dtype", "dtype", "use_cache", "architectures", "bos_token_id",
                        "eos_token_id", "pad_token_id")
PRECISION = ("fp16", "bf16")

APPLIED, SAMPLES, DATA, FIXED = "applied", "samples", "data", "fixed"
FP16_SCALER = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
               "min_loss_scale")  # DeepSpeed's fp16 keys (FP16_<KEY>_DEFAULT in deepspeed.runtime.constants)
ZERO_COMMUNICATION = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                      "reduce_scatter", "allgather_partitions", "use_multi_rank_bucket_allreduce")  # ZeRO-1's buckets
# (key or dotted prefix, kind, what happens). The first match wins; keys not listed are applied.
RESUME_RULES: list[tuple[str, str, str]] = [
    ("max_steps", APPLIED, "the run trains to the new length (a finished run continues)"),
    ("n_epoches", APPLIED, "the run trains to the new length (a finished run continues)"),
    ("optimizer.type", FIXED, "the checkpoint's optimizer state belongs to another optimizer"),
    ("optimizer.params", APPLIED, "the optimizer uses the new value from this step on"),
    ("lr_schedule", APPLIED, "the schedule continues from this step with the new values (another kind of "
                             "scheduler starts at this step)"),
    ("scheduler", APPLIED, "the schedule continues from this step with the new values (another kind of "
                           "scheduler starts at this step)"),
    ("decay_norm_and_bias", FIXED, "the optimizer's parameter groups would differ from the checkpoint's"),
    ("optimizer.no_wd_kws", FIXED, "the optimizer's parameter groups would differ from the checkpoint's"),
    *((f"fp16.{k}", FIXED, "DeepSpeed restores the loss scaler from the checkpoint (its scale, window and factor): "
                           "a new value would not take effect") for k in FP16_SCALER),
    ("bf16.check_grad_overflow", APPLIED, "takes effect from this step"),
    ("bf16", FIXED, "the checkpoint's optimizer state is stored for the other precision"),
    ("fp16", FIXED, "the checkpoint's optimizer state is stored for the other precision"),
    *((f"zero_optimization.{k}", APPLIED, "gradient communication only: takes effect from this step (the optimizer "
                                          "state's partition does not depend on it)") for k in ZERO_COMMUNICATION),
    ("zero_optimization", FIXED, "the checkpoint's optimizer state is laid out for the other ZeRO setting"),
    ("data_types", FIXED, "the checkpoint's optimizer state is stored for the other precision"),
    ("lora.dropout", APPLIED, "takes effect from this step"),
    ("lora.adapter_path", APPLIED, "no effect on resume: the adapters come from the checkpoint"),
    ("lora", FIXED, "the checkpoint holds adapters of the saved LoRA settings"),
    ("quantization", FIXED, "the adapters were trained on the base quantised the saved way"),
    ("model_topo", APPLIED, "weights, step and schedule are loaded; the optimizer state is reset if the stages "
                            "or the data-parallel replicas change"),
    ("from_scratch", APPLIED, "no effect on resume: the weights come from the checkpoint"),
    ("eval_data_path", APPLIED, "later evaluations use the new eval data (other eval rows are refused with "
                                "keep_best or early_stopping_patience)"),
    ("save_path", APPLIED, "the run continues in the new save_path"),
    # the training rows are a function of these: a change is checked against the checkpoint's data fingerprint once
    # the data are read (the same rows, e.g. a data file moved: the run goes on; other rows: refused)
    ("data_path", SAMPLES, "the training data may change"),
    ("max_seq_len", SAMPLES, "the samples' tokens may change"),
    ("template", SAMPLES, "the samples' tokens may change"),
    ("train_on_prompt", SAMPLES, "the trained tokens may change"),
    ("last_answer_only", SAMPLES, "the trained tokens may change"),
    ("pretrain_eos", SAMPLES, "the samples' tokens may change"),
    ("packing", SAMPLES, "the rows may change"),
    ("split_long_pretrain", SAMPLES, "the rows may change"),
    ("eval_split_ratio", SAMPLES, "the training samples may change"),
    # the data order is a pure function of these and the step: a change breaks "no sample repeated or skipped"
    ("seed", DATA, "the data order changes"),
    ("group_by_length", DATA, "the data order changes"),
    ("train_micro_batch_size_per_gpu", DATA, "the global batch changes"),
    ("gradient_accumulation_steps", DATA, "the global batch changes"),
    ("train_batch_size", DATA, "the global batch changes"),
    ("dataloader_drop_last", DATA, "the steps of an epoch change"),
]


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object
    kind: str  # APPLIED | SAMPLES | DATA | FIXED
    note: str

    def line(self, allowed: bool = False) -> str:
        what = {APPLIED: "applied", DATA: "allowed (allow_data_change_on_resume)" if allowed else "refused",
                SAMPLES: "allowed (allow_data_change_on_resume)" if allowed else
                "checked: the run goes on only if the training samples are the checkpoint's", FIXED: "refused"}[self.kind]
        return f"{self.key}: {self.values()} ({what}: {self.note})"

    def values(self) -> str:
        return f"{_show(self.old)} -> {_show(self.new)}"


_MISSING = object()


def _show(v: object) -> str:
    return "(unset)" if v is _MISSING else json.dumps(v)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def side_by_side(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of two configs, _MISSING where a side lacks the key: a section (a dict)
    on both sides, or on one side with the key absent on the other, is compared key by key (an empty one is as
    absent); a section against a value (e.g. null) is one pair of the key, the section whole (not one pair per key of
    the section with the value under a key that the section's keys collide with)."""
    out = []
    for k in sorted(set(old) | set(new)):
        o, n = old.get(k, _MISSING), new.get(k, _MISSING)
        if (isinstance(o, dict) or o is _MISSING) and (isinstance(n, dict) or n is _MISSING):
            out += side_by_side(o if isinstance(o, dict) else {}, n if isinstance(n, dict) else {}, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", o, n))
    return out


def rule_of(key: str, lora_run: bool = False) -> tuple[str, str]:
    if key == "model_path":
        return (FIXED, "a LoRA checkpoint holds only adapters: the base they were trained on is needed") if lora_run \
            else (APPLIED, "no effect on resume: the weights come from the checkpoint (its config.json must be the "
                           "checkpoint's model's: checked)")
    for prefix, kind, note in RESUME_RULES:
        if key == prefix or key.startswith(prefix + "."):
            return kind, note
    return APPLIED, "takes effect from this step"


STRICTNESS = (APPLIED, SAMPLES, DATA, FIXED)


def rule_of_value(key: str, old: object, new: object, lora_run: bool = False) -> tuple[str, str]:
    """rule_of a key; for a whole section against a value (`side_by_side`), the strictest rule of the key and of the
    section's keys (e.g. "optimizer" set to null changes optimizer.type: refused)."""
    keys = [key, *(f"{key}.{k}" for v in (old, new) if isinstance(v, dict) for k in flatten(v))]
    return max((rule_of(k, lora_run) for k in keys), key=lambda rule: STRICTNESS.index(rule[0]))


IGNORED = ("resume", "overwrite_save_path", "allow_data_change_on_resume", "data_cache_dir")  # never worth a line
UNORDERED = ("lora.target_modules", "lora.modules_to_save")  # lists of module names that peft reads as sets


def _same_set(a: object, b: object) -> bool:
    """Two lists of the same names, in any order or repeated."""
    return isinstance(a, list) and isinstance(b, list) and set(map(str, a)) == set(map(str, b))


def effective(raw: dict, as_written: frozenset = frozenset()) -> dict:
    """A raw config with what is read alike written alike: a key left out is its default (the project's keys, the
    "lora" and "quantization" sections', dataloader_drop_last's (true here), DeepSpeed's fp16 / bf16 / ZeRO sections'
    (`_as_deepspeed_reads`), a torch scheduler's parameters'; gdGPT's use_flash_attn as the attn_implementation it
    means); a precision section that is not enabled (absent, {}, "enabled": false; its other keys do nothing) is
    none, "bfloat16" is "bf16", and zero_optimization absent, false, {} or stage 0 is none, true is {"stage": 1}.
    The DeepSpeed sections named in `as_written` are compared as written; those DeepSpeed cannot read are listed
    under UNREAD (config_changes compares them as written on both sides)."""
    from deepspeed.runtime import constants as ds

    from training.config import PROJECT_KEYS  # training.config imports this module

    try:  # gdGPT's keys as the project's (the config loaded once: a bad value cannot be here)
        raw = map_gdgpt_keys(raw, Path())[0]
    except ValueError:
        pass
    out = {k: f.default for k, f in PROJECT_KEYS.items() if f.default is not MISSING} | raw
    out.setdefault("dataloader_drop_last", DROP_LAST)
    if isinstance(out.get("lora"), dict):
        out["lora"] = lora_defaults(out["lora"])
    if isinstance(out.get("quantization"), dict):
        out["quantization"] = {**QUANT_DEFAULTS, **out["quantization"]}
    if "bfloat16" in out:
        out.setdefault("bf16", out.pop("bfloat16"))
    for key in PRECISION:  # "enabled" as DeepSpeed reads it: true (an older run's "auto" or "false" was off)
        if key in out and not (isinstance(out[key], dict) and out[key].get("enabled") in (True, "true", "True")):
            del out[key]
    if "fp16" in out:
        out["fp16"] = {k: getattr(ds, f"FP16_{k.upper()}_DEFAULT") for k in FP16_SCALER} | out["fp16"]
    zero = out.pop("zero_optimization", None)
    if stage := zero_stage(raw):
        out["zero_optimization"] = {**(zero if isinstance(zero, dict) else {}), "stage": stage}
    _as_deepspeed_reads(out, as_written)
    if "bf16" in out:  # the trainer sets it (optim.BF16_KEYS); false is refused
        out["bf16"]["immediate_grad_update"] = True
    if (kind := torch_scheduler(out)) and isinstance(out["scheduler"].get("params", {}), dict):
        defaults = {k: p.default for k, p in inspect.signature(getattr(torch.optim.lr_scheduler, kind)).parameters.items()
                    if p.default is not inspect.Parameter.empty and k != "verbose"}
        out["scheduler"] = {**out["scheduler"], "params": defaults | out["scheduler"].get("params", {})}
    return out


UNREAD = "\0unread"  # effective()'s list of the DeepSpeed sections it could not read


def _as_deepspeed_reads(out: dict, as_written: frozenset) -> None:
    """The fp16, bf16 and zero_optimization sections of `out` replaced, in place, by what DeepSpeed's config models
    read of them: every default filled in, aliases and number spellings made one (`5e8` is 500000000,
    `stage3_prefetch_bucket_size` is `prefetch_bucket_size`, a deprecated key is the key that replaced it), an offload
    to device "none" none, the keys compat.DROPPED names (ignored) left out. A section in `as_written`, or one this
    DeepSpeed cannot read (saved by another version), stays as written; the latter are listed under UNREAD."""
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfigError
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    # the ZeRO keys DeepSpeed removed (MiCS, LoCo-Zero++: ZeRO-3 features, which a pipeline cannot use), that an older
    # run's config may hold: they did nothing, and this DeepSpeed refuses them in a config
    removed = {("zero_optimization", k) for k in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})}
    unread = []
    for key, read in (("fp16", get_float16_config), ("bf16", get_bfloat16_config), ("zero_optimization", get_zero_config)):
        if not isinstance(out.get(key), dict):
            continue
        out[key] = body = {k: v for k, v in out[key].items() if (key, k) not in DROPPED and (key, k) not in removed}
        if key in as_written:
            continue
        try:
            model = read({key: body})
        except (DeepSpeedConfigError, ValueError, TypeError, AssertionError):  # pydantic's ValidationError: ValueError
            unread.append(key)
            continue
        deprecated = {name for name, f in type(model).model_fields.items()  # moved to their new keys when read
                      if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("deprecated")}
        out[key] = {k: v for k, v in model.model_dump(mode="json").items() if k not in deprecated}
        for offload in ("offload_optimizer", "offload_param"):
            if isinstance(out[key].get(offload), dict) and out[key][offload].get("device") in ("none", None):
                out[key][offload] = None  # DeepSpeed's "no offload"
    if unread:
        out[UNREAD] = unread


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config as written: absent, false or {} is 0; true (DeepSpeed's older form) 1."""
    zero = ds.get("zero_optimization")
    return 1 if zero is True else zero.get("stage", 0) if isinstance(zero, dict) else 0


def torch_scheduler(raw: dict) -> str | None:
    """The type of a DeepSpeed `scheduler` section that DeepSpeed builds from torch.optim.lr_scheduler (a name it
    has no scheduler of its own for, as engine._scheduler_from_config), else None."""
    kind = raw["scheduler"].get("type") if isinstance(raw.get("scheduler"), dict) else None
    if not isinstance(kind, str) or not isinstance(getattr(torch.optim.lr_scheduler, kind, None), type):
        return None
    from deepspeed.runtime import lr_schedules

    return None if hasattr(lr_schedules, kind) else kind


def config_changes(saved: dict, new: dict, lora_run: bool = False) -> list[Change]:
    """Every key whose effective value differs between the saved and the new raw config, classified; a section set
    to null or from null is one change of its key (`side_by_side`). A LoRA run's (`lora_run`) lora.target_modules
    are left to resume_problem, which compares the names they resolve to ("all-linear" is the model family's)."""
    raw_saved, raw_new = saved, new
    saved, new = effective(raw_saved), effective(raw_new)
    if unread := frozenset(saved.pop(UNREAD, [])) | frozenset(new.pop(UNREAD, [])):  # alike on both sides
        saved, new = effective(raw_saved, unread), effective(raw_new, unread)
    for key in PRECISION:  # on one side only: "enabled" says it (the section's other keys do nothing on the other)
        if (key in saved) != (key in new):
            (saved if key in saved else new)[key] = {"enabled": True}
    if ("zero_optimization" in saved) != ("zero_optimization" in new):  # ZeRO on one side: its stage says it
        side = saved if "zero_optimization" in saved else new
        side["zero_optimization"] = {"stage": side["zero_optimization"].get("stage")}
    # torch's scheduler state_dict holds its constructor's params and base lrs, and DeepSpeed loads it over the
    # scheduler the config built: changed ones would not take effect (another kind of scheduler starts afresh)
    torch_kind = torch_scheduler(new) if schedule_kind(saved) == schedule_kind(new) else None
    out = []
    for key, old, cur in side_by_side(saved, new):
        if key.endswith(".enabled") and old in (_MISSING, False) and cur in (_MISSING, False):
            continue  # an absent section, or one without "enabled", is off
        if old == cur or key.split(".")[0] in IGNORED or (key in UNORDERED and _same_set(old, cur)):
            continue
        if key == "optimizer.type" and isinstance(old, str) and isinstance(cur, str) and old.lower() == cur.lower():
            continue  # DeepSpeed matches its names case-insensitively: the same optimizer
        if key == "lora.target_modules" and lora_run:
            continue  # "all-linear" is the model family's names: resume_problem compares the resolved ones (as sets)
        kind, note = rule_of_value(key, old, cur, lora_run)
        if torch_kind and (key.startswith("scheduler.") or key == "optimizer.params.lr"):
            kind, note = FIXED, (f"torch's {torch_kind} restores its parameters and lrs from the checkpoint: a new value "
                                 "would not take effect")
        out.append(Change(key, old, cur, kind, note))
    return out


def same_global_batch(changes: list[Change], same: bool) -> list[Change]:
    """With the checkpoint's global batch (`same`), a change of the batch keys only splits it otherwise (over
    micro-batches, accumulation and data-parallel replicas): the data order is the same, so it is applied."""
    return [replace(c, kind=APPLIED, note="the global batch is the checkpoint's: the same data order")
            if same and c.key in BATCH_KEYS else c for c in changes]


def refusals(changes: list[Change], allow_data_change: bool, compares_evals: bool = False,
             fingerprinted: bool = True) -> list[Change]:
    """The changes a resume refuses before any data is read. SAMPLES changes wait for the comparison of the data
    fingerprints when the checkpoint has one (`fingerprinted`). `compares_evals` (keep_best or
    early_stopping_patience set): the eval data may not change either (each eval loss is compared with the
    earlier ones)."""
    data = (DATA,) if fingerprinted else (DATA, SAMPLES)
    out = [c for c in changes if c.kind == FIXED or (c.kind in data and not allow_data_change)]
    if compares_evals:
        out += [replace(c, kind=FIXED, note="keep_best / early_stopping_patience compare every eval loss with the "
                                            "earlier ones, and losses on other eval data do not compare")
                for c in changes if c.key.split(".")[0] in ("eval_data_path", "eval_split_ratio")]
    return out


def schedule_kind(raw: dict) -> str:
    """The kind of LR scheduler a (raw) config builds: the project's `lr_schedule`, DeepSpeed's `scheduler` of a
    type, or none. A checkpoint's scheduler state loads only into one of the same kind."""
    if raw.get("lr_schedule") is not None:
        return "lr_schedule"
    ds = raw.get("scheduler")
    return f"scheduler {ds.get('type')}" if isinstance(ds, dict) else "none"


def start_schedule_at(sched, step: int) -> None:
    """Put a scheduler built fresh where it would be after `step` updates (the engine steps it once per update),
    with the optimizer's lr its value there: LambdaLR counts from 0 (its construction applies step 0; the project's
    `_ScheduleLR` sets the lr when loaded), DeepSpeed's schedulers from -1 (`step(n)` sets it); torch's others are
    stepped `step` times (their chained forms compute each lr from the previous one), so the optimizer's groups
    must hold the values it was built with."""
    if sched is None:
        return
    if hasattr(sched, "lr_lambdas"):
        sched.load_state_dict({**sched.state_dict(), "last_epoch": step})
    elif hasattr(sched, "last_batch_iteration"):
        sched.step(step - 1)
    elif isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no update happens here
            warnings.simplefilter("ignore")
            for _ in range(step):
                sched.step()


def model_config(model_path: str | Path) -> dict | None:
    """model_path's config.json without MODEL_CONFIG_IGNORED: what builds the model's computation; None if
    unreadable."""
    try:
        body = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in body.items() if k not in MODEL_CONFIG_IGNORED} if isinstance(body, dict) else None


def _as_built(config: dict) -> dict:
    """`config` as the installed transformers builds it (defaults filled in, one spelling of the rope settings), less
    MODEL_CONFIG_IGNORED; as written where transformers cannot read it."""
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - transformers raises many kinds for a config it cannot read
        return config
    return {k: v for k, v in built.to_dict().items() if k not in MODEL_CONFIG_IGNORED}


def model_config_problem(ckpt: Path, model_path: str) -> str | None:
    """Why a full checkpoint cannot resume with model_path's config.json (it differs from the MODEL_CONFIG_FILE the
    checkpoint recorded: the weights would run in another model), naming the keys; None when equal or unrecorded."""
    try:
        saved = json.loads((ckpt / MODEL_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None  # written before the record existed
    now = model_config(model_path)
    if not isinstance(saved, dict) or now is None or saved == now:
        return None
    saved, now = _as_built(saved), _as_built(now)
    if saved == now:  # written differently (a default left out, another transformers' rope spelling): the same model
        return None
    # a section set to or from null is one key, the section whole (side_by_side, as config_changes says it)
    diff = [(k, old, new) for k, old, new in side_by_side(saved, now) if old != new] or [
        (k, saved.get(k, _MISSING), now.get(k, _MISSING)) for k in sorted(set(saved) | set(now))
        if saved.get(k, _MISSING) != now.get(k, _MISSING)]  # (an empty section against none: side_by_side's alike)
    keys = [k for k, _, _ in diff]
    said = ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new in diff[:3])
    more = f" (and {len(keys) - 3} more: {', '.join(keys[3:])})" if len(keys) > 3 else ""
    return (f"model_path {model_path}: its config.json differs from the model config the checkpoint {ckpt} was "
            f"trained with ({MODEL_CONFIG_FILE}): {said}{more}; the checkpoint's weights would run in another model: "
            "restore that config.json (a moved model_path with the same config.json resumes)")


def read_run_config(tag_dir: Path) -> dict | None:
    f = tag_dir / RUN_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tag_problem(tag_dir: Path) -> str | None:
    """Why a checkpoint tag cannot be resumed (missing or damaged files), or None."""
    try:
        state = json.loads((tag_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is damaged ({type(e).__name__})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is damaged (not a JSON object)"
    manifest = tag_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return f"{MANIFEST_FILE} is damaged"
        for name, size in sizes.items():
            f = tag_dir / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def earlier_tags(save: Path, tag: str) -> list[str]:
    """Tag directories older than `tag` (every one for a `tag` that is none, e.g. ""), newest first."""
    m = TAG.match(tag)
    limit = int(m.group(1)) if m else None
    return [name for name in reversed(run_tags(save)) if limit is None or int(TAG.match(name).group(1)) < limit]


def unnamed_tag(save: Path) -> str | None:
    """When there is no `latest` (the run was killed after its first checkpoint's rename, before `latest` named it;
    or it was deleted): the complete tag of the highest step (a manifest, written before the rename, and every file
    as it lists), or None. With a `latest`, its choice stands (a later tag it does not name is resumed from the
    earlier one, bit-exactly; mtimes cannot tell that from a `latest` pointed back by hand)."""
    if (save / "latest").is_file() or not save.is_dir():
        return None
    return next((t for t in earlier_tags(save, "")
                 if (save / t / MANIFEST_FILE).is_file() and tag_problem(save / t) is None), None)


def resume_tag(save: Path) -> tuple[str | None, list[str]]:
    """The tag to resume from and lines to print: `unnamed_tag` when there is one, else the one `latest` names, or,
    when that one is damaged, the newest intact earlier tag. (None, [...]) when `latest` names nothing usable and no
    earlier tag is intact; (None, []) when there is no `latest` and no complete tag."""
    latest = save / "latest"
    if unnamed := unnamed_tag(save):
        return unnamed, [f"resuming from {save / unnamed}, the newest complete checkpoint: {latest} is missing "
                         "(deleted, or the run was stopped before it named its first checkpoint)"]
    if not latest.is_file():
        return None, []
    tag = latest_tag(save)
    problem = "it does not exist" if not (save / tag).is_dir() else tag_problem(save / tag)
    if problem is None:
        return tag, []
    notes = [f"checkpoint {save / tag} cannot be resumed: {problem}"]
    for older in earlier_tags(save, tag):
        if tag_problem(save / older) is None:
            notes.append(f"resuming from the previous intact checkpoint {save / older} instead ({save / tag} is left "
                         "in place; delete it once you no longer need it)")
            return older, notes
    return None, notes


def name_resumed(ckpts: Checkpoints, state: RunState) -> str | None:
    """Rank 0, after resuming `state` with no `latest` (an `unnamed_tag`): name the resumed tag in `latest`, then
    write `best` and rotate as its save would have (keep_last, keep_best by the evals it holds). Returns the line to
    print, or None when there is a `latest`."""
    latest, tag = ckpts.root / "latest", tag_of(state.step)
    if latest.is_file() or not (ckpts.root / tag).is_dir():
        return None
    atomic_write_text(latest, tag)
    ckpts._after_save(state)
    return f"{latest} now names {tag}, the checkpoint resumed"


def resumes(cfg: TrainConfig) -> bool:
    """Whether the run resumes from save_path ("resume" not false, and a `latest` or a complete checkpoint there; one
    that cannot be resumed is `resume_problem`'s) rather than starting fresh: what it starts from then comes from the
    checkpoint (e.g. the adapters, not lora.adapter_path)."""
    save = Path(cfg.save_path)
    return cfg.resume is not False and ((save / "latest").is_file() or resume_tag(save)[0] is not None)


def weights_from_checkpoint(cfg: TrainConfig) -> bool:
    """A full fine-tune's resume (`resumes`): every weight is the checkpoint's (loaded strictly), so model_path's
    layer files are neither needed nor read (a LoRA or QLoRA run's frozen base still comes from model_path)."""
    return cfg.lora is None and resumes(cfg)


def resume_problem(cfg: TrainConfig, lora: LoraSettings | None) -> str | None:
    """The checkpoint to resume (resume_tag: the one `latest` names or the newest intact earlier one; with no
    `latest`, the newest complete one) can be resumed exactly, is of the configured kind (full / LoRA), and the
    config's changes since it are all allowed: None, else why not (training.config.load_config refuses it).
    `lora`: the config's parsed adapters."""
    save = Path(cfg.save_path)
    if not resumes(cfg):
        return None
    tag, notes = resume_tag(save)  # with no `latest`, the newest complete checkpoint if there is one
    fresh = "or start a new run with \"resume\": false and \"overwrite_save_path\": true"
    if tag is None:
        named = latest_tag(save)
        if not (save / named).is_dir():
            return (f"{save / 'latest'} names {named!r}, which does not exist; point it at a checkpoint "
                    f"directory {fresh}")
        if not (save / named / STATE_FILE).is_file():
            return (f"{save / named} has no {STATE_FILE} (written by an older version?): it cannot be "
                    f"resumed exactly; export it with pp_to_hg and train from that, {fresh}")
        return f"{notes[0]}, and no earlier checkpoint is intact; {fresh}"
    ckpt = save / tag
    saved = read_lora_info(ckpt)
    if (saved is None) != (cfg.lora is None):
        kind = "a LoRA checkpoint (adapters only)" if saved else "a full checkpoint"
        return (f"{ckpt} is {kind} but the config {'has no' if saved else 'has a'} 'lora' section; "
                f"use the same kind of run to resume it, {fresh}")
    if saved is not None:
        quant = saved_quantization(cfg.quantization)
        for key, value in (("r", lora.r), ("alpha", lora.alpha), ("target_modules", list(lora.target_modules)),
                           ("modules_to_save", list(lora.modules_to_save)), ("quantization", quant)):
            was = saved.get(key, [] if key != "quantization" else None)
            if was != value and not (f"lora.{key}" in UNORDERED and _same_set(was, value)):
                name = "'quantization'" if key == "quantization" else f"lora.{key}"
                return (f"{name} is {json.dumps(value)} but the checkpoint {ckpt} was trained with "
                        f"{json.dumps(saved.get(key))}; resume with the same adapters, {fresh}")
        if saved.get("base_fingerprint") and base_fingerprint(cfg.model_path) != saved["base_fingerprint"]:
            return (f"the model in model_path {cfg.model_path} is not the base the checkpoint {ckpt} "
                    "was trained on (its config.json or weights changed since: lora_config.json's "
                    f"base_fingerprint differs); a LoRA run resumes on its own base: restore it, {fresh}")
    if saved is None and (problem := model_config_problem(ckpt, cfg.model_path)):
        return f"{problem}, {fresh}"
    old = read_run_config(ckpt)
    if old is None:
        return None
    if saved is not None and saved.get("base_fingerprint") and "model_path" in old:  # the base proven the same above:
        old = {**old, "model_path": cfg.raw.get("model_path")}  # moved, renamed or spelt another way, it resumes
    try:  # a checkpoint with the fingerprint of its training rows: a data key's change is checked against it later
        state = json.loads((ckpt / STATE_FILE).read_text())
        fingerprinted, evaluated = state.get("data_fingerprint") is not None, bool(state.get("evals"))
        # the eval rows' fingerprint: their change (not the path's) is refused once the data are read
        evaluated = evaluated and saved_eval_fingerprint(state) is None
        saved_batch = state.get("global_batch")
    except (OSError, ValueError, AttributeError):
        fingerprinted, evaluated, saved_batch = False, True, None
    batch = cfg.ds_config.get("train_batch_size")  # micro x accumulation x replicas (derived when the world is known)
    changes = same_global_batch(config_changes(old, cfg.raw, lora_run=cfg.lora is not None),
                                batch is not None and saved_batch == batch)
    refused = refusals(changes, cfg.allow_data_change_on_resume,
                       compares_evals=evaluated and bool(cfg.keep_best or cfg.early_stopping_patience),
                       fingerprinted=fingerprinted)
    if refused:
        c = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(r.key for r in refused[1:])})" if len(refused) > 1 else ""
        how = ("set \"allow_data_change_on_resume\": true to continue anyway (the data order is then not sample-exact), "
               "restore the old value" if c.kind in ("data", "samples") else "restore the old value")
        return (f"'{c.key}' changed since the checkpoint {ckpt / RUN_CONFIG_FILE} "
                f"({c.values()}): {c.note}{more}; "
                f"{how}, {fresh}")
    ds = cfg.ds_config  # with the world known, derive_batch has filled in every batch key
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    if None not in (batch, saved_batch, micro, accum) and batch != saved_batch and not cfg.allow_data_change_on_resume:
        # the batch keys as they were, another number of data-parallel replicas (model_topo, or the process count)
        return (f"cannot resume {ckpt} exactly: the global batch changed ({saved_batch} -> {batch}: {micro} per "
                f"micro-batch x {accum} accumulation steps x {batch // (micro * accum)} data-parallel replicas), so "
                "samples would be repeated or skipped; keep the global batch (e.g. scale gradient_accumulation_steps "
                "inversely to the data-parallel replicas), set \"allow_data_change_on_resume\": true to continue "
                f"anyway (the data order is then not sample-exact), {fresh}")
    return None
