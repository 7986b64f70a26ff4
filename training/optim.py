"""Optimization pieces built from the config, independent of the trainer.

- `param_groups`: trainable parameters split into weight-decay / no-decay groups (by shape, or by gdGPT's
  `optimizer.no_wd_kws` name patterns: `no_decay_patterns`).
- `lr_schedule`: the project's schedule (cosine | linear | constant, warmup, floor) as a `LambdaLR` that is
  handed to `deepspeed.initialize(lr_scheduler=...)`; `fill_deepspeed_scheduler` completes DeepSpeed's own
  `scheduler` section instead.
- Lion (lion-pytorch) as a client optimizer: `build_lion`, plus `lion_reference_update` for tests.
- `build_optimizer`: all of the above for a TrainConfig, in the shape `deepspeed.initialize` takes.

Checked against DeepSpeed 0.19.8 (deepspeed/runtime/engine.py):
- Param groups with extra keys ("name") reach the optimizer unchanged: `_configure_basic_optimizer` passes
  `model_parameters` straight to the optimizer class; DeepSpeed reads `group["name"]` only for MoE groups
  (`moe=True`), and its own MoE/Muon grouping uses "name" the same way.
- A client scheduler is stepped once per applied update, right after `optimizer.step()`, and not on a skipped
  (fp16 overflow) step (`_take_model_step`); `engine.get_lr()` reads `optimizer.param_groups[i]["lr"]`; its
  `state_dict` is saved in every checkpoint and loaded by `load_checkpoint` (unless load_lr_scheduler_states=False).
  `LambdaLR` applies factor(0) when built, so the lr of update k is base_lr * factor(k) (k counts applied
  updates). Its load_state_dict does not touch the optimizer's lr, which only the optimizer state restores:
  with load_optimizer_states=False the first resumed update would use factor(0); `_ScheduleLR` fixes that.
- A client optimizer must be a `torch.optim.Optimizer`; with ZeRO (any stage) one that is not in DeepSpeed's
  list (torch Adam/AdamW/Adagrad, FusedAdam, FusedLion, CPU Adam/Adagrad/Lion) needs
  `"zero_allow_untested_optimizer": true` (`_do_optimizer_sanity_check`), so lion-pytorch's Lion does; under
  `offload_optimizer` a client optimizer also needs `"zero_force_ds_cpu_optimizer": false`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from launch.cuda_only import triton_problem
from models.pipeline import unknown_key_problem
from training.resume import zero_stage

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# parameter groups


def no_decay_patterns(value: object) -> list[re.Pattern] | None:
    """gdGPT's `optimizer.no_wd_kws`: regular expressions, searched in parameters' HF names (`re.search`), whose
    parameters get no weight decay. None when absent; ValueError with one line for a bad value."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"optimizer.no_wd_kws must be a list of regular expressions (strings), got {json.dumps(value)}")
    out = []
    for v in value:
        try:
            out.append(re.compile(v))
        except re.error as e:
            raise ValueError(f"optimizer.no_wd_kws: {v!r} is not a regular expression ({e})") from None
    return out


def hf_param_name(family, config) -> Callable[[str], str]:
    """A pipeline parameter's name ("3.input_layernorm.weight"; "layers.3...." in a SequentialModel; a tied module's
    "tied_modules.embed.weight", by the first layer that uses it) -> its HF name ("model.layers.2.input_layernorm.weight")
    by the family's key table; a LoRA adapter's as its module's ("model.layers.2.self_attn.q_proj.lora_A.default.weight").
    Names it has no entry for are kept."""
    n = family.num_blocks(config)
    tied: dict[str, int] = {}
    for idx, spec in enumerate(family.layer_specs(config)):
        if (key := getattr(spec, "key", None)) is not None:
            tied.setdefault(key, idx)

    def name_of(name: str) -> str:
        if name.startswith("tied_modules."):
            key, _, local = name.removeprefix("tied_modules.").partition(".")
            head = str(tied.get(key, ""))
        else:
            head, _, local = name.removeprefix("layers.").partition(".")
        base, lora, adapter = local.partition(".lora_")  # peft's names under the adapted module
        try:
            hf = family.key_map.to_hf(int(head), f"{base}.weight" if lora else local, n)
        except (ValueError, KeyError):
            return name
        return f"{hf.removesuffix('.weight')}{lora}{adapter}" if lora else hf

    return name_of


