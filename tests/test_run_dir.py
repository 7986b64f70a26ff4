"""A run directory one run at a time: one run per save_path (lock), a restarted job taking its own lock over, config
changes on resume said and applied or refused; smaller one-line refusals (launch environment, eval set). Damaged
checkpoints, a full disk, the stop of the `deepspeed` command and the converter's checks: test_run_faults.py.

Multi-process parts use the real deepspeed launcher on CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import dead_pid, errors_of, finish_deepspeed, ops_config, run_deepspeed, start_deepspeed
from tests.test_train_ops import checkpoint_tensors, losses_of, metrics_of, wait_for
from training.config import ConfigError, load_config, resume_hint, start_over
from training.resume import MODEL_CONFIG_IGNORED
from training.runlock import JOB_FILE, LOCK_FILE, RunLock, config_identity, launcher_token, record_job

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the run lock, resume


@pytest.mark.distributed
def test_one_run_per_save_path_and_config_changes_on_resume(tmp_path, ops_model):
    """A second run on a held save_path refuses and leaves the first untouched; a stale lock is taken over; a
    finished run continues when max_steps is raised (bit-identical to an uninterrupted run); a new lr is used;
    a new data file is refused, then allowed with the flag. The runs evaluate every 3 steps with early stopping: the
    first run's end-of-run evaluation (step 4) is not counted by the continued one's early stopping."""
    constant = {"lr_schedule": {"type": "constant"}, "eval_data_path": str(ops_model / "eval.jsonl"), "eval_interval": 3,
                "early_stopping_patience": 20}
    release, ref = tmp_path / "release", tmp_path / "ref"
    ref.mkdir()  # the uninterrupted run of 8 steps to compare with, side by side with the first ones
    uninterrupted = start_deepspeed("train_ds.py", ["--config", str(ops_config(ref, ops_model, max_steps=8, **constant))])
    first = ops_config(tmp_path, ops_model, max_steps=4, **constant)
    proc = start_deepspeed("train_ds.py", ["--config", str(first)], env={"PIPEFT_FAULT_PAUSE": f"step:2:120:{release}"})
    save = tmp_path / "out"
    wait_for(lambda: (save / "metrics.jsonl").is_file() and 2 in losses_of(save), proc)
    holder = json.loads((save / LOCK_FILE).read_text())
    second = start_deepspeed("train_ds.py", ["--config", str(first)])
    _, out = finish_deepspeed(second, expect=2)
    said = errors_of(out)
    assert len(said) == 1 and f"save_path {save} is in use by another run (host {socket.gethostname()}, pid " \
        f"{holder['pid']}" in said[0], out[-3000:]
    release.touch()
    _, out = finish_deepspeed(proc)
    assert [m["step"] for m in metrics_of(save)] == [1, 2, 3, 4, 4]  # the first run's own (and its end-of-run eval), untouched
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step4"] and not (save / LOCK_FILE).exists()
    model = json.loads((ops_model / "pp" / "config.json").read_text())  # what a resume's model_path must build
    assert json.loads((save / "global_step4" / "model_config.json").read_text()) == {
        k: v for k, v in model.items() if k not in MODEL_CONFIG_IGNORED}

    # a run killed without releasing its lock: the next one takes it over and says so
    (save / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": 0}))
    longer = ops_config(tmp_path, ops_model, max_steps=8, **constant)
    out = run_deepspeed("train_ds.py", ["--config", str(longer)]).stdout
    assert f"took over the lock of save_path {save} from a run that is gone" in out
    assert ("max_steps: 4 -> 8 (applied: the run is as long as the new value says (longer: a finished run continues; "
            "at or below the checkpoint's step: it ends there))") in out
    assert "continuing the finished run from step 4 to step 8" in out
    assert "optimizer settings from the config in force: lr of the next update (step 5) 0.003 as saved -> 0.003 now" \
        in out  # (a schedule over the run's length would move)
    finish_deepspeed(uninterrupted)
    assert losses_of(save) == losses_of(ref / "out") and sorted(losses_of(save)) == list(range(1, 9))
    # the first run's end-of-run evaluation (step 4) stays (it ranks for keep_best), marked so that early stopping
    # counts only what the uninterrupted run evaluated
    got, want = (json.loads((d / "global_step8" / "trainer_state.json").read_text()) for d in (save, ref / "out"))
    assert [e for e in got["evals"] if e[0] != 4] == want["evals"] and [s for s, _ in want["evals"]] == [3, 6, 8]
    assert got["end_evals"] == [4, 8] and want["end_evals"] == [8]
    a, b = checkpoint_tensors(ref / "out" / "global_step8"), checkpoint_tensors(save / "global_step8")
    assert a.keys() == b.keys() and len(a) > 20 and all(torch.equal(a[k], b[k]) for k in a)

    # another data file: refused once its rows are read (they are not the checkpoint's) unless allowed; a new lr is
    # what the optimizer uses
    other = tmp_path / "other.jsonl"
    other.write_text("".join(reversed((ops_model / "train.jsonl").read_text().splitlines(keepends=True))))
    new = dict(max_steps=10, data_path=str(other), **constant,
               optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}})
    side = {f.name: f.read_bytes() for f in save.iterdir() if f.is_file() and f.suffix == ".json"}
    _, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(ops_config(tmp_path, ops_model, **new))]),
                              expect=2)
    assert {n: (save / n).read_bytes() for n in side} == side and "data_settings.json" in side  # left as they were
    assert errors_of(out) == [f"train_ds.py: error: {tmp_path / 'cfg.json'}: cannot resume {save / 'global_step8'} exactly: "
                              "the training samples differ from the checkpoint's (data files, tokenizer or data settings), "
                              "so samples would be repeated or skipped; set \"allow_data_change_on_resume\": true to "
                              "continue anyway, or start a new run (data keys changed since it: data_path)"], out[-3000:]
    assert "Using topology" not in out  # refused once the rows are read, before the model is built
    new["seed"] = 4  # allowed too, with a warning
    out = run_deepspeed("train_ds.py", ["--config", str(ops_config(tmp_path, ops_model, allow_data_change_on_resume=True,
                                                                     **new))]).stdout
    assert "optimizer.params.lr: 0.003 -> 0.001 (applied" in out and "data_path: " in out and "(allowed" in out
    assert "warning: the training samples differ from the checkpoint's" in out
    assert "warning: seed changed (3 -> 4): the data order continues at this step's position, not sample-exact" in out
    assert "Using topology" in out  # (DeepSpeed's line at the model's build, which the refused run did not reach)
    lrs = {m["step"]: m["lr"] for m in metrics_of(save) if "lr" in m}
    assert [lrs[s] for s in range(1, 11)] == [3e-3] * 8 + [1e-3] * 2

    # the project's schedule -> DeepSpeed's WarmupLR: its state is not loaded into the other kind (a traceback on
    # every rank), the new scheduler starts at step 10 (update k applies (k - 2) / 20 x the peak, as in a run under
    # WarmupLR from the start: DeepSpeed's WarmupLR holds its minimum for two updates; metrics.jsonl has the lr applied)
    warmup = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 20,
                                             "warmup_type": "linear"}}
    # and the data file moved (the same rows): the run goes on without allow_data_change_on_resume
    moved = tmp_path / "moved" / "other.jsonl"
    moved.parent.mkdir()
    other.rename(moved)
    new.update(max_steps=12, lr_schedule=None, scheduler=warmup, data_path=str(moved))
    out = run_deepspeed("train_ds.py", ["--config", str(ops_config(tmp_path, ops_model, **new))]).stdout
    assert f"data_path: {json.dumps(str(other))} -> {json.dumps(str(moved))} (checked: the run goes on only if the " \
        "training samples are the checkpoint's" in out and "warning: the training samples differ" not in out
    said = [line for line in out.splitlines() if "scheduler" in line and "applied" in line]
    assert said and all("another kind of scheduler starts at this step" in line for line in said), out[-3000:]
    assert "finished steps 11-12 (this start's) in " in out  # not "finished 2 steps", as if the run had 2
    lrs = {m["step"]: m["lr"] for m in metrics_of(save) if "lr" in m}
    assert [lrs[s] for s in (11, 12)] == pytest.approx([1e-3 * 9 / 20, 1e-3 * 10 / 20], rel=1e-12), lrs


def test_resume_rules_refuse_what_changes_the_optimizer_state_or_the_data_order():
    """The classification behind the lines a resume prints (README's table): a section written without "enabled", or
    "enabled": false, is the same as no section; the precision, the loss scaler's keys (DeepSpeed restores the scaler
    from the checkpoint), the seed and the batch are refused; data keys wait for the fingerprint of the rows when the
    checkpoint has one."""
    from training.config_diff import config_changes, refusals, same_global_batch

    base = {"data_path": "a.jsonl", "seed": 1, "fp16": {"enabled": True, "loss_scale_window": 1000}}
    def changed(**over):
        return {c.key: c.kind for c in config_changes(base, {**base, **over})}

    assert changed(bf16={"enabled": False}) == {} and changed(bf16={}) == {}
    window = config_changes(base, {**base, "fp16": {"enabled": True, "loss_scale_window": 500}})
    assert [(c.key, c.kind) for c in window] == [("fp16.loss_scale_window", "fixed")] and "restores the loss scaler" \
        in window[0].note
    assert changed(fp16={"enabled": False, "loss_scale_window": 1000}) == {"fp16.enabled": "fixed"}
    assert changed(fp16={"enabled": True, "loss_scale_window": 1000, "fp16_master_weights_and_grads": True}) == {
        "fp16.fp16_master_weights_and_grads": "fixed"}
    moved = config_changes(base, {**base, "data_path": "/new/a.jsonl", "seed": 2})
    assert {c.key: c.kind for c in moved} == {"data_path": "samples", "seed": "data"}
    assert [c.key for c in refusals(moved, False)] == ["seed"]
    assert [c.key for c in refusals(moved, False, fingerprinted=False)] == ["data_path", "seed"]
    assert refusals(moved, True) == []
    # DeepSpeed's optimizer names are matched case-insensitively: the same optimizer; another one is refused
    opt = {"type": "AdamW", "params": {"lr": 1e-4}}
    def opt_changes(kind):
        return [c.key for c in config_changes({**base, "optimizer": opt}, {**base, "optimizer": {**opt, "type": kind}})]
    assert opt_changes("adamw") == [] and opt_changes("Adam") == ["optimizer.type"]
    # the batch keys split the checkpoint's global batch otherwise (half the accumulation on twice the replicas):
    # the data order is the same, applied; another global batch is refused
    split = config_changes({**base, "gradient_accumulation_steps": 8}, {**base, "gradient_accumulation_steps": 4})
    assert [c.kind for c in same_global_batch(split, True)] == ["applied"] and refusals(same_global_batch(split, True),
                                                                                       False) == []
    assert [c.key for c in refusals(same_global_batch(split, False), False)] == ["gradient_accumulation_steps"]


def test_resume_compares_the_settings_deepspeed_reads_not_their_spelling():
    """README: a precision section absent, empty or with "enabled": false is none (its other keys do nothing), and
    ZeRO absent, false, {} or stage 0 is none (true: stage 1), so such spellings resume; a real change is refused."""
    from training.config_diff import config_changes, refusals

    none = {"data_path": "a.jsonl"}
    same = [{"fp16": {"enabled": False, "loss_scale_window": 1000}}, {"bf16": {"enabled": False, "immediate_grad_update": True}},
            {"bfloat16": {}}, {"zero_optimization": {"stage": 0}}, {"zero_optimization": False}, {"zero_optimization": {}},
            {"zero_optimization": {"reduce_bucket_size": 5e8}}]
    for over in same:
        assert config_changes(none, {**none, **over}) == [] and config_changes({**none, **over}, none) == [], over
    one = {**none, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    assert config_changes(one, {**none, "bfloat16": {"enabled": True}, "zero_optimization": True}) == []
    off = config_changes(one, {**one, "bf16": {"enabled": False, "immediate_grad_update": True}})
    assert [(c.key, c.kind) for c in off] == [("bf16.enabled", "fixed")]
    zero = config_changes(one, {**one, "zero_optimization": {"stage": 0}})
    assert [c.key for c in refusals(zero, False)] == ["zero_optimization.stage"]
    # communication and checks are applied; what the optimizer state holds is refused
    other = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 1e7, "overlap_comm": True,
                                   "offload_optimizer": {"device": "cpu"}},
             "bf16": {"enabled": True, "check_grad_overflow": False, "bf16_optimizer_states": True}}
    assert {c.key: c.kind for c in config_changes(one, {**one, **other})} == {
        "zero_optimization.reduce_bucket_size": "applied", "zero_optimization.overlap_comm": "applied",
        "zero_optimization.offload_optimizer": "fixed", "bf16.check_grad_overflow": "applied",
        "bf16.bf16_optimizer_states": "fixed"}


def test_resume_takes_a_key_written_out_with_its_default_as_unchanged():
    """A key written out with the value it has when left out (the project's, the lora and quantization sections',
    dataloader_drop_last's (true here, not DeepSpeed's false), DeepSpeed's fp16 loss scaler's; gdGPT's use_flash_attn
    as the attn_implementation it means) is no change; was refused ("the data order changes", "the optimizer's
    parameter groups would differ"), some keys even with allow_data_change_on_resume."""
    from training.config_diff import config_changes

    none = {"data_path": "a.jsonl", "lora": {"r": 4}, "quantization": {"load_in_4bit": True}, "fp16": {"enabled": True}}
    same = [{"seed": 42}, {"decay_norm_and_bias": False}, {"group_by_length": False}, {"max_steps": None},
            {"dataloader_drop_last": True}, {"lora": {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"}},
            {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}},
            {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}},
            {"fp16": {"enabled": True, "fused_optimizer": True}},  # gdGPT's, dropped (compat.DROPPED)
            # DeepSpeed's own defaults and spellings, as its config models read them; immediate_grad_update the trainer's
            {"bf16": {"enabled": True, "check_grad_overflow": True}, "fp16": None},
            {"bf16": {"enabled": True, "immediate_grad_update": True}, "fp16": None},
            {"zero_optimization": {"stage": 1, "reduce_bucket_size": 500000000, "stage3_prefetch_bucket_size": 5e7}},
            {"scheduler": {"type": "StepLR", "params": {"step_size": 10, "gamma": 0.1}}}]  # torch's default gamma
    zero = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8, "prefetch_bucket_size": 50000000}}
    bf16 = {"bf16": {"enabled": True}, "fp16": None}
    step_lr = {"scheduler": {"type": "StepLR", "params": {"step_size": 10}}}
    for over in same:
        base = {**none, **({"zero_optimization": {"stage": 1}} if "zero_optimization" in over else {}),
                **(bf16 if "bf16" in over else {}), **(step_lr if "scheduler" in over else {})}
        assert config_changes(base, {**base, **over}) == [] and config_changes({**base, **over}, base) == [], over
    assert config_changes({**none, **zero}, {**none, "zero_optimization": {"stage": 1}}) == []
    # a deprecated key is the key that replaced it; an offload to "none" is none
    one = {**none, "zero_optimization": {"stage": 1}}
    for a, b in (({"cpu_offload": False}, {}), ({"cpu_offload": True}, {"offload_optimizer": {"device": "cpu"}}),
                 ({"offload_optimizer": {"device": "none"}}, {})):
        assert config_changes({**none, "zero_optimization": {"stage": 1, **a}}, {**none, "zero_optimization": {
            "stage": 1, **b}}) == [], (a, b)
    # a ZeRO-3 key DeepSpeed removed since (MiCS) did nothing and is no change; a section this DeepSpeed cannot read
    # is compared as written on both sides: one line (not every default of the other side)
    assert config_changes({**none, "zero_optimization": {"stage": 1, "mics_shard_size": -1}}, one) == []
    old = config_changes({**none, "zero_optimization": {"stage": 1, "reduce_bucket_size": "lots"}}, one)
    assert [c.key for c in old] == ["zero_optimization.reduce_bucket_size"]
    # an older run's "enabled" that DeepSpeed read as false ("auto", "false") was no half precision
    fp32 = {k: v for k, v in none.items() if k != "fp16"}
    for was in ("auto", "false"):
        assert config_changes({**fp32, "fp16": {"enabled": was}}, fp32) == [], was
    changed = {"seed": 7, "lora": {"r": 4, "alpha": 8}, "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
               "fp16": {"enabled": True, "loss_scale_window": 500}, "dataloader_drop_last": False}
    assert [(c.key, c.old, c.new) for c in config_changes(none, {**none, **changed})] == [
        ("dataloader_drop_last", True, False), ("fp16.loss_scale_window", 1000, 500), ("lora.alpha", 4, 8),
        ("quantization.bnb_4bit_quant_type", "nf4", "fp4"), ("seed", 42, 7)]
    gdgpt = {"data_path": "a.jsonl", "use_flash_attn": False}  # a Llama: sdpa
    assert config_changes(gdgpt, {"data_path": "a.jsonl", "attn_implementation": "sdpa"}) == []
    assert [(c.key, c.old, c.new) for c in config_changes(gdgpt, {"data_path": "a.jsonl"})] == [
        ("attn_implementation", "sdpa", "auto")]


