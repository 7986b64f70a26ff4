"""Learning-rate schedules built from the config, and the checks of DeepSpeed's `scheduler` section.

- `lr_schedule`: the project's schedule (cosine | linear | constant, warmup, floor) as a `LambdaLR` that is handed
  to `deepspeed.initialize(lr_scheduler=...)` (`parse_lr_schedule`, `build_lr_scheduler`).
- DeepSpeed's own `scheduler` section: `fill_deepspeed_scheduler` completes it for the run; `scheduler_problem`
  refuses an unknown type, key or a value of the wrong type at load, as one line.
- `schedule_warning`: a schedule that will not do what it says over the run.

Checked against DeepSpeed 0.19.8 (deepspeed/runtime/engine.py): a client scheduler is stepped once per applied
update, right after `optimizer.step()`, and not on a skipped (fp16 overflow) step (`_take_model_step`); its
`state_dict` is saved in every checkpoint and loaded by `load_checkpoint` (unless load_lr_scheduler_states=False).
`LambdaLR` applies factor(0) when built, so the lr of update k is base_lr * factor(k) (k counts applied updates).
Its load_state_dict does not touch the optimizer's lr, which only the optimizer state restores: with
load_optimizer_states=False the first resumed update would use factor(0); `_ScheduleLR` fixes that.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from models.pipeline import unknown_key_problem

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
        if integer and isinstance(v, float) and v.is_integer():  # YAML's 1e2: a whole count, as the top-level keys
            v = int(v)
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
    """Why DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR will not do what they say over a run of
    `total_steps` updates: a warmup (1000 steps when not given) as long as the run never reaches the peak lr; an
    explicit total_num_steps below it leaves the updates after it at the schedule's end lr; else None."""
    section = ds.get("scheduler")
    params = (section.get("params") or {}) if isinstance(section, dict) else {}
    if section is not None and section.get("type") in ("WarmupLR", *_NEEDS_TOTAL):
        given = params.get("warmup_num_steps")
        warmup = given if given is not None else \
            inspect.signature(_scheduler_class(section["type"]).__init__).parameters["warmup_num_steps"].default
        # update k runs at the schedule's iteration k - 2 (its first two at the start); the warmup (at least 2
        # iterations) reaches the peak at iteration w - 1 (log) or w (linear)
        peak_at = max(2, int(warmup)) + (2 if params.get("warmup_type") == "linear" else 1) if _integral(warmup) else 0
        if peak_at > total_steps:
            return (f"scheduler.params.warmup_num_steps ({section['type']}) is {int(warmup)}"
                    f"{'' if given is not None else ' (DeepSpeed default: not given)'}: the lr reaches its peak at "
                    f"update {peak_at}, past the run's {total_steps} (DeepSpeed's first two updates run at the "
                    "warmup's start); give a shorter warmup_num_steps")
    n = params.get("total_num_steps")
    if section is None or section.get("type") not in _NEEDS_TOTAL or not _integral(n) or n >= total_steps:
        return None
    n = int(n)
    end = (f"warmup_min_lr ({params.get('warmup_min_lr') or 0:g})" if section["type"] == "WarmupDecayLR" else
           "its floor (cos_min_ratio x lr)")
    return (f"scheduler.params.total_num_steps {n} ({section['type']}) is below the run's {total_steps} steps: the "
            f"updates after step {n} train at lr {end}; leave total_num_steps out (it is filled in)")


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


def init_keys(*classes: type) -> list[str]:
    """The keyword arguments the classes' constructors take, but the parameters / optimizer they are given."""
    keys: dict[str, None] = {}
    for cls in classes:
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in (
                    "self", "params", "model_params", "optimizer"):
                keys[name] = None
    return list(keys)


# scheduler params that are step counts (an integral float, what YAML reads 1e2 as, is passed on as an int:
# DeepSpeed's WarmupLR and torch's OneCycleLR refuse 100.0), and params without a default whose kind the name says
_INT_PARAMS = ("warmup_num_steps", "total_num_steps", "total_steps", "epochs", "steps_per_epoch", "step_size",
               "total_iters", "T_0", "T_mult", "cycle_first_step_size", "lr_range_test_step_size")
_MAY_BE_0 = ("total_iters",)  # torch's ConstantLR / LinearLR / PolynomialLR: 0 is no warm-up
_NUMBER_PARAMS = ("gamma", "T_max")  # (and every "...lr" / "..._ratio")
_INT_LIST_PARAMS = ("milestones",)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integral(v: object) -> bool:
    return is_number(v) and float(v).is_integer()


