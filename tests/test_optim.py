"""training/optim.py: param groups, the lr schedule (vs transformers, and through DeepSpeed), Lion."""

from __future__ import annotations

import functools
import sys
import types

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from launch import cuda_only
from training.config import ConfigError, TrainConfig
from training.optim import build_lion, build_optimizer, lion_reference_update, param_groups
from training.schedule import LrSchedule, build_lr_scheduler, fill_deepspeed_scheduler, parse_lr_schedule


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))


# ---------------------------------------------------------------------------------------------- param groups


def test_param_groups_split_dedup_and_frozen():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 4), "head": torch.nn.Linear(4, 5, bias=True),
                                 "norm": torch.nn.LayerNorm(4), "frozen": torch.nn.Linear(4, 4)})
    model["head"].weight = model["emb"].weight  # tied by identity
    model["frozen"].requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups[0]) == {id(model["emb"].weight)} and len(groups[0]["params"]) == 1
    assert ids(groups[1]) == {id(model["head"].bias), id(model["norm"].weight), id(model["norm"].bias)}

    (everything,) = param_groups(model, 0.1, decay_norm_and_bias=True)
    assert everything["name"] == "decay" and len(everything["params"]) == 4
    model["emb"].requires_grad_(False)
    assert [g["name"] for g in param_groups(model, 0.1)] == ["no_decay"]  # the empty group is left out


# ---------------------------------------------------------------------------------------------- lr schedule

HF = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}


def hf_factors(kind: str, warmup: int, total: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    elif kind == "cosine_min":
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, **kw)
    else:
        sched = HF[kind](opt, warmup, total)
    return [sched.lr_lambdas[0](k) for k in range(total + 1)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (4, 7), (5, 5), (1, 1)])
def test_factor_matches_transformers(kind, warmup, total):
    s = LrSchedule(type=kind, warmup_steps=warmup)
    assert [s.factor(k, total) for k in range(total + 1)] == hf_factors(kind, warmup, total)  # exact


def test_floor():
    m = 0.1
    cos = LrSchedule("cosine", warmup_steps=2, min_lr_ratio=m)
    assert [cos.factor(k, 12) for k in range(13)] == hf_factors("cosine_min", 2, 12, min_lr_rate=m)
    lin = LrSchedule("linear", warmup_steps=2, min_lr_ratio=m)
    assert [lin.factor(k, 12) for k in (0, 1, 2, 7, 12)] == pytest.approx([0, 0.5, 1, m + (1 - m) / 2, m])
    for s in (cos, lin):  # past the end: the floor (transformers' cosine would rise again)
        assert s.factor(20, 12) == pytest.approx(m) and min(s.factor(k, 12) for k in range(2, 30)) == pytest.approx(m)
    assert LrSchedule("constant", warmup_steps=2, min_lr_ratio=m).factor(11, 12) == 1.0


def test_warmup_ratio_rounds_up():
    assert LrSchedule(warmup_ratio=0.1).warmup(25) == 3  # ceil(2.5), as HF Trainer
    assert LrSchedule(warmup_ratio=0.1).warmup(30) == 3  # 30 * 0.1 = 3.0000000000000004: HF would get 4
    assert LrSchedule(warmup_ratio=0.05).warmup(10) == 1 and LrSchedule(warmup_ratio=0.0).warmup(10) == 0
    s = parse_lr_schedule({"type": "linear", "warmup_ratio": 0.25})
    assert [s.factor(k, 8) for k in range(9)] == hf_factors("linear", 2, 8)


def test_parse_defaults():
    assert parse_lr_schedule({}) == LrSchedule("cosine", 0, None, 0.0)
    assert parse_lr_schedule({"type": "constant", "warmup_steps": 5, "min_lr_ratio": 1}) == LrSchedule("constant", 5,
                                                                                                      None, 1.0)