def test_resume_compares_lora_target_modules_as_the_names_they_resolve_to(tmp_path):
    """README: target_modules are compared as sets; "all-linear" is the family's linear modules, so it and the same
    names written out resume either way (the comparison of the resolved names, with the checkpoint's
    lora_config.json); another set of names is refused, naming the key."""
    from types import SimpleNamespace

    from models import get_family
    from models.lora import lora_info, parse_lora
    from training.checkpoint import STATE_FILE
    from training.config_diff import config_changes
    from training.resume import RUN_CONFIG_FILE, resume_problem

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = {"data_path": "a.jsonl", "lora": {"r": 4, "alpha": 8}}
    def lora_raw(targets):
        return {**base, "lora": {**base["lora"], "target_modules": targets}}
    for old, new in ((names, "all-linear"), ("all-linear", names), (names, names[::-1])):
        assert config_changes(lora_raw(old), lora_raw(new), lora_run=True) == [], (old, new)

    llama = get_family("llama")
    def resumed(old, new):
        """resume_problem of a LoRA checkpoint trained with target_modules `old`, resumed with `new`."""
        save = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        tag = save / "global_step2"
        tag.mkdir(parents=True)
        (save / "latest").write_text("global_step2")
        (tag / STATE_FILE).write_text(json.dumps({"step": 2}))
        (tag / RUN_CONFIG_FILE).write_text(json.dumps(lora_raw(old)))
        (tag / "lora_config.json").write_text(lora_info(parse_lora(lora_raw(old)["lora"], llama), str(tmp_path)))
        raw = lora_raw(new)
        cfg = SimpleNamespace(resume="auto", save_path=str(save), lora=raw["lora"], quantization=None,
                              model_path=str(tmp_path), raw=raw, ds_config={}, allow_data_change_on_resume=False,
                              keep_best=None, early_stopping_patience=None)
        return resume_problem(cfg, parse_lora(raw["lora"], llama))

    assert resumed(names, "all-linear") is None and resumed("all-linear", names) is None
    assert resumed(names, names[::-1]) is None
    for old, new in (("all-linear", ["q_proj", "v_proj"]), (names, ["q_proj", "v_proj"]), (["q_proj"], "all-linear")):
        problem = resumed(old, new)
        assert problem is not None and problem.startswith("lora.target_modules is "), (old, new, problem)


