"""The training loop behind train_ds.py: setup -> train (evaluate, save) -> close."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data.collate import pad_id_of
from data.encode import load_dataset
from data.packing import describe, pack, trained_tokens
from data.records import DataError, read_files, records_from_files
from data.settings import data_settings_of, write_data_settings
from models import PipelineModel, causal_lm_loss, parse_topology, plan_stages
from models.attention import set_attn_implementation
from models.convert import family_of
from models.hf_io import SIDE_FILES, copy_side_files
from models.lora import LORA_FILE, apply_lora, load_adapter_into, lora_info, parse_lora
from models.quant import base_memory, logical_numel, parse_quantization, quantized_specs
from training.batches import BatchPlan, step_micro_batches
from training.checkpoint import Checkpoints, RunState, TrainingStopped, fault_pause, set_rng_state
from training.config import ConfigError, TrainConfig
from training.distributed import shutdown_distributed
from training.evaluate import EvalPlan, concat, split_eval
from training.monitor import Monitor, fmt_bytes, fmt_count, hms, truncate_metrics
from training.optim import build_optimizer


class Trainer:
    """One process of a pipeline x data-parallel training run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.stop_signal: str | None = None
        self.monitor: Monitor | None = None
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")  # the next step's batches
        self.row_length: int | None = None  # the engine's current activation length

    def log(self, msg: str) -> None:
        if self.monitor is not None:
            self.monitor.print(msg)
        elif self.rank == 0:
            print(msg, flush=True)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.stop_signal = signal.Signals(signum).name  # acted on at the next step boundary

    # ------------------------------------------------------------------------------------------ setup

    def validate_data(self) -> None:
        """Check every record before any process group or model exists (raises DataError)."""
        for path in (self.cfg.data_path, self.cfg.eval_data_path):
            if path is not None:
                records_from_files(read_files(path))

    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.pipe.topology import ProcessTopology
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.validate_data()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        acc = get_accelerator()
        deepspeed.init_distributed(dist_backend="gloo" if acc.device_name() == "cpu" else acc.communication_backend_name())
        if acc.device_name() != "cpu":
            acc.set_device(self.local_rank)
        self.world = torch.distributed.get_world_size()
        torch.manual_seed(cfg.seed)

        self.family, self.config = family_of(Path(cfg.model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.pad_id = pad_id_of(self.tokenizer)
        self.dataset, self.eval_set = self._load_datasets()
        self.unit = "packed sequence" if cfg.packing else "sample"

        axes, dims = parse_topology(cfg.model_topo, self.world)
        topo = ProcessTopology(axes=axes, dims=dims)
        self.dp_size, self.pp_size = dims[axes.index("data")], dims[axes.index("pipe")]
        self.lengths = self.dataset.offsets[1:] - self.dataset.offsets[:-1]
        self.plan = BatchPlan(len(self.dataset), cfg.micro_batch, cfg.grad_accum, self.dp_size, cfg.seed, self.lengths,
                              cfg.group_by_length)
        if self.plan.steps_per_epoch == 0:  # before any layer is built
            raise ConfigError(f"{cfg.path}: {len(self.dataset)} {self.unit}s are fewer than one global batch "
                              f"({self.plan.global_batch} = micro x accumulation x data-parallel)")
        self.total_steps = cfg.max_steps or cfg.n_epoches * self.plan.steps_per_epoch
        self.tokens = trained_tokens(self.dataset)
        self.samples_per_row = self.dataset.segments_per_row() if cfg.packing else np.ones(len(self.dataset), np.int64)
        self.eval_plan = EvalPlan(self.eval_set, cfg.micro_batch, cfg.grad_accum, self.dp_size) if self.eval_set else None

        parts = cfg.model_topo.get("parts")  # checked against the model by load_config
        costs = self.family.unit_costs(self.config, cfg.max_seq_len)
        bounds_fn = lambda n: plan_stages(self.family.unit_sizes(self.config), costs, n, parts)  # noqa: E731
        set_attn_implementation(self.config, cfg.attn_implementation)
        specs = self.family.layer_specs(self.config)
        self.quant = None if cfg.quantization is None else parse_quantization(  # QLoRA: blocks load and quantise at build
            cfg.quantization, self.family, self.config, parse_lora(cfg.lora, self.family, self.config))
        if self.quant is not None:
            specs = quantized_specs(specs, self.family, cfg.model_path, self.quant)
        model = PipelineModel(specs, bounds_fn, topo, loss_fn=causal_lm_loss,
                              grad_ckpt_layers=[self.family.block_class.__name__] if cfg.use_grad_ckpt else None)
        if cfg.from_scratch:
            for idx, layer in enumerate(model.forward_funcs):
                if isinstance(layer, torch.nn.Module):
                    self.family.init_layer(layer, self.config, model._local_start + idx, cfg.seed)
            model._synchronize_tied_weights()
        else:
            model.load_layer_files(cfg.model_path)
        self.lora = parse_lora(cfg.lora, self.family, self.config) if cfg.lora is not None else None  # checked already
        if self.lora is not None:
            apply_lora(model, self.lora, self.family, cfg.seed, self.family.num_blocks(self.config))
            if self.lora.adapter_path:
                load_adapter_into(model, self.family, self.lora.adapter_path, self.family.num_blocks(self.config))

        ds_config, params, optimizer, lr_scheduler, self.opt_note = build_optimizer(model, cfg, self.total_steps)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=params,
                                               optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.model = model
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.own_grad_norm = not (self.engine.zero_optimization() or self.engine.fp16_enabled()
                                  or self.engine.bfloat16_enabled())
        if self.own_grad_norm:  # fp32 without ZeRO: DeepSpeed neither reports the norm nor skips non-finite steps
            self._wrap_model_step()
        self.ckpts = Checkpoints(cfg.save_path, self.rank, cfg.keep_last, cfg.keep_best, trainable_only=self.lora is not None,
                                 extra_files={LORA_FILE: lora_info(self.lora, cfg.model_path, self.quant and self.quant.as_config())}
                                 if self.lora else None)
        start = self._prepare_save_path()
        self.monitor = Monitor(Path(cfg.save_path), self.rank, self.total_steps, start, cfg.log_interval)
        self._summary(model)

    def _load_datasets(self):
        """(train, eval or None). Local rank 0 of each node tokenizes (all cores, cached) first; the other ranks
        then read the cache. A DataError there stops every rank, not only the one that saw it. The eval
        split is taken from the samples before packing; with "packing" every rank packs the same way (seeded)."""
        cfg = self.cfg
        def load(path):
            return load_dataset(path, self.tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.template_settings)
        paths = [p for p in (cfg.data_path, cfg.eval_data_path) if p is not None]
        found, error = None, None
        if self.local_rank == 0:
            try:
                found = [load(p) for p in paths]
            except DataError as e:
                error = e
        failed = [None] * self.world
        torch.distributed.all_gather_object(failed, error is not None)  # also the barrier before the others load
        if any(failed):
            raise error or DataError(["data: another process could not build the data set (see its error)"])
        found = found if found is not None else [load(p) for p in paths]
        ds, eval_set = found[0], (found[1] if len(found) > 1 else None)
        s = ds.stats
        self.log(f"data: {s.records} records -> {s.kept} samples ({s.dropped} dropped: no trained token within "
                 f"max_seq_len {cfg.max_seq_len}; {s.truncated} truncated"
                 + (f"; {s.spliced} split at a prompt / answer boundary" if s.spliced else "")
                 + f"); cache {'hit' if s.cache_hit else 'written'}")
        if cfg.eval_split_ratio is not None:
            try:
                ds, held = split_eval(ds, cfg.eval_split_ratio, cfg.seed)
            except ValueError as e:
                raise ConfigError(f"{cfg.path}: {e}") from None
            eval_set = held if eval_set is None else concat(eval_set, held)
        if eval_set is not None:
            where = [str(cfg.eval_data_path)] if cfg.eval_data_path is not None else []
            if cfg.eval_split_ratio is not None:
                where.append(f"{cfg.eval_split_ratio:g} of the training samples")
            where = " + ".join(where)
            self.log(f"eval data: {len(eval_set)} samples ({where})")
        if cfg.packing:
            ds = pack(ds, cfg.max_seq_len, cfg.seed)
            self.log(describe(ds.stats))
        return ds, eval_set

    def _run_state(self, step: int) -> RunState:
        return RunState(step=step, pipe=self.pp_size, data=self.dp_size, parts=list(self.model.parts),
                        global_batch=self.plan.global_batch)

    def _prepare_save_path(self) -> int:
        """Side files (HF config, tokenizer) beside the checkpoints, so pp_to_hg needs nothing else; then resume
        from `latest` (resume "auto"/true) or start fresh. Returns the step to start from."""
        cfg, save = self.cfg, Path(self.cfg.save_path)
        if self.rank == 0:
            save.mkdir(parents=True, exist_ok=True)
            for name in self.ckpts.remove_partial():
                print(f"removed {save / name}: a checkpoint that was not completely written", flush=True)
            if cfg.resume is False:  # load_config refused a used save_path unless overwrite_save_path
                for name in [*self.ckpts.tags(), "latest", "best", "metrics.jsonl", "runs"]:
                    p = save / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            staging = save / ".side-files.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for name in copy_side_files(Path(cfg.model_path), staging, SIDE_FILES):
                os.replace(staging / name, save / name)
            staging.rmdir()
            write_data_settings(save, data_settings_of(cfg.template_settings, self.tokenizer, cfg.max_seq_len))
        torch.distributed.barrier()
        tag = self.ckpts.latest() if cfg.resume in ("auto", True) else None
        self.state = self._run_state(0)
        if tag is not None:
            self._resume(save / tag)
        if self.rank == 0:
            truncate_metrics(save / "metrics.jsonl", self.state.step)
        torch.distributed.barrier()
        return self.state.step

    def _resume(self, tag_dir: Path) -> None:
        saved = RunState.read(tag_dir)
        same = (saved.pipe, saved.data, saved.parts) == (self.pp_size, self.dp_size, list(self.model.parts))
        self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=same,
                                    load_lr_scheduler_states=True, load_module_strict=self.lora is None)
        self.state = RunState(**{**saved.__dict__, "pipe": self.pp_size, "data": self.dp_size,
                                 "parts": list(self.model.parts), "global_batch": self.plan.global_batch})
        self.engine.global_steps = saved.step
        rng = tag_dir / f"rng_state_rank{self.rank}.pt"
        if same and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        self.log(f"resumed from {tag_dir} at step {saved.step}" + ("" if same else
                 f"; topology changed (pipe {saved.pipe} -> {self.pp_size}, data {saved.data} -> {self.dp_size}, "
                 f"layer bounds {saved.parts} -> {list(self.model.parts)}): weights, step and LR schedule loaded, "
                 "optimizer state was reset"))
        if saved.global_batch != self.plan.global_batch:
            self.log(f"warning: global batch changed ({saved.global_batch} -> {self.plan.global_batch} {self.unit}s): "
                     "the data order continues at this step's position of the new batching, not sample-exact")

    def _summary(self, model) -> None:
        params = [p for n, p in model.named_parameters() if n != "grad_placeholder"]
        mine = [sum(logical_numel(p) for p in params), sum(p.numel() for p in params if p.requires_grad), base_memory(model)]
        per_rank = [None] * self.world
        torch.distributed.all_gather_object(per_rank, mine)
        if self.rank != 0:
            return
        e = self.engine
        half = e.bfloat16_enabled() or e.fp16_enabled()
        weight_b, grad_b = (2, 4 if e.bfloat16_enabled() else 2) if half else (4, 4)
        state_b = 8 + (4 if half else 0)  # two moments (+ fp32 master weights with bf16/fp16), sharded by ZeRO-1
        shard = self.dp_size if e.zero_optimization_stage() >= 1 else 1
        self.log(f"topology: {self.pp_size} pipeline stages x {self.dp_size} data-parallel replicas ({self.world} processes)")
        self.log("  stage | layers   | parameters (trainable)   | est. memory (weights + grads + optimizer)")
        for stage in range(self.pp_size):
            lo, hi = model.parts[stage], model.parts[stage + 1]
            total, trainable, base = per_rank[self._stage_ranks()[stage]]
            est = total * weight_b + trainable * (grad_b + state_b / shard)
            if self.quant is not None:  # the frozen base as held (4-bit blocks), not at the training precision
                est += base["quantized"] - (total - trainable) * weight_b
            self.log(f"  {stage:5d} | {lo:3d}..{hi - 1:<3d} | {fmt_count(total):>10} ({fmt_count(trainable)}) | {fmt_bytes(est)}")
        g = self.plan.global_batch
        cfg = self.cfg
        self.log(f"global batch: {g} {self.unit}s of up to {cfg.max_seq_len} tokens ({cfg.micro_batch} micro x "
                 f"{cfg.grad_accum} accumulation x {self.dp_size} replicas), padded per step to its longest row "
                 f"(a multiple of {cfg.pad_to_multiple_of}){'; length-grouped' if cfg.group_by_length else ''}; "
                 f"{self.plan.steps_per_epoch} steps per epoch, {self.total_steps} steps")
        self.log(f"attention: {cfg.attn_implementation} (rows of one segment: causal SDPA, no mask; packed or "
                 "left-padded rows: " + ("exact eager ALiBi)" if self.family.model_type == "bloom" else
                                         "varlen / block mask / dense segment mask, as available)"))
        self.log(f"optimizer: {self.opt_note}; DeepSpeed runs it as {type(e.optimizer).__name__}")
        clip = e.gradient_clipping()
        default = "" if "gradient_clipping" in self.cfg.ds_config else " (DeepSpeed's default; set gradient_clipping 0 to disable)"
        self.log(f"gradient clipping: {f'global norm {clip:g}' if clip > 0 else 'off'}{default}")
        precision = "bf16" if e.bfloat16_enabled() else "fp16 (dynamic loss scale)" if e.fp16_enabled() else "fp32"
        accum = getattr(e, "get_data_types", lambda: (None, None))()[1]
        offload = e.zero_offload_optimizer()
        if offload is not None and str(getattr(offload, "device", "none")).endswith("cpu"):
            precision += "; optimizer states offloaded to CPU"
        self.log(f"precision: {precision}; ZeRO stage {e.zero_optimization_stage()}"
                 f"{'; gradient accumulation in ' + str(accum).replace('torch.', '') if accum is not None else ''}")
        if self.lora is not None:
            lo = self.lora
            self.log(f"LoRA: r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {', '.join(lo.target_modules)} of every "
                     f"block; base frozen{' except ' + ', '.join(lo.modules_to_save) if lo.modules_to_save else ''}"
                     f"{'; adapters from ' + lo.adapter_path if lo.adapter_path else ''}")
        if self.quant is not None:
            self.log(f"QLoRA base: {self.quant.describe()} (bitsandbytes Linear4bit in every decoder block; embedding, "
                     "norms and LM head unquantised)")
            for stage in range(self.pp_size):
                b = per_rank[self._stage_ranks()[stage]][2]
                self.log(f"  stage {stage}: {b['layers']} 4-bit layers; frozen base {fmt_bytes(b['quantized'])} "
                         f"(unquantised: {fmt_bytes(b['unquantized'])})")
        ckpt = sum(model.is_checkpointable_results) if model.activation_checkpoint_interval else 0
        self.log(f"activation checkpointing: {f'{ckpt} decoder blocks on stage 0 (non-reentrant)' if ckpt else 'off'}")

    # ------------------------------------------------------------------------------------------ steps

    def _wrap_model_step(self) -> None:
        """fp32 without ZeRO: compute the global gradient norm (pre-clipping) and skip a non-finite step the way
        DeepSpeed skips an fp16 overflow (no update, no scheduler step, the step still counted)."""
        engine, take = self.engine, self.engine._take_model_step
        owned = [p for p in self.model.parameters() if p.requires_grad and getattr(p, "model_parallel", True)]

        def guarded(lr_kwargs):
            sq = torch.zeros(1, dtype=torch.float64)
            for p in owned:
                if p.grad is not None:
                    sq += p.grad.detach().double().pow(2).sum().cpu()
            sq = sq.to(next(self.model.parameters()).device)
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

    def batches_for(self, step: int) -> tuple[int, list]:
        """(row length, micro-batches) of a step for this rank; middle stages read nothing but the length."""
        cfg = self.cfg
        epoch, in_epoch = self.plan.position(step)
        length = self.plan.step_length(epoch, in_epoch, self.dp_rank, cfg.pad_to_multiple_of, cfg.max_seq_len)
        if not (self.engine.is_first_stage() or self.engine.is_last_stage()):
            return length, []
        return length, step_micro_batches(self.dataset, self.plan, self.tokens, epoch, in_epoch, self.dp_rank, length,
                                          self.pad_id)

    def _use_length(self, length: int) -> None:
        """Tell the pipeline engine when the row length changes (it caches activation shapes). Every rank of a
        pipeline computes the same lengths, so all its stages reset together."""
        if length != self.row_length:
            self.engine.reset_activation_shape()
            self.row_length = length

    def evaluate(self) -> float:
        """Token-mean loss over the whole eval set (every rank gets it)."""
        total, ep, cfg = 0.0, self.eval_plan, self.cfg
        io = self.engine.is_first_stage() or self.engine.is_last_stage()
        for call in range(ep.calls):
            length = ep.call_length(call, self.dp_rank, cfg.pad_to_multiple_of, cfg.max_seq_len)
            batches = ep.micro_batches(call, self.dp_rank, length, self.pad_id) if io else []
            self._use_length(length)
            total += float(self.engine.eval_batch(data_iter=iter(batches)))
        return total

    def _peak_memory(self) -> list[float]:
        """Peak memory per pipeline stage (data-parallel rank 0 of each): accelerator memory, else process RSS."""
        if torch.cuda.is_available():
            peak = float(torch.cuda.max_memory_allocated())
        else:
            import resource

            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        peaks = [None] * self.world
        torch.distributed.all_gather_object(peaks, peak)
        return [peaks[r] for r in self._stage_ranks()]

    def _stage_ranks(self) -> list[int]:
        """The global rank that reports for each pipeline stage (its data-parallel rank 0)."""
        topo = self.engine.grid._topo
        return [topo.filter_match(pipe=s, data=0)[0] for s in range(self.pp_size)]

    def _should_stop(self) -> bool:
        """Whether any rank received SIGTERM/SIGINT (all ranks agree, so they all stop at the same step)."""
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=next(self.model.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def train(self) -> None:
        cfg, st = self.cfg, self.state
        losses, saved_at = [], st.step
        if st.finished:
            self.log(f"nothing to do: this run finished at step {st.step} (a new run needs another save_path, or "
                     "\"resume\": false with \"overwrite_save_path\": true)")
            return
        pending = self.prefetch.submit(self.batches_for, st.step)
        while st.step < self.total_steps:
            step = st.step
            self.grad_norm = None
            wait = time.perf_counter()
            length, batches = pending.result()
            data_s = time.perf_counter() - wait
            if step + 1 < self.total_steps:  # the next step's micro-batches are built while this one runs
                pending = self.prefetch.submit(self.batches_for, step + 1)
            self._use_length(length)
            loss = float(self.engine.train_batch(data_iter=iter(batches)))
            st.step = step + 1
            epoch, in_epoch = self.plan.position(step)
            idx = self.plan.global_indices(epoch, in_epoch)
            norm = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
            norm = None if norm is None else float(norm)
            bad = not math.isfinite(loss) or not self.engine._step_applied and not self.engine.fp16_enabled()
            st.bad_steps = st.bad_steps + 1 if bad else 0
            rec = {"step": st.step, "loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": norm,
                   "tokens": int(self.lengths[idx].sum()), "trained_tokens": int(self.tokens[idx].sum()),
                   "samples": int(self.samples_per_row[idx].sum()), "sequences": len(idx), "epoch": epoch,
                   "seq_len": length, "data_s": round(data_s, 6)}
            if not self.engine._step_applied:
                rec["skipped"] = True
            if bad:
                self.log(f"step {st.step}: non-finite loss or gradient norm (loss {loss}, grad norm {norm}): update "
                         f"skipped ({st.bad_steps} in a row; stopping at {cfg.max_bad_steps})")
            if st.bad_steps >= cfg.max_bad_steps:
                self.monitor.step(rec)
                self._save(st, saved_at)
                raise TrainingStopped(f"{cfg.max_bad_steps} consecutive steps had a non-finite loss or gradient norm "
                                      f"(last: step {st.step}); saved the last good state (no update was applied "
                                      f"since step {st.step - st.bad_steps}) as {self.ckpts.latest()}. Lower the "
                                      "learning rate, check the data, or use bf16 instead of fp16")
            evaluated = self.eval_plan is not None and cfg.eval_interval and st.step % cfg.eval_interval == 0
            if evaluated:
                self._record_eval(rec)
            losses.append(loss)
            log_now = (st.step - self.monitor.start) % cfg.log_interval == 0 or st.step == self.total_steps
            self.monitor.step(rec, self._peak_memory() if log_now else None)
            fault_pause("step", st.step, until=lambda: self.stop_signal is not None)
            if (cfg.save_interval and st.step % cfg.save_interval == 0) or (evaluated and cfg.keep_best):
                saved_at = self._save(st, saved_at)
            if evaluated and cfg.early_stopping_patience and st.evals_since_best() >= cfg.early_stopping_patience:
                best = st.best_eval()
                self.log(f"early stopping: eval loss has not improved for {cfg.early_stopping_patience} evaluations "
                         f"(best {best[1]:.4f} at step {best[0]})")
                break
            if self._should_stop():
                self.log(f"received {self.stop_signal or 'a stop signal on another rank'}: saving at step {st.step} "
                         "and exiting (resume with the same command)")
                self._save(st, saved_at)
                return
        if self.eval_plan is not None and all(s != st.step for s, _ in st.evals):
            self._record_eval(None)
        if losses:
            k = max(1, min(10, len(losses) // 4))
            self.log(f"finished {len(losses)} steps in {hms(time.time() - self.monitor.t0)}: loss {sum(losses[:k]) / k:.4f} "
                     f"(mean of the first {k}) -> {sum(losses[-k:]) / k:.4f} (mean of the last {k})")
        st.finished = True
        if saved_at == st.step:  # the weights of this step are saved: only the run state changed
            self.ckpts.update_state(st)
        else:
            self._save(st, saved_at)
        if st.evals and self.rank == 0:
            best = st.best_eval()
            self.log(f"best eval loss {best[1]:.4f} at step {best[0]}"
                     + (f" ({Path(cfg.save_path) / 'best'} names its checkpoint)" if cfg.keep_best else ""))

    def _record_eval(self, rec: dict | None) -> None:
        """Evaluate, remember the result, and put it in this step's metrics record (`rec`), or in a line of its
        own (None: the final evaluation, after the last step's line was written)."""
        loss = self.evaluate()
        self.state.evals.append((self.state.step, loss))
        ppl = math.exp(loss) if loss < 700 else float("inf")
        self.log(f"eval at step {self.state.step}: loss {loss:.4f} | perplexity {ppl:.2f} "
                 f"({self.eval_plan.tokens} tokens, {len(self.eval_set)} samples)")
        if rec is None:
            self.monitor.write({"step": self.state.step, "eval_loss": loss, "eval_ppl": ppl})
        else:
            rec.update(eval_loss=loss, eval_ppl=ppl)

    def _save(self, st: RunState, saved_at: int) -> int:
        """Checkpoint the current step unless it already is; returns the step saved."""
        if saved_at == st.step:  # the same decision on every rank (no filesystem race)
            return saved_at
        path = self.ckpts.save(self.engine, st)
        self.log(f"saved checkpoint {path} (convert: python convert_model.py pp_to_hg --input-path {path.parent} "
                 f"--save-path HF_DIR)")
        return st.step

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        if self.monitor is not None:
            self.monitor.close()
        shutdown_distributed()


def run(cfg: TrainConfig) -> None:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
        sys.stdout.flush()
