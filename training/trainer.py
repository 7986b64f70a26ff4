"""The training loop behind train_ds.py: setup -> train (evaluate, save) -> close."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch

from data.collate import pad_id_of
from data.encode import usable_cores
from data.records import DataError
from models import PipelineModel, causal_lm_loss, parse_topology, plan_stages
from models.attention import set_attn_implementation
from models.convert import family_of
from models.lora import LORA_FILE, apply_lora, base_fingerprint, load_adapter_into, lora_info, parse_lora
from models.quant import parse_quantization, quantized_specs
from models.wgrad import WeightGradStore, defer_in_engine, deferred_micro_batches, defers, make_deferrable
from pipeft import command, one_line
from training.batches import step_micro_batches
from training.checkpoint import Checkpoints, RunState, TrainingStopped, fault_pause, tag_of
from training.config import TrainConfig, resume_hint
from training.dataload import StoppedInSetUp, TrainingData
from training.distributed import (
    LaunchError,
    LauncherWatch,
    accelerator_problem,
    caller_groups,
    cpu_threads_per_process,
    init_restarted_torchrun,
    remove_stale_shm_buffer,
    restore_caller_groups,
    shutdown_distributed,
    watch_build_lock,
)
from training.evaluate import perplexity
from training.monitor import Monitor, hms, process_memory
from training.optim import build_optimizer, owned_sizes
from training.report import RunReport
from training.resume import MODEL_CONFIG_FILE, RUN_CONFIG_FILE, course, knob, model_config, weights_from_checkpoint
from training.rundir import RunDirectory
from training.runlock import RunLock

NORM_ROW = 256  # elements per row of a gradient whose norm squared_norm takes in the gradient's dtype


def squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squares of every element of `grads`, in fp64, on `device`: each gradient as rows of NORM_ROW
    elements, the rows' norms in its dtype (one reduction; an fp32 norm of a whole large tensor is not exact on a
    CPU, where torch sums its squares in fp32: 3e-2 low on a 32000 x 4096 embedding's gradient; by rows, 1e-11), their
    squares summed in fp64. No fp64 copy of a gradient (16 bytes an element), and one transfer to the host when read,
    not one per parameter (a sync each on a GPU)."""
    parts = []
    for g in grads:
        flat = g.detach().reshape(-1)
        whole = flat.numel() - flat.numel() % NORM_ROW
        if whole:
            parts.append(torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1).double().square().sum())
        if whole < flat.numel():
            parts.append(torch.linalg.vector_norm(flat[whole:]).double().square())
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=device)


# save at the next step boundary and stop: a scheduler's preemption (TERM; SLURM --signal=USR1@N, Lightning's way),
# Ctrl-C, a hangup (torchrun passes SIGHUP on to its workers, e.g. when an ssh session ends)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def found_elsewhere(every: list, host: str) -> DataError | None:
    """The first data problem the ranks found (`every`: each rank's (problems, more) or None, and its host), as a
    rank on `host` raises it: naming the rank that found it where that is another node's (its copy may differ)."""
    rank = next((r for r, (found, _) in enumerate(every) if found is not None), None)
    if rank is None:
        return None
    (problems, more), there = every[rank]
    if there != host:  # this node's log shows another node's problems
        problems = [f"rank {rank} on {there} found these problems in its copy of the data:", *problems]
    return DataError(problems, more)


