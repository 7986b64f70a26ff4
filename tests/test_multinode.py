"""Several nodes, simulated on this machine: two `deepspeed --hostfile H --no_ssh --node_rank K` launchers; a
node-local save_path or node-local data made by a private mount namespace for one of them (`unshare -m` and a
bind mount, which needs root); `srun`'s environment; torchrun with time-based checkpoints.

Training is compared with the single-node run of the same topology (the `ops_uninterrupted` fixture: 2 stages,
8 steps, checkpoints at 3, 6 and 8): losses and final tensors bit-identical."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import finish_deepspeed, free_port, ops_config, start_deepspeed, workers_of
from tests.test_train_ops import checkpoint_tensors, losses_of, wait_for

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def start_nodes(tmp_path: Path, cfg: Path, env: dict | None = None, private: tuple[Path, Path] | None = None) -> list:
    """Two launchers, one per simulated node (`node-a`, `node-b`, one process each). `private` = (dir, over):
    node-b sees `dir` mounted over `over` (a private mount namespace), as a node-local disk would be."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = []
    for rank in (0, 1):
        launcher = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1"]
        prefix = None
        if rank == 1 and private is not None:
            if shutil.which("unshare") is None:
                pytest.skip("unshare is not installed")
            prefix = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
                      str(private[0]), str(private[1])]
        procs.append(start_deepspeed("train_ds.py", ["--config", str(cfg)], env=env, launcher_args=launcher, port=port,
                                     prefix=prefix))
    return procs


def finish_nodes(procs: list, expect: int | None = 0) -> str:
    return "".join(finish_deepspeed(p, expect=expect)[1] for p in procs)


def test_two_nodes_train_preempt_and_resume_like_one(tmp_path, ops_model, ops_uninterrupted):
    cfg = ops_config(tmp_path, ops_model, save_interval=3)
    save = tmp_path / "out"
    procs = start_nodes(tmp_path, cfg, env={"PIPEFT_FAULT_PAUSE": "step:6:60"})
    wait_for(lambda: (save / "metrics.jsonl").is_file() and 6 in losses_of(save), procs[0])
    for p in procs:  # a scheduler preempting the job signals every training process on every node
        for w in workers_of(p):
            w.send_signal(signal.SIGTERM)
    out = finish_nodes(procs)
    assert "received SIGTERM: saving at step 6 and exiting" in out and (save / "latest").read_text() == "global_step6"
    out = finish_nodes(start_nodes(tmp_path, cfg))
    assert f"resumed from {save / 'global_step6'} at step 6" in out
    assert losses_of(save) == losses_of(ops_uninterrupted)
    a, b = checkpoint_tensors(ops_uninterrupted / "global_step8"), checkpoint_tensors(save / "global_step8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_node_lost_mid_run_is_one_line_on_the_other(tmp_path, ops_model):
    """node-b's process killed after step 2 (out of memory, a node lost): node-a's ends with one line naming what
    happened and how to go on, not gloo's traceback."""
    cfg = ops_config(tmp_path, ops_model)
    save = tmp_path / "out"
    procs = start_nodes(tmp_path, cfg, env={"PIPEFT_FAULT_PAUSE": "step:2:8"})
    wait_for(lambda: (save / "metrics.jsonl").is_file() and 2 in losses_of(save), procs[0])
    for w in workers_of(procs[1]):
        w.send_signal(signal.SIGKILL)
    out = finish_deepspeed(procs[0], expect=1)[1]
    finish_deepspeed(procs[1], expect=None)
    said = [line for line in out.splitlines() if line.startswith("train_ds.py: error:")]
    assert len(said) == 1 and "Traceback" not in out, out[-4000:]
    assert re.fullmatch(r"train_ds.py: error: rank 0: another process of this run has ended \(killed, out of memory, "
                        r"its node lost, or an error there: see its log\): Connection closed by peer \S+; the run resumes "
                        r"from its last checkpoint \(an error in that log is fixed first\): resume with the same command",
                        said[0]), said[0]


def test_a_node_local_save_path_is_refused(tmp_path, ops_model):
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    cfg = ops_config(tmp_path, ops_model, save_path=str(shared / "out"))
    out = finish_nodes(start_nodes(tmp_path, cfg, private=(private, shared)), expect=2)
    said = [line for line in out.splitlines() if line.startswith("train_ds.py: error:")]
    assert said and all(line == said[0] for line in said), out[-4000:]
    assert f"save_path {shared / 'out'} is not one directory that every node shares: rank 1 (host " in said[0]
    assert "put save_path on a filesystem every node mounts at the same path" in said[0]
    assert not (tmp_path / "out").exists() and not list((shared / "out").glob("global_step*"))


def test_different_data_on_two_nodes_is_refused(tmp_path, ops_model):
    """Node-local copies of the data that differ: the training rows, and the eval samples (each replica evaluated its
    share of its own node's: the eval loss mixed two eval sets unsaid, or the evaluation hung)."""
    data, other = tmp_path / "data", tmp_path / "other"
    data.mkdir()
    other.mkdir()
    shutil.copy(ops_model / "train.jsonl", data / "train.jsonl")
    lines = (ops_model / "train.jsonl").read_text().splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(lines[1:] + lines[:1]))  # the same records in another order
    (data / "eval.jsonl").write_text("".join(lines[:4]))
    (other / "eval.jsonl").write_text("".join(lines[4:8]))
    cfg = ops_config(tmp_path, ops_model, data_path=str(data / "train.jsonl"), eval_data_path=str(data / "eval.jsonl"))
    out = finish_nodes(start_nodes(tmp_path, cfg, private=(other, data)), expect=2)
    said = [line for line in out.splitlines() if line.startswith("train_ds.py: error:")]
    assert said and "the training data and the eval data differ between processes: rank 1 (host " in said[0], out[-4000:]
    assert not list((tmp_path / "out").glob("global_step*"))


