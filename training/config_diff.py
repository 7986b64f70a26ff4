"""What changed in a run's config since its checkpoint, and what a resume does with each change.

The config in force is compared with the saved one key by key (`config_changes`, on the `effective` settings: spellings
DeepSpeed treats alike are equal). Each change is applied from the resume step on, or refused with the reason
(`RESUME_RULES`; the README lists them). Changes that break the exact data order are refused unless
"allow_data_change_on_resume" is true. training/resume.py decides which checkpoint a run resumes and calls these.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import MISSING, dataclass, replace
from pathlib import Path

import torch

from models.lora import with_defaults as lora_defaults
from models.quant import DEFAULTS as QUANT_DEFAULTS
from training.batches import DROP_LAST
from training.compat import BATCH_KEYS, DROPPED, map_gdgpt_keys

PRECISION = ("fp16", "bf16")

APPLIED, SAMPLES, DATA, FIXED = "applied", "samples", "data", "fixed"
FP16_SCALER = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
               "min_loss_scale")  # DeepSpeed's fp16 keys (FP16_<KEY>_DEFAULT in deepspeed.runtime.constants)
ZERO_COMMUNICATION = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                      "reduce_scatter", "allgather_partitions", "use_multi_rank_bucket_allreduce")  # ZeRO-1's buckets
LENGTH = ("the run is as long as the new value says (longer: a finished run continues; at or below the "
          "checkpoint's step: it ends there)")
# (key or dotted prefix, kind, what happens). The first match wins; keys not listed are applied.
RESUME_RULES: list[tuple[str, str, str]] = [
    ("max_steps", APPLIED, LENGTH),
    ("n_epoches", APPLIED, LENGTH.replace("says", "says, unless max_steps is set (it overrides n_epoches)")),
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
        return f"{show(self.old)} -> {show(self.new)}"


UNSET = object()


def show(v: object) -> str:
    return "(unset)" if v is UNSET else json.dumps(v)


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
    """(dotted key, old value, new value) of two configs, UNSET where a side lacks the key: a section (a dict)
    on both sides, or on one side with the key absent on the other, is compared key by key (an empty one is as
    absent); a section against a value (e.g. null) is one pair of the key, the section whole (not one pair per key of
    the section with the value under a key that the section's keys collide with)."""
    out = []
    for k in sorted(set(old) | set(new)):
        o, n = old.get(k, UNSET), new.get(k, UNSET)
        if (isinstance(o, dict) or o is UNSET) and (isinstance(n, dict) or n is UNSET):
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


def same_set(a: object, b: object) -> bool:
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
        if key.endswith(".enabled") and old in (UNSET, False) and cur in (UNSET, False):
            continue  # an absent section, or one without "enabled", is off
        if old == cur or key.split(".")[0] in IGNORED or (key in UNORDERED and same_set(old, cur)):
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