def test_resume_says_a_section_set_to_null_or_from_null_in_one_line():
    """A section removed (null, or a key whose default is null left out) or added where there was null is one change
    of the key, old and new values shown whole; was a line "(unset) -> null" plus one per key of the section."""
    from training.config_diff import config_changes, refusals

    base = {"data_path": "a.jsonl"}
    sched = {"type": "cosine", "warmup_steps": 2}
    for gone in ({**base, "lr_schedule": None}, base):
        changes = config_changes({**base, "lr_schedule": sched}, gone)
        assert [(c.key, c.old, c.new, c.kind) for c in changes] == [("lr_schedule", sched, None, "applied")], changes
        assert changes[0].line().startswith('lr_schedule: {"type": "cosine", "warmup_steps": 2} -> null (applied: ')
        back = config_changes(gone, {**base, "lr_schedule": sched})
        assert [(c.key, c.old, c.new, c.kind) for c in back] == [("lr_schedule", None, sched, "applied")], back
    # {} is a schedule (cosine to 0), not none
    assert [(c.key, c.old, c.new) for c in config_changes({**base, "lr_schedule": {}}, base)] == [
        ("lr_schedule", {}, None)]
    # other sections: one line, the kind of its most restrictive key
    warmup = {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 20}}
    opt = {"type": "AdamW", "params": {"lr": 1e-4}}
    for key, section, kind in (("scheduler", warmup, "applied"), ("optimizer", opt, "fixed"),
                               ("lora", {"r": 4}, "fixed"), ("quantization", {"load_in_4bit": True}, "fixed")):
        for old, new in (({**base, key: section}, {**base, key: None}), ({**base, key: None}, {**base, key: section})):
            changes = config_changes(old, new)
            assert [(c.key, c.kind) for c in changes] == [(key, kind)], (key, changes)
            assert (changes[0].old is None) == (old[key] is None) and (changes[0].new is None) == (new[key] is None)
    assert [c.key for c in refusals(config_changes({**base, "optimizer": opt}, {**base, "optimizer": None}),
                                    False)] == ["optimizer"]
    # a section left out where the key has no default still says each of its keys
    assert [c.key for c in config_changes({**base, "scheduler": warmup}, base)] == [
        "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps", "scheduler.type"]