def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool = False,
                 no_decay: list[re.Pattern] | None = None, name_of: Callable[[str], str] = str) -> list[dict]:
    """Trainable parameters in a "decay" group (weight_decay) and a "no_decay" group (weight decay 0): biases and
    norm weights (ndim < 2) unless `decay_norm_and_bias`, or, given `no_decay` patterns (gdGPT's no_wd_kws), the
    parameters whose name (`name_of` it, e.g. `hf_param_name`) one of them matches (`re.search`; [] decays every
    parameter). Empty groups are left out; a parameter shared by several modules appears once
    (`named_parameters()` deduplicates by identity)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay is not None:
            (exempt if any(r.search(name_of(name)) for r in no_decay) else decay).append(p)
        else:
            (decay if decay_norm_and_bias or p.ndim >= 2 else exempt).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------------
# the project's lr schedule

# DeepSpeed's bf16 sections. With bf16 the trainer sets "immediate_grad_update": DeepSpeed's BF16_Optimizer clears
# every low-precision gradient in a backward hook on the stage's output (its backward_prologue), and the last stage
# computes the head inside the loss (models/pipeline.py, head_in_loss), after that output: the head's gradient,
# accumulated before the hook runs, was cleared each micro-batch (an untied head never trained; a tied one on 2+
# stages kept the embedding's share only). Moved to fp32 as it is computed, it is kept.
BF16_KEYS = ("bf16", "bfloat16")
SCHEDULE_TYPES = ("cosine", "linear", "constant")
SCHEDULE_KEYS = ("type", "warmup_steps", "warmup_ratio", "min_lr_ratio")


@dataclass(frozen=True)
class LrSchedule:
    """`lr_schedule` config section. Convention: HF transformers' `get_{cosine,linear,constant}_schedule_with_warmup`
    lr_lambda, i.e. factor(step) = step / warmup during warmup (0 for the first update, as in HF Trainer), then the
    decay from 1 to 0 over the remaining steps, lifted to a floor: min_lr_ratio + (1 - min_lr_ratio) * decay
    (HF's `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)` for cosine). Unlike HF, steps past
    total_steps stay at the floor (HF's cosine would rise again)."""

    type: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float | None = None  # exclusive with warmup_steps; see warmup()
    min_lr_ratio: float = 0.0

    def warmup(self, total_steps: int) -> int:
        """Warmup length in optimizer steps: warmup_steps, or ceil(total_steps * warmup_ratio) as HF Trainer, but
        without float noise (30 x 0.1 = 3.0000000000000004 gives 3 steps here, 4 in HF)."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(round(total_steps * self.warmup_ratio, 9))

    def factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the base lr for the update with 0-based index `step`."""
        warmup = self.warmup(total_steps)
        if step < warmup:
            return step / max(1, warmup)
        if self.type == "constant":
            return 1.0
        if self.type == "linear":  # written as HF writes it so that min_lr_ratio 0 matches bit for bit
            decay = max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        else:
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return decay * (1 - self.min_lr_ratio) + self.min_lr_ratio


def parse_lr_schedule(section: dict) -> LrSchedule:
    """Check the `lr_schedule` section; a ValueError's message is one line naming the key."""
    if not isinstance(section, dict):
        raise ValueError(f"lr_schedule must be an object, got {json.dumps(section)}")
    unknown = [k for k in section if k not in SCHEDULE_KEYS]
    if unknown:
        raise ValueError(f"lr_schedule: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SCHEDULE_KEYS)}")

    def number(key: str, integer: bool = False) -> float:
        v = section[key]
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            raise ValueError(f"lr_schedule.{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
        return v

    kw: dict = {}
    if "type" in section:
        if section["type"] not in SCHEDULE_TYPES:
            raise ValueError(f"lr_schedule.type must be one of {', '.join(SCHEDULE_TYPES)}, got {json.dumps(section['type'])}")
        kw["type"] = section["type"]
    if "warmup_steps" in section and "warmup_ratio" in section:
        raise ValueError("lr_schedule.warmup_steps and lr_schedule.warmup_ratio are exclusive; set one")
    if "warmup_steps" in section:
        if (v := number("warmup_steps", integer=True)) < 0:
            raise ValueError(f"lr_schedule.warmup_steps must be >= 0, got {v}")
        kw["warmup_steps"] = v
    if "warmup_ratio" in section:
        if not 0 <= (v := number("warmup_ratio")) < 1:
            raise ValueError(f"lr_schedule.warmup_ratio must be in [0, 1), got {v}")
        kw["warmup_ratio"] = float(v)
    if "min_lr_ratio" in section:
        if not 0 <= (v := number("min_lr_ratio")) <= 1:
            raise ValueError(f"lr_schedule.min_lr_ratio must be in [0, 1], got {v}")
        kw["min_lr_ratio"] = float(v)
    return LrSchedule(**kw)


class _ScheduleLR(LambdaLR):
    """LambdaLR that also sets the optimizer's lr when its state is loaded, so a resumed run uses the
    scheduled lr even when the optimizer state itself is not restored (load_optimizer_states=False). `loaded_lr`:
    the lrs saved with the state (of the schedule the checkpoint's run had, e.g. over another length)."""

    loaded_lr: list[float] | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.loaded_lr = list(state_dict.get("_last_lr") or []) or None
        for group, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base * fn(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: LrSchedule, total_steps: int) -> LambdaLR:
    """The scheduler to pass as `deepspeed.initialize(lr_scheduler=...)`: the lr of update k is
    group lr * schedule.factor(k, total_steps). Build it before any update (it applies factor(0) at once).
    The lambda is a plain function, so checkpoints hold only step count and base lrs: the curve always
    comes from the config in force (a resumed run may change total_steps)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return _ScheduleLR(optimizer, lambda step: schedule.factor(step, total_steps))


# DeepSpeed's schedulers (deepspeed/runtime/lr_schedules.py) whose constructor requires total_num_steps
_NEEDS_TOTAL = ("WarmupDecayLR", "WarmupCosineLR")


def fill_deepspeed_scheduler(scheduler_section: dict, total_steps: int) -> dict:
    """A copy of DeepSpeed's `scheduler` section with `params.total_num_steps` set to `total_steps` when the
    type needs it (WarmupDecayLR, WarmupCosineLR) and it is absent, and whole-number counts given as floats as ints
    (`_whole_counts`); everything else untouched. ValueError for torch's OneCycleLR shorter than the run (total_steps,
    or epochs x steps_per_epoch): torch raises at its end, on every resume too."""
    out = dict(scheduler_section)
    params = _whole_counts(out.get("type"), out.get("params") or {})
    if "params" in out:
        out["params"] = params
    if out.get("type") in _NEEDS_TOTAL and params.get("total_num_steps") is None:
        out["params"] = {**params, "total_num_steps": total_steps}
    if out.get("type") == "OneCycleLR":
        given = params.get("total_steps")
        if given is None and params.get("epochs") is not None and params.get("steps_per_epoch") is not None:
            given = params["epochs"] * params["steps_per_epoch"]
        if isinstance(given, int) and given < total_steps:
            raise ValueError(f"scheduler.params (OneCycleLR): total_steps {given} is below the run's {total_steps} "
                             "steps: torch would stop the run with an error at its end (and every resume of it, which "
                             f"cannot change a torch scheduler's params); train at most {given} steps, or start the run "
                             f"with total_steps >= {total_steps}")
    return out


def deepspeed_schedule_warning(ds: dict, total_steps: int) -> str | None:
    """Why DeepSpeed's WarmupDecayLR / WarmupCosineLR will not cover a run of `total_steps` updates: an explicit
    total_num_steps below it leaves the updates after it at the schedule's end lr; else None."""
    section = ds.get("scheduler")
    params = (section.get("params") or {}) if isinstance(section, dict) else {}
    n = params.get("total_num_steps")
    if section is None or section.get("type") not in _NEEDS_TOTAL or not _integral(n) or n >= total_steps:
        return None
    n = int(n)
    end = (f"warmup_min_lr ({params.get('warmup_min_lr') or 0:g})" if section["type"] == "WarmupDecayLR" else
           "its floor (cos_min_ratio x lr)")
    return (f"scheduler.params.total_num_steps {n} ({section['type']}) is below the run's {total_steps} steps: the "
            f"updates after step {n} train at lr {end}; leave total_num_steps out (it is filled in)")


# ----------------------------------------------------------------------------------------------
# Lion

LION_KEYS = ("lr", "betas", "weight_decay", "use_triton")


def build_lion(params_or_groups: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
               weight_decay: float = 0.0, use_triton: bool = False, device_type: str | None = None,
               **unknown: object) -> torch.optim.Optimizer:
    """lion-pytorch's Lion from the seed's `optimizer.params` ({lr, betas, weight_decay, use_triton}); pass the
    section as keyword arguments. Weight decay is applied as p *= 1 - lr * wd (lr of the group, scheduled).
    use_triton falls back to the torch update, with a warning, where the kernel cannot run (no CUDA, no triton, params off CUDA;
    lion-pytorch would otherwise exit the process when triton is missing). `device_type`: where the params will
    train (the accelerator's; they may still be on the CPU); None: where they are."""
    from lion_pytorch import Lion

    if unknown:
        raise ValueError(f"optimizer.params: unknown key(s) {', '.join(map(repr, unknown))} for Lion; "
                         f"allowed: {', '.join(LION_KEYS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optimizer.params.lr must be a number > 0, got {lr!r}")
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"optimizer.params.weight_decay must be a number >= 0, got {weight_decay!r}")
    params_or_groups = list(params_or_groups)
    if use_triton and (why := triton_problem(params_or_groups, device_type)):
        msg = f"Lion: use_triton was asked for but the triton kernel cannot run here ({why}); using the torch update"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logger.warning(msg)
        use_triton = False
    return Lion(params_or_groups, lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                weight_decay=float(weight_decay), use_triton=bool(use_triton))


@torch.no_grad()
def lion_reference_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float,
                          betas: tuple[float, float], weight_decay: float) -> None:
    """One textbook Lion step (Chen et al. 2023, Alg. 2, decoupled decay) in place on param and exp_avg."""
    beta1, beta2 = betas
    update = torch.sign(beta1 * exp_avg + (1 - beta1) * grad)
    param.copy_(param * (1 - lr * weight_decay) - lr * update)
    exp_avg.copy_(beta2 * exp_avg + (1 - beta2) * grad)


