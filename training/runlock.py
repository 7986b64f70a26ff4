"""One run per save_path: a lock file that works on shared network filesystems.

`save_path/.run.lock` is created with O_CREAT | O_EXCL (atomic on local disks and on NFSv3+, unlike flock
across hosts) by global rank 0 before anything else is written there. It holds the holder's host, pid,
start time and config; a thread touches it every HEARTBEAT_S seconds. A second run refuses to start and
names the holder. A lock whose holder is gone (same host, pid no longer running; an earlier start of this same
SLURM / torchrun job, which a scheduler restarts only once it has ended) or whose heartbeat is older than
STALE_AFTER_S (another host that stopped) is taken over, with a line saying so. The lock also holds the host's
boot id and the holder's pid namespace and process start time: after a reboot, or in the same pid namespace a pid
that is another process now (or this very process), there is no holder; a holder in another pid namespace (a
container sharing the hostname, a restarted container) is judged by its heartbeat.

The same job identity marks a run started fresh (`resume` false): a restart of that job (SLURM's requeue,
torchrun's --max-restarts runs the same command again) resumes the run instead of replacing it. Rank 0 judges
that too (`restarted_job`), and every rank follows it (a rank may lack the job's variables). Without --rdzv-id
(torchrun's default run id 'none') the job is the torchrun agent that started rank 0: it restarts its workers as
its own children. On several nodes with --max-restarts that is not enough (each node has its own agent):
"resume": false is refused there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from models.diskspace import write_problem
from models.outdir import RUN_LOCK_FILE as LOCK_FILE
from models.outdir import pid_alive
from training.distributed import proc_stat

JOB_FILE = ".run-job.json"  # the job that started the run in save_path fresh (`resume` false)
STALE_AFTER_S = float(os.environ.get("PIPEFT_LOCK_STALE_S", "300"))  # a heartbeat older than this: holder gone
HEARTBEAT_S = min(30.0, STALE_AFTER_S / 5)
AGENT = "torchrun agent"  # the job of a torchrun run without --rdzv-id: "torchrun agent HOST:PID:START"
_HELD: set[str] = set()  # tokens of the locks this process holds (a lock naming our pid may be one of them)


def launch_job() -> tuple[str, int] | None:
    """(job id, restart count) when a scheduler may start this same command again: SLURM (SLURM_JOB_ID,
    SLURM_RESTART_COUNT after a requeue) or torchrun (TORCHELASTIC_RUN_ID, or for its default 'none' the agent that
    started this process, AGENT + `launcher_token`; TORCHELASTIC_RESTART_COUNT); None otherwise."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"SLURM job {env['SLURM_JOB_ID']}", int(env.get("SLURM_RESTART_COUNT") or 0)
    run_id, count = env.get("TORCHELASTIC_RUN_ID"), int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if run_id is None:
        return None
    if run_id != "none":
        return f"torchrun run {run_id}", count
    agent = launcher_token()
    return (f"{AGENT} {agent}", count) if agent else None


def torchrun_nodes() -> int:
    """How many torchrun agents (nodes) started this run's workers (1 outside torchrun)."""
    return int(os.environ.get("GROUP_WORLD_SIZE") or 1)


def earlier_start(info: dict) -> str | None:
    """'SLURM job 7, start 1 of it' when `info` (a lock's or JOB_FILE's) was written by an earlier start of the job
    this process belongs to, told by a restart count that moved, else None. A count that did not move tells
    nothing: torchrun inside a SLURM job keeps SLURM's count, and multi-node torchrun counts per node (a node that
    did not fail keeps 0, and rank 0 may land on either)."""
    job = launch_job()
    if job is None or info.get("job") != job[0] or not isinstance(info.get("restart"), int):
        return None
    if info["restart"] < job[1]:
        return f"{job[0]}, start {info['restart'] + 1} of it (this is start {job[1] + 1})"
    return None


