"""The run directory side of the trainer: the save_path lock, the checks that every node shares save_path and
builds the same data, preparing save_path, and resuming (a damaged checkpoint passed over, config changes said
and applied, the optimizer's settings from the config in force). A mixin of `training.trainer.Trainer`."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from data.settings import DATA_SETTINGS_FILE, data_settings_of, write_data_settings
from models.diskspace import tree_size, write_problem
from models.hf_io import LAYER_FILE, replace_side_files
from pipeft import one_line
from training.checkpoint import RNG_FILE, RunState, TrainingStopped, load_rng_state, set_rng_state
from training.compat import BATCH_KEYS
from training.config import ConfigError, start_over
from training.config_diff import DATA, SAMPLES, config_changes, same_global_batch, schedule_kind, start_schedule_at
from training.config_paths import used_save_path
from training.monitor import truncate_metrics
from training.resume import (
    RUN_CONFIG_FILE,
    course,
    earlier_tags,
    knob,
    length_before,
    name_resumed,
    read_run_config,
    resume_tag,
    tag_problem,
)
from training.runlock import LockError, RunLock, config_identity, launcher_token, record_job
from training.trackers import IDS_FILE

RUN_OUTPUTS = ("latest", "best", "metrics.jsonl", "runs", IDS_FILE, "wandb", "mlruns")  # besides the checkpoints
# DeepSpeed's names for a pipeline checkpoint's states besides the layer files (deepspeed/runtime/engine.py):
# `_get_ckpt_name`, one per pipeline stage (its model-parallel rank); `_get_rank_zero_ckpt_name`, the ZeRO optimizer
# state of each data-parallel rank of each stage, "bf16_" in front under bf16
MP_FILE = "mp_rank_{:02d}_model_states.pt"
ZERO_FILE = "{}zero_pp_rank_{}_mp_rank_{:02d}_optim_states.pt"


def checkpoint_files(pipe: int, data: int, layers: Iterable[int], zero_stages: Iterable[int], bf16: bool) -> list[str]:
    """The files a resume loads from a DeepSpeed pipeline checkpoint saved on `pipe` stages x `data` replicas: the
    layer file of each of `layers` (layer indices: PipelineModule.save_state_dict writes one per layer that has a
    state_dict, the first occurrence of a tied one), every stage's MP_FILE (DeepSpeed's load reads them all) and, for
    each of `zero_stages` (the stages whose ZeRO optimizer state is loaded), every data-parallel rank's ZERO_FILE."""
    return ([LAYER_FILE.format(i) for i in layers] + [MP_FILE.format(s) for s in range(pipe)]
            + [ZERO_FILE.format("bf16_" if bf16 else "", d, s) for s in zero_stages for d in range(data)])


def clear_run(save: Path, tags: list[str]) -> list[str]:
    """Remove what a run wrote in `save` (its checkpoint `tags` and RUN_OUTPUTS: metrics, TensorBoard events, the
    trackers' ids and local wandb / MLflow files), so that a replacing run (overwrite_save_path) starts clean; a
    symbolic link among them (wandb/ pointed at a bigger disk) is removed, not what it points to. Returns the names
    removed."""
    removed = [name for name in [*tags, *RUN_OUTPUTS] if os.path.lexists(save / name)]
    for name in removed:
        p = save / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return removed


def start_write_problem(save: Path, e: OSError) -> str:
    """The one line for a write in save_path that failed at a start (full, gone read-only): nothing trained yet."""
    written = e.filename2 or e.filename  # a copy's (shutil): its target (in a staging dir), then its source
    said = write_problem(f"writing {Path(written).name + ' in ' if written else ''}{save}", save, e)
    return f"{said}; the run stops before its first step, nothing of it lost: start it again once save_path can be written"


