"""One run per save_path: the run lock is refused while its holder runs (paused included) and taken over once it
has gone (the restarts of one job: test_run_dir.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.runlock import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[1]


def test_lock_is_refused_while_held_and_taken_over_when_stale(tmp_path, monkeypatch):
    held = RunLock(tmp_path, config="a.json")
    assert held.acquire() is None
    with pytest.raises(RuntimeError, match=rf"is in use by another run \(host .*, pid {os.getpid()}, .*config a.json"):
        RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # another host's lock whose heartbeat stopped long ago
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    lock = RunLock(tmp_path)
    assert "its heartbeat is" in lock.acquire()
    lock.release()


def test_a_paused_holder_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path):
    """A run stopped by SIGSTOP (scontrol suspend, Ctrl-Z) touches its lock no more; its lock was taken over once the
    heartbeat was STALE_AFTER_S old, and the paused run, continued, wrote into the new run's save_path. A holder this
    host sees running (its pid alive, started when the holder was) keeps it; once it has ended (a zombie not yet
    reaped, too), it is taken over."""
    import signal

    code = ("import sys; from training.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        holder.send_signal(signal.SIGSTOP)
        os.utime(tmp_path / LOCK_FILE, (0, 0))  # its heartbeat long stopped
        with pytest.raises(RuntimeError, match=rf"is in use by another run \(host .*, pid {holder.pid}, .*: its process "
                                               rf"{holder.pid} on this host is alive, its heartbeat stopped \(paused by SIGSTOP, .*kill -CONT"):
            RunLock(tmp_path).acquire()
        holder.kill()  # ended, not yet reaped by its parent (a zombie): not running, so its old heartbeat counts
        for _ in range(100):
            if (Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"])[0] == "Z":
                break
            time.sleep(0.05)
        lock = RunLock(tmp_path)
        assert "its heartbeat is" in lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_taken_over_by_two_runs_at_once_keeps_one_holder(tmp_path, monkeypatch):
    """B reads a stale lock; A takes it over before B moves it aside: B must not take A's live lock away."""
    import training.runlock as runlock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone-host", "pid": 1, "started": 0, "token": "old"}))
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    a, b = RunLock(tmp_path, config="a.json"), RunLock(tmp_path, config="b.json")
    read, said = runlock.read_lock, []

    def a_in_between(path):
        found = read(path)
        if not said:
            said.append(None)
            said[0] = a.acquire()  # A takes the stale lock over between B's read and B's move
        return found

    monkeypatch.setattr(runlock, "read_lock", a_in_between)
    try:
        with pytest.raises(runlock.LockError, match=r"is in use by another run .*config a.json"):
            b.acquire()
        assert "took over the lock" in said[0] and a.ours() and not b.ours()
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing left aside
    finally:
        a.release()


def test_the_heartbeat_reports_a_takeover_and_keeps_beating_a_lock_that_reads_as_its_own_again(tmp_path, monkeypatch):
    """`lost_why` is set while the lock names another run (the trainer stops at the step); a lock that reads as this
    run's again is touched again and `lost_why` cleared, rather than left to go stale with the heartbeat stopped."""
    import training.runlock as runlock

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    file = tmp_path / LOCK_FILE
    mine = file.read_text()
    try:
        file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "other"}))
        deadline = time.time() + 10
        while lock.lost_why is None and time.time() < deadline:
            time.sleep(0.02)
        assert lock.lost_why and "another run took the lock" in lock.lost_why
        file.write_text(mine)
        os.utime(file, (0, 0))
        while (lock.lost_why is not None or file.stat().st_mtime == 0) and time.time() < deadline:
            time.sleep(0.02)
        assert lock.lost_why is None and file.stat().st_mtime > 0
    finally:
        lock.release()
    assert not file.exists()