def test_a_torch_schedulers_settings_are_refused_on_resume_where_its_saved_state_would_override_them():
    """torch's scheduler state_dict holds its constructor's params and base lrs, and DeepSpeed loads it over the one
    the config built: a new gamma or optimizer lr would be said "applied" and not take effect. DeepSpeed's own
    schedulers (state: the step) take them; another type starts afresh (applied)."""
    from training.config_diff import config_changes, refusals

    def kinds(old: dict, new: dict, lr: float = 1e-3) -> dict[str, str]:
        opt = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
        changes = config_changes({**opt, "scheduler": old}, {"optimizer": {"type": "AdamW", "params": {"lr": lr}},
                                                             "scheduler": new})
        return {c.key: c.kind for c in refusals(changes, False)} or {c.key: c.kind for c in changes}

    exp = {"type": "ExponentialLR", "params": {"gamma": 0.5}}
    assert kinds(exp, {**exp, "params": {"gamma": 0.9}}) == {"scheduler.params.gamma": "fixed"}
    assert kinds(exp, exp, lr=2e-3) == {"optimizer.params.lr": "fixed"}
    assert "restores its parameters and lrs from the checkpoint" in config_changes(
        {"scheduler": exp}, {"scheduler": {**exp, "params": {"gamma": 0.9}}})[0].note
    warmup = {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}
    assert kinds(warmup, {**warmup, "params": {"warmup_max_lr": 2e-3}}) == {"scheduler.params.warmup_max_lr": "applied"}
    assert set(kinds(exp, warmup).values()) == {"applied"}


