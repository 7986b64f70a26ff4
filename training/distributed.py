"""Process-group set-up and teardown shared by train_ds.py and the launcher-started test workers."""

from __future__ import annotations

import datetime
import errno
import os
import socket
import threading
from pathlib import Path


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[03-05,09],cpu1" -> "gpu03" (zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry, host = nodelist[:end].strip(), ""
    while "[" in entry:  # every bracket group: "rack[1-2]-node[01-04]" -> "rack1-node01"
        prefix, rest = entry.split("[", 1)
        ranges, entry = rest.split("]", 1)
        host += prefix + ranges.split(",")[0].split("-")[0]
    return host + entry


class LaunchError(ValueError):
    """The launch environment (RANK, WORLD_SIZE, ...) is incomplete or inconsistent, or the process group cannot
    form: one line."""


# MASTER_PORT under srun, unless set: 15000 + job id mod 17000, below Linux's ephemeral ports (32768-60999), which
# outgoing connections take (a port among them was now and then in use by one)
SLURM_DEFAULT_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000


MPI_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # Open MPI, MPICH/Intel, MVAPICH


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what launch_env makes present


def port_problem(number: int) -> str | None:
    """Why `number` is no TCP port (a bind would raise OverflowError), else None."""
    return None if 1 <= number <= 65535 else f"{number} is not a port (1..65535)"


def _check_ranks(values: dict[str, str]) -> tuple[int, int]:
    """(rank, world size) of the rank, world size, local rank and port variables `values` (name -> value, in that
    order); LaunchError naming them when one is not an integer or the rank is out of range (a process group that
    cannot form would wait dist_timeout_minutes without a word), or the port is not one (an OverflowError at bind)."""
    (r, rank), (w, world), (lo, local), (port, number) = values.items()
    try:
        rank, world, local, number = int(rank), int(world), int(local), int(number)
    except ValueError:
        raise LaunchError(f"{r}, {w}, {lo} and {port} must be integers, got "
                          + ", ".join(f"{k}={v!r}" for k, v in values.items())) from None
    if not 0 <= rank < world or local < 0:
        raise LaunchError(f"{r}={rank} is not in 0..{w}-1 ({w}={world}), or {lo}={local} < 0")
    if problem := port_problem(number):
        raise LaunchError(f"{port}={problem}")
    return rank, world