@pytest.mark.parametrize("section,message", [
    ({"warmup_ratio": 1.5}, "lr_schedule.warmup_ratio must be in [0, 1), got 1.5"),
    ({"warmup_ratio": 1}, "lr_schedule.warmup_ratio must be in [0, 1), got 1"),
    ({"warmup_steps": -1}, "lr_schedule.warmup_steps must be >= 0, got -1"),
    ({"warmup_steps": 2.5}, "lr_schedule.warmup_steps must be an integer, got 2.5"),
    ({"warmup_steps": True}, "lr_schedule.warmup_steps must be an integer, got true"),
    ({"min_lr_ratio": 2}, "lr_schedule.min_lr_ratio must be in [0, 1], got 2"),
    ({"min_lr_ratio": "0.1"}, 'lr_schedule.min_lr_ratio must be a number, got "0.1"'),
    ({"type": "step"}, 'lr_schedule.type must be one of cosine, linear, constant, got "step"'),
    ({"warmup_steps": 1, "warmup_ratio": 0.1}, "lr_schedule.warmup_steps and lr_schedule.warmup_ratio are exclusive"),
    ({"warmup": 10}, "lr_schedule: unknown key(s) 'warmup'; allowed: type, warmup_steps, warmup_ratio, min_lr_ratio"),
    ([], "lr_schedule must be an object, got []"),
])
def test_parse_errors(section, message):
    with pytest.raises(ValueError) as e:
        parse_lr_schedule(section)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_scheduler_on_a_plain_optimizer_and_its_state():
    s = LrSchedule("cosine", warmup_steps=2, min_lr_ratio=0.2)
    opt = torch.optim.SGD(param_groups(tiny_model(), 0.1), lr=0.5)
    sched = build_lr_scheduler(opt, s, 6)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen == [[0.5 * s.factor(k, 6)] * 2 for k in range(4)]
    state = sched.state_dict()
    fresh = torch.optim.SGD(param_groups(tiny_model(), 0.1), lr=0.5)
    resumed = build_lr_scheduler(fresh, s, 6)
    resumed.load_state_dict(state)  # sets the optimizer's lr too, even without the optimizer's own state
    assert [g["lr"] for g in fresh.param_groups] == [0.5 * s.factor(4, 6)] * 2
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        build_lr_scheduler(fresh, s, 0)


def test_a_warmup_as_long_as_the_run_is_warned_about():
    from training.schedule import schedule_warning

    class Cfg:
        lr_schedule = {"type": "cosine", "warmup_steps": 100, "min_lr_ratio": 0.1}
        ds_config: dict = {}

    said = schedule_warning(Cfg, 10)
    assert said.startswith("lr_schedule's warmup (100 steps) is not shorter than the run (10 steps): the lr never "
                           "reaches its peak (the last update uses 0.09 x lr) nor decays"), said
    assert schedule_warning(Cfg, 101) is None
    Cfg.lr_schedule = {"type": "constant", "warmup_ratio": 0.5}
    assert "(1 steps) is not shorter than the run (1 steps)" in schedule_warning(Cfg, 1)  # its one update: lr 0
    assert schedule_warning(Cfg, 2) is None
    Cfg.lr_schedule = None
    assert schedule_warning(Cfg, 1) is None


def test_fill_deepspeed_scheduler():
    cos = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}
    assert fill_deepspeed_scheduler(cos, 100) == {"type": "WarmupCosineLR",
                                                   "params": {"warmup_num_steps": 10, "total_num_steps": 100}}
    assert cos == {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}  # not mutated
    assert fill_deepspeed_scheduler({"type": "WarmupDecayLR"}, 7) == {"type": "WarmupDecayLR",
                                                                       "params": {"total_num_steps": 7}}
    kept = {"type": "WarmupDecayLR", "params": {"total_num_steps": 50, "warmup_max_lr": 1e-3}}
    assert fill_deepspeed_scheduler(kept, 7) == kept
    for other in ({"type": "WarmupLR", "params": {"warmup_num_steps": 5}}, {"type": "OneCycle", "params": {}},
                  {"type": "LRRangeTest"}):
        assert fill_deepspeed_scheduler(other, 7) == other
    # whole numbers written as floats (YAML's 1e2) passed on as ints: DeepSpeed's WarmupLR refuses 100.0
    assert fill_deepspeed_scheduler({"type": "WarmupLR", "params": {"warmup_num_steps": 100.0, "warmup_max_lr": 1.0}},
                                    7)["params"] == {"warmup_num_steps": 100, "warmup_max_lr": 1.0}
    assert fill_deepspeed_scheduler({"type": "MultiStepLR", "params": {"milestones": [3.0, 6.0]}}, 7)["params"] == {
        "milestones": [3, 6]}