def test_a_restarted_job_takes_its_own_lock_over_and_only_rank_0_judges_it(tmp_path, ops_model, monkeypatch):
    """A lock left by an earlier start of the same SLURM job (SIGKILL after the grace period, then requeue) is stale
    at once, from any host; a rank other than 0 does not judge another host's lock (rank 0 does, for every rank)."""
    save = tmp_path / "out"
    save.mkdir()
    (save / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "started": 0, "job": "SLURM job 41",
                                              "restart": 0}))
    cfg = ops_config(tmp_path, ops_model)
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"is in use by another run \(host node7"):
        load_config(cfg, world_size=None)
    assert "is in use by another run (host node7" in load_config(cfg, world_size=2).refusal  # for _take_lock to say
    monkeypatch.setenv("RANK", "1")
    assert load_config(cfg, world_size=2).refusal is None  # no verdict of its own: _take_lock gives rank 0's
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert "is in use by another run" in load_config(cfg, world_size=2).refusal  # the job's first start is this one
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert load_config(cfg, world_size=2).refusal is None
    # a "resume": false run restarted by its job resumes, and its stop line still says how a new job resumes it
    (save / ".run-job.json").write_text(json.dumps({"job": "SLURM job 41", "restart": 0}))
    fresh = load_config(ops_config(tmp_path, ops_model, resume=False, overwrite_save_path=True), world_size=2)
    assert fresh.resume == "auto" and 'to resume, set "resume": "auto"' in resume_hint(fresh)
    lock = RunLock(save)
    assert "it was taken by SLURM job 41, start 1 of it (this is start 2)" in lock.acquire()
    assert json.loads((save / LOCK_FILE).read_text())["restart"] == 1
    lock.release()


