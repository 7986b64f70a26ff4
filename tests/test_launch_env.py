"""The launch environment, as train_ds.py finds it: a busy MASTER_PORT, a process that sees only its own GPU or
none, srun's variables (the port, the master host, RANK exported by the batch script), a RANK without the
rest of a launcher's variables, mpirun: each one line before anything else starts."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ops_config, own_extensions_dir

ROOT = Path(__file__).resolve().parents[1]


def no_process_group(monkeypatch) -> None:
    """Hide the test session's process group (tests before may have made it): a user's process has none, and with one
    the run uses it and checks no port."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)


def test_a_busy_master_port_is_one_line(tmp_path, ops_model, monkeypatch, capsys):
    import train_ds

    no_process_group(monkeypatch)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(k, v)
        assert train_ds.main(["--config", str(ops_config(tmp_path, ops_model))]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train_ds.py: error: MASTER_PORT {port} is already in use on this machine (another run?); start deepspeed "
        "with --master_port set to a free port (make quickstart MASTER_PORT=<port>)"]


def test_a_process_that_sees_only_its_own_gpu_or_none_is_one_line(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU while LOCAL_RANK counts the node's tasks: DeepSpeed would ask
    for cuda:LOCAL_RANK, which does not exist (a CUDA traceback on every rank but the first); the trainer says it.
    No GPU at all (DS_ACCELERATOR=cuda on a CPU host): NCCL's or CUDA's traceback, now one line (the CLI's own test:
    test_train_cli's test_ds_accelerator_cuda_without_a_gpu_is_one_line)."""
    from training.distributed import local_device_problem

    assert local_device_problem(3, 8, "cuda") is None and local_device_problem(0, 1, "cuda") is None
    said = local_device_problem(3, 1, "cuda")
    assert said.startswith("LOCAL_RANK 3, but this process sees 1 cuda device(s) (cuda:3 does not exist)") and \
        "--gpus-per-task" in said and "\n" not in said
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    unset = " (unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)"
    assert local_device_problem(0, 0, "cuda") == "DeepSpeed's accelerator is cuda, but this process sees no cuda device" \
        + unset
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_device_problem(0, 0, "cuda") == ("DS_ACCELERATOR=cuda, but this process sees no cuda device "
                                                   "(CUDA_VISIBLE_DEVICES='')" + unset)


def test_the_busy_port_advice_follows_the_launcher_and_srun_hostlists_expand(tmp_path, ops_model, monkeypatch, capsys):
    """Under srun (no RANK; SLURM_PROCID ...) the advice is MASTER_PORT, not deepspeed's flag; every bracket group of
    the first host is expanded, as `scontrol show hostnames` does."""
    import train_ds
    from training.distributed import first_host

    assert first_host("rack[1-2]-node[01-04],x") == "rack1-node01" and first_host("r[1-2]n[01-16]") == "r1n01"
    assert first_host("gpu[03-05,09],cpu1") == "gpu03" and first_host("a-b[001-004]") == "a-b001"
    no_process_group(monkeypatch)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_PORT", "MASTER_ADDR"):  # recorded: what
        monkeypatch.setenv(k, "0")  # launch_env sets from the SLURM variables is undone after the test
        monkeypatch.delenv(k)
    from training.distributed import launch_env

    for k, v in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "4321987"}.items():
        monkeypatch.setenv(k, v)
    assert launch_env() == "slurm" and os.environ["MASTER_PORT"] == str(15000 + 4321987 % 17000)  # not ephemeral
    for job in ("", "4321987"):  # an empty SLURM_JOB_ID (a hand-made environment) is no job id, not a traceback
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):  # what launch_env set
            os.environ.pop(k, None)
        monkeypatch.setenv("SLURM_JOB_ID", job)
        assert launch_env() == "slurm" and os.environ["MASTER_PORT"] == str(15000 + int(job or 0) % 17000)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "SLURM_JOB_ID"):
        os.environ.pop(k, None)  # each recorded above: monkeypatch puts back what was there before the test
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        for k, v in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "127.0.0.1",
                     "SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(k, v)
        assert train_ds.main(["--config", str(ops_config(tmp_path, ops_model))]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train_ds.py: error: MASTER_PORT {port} is already in use on this machine (another run?); export "
        "MASTER_PORT=<a free port> before srun"]


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
            "TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"}  # a first start under torchrun


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
     "RANK is set but LOCAL_RANK is not: a launcher sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
     "MASTER_PORT (deepspeed, torchrun, srun); set the missing ones or start through one of them"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is set but MASTER_ADDR, MASTER_PORT are not"),
    ({"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
     "RANK=1 is not in 0..WORLD_SIZE-1 (WORLD_SIZE=1)"),
    ({"RANK": "x", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
     "RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers, got RANK='x'"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a port (1..65535)"),  # was an OverflowError at bind
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     "this process was started by MPI (OMPI_COMM_WORLD_SIZE=2), which this project does not launch with (mpirun, "
     "deepspeed --launcher openmpi or mvapich): start it through deepspeed"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
      "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"},  # every task a rank 0 that waited out dist_timeout_minutes
     "RANK=0 and WORLD_SIZE=2 are set in the environment of srun task 1 of 2 (exported by the batch script? "
     "$SLURM_PROCID there is the batch shell's, 0 for every task): unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
     "and MASTER_PORT before srun"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "MASTER_ADDR": "127.0.0.1"},
     "MASTER_ADDR=127.0.0.1 (inherited by this srun step, e.g. exported by the batch script or the login shell) is "
     "this node's loopback address, but the step spans 2 nodes: unset it"),
    ({"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "MASTER_PORT": "29999"},  # waited
     "SLURM_PROCID=2 is not in 0..SLURM_STEP_NUM_TASKS-1 (SLURM_STEP_NUM_TASKS=2), or SLURM_LOCALID=0 < 0"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2(x2)", "SLURM_LOCALID": "0", "MASTER_PORT": "29999"},
     "SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and MASTER_PORT must be integers, got SLURM_PROCID='0', "
     "SLURM_STEP_NUM_TASKS='2(x2)'"),
    ({**TORCHRUN, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"},
     "torchrun --max-restarts 3 over 2 nodes: a restarted worker would read the previous attempt's addresses from the "
     "agent's store (pytorch#135712) and fail at once; start torchrun with --rdzv-backend c10d --rdzv-endpoint "
     "HOST:PORT and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"),
], ids=["no LOCAL_RANK (a Kubeflow PyTorchJob)", "no master", "rank past the world", "not a number", "not a port",
        "mpirun (each process alone)", "RANK exported to every srun task", "a loopback master for two nodes",
        "srun task past its tasks", "srun tasks not a number", "torchrun restarts over several nodes"])