# ---------------------------------------------------------------------------------------------- Lion


def test_lion_matches_reference_formula():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    ref = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    opt = build_lion([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
                     lr=3e-3, betas=[0.8, 0.95], weight_decay=0.5)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (r, m, g) in enumerate(zip(ref, ref_m, grads, strict=True)):
            lion_reference_update(r, g, m, 3e-3, (0.8, 0.95), 0.5 if i == 0 else 0.0)
    for p, r, m in zip(params, ref, ref_m, strict=True):
        torch.testing.assert_close(p.detach(), r, atol=1e-7, rtol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-7, rtol=0)


@pytest.mark.skipif(cuda_only.cuda_available(), reason="checks the fallback where CUDA is missing")
def test_lion_triton_falls_back_with_a_warning():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.warns(RuntimeWarning, match=r"use_triton was asked for .*\(CUDA is not available\)"):
        opt = build_lion([p], lr=0.1, use_triton=True)
    p.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.9, 1.1, 1.0, 0.9])


def test_lion_triton_reasons(monkeypatch):
    """With CUDA, lion-pytorch's triton module would exit() the process when triton is missing: never reached."""
    monkeypatch.setattr(cuda_only, "cuda_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # import fails
    with pytest.warns(RuntimeWarning, match=r"\(triton is not installed\)"):
        build_lion([torch.nn.Parameter(torch.ones(2))], use_triton=True)
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    with pytest.warns(RuntimeWarning, match=r"\(the parameters are not on a CUDA device\)"):
        build_lion([{"params": [torch.nn.Parameter(torch.ones(2))]}], use_triton=True)
    # the trainer builds the optimizer on CPU parameters that DeepSpeed then moves to the accelerator: the
    # accelerator decides (on CUDA the kernel runs: bench/gpu_checks.py trains with it)
    on_cpu = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    assert cuda_only.triton_problem(on_cpu, "cuda") is None
    assert cuda_only.triton_problem(on_cpu, "hpu") == "training runs on hpu, not on a CUDA device"


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": 1e-4, "eps": 1e-8, "momentum": 0.9}, "unknown key(s) 'eps', 'momentum' for Lion; allowed: lr, betas"),
    ({"lr": 0}, "optimizer.params.lr must be a number > 0, got 0"),
    ({"betas": [0.9]}, "optimizer.params.betas must be two numbers in [0, 1)"),
    ({"betas": [0.9, 1.0]}, "optimizer.params.betas must be two numbers in [0, 1)"),
    ({"weight_decay": -1}, "optimizer.params.weight_decay must be a number >= 0"),
])
def test_lion_rejects_bad_params(kwargs, message):
    with pytest.raises(ValueError) as e:
        build_lion([torch.nn.Parameter(torch.ones(2))], **kwargs)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------- build_optimizer


def train_config(**over) -> TrainConfig:
    return TrainConfig(model_path="m", save_path="s", data_path="d", path="cfg.json", **over)


def test_build_optimizer_deepspeed_optimizer_and_schedule():
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}
    cfg = train_config(ds_config=ds, lr_schedule={"warmup_ratio": 0.25})
    ds_config, groups, optimizer, make_scheduler, note = build_optimizer(tiny_model(), cfg, 8)
    assert ds_config == {"steps_per_print": 10**9, **ds} and optimizer is None
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    sched = make_scheduler(torch.optim.AdamW(groups, lr=1e-3))
    assert sched.get_last_lr() == [0.0, 0.0] and "cosine, warmup 2 of 8 steps" in note
    with pytest.raises(ConfigError, match=r"^cfg.json: lr_schedule.type must be one of"):
        build_optimizer(tiny_model(), train_config(ds_config=ds, lr_schedule={"type": "step"}), 8)