# ----------------------------------------------------------------------------------------------
# glue for the trainer


def schedule_warning(cfg, total_steps: int) -> str | None:
    """Why `lr_schedule` will not do what it says over a run of `total_steps` updates (a warmup as long as the run
    never reaches the peak lr, nor decays to the floor), else None."""
    schedule = parse_lr_schedule(cfg.lr_schedule) if cfg.lr_schedule is not None else None
    if schedule is None:
        return deepspeed_schedule_warning(cfg.ds_config, total_steps)
    if (warmup := schedule.warmup(total_steps)) < total_steps or warmup == 0:
        return None
    peak = schedule.factor(total_steps - 1, total_steps)
    return (f"lr_schedule's warmup ({warmup} steps) is not shorter than the run ({total_steps} steps): the lr never "
            f"reaches its peak (the last update uses {peak:.3g} x lr){' nor decays' if schedule.type != 'constant' else ''}"
            "; shorten the warmup or train longer")


GroupSizes = dict[str, tuple[int, float]]  # parameter group name -> (elements, weight decay)


def steps_with_zero_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed steps the config `ds` with its ZeRO optimizer (DeepSpeedZeroOptimizer), as its engine picks
    (`_do_optimizer_sanity_check`): ZeRO on, except bf16 weights with fp32 gradient accumulation on ZeRO-1 without
    CPU offload, which its BF16_Optimizer steps."""
    from deepspeed.runtime.config import DtypeEnum

    if zero_stage(ds) == 0:
        return False
    accum = ds["data_types"].get("grad_accum_dtype") if isinstance(ds.get("data_types"), dict) else None
    fp32_accum = accum is not None and DtypeEnum(accum).value == torch.float32
    return not (half_precisions(ds) == ["bf16"] and fp32_accum and zero_stage(ds) == 1 and offload_device(ds) != "cpu")


def half_precisions(ds: dict) -> list[str]:
    """The DeepSpeed sections among fp16 / bf16 that are enabled ("bfloat16", DeepSpeed's other name, as "bf16")."""
    on = [k for k in ("fp16", *BF16_KEYS) if isinstance(ds.get(k), dict) and ds[k].get("enabled", False)]
    return list(dict.fromkeys("bf16" if k == "bfloat16" else k for k in on))


def offload_device(ds: dict) -> str:
    """zero_optimization.offload_optimizer.device of a DeepSpeed config, "none" without one."""
    zero = ds.get("zero_optimization")
    return ((zero.get("offload_optimizer") or {}).get("device") or "none") if isinstance(zero, dict) else "none"


def even_groups(model: torch.nn.Module, groups: list[dict], weight_decay: float) -> list[dict]:
    """Collective. DeepSpeed's ZeRO optimizer (`steps_with_zero_optimizer`) computes the gradient norm with collectives
    per parameter group: a stage with fewer groups than another (an embedding-only stage has no no_decay group) left
    the others waiting at the first step, forever. Such a stage gets the groups it lacks, each with one zero
    placeholder parameter (`PipelineModel.placeholder`); stages with equal counts are left as they are (their
    checkpoints too)."""
    if not torch.distributed.is_initialized():  # one process (a unit test): nothing to even out
        return groups
    counts = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(counts, len(groups))
    have = {g["name"] for g in groups}
    for name, decay in (("decay", weight_decay), ("no_decay", 0.0)):
        if len(groups) < max(counts) and name not in have:
            groups.append({"name": name, "params": [model.placeholder(f"{name}_placeholder")], "weight_decay": decay})
    return sorted(groups, key=lambda g: g["name"] != "decay")


def owned_sizes(groups: list[dict]) -> GroupSizes:
    """Per parameter group (by name), the elements of the parameters this stage owns (`model_parallel`: not a later
    stage's copy of a tied weight; not a LoRA stage's `grad_placeholder`) and its weight decay: summed over the stages
    (`merge_sizes`), each parameter counts once. Read before `deepspeed.initialize`: ZeRO replaces a group's params with
    its flat partition."""
    return {g["name"]: (sum(p.numel() for p in g["params"] if getattr(p, "model_parallel", True)
                            and not getattr(p, "placeholder", False)), g["weight_decay"]) for g in groups}


def merge_sizes(per_stage: list[GroupSizes]) -> GroupSizes:
    """The stages' `owned_sizes` summed by group name (a stage may lack a group: an embedding-only stage has no
    no_decay), decay first."""
    out: GroupSizes = {}
    for sizes in per_stage:
        for name, (n, wd) in sizes.items():
            out[name] = (out.get(name, (0, wd))[0] + n, wd)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "decay"))