def test_srun_environment_starts_one_run_of_two_processes(tmp_path, ops_model, ops_uninterrupted):
    """What `srun --ntasks 2 python train_ds.py` gives each task: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
    the step's node list; no RANK. The two processes form one 2-stage run, not two 1-process runs. The run started
    fresh ("resume": false); a requeue of its job resumes it on every rank, also when a rank lacks SLURM_JOB_ID (as
    ranks pdsh starts inside an allocation do): rank 0 judges the restart, the others follow."""
    cfg = ops_config(tmp_path, ops_model, save_interval=3, resume=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2")

    def srun(job: list[dict]) -> list[str]:
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**env, **job[r], "MASTER_PORT": port, "SLURM_PROCID": str(r),
                                       "SLURM_LOCALID": str(r)}) for r in (0, 1)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        return outs

    job = {"SLURM_JOB_ID": "4242"}
    outs = srun([job, job])
    assert "topology: 2 pipeline stages x 1 data-parallel replicas (2 processes)" in outs[0]
    assert losses_of(tmp_path / "out") == losses_of(ops_uninterrupted)
    outs = srun([{**job, "SLURM_RESTART_COUNT": "1"}, {}])
    assert "this is a restart of SLURM job 4242, start 1 of it (this is start 2)" in outs[0]
    assert "nothing to do: this run finished at step 8" in outs[0]  # resumed (the run had ended), not started over
    assert losses_of(tmp_path / "out") == losses_of(ops_uninterrupted)


