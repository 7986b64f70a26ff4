"""Restarts told apart from new starts, without a launcher: torchrun without --rdzv-id (its job is its agent), a
run lock whose pid now belongs to another process, and a checkpoint that `latest` does not name yet."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import training.runlock as runlock
from tests.helpers import ops_config
from training.checkpoint import Checkpoints, RunState, atomic_write_text, write_manifest
from training.config import ConfigError, load_config
from training.resume import name_resumed, resume_tag
from training.runlock import JOB_FILE, LOCK_FILE, LockError, RunLock, boot_id, pid_namespace, record_job, start_time

JOB_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
            "GROUP_WORLD_SIZE", "TORCHELASTIC_MAX_RESTARTS")


def test_torchrun_without_rdzv_id_is_the_job_of_its_agent(tmp_path, ops_model, monkeypatch):
    """torchrun's default run id 'none' (no --rdzv-id): the agent that started rank 0 names the job, so its
    --max-restarts restart (same agent, count moved) resumes a "resume": false run and takes the dead start's lock
    over, while a new torchrun command (another agent) starts over. On several nodes (an agent each) a restart cannot
    always be told with --max-restarts: "resume": false is refused, saying to pass --rdzv-id."""
    monkeypatch.setattr(runlock, "launcher_token", lambda: "node1:4242:77")  # the agent (pytest's parent may be pid 0)
    launcher_token = runlock.launcher_token
    for var in JOB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    save, agent = tmp_path / "out", f"torchrun agent {launcher_token()}"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    record_job(save, [launcher_token()])  # the first start, "resume": false
    assert json.loads((save / JOB_FILE).read_text())["job"] == agent
    (save / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "started": 0, "job": agent, "restart": 0}))
    replace = ops_config(tmp_path, ops_model, resume=False, overwrite_save_path=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    cfg = load_config(replace, world_size=2)
    assert (cfg.resume, cfg.overwrite_save_path, cfg.refusal) == ("auto", False, None)
    assert any(f"this is a restart of {agent}, start 1 of it (this is start 2)" in n for n in cfg.notes), cfg.notes
    lock = RunLock(save)
    assert f"it was taken by {agent}, start 1 of it" in lock.acquire()
    lock.release()
    (save / JOB_FILE).write_text(json.dumps({"job": "torchrun agent node9:4242:77", "restart": 0,
                                             "launchers": ["node9:4242:77"]}))
    cfg = load_config(replace, world_size=2)  # another torchrun command: starts over, as "resume": false says
    assert (cfg.resume, cfg.overwrite_save_path, cfg.refusal) == (False, True, None)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert load_config(replace, world_size=2).refusal is None  # torchrun's default --max-restarts 0: no restart
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    unknown = r"torchrun started this run on 2 nodes without --rdzv-id .*pass --rdzv-id"
    assert re.search(unknown, load_config(replace, world_size=2).refusal)
    with pytest.raises(ConfigError, match=unknown):
        load_config(replace, world_size=None)
    assert load_config(ops_config(tmp_path, ops_model), world_size=2).refusal is None  # "resume": "auto" goes on


def test_a_lock_whose_pid_is_another_process_now_is_taken_over(tmp_path, monkeypatch):
    """A dead run's lock naming a pid that now runs another process (same pid namespace: another start time) or this
    very process, or written before the host restarted (boot id), is taken over at once. A holder in another pid
    namespace (a container sharing the hostname) is judged by its heartbeat: its pid means nothing here. A live
    holder's refusal names the lock file; a lock without those fields (an older version) is judged by its pid.
    Another boot id on a lock touched since this boot is another machine with this hostname (containers given one
    --hostname): judged by its heartbeat, which is read by the filesystem's clock, not this host's."""
    f, host = tmp_path / LOCK_FILE, socket.gethostname()
    child = subprocess.Popen(["sleep", "60"])  # a live process that is not the holder
    live, here = child.pid, dict(boot_id=boot_id(), pid_ns=pid_namespace())
    booted = time.time() - float(Path("/proc/uptime").read_text().split()[0])

    def held_by(touched: float | None = None, **info) -> str | None:
        f.write_text(json.dumps({"host": host, "started": 0, "config": "a.json", "token": "dead", **info}))
        if touched is not None:
            os.utime(f, (touched, touched))
        lock = RunLock(tmp_path)
        try:
            return lock.acquire()
        finally:
            lock.release()

    try:
        assert "this process now" in held_by(pid=os.getpid(), **here)  # the new rank 0 got the dead one's pid
        assert "is another process now" in held_by(pid=live, pid_start="1", **here)
        assert "has restarted since" in held_by(booted - 60, pid=live, pid_start=start_time(live),
                                                boot_id="an-earlier-boot")
        with pytest.raises(LockError):  # the same hostname on another machine, its heartbeat fresh
            held_by(pid=1, pid_start="1", boot_id="another-machine", pid_ns=pid_namespace())
        with monkeypatch.context() as m, pytest.raises(LockError):  # when this host booted, unknown: the heartbeat
            m.setattr(runlock, "uptime", lambda: None)
            held_by(pid=1, pid_start="1", boot_id="another-machine", pid_ns=pid_namespace())
        with monkeypatch.context() as m:  # this host's clock 6 minutes fast: the heartbeat is still fresh
            m.setattr(time, "time", lambda real=time.time: real() + 360)
            with pytest.raises(LockError):
                held_by(pid=1, pid_start="1", boot_id="another-machine", pid_ns=pid_namespace(), host="node-a")
        for same in (dict(pid_start=start_time(live), **here), {},  # the holder itself; an old lock
                     dict(pid_start="1", boot_id=boot_id(), pid_ns="pid:[1]")):  # another namespace, fresh heartbeat
            with pytest.raises(LockError, match=rf"pid {live}, .*; lock file {f}\)"):
                held_by(pid=live, **same)
        with pytest.raises(LockError):
            held_by(pid=os.getpid(), boot_id=boot_id(), pid_ns="pid:[1]")  # our pid, but in another namespace
    finally:
        child.kill()
        child.wait()
    f.unlink()
    lock = RunLock(tmp_path)
    lock.acquire()
    info = json.loads(f.read_text())
    assert (info["pid_start"], info["boot_id"], info["pid_ns"]) == (start_time(os.getpid()), boot_id(), pid_namespace())
    with pytest.raises(LockError, match=rf"pid {os.getpid()}, "):  # a lock this process holds is no stale one
        RunLock(tmp_path).acquire()
    lock.release()


def _tag(save: Path, step: int, evals: list, when: float, manifest: bool = True) -> None:
    """A checkpoint tag as Checkpoints.save leaves it, its manifest written at time `when`."""
    d = save / f"global_step{step}"
    d.mkdir(parents=True)
    (d / "layer_00-model_states.pt").write_bytes(b"x" * 100)
    RunState(step=step, pipe=2, data=1, parts=[0, 3, 6], global_batch=4, evals=evals).write(d)
    if manifest:
        write_manifest(d)
        os.utime(d / "manifest.json", (when, when))


def test_a_checkpoint_that_latest_does_not_name_yet_is_resumed(tmp_path):
    """No `latest` (killed between the first tag's rename and `latest`'s write, or deleted): the newest complete tag
    is resumed with a line saying so, and rank 0 names it in `latest` with `best` and keep_last rotation as after
    its save. A damaged newer tag or one without a manifest is passed over. With a `latest`, its choice stands, also
    over a newer complete tag (mtimes cannot tell a kill before `latest`'s write from a `latest` pointed back)."""
    save = tmp_path / "out"
    evals = [(2, 5.0), (3, 1.0)]
    _tag(save, 2, evals[:1], 1000)
    _tag(save, 3, evals, 1010)
    _tag(save, 6, [*evals, (6, 2.0)], 1020)
    _tag(save, 7, [], 1030, manifest=False)  # an older version's tag: no manifest to tell it complete
    atomic_write_text(save / "latest", "global_step3")
    os.utime(save / "latest", (1000, 1000))  # written "before" global_step6 by the clock: followed all the same
    assert resume_tag(save) == ("global_step3", [])
    (save / "latest").unlink()
    tag, notes = resume_tag(save)
    assert tag == "global_step6" and notes == [f"resuming from {save / 'global_step6'}, the newest complete checkpoint: "
                                               f"{save / 'latest'} is missing (deleted, or the run was stopped before "
                                               "it named its first checkpoint)"]
    layer = save / "global_step6" / "layer_00-model_states.pt"
    layer.write_bytes(b"x" * 50)  # damaged: not complete
    assert resume_tag(save)[0] == "global_step3"
    layer.write_bytes(b"x" * 100)
    shutil.rmtree(save / "global_step7")
    atomic_write_text(save / "latest", "global_step9")  # a tag that is not there: nothing left to delete
    assert resume_tag(save) == ("global_step6", [f"{save / 'latest'} names 'global_step9', which does not exist",
                                                 f"resuming from the previous intact checkpoint {save / 'global_step6'} "
                                                 "instead"])
    for named in ("", ".."):  # save_path itself, its parent: neither is a checkpoint to offer for deletion
        atomic_write_text(save / "latest", named)
        assert resume_tag(save) == ("global_step6", [f"{save / 'latest'} names {named!r}, which is not a checkpoint "
                                                     f"(global_stepN)", "resuming from the previous intact checkpoint "
                                                     f"{save / 'global_step6'} instead"])
    atomic_write_text(save / "latest", "global_step6")
    layer.write_bytes(b"x" * 50)
    assert resume_tag(save)[1][1].endswith(f"({save / 'global_step6'} is left in place; delete it once you no longer "
                                           "need it)")
    layer.write_bytes(b"x" * 100)
    (save / "latest").unlink()

    ckpts = Checkpoints(save, rank=0, keep_last=1, keep_best=1)
    state = RunState.read(save / "global_step6")
    assert name_resumed(ckpts, state) == f"{save / 'latest'} now names global_step6, the checkpoint resumed"
    assert (save / "latest").read_text() == "global_step6" and (save / "best").read_text() == "global_step3"
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step3", "global_step6"]
    assert name_resumed(ckpts, state) is None  # `latest` names it already


def test_a_save_path_without_latest_is_checked_as_its_newest_complete_checkpoint(tmp_path, ops_model):
    """With `latest` deleted, "resume": true finds the complete checkpoint, and the start-time checks judge it (a
    LoRA config for a full checkpoint is refused before training, not after the model is built)."""
    _tag(tmp_path / "out", 3, [], 1000)
    assert load_config(ops_config(tmp_path, ops_model, resume=True), world_size=2).resume is True
    lora = ops_config(tmp_path, ops_model, lora={"r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="global_step3 is a full checkpoint but the config has a 'lora' section"):
        load_config(lora, world_size=2)
