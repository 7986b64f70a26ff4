"""One run per save_path: a lock file that works on shared network filesystems.

`save_path/.run.lock` is created with O_CREAT | O_EXCL (atomic on local disks and on NFSv3+, unlike flock
across hosts) by global rank 0 before anything else is written there. It holds the holder's host, pid,
start time and config; a thread touches it every HEARTBEAT_S seconds. A second run refuses to start and
names the holder. A lock whose holder is gone (same host, pid no longer running) or whose heartbeat is
older than STALE_AFTER_S (another host that stopped) is taken over, with a line saying so.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from models.hf_io import pid_alive

LOCK_FILE = ".run.lock"
STALE_AFTER_S = float(os.environ.get("PIPEFT_LOCK_STALE_S", "300"))  # a heartbeat older than this: holder gone
HEARTBEAT_S = min(30.0, STALE_AFTER_S / 5)


class LockError(RuntimeError):
    """save_path is held by another run; the message is one line naming the holder."""


def read_lock(save_path: str | Path) -> tuple[dict, float] | None:
    """(holder info, seconds since its last heartbeat), or None when there is no lock."""
    f = Path(save_path) / LOCK_FILE
    try:
        age = time.time() - f.stat().st_mtime
        info = json.loads(f.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        info = {}  # being written right now, or damaged: judged by its age alone
        try:
            age = time.time() - f.stat().st_mtime
        except OSError:
            return None
    return info, age


def describe(info: dict, age: float) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}, config {info.get('config', '?')}, "
            f"last heartbeat {age:.0f} s ago")


def why_stale(info: dict, age: float) -> str | None:
    """Why the holder of a lock is gone (the lock may be taken over), or None while it may still be running."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return f"its process {info['pid']} on this host is no longer running"
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return None


def check_unlocked(save_path: str | Path) -> None:
    """Raise LockError when a live run holds save_path (a read-only check; `RunLock.acquire` takes it)."""
    found = read_lock(save_path)
    if found is not None and why_stale(*found) is None:
        raise LockError(held_message(save_path, *found))


def held_message(save_path: str | Path, info: dict, age: float) -> str:
    return (f"save_path {save_path} is in use by another run ({describe(info, age)}); wait for it to end or stop it, "
            f"or use another save_path (a lock whose holder died is taken over: on this host at once, from another "
            f"host once its heartbeat is {STALE_AFTER_S:.0f} s old)")


class RunLock:
    """The lock of one run on one save_path (global rank 0 only)."""

    def __init__(self, save_path: str | Path, config: str = ""):
        self.dir = Path(save_path)
        self.file = self.dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "config": config,
                     "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                # move the stale lock aside under a name of our own (atomic: of two runs taking it over, one wins)
                aside = self.file.with_name(f"{LOCK_FILE}.stale-{self.token}")
                try:
                    os.replace(self.file, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    continue
                note = f"took over the lock of save_path {self.dir} from a run that is gone ({describe(*found)}: {why})"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return note
        raise LockError(f"save_path {self.dir}: could not take the lock {self.file} (other runs keep taking it)")

    def ours(self) -> bool:
        try:
            return json.loads(self.file.read_text()).get("token") == self.token
        except (OSError, json.JSONDecodeError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.ours():
                    os.utime(self.file)
            except OSError:
                pass  # a network filesystem hiccup: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self.ours():
                self.file.unlink(missing_ok=True)