def launch_env() -> str:
    """Make the process-group variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) present, and
    return how this process was started: "deepspeed" | "torchrun" (they set them) | "slurm" (`srun python
    train_ds.py`: from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, the master the first host of the
    step's node list, port 15000 + job id mod 17000) | "single" (no launcher: one process, a 1-stage
    pipeline, instead of DeepSpeed's MPI discovery). Processes started by MPI (mpirun, `deepspeed --launcher
    openmpi|mvapich`) are refused: each would train alone as "single"."""
    env = os.environ
    if "RANK" in env:
        if missing := [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]:
            raise LaunchError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: a "
                              "launcher sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (deepspeed, "
                              "torchrun, srun); set the missing ones or start through one of them")
        rank, world = _check_ranks({k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")})
        if problem := srun_rank_problem(rank, world) or torchrun_restart_problem():
            raise LaunchError(problem)
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a step started by srun (not the batch script)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
        port = env.get("MASTER_PORT") or str(SLURM_DEFAULT_PORT_BASE + int(env.get("SLURM_JOB_ID") or 0) % SLURM_PORT_SPAN)
        addr, nodes_n = env.get("MASTER_ADDR", ""), env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
        if nodes_n.isdigit() and int(nodes_n) > 1 and (addr == "localhost" or addr.startswith("127.") or addr == "::1"):
            raise LaunchError(f"MASTER_ADDR={addr} (inherited by this srun step, e.g. exported by the batch script "
                              f"or the login shell) is this node's loopback address, but the step spans {nodes_n} "
                              "nodes: unset it (the first host of the step's node list is then the master) or set "
                              "the first node's address")
        _check_ranks({"SLURM_PROCID": env["SLURM_PROCID"], "SLURM_STEP_NUM_TASKS": env["SLURM_STEP_NUM_TASKS"],
                      "SLURM_LOCALID": env.get("SLURM_LOCALID", "0"), "MASTER_PORT": port})  # set by hand, else srun's
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"), MASTER_ADDR=env.get("MASTER_ADDR") or first_host(nodes),
                   MASTER_PORT=port)
        return "slurm"
    if mpi := next((f"{k}={env[k]}" for k in MPI_WORLD_SIZE_VARS if env.get(k, "1") not in ("", "0", "1")), None):
        raise LaunchError(f"this process was started by MPI ({mpi}), which this project does not launch with (mpirun, "
                          "deepspeed --launcher openmpi or mvapich): start it through deepspeed (its default pdsh "
                          "launcher, --hostfile), torchrun or srun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return "single"


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ..., starttime at 19), None without it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ppid_of(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields and len(fields) > 1 and fields[1].isdigit() else None


class LauncherWatch:
    """Whether the `deepspeed` command that started this rank has gone. DeepSpeed's single-node runner has no
    signal handler: SIGTERM to it (what `timeout` and many schedulers send) ends it at once, while its
    `deepspeed.launcher.launch` child and the ranks would train on as orphans. A rank started by that launch
    process notices its parent lost its own parent and stops like a preempted run (save, exit 0).
    Inactive (never gone) under any other launcher, or where /proc is missing."""

    def __init__(self) -> None:
        self.launch, self.runner = os.getppid(), None
        if _is_deepspeed_launch(self.launch):
            self.runner = _ppid_of(self.launch)

    def gone(self) -> bool:
        if self.runner is None:
            return False
        return os.getppid() != self.launch or _ppid_of(self.launch) != self.runner


def srun_rank_problem(rank: int, world: int) -> str | None:
    """Why RANK / WORLD_SIZE cannot be this srun task's: set in its environment by no launcher of its own
    (torchrun, deepspeed's launch), they must be SLURM_PROCID / SLURM_STEP_NUM_TASKS. Exported in the batch script
    (`export RANK=$SLURM_PROCID` is the batch shell's 0 for every task), every task would be a rank 0 waiting out
    dist_timeout_minutes. None when they are, or outside an srun step."""
    env = os.environ
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env or "TORCHELASTIC_RUN_ID" in env \
            or _is_deepspeed_launch(os.getppid()):
        return None
    procid, tasks = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
    if (str(rank), str(world)) == (procid, tasks):
        return None
    return (f"RANK={rank} and WORLD_SIZE={world} are set in the environment of srun task {procid} of {tasks} "
            "(exported by the batch script? $SLURM_PROCID there is the batch shell's, 0 for every task): unset RANK, "
            "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT before srun, which the ranks then take from SLURM's "
            "own variables, or set them per task (srun bash -c '...')")


def _is_deepspeed_launch(pid: int) -> bool:
    """Whether process `pid` is DeepSpeed's per-node `deepspeed.launcher.launch` (False without /proc)."""
    try:
        return b"deepspeed.launcher.launch" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False


def port_taken(port: int) -> bool:
    """Whether another process holds `port` here, bound as torch's TCPStore binds it (SO_REUSEADDR: a killed run's
    connections, in TIME_WAIT for a minute, do not hold it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def master_port_problem(launcher: str = "deepspeed") -> str | None:
    """Rank 0 (which hosts the rendezvous store): why MASTER_PORT cannot be used, e.g. another run holds it;
    None when it is free, when a launcher's agent already serves the store there (torchrun), or when this process
    already has a process group (its own store holds the port). `launcher`:
    launch_env's answer, for the advice."""
    if os.environ.get("RANK") != "0" or "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_PORT" not in os.environ:
        return None
    import torch.distributed

    if torch.distributed.is_initialized():  # the caller's process group (a notebook's), which the run uses: its port
        return None
    port = int(os.environ["MASTER_PORT"])
    if port_taken(port):
        how = ("export MASTER_PORT=<a free port> before srun" if launcher == "slurm" else
               "start deepspeed with --master_port set to a free port (make quickstart MASTER_PORT=<port>)")
        return f"MASTER_PORT {port} is already in use on this machine (another run?); {how}"
    return None


def torchrun_restart_problem() -> str | None:
    """Why torchrun's restarts (--max-restarts) cannot work here: over several nodes whose workers share their agent's
    store, which keeps the keys of the attempt before (pytorch#135712), a restarted worker reads the dead ranks'
    addresses and fails at once ("another process of this run has ended"), the restart budget spent. One node is
    handled (`init_restarted_torchrun`); torch's own workaround gives each attempt a store of its own. None else."""
    env = os.environ
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE", "1") in ("", "1") \
            or restarts in ("", "0"):
        return None
    return (f"torchrun --max-restarts {restarts} over {env['GROUP_WORLD_SIZE']} nodes: a restarted worker would read "
            "the previous attempt's addresses from the agent's store (pytorch#135712) and fail at once; start torchrun "
            "with --rdzv-backend c10d --rdzv-endpoint HOST:PORT and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
            "environment on every node (or without --max-restarts)")


def init_restarted_torchrun(backend: str, timeout: datetime.timedelta, device_id=None) -> None:
    """A worker restarted by torchrun (--max-restarts) reaches the agent's store, which keeps the keys of the attempt
    before it (pytorch#135712): its init_process_group reads the dead ranks' addresses and fails or hangs. With one
    agent (one node) every rank has the same restart count, so this process group's keys get a prefix of their own
    per attempt: the group is made here (DeepSpeed's init_distributed then takes it); several agents are refused
    at launch (`torchrun_restart_problem`). Nothing when not such a restart. `device_id`: the rank's CUDA device,
    bound as DeepSpeed binds it."""
    import torch.distributed as dist

    env = os.environ
    count = int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or count == 0 or dist.is_initialized() \
            or env.get("GROUP_WORLD_SIZE", "1") != "1":
        return
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"/pipeft/attempt_{count}", store), timeout=timeout,
                            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                            **({"device_id": device_id} if device_id is not None else {}))


