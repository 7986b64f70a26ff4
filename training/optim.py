"""Optimization pieces built from the config, independent of the trainer (lr schedules: training/schedule.py).

- `param_groups`: trainable parameters split into weight-decay / no-decay groups (by shape, or by gdGPT's
  `optimizer.no_wd_kws` name patterns: `no_decay_patterns`).
- Lion (lion-pytorch) as a client optimizer: `build_lion`, plus `lion_reference_update` for tests.
- `build_optimizer`: the groups, the optimizer and the schedule for a TrainConfig, in the shape
  `deepspeed.initialize` takes; `optimizer_key_problem`: a misspelled key of DeepSpeed's `optimizer` section.

Checked against DeepSpeed 0.19.8 (deepspeed/runtime/engine.py):
- Param groups with extra keys ("name") reach the optimizer unchanged: `_configure_basic_optimizer` passes
  `model_parameters` straight to the optimizer class; DeepSpeed reads `group["name"]` only for MoE groups
  (`moe=True`), and its own MoE/Muon grouping uses "name" the same way.
- `engine.get_lr()` reads `optimizer.param_groups[i]["lr"]`.
- A client optimizer must be a `torch.optim.Optimizer`; with ZeRO (any stage) one that is not in DeepSpeed's
  list (torch Adam/AdamW/Adagrad, FusedAdam, FusedLion, CPU Adam/Adagrad/Lion) needs
  `"zero_allow_untested_optimizer": true` (`_do_optimizer_sanity_check`), so lion-pytorch's Lion does; under
  `offload_optimizer` a client optimizer also needs `"zero_force_ds_cpu_optimizer": false`.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from launch.cuda_only import triton_problem
from models.pipeline import unknown_key_problem
from pipeft import one_line
from training.config_diff import zero_stage
from training.schedule import build_lr_scheduler, fill_deepspeed_scheduler, init_keys, is_number, parse_lr_schedule

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
# precision

# DeepSpeed's bf16 sections. With bf16 the trainer sets "immediate_grad_update": DeepSpeed's BF16_Optimizer clears
# every low-precision gradient in a backward hook on the stage's output (its backward_prologue), and the last stage
# computes the head inside the loss (models/pipeline.py, head_in_loss), after that output: the head's gradient,
# accumulated before the hook runs, was cleared each micro-batch (an untied head never trained; a tied one on 2+
# stages kept the embedding's share only). Moved to fp32 as it is computed, it is kept.
BF16_KEYS = ("bf16", "bfloat16")


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


def precision_problem(ds: dict) -> str | None:
    """What DeepSpeed's precision settings in `ds` would do wrong in this trainer, or refuse once the model is built,
    as one line; None if nothing."""
    import deepspeed
    from deepspeed.runtime.config import DtypeEnum

    if all(k in ds for k in BF16_KEYS):  # DeepSpeed reads 'bf16' and ignores 'bfloat16' then: one would be silent
        return ("'bf16' and 'bfloat16' are two names of one DeepSpeed section (with both, DeepSpeed reads 'bf16' and "
                "ignores 'bfloat16'); keep one")
    enabled = half_precisions(ds)
    if len(enabled) > 1:
        return "'fp16' and 'bf16' are both enabled; choose one"
    # DeepSpeed's ZeRO optimizer checks a step for a non-finite gradient only with bf16's check_grad_overflow (fp16:
    # always; fp32 weights: never without the norm); its BF16_Optimizer (bf16 + fp32 accumulation) always checks
    nan_applied = ("DeepSpeed's ZeRO optimizer would then apply a non-finite (NaN / inf) update to every weight, not "
                   "skip it")
    for key, sub in (*((k, "immediate_grad_update") for k in BF16_KEYS), *((k, "check_grad_overflow") for k in BF16_KEYS),
                     ("zero_optimization", "compute_grad_norm")):  # DeepSpeed reads 0, "false", "no" as false
        section = ds.get(key) if isinstance(ds.get(key), dict) else {}
        if sub in section and not isinstance(section[sub], bool):
            return f"'{key}.{sub}' must be true or false, got {json.dumps(section[sub])}"
    for key in BF16_KEYS:
        section = ds.get(key) if isinstance(ds.get(key), dict) else {}
        if section.get("immediate_grad_update") is False:
            return (f"'{key}.immediate_grad_update' false: the last stage computes the head inside the loss, and "
                    "DeepSpeed's bf16 optimizer would then clear the head's gradient before keeping it (the head would "
                    "not train); leave the key out (the trainer sets it true)")
        if section.get("check_grad_overflow") is False and enabled == ["bf16"] and steps_with_zero_optimizer(ds):
            return f"'{key}.check_grad_overflow' false: {nan_applied}; leave the key out"
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if zero.get("compute_grad_norm") is False and zero_stage(ds):
        if not enabled:
            return f"'zero_optimization.compute_grad_norm' false with fp32 weights: {nan_applied}; leave the key out"
        if not steps_with_zero_optimizer(ds):
            return ("'zero_optimization.compute_grad_norm' false: DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient "
                    "accumulation on ZeRO-1) refuses it; leave the key out")
        if ds.get("gradient_clipping", 1.0) != 0:
            return ("'zero_optimization.compute_grad_norm' false needs \"gradient_clipping\": 0 (DeepSpeed would clip "
                    "by the norm it does not compute; its default is 1.0)")
    if enabled and not zero_stage(ds):
        why = ("bf16 optimizer cannot reload its own checkpoints (every resume fails) nor accumulate gradients in fp32"
               if enabled[0] == "bf16" else "fp16 optimizer unscales gradients that its backward never scaled "
               "(updates 1 / loss scale of the true ones, overflow never detected, clipping inert)")
        return (f"'{enabled[0]}' needs \"zero_optimization\": {{\"stage\": 1}}: without ZeRO, DeepSpeed "
                f"{deepspeed.__version__}'s {why}")
    if isinstance(ds.get("data_types"), dict):  # what DeepSpeed reads of it (a misspelled key: silently not applied)
        from deepspeed.runtime import constants as dsc

        known = (dsc.GRAD_ACCUM_DTYPE, dsc.PARAM_DTYPE, dsc.BUFFER_DTYPE)
        if problem := unknown_key_problem("data_types", ds["data_types"], known):
            return problem
    accum = ds["data_types"].get("grad_accum_dtype") if isinstance(ds.get("data_types"), dict) else None
    if accum is not None:
        try:
            accum = DtypeEnum(accum).value
        except ValueError:
            names = sorted(v for v in DtypeEnum._value2member_map_ if isinstance(v, str) and "int8" not in v)
            return f"'data_types.grad_accum_dtype' {json.dumps(accum)} is not a dtype DeepSpeed knows ({', '.join(names)})"
        if accum != torch.float32 and not enabled and not zero_stage(ds):
            return (f"'data_types.grad_accum_dtype' {json.dumps(ds['data_types']['grad_accum_dtype'])} with fp32 "
                    "weights and no ZeRO: DeepSpeed's engine accumulates their gradients in fp32 only (leave the key "
                    "out)")
    if enabled:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        if not getattr(acc, f"is_{enabled[0]}_supported")():
            other = " (use bf16 or fp32)" if enabled[0] == "fp16" else ""
            return f"'{enabled[0]}' is not supported on this device ({acc.device_name()}){other}"
    return None


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
        kind, lrs = ds["scheduler"].get("type"), ds["scheduler"].get("params") or {}
        note += f"; DeepSpeed scheduler {kind}" + {  # these two set the lr from their own keys, from the first step
            "OneCycle": f" (lr {lrs.get('cycle_min_lr')} -> {lrs.get('cycle_max_lr')} by cycle_min_lr / cycle_max_lr; "
                        "optimizer.params.lr is not used)",
            "LRRangeTest": f" (lr from lr_range_test_min_lr {lrs.get('lr_range_test_min_lr', 0.001)} up; "
                           "optimizer.params.lr is not used)"}.get(kind, "")
    else:
        note += "; constant lr"
    return ds, groups, optimizer, lr_scheduler, note


# ----------------------------------------------------------------------------------------------
# DeepSpeed's optimizer section: a known type, sane values, and no misspelled key (dropped or a TypeError later)

# DeepSpeed's own optimizer names (deepspeed/runtime/config.py DEEPSPEED_OPTIMIZERS, matched case-insensitively);
# any other `type` must name a torch.optim class exactly (engine._configure_basic_optimizer)
DEEPSPEED_OPTIMIZERS = {"adagrad": "Adagrad", "adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "muadam": "MuAdam",
                        "muadamw": "MuAdamW", "musgd": "MuSGD", "lion": "Lion", "muon": "Muon"}
ONE_BIT = ("onebit", "zeroone", "1bit")  # DeepSpeed's OneBitAdam, ZeroOneAdam, OneBitLamb (compressed communication)


def check_optimizer(section: object, installed: bool = True) -> None:
    """DeepSpeed's `optimizer` section: a known `type` (the closest one suggested) and sane `params` (lr > 0,
    betas in [0, 1), weight_decay >= 0, eps >= 0); with `installed`, also what the type needs installed here (mup).
    ValueError with a one-line message naming the key."""
    if not isinstance(section, dict):
        raise ValueError(f"'optimizer' must be an object with \"type\" and \"params\", got {json.dumps(section)}")
    kind = section.get("type")
    if not isinstance(kind, str):
        raise ValueError(f"optimizer.type must be a string, got {json.dumps(kind)}")
    torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"]
    if re.sub(r"[^a-z0-9]", "", kind.lower()).startswith(ONE_BIT):  # its closest name was a wrong hint: 'NAdam'
        raise ValueError(f"optimizer.type {kind!r}: DeepSpeed's 1-bit optimizers are not supported here; use "
                         f"{', '.join(DEEPSPEED_OPTIMIZERS[k] for k in ('adamw', 'adam', 'lion'))} or a torch.optim class")
    if kind.lower() not in DEEPSPEED_OPTIMIZERS and kind not in torch_names:
        names = {**{n.lower(): n for n in torch_names}, **DEEPSPEED_OPTIMIZERS}
        close = difflib.get_close_matches(kind.lower(), names, n=1, cutoff=0.6)
        hint = f"; did you mean '{names[close[0]]}'?" if close else f" (known: {', '.join(DEEPSPEED_OPTIMIZERS.values())})"
        raise ValueError(f"optimizer.type {kind!r} is not an optimizer DeepSpeed or torch.optim knows{hint}")
    if installed and kind.lower() in ("muadam", "muadamw", "musgd") and importlib.util.find_spec("mup") is None:
        raise ValueError(f"optimizer.type {kind!r} needs the mup package (pip install mup), which is not installed")
    no_decay_patterns(section.get("no_wd_kws"))
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"optimizer.params must be an object, got {json.dumps(params)}")
    if "lr" in params and not (is_number(params["lr"]) and params["lr"] > 0):
        raise ValueError(f"optimizer.params.lr must be a number > 0, got {json.dumps(params['lr'])}")
    betas = params.get("betas", [0.0, 0.0])
    if not (isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optimizer.params.betas must be two numbers in [0, 1), got {json.dumps(betas)}")
    for key in ("weight_decay", "eps"):
        if key in params and not (is_number(params[key]) and params[key] >= 0):
            raise ValueError(f"optimizer.params.{key} must be a number >= 0, got {json.dumps(params[key])}")


OPTIMIZER_SECTION_KEYS = ("type", "params", "legacy_fusion", "no_wd_kws")  # no_wd_kws: gdGPT's (ours, removed)
# what DeepSpeed's engine pops from an Adam/AdamW section before building the optimizer (_configure_basic_optimizer)
DEEPSPEED_ADAM_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach")




def optimizer_key_problem(section: dict, cpu_optimizer: bool = False) -> str | None:
    """A misspelled key of an `optimizer` section or of its `params` (Adam/AdamW: what DeepSpeed's FusedAdam, CPU Adam
    or torch's AdamW take; Adagrad: the one DeepSpeed builds, its CPU Adagrad with `cpu_optimizer` (optimizer offload);
    a torch.optim type: its constructor's), a number given as a string, `max_grad_norm`, Lamb on CPU, as one line;
    None if none. DeepSpeed would drop a misspelled "params" (training at its default lr) or fail with a TypeError on
    every rank once the model is built."""
    if problem := unknown_key_problem("optimizer", section, OPTIMIZER_SECTION_KEYS):
        return problem
    kind, params = str(section.get("type", "")), section.get("params") or {}
    if not isinstance(params, dict):
        return None
    if "max_grad_norm" in params:  # DeepSpeed's engine refuses it on every rank once the model is built
        return ("optimizer.params.max_grad_norm: DeepSpeed clips by its own top-level \"gradient_clipping\"; move the "
                "value there")
    extra: list[str] = []
    if kind.lower() in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        classes, extra = [FusedAdam, DeepSpeedCPUAdam, torch.optim.AdamW, torch.optim.Adam], list(DEEPSPEED_ADAM_KEYS)
    elif kind.lower() == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        classes = [DeepSpeedCPUAdagrad if cpu_optimizer else torch.optim.Adagrad]  # the one DeepSpeed builds
    elif kind.lower() == "lamb":
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.lamb import FusedLamb

        if get_accelerator().device_name() == "cpu":
            return "optimizer.type Lamb is DeepSpeed's FusedLamb, a compiled op with no CPU build"
        classes = [FusedLamb]
    elif kind.lower() in ("lion", "muadam", "muadamw", "musgd", "muon"):
        return None  # Lion: build_lion checks its keys; the mup and Muon optimizers: their own checks
    elif isinstance(getattr(torch.optim, kind, None), type):
        classes = [getattr(torch.optim, kind)]
    else:
        return None
    allowed = list(dict.fromkeys([*init_keys(*classes), *extra]))  # each once: the keys several of them take
    if problem := unknown_key_problem(f"optimizer.params ({kind})", params, allowed):
        return problem
    for key, value in params.items():  # a number as a string ("0.9") is a TypeError later
        defaults = [q.default for c in classes if (q := inspect.signature(c.__init__).parameters.get(key)) is not None]
        if any(type(d) in (int, float) for d in defaults) and not is_number(value):
            return f"optimizer.params.{key} ({kind}) must be a number, got {json.dumps(value)}"
        if key in DEEPSPEED_ADAM_KEYS[:3] and not isinstance(value, bool) and not (key == "fp32_optimizer_states"
                                                                                   and value is None):  # its default
            # DeepSpeed tests them for truth: "false" would mean true
            return f"optimizer.params.{key} ({kind}) must be true or false, got {json.dumps(value)}"
    if len(classes) == 1 and classes[0].__module__.startswith("torch.optim"):  # its own range checks, now
        try:
            classes[0]([torch.zeros(1, requires_grad=True)], **params)
        except Exception as e:  # noqa: BLE001 - a probe: whatever it raises (RuntimeError: fused with foreach) refuses
            return f"optimizer.params ({kind}): torch.optim.{classes[0].__name__} refuses them: {one_line(e)}"
    return None