def start_time(pid: int) -> str | None:
    """Process `pid`'s start time (/proc/PID/stat field 22, clock ticks after boot); None without it."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_namespace() -> str | None:
    """This process's pid namespace ('pid:[INODE]'; a container has its own); None without /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def boot_id() -> str | None:
    """This host's boot id (a new one after every boot); None without /proc."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def launcher_token() -> str | None:
    """'host:pid:start time' of the process that started this one: torchrun's agent restarts its workers as its own
    children, while a new torchrun command is a new agent. None without /proc."""
    ppid = os.getppid()
    started = start_time(ppid)
    return f"{socket.gethostname()}:{ppid}:{started}" if started else None


def config_identity(path: str | Path, raw: dict) -> dict:
    """A config file's path and a hash of its content: a restart runs the same command, so the same config."""
    text = json.dumps(raw, sort_keys=True, default=str)
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def record_job(save_path: str | Path, launchers: list[str | None], config: dict | None = None) -> None:
    """Rank 0 of a run started fresh: name its job, every rank's `launcher_token` and its config
    (`config_identity`) in save_path (or forget an older job's note)."""
    f, job = Path(save_path) / JOB_FILE, launch_job()
    if job is None:
        f.unlink(missing_ok=True)
    else:
        tmp = f.with_name(f"{JOB_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"job": job[0], "restart": job[1], "launchers": sorted({t for t in launchers if t}),
                                   "config": config}))
        os.replace(tmp, f)


def restarted_job(save_path: str | Path, config: dict | None = None) -> str | None:
    """When this process is a restart of the job that started the run in save_path: which (for the log line). A
    restart count that moved says so; with the same count, any later process of the same SLURM job is one (the same
    command run again inside one allocation resumes too) or of the same torchrun agent (no --rdzv-id), and a
    torchrun worker is one when the torchrun agent that started it also started one of the run's first ranks; but
    a later start of the SLURM job with another `config` (config_identity's content hash: another file, or the file
    changed) that torchrun did not restart is another command, or the same one edited: UnknownStart (a sweep inside
    one allocation, over one save_path, must not resume the last run). The
    same torchrun run id started by another agent with its count unmoved (a new torchrun command reusing --rdzv-id,
    or a scheduler that restarted the agent itself) cannot be told apart: UnknownStart, rather than guess (a guess of
    "new" would delete the run). So is every start of a torchrun run without --rdzv-id on several nodes with
    --max-restarts (each node's agent is another process)."""
    f = Path(save_path) / JOB_FILE
    job = launch_job()
    if (job is not None and job[0].startswith(AGENT) and (nodes := torchrun_nodes()) > 1
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0):  # torchrun's default: no restart
        raise UnknownStart(f"torchrun started this run on {nodes} nodes without --rdzv-id (its default 'none'), so a "
                           "restart of it (--max-restarts) cannot be told from a new torchrun command and \"resume\": "
                           "false could start the run over: pass --rdzv-id with an id of this job to every node's "
                           "torchrun, or set \"resume\": \"auto\"")
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or job is None or info.get("job") != job[0]:
        return None
    if earlier := earlier_start(info):
        return earlier
    first, launchers = info.get("config"), info.get("launchers")
    by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and (  # a worker torchrun restarted: the same command
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0
        or isinstance(launchers, list) and launcher_token() in launchers)  # (a shell's child: no proof, an salloc
    # shell starts each command)
    if (config is not None and isinstance(first, dict) and first.get("sha256") != config["sha256"]
            and not by_torchrun):
        same = first.get("path") == config["path"]
        raise UnknownStart(f"save_path {Path(save_path)} holds a run that {job[0]} started with \"resume\": false "
                           f"and {'another version of this config' if same else 'the config ' + str(first.get('path'))}, "
                           "and this process is a later start in that job with this config (a restart of the job "
                           f"runs the config it started with): delete {f} to start over with this one "
                           "(\"overwrite_save_path\": true), or set \"resume\": \"auto\" to continue that run with it")
    if job[0].startswith(("SLURM", AGENT)):  # AGENT: the job is the agent, which restarts its own workers
        return f"{job[0]} (restart count {info.get('restart')} then, {job[1]} in this process)"
    if isinstance(launchers, list) and (mine := launcher_token()) in launchers:
        return f"{job[0]} (its torchrun agent {mine.split(':')[1]} on {mine.split(':')[0]} restarted it)"
    raise UnknownStart(f"save_path {Path(save_path)} holds a run that {job[0]} started with \"resume\": false, and this "
                       "process is of that run id but was started by another torchrun agent (a new torchrun command "
                       "reusing --rdzv-id, or a restart of the agent itself): set \"resume\": \"auto\" to continue "
                       f"that run, or delete {f} to start over")