def shm_buffer(rank: int) -> Path:
    """DeepSpeed's CPU shared-memory allreduce buffer for `rank` of this launch (ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def remove_stale_shm_buffer(rank: int) -> None:
    """Before the process group: remove `rank`'s buffer left by a killed run on the same address and port (its
    ranks could not unlink it). DeepSpeed would open that object again, not a new one, and a peer could read the
    dead run's flags; each rank creates and removes only its own name, and peers open it only after the group forms."""
    if os.environ.get("MASTER_PORT"):
        shm_buffer(rank).unlink(missing_ok=True)


def cpu_threads_per_process(cores: int) -> int | None:
    """On the CPU accelerator: each process's share of the node's `cores` (the deepspeed launcher's LOCAL_SIZE
    processes on it; LOCAL_WORLD_SIZE where torchrun has not set OMP_NUM_THREADS, as it does for several). torch
    gives each process every core otherwise: 2 ranks on 2 cores then ran 4 busy threads, at half the speed. None where
    OMP_NUM_THREADS says it, or the node's process count is unknown (srun: SLURM pins each task's cores, or the
    shipped script sets OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    if not local or not local.isdigit() or int(local) < 1:
        return None
    return max(1, cores // int(local))


def stale_build_lock(minutes: float = 2) -> str | None:
    """Why this CPU start may be waiting without end: a lock of the build of DeepSpeed's CPU communication op at
    least `minutes` old (the build takes about one). A start killed while it compiled (Ctrl-C) leaves the lock, and
    torch waits for it to go, silently; else None."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    try:
        lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
        age = (time.time() - lock.stat().st_mtime) / 60
    except OSError:  # no lock; or a directory torch cannot make, which it reports itself if it builds there
        return None
    if age < minutes:
        return None
    return (f"waiting for {lock} ({age:.0f} minutes old) to go: if no start on this machine is compiling DeepSpeed's "
            "CPU op now, it is a killed start's: remove that file")


def watch_build_lock(after_s: float = 150) -> threading.Timer:
    """Started before the process group: after `after_s` seconds, print `stale_build_lock`'s warning if this start is
    still waiting (cancel it once the group forms)."""

    def check() -> None:
        if warning := stale_build_lock():
            print(f"warning: {warning}", flush=True)

    timer = threading.Timer(after_s, check)
    timer.daemon = True
    timer.start()
    return timer