def test_build_optimizer_lion_and_deepspeed_scheduler():
    ds = {"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.1}},
          "zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}}}
    cfg = train_config(ds_config=ds, decay_norm_and_bias=True)
    ds_config, groups, optimizer, make_scheduler, note = build_optimizer(tiny_model(), cfg, 8)
    assert "optimizer" not in ds_config and ds_config["zero_allow_untested_optimizer"] is True
    assert ds_config["scheduler"]["params"] == {"warmup_num_steps": 2, "total_num_steps": 8} and make_scheduler is None
    assert type(optimizer).__name__ == "Lion" and [g["name"] for g in optimizer.param_groups] == ["decay"]
    assert "optimizer" in ds and "total_num_steps" not in ds["scheduler"]["params"]  # the config is not mutated
    bad = {"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "eps": 1e-8}}}
    with pytest.raises(ConfigError, match="unknown key"):
        build_optimizer(tiny_model(), train_config(ds_config=bad), 8)


def test_a_deepspeed_scheduler_shorter_than_the_run_is_refused_or_warned_about():
    """torch's OneCycleLR raises once stepped past its total_steps (mid-run, and on every resume): refused in one line
    before training; DeepSpeed's WarmupDecayLR / WarmupCosineLR with an explicit total_num_steps below the run train
    the rest at their end lr: a warning (filled in when left out, as before)."""
    from training.schedule import _NEEDS_TOTAL, schedule_warning

    for params in ({"max_lr": 1e-3, "total_steps": 4}, {"max_lr": 1e-3, "epochs": 2, "steps_per_epoch": 2}):
        cfg = train_config(ds_config={"scheduler": {"type": "OneCycleLR", "params": params}})
        with pytest.raises(ConfigError, match="scheduler.params \\(OneCycleLR\\): total_steps 4 is below the run's 6 "
                                              "steps: torch would stop the run with an error at its end"):
            build_optimizer(tiny_model(), cfg, 6)
        assert build_optimizer(tiny_model(), cfg, 4)[4]  # as long as the run: built
    for kind, end in (("WarmupDecayLR", "warmup_min_lr (1e-05)"), ("WarmupCosineLR", "its floor (cos_min_ratio x lr)")):
        params = {"warmup_num_steps": 1, "total_num_steps": 4.0, "warmup_min_lr": 1e-5} if kind == "WarmupDecayLR" else \
            {"warmup_num_steps": 1, "total_num_steps": 4}
        cfg = train_config(ds_config={"scheduler": {"type": kind, "params": params}})
        assert schedule_warning(cfg, 6) == (f"scheduler.params.total_num_steps 4 ({kind}) is below the run's 6 steps: the "
                                            f"updates after step 4 train at lr {end}; leave total_num_steps out (it is "
                                            "filled in)")
        assert schedule_warning(cfg, 4) is None
        assert schedule_warning(train_config(ds_config={"scheduler": {"type": kind, "params": {}}}), 6000) is None
    # a warmup as long as the run (DeepSpeed's default is 1000 steps) never reaches the lr the config names
    for kind in ("WarmupLR", *_NEEDS_TOTAL):
        assert schedule_warning(train_config(ds_config={"scheduler": {"type": kind, "params": {}}}), 300) == (
            f"scheduler.params.warmup_num_steps ({kind}) is 1000 (DeepSpeed default: not given): the lr reaches its "
            "peak at update 1001, past the run's 300 (DeepSpeed's first two updates run at the warmup's start); give a "
            "shorter warmup_num_steps")
        # the peak at update w + 1 (log), w + 2 (linear), w at least 2: as DeepSpeed's schedulers run in the engine
        for params, last_short, first_long in (({"warmup_num_steps": 300.0}, 300, 301),
                                               ({"warmup_num_steps": 300, "warmup_type": "linear"}, 301, 302),
                                               ({"warmup_num_steps": 1}, 2, 3)):
            short = train_config(ds_config={"scheduler": {"type": kind, "params": params}})
            assert "warmup_num_steps (" in schedule_warning(short, last_short), params
            assert schedule_warning(short, first_long) is None, params
    # OneCycle and LRRangeTest set the lr from their own keys: the start line says which lr trains
    one_cycle = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-5, "cycle_max_lr": 1e-3}}
    note = build_optimizer(tiny_model(), train_config(ds_config={"scheduler": one_cycle}), 6)[4]
    assert "; DeepSpeed scheduler OneCycle (lr 1e-05 -> 0.001 by cycle_min_lr / cycle_max_lr; optimizer.params.lr is " \
        "not used)" in note, note


# ---------------------------------------------------------------------------------------------- through DeepSpeed


BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9}
SCHED = LrSchedule("cosine", warmup_steps=2, min_lr_ratio=0.1)
LR, TOTAL = 1e-3, 6
# DeepSpeed's AdamW as README tells CPU users to run it: torch's (its CPU FusedAdam op compiles for ~40 s)
ADAMW = {"optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "torch_adam": True}}}


def train(engine, steps: int) -> list[float]:
    """The lr each update used (read before engine.step())."""
    torch.manual_seed(2)
    used = []
    for _ in range(steps):
        used.append(engine.get_lr())
        engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
        engine.step()
    return used


def lion_engine(ds, config: dict):
    model = tiny_model()
    lion = build_lion(param_groups(model, 0.1), lr=LR, weight_decay=0.1)
    engine, *_ = ds.initialize(model=model, config=config, optimizer=lion,
                               lr_scheduler=build_lr_scheduler(lion, SCHED, TOTAL))
    return engine


def test_deepspeed_adamw_groups_and_schedule(ds, tmp_path):
    config = {**BASE, **ADAMW}
    make = lambda: ds.initialize(  # noqa: E731
        model=(m := tiny_model()), config=config, model_parameters=param_groups(m, 0.1),
        lr_scheduler=lambda opt: build_lr_scheduler(opt, SCHED, TOTAL))[0]
    engine = make()
    assert [(g["name"], g["weight_decay"]) for g in engine.optimizer.param_groups] == [("decay", 0.1), ("no_decay", 0.0)]
    used = train(engine, 5)
    assert used == [[LR * SCHED.factor(k, TOTAL)] * 2 for k in range(5)]
    engine.save_checkpoint(str(tmp_path), tag="t")
    for load_optimizer_states in (True, False):
        resumed = make()
        resumed.load_checkpoint(str(tmp_path), tag="t", load_optimizer_states=load_optimizer_states)
        assert resumed.lr_scheduler.last_epoch == 5 and resumed.get_lr() == [LR * SCHED.factor(5, TOTAL)] * 2


BF16_FP32_ACCUM = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}


@pytest.mark.parametrize("config", [
    {}, {"zero_optimization": {"stage": 1}}, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
    {"zero_optimization": {"stage": 1}, **BF16_FP32_ACCUM}, {"zero_optimization": True, **BF16_FP32_ACCUM},
    {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False,
     **BF16_FP32_ACCUM},
    {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
], ids=["zero0", "zero1", "zero1-bf16", "zero1-bf16-fp32accum", "zero-true-bf16-fp32accum",
        "zero1-bf16-fp32accum-offload", "zero2-bf16"])
def test_steps_with_zero_optimizer_is_the_optimizer_deepspeed_picks(ds, config):
    """even_groups is for DeepSpeed's ZeRO optimizer only (the one that hung): BF16_Optimizer's groups, and with them
    its checkpoints, stay as they were."""
    from training.optim import steps_with_zero_optimizer

    m = tiny_model()
    engine = ds.initialize(model=m, config={**BASE, **ADAMW, **config}, model_parameters=param_groups(m, 0.1))[0]
    assert steps_with_zero_optimizer(config) == (type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"), \
        type(engine.optimizer).__name__


def test_a_resume_may_switch_the_kind_of_lr_scheduler(ds, tmp_path):
    """A checkpoint of a run under the project's lr_schedule resumed under DeepSpeed's WarmupLR, and back: the saved
    scheduler state does not load into the other kind (DeepSpeed raises: what a resume did), so the trainer skips
    it and starts the new scheduler at the checkpoint's step, with the lrs an uninterrupted run of it has there."""
    from training.config_diff import schedule_kind, start_schedule_at

    warmup = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": LR, "warmup_num_steps": 10,
                                             "warmup_type": "linear"}}
    assert [schedule_kind(c) for c in ({"lr_schedule": {}}, {"scheduler": warmup}, {})] == [
        "lr_schedule", "scheduler WarmupLR", "none"]

    def make(kind: str):
        m = tiny_model()
        if kind == "lr_schedule":
            return ds.initialize(model=m, config={**BASE, **ADAMW}, model_parameters=param_groups(m, 0.1),
                                 lr_scheduler=lambda opt: build_lr_scheduler(opt, SCHED, TOTAL))[0]
        return ds.initialize(model=m, config={**BASE, **ADAMW, "scheduler": warmup},
                             model_parameters=param_groups(m, 0.1))[0]

    for saved, new in (("lr_schedule", "warmup"), ("warmup", "lr_schedule")):
        engine = make(saved)
        train(engine, 3)
        engine.save_checkpoint(str(tmp_path / saved), tag="t")
        with pytest.raises((KeyError, AttributeError, TypeError)):
            make(new).load_checkpoint(str(tmp_path / saved), tag="t", load_lr_scheduler_states=True)
        ref = make(new)
        train(ref, 3)
        resumed = make(new)
        resumed.load_checkpoint(str(tmp_path / saved), tag="t", load_lr_scheduler_states=False)
        start_schedule_at(resumed.lr_scheduler, 3)
        assert resumed.get_lr() == ref.get_lr() and train(resumed, 2) == train(ref, 2), (saved, new)
        assert ref.get_lr() != make(new).get_lr()  # a scheduler left at its start would differ