def describe_groups(sizes: GroupSizes) -> str:
    """'N decay (wd W) + M no_decay (wd 0)', the groups with parameters."""
    return " + ".join(f"{n:,} {name} (wd {wd:g})" for name, (n, wd) in sizes.items() if n) or "no trainable parameters"


def build_optimizer(model: torch.nn.Module, cfg, total_steps: int
                    ) -> tuple[dict, list[dict], torch.optim.Optimizer | None, Callable | None, str]:
    """What `deepspeed.initialize` needs for a TrainConfig: (ds_config, model_parameters, optimizer, lr_scheduler,
    a one-line description). Groups per `param_groups` (decay = optimizer.params.weight_decay). "Lion" becomes a
    client lion-pytorch optimizer (its section removed; ZeRO gets zero_allow_untested_optimizer unless set);
    other types DeepSpeed builds. `lr_schedule` becomes a scheduler callable (DeepSpeed calls it with its basic
    optimizer, engine.py:1887); DeepSpeed's own `scheduler` gets total_num_steps filled in. Bad values: ConfigError."""
    from training.config import ConfigError

    ds = {"steps_per_print": 10**9, **cfg.ds_config}
    for key in BF16_KEYS:  # each parameter's gradient moved to fp32 as it is computed: see BF16_KEYS
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            ds[key] = {**ds[key], "immediate_grad_update": True}
    section = ds.get("optimizer") if isinstance(ds.get("optimizer"), dict) else {}
    kind, params = str(section.get("type", "")), dict(section.get("params") or {})
    wd = params.get("weight_decay", 0.0)
    optimizer, lr_scheduler = None, None
    try:
        no_decay, name_of = no_decay_patterns(section.get("no_wd_kws")), str
        if no_decay is not None:  # gdGPT's patterns, matched in HF names; the key is ours, not DeepSpeed's
            from models.convert import family_of

            name_of = hf_param_name(*family_of(Path(cfg.model_path)))
            ds["optimizer"] = {k: v for k, v in section.items() if k != "no_wd_kws"}
        groups = param_groups(model, wd, cfg.decay_norm_and_bias, no_decay, name_of)
        if steps_with_zero_optimizer(ds):  # (BF16_Optimizer's groups are left as they were: its checkpoints)
            groups = even_groups(model, groups, wd)
        schedule = parse_lr_schedule(cfg.lr_schedule) if cfg.lr_schedule is not None else None
        if kind.lower() == "lion":
            from deepspeed.accelerator import get_accelerator

            # the model is still on the CPU here (DeepSpeed moves it): the kernel's check is about the accelerator,
            # or the CPU when ZeRO offloads the optimizer (it steps the fp32 copies there)
            offload = offload_device(ds)
            device = "cpu" if offload in ("cpu", "nvme") else get_accelerator().device_name()
            optimizer = build_lion(groups, **params, device_type=device)
            del ds["optimizer"]
            if zero_stage(ds) > 0:
                ds.setdefault("zero_allow_untested_optimizer", True)  # lion-pytorch is not on DeepSpeed's ZeRO list
            if offload != "none":  # DeepSpeed refuses a client optimizer under offload unless told not to force its own
                if ds.get("zero_force_ds_cpu_optimizer") is True:
                    raise ValueError("'zero_force_ds_cpu_optimizer' true with Lion and offload_optimizer: DeepSpeed has "
                                     "no CPU Lion of its own for a client optimizer; leave the key out (lion-pytorch "
                                     "steps the offloaded fp32 weights)")
                ds["zero_force_ds_cpu_optimizer"] = False
    except ValueError as e:
        raise ConfigError(f"{cfg.path}: {e}") from None
    sizes = describe_groups(owned_sizes(groups))
    if kind.lower() == "lion":  # which update steps the weights: lion-pytorch's triton kernel or its torch code
        kind += " with the " + ("triton kernel" if optimizer.update_fn.__module__.endswith("triton") else "torch update")
    note = f"{kind or 'none'} (lr {params.get('lr', 'default')}) on {sizes}"
    if schedule is not None:
        lr_scheduler = lambda opt: build_lr_scheduler(opt, schedule, total_steps)  # noqa: E731
        note += (f"; lr schedule {schedule.type}, warmup {schedule.warmup(total_steps)} of {total_steps} steps"
                 + (f", floor {schedule.min_lr_ratio:g} x lr" if schedule.type != "constant" else ""))
    elif isinstance(ds.get("scheduler"), dict):
        try:
            ds["scheduler"] = fill_deepspeed_scheduler(ds["scheduler"], total_steps)
        except ValueError as e:
            raise ConfigError(f"{cfg.path}: {e}") from None
        note += f"; DeepSpeed scheduler {ds['scheduler'].get('type')}"
    else:
        note += "; constant lr"
    return ds, groups, optimizer, lr_scheduler, note