class Trainer(TrainingData, RunDirectory, RunReport):
    """One process of a pipeline x data-parallel training run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.stop_signal: str | None = None
        self.monitor: Monitor | None = None
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")  # the next step's batches
        self.row_shape: tuple[int, int] | None = None  # the engine's static micro-batch shape (None: dynamic)
        self.lock: RunLock | None = None  # rank 0: this run's lock on save_path
        self.launcher = LauncherWatch()  # the `deepspeed` command that started this process, if any
        self.tokenizer = None
        self.changes_lr = self.changes_length = False  # what a resume changed (rundir)
        self.length_before: int | None = None  # the resumed checkpoint's run length (None: unknown)
        self.finished_before = False  # the run finished before this start, which has nothing to do
        self.schedule_switched = self.schedule_restarted = False
        self.prompted: bool | None = None  # whether a training record went through a template (rank 0 reads data)
        # a process group made before (a caller's, e.g. a notebook's or a test session's) is used, and left as it is
        self.owns_group = not torch.distributed.is_initialized()
        self.caller_groups = caller_groups()  # the caller's; close() destroys the ones this run makes
        self.caller_handlers: dict = {}  # the STOP_SIGNALS' handlers before setup, put back by close()

    def log(self, msg: str) -> None:
        if self.monitor is not None:
            self.monitor.print(msg)
        elif self.rank == 0:
            print(msg, flush=True)

    def _validate_data_together(self, stops: list) -> None:
        """validate_data once the process group exists, the other ranks waiting in the patient group (it may take
        minutes: it must not count against their dist_timeout_minutes to join): the first problem any rank found is
        raised on every rank (before anything is written; a launcher need not stop the others, nor a caller's group),
        naming the rank that found it where that is another node's (its copy of the data may differ). Nothing is
        written yet: the check runs under the caller's signal handlers (a Ctrl-C stops it at once), and the wait for
        the others ends at a `stops` signal, as while the group forms (in a caller's group, its handlers stay)."""
        found = error = None
        caller = {sig: h for sig, h in self.caller_handlers.items() if h is not None}
        waiting = {sig: signal.SIG_DFL for sig in stops} if self.owns_group else caller
        before = {sig: signal.getsignal(sig) for sig in {*caller, *waiting}}
        try:
            for sig, handler in caller.items():
                signal.signal(sig, handler)
            try:
                self.validate_data()
            except BaseException as e:  # noqa: BLE001 - raised below, once the other ranks know
                if self.owns_group and not isinstance(e, Exception):  # Ctrl-C: it reached every rank, which end at it
                    raise
                error, found = e, ((e.problems, e.more) if isinstance(e, DataError) else
                                   ([f"rank {self.rank}: validating the data failed: {one_line(e, named=True)}"], None))
            for sig, handler in waiting.items():  # a wait in C++, where a Python handler runs only once it ends
                signal.signal(sig, handler)
            every = [None] * torch.distributed.get_world_size()
            host = socket.gethostname()
            torch.distributed.all_gather_object(every, (found, host), group=self.patient)  # validation may take long
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        if error is not None:
            raise error
        if shared := found_elsewhere(every, host):
            raise shared

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.stop_signal = signal.Signals(signum).name  # acted on at the next step boundary

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.pipe.topology import ProcessTopology
        from transformers import AutoTokenizer

        cfg = self.cfg
        acc = get_accelerator()
        backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
        if problem := accelerator_problem(acc, self.local_rank):
            raise LaunchError(f"rank {self.rank}: {problem}")
        bound = acc.device(self.local_rank) if acc.device_name() == "cuda" else None
        timeout = timedelta(minutes=cfg.dist_timeout_minutes)
        # SIGTERM / SIGINT end a process still waiting for the others (nothing to save yet; the wait is in C++,
        # where a Python handler would run only once it times out); from the process group on they save and stop
        self.caller_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # for close()
        stops = [sig for sig in STOP_SIGNALS if sig in (signal.SIGTERM, signal.SIGINT)
                 or self.caller_handlers[sig] is not signal.SIG_IGN]  # nohup's ignored hangup stays ignored
        for sig in stops:
            signal.signal(sig, signal.SIG_DFL)
        if acc.device_name() == "cpu":
            remove_stale_shm_buffer(self.rank)
            if self.owns_group and (threads := cpu_threads_per_process(usable_cores())) is not None:
                torch.set_num_threads(threads)  # (a caller's process keeps its own setting)
        # DeepSpeed builds its CPU op here; a build lock left by a killed start would make this wait without a word
        watch = watch_build_lock() if acc.device_name() == "cpu" and self.local_rank == 0 else None
        try:
            init_restarted_torchrun(backend, timeout, bound)
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        except RuntimeError as e:  # DistError; gloo's connectFullMesh (a store another run holds gave its peers)
            if not isinstance(e, torch.distributed.DistError) and "connectFullMesh" not in str(e):
                raise
            raise LaunchError(f"rank {self.rank}: the {os.environ.get('WORLD_SIZE')} processes did not all join at "
                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                              f"dist_timeout_minutes {cfg.dist_timeout_minutes:g} (did a process on another node fail "
                              "to start? see its log; or MASTER_ADDR does not resolve or cannot be reached from this "
                              f"node): {one_line(e, 200)}") from None
        finally:
            if watch is not None:
                watch.cancel()
        for sig in stops:
            signal.signal(sig, self._on_signal)
        self.stops = tuple(stops)
        # waits of unbounded length (first-time tokenization on one rank per node) use a group without a deadline;
        # made with dist_timeout_minutes, as gloo connects its pairs within the group's timeout (an unreachable
        # gloo address would hang a week), then given its own
        c10d, patient = torch.distributed.distributed_c10d, timedelta(days=7)
        settable = hasattr(c10d, "_set_pg_timeout")
        self.patient = torch.distributed.new_group(backend="gloo", timeout=timeout if settable else patient)
        if settable:
            c10d._set_pg_timeout(patient, self.patient)
        # once every process has joined: local rank 0 checks the records while the others wait in the patient group
        # (checking them first counted against the others' wait to join, and its timeout blamed another node)
        self._validate_data_together(stops)
        if acc.device_name() != "cpu":
            acc.set_device(self.local_rank)
        self.world = torch.distributed.get_world_size()
        self.hosts = [None] * self.world  # every rank's node, gathered once
        torch.distributed.all_gather_object(self.hosts, socket.gethostname())
        self._take_lock()  # before anything is written to save_path
        self._check_shared_save_path()
        torch.manual_seed(cfg.seed)

        self.family, self.config = family_of(Path(cfg.model_path))
        if self.tokenizer is None:  # validate_data loaded it on local rank 0
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.pad_id = pad_id_of(self.tokenizer)
        axes, dims = parse_topology(cfg.model_topo, self.world)
        topo = ProcessTopology(axes=axes, dims=dims)
        self.dp_size, self.pp_size = dims[axes.index("data")], dims[axes.index("pipe")]
        # the first stage feeds inputs, the last reads labels
        self.readers = [topo.get_coord(r).pipe in (0, self.pp_size - 1) for r in range(self.world)]
        self.reads_data = self.readers[self.rank]
        self._setup_data()
        self.refuse_data_changes()  # a resume refused for its data: before the model is built
        if line := self.finished_before_line():  # a finished run's start: said without building the model
            self.finished_before = True
            self.log(line)
            return
        self.weights_from_checkpoint = weights_from_checkpoint(cfg)

        parts = cfg.model_topo.get("parts")  # checked against the model by load_config
        costs = self.family.unit_costs(self.config, cfg.max_seq_len)
        bounds_fn = lambda n: plan_stages(self.family.unit_sizes(self.config), costs, n, parts)  # noqa: E731
        set_attn_implementation(self.config, cfg.attn_implementation)
        if cfg.lora is not None:  # a library LoRA imports (about 60 MiB resident) is overhead, not the model's
            import peft  # noqa: F401
        self.base_memory = process_memory()  # before any layer exists: the overhead term of the CPU memory estimate
        specs = self.family.layer_specs(self.config)
        self.lora = parse_lora(cfg.lora, self.family, self.config) if cfg.lora is not None else None  # checked already
        self.quant = None if cfg.quantization is None else parse_quantization(  # QLoRA: blocks load and quantise at build
            cfg.quantization, self.family, self.config, self.lora)
        if self.quant is not None:
            specs = quantized_specs(specs, self.family, cfg.model_path, self.quant)
        model = PipelineModel(specs, bounds_fn, topo, loss_fn=causal_lm_loss,
                              grad_ckpt_layers=[self.family.block_class.__name__] if cfg.use_grad_ckpt else None)
        if cfg.from_scratch:
            for idx, layer in enumerate(model.forward_funcs):
                if isinstance(layer, torch.nn.Module):
                    self.family.init_layer(layer, self.config, model._local_start + idx, cfg.seed)
            model._synchronize_tied_weights()
        elif not self.weights_from_checkpoint:  # a full fine-tune's resume reads no base layer file
            model.load_layer_files(cfg.model_path)
        if self.lora is not None:
            apply_lora(model, self.lora, self.family, cfg.seed, self.family.num_blocks(self.config))
            if self.lora.adapter_path:
                load_adapter_into(model, self.family, self.lora.adapter_path, self.family.num_blocks(self.config))

        ds_config, params, optimizer, lr_scheduler, self.opt_note = build_optimizer(model, cfg, self.total_steps)
        self.opt_sizes = owned_sizes(params)  # the note counts this stage's, _summary every stage's (before ZeRO
        # replaces the groups' params with its flat partition)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=params,
                                               optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.model = model
        # DeepSpeed copies its zero_to_fp32.py / zero_to_torch.py into save_path at each ZeRO save: they read the
        # weights from mp_rank_*_model_states.pt, which a pipeline checkpoint keeps in its layer files (pp_to_hg)
        self.engine._copy_recovery_script = lambda save_path: None
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        model.reduce_tied_grad_accum(self.engine)  # before the deferral wraps the same instruction
        self._defer_weight_grads(model)
        self.own_grad_norm = not (self.engine.zero_optimization() or self.engine.fp16_enabled()
                                  or self.engine.bfloat16_enabled())
        if self.own_grad_norm:  # fp32 without ZeRO: DeepSpeed neither reports the norm nor skips non-finite steps
            self._wrap_model_step()
        # fp16: an overflow at the minimum loss scale (or at a fixed one, "loss_scale" > 0) is a skipped step
        # max_bad_steps counts (and stops at, saving), not DeepSpeed's "Current loss scale already at minimum"
        # exception on every rank
        self.scaler = getattr(self.engine.optimizer, "loss_scaler", None) if self.engine.fp16_enabled() else None
        self.min_scale = getattr(self.scaler, "min_scale", None)  # None: a fixed scale (DeepSpeed's LossScaler)
        if self.min_scale is not None:
            self.scaler.raise_error_at_min_scale = False
        extra = {RUN_CONFIG_FILE: json.dumps(cfg.raw)}
        if self.lora:
            extra[LORA_FILE] = lora_info(self.lora, cfg.model_path, self.quant and self.quant.as_config(),
                                         base_fingerprint(cfg.model_path) if self.rank == 0 else None)  # rank 0 writes it
        else:  # the weights come from the checkpoint: a resume with another model config is refused (resume.py)
            extra[MODEL_CONFIG_FILE] = json.dumps(model_config(cfg.model_path))
        self.ckpts = Checkpoints(cfg.save_path, self.rank, cfg.keep_last, cfg.keep_best, trainable_only=self.lora is not None,
                                 extra_files=extra, resume_how=resume_hint(cfg), lock=self.lock)
        start = self._prepare_save_path()
        self.monitor = Monitor(Path(cfg.save_path), self.rank, self.total_steps, start, cfg.log_interval, cfg.report_to,
                               cfg.raw)
        self._summary(model)

    def _defer_weight_grads(self, model) -> None:
        """Full fine-tuning on several stages: each stage after the first computes the weight gradients of its last
        micro-batches after the step's backward passes (models/wgrad.py; not under LoRA or checkpointing)."""
        on = defers(self.cfg.defer_weight_grads, self.lora is not None, self.cfg.use_grad_ckpt)
        self.deferred = [deferred_micro_batches(s, self.cfg.grad_accum) if on else 0 for s in range(self.pp_size)]
        k = self.deferred[self.engine.stage_id]
        self.wgrad = WeightGradStore()
        if k and make_deferrable(model, self.wgrad):
            defer_in_engine(self.engine, self.wgrad, k)
        elif k:  # no trained nn.Linear here (the head alone, tied or not: its weight is the loss's F.linear)
            self.deferred[self.engine.stage_id] = 0

    def _run_state(self, step: int) -> RunState:
        return RunState(step=step, pipe=self.pp_size, data=self.dp_size, parts=list(self.model.parts),
                        global_batch=self.plan.global_batch, data_fingerprint=self.data_fingerprint,
                        eval_fingerprint=self.eval_fingerprint, length=self.total_steps)

    def _wrap_model_step(self) -> None:
        """fp32 without ZeRO: compute the global gradient norm (pre-clipping) and skip a non-finite step the way
        DeepSpeed skips an fp16 overflow (no update, no scheduler step, the step still counted)."""
        engine, take = self.engine, self.engine._take_model_step
        owned = [p for p in self.model.parameters() if p.requires_grad and getattr(p, "model_parallel", True)]

        device = next(self.model.parameters()).device

        def guarded(lr_kwargs):
            sq = squared_norm([p.grad for p in owned if p.grad is not None], device)
            torch.distributed.all_reduce(sq)  # every stage's share, and each data-parallel replica's (identical) copy
            self.grad_norm = math.sqrt(sq.item() / self.dp_size) if math.isfinite(sq.item()) else float("nan")
            if math.isfinite(self.grad_norm):
                take(lr_kwargs)
                return
            engine.zero_grad()
            engine._step_applied = False
            engine.skipped_steps += 1
            engine.losses = None
            engine.global_steps += 1
            engine.global_samples += engine.train_batch_size()

        engine._take_model_step = guarded

    def batches_for(self, step: int) -> tuple[list[tuple[int, int]], list]:
        """((rows, row length) of each micro-batch, micro-batches) of a step for this rank; middle stages read
        nothing but the shapes (the engine's `dynamic_shape` sends each micro-batch's shape down the pipeline)."""
        epoch, in_epoch = self.plan.position(step)
        shapes = self.plan.micro_shapes(epoch, in_epoch, self.dp_rank)
        if not (self.engine.is_first_stage() or self.engine.is_last_stage()):
            return shapes, []
        return shapes, step_micro_batches(self.dataset, self.plan, self.tokens, epoch, in_epoch, self.dp_rank,
                                          shapes, self.pad_id)

    def _use_shapes(self, shapes: list[tuple[int, int]]) -> None:
        """Tell the pipeline engine the shapes of the next micro-batches. Of one shape, they run with static
        shapes (sent down the pipeline once; the engine's cached shapes are reset when the shape changes); of
        several, with DeepSpeed's `dynamic_shape`, each activation's shape sent before it (a small message per
        micro-batch and stage, which a GPU reads with a host sync). Every rank of a pipeline has the same shapes."""
        static = shapes[0] if len(set(shapes)) == 1 else None
        self.engine.dynamic_shape = static is None  # read by the engine at each send and receive
        if static is not None and static != self.row_shape:
            self.engine.reset_activation_shape()
        self.row_shape = static

    def evaluate(self) -> float:
        """Token-mean loss over the whole eval set (every rank gets it)."""
        total, ep = 0.0, self.eval_plan
        io = self.engine.is_first_stage() or self.engine.is_last_stage()
        for call in range(ep.calls):
            shapes = ep.micro_shapes(call, self.dp_rank)
            batches = ep.micro_batches(call, self.dp_rank, shapes, self.pad_id) if io else []
            self._use_shapes(shapes)
            total += float(self.engine.eval_batch(data_iter=iter(batches)))
        return total

    def _at_boundary(self) -> tuple[bool, bool]:
        """(stop, save now), the same on every rank: stop when any rank received SIGTERM/SIGINT or lost the
        `deepspeed` command that started it; save when save_interval_minutes have passed since the last save
        (rank 0's clock decides, so every rank saves at the same step)."""
        if self.stop_signal is None and self.launcher.gone():
            self.stop_signal = "the end of the deepspeed command that started this run (e.g. SIGTERM from timeout)"
        minutes = self.cfg.save_interval_minutes
        timed = self.rank == 0 and minutes is not None and time.time() - self.last_save_time >= 60 * minutes
        lost = self._lock_lost()
        flag = torch.tensor([1.0 if self.stop_signal else 0.0, 1.0 if timed else 0.0, 1.0 if lost else 0.0],
                            device=next(self.model.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag[2].item() > 0:  # SaveFailed on every rank, with rank 0's line (unless the lock reads as ours again)
            self.ckpts.check_lock(tag_of(self.state.step))
        return flag[0].item() > 0, flag[1].item() > 0

    def _lock_lost(self) -> bool:
        """Rank 0: another run took save_path's lock over (this one was paused past the heartbeat's limit): this run
        stops at the step's end, and writes no more metrics there."""
        return self.lock is not None and self.lock.lost_why is not None

    def train(self) -> None:
        if self.finished_before:  # setup said so, and built nothing
            return
        cfg, st = self.cfg, self.state
        losses, saved_at, skipped = [], st.step, 0
        if line := course(st, self.total_steps, self.length_before, cfg.early_stopping_patience, knob(cfg)):
            self.log(line)
        if st.finished:
            return
        self.last_save_time = time.time()  # (save_interval_minutes counts from here)
        fault_pause("setup", st.step, until=lambda: self.stop_signal is not None)
        if self._at_boundary()[0]:  # SIGTERM during set-up (data, model, checkpoint load): there is nothing to save,
            # and a save of a big model would outlast a scheduler's grace period
            self.log(f"received {self.stop_signal or 'a stop signal on another rank'} during set-up: exiting before "
                     f"step {st.step + 1}, with nothing new to save ({resume_hint(cfg)})")
            return
        pending = self.prefetch.submit(self.batches_for, st.step)
        while st.step < self.total_steps:
            step = st.step
            self.grad_norm = None
            wait = time.perf_counter()
            shapes, batches = pending.result()
            data_s = time.perf_counter() - wait
            if step + 1 < self.total_steps:  # the next step's micro-batches are built while this one runs
                pending = self.prefetch.submit(self.batches_for, step + 1)
            self._use_shapes(shapes)
            lr = self.engine.get_lr()[0]  # the lr this update applies (the scheduler steps inside train_batch)
            scale = None if self.scaler is None else self.scaler.cur_scale
            loss = float(self.engine.train_batch(data_iter=iter(batches)))
            step_s = time.perf_counter() - wait  # the data wait and the step: not an evaluation or a save after it
            st.step = step + 1
            epoch, in_epoch = self.plan.position(step)
            idx = self.plan.global_indices(epoch, in_epoch, real=True)
            every = self.plan.step_shapes(epoch, in_epoch)  # every replica's micro-batches
            norm = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
            norm = None if norm is None else float(norm)
            applied = self.engine._step_applied
            # fp16: an overflow lowers the loss scale (DeepSpeed's dynamic scaling), bad only once it is at its minimum
            at_min = scale is not None and (self.min_scale is None or scale <= self.min_scale)
            bad = not math.isfinite(loss) or not applied and (scale is None or at_min)
            st.bad_steps = st.bad_steps + 1 if bad else 0
            skipped += not applied
            rec = {"step": st.step, "loss": loss, "lr": lr, "grad_norm": norm,
                   "tokens": int(self.lengths[idx].sum()), "trained_tokens": int(self.tokens[idx].sum()),
                   "computed_tokens": sum(rows * n for rows, n in every),
                   "samples": int(self.samples_per_row[idx].sum()), "sequences": len(idx), "epoch": epoch,
                   "seq_len": max(n for _, n in every), "data_s": round(data_s, 6), "step_s": round(step_s, 6)}
            if not self.engine._step_applied:
                rec["skipped"] = True
            if bad:
                why = (f" at the {'fixed' if self.min_scale is None else 'minimum'} fp16 loss scale {scale:g}"
                       if at_min and math.isfinite(loss) else "")
                done = "update skipped" if not applied else "update APPLIED (DeepSpeed did not skip it)"
                self.log(f"step {st.step}: non-finite loss or gradient norm (loss {loss}, grad norm {norm}){why}: "
                         f"{done} ({st.bad_steps} in a row; stopping at {cfg.max_bad_steps})")
            elif not applied:
                self.log(f"step {st.step}: fp16 gradient overflow: update skipped, loss scale {scale:g} -> "
                         f"{self.scaler.cur_scale:g} (DeepSpeed's dynamic loss scaling)")
            if st.bad_steps >= cfg.max_bad_steps:
                self.monitor.step(rec)
                self._save(st, saved_at)
                raise TrainingStopped(f"{cfg.max_bad_steps} consecutive steps had a non-finite loss or gradient norm "
                                      f"(last: step {st.step}); saved the last good state (no update was applied "
                                      f"since step {st.step - st.bad_steps}) as {self.ckpts.latest()}. Lower the "
                                      "learning rate, check the data" + (", or use bf16 instead of fp16"
                                                                          if self.scaler is not None else ""))
            evaluated = self.eval_plan is not None and cfg.eval_interval and st.step % cfg.eval_interval == 0
            if evaluated:
                self._record_eval(rec)
            losses.append(loss)
            log_now = st.step % cfg.log_interval == 0 or st.step == self.total_steps  # the monitor's lines' steps
            peaks = self._peak_memory() if log_now else None
            if peaks:
                rec["peak_memory"] = peaks
            if not self._lock_lost():  # (another run's metrics.jsonl now)
                self.monitor.step(rec, peaks)
            fault_pause("step", st.step, until=lambda: self.stop_signal is not None or self.launcher.gone())
            stop, timed = self._at_boundary()
            if (cfg.save_interval and st.step % cfg.save_interval == 0) or (evaluated and cfg.keep_best) or timed:
                saved_at = self._save(st, saved_at)
                stop = stop or self._at_boundary()[0]  # a signal during a long save: this step is saved, stop now
            if evaluated and cfg.early_stopping_patience and st.evals_since_best() >= cfg.early_stopping_patience:
                best = st.best_eval(scheduled=True)
                self.log(f"early stopping: eval loss has not improved for {st.evals_since_best()} evaluations "
                         + (f"(best {best[1]:.4f} at step {best[0]})" if best else "(none was finite)"))
                st.patience_ended = True
                break
            if stop:
                self.log(f"received {self.stop_signal or 'a stop signal on another rank'}: saving at step {st.step} "
                         f"and exiting ({resume_hint(cfg)})")
                self._save(st, saved_at)
                return
        if self.eval_plan is not None and all(s != st.step for s, _ in st.evals):
            self._record_eval(None)
        if losses:
            k = max(1, min(10, len(losses) // 4))
            steps = (f"{len(losses)} step{'s' * (len(losses) > 1)}" if st.step == len(losses) else  # a resumed run:
                     f"step {st.step} (this start's)" if len(losses) == 1 else  # this start's steps
                     f"steps {st.step - len(losses) + 1}-{st.step} (this start's)")
            self.log(f"finished {steps} in {hms(time.time() - self.monitor.t0)}: loss {sum(losses[:k]) / k:.4f} "
                     f"(mean of the first {k}) -> {sum(losses[-k:]) / k:.4f} (mean of the last {k})"
                     + (f"; {skipped} of them skipped their update" if skipped else ""))
        st.finished, st.patience_ended = True, bool(st.patience_ended)  # recorded either way
        if saved_at == st.step:  # the weights of this step are saved: only the run state changed
            self.ckpts.update_state(st)
        else:
            self._save(st, saved_at)
        if self.rank == 0 and (line := self.ckpts.best_line(st)):
            self.log(line)

    def _record_eval(self, rec: dict | None) -> None:
        """Evaluate, remember the result, and put it in this step's metrics record (`rec`), or in a line of its
        own (None: the final evaluation, after the last step's line was written)."""
        loss = self.evaluate()
        self.state.evals.append((self.state.step, loss))
        ppl = perplexity(loss)
        self.log(f"eval at step {self.state.step}: loss {loss:.4f} | perplexity {ppl:.2f} "
                 f"({self.eval_plan.tokens} trained tokens, {len(self.eval_set)} "
                 f"{'rows' if self.cfg.packing else 'samples'})")
        if rec is None:
            self.state.end_evals.append(self.state.step)
            self.monitor.write({"step": self.state.step, "eval_loss": loss, "eval_ppl": ppl})
        else:
            rec.update(eval_loss=loss, eval_ppl=ppl)

    def _save(self, st: RunState, saved_at: int) -> int:
        """Checkpoint the current step unless it already is; returns the step saved."""
        if saved_at == st.step:  # the same decision on every rank (no filesystem race)
            return saved_at
        path = self.ckpts.save(self.engine, st, needed=self.stage_files(self.pp_size, self.dp_size))
        self.last_save_time = time.time()
        how = " --lora peft|merge" if self.lora else ""  # a LoRA checkpoint needs it (adapter dir or merged model)
        self.log(f"saved checkpoint {path} (convert: {command('convert_model.py')} pp_to_hg --input-path {shlex.quote(str(path.parent))} "
                 f"--save-path HF_DIR{how})")
        return st.step

    def close(self, failed: bool = False) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        try:
            if self.monitor is not None:
                self.monitor.close(failed)
            if self.lock is not None:
                self.lock.release()
        finally:  # the process group (and DeepSpeed's /dev/shm buffer) goes whatever failed above
            if self.owns_group:
                shutdown_distributed()
            else:
                restore_caller_groups(self.caller_groups)
        for sig, handler in self.caller_handlers.items():  # a caller going on (a notebook) gets its Ctrl-C back
            if handler is not None:
                signal.signal(sig, handler)


# what gloo says when a peer's process ends (killed, out of memory, its node lost) in the middle of a collective
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connectFullMesh failed")


def run(cfg: TrainConfig) -> None:
    trainer, failed = Trainer(cfg), True
    try:
        trainer.setup()
        trainer.train()
        failed = False
    except StoppedInSetUp as e:  # (a tokenization of minutes ends at the signal, not at the first step)
        trainer.log(f"received {e} during set-up, while the data were tokenized: exiting with nothing new to save "
                    f"({resume_hint(cfg)})")
        failed = False
    except RuntimeError as e:  # a peer gone: one line on each process that saw it, not gloo's traceback
        if isinstance(e, TrainingStopped) or not any(m in str(e) for m in PEER_LOST):
            raise
        said = re.sub(r"^\[[^\]]*\]\s*", "", one_line(e, None)).split(". ")[0]  # gloo's source line and advice off
        raise TrainingStopped(f"rank {trainer.rank}: another process of this run has ended (killed, out of memory, "
                              f"its node lost, or an error there: see its log): {said[:160]}; the run resumes from its last "
                              f"checkpoint (an error in that log is fixed first): {resume_hint(cfg)}") from None
    finally:
        trainer.close(failed)
        sys.stdout.flush()