def _param_kind(signature: dict, key: str) -> str | None:
    """What a scheduler param takes, by its default in the constructor's `signature` (inspect's parameters) where it
    has one, else by its name: "int", "number" (or a list of them, per group), "int list", "str", "bool"; None: not
    known (not checked)."""
    default = signature[key].default if key in signature else None
    default = None if default is inspect.Parameter.empty else default
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
        want = _param_kind(signature, key)
        where, got = f"scheduler.params.{key} ({kind})", json.dumps(value)
        least = 0 if key in _MAY_BE_0 else 1  # a step count's least value
        if value is None and key in _INT_PARAMS and key in signature \
                and signature[key].default not in (None, inspect.Parameter.empty):  # passed on: their ValueError
            return f"{where} must be a whole number >= {least}, got null (leave it out for its default)"
        if value is None:
            continue
        if value == "auto" and want != "str":
            fill = "leave it out: it is filled in" if key == "total_num_steps" and kind in _NEEDS_TOTAL else "give a value"
            return f"{where} is \"auto\", HF Trainer's placeholder, which DeepSpeed does not fill in: {fill}"
        required = key in signature and signature[key].default is inspect.Parameter.empty
        if want is None and required and isinstance(value, str):  # every required one: numbers
            return f"{where} must be a number, got {got}"
        if want == "int" and not _integral(value):
            return f"{where} must be a whole number, got {got}"
        if want == "int list" and not (isinstance(value, list) and all(_integral(v) for v in value)):
            return f"{where} must be a list of whole numbers (steps), got {got}"
        if want == "number" and not (is_number(value) or isinstance(value, list) and value and all(map(is_number, value))):
            return f"{where} must be a number (or a list of them, one per parameter group), got {got}"
        if want in ("str", "bool") and not isinstance(value, str if want == "str" else bool):
            return f"{where} must be {'a string' if want == 'str' else 'true or false'}, got {got}"
        if key in _INT_PARAMS and value < least:  # a warmup of 0 steps divides by it
            return f"{where} must be a whole number >= {least}, got {got}"
        if (key.endswith("lr") or key == "eta_min") and any(v < 0 for v in (value if isinstance(value, list) else [value])):
            return f"{where} must be >= 0 (a negative learning rate climbs the loss), got {got}"
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
        want = _param_kind(signature, key)
        if want == "int" and _integral(value):
            out[key] = int(value)
        elif want == "int list" and isinstance(value, list) and all(map(_integral, value)):
            out[key] = [int(v) for v in value]
    return out


def scheduler_lr_problem(ds: dict) -> str | None:
    """DeepSpeed's WarmupLR / WarmupDecayLR warm up to scheduler.params.warmup_max_lr and train at it, never at
    optimizer.params.lr (WarmupLR takes the optimizer's lr only when warmup_max_lr is not given; WarmupDecayLR then
    takes 0.001): a config giving two different lrs trained at the scheduler's while every line named the optimizer's
    (and a resume's change of optimizer.params.lr was said to be applied). One line when they differ, else None."""
    section, optimizer = ds.get("scheduler"), ds.get("optimizer")
    kind = section.get("type") if isinstance(section, dict) else None
    params = (optimizer.get("params") or {}) if isinstance(optimizer, dict) else {}
    lion = isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() == "lion"
    if lion:
        from training.optim import build_lion  # (training.optim imports this module)

        default = inspect.signature(build_lion).parameters["lr"].default
    lr = params.get("lr", default if lion else None)  # (DeepSpeed's own optimizers default to 0.001)
    if kind not in ("WarmupLR", "WarmupDecayLR") or not is_number(lr):
        return None
    sched = section.get("params") or {}
    peak = sched.get("warmup_max_lr")  # null: passed on as None, which takes the optimizer's lr
    if "warmup_max_lr" not in sched and kind == "WarmupDecayLR":
        peak = None if lr == 0.001 else 0.001
    if peak is None or all(is_number(v) and v == lr for v in (peak if isinstance(peak, list) else [peak])):
        return None
    said = json.dumps(peak) if "warmup_max_lr" in sched else "not given: DeepSpeed's default 0.001"
    fix = ("give the lr to train at as optimizer.params.lr and leave warmup_max_lr out" if kind == "WarmupLR" else
           "give the lr to train at as both")
    return (f"scheduler.params.warmup_max_lr ({kind}) is {said}, and optimizer.params.lr is {lr:g}"
            f"{' (Lion default)' if 'lr' not in params else ''}: {kind} trains at warmup_max_lr, never at the "
            f"optimizer's lr; {fix} (a run resumed from a checkpoint trained at warmup_max_lr's)")


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
    keys = init_keys(cls)
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
