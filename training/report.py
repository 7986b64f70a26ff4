"""What a run reports about itself: the set-up summary (topology, memory per stage, optimizer, precision, LoRA),
and the peak memory per stage. Trainer methods (a mixin, as training.rundir and training.dataload are)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.cost import LoraShape, Setup, fused_rms_norm, stage_memory
from models.pipeline import parts_of
from models.quant import base_memory, logical_numel
from training.distributed import device_line
from training.monitor import fmt_bytes, fmt_count, write_estimate
from training.optim import describe_groups, merge_sizes
from training.schedule import schedule_warning


class RunReport:
    """Trainer methods that report (see the module docstring); they use the Trainer's attributes."""

    def _summary(self, model) -> None:
        params = [p for p in model.parameters() if not getattr(p, "placeholder", False)]
        ckpt = sum(model.is_checkpointable_results) if model.activation_checkpoint_interval else 0  # as the engine runs
        mine = [sum(logical_numel(p) for p in params), sum(p.numel() for p in params if p.requires_grad), self.base_memory,
                base_memory(model), ckpt, self.opt_sizes, self.deferred[self.engine.stage_id]]
        per_rank = [None] * self.world
        torch.distributed.all_gather_object(per_rank, mine)
        if self.rank != 0:
            return
        e, cfg = self.engine, self.cfg
        reporting = [per_rank[r] for r in self._stage_ranks()]
        offload = e.zero_offload_optimizer()
        lo, device = self.lora, next(model.parameters()).device.type
        setup = Setup(cfg.micro_batch, cfg.max_seq_len, self.pp_size, self.dp_size, cfg.grad_accum,
                      "bf16" if e.bfloat16_enabled() else "fp16" if e.fp16_enabled() else "fp32",
                      e.zero_optimization_stage(), offload is not None and str(getattr(offload, "device", "none")).endswith("cpu"),
                      cfg.use_grad_ckpt, LoraShape(lo.r, lo.target_modules, lo.dropout) if lo else None,
                      quantization="nf4" if self.quant is not None else None,
                      double_quant=self.quant is not None and self.quant.double_quant, defer_wgrad=cfg.defer_weight_grads,
                      overhead_bytes=() if device != "cpu" else tuple(float(r[2]) for r in reporting),
                      fused_norm=fused_rms_norm(device))
        self.units = parts_of(self.family.unit_sizes(self.config), model.parts)
        mem = stage_memory(self.family, self.config, setup, self.units, counts=[tuple(r[:2]) for r in reporting])
        self.log(device_line())
        self.log(f"topology: {self.pp_size} pipeline stages x {self.dp_size} data-parallel replicas ({self.world} processes)")
        self.log(f"  stage | layers   | parameters (trainable)   | predicted peak memory per process at {cfg.micro_batch} x "
                 f"{cfg.max_seq_len} tokens (weights + grads + optimizer + activations, logits and step buffer, added "
                 "or max() where they do not coexist + overhead)")  # which: models/cost.py (the CPU's heap keeps more)
        for stage, m in enumerate(mem):
            lo_, hi = model.parts[stage], model.parts[stage + 1]
            live = f"{fmt_bytes(m.activations)} + {fmt_bytes(m.logits)}"
            rest = (f"max({live}, {fmt_bytes(m.step_buffer)})" if not m.heap else
                    f"{fmt_bytes(m.activations)} + max({fmt_bytes(m.logits)}, {fmt_bytes(m.step_buffer)})"
                    if m.logits_unmapped else f"{live} + {fmt_bytes(m.step_buffer)}")
            split = " + ".join([fmt_bytes(m.weights), fmt_bytes(m.gradients), fmt_bytes(m.optimizer), rest,
                                fmt_bytes(m.overhead)])
            self.log(f"  {stage:5d} | {lo_:3d}..{hi - 1:<3d} | {fmt_count(m.params):>10} ({fmt_count(m.trainable)}) | "
                     f"{fmt_bytes(m.total)} ({split}; {m.in_flight} micro-batch{'es' if m.in_flight != 1 else ''} in "
                     "flight)")
        self.log(f"  layers: the stage's layer files; its units (model_topo.parts counts them, the final norm is the "
                 f"head's): {self.units}")
        self.log("  overhead: " + ("the process's resident memory before the model was built (measured)"
                                   if setup.overhead_bytes else "CUDA context, NCCL, allocator slack (assumed)")
                 + "; peaks per stage go to metrics.jsonl (peak_memory)")
        if problem := write_estimate(Path(cfg.save_path), setup, mem):
            self.log(f"warning: {problem}")
        g = self.plan.global_batch
        cfg = self.cfg
        self.log(f"global batch: {g} {self.unit}s of up to {cfg.max_seq_len} tokens ({cfg.micro_batch} micro x "
                 f"{cfg.grad_accum} accumulation x {self.dp_size} replicas), a step's rows sorted by length and cut "
                 f"into micro-batches of like size, each padded to its longest row (a multiple of {cfg.pad_to_multiple_of}; "
                 f"a micro-batch of shorter rows holds more of them){'; length-grouped' if cfg.group_by_length else ''}; "
                 f"{self.plan.steps_per_epoch} steps per epoch, {self.total_steps} steps")
        self.log(f"attention: {cfg.attn_implementation} (rows of one segment: causal SDPA, no mask; packed or "
                 "left-padded rows: " + ("exact eager ALiBi)" if self.family.model_type == "bloom" else
                                         "varlen / block mask / dense segment mask, as available)"))
        # the whole model's groups, a tied weight once (the note was written from rank 0's stage alone)
        note = self.opt_note.replace(describe_groups(self.opt_sizes), describe_groups(merge_sizes(
            [r[5] for r in reporting])), 1)
        self.log(f"optimizer: {note}; DeepSpeed runs it as {type(e.optimizer).__name__}")
        if warning := schedule_warning(cfg, self.total_steps):
            self.log(f"warning: {warning}")
        clip = e.gradient_clipping()
        default = "" if "gradient_clipping" in self.cfg.ds_config else " (DeepSpeed's default; set gradient_clipping 0 to disable)"
        self.log(f"gradient clipping: {f'global norm {clip:g}' if clip > 0 else 'off'}{default}")
        scale = (f"dynamic loss scale, initial {e.initial_dynamic_scale():g}" if e.dynamic_loss_scale() else
                 f"fixed loss scale {e.loss_scale():g}") if e.fp16_enabled() else ""
        precision = "bf16" if e.bfloat16_enabled() else f"fp16 ({scale})" if e.fp16_enabled() else "fp32"
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
                b = per_rank[self._stage_ranks()[stage]][3]
                self.log(f"  stage {stage}: {b['layers']} 4-bit layers; frozen base {fmt_bytes(b['quantized'])} "
                         f"(unquantised: {fmt_bytes(b['unquantized'])})")
        blocks = [per_rank[r][4] for r in self._stage_ranks()]
        self.log(f"activation checkpointing: {f'decoder blocks per stage {blocks} (non-reentrant)' if any(blocks) else 'off'}")
        if any(deferred := [per_rank[r][6] for r in self._stage_ranks()]):  # what each stage defers, not what it may
            self.log(f"deferred weight gradients: the last {deferred} micro-batches per stage (their weight gradients "
                     "after the step's backward passes; \"defer_weight_grads\": false turns it off)")

    # ------------------------------------------------------------------------------------------ steps

    def _peak_memory(self) -> list[float]:
        """Peak memory per pipeline stage (data-parallel rank 0 of each): allocated device memory as DeepSpeed's
        accelerator counts it (cuda, hpu, neuron); on the CPU the kernel's peak RSS of the process (the accelerator
        there only remembers the highest RSS it was asked about, which misses peaks between log lines)."""
        import resource

        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        peak = float(acc.max_memory_allocated() if acc.device_name() != "cpu" else
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        peaks = [None] * self.world
        torch.distributed.all_gather_object(peaks, peak)
        return [peaks[r] for r in self._stage_ranks()]

    def _stage_ranks(self) -> list[int]:
        """The global rank that reports for each pipeline stage (its data-parallel rank 0)."""
        topo = self.engine.grid._topo
        return [topo.filter_match(pipe=s, data=0)[0] for s in range(self.pp_size)]