def test_a_restart_whose_count_did_not_move_resumes_and_an_unknown_torchrun_start_is_refused(tmp_path, ops_model,
                                                                                              monkeypatch):
    """torchrun --max-restarts inside a SLURM job keeps SLURM's restart count; multi-node torchrun counts per node
    (the node that did not fail keeps 0, and rank 0 may land on either). A "resume": false run restarted so must
    resume, not delete itself: the same SLURM job is enough with any count, a torchrun worker is a restart when the
    agent that started it started one of the run's first ranks. The same torchrun run id from another agent with an
    unmoved count (a new torchrun command reusing --rdzv-id, a scheduler that restarted the agent, a .run-job.json
    of an older version) is refused with how to choose, not guessed. Only rank 0 judges; a refusal it alone can
    judge goes to every rank through RunDirectory._take_lock when there are several (the others would otherwise
    wait for it in the process group), raised at once when it is alone. A refused resume of a restart says why this
    start resumed. A lock of the same job whose count has not moved may be a live run: it stays in use."""
    save = tmp_path / "out"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the run started fresh by the job
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    mine, other = launcher_token(), "node9:4242:77"
    assert mine and mine.startswith(f"{socket.gethostname()}:{os.getppid()}:")
    torchrun = {"TORCHELASTIC_RUN_ID": "r7", "TORCHELASTIC_RESTART_COUNT": "0"}
    unknown = r"holds a run that torchrun run r7 started .* by another torchrun agent .* delete .*\.run-job\.json to start over"
    for env, recorded, verdict in (
            ({"SLURM_JOB_ID": "41", "TORCHELASTIC_RUN_ID": "41", "TORCHELASTIC_RESTART_COUNT": "1"},
             {"job": "SLURM job 41", "restart": 0}, "restart"),  # torchrun's restart inside the SLURM job
            (torchrun, {"job": "torchrun run r7", "restart": 1, "launchers": [other, mine]}, "restart"),  # counted less
            (torchrun, {"job": "torchrun run r7", "restart": 0, "launchers": [other]}, "unknown"),  # --rdzv-id r7 again
            (torchrun, {"job": "torchrun run r7", "restart": 0}, "unknown"),  # an older version's note
            ({"SLURM_JOB_ID": "42"}, {"job": "SLURM job 41", "restart": 0}, "new")):  # another job: not its note
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        (save / ".run-job.json").write_text(json.dumps(recorded))
        replace = ops_config(tmp_path, ops_model, resume=False, overwrite_save_path=True)
        cfg = load_config(replace, world_size=2)
        assert (cfg.resume, cfg.overwrite_save_path) == (("auto", False) if verdict == "restart" else (False, True)), env
        said = any("it resumes that run" in n and f"delete {save / '.run-job.json'}" in n for n in cfg.notes)
        assert said == (verdict == "restart") and (cfg.refusal is None) == (verdict != "unknown"), (env, cfg.refusal)
        # a checkpoint found damaged while loading (RunDirectory._resume) says how to start over: for a restart,
        # "resume": false is what its config says already
        advice = f"delete {save / '.run-job.json'}" if verdict == "restart" else '"overwrite_save_path": true'
        assert advice in start_over(cfg), (env, start_over(cfg))
        if verdict == "unknown":
            assert re.search(unknown, cfg.refusal), cfg.refusal
            with pytest.raises(ConfigError, match=unknown):
                load_config(replace, world_size=None)
        if verdict == "restart":  # a resume the checkpoint refuses: the error says why this start resumed
            (save / "latest").write_text("global_step9")
            assert re.search(r"names 'global_step9', which does not exist.*\(this is a restart of .*to start over "
                             r"inside this same job, delete .*\.run-job\.json\)", load_config(replace, world_size=2).refusal)
            (save / "latest").unlink()
            with pytest.raises(ConfigError, match=r"'quantization' needs a 'lora' section"):  # as every rank does
                load_config(ops_config(tmp_path, ops_model, resume=False, quantization={"load_in_4bit": True}),
                            world_size=2)
            monkeypatch.setenv("RANK", "1")  # no verdict of its own
            cfg = load_config(ops_config(tmp_path, ops_model, resume=False), world_size=2)
            assert (cfg.resume, cfg.notes, cfg.refusal) == (False, [], None)
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("SLURM_JOB_ID", "43")
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r8")
            used = r"already holds a training run and 'resume' is false"
            assert re.search(used, load_config(ops_config(tmp_path, ops_model, resume=False), world_size=2).refusal)
            with pytest.raises(ConfigError, match=used):
                load_config(ops_config(tmp_path, ops_model, resume=False), world_size=None)
        for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    (save / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "started": 0, "job": "SLURM job 41",
                                              "restart": 0}))
    with pytest.raises(ConfigError, match=r"is in use by another run \(host node7"):
        load_config(ops_config(tmp_path, ops_model), world_size=None)