# ----------------------------------------------------------------------------------------------
# keys of DeepSpeed's optimizer and scheduler sections: a misspelled one is refused, not dropped or a TypeError later

OPTIMIZER_SECTION_KEYS = ("type", "params", "legacy_fusion", "no_wd_kws")  # no_wd_kws: gdGPT's (ours, removed)
# what DeepSpeed's engine pops from an Adam/AdamW section before building the optimizer (_configure_basic_optimizer)
DEEPSPEED_ADAM_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach")


def _init_keys(*classes: type) -> list[str]:
    """The keyword arguments the classes' constructors take, but the parameters / optimizer they are given."""
    keys: dict[str, None] = {}
    for cls in classes:
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in (
                    "self", "params", "model_params", "optimizer"):
                keys[name] = None
    return list(keys)


def optimizer_key_problem(section: dict) -> str | None:
    """A misspelled key of an `optimizer` section or of its `params` (Adam/AdamW: what DeepSpeed's FusedAdam, CPU Adam
    or torch's AdamW take; a torch.optim type: its constructor's), as one line; None if none. DeepSpeed would drop a
    misspelled "params" (training at its default lr) or fail with a TypeError on every rank once the model is built."""
    if problem := unknown_key_problem("optimizer", section, OPTIMIZER_SECTION_KEYS):
        return problem
    kind, params = str(section.get("type", "")), section.get("params") or {}
    if kind.lower() in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        allowed = list(dict.fromkeys([*_init_keys(FusedAdam, DeepSpeedCPUAdam, torch.optim.AdamW, torch.optim.Adam),
                                      *DEEPSPEED_ADAM_KEYS]))  # each once: the keys several of them take
    elif kind.lower() in ("lion", "adagrad", "lamb", "muadam", "muadamw", "musgd", "muon"):
        return None  # Lion: build_lion checks its keys; DeepSpeed's other optimizers: their own checks
    elif isinstance(getattr(torch.optim, kind, None), type):
        allowed = _init_keys(getattr(torch.optim, kind))
    else:
        return None
    return unknown_key_problem(f"optimizer.params ({kind})", params, allowed) if isinstance(params, dict) else None