def test_deepspeed_lion_fp32(ds):
    engine = lion_engine(ds, BASE)
    assert type(engine.optimizer).__name__ == "Lion"
    assert train(engine, 5) == [[LR * SCHED.factor(k, TOTAL)] * 2 for k in range(5)]


def test_deepspeed_lion_zero1_needs_allow_untested(ds):
    with pytest.raises(AssertionError, match="zero_allow_untested_optimizer"):
        lion_engine(ds, {**BASE, "zero_optimization": {"stage": 1}})
    engine = lion_engine(ds, {**BASE, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert type(engine.basic_optimizer).__name__ == "Lion"
    assert train(engine, 5) == [[LR * SCHED.factor(k, TOTAL)] * 2 for k in range(5)]
    plain = lion_engine(ds, BASE)
    train(plain, 5)
    for z, p, p0 in zip(engine.module.parameters(), plain.module.parameters(), tiny_model().parameters(), strict=True):
        torch.testing.assert_close(z, p, atol=1e-7, rtol=0)  # ZeRO-1 updates as the plain Lion does
        assert not torch.equal(z, p0)


def test_an_unknown_adam_key_lists_each_known_key_once():
    from training.optim import optimizer_key_problem

    said = optimizer_key_problem({"type": "AdamW", "params": {"foo": 1}})
    known = said.split("(known: ")[1].rstrip(")").split(", ")
    assert "lr" in known and len(known) == len(set(known)), said


def test_the_trainers_gradient_norm_is_exact_without_an_fp64_copy():
    """fp32 without ZeRO the trainer computes the global norm itself: rows of NORM_ROW elements normed in fp32, their
    squares summed in fp64 (an fp32 norm of a whole tensor this size is already off by more than 1e-6 on a CPU; the
    exact fp64 sum is the reference)."""
    from training.trainer import NORM_ROW, squared_norm

    torch.manual_seed(0)
    grads = [torch.randn(1 << 23), torch.randn(NORM_ROW * 3 + 5), torch.randn(3, 7), torch.tensor([float("nan")])]
    exact = sum(float(g.double().square().sum()) for g in grads[:3])
    got = squared_norm(grads[:3], torch.device("cpu"))
    assert got.dtype == torch.float64 and got.dim() == 0 and float(got) == pytest.approx(exact, rel=1e-9)
    fp32 = sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads[:3])
    assert abs(fp32 - exact) / exact > 1e-6  # the premise: a plain fp32 norm is not exact here
    assert torch.isnan(squared_norm(grads, torch.device("cpu")))  # a NaN gradient: the step is skipped
    assert float(squared_norm([], torch.device("cpu"))) == 0.0  # a stage without gradients (frozen layers only)


@pytest.mark.parametrize("ds, problem", [
    # BF16_Optimizer (bf16 + fp32 accumulation on ZeRO-1) checks every step whatever check_grad_overflow says
    ({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1},
      "data_types": {"grad_accum_dtype": "fp32"}}, None),
    ({"bf16": {"enabled": False, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}}, None),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}},
     "'bf16.check_grad_overflow' false: DeepSpeed's ZeRO optimizer would then apply a non-finite"),
    # with half precision DeepSpeed still checks the step; it needs no clipping then
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "compute_grad_norm": False}, "gradient_clipping": 0},
     None),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "compute_grad_norm": False}},
     "'zero_optimization.compute_grad_norm' false needs \"gradient_clipping\": 0"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "compute_grad_norm": False}, "gradient_clipping": 0,
      "data_types": {"grad_accum_dtype": "fp32"}},
     "'zero_optimization.compute_grad_norm' false: DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}, "gradient_clipping": 0},
     "'zero_optimization.compute_grad_norm' false with fp32 weights: DeepSpeed's ZeRO optimizer would then apply"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp16"}}, None),
], ids=["bf16 fp32-accum", "bf16 off", "bf16 zero", "no norm bf16", "no norm clipped", "no norm bf16 fp32-accum",
        "no norm fp32", "zero mixes"])
