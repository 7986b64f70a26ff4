"""Checkpoints that survive preemption: atomic tags, rotation, and what exact resume needs.

A checkpoint is DeepSpeed's tag directory (layer files, per-stage model/optimizer/scheduler states)
plus, written by us into the same directory before it becomes visible:

  trainer_state.json      step, topology, evaluation history, early-stopping and bad-step counters
  rng_state_rank{R}.pt    Python, NumPy and torch RNG states of rank R
  run_config.json         the run's config as loaded (compared with the config in force at resume)
  model_config.json       a full run's model config (training/resume.py: a resume must build the same model)
  lora_config.json        a LoRA run's adapters, base and its fingerprint (models/lora.py)
  manifest.json           every file of the tag with its size (a truncated file is found before loading)

Every tag is written as `.tmp-<tag>`, renamed to `<tag>` once all ranks are done, and only then named
in `latest`: a run killed half-way through a save leaves a `.tmp-*` directory (removed at the next
start) and the previous checkpoint untouched. A save that fails on any rank (a full disk above all) is
removed on every rank and reported as one line (`SaveFailed`); the previous checkpoint is untouched.
Every file is flushed to disk (fsync, one process per node) before the rename, the rename before `latest`
names the tag, and `latest` before older tags are rotated away: a power loss or kernel crash cannot leave
`latest` naming a tag whose data never reached the disk after the previous one was deleted.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from models.diskspace import NO_SPACE, fmt_size, free_bytes, is_no_space, no_space_message, tree_size
from models.outdir import RUN_TAG, latest_tag, run_tags
from pipeft import one_line

TAG = RUN_TAG  # a checkpoint's directory name, global_stepN
OLD = ".old-"  # a tag moved aside while a re-save of its step puts the new copy in place
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RNG_FILE = "rng_state_rank{}.pt"  # one rank's RNG states in a checkpoint (rng_state), by its rank


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); a checkpoint of the last good state was saved."""


