"""The training loop behind train_ds.py: setup -> train -> save -> close."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.collate import pad_id_of
from data.encode import load_dataset
from data.packing import describe, pack
from data.records import DataError, read_files, records_from_files
from models import PipelineModel, causal_lm_loss, parse_topology, plan_stages
from models.convert import family_of
from models.hf_io import SIDE_FILES, copy_side_files
from training.batches import BatchPlan, step_micro_batches, trained_tokens
from training.config import ConfigError, TrainConfig
from training.distributed import shutdown_distributed


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Trainer:
    """One process of a pipeline x data-parallel training run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank = int(os.environ.get("RANK", "0"))

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------ setup

    def validate_data(self) -> None:
        """Check every record before any process group or model exists (raises DataError)."""
        records_from_files(read_files(self.cfg.data_path))

    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.pipe.topology import ProcessTopology
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.validate_data()
        acc = get_accelerator()
        deepspeed.init_distributed(dist_backend="gloo" if acc.device_name() == "cpu" else acc.communication_backend_name())
        if acc.device_name() != "cpu":
            acc.set_device(self.local_rank)
        self.world = torch.distributed.get_world_size()
        torch.manual_seed(cfg.seed)

        self.family, self.config = family_of(Path(cfg.model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.dataset = self._load_dataset()
        self.unit = "packed sequence" if cfg.packing else "sample"

        axes, dims = parse_topology(cfg.model_topo, self.world)
        topo = ProcessTopology(axes=axes, dims=dims)
        self.dp_size, self.pp_size = dims[axes.index("data")], dims[axes.index("pipe")]
        self.plan = BatchPlan(len(self.dataset), cfg.micro_batch, cfg.grad_accum, self.dp_size, cfg.seed)
        if self.plan.steps_per_epoch == 0:  # before any layer is built
            raise ConfigError(f"{cfg.path}: {len(self.dataset)} {self.unit}s are fewer than one global batch "
                              f"({self.plan.global_batch} = micro x accumulation x data-parallel)")
        self.total_steps = cfg.max_steps or cfg.n_epoches * self.plan.steps_per_epoch
        self.tokens = trained_tokens(self.dataset)
        self.lengths = self.dataset.offsets[1:] - self.dataset.offsets[:-1]
        self.samples_per_row = self.dataset.segments_per_row() if cfg.packing else np.ones(len(self.dataset), np.int64)

        parts = cfg.model_topo.get("parts")  # checked against the model by load_config
        bounds_fn = lambda n: plan_stages(self.family.unit_sizes(self.config), self.family.unit_costs(self.config), n, parts)  # noqa: E731
        model = PipelineModel(self.family.layer_specs(self.config), bounds_fn, topo, loss_fn=causal_lm_loss,
                              grad_ckpt_layers=[self.family.block_class.__name__] if cfg.use_grad_ckpt else None)
        if cfg.from_scratch:
            for idx, layer in enumerate(model.forward_funcs):
                if isinstance(layer, torch.nn.Module):
                    self.family.init_layer(layer, self.config, model._local_start + idx, cfg.seed)
            model._synchronize_tied_weights()
        else:
            model.load_layer_files(cfg.model_path)

        ds_config = {"steps_per_print": 10**9, **cfg.ds_config}
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=trainable)
        self.model = model
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self._prepare_save_path()
        self._summary(model)

    def _load_dataset(self):
        """Local rank 0 of each node tokenizes (all cores, cached) first; the other ranks then read the cache.
        A DataError there (e.g. a record the chat template rejects) stops every rank, not only the one that saw it.
        With "packing" every rank packs the samples the same way (seeded) and trains on the packed sequences."""
        cfg = self.cfg
        load = lambda: load_dataset(cfg.data_path, self.tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.template_settings)  # noqa: E731
        ds, error = None, None
        if self.local_rank == 0:
            try:
                ds = load()
            except DataError as e:
                error = e
        failed = [None] * self.world
        torch.distributed.all_gather_object(failed, error is not None)  # also the barrier before the others load
        if any(failed):
            raise error or DataError(["data: another process could not build the data set (see its error)"])
        ds = ds if ds is not None else load()
        s = ds.stats
        self.log(f"data: {s.records} records -> {s.kept} samples ({s.dropped} dropped: no trained token within "
                 f"max_seq_len {cfg.max_seq_len}; {s.truncated} truncated); cache {'hit' if s.cache_hit else 'written'}")
        if not cfg.packing:
            return ds
        packed = pack(ds, cfg.max_seq_len, cfg.seed)
        self.log(describe(packed.stats))
        return packed

    def _prepare_save_path(self) -> None:
        """save_path gets the HF config and tokenizer beside the checkpoints, so pp_to_hg needs nothing else."""
        save = Path(self.cfg.save_path)
        if self.rank == 0:
            save.mkdir(parents=True, exist_ok=True)
            staging = save / ".side-files.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for name in copy_side_files(Path(self.cfg.model_path), staging, SIDE_FILES):
                os.replace(staging / name, save / name)
            staging.rmdir()
            (save / "metrics.jsonl").write_text("")  # a run starts fresh (no resume yet)
        torch.distributed.barrier()
        self.metrics_path = save / "metrics.jsonl"

    def _summary(self, model) -> None:
        counts = torch.tensor([sum(p.numel() for p in model.parameters()),
                               sum(p.numel() for p in model.parameters() if p.requires_grad)], dtype=torch.int64)
        per_rank = [torch.zeros_like(counts) for _ in range(self.world)]
        torch.distributed.all_gather(per_rank, counts)
        if self.rank != 0:
            return
        topo = self.engine.grid._topo
        self.log(f"topology: {self.pp_size} pipeline stages x {self.dp_size} data-parallel replicas ({self.world} processes)")
        for stage in range(self.pp_size):
            lo, hi = model.parts[stage], model.parts[stage + 1]
            r = topo.filter_match(pipe=stage, data=0)[0]
            total, trainable = per_rank[r].tolist()
            self.log(f"  stage {stage}: layers {lo}..{hi - 1}, {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
        g = self.plan.global_batch
        self.log(f"global batch: {g} {self.unit}s x {self.cfg.max_seq_len} tokens = {g * self.cfg.max_seq_len} tokens "
                 f"({self.cfg.micro_batch} micro x {self.cfg.grad_accum} accumulation x {self.dp_size} replicas); "
                 f"{self.plan.steps_per_epoch} steps per epoch, {self.total_steps} steps")
        clip = self.engine.gradient_clipping()
        default = "" if "gradient_clipping" in self.cfg.ds_config else " (DeepSpeed's default; set gradient_clipping 0 to disable)"
        self.log(f"gradient clipping: {f'global norm {clip:g}' if clip > 0 else 'off'}{default}")
        ckpt = sum(model.is_checkpointable_results) if model.activation_checkpoint_interval else 0
        self.log(f"activation checkpointing: {f'{ckpt} decoder blocks on stage 0 (non-reentrant)' if ckpt else 'off'}")

    # ------------------------------------------------------------------------------------------ train

    def batches_for(self, step: int) -> list:
        epoch, in_epoch = self.plan.position(step)
        if not (self.engine.is_first_stage() or self.engine.is_last_stage()):
            return []  # middle stages read nothing
        return step_micro_batches(self.dataset, self.plan, self.tokens, epoch, in_epoch, self.dp_rank,
                                  self.cfg.max_seq_len, pad_id_of(self.tokenizer))

    def train(self) -> None:
        t0 = last = time.time()
        start, window_tokens, losses = self.engine.global_steps, 0, []
        for step in range(start, self.total_steps):
            loss = self.engine.train_batch(data_iter=iter(self.batches_for(step)))
            epoch, in_epoch = self.plan.position(step)
            idx = self.plan.global_indices(epoch, in_epoch)
            now = time.time()
            rec = {"step": step + 1, "loss": float(loss), "lr": self.engine.get_lr()[0],
                   "tokens": int(self.lengths[idx].sum()), "trained_tokens": int(self.tokens[idx].sum()),
                   "samples": int(self.samples_per_row[idx].sum()), "sequences": len(idx), "epoch": epoch,
                   "time": round(now - t0, 4)}
            if self.rank == 0:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            done, window_tokens = step + 1 - start, window_tokens + rec["tokens"]
            losses.append(rec["loss"])
            if done % self.cfg.log_interval == 0 or step + 1 == self.total_steps:
                eta = (now - t0) / done * (self.total_steps - step - 1)
                self.log(f"step {step + 1}/{self.total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                         f"{window_tokens / max(now - last, 1e-9):,.0f} tok/s | elapsed {_hms(now - t0)} | eta {_hms(eta)}")
                last, window_tokens = now, 0
        k = max(1, min(10, len(losses) // 4))
        self.log(f"finished {len(losses)} steps in {_hms(time.time() - t0)}: loss {sum(losses[:k]) / k:.4f} "
                 f"(mean of the first {k}) -> {sum(losses[-k:]) / k:.4f} (mean of the last {k})")
        self.save(f"global_step{self.total_steps}")

    # ------------------------------------------------------------------------------------------ save

    def save(self, tag: str) -> Path:
        """DeepSpeed checkpoint under save_path/tag, written as a temporary tag, renamed, then `latest`."""
        save = Path(self.cfg.save_path)
        tmp_tag = f".tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(save / tmp_tag, ignore_errors=True)
        torch.distributed.barrier()
        self.engine.save_checkpoint(str(save), tag=tmp_tag, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            final = save / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(save / tmp_tag, final)
            atomic_write_text(save / "latest", tag)
            self.log(f"saved checkpoint {final} (convert: python convert_model.py pp_to_hg --input-path {save} "
                     f"--save-path HF_DIR)")
        torch.distributed.barrier()
        return save / tag

    def close(self) -> None:
        shutdown_distributed()


def run(cfg: TrainConfig) -> None:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
        sys.stdout.flush()