def test_precision_problems_are_the_optimizer_deepspeed_steps_with(ds, problem):
    """Refused only where DeepSpeed 0.19.8 applies a non-finite update or refuses the mix once the model is built."""
    from training.optim import precision_problem

    found = precision_problem(ds)
    assert found == problem if problem is None else found.startswith(problem), found


def test_adagrad_keys_are_those_of_the_adagrad_deepspeed_builds():
    """torch's Adagrad, or DeepSpeed's CPU Adagrad under optimizer offload: a key of the other is a TypeError at
    build time."""
    from training.optim import optimizer_key_problem

    section = {"type": "Adagrad", "params": {"lr": 0.1, "lr_decay": 0.1}}
    assert optimizer_key_problem(section) is None
    assert optimizer_key_problem(section, cpu_optimizer=True).startswith(
        "optimizer.params (Adagrad): unknown key 'lr_decay'")
    assert optimizer_key_problem({"type": "Adagrad", "params": {"lr": 0.1, "amsgrad": False}}).startswith(
        "optimizer.params (Adagrad): unknown key 'amsgrad'")


def test_values_deepspeed_and_torch_take_are_not_refused():
    """The range checks of the config fuzz's finds stop where the real classes would accept: torch's warm-up of 0
    iterations, DeepSpeed's fp32_optimizer_states left null, a probe-built SGD with one of fused / foreach, OneCycleLR's
    null total_steps beside its epochs; the refusals themselves are test_train_cli's bad-config cases."""
    from training.optim import optimizer_key_problem
    from training.schedule import scheduler_problem

    for kind, params in (("LinearLR", {"total_iters": 0}), ("ConstantLR", {"total_iters": 0}),
                         ("OneCycleLR", {"max_lr": 1e-3, "total_steps": None, "epochs": 2, "steps_per_epoch": 5}),
                         ("WarmupLR", {"warmup_min_lr": [0, 0], "warmup_max_lr": None, "warmup_num_steps": 1})):
        assert scheduler_problem({"type": kind, "params": params}) is None, kind
    for section in ({"type": "AdamW", "params": {"lr": 1e-3, "fp32_optimizer_states": None, "torch_adam": True}},
                    {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "fused": True}},
                    {"type": "SGD", "params": {"lr": 0.1, "foreach": True}}):
        assert optimizer_key_problem(section) is None, section


def test_a_warmup_scheduler_whose_peak_is_the_optimizers_lr_is_accepted():
    """scheduler_lr_problem refuses only a WarmupLR / WarmupDecayLR that trains at another lr than optimizer.params.lr
    (bad_configs.py); these train at it: checked against the lr DeepSpeed's scheduler sets."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR

    from training.schedule import scheduler_lr_problem

    adamw = {"type": "AdamW", "params": {"lr": 2e-5}}
    for kind, params in (("WarmupLR", {}), ("WarmupLR", {"warmup_max_lr": None}), ("WarmupLR", {"warmup_max_lr": 2e-5}),
                         ("WarmupLR", {"warmup_max_lr": [2e-5, 2e-5]}), ("WarmupDecayLR", {"warmup_max_lr": None}),
                         ("WarmupDecayLR", {"warmup_max_lr": 2e-5})):
        assert scheduler_lr_problem({"optimizer": adamw, "scheduler": {"type": kind, "params": params}}) is None
        groups = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(2)]
        cls = WarmupLR if kind == "WarmupLR" else functools.partial(WarmupDecayLR, total_num_steps=10)
        assert cls(torch.optim.SGD(groups, lr=2e-5), **params).max_lrs == [2e-5, 2e-5], (kind, params)
    assert scheduler_lr_problem({"optimizer": {"type": "AdamW", "params": {}},  # DeepSpeed's default lr: 0.001 both
                                 "scheduler": {"type": "WarmupDecayLR", "params": {}}}) is None