class SaveFailed(TrainingStopped):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint is untouched."""


def tag_of(step: int) -> str:
    return f"global_step{step}"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage: a rename, or a `latest` naming a tag, must
    not reach the disk before what it names (after a power loss or kernel crash, not only a killed process).
    A filesystem that cannot fsync a directory (EINVAL) is left as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not path.is_dir() or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (deepest first)."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fsync_path(p)
    for d in reversed(dirs):
        fsync_path(d)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary name unique to this process and call, flush it to disk, then rename into place
    (and flush the directory, so the new name survives a crash)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


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
    data_fingerprint: str | None = None  # hash of the training rows (trainer.data_fingerprint)
    finished: bool = False  # the run ended (last step or early stopping): a re-run has nothing to do
    eval_fingerprint: str | None = None  # hash of the eval samples: eval losses of other eval data do not compare
    end_evals: list[int] = field(default_factory=list)  # steps of end-of-run evaluations (off the eval schedule)
    cut_short: bool = False  # it finished because max_steps / n_epoches came to at most its step on a resume
    # it finished because early_stopping_patience ran out (a raised patience continues it); None: not recorded (a
    # state written before it was; read: it finished before its length unless it was cut short)
    patience_ended: bool | None = None
    length: int | None = None  # the run's length in steps when it was saved (None: written before it was recorded)

    def best_eval(self, scheduled: bool = False) -> tuple[int, float] | None:
        """The (step, loss) of the lowest eval loss, the earliest on ties; a non-finite loss never counts as best.
        `scheduled`: of the evaluations on the eval_interval schedule only (see evals_since_best)."""
        evals = [e for e in self.evals if (not scheduled or e[0] not in self.end_evals) and math.isfinite(e[1])]
        return min(evals, key=lambda e: (e[1], e[0])) if evals else None  # None also when every loss is NaN/inf

    def evals_since_best(self) -> int:
        """Early stopping's count: scheduled evaluations after the best scheduled one. End-of-run evaluations (of a
        run continued later) are left out, as a run trained that long in one go never made them; they still rank
        for keep_best and `best`. With no finite loss yet, every scheduled evaluation counts (as HF Trainer's patience
        counts each non-improving NaN)."""
        best = self.best_eval(scheduled=True)
        return sum(1 for s, _ in self.evals if (best is None or s > best[0]) and s not in self.end_evals)

    def write(self, tag_dir: Path) -> None:
        """Strict JSON: a NaN or infinite eval loss is null (read back as NaN, which never counts as best)."""
        from training.monitor import finite_or_null

        atomic_write_text(tag_dir / STATE_FILE, json.dumps(finite_or_null(asdict(self)), indent=1, allow_nan=False))

    @classmethod
    def read(cls, tag_dir: Path) -> RunState:
        """The state saved in `tag_dir`; keys this version does not know (a newer version's) are left out with a
        warning. A state with `early_stopped` (written for an hour by d37d687..c6bea29) also loses its eval
        fingerprint, which was of the packed eval rows then: not comparable with the samples' fingerprint now."""
        raw = json.loads((tag_dir / STATE_FILE).read_text())
        raw["evals"] = [(s, math.nan if loss is None else loss) for s, loss in raw.get("evals", [])]
        raw["eval_fingerprint"] = saved_eval_fingerprint(raw)
        if raw.pop("early_stopped", None):  # d37d687..c6bea29's name of it
            raw.setdefault("patience_ended", True)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            logging.getLogger(__name__).warning("%s: keys this version does not know, left out: %s",
                                                tag_dir / STATE_FILE, ", ".join(unknown))
        return cls(**{k: v for k, v in raw.items() if k in known})


def saved_eval_fingerprint(raw: dict) -> str | None:
    """The eval fingerprint of a trainer_state.json's contents, None where there is none to compare: not written, or
    written with `early_stopped` (d37d687..c6bea29: of the packed eval rows, where it is of the samples now)."""
    return None if "early_stopped" in raw else raw.get("eval_fingerprint")


def rng_state() -> dict:
    """Python, NumPy, torch (host) and the accelerator's RNG states (DeepSpeed's accelerator: cuda, hpu, ...)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name, keys, *rest = np.random.get_state()  # its key array as a tensor: the file loads with weights_only=True
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest),
            "torch": torch.get_rng_state(),
            "device": acc.device_name(),  # on the CPU the accelerator's generator is torch's own, saved above
            "accelerator": acc.get_rng_state() if acc.device_name() != "cpu" else None}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; the accelerator's part only on the same device type (checkpoints written before
    this key existed hold CUDA states under "cuda")."""
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # (a file written before: the key array as numpy's)
    np.random.set_state((name, keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys, *rest))
    torch.set_rng_state(state["torch"])
    acc = get_accelerator()
    device, saved = state.get("device"), state.get("accelerator")
    if device is None and state.get("cuda"):  # one state per visible GPU: this rank's
        device, saved = "cuda", state["cuda"][min(int(acc.current_device()), len(state["cuda"]) - 1)]
    if saved is not None and device == acc.device_name():
        acc.set_rng_state(saved)


def load_rng_state(path: Path) -> dict:
    """A checkpoint's RNG file: tensors and plain values (torch.load's weights_only); one written before held
    numpy's array, which only a full unpickling reads."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, weights_only=False)


def write_manifest(tag_dir: Path) -> None:
    """manifest.json: every file of the tag (relative path) with its size; not trainer_state.json, which
    `update_state` rewrites in place (it is checked by reading it)."""
    sizes = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST_FILE, STATE_FILE)}
    atomic_write_text(tag_dir / MANIFEST_FILE, json.dumps(sizes, separators=(",", ":")))


def fault_pause(where: str, step: int, until=None) -> None:
    """Testing aid: PIPEFT_FAULT_PAUSE="WHERE:STEP:SECONDS[:FILE][,...]" (WHERE = step | save | setup | data | validate) waits
    there, giving a test a known moment to deliver a real SIGTERM or SIGKILL, or to start a second run; `until()`
    true or FILE existing ends the wait early. With PIPEFT_FAULT_PAUSED=DIR, a pause starting makes the file
    DIR/WHERE-STEP-rankRANK. Unset in normal runs."""
    for spec in filter(None, os.environ.get("PIPEFT_FAULT_PAUSE", "").split(",")):
        at, at_step, seconds, *release = spec.split(":", 3)
        if at == where and int(at_step) == step:
            if mark := os.environ.get("PIPEFT_FAULT_PAUSED"):
                Path(mark, f"{where}-{step}-rank{os.environ.get('RANK', '0')}").touch()
            end = time.time() + float(seconds)
            while time.time() < end and not (until and until()) and not (release and os.path.exists(release[0])):
                time.sleep(0.05)


class Checkpoints:
    """The tag directories under save_path: save (atomic), find, rotate."""

    def __init__(self, save_path: str | Path, rank: int, keep_last: int | None, keep_best: int | None,
                 trainable_only: bool = False, extra_files: dict[str, str] | None = None,
                 resume_how: str = "resume with the same command", lock=None):
        """`trainable_only`: layer files hold only trainable weights (LoRA adapters); `extra_files`: name -> text
        written into every tag (e.g. lora_config.json); `resume_how`: said when a save fails; `lock`: rank 0's
        RunLock, held when a checkpoint is named (a run that lost it to another writes nothing more there)."""
        self.root, self.rank, self.keep_last, self.keep_best = Path(save_path), rank, keep_last, keep_best
        self.trainable_only, self.extra_files = trainable_only, extra_files or {}
        self.last_size: int | None = None  # bytes of the newest checkpoint (None: not measured yet)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.resume_how, self.lock = resume_how, lock

    def latest(self) -> str | None:
        if not (self.root / "latest").is_file():
            return None
        tag = latest_tag(self.root)
        return tag if TAG.match(tag) and (self.root / tag).is_dir() else None  # not "" or "..": no checkpoint

    def tags(self) -> list[str]:
        """Complete tags, oldest first."""
        return run_tags(self.root)

    def remove_partial(self) -> list[str]:
        """Rank 0: delete `.tmp-*` tags a killed save left behind; returns their names. A tag a killed re-save had
        moved aside (`.old-*`, `save`) is put back where its new copy never arrived, else deleted."""
        gone = [p.name for p in self.root.glob(".tmp-*") if p.is_dir()]
        for name in gone:
            shutil.rmtree(self.root / name, ignore_errors=True)
        for old in (p for p in self.root.glob(f"{OLD}*") if p.is_dir()):
            final = self.root / old.name.removeprefix(OLD)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
        return gone

    def save(self, engine, state: RunState, extra: dict[str, str] | None = None,
             needed: tuple[str, ...] | list[str] = ()) -> Path:
        """Collective: every rank calls it. Returns the tag directory. `extra`: more name -> text files for
        this tag (rank 0). `needed`: the files this rank's resume would load (rundir.stage_files), which it must see
        in the tag before the tag is named (and an older one rotated away): rank 0's manifest is what rank 0 sees.
        Raises SaveFailed on every rank when any rank could not write its part."""
        import torch.distributed as dist

        tag = tag_of(state.step)
        tmp = f".tmp-{tag}"
        self.check_lock(tag)  # (also the barrier before the write) nothing written when lost
        if self.rank == 0:
            shutil.rmtree(self.root / tmp, ignore_errors=True)
            self.warn_if_short("this checkpoint")
        problem, in_engine = None, True
        try:
            engine.save_checkpoint(str(self.root), tag=tmp, save_latest=False,
                                   exclude_frozen_parameters=self.trainable_only)
            in_engine = False
            torch.save(rng_state(), self.root / tmp / RNG_FILE.format(self.rank))
            if self.rank == 0:
                state.write(self.root / tmp)
                for name, text in {**self.extra_files, **(extra or {})}.items():
                    atomic_write_text(self.root / tmp / name, text)
        except Exception as e:  # noqa: BLE001 - reported as one line below, on every rank
            problem = self._problem_of(e, tag, f"saving checkpoint {tag} in {self.root} failed on rank {self.rank}")
            if in_engine:  # DeepSpeed's save ends in a barrier (after its writes) that the other ranks are in
                dist.barrier()
        fault_pause("save", state.step)
        failed = self._problems(problem)  # also the barrier: every rank has written its part
        if not failed:  # ... and sees the files its resume would load (a write that never reached a shared disk)
            failed = self._problems(next((f"saving checkpoint {tag} in {self.root} failed: rank {self.rank} does not "
                                          f"see {name} in {self.root / tmp} (is save_path one directory that every "
                                          "node shares?)" for name in needed if not (self.root / tmp / name).is_file()),
                                         None))
        if not failed:  # one process per node flushes what the node wrote before the tag may be named
            failed = self._problems(self._flush(self.root / tmp, tag) if self.local_rank == 0 else None)
        if failed:
            if self.rank == 0:
                shutil.rmtree(self.root / tmp, ignore_errors=True)
            dist.barrier()
            raise self._failed(failed[0], tag)
        finish = None  # (the problem, whether the previous checkpoint is named for a resume)
        if self.rank == 0 and (lost := self._lost(tag)):  # its .tmp- directory left to the run that took save_path
            finish = (lost, False)
        elif self.rank == 0:  # what fails here (a disk that fills now) is one line on every rank too
            final, aside = self.root / tag, self.root / f"{OLD}{tag}"
            try:
                write_manifest(self.root / tmp)
                if final.exists():  # a re-run of the same step (e.g. resumed before it): replaced, kept aside until
                    shutil.rmtree(aside, ignore_errors=True)  # the new one is in place (remove_partial restores it)
                    os.replace(final, aside)
                os.replace(self.root / tmp, final)
                fsync_path(self.root)  # the rename is on disk before `latest` names it and before rotation deletes
                atomic_write_text(self.root / "latest", tag)
                shutil.rmtree(aside, ignore_errors=True)
                self.last_size = tree_size(final)
                self._after_save(state)
            except Exception as e:  # noqa: BLE001 - reported below, on every rank
                finish = (self._problem_of(e, tag, f"finishing checkpoint {tag} in {self.root} failed"), True)
                shutil.rmtree(self.root / tmp, ignore_errors=True)
                if aside.exists() and not final.exists():  # the new copy never arrived: the old one stays
                    os.replace(aside, final)
        if failed := self._problems(finish):
            problem, named = failed[0]
            raise self._failed(problem, tag) if named else SaveFailed(problem)
        return self.root / tag

    def _problem_of(self, e: Exception, tag: str, what: str) -> str:
        """The one line for `e`, raised while saving checkpoint `tag`: the disk's free space when it is full, else
        `what`: the exception."""
        if is_no_space(e, self.root):
            return no_space_message(f"saving checkpoint {tag} in {self.root}", self.root, self.last_size or None)
        return f"{what}: {one_line(e, named=True)}"

    def _lost(self, tag: str) -> str:
        """Rank 0: why checkpoint `tag` may not be written: this run lost save_path's lock to another run (it was
        paused past the heartbeat's limit); '' while it holds it, or when that cannot be read now."""
        try:
            lost = self.lock.lost() if self.lock is not None else None
        except OSError:  # a network filesystem's hiccup: nothing says another run writes here
            lost = None
        return f"checkpoint {tag} not saved in {self.root}: {lost}; this run stops, leaving save_path to it" if lost else ""

    def check_lock(self, tag: str) -> None:
        """Collective: SaveFailed on every rank when rank 0 finds its lock taken over (`_lost`)."""
        if failed := self._problems((self._lost(tag) or None) if self.rank == 0 else None):
            raise SaveFailed(failed[0])

    def _failed(self, problem: str, tag: str) -> SaveFailed:
        """SaveFailed for `problem`, naming the checkpoint `latest` names (the previous one, or `tag` when only what
        follows naming it failed) and whether a resume can take it."""
        from training.resume import tag_problem  # training.resume imports this module

        kept = self.latest()
        if not kept:
            return SaveFailed(f"{problem}; no earlier checkpoint")
        if bad := tag_problem(self.root / kept):  # a damaged one a resume passed over, saved again at its step
            return SaveFailed(f"{problem}; `latest` names {self.root / kept}, which is damaged ({bad}): a resume "
                              "passes over it for the newest intact checkpoint")
        free = "free space and " if NO_SPACE in problem else ""  # (a read-only save_path needs no space)
        return SaveFailed(f"{problem}; the {'previous ' if kept != tag else ''}checkpoint {self.root / kept} is intact: "
                          f"{free}{self.resume_how}")

    @staticmethod
    def _problems(problem: object) -> list:
        """Every rank's problem (None: none), gathered on every rank; the non-empty ones."""
        import torch.distributed as dist

        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        return [p for p in problems if p]

    def _flush(self, tag_dir: Path, tag: str) -> str | None:
        """fsync a tag's files (this node's writes; on a network filesystem its close() already sent them):
        None, or the one-line problem."""
        try:
            fsync_tree(tag_dir)
        except OSError as e:
            return (no_space_message(f"saving checkpoint {tag} in {self.root}", self.root, self.last_size or None)
                    if is_no_space(e, self.root) else
                    f"flushing checkpoint {tag} in {self.root} to disk failed on rank {self.rank}: {type(e).__name__}: {e}")
        return None

    def warn_if_short(self, what: str) -> None:
        """Rank 0, before a save (and at start): warn when the free space is below the size of the last checkpoint."""
        if self.last_size is None:
            latest = self.latest()
            self.last_size = tree_size(self.root / latest) if latest else 0
        free = free_bytes(self.root)
        if self.last_size and free < self.last_size:
            print(f"warning: {self.root} has {fmt_size(free)} free but the last checkpoint took {fmt_size(self.last_size)}: "
                  f"{what} will probably not fit (the previous one stays intact if it does not)", flush=True)

    def update_state(self, state: RunState) -> None:
        """Collective: rewrite trainer_state.json of the already saved tag of `state.step` (e.g. after the final
        evaluation), without writing the weights again; then rotate. Not when this run lost save_path's lock."""
        tag = tag_of(state.step)
        self.check_lock(tag)
        problem = None
        if self.rank == 0:
            try:
                state.write(self.root / tag)
                self._after_save(state)
            except OSError as e:  # a disk that filled since the save: one line on every rank, the tag intact
                problem = self._problem_of(e, tag, f"updating {STATE_FILE} of checkpoint {tag} in {self.root} failed")
        if failed := self._problems(problem):  # also the barrier
            raise self._failed(failed[0], tag)

    def _after_save(self, state: RunState) -> None:
        """Rank 0: with keep_best the `best` file naming the best-scored tag that exists (none: no file; keep_best
        turned off on resume: removed), written before rotation deletes anything; then rotation (which keeps it)."""
        best = self.best_tag(state)
        if best is not None:
            atomic_write_text(self.root / "best", best)
        else:
            (self.root / "best").unlink(missing_ok=True)
        self.rotate(state)

    def _ranked(self, state: RunState) -> list[str]:
        """The tags that exist and have a finite eval loss, best first (ties: the earlier step): a diverged
        checkpoint is never `best` nor kept as one (HF Trainer's best_model_checkpoint likewise)."""
        tags = set(self.tags())
        return [tag_of(s) for _, s in sorted((loss, s) for s, loss in state.evals
                                             if tag_of(s) in tags and math.isfinite(loss))]

    def best_tag(self, state: RunState) -> str | None:
        """With keep_best, the tag `best` names: the best-scored one that has a checkpoint; else None."""
        ranked = self._ranked(state) if self.keep_best is not None else []
        return ranked[0] if ranked else None

    def best_line(self, state: RunState) -> str | None:
        """The run's closing line on its best eval loss and where that step's weights are, or None without evals."""
        best = state.best_eval() if state.evals else None
        if state.evals and best is None:
            return "no eval loss was finite: no best checkpoint"
        if best is None:
            return None
        tag, kept, pointer = tag_of(best[0]), self.best_tag(state), self.root / "best"
        if kept is not None:
            where = (f"{pointer} names its checkpoint" if kept == tag else
                     f"no checkpoint of that step; {pointer} names {kept}, the best evaluated one saved")
        else:  # without keep_best, save_interval and keep_last decide which steps have a checkpoint
            where = (f"its checkpoint: {self.root / tag}" if (self.root / tag).is_dir() else
                     "no checkpoint of that step" + ("" if self.keep_best else ": keep_best keeps the best evaluated ones"))
        return f"best eval loss {best[1]:.4f} at step {best[0]} ({where})"

    def keep(self, state: RunState) -> set[str]:
        """Tags to keep: the newest `keep_last` (all when neither limit is set), the `keep_best` best by eval
        loss, the one `latest` names (resume needs it) and the one of `state`'s step (the checkpoint this run resumed
        from when a newer one was damaged and passed over: the only intact one)."""
        tags = self.tags()
        keep = set(tags[-self.keep_last:]) if self.keep_last is not None else set()
        if self.keep_last is None and self.keep_best is None:
            keep = set(tags)
        if self.keep_best is not None:
            keep |= set(self._ranked(state)[:self.keep_best])
        if latest := self.latest():
            keep.add(latest)
        if tag_of(state.step) in tags:
            keep.add(tag_of(state.step))
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