def shutdown_distributed() -> None:
    """Destroy the process group and remove this rank's shared-memory buffer: DeepSpeed 0.19.8 creates a
    66 MB /dev/shm segment per CPU rank and never unlinks it, so every run would leak them. Through deepspeed.comm
    where DeepSpeed knows the group: it then drops its references to the groups too (its global `mpu`, a pipeline
    engine's grid, would name destroyed groups to a later deepspeed.initialize in the process)."""
    import deepspeed.comm
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    (deepspeed.comm if deepspeed.comm.is_initialized() else dist).destroy_process_group()
    shm_buffer(rank).unlink(missing_ok=True)


def caller_groups() -> tuple[list, object]:
    """What a run inside a caller's process group (a notebook's) changes and `restore_caller_groups` puts back: the
    process groups that exist (torch lists them nowhere public: c10d's registry) and DeepSpeed's global `mpu`, which
    a pipeline engine sets to its grid."""
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d

    return (list(distributed_c10d._world.pg_map) if distributed_c10d.is_initialized() else []), groups.mpu


def restore_caller_groups(before: tuple[list, object]) -> None:
    """Destroy the process groups made since `caller_groups` gave `before` (ours, DeepSpeed's pipeline groups), so
    that a notebook's runs do not pile them up, each gloo one with its threads and sockets, and none outlives the
    caller's own group; then DeepSpeed's `mpu` as it was, since the grid's groups are gone (the next
    deepspeed.initialize would use them). Through deepspeed.comm, which drops DeepSpeed's other references too."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups

    kept, mpu = before
    for group in caller_groups()[0]:
        if not any(group is k for k in kept):
            dist.destroy_process_group(group)
    groups.mpu = mpu


def local_device_problem(local_rank: int, count: int, device: str) -> str | None:
    """Why this process's device, `device`:LOCAL_RANK (as DeepSpeed sets it), does not exist when `count` are
    visible: none at all (DS_ACCELERATOR=cuda on a host without a GPU, an empty CUDA_VISIBLE_DEVICES: DeepSpeed's
    own detection picks the CPU there), or a launcher that shows each process only its own GPU (srun
    --gpus-per-task, --gpu-bind) while LOCAL_RANK counts the node's processes; None when it exists."""
    if count <= 0:
        chosen = "DS_ACCELERATOR=" if os.environ.get("DS_ACCELERATOR") == device else "DeepSpeed's accelerator is "
        visible = os.environ.get(f"{device.upper()}_VISIBLE_DEVICES")
        return (f"{chosen}{device}, but this process sees no {device} device"
                + (f" ({device.upper()}_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                + " (unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)")
    if local_rank < count:
        return None
    return (f"LOCAL_RANK {local_rank}, but this process sees {count} {device} device(s) ({device}:{local_rank} does "
            "not exist): every process of a node must see all of the node's devices (under SLURM: --gpus-per-node, "
            "without --gpus-per-task or --gpu-bind)")


def accelerator_problem(acc, local_rank: int) -> str | None:
    """`local_device_problem` for DeepSpeed's accelerator `acc` when it drives CUDA devices; None for the others
    (each indexes its devices its own way) and when cuda:LOCAL_RANK exists."""
    if acc.device_name() != "cuda":
        return None
    return local_device_problem(local_rank, acc.device_count(), "cuda")


def device_line() -> str:
    """One summary line: the device DeepSpeed's accelerator drives, through which class, its backend and memory."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from training.monitor import fmt_bytes

    acc = get_accelerator()
    cpu = acc.device_name() == "cpu"
    kind = "host memory" if cpu else "memory per device"
    return (f"device: {acc.device_name()} via {type(acc).__name__} (process group {acc.communication_backend_name()}"
            + (f"; {(n := torch.get_num_threads())} thread{'s' * (n != 1)} per process" if cpu else "")
            + f"); {kind} {fmt_bytes(acc.total_memory())}, {fmt_bytes(acc.available_memory())} free at start")