def test_torchrun_with_time_based_checkpoints(tmp_path, ops_model, ops_uninterrupted):
    """torchrun starts the same 2-stage run; save_interval_minutes checkpoints at the first step boundary after the
    interval, on every rank at the same step (a pause after step 3 lets the interval pass there). The run starts
    fresh ("resume": false) under a named --rdzv-id: .run-job.json names the run and, as what started its ranks,
    the torchrun process itself (its agent restarts the workers as its children: a restart, not a new command)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cfg = ops_config(tmp_path, ops_model, save_interval_minutes=0.02, resume=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIPEFT_FAULT_PAUSE="step:3:3")
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "--rdzv-id", "r1",
                             "train_ds.py", "--config", str(cfg)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    save = tmp_path / "out"
    job = json.loads((save / ".run-job.json").read_text())
    assert job["job"] == "torchrun run r1" and [t.split(":")[:2] for t in job["launchers"]] == [[socket.gethostname(),
                                                                                                 str(proc.pid)]]
    assert losses_of(save) == losses_of(ops_uninterrupted)
    tags = sorted(int(p.name.removeprefix("global_step")) for p in save.glob("global_step*"))
    assert 3 in tags and tags[-1] == 8, tags  # 1.2 s had passed by the end of the paused step 3
    assert (save / "global_step3" / "manifest.json").is_file() and len(list((save / "global_step3").glob("rng_*"))) == 2


def test_torchrun_restarts_a_fresh_run_and_it_resumes(tmp_path, ops_model, ops_uninterrupted):
    """torchrun --max-restarts 1 without --rdzv-id (torch's default run id 'none', as the README's example): a
    "resume": false run that replaces an earlier one ("overwrite_save_path") loses both ranks to SIGKILL after step 4
    (checkpoint at 3); torchrun starts them again and the new ranks recognise a restart of their run (.run-job.json:
    the job is the same agent, and its count moved), so they resume from step 3 instead of deleting the run and
    starting over: the losses are those of one run. (A named --rdzv-id: test_torchrun_with_time_based_checkpoints
    and the unit tests of tests/test_run_dir.py.)"""
    import psutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    save, release = tmp_path / "out", tmp_path / "release"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the run it replaces
    cfg = ops_config(tmp_path, ops_model, save_interval=3, resume=False, overwrite_save_path=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIPEFT_FAULT_PAUSE=f"step:4:300:{release}")
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                                 "--max-restarts", "1", "train_ds.py", "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: (save / "global_step3").is_dir() and 4 in losses_of(save), proc)
            workers = [k for k in psutil.Process(proc.pid).children(recursive=True) if "train_ds.py" in k.cmdline()]
            assert len(workers) == 2
            release.touch()  # the restarted ranks do not pause
            for w in workers:
                w.kill()
            proc.wait(timeout=600)
        finally:
            proc.kill()
    out = (tmp_path / "torchrun.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    agent = f"torchrun agent {socket.gethostname()}:{proc.pid}:"
    assert re.search(rf"this is a restart of {agent}\d+, start 1 of it \(this is start 2\)", out), out[-3000:]
    assert f"resumed from {save / 'global_step3'} at step 3" in out
    assert losses_of(save) == losses_of(ops_uninterrupted)


def test_a_missing_node_ends_the_wait_in_one_line_and_sigterm_ends_it_at_once(tmp_path, ops_model):
    """Rank 0 of 2 whose other node never starts: after dist_timeout_minutes one line naming the address and the
    likely cause (was DeepSpeed's DistStoreError traceback after 30 minutes); a SIGTERM while it waits ends it at once
    (its save-at-the-next-step handler, installed before the wait, kept it waiting out the timeout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID",)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1")

    def start(timeout_minutes: float) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cfg = ops_config(tmp_path, ops_model, f"cfg{port}.json", dist_timeout_minutes=timeout_minutes,
                         save_path=str(tmp_path / f"out{port}"))
        return subprocess.Popen([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**env, "MASTER_PORT": str(port)}), port

    proc, port = start(0.1)
    waiting, waiting_port = start(30)  # side by side: one process start, not two
    wait_for(lambda: _listening(waiting_port), waiting, timeout=240)  # rank 0 serves the rendezvous store: it waits
    waiting.send_signal(signal.SIGTERM)
    waiting.communicate(timeout=30)
    assert waiting.returncode == -signal.SIGTERM

    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"train_ds.py: error: rank 0: the 2 processes did not all join at 127.0.0.1:{port} within "
                           "dist_timeout_minutes 0.1 (did a process on another node fail to start? see its log; or MASTER_ADDR does not "
                           "resolve or cannot be reached from this node)"), err
    assert "Traceback" not in err


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