def test_a_run_whose_lock_another_run_took_over_stops_at_the_next_step(tmp_path, ops_model):
    """A run paused past the heartbeat's limit on another host loses its lock to the next run; it went on training
    and writing metrics.jsonl lines into that run's save_path until its next save (an hour with
    save_interval_minutes 60). Its heartbeat now sees the lock taken over: it stops at the step's end with one line,
    writing no metrics line more, no checkpoint, and leaving the other run's lock."""
    release, save = tmp_path / "release", tmp_path / "out"
    cfg = ops_config(tmp_path, ops_model, max_steps=6, save_interval=6,
                     model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}})
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)], num_procs=1,  # a heartbeat a second
                           env={"PIPEFT_FAULT_PAUSE": f"step:3:120:{release}", "PIPEFT_LOCK_STALE_S": "5"})
    wait_for(lambda: (save / "metrics.jsonl").is_file() and 3 in losses_of(save), proc)
    other = {"host": "node-b", "pid": 4242, "started": time.time(), "token": "the-next-run"}
    (save / LOCK_FILE).write_text(json.dumps(other))  # as the next run takes a stale lock over
    time.sleep(3)
    release.touch()
    _, out = finish_deepspeed(proc, expect=1)
    assert [m["step"] for m in metrics_of(save)] == [1, 2, 3], out[-3000:]
    said = errors_of(out)
    assert len(said) == 1 and re.search(rf"checkpoint global_step3 not saved in {save}: another run took the lock "
                                        rf"{save / LOCK_FILE} over \(host node-b, pid 4242.*this run stops", said[0]), said
    assert json.loads((save / LOCK_FILE).read_text()) == other and not list(save.glob("global_step*"))


def test_a_later_start_in_one_slurm_job_with_another_config_is_not_taken_for_a_restart(tmp_path, ops_model,
                                                                                         monkeypatch):
    """A sweep inside one allocation over one save_path ("resume": false, "overwrite_save_path": true) ran the next
    config as a restart of the first: it resumed that finished run, trained nothing and exited 0. A restart runs the
    config its job started with; with the restart count unmoved, another config's content (or this one edited) is
    refused with how to choose. The same content at another path is a restart; so is a worker torchrun restarted
    inside the job, and a requeue (count moved), with an edited config, as any resume may be."""
    save = tmp_path / "out"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    first = ops_config(tmp_path, ops_model, "a.json", resume=False, overwrite_save_path=True)
    record_job(save, [launcher_token()], config_identity(first, load_config(first, world_size=2).raw))
    original = first.read_bytes()
    assert load_config(first, world_size=2).resume == "auto"  # the same command again: a restart, it resumes
    other = ops_config(tmp_path, ops_model, "b.json", resume=False, overwrite_save_path=True,
                       optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}})
    edited = ops_config(tmp_path, ops_model, "a.json", resume=False, overwrite_save_path=True, max_steps=9)
    for path, said in ((other, f"the config {tmp_path / 'a.json'}"), (edited, "another version of this config")):
        cfg = load_config(path, world_size=2)
        assert (cfg.resume, cfg.overwrite_save_path) == (False, True) and said in cfg.refusal, cfg.refusal
        assert f"delete {save / JOB_FILE} to start over" in cfg.refusal
        with pytest.raises(ConfigError, match="a restart of the job runs the config it started with"):
            load_config(path, world_size=None)
    copy = tmp_path / "copy"  # the same content at another path (a script that copies it per step): a restart
    copy.mkdir()
    (copy / "a.json").write_bytes(original)
    assert load_config(copy / "a.json", world_size=2).resume == "auto"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "777")  # torchrun inside the job restarted this worker (SLURM's count
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # does not move): the same command, whatever its config now
    assert load_config(edited, world_size=2).resume == "auto"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: a restart, whatever its config now
    assert load_config(edited, world_size=2).resume == "auto"


def test_config_checks_of_the_run_directory(tmp_path, ops_model):
    with pytest.raises(ConfigError, match=r"save_path .* is model_path .*use another directory"):
        load_config(ops_config(tmp_path, ops_model, save_path=str(ops_model / "pp")), world_size=2)
    with pytest.raises(ConfigError, match=r"'overwrite_save_path' only applies with \"resume\": false"):
        load_config(ops_config(tmp_path, ops_model, overwrite_save_path=True), world_size=2)
    lock = RunLock(tmp_path / "out")
    lock.acquire()
    try:
        with pytest.raises(ConfigError, match=r"is in use by another run"):
            load_config(ops_config(tmp_path, ops_model), world_size=None)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ smaller things