# scheduler params that are step counts (an integral float, what YAML reads 1e2 as, is passed on as an int:
# DeepSpeed's WarmupLR and torch's OneCycleLR refuse 100.0), and params without a default whose kind the name says
_INT_PARAMS = ("warmup_num_steps", "total_num_steps", "total_steps", "epochs", "steps_per_epoch", "step_size",
               "total_iters", "T_0", "T_mult")
_NUMBER_PARAMS = ("gamma", "T_max")  # (and every "...lr" / "..._ratio")
_INT_LIST_PARAMS = ("milestones",)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integral(v: object) -> bool:
    return _number(v) and float(v).is_integer()


def _param_kind(key: str, default: object) -> str | None:
    """What a scheduler param takes: "int", "number" (or a list of them, per group), "int list", "str", "bool"; None:
    not known (not checked)."""
    if key in _INT_PARAMS or type(default) is int:
        return "int"
    if key in _INT_LIST_PARAMS:
        return "int list"
    if key.endswith(("lr", "_ratio")) or key in _NUMBER_PARAMS or type(default) is float:
        return "number"
    return {str: "str", bool: "bool"}.get(type(default))


def _scheduler_value_problem(kind: str, cls: type, params: dict) -> str | None:
    """A scheduler param of the wrong type, as one line: a count that is not a whole number, a rate or ratio that is
    not a number (or a list of them, per group), milestones that are not whole numbers, a mode that is not a string, a
    switch that is not a bool, HF Trainer's "auto" (which DeepSpeed does not fill); the type is the default's where the
    constructor has one, else the name's. DeepSpeed and torch would raise a traceback on every rank once the model is
    built, or (MultiStepLR's milestones "3,6") train at a constant lr."""
    signature = inspect.signature(cls.__init__).parameters
    for key, value in params.items():
        default = signature[key].default if key in signature else None
        want = _param_kind(key, None if default is inspect.Parameter.empty else default)
        if value is None:
            continue
        where, got = f"scheduler.params.{key} ({kind})", json.dumps(value)
        if value == "auto" and want != "str":
            fill = "leave it out: it is filled in" if key == "total_num_steps" and kind in _NEEDS_TOTAL else "give a value"
            return f"{where} is \"auto\", HF Trainer's placeholder, which DeepSpeed does not fill in: {fill}"
        if want is None and default is inspect.Parameter.empty and isinstance(value, str):  # every required one: numbers
            return f"{where} must be a number, got {got}"
        if want == "int" and not _integral(value):
            return f"{where} must be a whole number, got {got}"
        if want == "int list" and not (isinstance(value, list) and all(_integral(v) for v in value)):
            return f"{where} must be a list of whole numbers (steps), got {got}"
        if want == "number" and not (_number(value) or isinstance(value, list) and value and all(map(_number, value))):
            return f"{where} must be a number (or a list of them, one per parameter group), got {got}"
        if want in ("str", "bool") and not isinstance(value, str if want == "str" else bool):
            return f"{where} must be {'a string' if want == 'str' else 'true or false'}, got {got}"
    return None


