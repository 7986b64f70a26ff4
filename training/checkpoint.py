"""Checkpoints that survive preemption: atomic tags, rotation, and what exact resume needs.

A checkpoint is DeepSpeed's tag directory (layer files, per-stage model/optimizer/scheduler states)
plus, written by us into the same directory before it becomes visible:

  trainer_state.json      step, topology, evaluation history, early-stopping and bad-step counters
  rng_state_rank{R}.pt    Python, NumPy and torch RNG states of rank R

Every tag is written as `.tmp-<tag>`, renamed to `<tag>` once all ranks are done, and only then named
in `latest`: a run killed half-way through a save leaves a `.tmp-*` directory (removed at the next
start) and the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

TAG = re.compile(r"global_step(\d+)$")
STATE_FILE = "trainer_state.json"


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); a checkpoint of the last good state was saved."""


def tag_of(step: int) -> str:
    return f"global_step{step}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RunState:
    """What a resumed run needs beyond DeepSpeed's states; saved as trainer_state.json in each tag."""

    step: int  # optimizer steps done (global, counting skipped ones)
    pipe: int
    data: int
    parts: list[int]
    global_batch: int
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    bad_steps: int = 0  # consecutive non-finite steps
    finished: bool = False  # the run ended (last step or early stopping): a re-run has nothing to do

    def best_eval(self) -> tuple[int, float] | None:
        """The (step, loss) of the lowest eval loss, the earliest on ties; a non-finite loss never counts as best."""
        return min(self.evals, key=lambda e: (_score(e[1]), e[0])) if self.evals else None

    def evals_since_best(self) -> int:
        best = self.best_eval()
        return 0 if best is None else sum(1 for s, _ in self.evals if s > best[0])

    def write(self, tag_dir: Path) -> None:
        atomic_write_text(tag_dir / STATE_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, tag_dir: Path) -> RunState:
        raw = json.loads((tag_dir / STATE_FILE).read_text())
        raw["evals"] = [tuple(e) for e in raw.get("evals", [])]
        return cls(**raw)


def _score(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def rng_state() -> dict:
    """Python, NumPy, torch (host) and the accelerator's RNG states (DeepSpeed's accelerator: cuda, hpu, ...)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "device": acc.device_name(), "accelerator": acc.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; the accelerator's part only on the same device type (checkpoints written before
    this key existed hold CUDA states under "cuda")."""
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    acc = get_accelerator()
    device, saved = state.get("device"), state.get("accelerator")
    if device is None and state.get("cuda"):  # one state per visible GPU: this rank's
        device, saved = "cuda", state["cuda"][min(int(acc.current_device()), len(state["cuda"]) - 1)]
    if saved is not None and device == acc.device_name():
        acc.set_rng_state(saved)


def fault_pause(where: str, step: int, until=None) -> None:
    """Testing aid: PIPEFT_FAULT_PAUSE="WHERE:STEP:SECONDS" (WHERE = step | save) waits there, giving a test a
    known moment to deliver a real SIGTERM or SIGKILL; `until()` true ends the wait early. Unset in normal runs."""
    spec = os.environ.get("PIPEFT_FAULT_PAUSE", "")
    if not spec:
        return
    at, at_step, seconds = spec.split(":")
    if at == where and int(at_step) == step:
        end = time.time() + float(seconds)
        while time.time() < end and not (until and until()):
            time.sleep(0.05)


class Checkpoints:
    """The tag directories under save_path: save (atomic), find, rotate."""

    def __init__(self, save_path: str | Path, rank: int, keep_last: int | None, keep_best: int | None,
                 trainable_only: bool = False, extra_files: dict[str, str] | None = None):
        """`trainable_only`: layer files hold only trainable weights (LoRA adapters); `extra_files`: name -> text
        written into every tag (e.g. lora_config.json)."""
        self.root, self.rank, self.keep_last, self.keep_best = Path(save_path), rank, keep_last, keep_best
        self.trainable_only, self.extra_files = trainable_only, extra_files or {}

    def latest(self) -> str | None:
        f = self.root / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        return tag if (self.root / tag).is_dir() else None

    def tags(self) -> list[str]:
        """Complete tags, oldest first."""
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
        return [name for _, name in sorted(found)]

    def remove_partial(self) -> list[str]:
        """Rank 0: delete `.tmp-*` tags a killed save left behind; returns their names."""
        gone = [p.name for p in self.root.glob(".tmp-*") if p.is_dir()]
        for name in gone:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return gone

    def save(self, engine, state: RunState) -> Path:
        """Collective: every rank calls it. Returns the tag directory."""
        tag = tag_of(state.step)
        tmp = f".tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(self.root / tmp, ignore_errors=True)
        torch.distributed.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp, save_latest=False, exclude_frozen_parameters=self.trainable_only)
        torch.save(rng_state(), self.root / tmp / f"rng_state_rank{self.rank}.pt")
        if self.rank == 0:
            state.write(self.root / tmp)
            for name, text in self.extra_files.items():
                atomic_write_text(self.root / tmp / name, text)
        fault_pause("save", state.step)
        torch.distributed.barrier()
        if self.rank == 0:
            final = self.root / tag
            if final.exists():  # a re-run of the same step (e.g. resumed before it): replace it
                shutil.rmtree(final)
            os.replace(self.root / tmp, final)
            atomic_write_text(self.root / "latest", tag)
            self._after_save(state)
        torch.distributed.barrier()
        return self.root / tag

    def update_state(self, state: RunState) -> None:
        """Collective: rewrite trainer_state.json of the already saved tag of `state.step` (e.g. after the final
        evaluation), without writing the weights again; then rotate."""
        if self.rank == 0:
            state.write(self.root / tag_of(state.step))
            self._after_save(state)
        torch.distributed.barrier()

    def _after_save(self, state: RunState) -> None:
        """Rank 0: rotation, and with keep_best the `best` file naming the best kept tag."""
        self.rotate(state)
        best = state.best_eval()
        if self.keep_best is not None and best is not None and (self.root / tag_of(best[0])).is_dir():
            atomic_write_text(self.root / "best", tag_of(best[0]))

    def keep(self, state: RunState) -> set[str]:
        """Tags to keep: the newest `keep_last` (all when neither limit is set), the `keep_best` best by eval
        loss, and the one `latest` names (resume needs it)."""
        tags = self.tags()
        keep = set(tags[-self.keep_last:]) if self.keep_last is not None else set()
        if self.keep_last is None and self.keep_best is None:
            keep = set(tags)
        if self.keep_best is not None:
            scored = sorted((_score(loss), s) for s, loss in state.evals if tag_of(s) in tags)
            keep |= {tag_of(s) for _, s in scored[:self.keep_best]}
        if latest := self.latest():
            keep.add(latest)
        return keep

    def rotate(self, state: RunState) -> list[str]:
        """Rank 0: delete tags outside `keep`; returns them."""
        if self.keep_last is None and self.keep_best is None:
            return []
        keep = self.keep(state)
        gone = [t for t in self.tags() if t not in keep]
        for t in gone:
            shutil.rmtree(self.root / t, ignore_errors=True)
        return gone