def test_a_global_batch_changed_by_the_data_parallel_size_is_refused_before_the_model_is_built(tmp_path, ops_model,
                                                                                               ops_uninterrupted):
    """The batch keys as they were, twice the replicas: the global batch doubles (the data order would not be the
    checkpoint's). Refused with the config, not after the model and the engine are built; with the accumulation
    halved it is the same global batch, and allowed with allow_data_change_on_resume."""
    shutil.copytree(ops_uninterrupted, tmp_path / "out")
    dp2 = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}}
    with pytest.raises(ConfigError) as e:
        load_config(ops_config(tmp_path, ops_model, model_topo=dp2), world_size=2)
    assert str(e.value).startswith(f"{tmp_path / 'cfg.json'}: cannot resume {tmp_path / 'out' / 'global_step8'} exactly: "
                                   "the global batch changed (4 -> 8: 2 per micro-batch x 2 accumulation steps x 2 "
                                   "data-parallel replicas), so samples would be repeated or skipped;"), str(e.value)
    load_config(ops_config(tmp_path, ops_model, model_topo=dp2, gradient_accumulation_steps=1), world_size=2)
    load_config(ops_config(tmp_path, ops_model, model_topo=dp2, allow_data_change_on_resume=True), world_size=2)


def test_an_eval_set_with_nothing_left_stops_before_training(tmp_path, ops_model):
    long = " ".join(["pipeline stage layer token"] * 40)  # the answer lies beyond max_seq_len: dropped
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"instruct": long, "output": "yes"}) + "\n" for _ in range(3)))
    cfg = ops_config(tmp_path, ops_model, eval_data_path=str(tmp_path / "eval.jsonl"), eval_interval=2,
                     model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}})
    done = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert errors_of(done.stderr) == [
        f"train_ds.py: error: {cfg}: 'eval_data_path' {tmp_path / 'eval.jsonl'}: none of its 3 records is left for "
        "evaluation (3 dropped: no trained token within max_seq_len 64); fix the eval data or raise max_seq_len"]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_eval_losses_that_would_not_compare_stop_a_resume_even_when_data_changes_are_allowed(tmp_path, ops_model):
    """eval_split_ratio holds its eval samples out of the training data by position: other data (here the same
    records reordered) hold out other samples, some of them trained on. With keep_best / early stopping, whose eval
    losses compare across the resume, that is refused even with allow_data_change_on_resume; so is a new ratio."""
    from training.config_diff import config_changes, refusals

    base = {"data_path": "a.jsonl", "eval_split_ratio": 0.2}
    ratio = config_changes(base, {**base, "eval_split_ratio": 0.3})
    assert [c.key for c in refusals(ratio, True, compares_evals=True)] == ["eval_split_ratio"]
    assert refusals(ratio, True, compares_evals=False) == []

    one = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}}
    common = dict(model_topo=one, max_steps=4, eval_split_ratio=0.2, eval_interval=2, keep_best=1, save_interval=2)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    train = lambda cfg: subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, env=env, timeout=600)
    done = train(ops_config(tmp_path, ops_model, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    other = tmp_path / "reordered.jsonl"
    other.write_text("".join(reversed((ops_model / "train.jsonl").read_text().splitlines(keepends=True))))
    done = train(ops_config(tmp_path, ops_model, **{**common, "max_steps": 6}, data_path=str(other),
                            allow_data_change_on_resume=True))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert errors_of(done.stderr) == [
        f"train_ds.py: error: {tmp_path / 'cfg.json'}: cannot resume {tmp_path / 'out' / 'global_step4'}: the training "
        "samples differ from the checkpoint's, and the eval samples eval_split_ratio holds out are taken from the same "
        "data, so they differ too (some may have been trained on): keep_best / early_stopping_patience would compare "
        "eval losses of other eval sets; start a new run or resume with the same data (data keys changed since it: "
        "data_path)"]
    assert "Using topology" not in done.stdout + done.stderr  # before the model is built


def test_tiny_tokenizer_keeps_an_existing_directory(tmp_path, capsys):
    from data.tiny_tokenizer import main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["--save-path", str(tmp_path / "tok")])
    assert e.value.code == 2 and "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == "{}"


def test_inspect_stats_with_split_long_pretrain(tmp_path, ops_model, capsys):
    from data.inspect import main

    cfg = ops_config(tmp_path, ops_model, data_path=str(ROOT / "data" / "samples"), max_seq_len=32, packing=True,
                     split_long_pretrain=True)
    assert main(["--config", str(cfg), "--stats", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["length_percentiles"]["p100"] > 32  # pretrain text kept whole: packing cuts it into chunks
    assert 0 < st["unpacked_efficiency"] <= 1 and 0 < st["unpacked_fill"] <= 1 and 0 < st["packing_efficiency"] <= 1
    assert main(["--config", str(cfg), "--stats"]) == 0
    assert "(after truncation to 32; pretrain text kept whole, cut into chunks of that size by packing)" in \
        capsys.readouterr().out