class RunDirectory:
    """Trainer methods that own save_path (see the module docstring); they use the Trainer's attributes."""

    def _take_lock(self) -> None:
        """Rank 0 takes save_path's run lock; a run already holding it stops every rank with one line. Every rank
        follows rank 0's verdict on whether this start resumes (load_config: a restart of the job that started the
        run fresh resumes it; only rank 0 judges, the others may lack the job's variables)."""
        cfg, note, error = self.cfg, None, None
        if self.rank == 0 and (error := cfg.refusal) is None:  # load_config's refusals that only rank 0 could judge
            self.lock = RunLock(cfg.save_path, config=str(Path(cfg.path).resolve()))
            try:
                note = self.lock.acquire()
                if error := used_save_path(cfg, cfg.path):  # a run that filled save_path since the config's check
                    self.lock.release()
                    self.lock = None
            except (LockError, OSError) as e:
                self.lock, error = None, f"{cfg.path}: {e}"
        said = [(error, cfg.resume, cfg.overwrite_save_path) if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(said, src=0)
        error, cfg.resume, cfg.overwrite_save_path = said[0]
        if error:
            raise ConfigError(error)
        if note:
            self.log(note)

    def _check_shared_save_path(self) -> None:
        """Every rank must see what rank 0 writes in save_path, and rank 0 what each node writes there (rank 0
        renames checkpoint directories that every stage wrote into). A node-local save_path stops every rank
        with one line before anything else happens."""
        save, host = Path(self.cfg.save_path), self.hosts[self.rank]
        token = [uuid.uuid4().hex if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(token, src=0)
        probe = save / f".probe-{token[0]}"
        mine = save / f".probe-{token[0]}-rank{self.rank}" if self.local_rank == 0 else None
        wrote = None  # this rank's failed write (save_path full, read-only): every rank stops with it
        try:
            if self.rank == 0:
                for old in save.glob(".probe-*"):  # a start killed here left them (the lock: none is live but ours)
                    if not old.name.startswith(probe.name):
                        old.unlink(missing_ok=True)
                probe.write_text(token[0])
            if mine is not None:
                save.mkdir(parents=True, exist_ok=True)
                mine.write_text(host)
        except OSError as e:
            wrote = start_write_problem(save, e)
        torch.distributed.barrier()
        try:
            sees = probe.read_text() == token[0]
        except OSError:
            sees = False
        seen = [None] * self.world
        torch.distributed.all_gather_object(seen, (sees, None if mine is None else mine.name, wrote))
        torch.distributed.barrier()
        problems = []
        if self.rank == 0:
            problems = [f"rank {r} (host {self.hosts[r]}) does not see what rank 0 (host {host}) writes there"
                        for r, (ok, _, _) in enumerate(seen) if not ok]
            problems += [f"rank 0 does not see what rank {r} (host {self.hosts[r]}) writes there"
                         for r, (_, name, _) in enumerate(seen) if name and not (save / name).is_file()]
            for f in save.glob(f".probe-{token[0]}*"):
                f.unlink(missing_ok=True)
        said = [problems]
        torch.distributed.broadcast_object_list(said, src=0)
        if mine is not None:
            mine.unlink(missing_ok=True)  # on a node-local disk rank 0 could not remove it
        if failed := next((w for _, _, w in seen if w), None):
            raise TrainingStopped(failed)
        if said[0]:
            raise ConfigError(f"{self.cfg.path}: save_path {save} is not one directory that every node shares: "
                              f"{said[0][0]}{f' (and {len(said[0]) - 1} more)' if len(said[0]) > 1 else ''}; "
                              "put save_path on a filesystem every node mounts at the same path (NFS, Lustre, ...)")

    def _check_same_data(self) -> None:
        """All ranks built the same training rows (the first stage feeds inputs, the last reads labels: a different
        data file, tokenizer or library version on one node would silently mismatch them), and the same eval samples
        (each replica evaluates its share of them: a node's own eval file was mixed into the eval loss unsaid, or a
        count of them that differs hung the evaluation)."""
        every = [None] * self.world
        torch.distributed.all_gather_object(every, (self.data_fingerprint, self.eval_fingerprint))
        bad = [r for r, fp in enumerate(every) if fp != every[0]]
        if bad:
            r = bad[0]
            what = " and the ".join(name for name, mine, first in zip(("training data", "eval data"), every[r], every[0],
                                                                       strict=True) if mine != first)
            raise ConfigError(f"{self.cfg.path}: the {what} differ between processes: rank {r} (host {self.hosts[r]}) "
                              f"built other samples than rank 0 (host {self.hosts[0]}) from the same config (different data "
                              "files, tokenizer or library versions on the nodes?); make them identical on every node")

    def _prepare_save_path(self) -> int:
        """Resume from `latest` (resume "auto"/true) or start fresh; then the side files (HF config, tokenizer, data
        settings) beside the checkpoints, so pp_to_hg needs nothing else. Returns the step to start from."""
        cfg, save = self.cfg, Path(self.cfg.save_path)
        launchers = [None] * self.world  # what started each rank: a torchrun agent restarts its own workers
        if cfg.resume is False:
            torch.distributed.all_gather_object(launchers, launcher_token())
        problem = None
        if self.rank == 0:
            try:
                save.mkdir(parents=True, exist_ok=True)
                for name in self.ckpts.remove_partial():
                    print(f"removed {save / name}: a checkpoint that was not completely written", flush=True)
                if cfg.resume is False:  # load_config refused a used save_path unless overwrite_save_path
                    if removed := clear_run(save, self.ckpts.tags()):
                        why = "overwrite_save_path" if cfg.overwrite_save_path else "a new run (\"resume\": false)"
                        print(f"{why}: removed {', '.join(removed)} from {save}", flush=True)
                    record_job(save, launchers, config_identity(cfg.path, cfg.raw))  # a restart of this job (SLURM
                    # requeue, torchrun) resumes instead
            except OSError as e:
                problem = start_write_problem(save, e)
        self._stop_with_rank0s(problem)
        tag, notes = resume_tag(save) if cfg.resume in ("auto", True) else (None, [])
        tags = [None] * self.world
        torch.distributed.all_gather_object(tags, tag)  # every rank must load the same checkpoint
        if len(set(tags)) > 1:
            raise ConfigError(f"{cfg.path}: the ranks do not agree on the checkpoint to resume in {save}: "
                              + ", ".join(f"rank {r}: {t or 'none'}" for r, t in enumerate(tags))
                              + "; is save_path one directory that every node shares?")
        if tag is None and self.weights_from_checkpoint:  # the model was built without its base layer files
            raise ConfigError(f"{cfg.path}: the checkpoint to resume in {save} is gone since the run started; "
                              f"{start_over(cfg)}")
        for line in notes:
            self.log(line)
        self.state = self._run_state(0)
        if tag is not None:
            self._resume(save / tag)
        if self.rank == 0:  # after the resume's checks: a refused resume leaves the run's side files as they were
            if tag is not None and (line := name_resumed(self.ckpts, self.state)):  # no `latest`: name it
                self.log(line)
            try:
                replace_side_files(Path(cfg.model_path), save, kept=(DATA_SETTINGS_FILE,), say=self.log)
                write_data_settings(save, data_settings_of(cfg.template_settings, self.tokenizer, cfg.max_seq_len,
                                                          self.prompted))
                truncate_metrics(save / "metrics.jsonl", self.state.step)
            except OSError as e:
                problem = start_write_problem(save, e)
            self.ckpts.last_size = tree_size(save / tag) if tag is not None else 0
            self.ckpts.warn_if_short("the next checkpoint")
        self._stop_with_rank0s(problem)
        return self.state.step

    @staticmethod
    def _stop_with_rank0s(problem: str | None) -> None:
        """Every rank stops (TrainingStopped) with rank 0's `problem`, if it has one; a barrier otherwise."""
        said = [problem]
        torch.distributed.broadcast_object_list(said, src=0)
        if said[0]:
            raise TrainingStopped(said[0])

    def _resume(self, tag_dir: Path) -> None:
        cfg = self.cfg
        if bad := self._load_problem(tag_dir):  # a damaged file, found by any rank: every rank falls back together
            earlier = [t for t in earlier_tags(tag_dir.parent, tag_dir.name) if tag_problem(tag_dir.parent / t) is None]
            if not earlier:
                raise ConfigError(f"{cfg.path}: checkpoint {tag_dir} cannot be loaded ({bad}) and no earlier checkpoint "
                                  f"is intact; {start_over(cfg)}")
            self.log(f"checkpoint {tag_dir} cannot be loaded ({bad}); resuming from the previous intact checkpoint "
                     f"{tag_dir.parent / earlier[0]} instead ({tag_dir} is left in place)")
            return self._resume(tag_dir.parent / earlier[0])
        saved = self._saved_state(tag_dir)
        changed = self._check_changes(tag_dir, saved)
        same = self._same_layout(saved)
        hyper = self._optimizer_settings()  # the config's, before the checkpoint's are loaded over them
        # the saved LR scheduler state is not loaded into another kind of scheduler, nor on another layout (it holds
        # an entry per parameter group of the stage of its index: an embedding-only stage has one group, not two):
        # _set_optimizer_settings starts the scheduler at the step, where every kind has the lr it would have had
        self.schedule_restarted = self.schedule_switched or not same
        self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=same,
                                    load_lr_scheduler_states=not self.schedule_restarted,
                                    load_module_strict=self.lora is None)
        self.state = RunState(**{**saved.__dict__, "pipe": self.pp_size, "data": self.dp_size,
                                 "parts": list(self.model.parts), "global_batch": self.plan.global_batch,
                                 "data_fingerprint": self.data_fingerprint, "length": self.total_steps,
                                 **self._evals_kept(saved)})
        self.engine.global_steps = saved.step
        rng = tag_dir / RNG_FILE.format(self.rank)
        if same and rng.is_file():
            set_rng_state(load_rng_state(rng))
        # the schedule's lr at this step, always: a fresh optimizer (not same) holds the schedule's first lr, and
        # DeepSpeed loads a ZeRO optimizer's state after the scheduler's, bringing back the lr saved with it (the old
        # schedule's, when max_steps or n_epoches changed its length)
        self._set_optimizer_settings(hyper, saved.step, changed, same, say=self.changes_lr or self.changes_length)
        self.log(f"resumed from {tag_dir} at step {saved.step}" + ("" if same else
                 f"; topology changed (pipe {saved.pipe} -> {self.pp_size}, data {saved.data} -> {self.dp_size}, "
                 f"layer bounds {saved.parts} -> {list(self.model.parts)}): weights, step and LR schedule loaded, "
                 "optimizer state was reset"))

    def _saved_state(self, tag_dir: Path) -> RunState:
        return self._read_once(RunState.read, tag_dir)

    def _saved_run_config(self, tag_dir: Path) -> dict | None:
        return self._read_once(read_run_config, tag_dir)

    def _read_once(self, reader, tag_dir: Path):
        """reader(tag_dir) of a checkpoint (its RunState, its run config), read once per run and a copy returned each
        time (its warnings said once: the data check before the model is built and the resume both read it); an
        unreadable one raises at every call."""
        reads = vars(self).setdefault("checkpoint_reads", {})
        if (reader, tag_dir) not in reads:
            reads[reader, tag_dir] = reader(tag_dir)
        return copy.deepcopy(reads[reader, tag_dir])

    def _same_layout(self, saved: RunState) -> bool:
        """The checkpoint's stages, replicas and layer bounds are this run's (its optimizer state loads)."""
        return (saved.pipe, saved.data, saved.parts) == (self.pp_size, self.dp_size, list(self.model.parts))

    def _needed_files(self, tag_dir: Path) -> list[str]:
        """The files of checkpoint `tag_dir` this rank's DeepSpeed load reads (checkpoint_files): its stage's layers
        that load a state, every stage's model states and, where the optimizer state loads (ZeRO, the same layout),
        its stage's ZeRO files; before the model is built (refuse_data_changes), the model states only. None known
        when the checkpoint's state does not read (the resume says why)."""
        try:
            saved = self._saved_state(tag_dir)
        except (OSError, ValueError, TypeError):
            return []
        if getattr(self, "engine", None) is None:
            return checkpoint_files(saved.pipe, saved.data, [], [], False)
        return self.stage_files(saved.pipe, saved.data, self._same_layout(saved))

    def stage_files(self, pipe: int, data: int, optimizer: bool = True) -> list[str]:
        """The files of a checkpoint of `pipe` stages x `data` replicas this rank's load reads (checkpoint_files):
        its stage's layers that hold a state, every stage's model states and (`optimizer`, under ZeRO) its stage's
        ZeRO files. A save checks them too, before the checkpoint is named (Checkpoints.save)."""
        engine = self.engine
        start = getattr(self.model, "_local_start", 0)
        layers = [start + i for i, f in enumerate(getattr(self.model, "forward_funcs", ()))
                  if hasattr(f, "load_state_dict")]
        zero = [getattr(engine, "stage_id", 0)] if optimizer and engine.zero_optimization() else []
        return checkpoint_files(pipe, data, layers, zero, engine.bfloat16_enabled())

    def _load_problem(self, tag_dir: Path) -> str | None:
        """Collective: whether every file of a checkpoint that this load reads is there (a checkpoint of an older
        version has no manifest that resume_tag checks) and every file opens (each rank opens a share of them,
        memory-mapped, so only their structure is read). DeepSpeed's load has collectives inside: a rank failing
        there alone would leave the others waiting, so damage is found before it."""
        problem = next((f"rank {self.rank}: {name} is missing" for name in self._needed_files(tag_dir)
                        if not any((tag_dir / n).is_file() for n in  # (DeepSpeed also reads a ZeRO file's old name)
                                   (name, name.replace("_optim_states.pt", "optim_states.pt")))), None)
        for f in [] if problem else sorted(tag_dir.glob("*.pt"))[self.rank::self.world]:
            try:
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            except Exception as e:  # noqa: BLE001 - any failure to open it
                problem = f"rank {self.rank}: {f.name}: {one_line(e, 160, named=True)}"
                break
        found = [None] * self.world
        torch.distributed.all_gather_object(found, problem)
        return next((p for p in found if p), None)

    def _data_changes(self, tag_dir: Path, saved: RunState, say=None) -> list[str]:
        """What differs in the data since the checkpoint `saved` (its training samples, the global batch), refused
        unless allow_data_change_on_resume (eval data that keep_best / early stopping would compare: always).
        `say`: where the eval data warning goes (the log)."""
        cfg, what = self.cfg, []
        say = say or self.log
        if saved.data_fingerprint is not None and saved.data_fingerprint != self.data_fingerprint:
            if cfg.eval_split_ratio and saved.evals and (cfg.keep_best or cfg.early_stopping_patience):
                raise ConfigError(f"{cfg.path}: cannot resume {tag_dir}: the training samples differ from the "
                                  "checkpoint's, and the eval samples eval_split_ratio holds out are taken from the same "
                                  "data, so they differ too (some may have been trained on): keep_best / "
                                  "early_stopping_patience would compare eval losses of other eval sets; start a new run "
                                  "or resume with the same data")
            what.append("the training samples differ from the checkpoint's (data files, tokenizer or data settings)")
        if saved.eval_fingerprint is not None and saved.eval_fingerprint != self.eval_fingerprint:
            if saved.evals and (cfg.keep_best or cfg.early_stopping_patience):
                raise ConfigError(f"{cfg.path}: cannot resume {tag_dir}: the eval samples differ from the checkpoint's "
                                  "(eval data files, tokenizer or data settings): keep_best / early_stopping_patience "
                                  "compare every eval loss with the earlier ones, and losses on other eval data do not "
                                  "compare; restore the eval data, or start a new run")
            if self.eval_fingerprint is not None:  # (no eval data now: no later eval loss)
                say("warning: the eval samples differ from the checkpoint's: later eval losses are on other data"
                    + (f"; the {len(saved.evals)} earlier ones are not ranked with them (the best eval loss, "
                       "keep_best and early stopping start again)" if saved.evals else ""))
        if saved.global_batch != self.plan.global_batch:
            what.append(f"the global batch changed ({saved.global_batch} -> {self.plan.global_batch} {self.unit}s; "
                        f"{self.plan.batch_change_note(saved.step, saved.global_batch)})")
        if what and not cfg.allow_data_change_on_resume:
            raise ConfigError(f"{cfg.path}: cannot resume {tag_dir} exactly: {'; '.join(what)}, so samples would be "
                              "repeated or skipped; set \"allow_data_change_on_resume\": true to continue anyway, or "
                              "start a new run")
        return what

    def _evals_kept(self, saved: RunState) -> dict:
        """The resumed state's eval history and the fingerprint of the eval samples it was measured on: the saved
        one without eval data now (a later resume with them compares), none once the eval samples differ (ranked
        with the new losses, the old would be the best, keep_best's and early stopping's reference forever)."""
        if self.eval_fingerprint is None:
            return {"eval_fingerprint": saved.eval_fingerprint}
        if saved.eval_fingerprint not in (None, self.eval_fingerprint):
            return {"eval_fingerprint": self.eval_fingerprint, "evals": [], "end_evals": []}
        return {"eval_fingerprint": self.eval_fingerprint}

    def refuse_data_changes(self) -> None:
        """Collective, once the data are read, before the model is built (minutes for a large one): a resume that
        _check_changes would refuse for its data (the checkpoint resume_tag names) is refused now, on every rank."""
        cfg, save = self.cfg, Path(self.cfg.save_path)
        problem, tag = None, resume_tag(save)[0] if cfg.resume in ("auto", True) else None
        if tag is not None:
            try:
                saved = self._saved_state(save / tag)
                self._data_changes(save / tag, saved, say=lambda _: None)
            except ConfigError as e:
                old = self._saved_run_config(save / tag)
                keys = [c.key for c in config_changes(old, cfg.raw, lora_run=cfg.lora is not None) if c.kind == SAMPLES
                        ] if old is not None and saved.data_fingerprint != self.data_fingerprint else []
                problem = str(e) + (f" (data keys changed since it: {', '.join(keys)})" if keys else "")
            except (OSError, ValueError, TypeError):  # a damaged state: the resume falls back to an earlier checkpoint
                pass
        found = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, problem)
        # a checkpoint whose files do not load is not resumed (_resume falls back to an earlier one): not refused here
        if (problem := next((p for p in found if p), None)) and self._load_problem(save / tag) is None:
            raise ConfigError(problem)

    def finished_before_line(self) -> str | None:
        """Collective, once the data are read, before the model is built: the line a start of a run that had finished
        ends with, when it has nothing to do (course), else None. Only a `latest` that names an intact checkpoint is
        taken as the run's end: a start that resumes another one (and names it in `latest`) goes the whole way."""
        cfg, save = self.cfg, Path(self.cfg.save_path)
        tag, notes = resume_tag(save) if cfg.resume in ("auto", True) else (None, [])
        line = None
        if self.rank == 0 and tag is not None and not notes:
            try:
                saved, old = self._saved_state(save / tag), self._saved_run_config(save / tag)
            except (OSError, ValueError, TypeError):  # a damaged state: the resume says so
                saved = old = None
            if saved is not None and saved.finished:
                changes = None if old is None else config_changes(old, cfg.raw, lora_run=cfg.lora is not None)
                before = length_before(saved, changes, cfg, self.plan.steps_per_epoch)
                st = RunState(**{**saved.__dict__, **self._evals_kept(saved)})
                line = course(st, self.total_steps, before, cfg.early_stopping_patience, knob(cfg))
                line = line if st.finished else None
        said = [(line, None)] * self.world  # every rank's tag: ranks that do not agree are refused by the resume
        torch.distributed.all_gather_object(said, (line, tag))
        if not said[0][0] or len({t for _, t in said}) > 1:
            return None
        # (collective: a checkpoint whose files do not load is resumed from an earlier one, which is not finished)
        return said[0][0] if self._load_problem(save / tag) is None else None

    def _check_changes(self, tag_dir: Path, saved: RunState) -> set[str] | None:
        """Say what changed since the checkpoint (load_config refused what may not change); refuse different data
        or a different global batch unless allow_data_change_on_resume. Returns the optimizer.params keys that
        changed (None: unknown, the checkpoint has no run config)."""
        cfg = self.cfg
        old = self._saved_run_config(tag_dir)
        changes = same_global_batch(config_changes(old, cfg.raw, lora_run=self.lora is not None),
                                    saved.global_batch == self.plan.global_batch) if old is not None else []
        self.changes_lr = any(c.key.split(".")[0] in ("optimizer", "lr_schedule", "scheduler") for c in changes)
        self.schedule_switched = old is not None and schedule_kind(old) != schedule_kind(cfg.raw)
        self.changes_length = any(c.key in ("max_steps", "n_epoches") for c in changes)
        self.length_before = length_before(saved, changes if old is not None else None, cfg, self.plan.steps_per_epoch)
        if old is None:
            self.log(f"{tag_dir} holds no {RUN_CONFIG_FILE} (an older version wrote it): config changes since it are "
                     "not checked")
        elif changes:
            self.log(f"config changes since {tag_dir}:")
            for c in changes:
                self.log(f"  {c.line(allowed=cfg.allow_data_change_on_resume)}")
        what = self._data_changes(tag_dir, saved)
        if cfg.allow_data_change_on_resume:  # the keys allowed to change (the global batch and the rows: said above;
            # without a fingerprint in the checkpoint, the data keys are all there is to say)
            what += [f"{c.key} changed ({c.values()})" for c in changes if c.key not in BATCH_KEYS and (
                c.kind == DATA or c.kind == SAMPLES and saved.data_fingerprint is None)]
        for w in what:
            self.log(f"warning: {w}: the data order continues at this step's position, not sample-exact "
                     "(allow_data_change_on_resume)")
        return None if old is None else {c.key.split(".")[2] for c in changes if c.key.startswith("optimizer.params.")}

    def _optimizers(self) -> list:
        """The torch optimizer(s) whose param_groups hold the hyperparameters (inside DeepSpeed's wrappers)."""
        opt = self.engine.optimizer
        return [getattr(opt, "optimizer", opt)] if opt is not None else []

    def _optimizer_settings(self) -> dict:
        """The config's optimizer hyperparameters and scheduler base lrs, as built (before a checkpoint is loaded)."""
        sched = self.engine.lr_scheduler
        return {"groups": [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                           for o in self._optimizers()],
                "base_lrs": list(getattr(sched, "base_lrs", []) or [])}

    def _checkpoint_lr(self, same: bool) -> float | None:
        """The lr the checkpoint's run had next (its schedule, before the config in force is applied), where known:
        the project's schedule and torch's save it with their state, else a loaded optimizer state holds it."""
        sched, opts = self.engine.lr_scheduler, self._optimizers()
        if not self.schedule_restarted and (lrs := getattr(sched, "loaded_lr", None)):
            return lrs[0]
        if not self.schedule_restarted and isinstance(sched, LRScheduler) and not hasattr(sched, "lr_lambdas"):
            return sched.get_last_lr()[0]
        return opts[0].param_groups[0]["lr"] if same and opts else None

    def _set_optimizer_settings(self, hyper: dict, step: int, changed: set[str] | None, same: bool,
                                say: bool = True) -> None:
        """After a checkpoint's states are loaded (optimizer states if `same`): the settings the config changed
        (`changed` optimizer.params keys; None: unknown, all), the schedule's lr (and a cycled momentum) at `step`
        updates; a scheduler whose state was not loaded (schedule_restarted) is started there. Every other
        setting stays the checkpoint's: a loaded group holds values its scheduler set (e.g. OneCycle's betas)."""
        sched, opts = self.engine.lr_scheduler, self._optimizers()
        before = self._checkpoint_lr(same)
        every = changed is None or self.schedule_restarted  # (the new scheduler needs the groups it was built on)
        for opt, groups in zip(opts, hyper["groups"], strict=True):
            for g, new in zip(opt.param_groups, groups, strict=True):
                g.update({k: v for k, v in new.items() if every or k == "lr" or k in changed or k not in g})
        if self.schedule_restarted:
            start_schedule_at(sched, step)
        if hyper["base_lrs"] and hasattr(sched, "lr_lambdas"):  # the project's schedule (LambdaLR)
            sched.base_lrs = hyper["base_lrs"]
            for opt in opts:
                for g, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                    g["lr"] = base * fn(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in opts[0].param_groups]
        elif isinstance(sched, LRScheduler):  # torch's: the lr of its loaded state (get_lr() is the chained form)
            for opt in opts:
                for g, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
                    g["lr"] = lr
            if getattr(sched, "cycle_momentum", False):  # OneCycleLR, CyclicLR set this step's momentum in get_lr
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "use get_last_lr()": only its side effect is wanted
                    sched.get_lr()
        elif sched is not None and hasattr(sched, "get_lr"):  # DeepSpeed's scheduler: its lr at this step
            for opt in opts:
                for g, lr in zip(opt.param_groups, sched.get_lr(), strict=False):
                    g["lr"] = lr
                if getattr(sched, "cycle_momentum", False):  # OneCycle: beta1 cycles with the lr
                    for g, betas in zip(opt.param_groups, sched.get_mom(), strict=False):
                        g["betas"] = betas
        if say:
            now = self.engine.get_lr()[0]
            self.log("optimizer settings from the config in force: " + (
                f"lr now {now:.6g}" if before is None else
                f"lr of the next update (step {step + 1}) {before:.6g} as saved -> {now:.6g} now"))


def data_fingerprint(ds) -> str:
    """A hash of the training rows (tokens, labels, boundaries): equal exactly when the samples are."""
    h = hashlib.blake2b(digest_size=16)
    for a in (ds.offsets, ds.input_ids, ds.labels):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # (tobytes() copied the dataset's tokens twice)
    return h.hexdigest()