def test_an_incomplete_launch_environment_is_one_line(tmp_path, ops_model, monkeypatch, capsys, env, message):
    """RANK without the rest used to be a KeyError, DeepSpeed's MPI discovery (no mpi4py) or a hang; processes of
    mpirun each trained alone (as "single")."""
    import train_ds

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert train_ds.main(["--config", str(ops_config(tmp_path, ops_model))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {message}"), err


@pytest.mark.parametrize("env", [
    {"GROUP_WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"},  # one node
    {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"},  # no restarts
    {"GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"},  # c10d, own
], ids=["one node", "no restarts", "a store per attempt"])
def test_torchrun_restarts_that_work_are_not_refused(monkeypatch, env):
    """torch's workaround (--rdzv-backend c10d, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: no agent store), one node, or no
    restarts: the launch goes on (a restart over two nodes with it resumed, checked end to end by hand)."""
    from training.distributed import launch_env

    for k, v in {**TORCHRUN, **env}.items():
        monkeypatch.setenv(k, v)
    assert launch_env() == "torchrun"


def test_a_stale_lock_of_deepspeeds_cpu_op_build_is_named_while_the_start_waits_on_it(tmp_path, monkeypatch, capsys):
    """A start killed while it compiled DeepSpeed's CPU op (Ctrl-C) leaves torch's build lock, on which every later
    start waits without a word: the trainer's watch names it once the start has waited a while and the lock is 2
    minutes old (the build takes about one); nothing while there is none, or a young one; a directory torch cannot
    make is not a traceback. The suite's own extensions directory drops such a lock at 15 minutes."""
    from training.distributed import stale_build_lock, watch_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"

    def watched() -> list[str]:
        watch = watch_build_lock(after_s=0.01)
        watch.join(10)
        return capsys.readouterr().out.splitlines()

    assert watched() == []  # no lock
    lock.touch()
    assert watched() == []  # a build going on
    old = time.time() - 3 * 60
    os.utime(lock, (old, old))
    assert watched() == [f"warning: waiting for {lock} (3 minutes old) to go: if no start on this machine is compiling "
                         "DeepSpeed's CPU op now, it is a killed start's: remove that file"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/proc/no-such-dir")
    assert stale_build_lock() is None
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert own_extensions_dir() == tmp_path and lock.exists()
    older = time.time() - 16 * 60
    os.utime(lock, (older, older))
    assert own_extensions_dir() == tmp_path and not lock.exists()


def test_cpu_ranks_share_the_cores_of_their_node(monkeypatch):
    """The deepspeed launcher sets no OMP_NUM_THREADS: each CPU rank took every core (2 ranks on 2 cores: 4 busy
    threads, half the speed; the long-run review measured 0.11 s against 0.05 s a step)."""
    from training.distributed import cpu_threads_per_process

    for name in ("OMP_NUM_THREADS", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_threads_per_process(16) is None  # one process, no launcher: torch's own default
    monkeypatch.setenv("LOCAL_SIZE", "2")  # deepspeed's launcher
    assert cpu_threads_per_process(16) == 8 and cpu_threads_per_process(2) == 1 and cpu_threads_per_process(1) == 1
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's
    assert cpu_threads_per_process(16) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's (or torchrun's) setting stands
    assert cpu_threads_per_process(16) is None