def _scheduler_class(kind: object) -> type | None:
    """DeepSpeed's scheduler class named `kind`, else torch.optim.lr_scheduler's (engine._scheduler_from_config)."""
    from deepspeed.runtime import lr_schedules

    if kind in lr_schedules.VALID_LR_SCHEDULES:
        return getattr(lr_schedules, kind)
    cls = getattr(torch.optim.lr_scheduler, str(kind), None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler) else None


def _whole_counts(kind: object, params: dict) -> dict:
    """`params` with the integral floats of its counts and milestones as ints (YAML's 1e2 is 100.0, which DeepSpeed's
    WarmupLR and torch's OneCycleLR refuse)."""
    cls = _scheduler_class(kind)
    if cls is None:
        return params
    signature = inspect.signature(cls.__init__).parameters
    out = dict(params)
    for key, value in params.items():
        default = signature[key].default if key in signature else None
        want = _param_kind(key, None if default is inspect.Parameter.empty else default)
        if want == "int" and _integral(value):
            out[key] = int(value)
        elif want == "int list" and isinstance(value, list) and all(map(_integral, value)):
            out[key] = [int(v) for v in value]
    return out


def scheduler_problem(section: object) -> str | None:
    """A DeepSpeed `scheduler` section of an unknown type or with a key its class does not take, as one line."""
    from deepspeed.runtime import lr_schedules

    if not isinstance(section, dict):
        return f"'scheduler' must be an object with \"type\" and \"params\", got {json.dumps(section)}"
    if problem := unknown_key_problem("scheduler", section, ("type", "params")):
        return problem
    kind = section.get("type")
    torch_kinds = [n for n, c in vars(torch.optim.lr_scheduler).items() if isinstance(c, type) and n[0].isupper()
                   and issubclass(c, torch.optim.lr_scheduler.LRScheduler) and n != "LRScheduler"]
    cls = _scheduler_class(kind) if kind in (*lr_schedules.VALID_LR_SCHEDULES, *torch_kinds) else None
    if cls is None:
        known = [*lr_schedules.VALID_LR_SCHEDULES, *torch_kinds]
        close = difflib.get_close_matches(str(kind), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f" (DeepSpeed's: {', '.join(lr_schedules.VALID_LR_SCHEDULES)})"
        return f"scheduler.type {json.dumps(kind)} is neither a DeepSpeed nor a torch.optim.lr_scheduler scheduler{hint}"
    if kind == "ReduceLROnPlateau":
        return (f"scheduler.type {kind!r} steps on a metric the engine does not pass (DeepSpeed steps the scheduler "
                "once per update with no arguments): use a schedule by step")
    if kind in ("LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler"):
        return (f"scheduler.type {kind!r} takes Python callables or schedulers, which a config cannot hold: use "
                "the project's \"lr_schedule\" or a scheduler whose params are numbers")
    params = section.get("params") or {}
    if not isinstance(params, dict):
        return f"scheduler.params must be an object, got {json.dumps(params)}"
    keys = _init_keys(cls)
    if problem := unknown_key_problem(f"scheduler.params ({kind})", params, keys):
        return problem
    if problem := _scheduler_value_problem(kind, cls, params):
        return problem
    filled = ("total_num_steps",) if kind in _NEEDS_TOTAL else ()  # fill_deepspeed_scheduler fills it in
    given = {k for k, v in params.items() if v is not None}  # a YAML key with no value is null: not given
    signature = inspect.signature(cls.__init__).parameters
    required = [k for k in keys if k not in given and k not in ("last_epoch", *filled)
                and signature[k].default is inspect.Parameter.empty]
    if kind == "OneCycleLR" and "total_steps" not in given and not {"epochs", "steps_per_epoch"} <= given:
        required.append("total_steps")  # or epochs and steps_per_epoch: torch needs one or the other
    verb = "is" if len(required) == 1 else "are"
    return f"scheduler.params ({kind}): {', '.join(map(repr, required))} {verb} required" if required else None