class UnknownStart(RuntimeError):
    """Whether this start is a restart of the job that started the run cannot be told; the message says how to
    choose."""


class LockError(RuntimeError):
    """save_path is held by another run; the message is one line naming the holder."""


def read_lock_file(f: Path) -> dict | None:
    """A lock file's content ({} when damaged), None when it is not there."""
    try:
        info = json.loads(f.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def uptime() -> float | None:
    """Seconds since this host booted; None without /proc."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def fs_now(directory: Path) -> float:
    """Now, by the clock that stamps files in `directory`: a file created there gets the NFS server's time, not this
    host's (a node whose clock is minutes off would call a live heartbeat stale, or a dead one fresh); this host's
    clock where no file can be created."""
    probe = directory / f"{LOCK_FILE}.clock-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def read_lock(save_path: str | Path) -> tuple[dict, float] | None:
    """(holder info, seconds since its last heartbeat, by the filesystem's clock), or None when there is no lock. A
    lock being written right now, or damaged, has the info {} and is judged by its age alone."""
    f = Path(save_path) / LOCK_FILE
    try:
        age = fs_now(f.parent) - f.stat().st_mtime
    except OSError:
        return None
    info = read_lock_file(f)
    return None if info is None else (info, age)


def describe(info: dict, age: float) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}, config {info.get('config', '?')}, "
            f"last heartbeat {age:.0f} s ago")


UNKNOWN = ("unknown", "")  # holder_state's verdict when this host cannot tell


def holder_state(info: dict, age: float) -> tuple[str, str]:
    """What this host can tell of a lock's holder: ("gone", why) when it is not running, ("running", "") when it is
    seen running, ("unknown", "") when this host cannot tell, and its heartbeat judges.
    - Gone: this host restarted since (another boot id, and the lock last touched `age` seconds ago, before this
      boot); in this pid namespace, its pid is dead, another process now (start time) or this very process.
    - Running: on this host since this boot, in this pid namespace, its pid alive, not a zombie, and started when
      the holder's did. Its heartbeat's age does not count then: a run paused by SIGSTOP (`scontrol suspend`, gang
      scheduling, Ctrl-Z) touches nothing, and goes on writing once continued.
    - Unknown: another host; another boot id on a lock touched since this boot (another machine with the same
      hostname: containers given one --hostname, cloned nodes); another pid namespace (another container sharing
      the hostname), whose pids mean nothing here; a zombie; a lock without those fields (an older version's) whose
      pid is alive."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return UNKNOWN
    then, now = info.get("boot_id"), boot_id()
    if then and now and then != now:
        up = uptime()
        if up is None or age < up:  # touched since this boot (or when, unknown)
            return UNKNOWN
        return "gone", f"this host has restarted since (boot id {then} then, {now} now)"
    ns = info.get("pid_ns")
    if ns is not None and ns != pid_namespace():
        return UNKNOWN
    if ns is not None and pid == os.getpid() and info.get("token") not in _HELD:
        return "gone", f"its pid {pid} on this host is this process now (the holder ran before a restart)"
    if not pid_alive(pid):
        return "gone", f"its process {pid} on this host is no longer running"
    started, fields = info.get("pid_start"), proc_stat(pid)  # state, ..., start time at 19
    current = fields[19] if fields and len(fields) > 19 else None
    if ns is None or started is None or current is None:
        return UNKNOWN
    if str(started) != current:
        return "gone", f"its pid {pid} on this host is another process now (started at tick {current}, the holder at {started})"
    return ("running", "") if then and then == now and fields[0] != "Z" else UNKNOWN



def why_stale(info: dict, age: float) -> str | None:
    """Why the holder of a lock is gone (the lock may be taken over), or None while it may still be running."""
    state, why = holder_state(info, age)
    if state == "gone":
        return why
    if earlier := earlier_start(info):
        return f"it was taken by {earlier}"
    if age > STALE_AFTER_S and state != "running":
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return None


def check_unlocked(save_path: str | Path) -> None:
    """Raise LockError when a live run holds save_path (a read-only check; `RunLock.acquire` takes it)."""
    found = read_lock(save_path)
    if found is not None and why_stale(*found) is None:
        raise LockError(held_message(save_path, *found))


def held_message(save_path: str | Path, info: dict, age: float) -> str:
    if age > STALE_AFTER_S and holder_state(info, age)[0] == "running":  # alive, its heartbeat stopped: a paused process
        return (f"save_path {save_path} is in use by another run ({describe(info, age)}; lock file "
                f"{Path(save_path) / LOCK_FILE}): its process {info['pid']} on this host is alive, its heartbeat "
                f"stopped (paused by SIGSTOP, scontrol suspend or Ctrl-Z, or hung); continue it (kill -CONT "
                f"{info['pid']}) or end it, or use another save_path")
    return (f"save_path {save_path} is in use by another run ({describe(info, age)}; lock file "
            f"{Path(save_path) / LOCK_FILE}); wait for it to end or stop it, "
            f"or use another save_path (a lock whose holder died is taken over: on this host at once, from another "
            f"host once its heartbeat is {STALE_AFTER_S:.0f} s old)")


class RunLock:
    """The lock of one run on one save_path (global rank 0 only)."""

    def __init__(self, save_path: str | Path, config: str = ""):
        self.dir = Path(save_path)
        self.file = self.dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "config": config,
                     "token": self.token, "pid_start": start_time(os.getpid()), "boot_id": boot_id(),
                     "pid_ns": pid_namespace()}
        if job := launch_job():
            self.info.update(job=job[0], restart=job[1])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_why: str | None = None  # set by the heartbeat when another run took the lock over (`lost`)

    def acquire(self) -> str | None:
        """Take the lock (LockError when a live run holds it). Returns a line to print when a stale lock was
        taken over, else None."""
        self.dir.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(5):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_lock(self.dir)
                if found is None:
                    continue  # released in between
                why = why_stale(*found)
                if why is None:
                    raise LockError(held_message(self.dir, *found)) from None
                # move the stale lock aside under a name of our own; if what was moved is not the lock judged stale
                # (another run took it over in between and made its own), put that one back: it is live
                aside = self.file.with_name(f"{LOCK_FILE}.stale-{self.token}")
                try:
                    os.replace(self.file, aside)
                except FileNotFoundError:
                    continue
                moved = read_lock_file(aside)
                if moved is not None and moved.get("token") != found[0].get("token"):
                    try:
                        os.link(aside, self.file)
                    except FileExistsError:
                        pass  # a third run made one: the next round judges it
                    aside.unlink(missing_ok=True)
                    continue
                aside.unlink(missing_ok=True)
                note = f"took over the lock of save_path {self.dir} from a run that is gone ({describe(*found)}: {why})"
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.info, f)
            except OSError as e:  # a full or read-only disk: no empty lock left to refuse the retry for minutes
                with contextlib.suppress(OSError):
                    self.file.unlink()
                raise LockError(write_problem(f"save_path {self.dir}: writing the lock {self.file}", self.dir, e)) from None
            _HELD.add(self.token)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return note
        raise LockError(f"save_path {self.dir}: could not take the lock {self.file} (other runs keep taking it)")

    def ours(self) -> bool:
        try:
            return json.loads(self.file.read_text()).get("token") == self.token
        except (OSError, json.JSONDecodeError):
            return False

    def lost(self) -> str | None:
        """Why this run no longer holds its lock: another run took it over (e.g. while this one was paused past the
        heartbeat's limit on another host); None while it holds it, and when the file cannot be read or names no
        run (a network filesystem's hiccup, a lock being rewritten, one removed by hand: nothing says another run
        writes here)."""
        found = read_lock(self.dir)
        if found is None or not (token := found[0].get("token")) or token == self.token:
            return None
        return f"another run took the lock {self.file} over ({describe(*found)})"

    def _beat(self) -> None:
        """Touch the lock every HEARTBEAT_S; once another run has taken it over, say so in `lost_why` (the trainer
        stops at the next step, writing nothing more in save_path). It keeps beating: a lock that reads as this run's
        again (the trainer's own check at the step found it ours) is kept fresh, and `lost_why` cleared."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.ours():
                    os.utime(self.file)
                    self.lost_why = None
                elif why := self.lost():
                    self.lost_why = why
            except OSError:
                pass  # a network filesystem hiccup: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self.ours():
                with contextlib.suppress(OSError):  # a save_path gone read-only: the next run judges the lock stale
                    self.file.unlink(missing_ok=True)
        _HELD.discard(self.token)
