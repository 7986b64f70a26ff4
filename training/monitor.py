"""What a run reports, on rank 0: metrics.jsonl, the same scalars to the trackers of `report_to` (TensorBoard
events under save_path/runs by default; training/trackers.py), and progress (a tqdm bar when stdout is a
terminal, plain lines every `log_interval` steps otherwise)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

from pipeft import one_line
from training.trackers import open_trackers, parse_report_to, scalars

log = logging.getLogger(__name__)


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_count(n: int) -> str:
    """Parameter counts: exact below a million, else in M / B."""
    return f"{n:,}" if n < 1e6 else f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def process_memory() -> float:
    """This process's resident memory now (bytes)."""
    import psutil

    return float(psutil.Process().memory_info().rss)


def json_line(rec: dict) -> str:
    """A record as one line of strict JSON: a NaN or infinite number (a diverged loss, grad norm, perplexity) is
    null, which pandas reads as NaN and jq / JSON.parse accept (json.dumps wrote bare NaN / Infinity, not JSON)."""
    return json.dumps(finite_or_null(rec), allow_nan=False)


def finite_or_null(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


ESTIMATE_FILE = "memory_estimate.json"


def write_estimate(save_path: Path, setup, stages: list) -> str | None:
    """save_path/memory_estimate.json: the start-up summary's per-stage memory prediction (models/cost.py), beside
    the measured per-stage peaks that metrics.jsonl records (`peak_memory`). Returns the problem of a failed write
    (a warning: the run goes on, to stop at its first metrics line if save_path is full)."""
    from dataclasses import asdict

    from models.diskspace import write_problem
    from training.checkpoint import atomic_write_text

    path = save_path / ESTIMATE_FILE
    try:
        atomic_write_text(path, json.dumps({"setup": asdict(setup), "stages": [m.as_dict() for m in stages]}, indent=1)
                          + "\n")
    except OSError as e:
        return write_problem(f"writing {path}", save_path, e)
    return None


def truncate_metrics(path: Path, after_step: int) -> None:
    """Keep the metrics lines of steps <= after_step (a resumed run rewrites what came after its checkpoint): left as
    it is when there is nothing to drop, else rewritten whole by a rename (a kill while rewriting in place emptied it:
    every step's history)."""
    from training.checkpoint import atomic_write_text

    if not path.is_file():
        path.write_text("")
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line half-written when the run was killed
            continue
    if (new := "".join(line + "\n" for line in kept)) != text:
        atomic_write_text(path, new)


def last_time(path: Path) -> float:
    """The `time` of the last metrics line (0 without one): a resumed run's clock goes on from it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0.0
    for line in reversed(lines):
        try:
            value = json.loads(line)["time"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return 0.0


class Monitor:
    """Rank 0's outputs; every method is a no-op on other ranks."""

    def __init__(self, save_path: Path, rank: int, total_steps: int, start_step: int, log_interval: int,
                 report_to: str | list[str] = "tensorboard", config: dict | None = None):
        self.active, self.total, self.log_interval = rank == 0, total_steps, log_interval
        self.metrics_path = save_path / "metrics.jsonl"
        self.t0 = self.last_step = time.time()  # this process's start: elapsed and eta
        # `time` goes on from the checkpoint's last line: the run's time over its resumes (the stopped time left out)
        self.time_before = last_time(self.metrics_path) if self.active and start_step else 0.0
        self.start, self.window_tokens, self.window_s = start_step, 0, 0.0
        self.trackers, self.bar = {}, None
        if not self.active:
            return
        self.trackers = open_trackers(parse_report_to(report_to), save_path, start_step, config or {})
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def print(self, msg: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def write(self, rec: dict) -> None:
        """A metrics.jsonl line (json_line: a non-finite number is null), and its scalars (trackers.scalars: the
        finite numbers) to every tracker of `report_to`."""
        if not self.active:
            return
        rec = {**rec, "time": round(time.time() - self.t0 + self.time_before, 4)}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json_line(rec) + "\n")
        except OSError as e:  # save_path full or gone read-only: the run stops in one line, its checkpoints intact
            from models.diskspace import write_problem
            from training.checkpoint import TrainingStopped

            said = write_problem(f"writing {self.metrics_path}", self.metrics_path.parent, e)
            raise TrainingStopped(f"{said}; the run stops at step {rec['step']}, its checkpoints intact: resume with "
                                  "the same command once save_path can be written") from None
        values = scalars(rec)
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(values, rec["step"])
            except Exception as e:  # noqa: BLE001 -- a tracker never stops training
                log.warning("report_to %s off: it failed to log step %d (%s)", name, rec["step"], one_line(e, named=True))
                del self.trackers[name]
                with contextlib.suppress(Exception):  # its run marked failed where it can be, its resources freed
                    tracker.close(failed=True)

    def step(self, rec: dict, peaks: list[float] | None = None) -> None:
        """One finished step's record (metrics.jsonl line with this step's tokens_per_s, trackers, progress). Its
        `step_s` (the data wait and the step, without an evaluation or save after it) times tokens/s, else the time
        since the last step."""
        if not self.active:
            return
        now = time.time()
        secs = max(rec.get("step_s") or now - self.last_step, 1e-9)
        self.write({**rec, "tokens_per_s": round(rec["tokens"] / secs, 2)})
        step, self.last_step = rec["step"], now
        self.window_tokens, self.window_s = self.window_tokens + rec["tokens"], self.window_s + secs
        tok_s = self.window_tokens / self.window_s
        done = step - self.start
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        if step % self.log_interval == 0 or step == self.total:  # by the run's step, as after a resume
            if self.bar is None:
                eta = (now - self.t0) / max(done, 1) * (self.total - step)
                norm = f" | grad norm {rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else ""
                mem = f" | peak mem {fmt_bytes(max(peaks))}" if peaks else ""
                self.print(f"step {step}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e}{norm} | "
                           f"{tok_s:,.0f} tok/s{mem} | elapsed {hms(now - self.t0)} | eta {hms(eta)}")
            self.window_tokens, self.window_s = 0, 0.0

    def close(self, failed: bool = False) -> None:
        """End the progress bar and the trackers' runs (`failed`: the run stopped on an error)."""
        if self.bar is not None:
            self.bar.close()
        for name, tracker in self.trackers.items():
            try:
                tracker.close(failed)
            except Exception as e:  # noqa: BLE001 -- the run's own outputs are complete: report only
                log.warning("report_to %s: it failed to close (%s)", name, one_line(e, named=True))
        self.trackers = {}
