"""The training config: one JSON (or YAML) file holding DeepSpeed's keys beside the project's.

The project's keys are parsed into `TrainConfig`; DeepSpeed's pass through to `deepspeed.initialize`
untouched. An unknown key is an error naming the closest valid key. Everything here runs before
any process group exists. gdGPT's configs run unchanged (training/compat.py).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from data.records import DataError
from data.templates import TemplateSettings
from models.attention import attn_problem
from models.convert import family_of, missing_layer_file
from models.hf_io import CheckpointError, load_tokenizer
from models.lora import LoraSettings, check_adapter_keys, parse_lora
from models.pipeline import ModelConfigError, parse_topology, plan_stages
from models.quant import QUANT_FILE, parse_quantization, read_quant_file
from pipeft import command, one_line
from training.batches import DROP_LAST
from training.compat import BATCH_KEYS, check_deepspeed_sections, deepspeed_refusal, derive_batch, map_gdgpt_keys
from training.config_diff import torch_scheduler, zero_stage
from training.config_file import OTHER_TOOLS_KEYS, ConfigError, read_config_file
from training.config_paths import check_paths, eval_is_training_data, save_path_in_use
from training.optim import (
    build_lion,
    check_optimizer,
    half_precisions,
    offload_device,
    optimizer_key_problem,
    precision_problem,
)
from training.resume import resume_problem, resumes, weights_from_checkpoint
from training.runlock import (
    JOB_FILE,
    UnknownStart,
    config_identity,
    launch_job,
    restarted_job,
)
from training.schedule import is_number, parse_lr_schedule, scheduler_lr_problem, scheduler_problem
from training.trackers import parse_report_to

# DeepSpeed's top-level keys (deepspeed/runtime/constants.py and its config sections).
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "data_types", "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "disable_allgather", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor",
    "comet", "monitor_config", "checkpoint", "aio", "pipeline", "memory_breakdown", "seq_parallel_communication_data_type",
    "gradient_allreduce_op", "dataloader_drop_last", "elasticity", "compression_training", "data_efficiency",
    "autotuning", "curriculum_learning", "timers", "use_data_before_expert_parallelism", "graph_harvesting",
    "compile", "weight_quantization", "hybrid_engine", "nebula", "eigenvalue", "progressive_layer_drop", "log_level",
    "disable_python_gc", "managed_gradient_accumulation", "vocabulary_size",
})
# DeepSpeed's top-level keys for the parallelisms this pipeline does not combine with (its engine is DeepSpeed's
# PipelineEngine over model_topo's pipe x data grid)
DEEPSPEED_UNSUPPORTED = {"tensor_parallel": "tensor parallelism (AutoTP)", "expert_parallel": "expert parallelism (MoE)",
                         "sequence_parallel_size": "sequence parallelism (Ulysses)"}


@dataclass
class TrainConfig:
    """The project's keys (the seed's keep their meaning). Relative paths are relative to the working directory."""

    model_path: str  # pipeline dir (layer files + config.json + tokenizer), see convert_model.py
    save_path: str  # checkpoints, metrics.jsonl, HF config + tokenizer for pp_to_hg
    data_path: str | list[str]  # record files, globs or dirs (.json array / .jsonl)
    from_scratch: bool = False  # random init from model_path's config instead of its layer files
    max_seq_len: int = 512
    n_epoches: int = 1  # the seed's spelling
    max_steps: int | None = None  # overrides n_epoches when set
    use_grad_ckpt: bool = False  # activation checkpointing of decoder blocks
    seed: int = 42
    log_interval: int = 1  # steps between progress lines
    pretrain_eos: bool = True  # append EOS to pretrain text
    template: str = "default"  # "default" (data/templates.py) or "chat" (the tokenizer's chat_template)
    train_on_prompt: bool = False  # train every token, prompts too
    last_answer_only: bool = False  # train only each record's last answer
    packing: bool = False  # several samples per max_seq_len sequence (data/packing.py)
    split_long_pretrain: bool = False  # with packing: split pretrain text longer than max_seq_len, not truncate
    data_cache_dir: str | None = None  # default: .cache beside the first data file
    # throughput (models/attention.py, training/batches.py)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 | flex_attention
    pad_to_multiple_of: int = 64  # a micro-batch's rows are padded to its longest row, rounded up to this (<= max_seq_len)
    group_by_length: bool = False  # length-grouped global batches (HF Trainer's megabatches), seeded
    defer_weight_grads: bool = True  # full fine-tuning: later stages defer their last micro-batches' dW (models/wgrad.py)
    # checkpoints and resume (training/checkpoint.py)
    save_interval: int | None = None  # steps between checkpoints (None: only at the end)
    save_interval_minutes: float | None = None  # also checkpoint at the first step boundary this long after the last save
    dist_timeout_minutes: float = 30.0  # collective operations' timeout (the process group's)
    keep_last: int | None = None  # newest checkpoints kept (None: all)
    resume: str | bool = "auto"  # "auto": continue from save_path/latest if present; false: start fresh
    overwrite_save_path: bool = False  # with resume false: allow a save_path that already holds a run
    allow_data_change_on_resume: bool = False  # resume although the data or its order changed (training/config_diff.py)
    # evaluation (training/evaluate.py)
    eval_data_path: str | list[str] | None = None
    eval_split_ratio: float | None = None  # hold out this share of the training samples instead
    eval_interval: int | None = None  # steps between evaluations (None: only at the end)
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    keep_best: int | None = None  # checkpoint at every evaluation; keep the N best by eval loss
    # optimization
    lr_schedule: dict | None = None  # {type: cosine|linear|constant, warmup_steps|warmup_ratio, min_lr_ratio}
    decay_norm_and_bias: bool = False  # weight decay also on biases and norm weights
    max_bad_steps: int = 10  # consecutive non-finite steps (skipped) before training stops
    report_to: str | list = "tensorboard"  # trackers of metrics.jsonl's scalars: tensorboard, wandb, mlflow, none
    lora: dict | None = None  # {r, alpha, dropout, target_modules, adapter_path} (models/lora.py)
    quantization: dict | None = None  # QLoRA: BitsAndBytesConfig's 4-bit keys (models/quant.py); needs lora
    model_topo: dict = field(default_factory=dict)  # {process_topology: {axes|axis, dims}, parts}
    ds_config: dict = field(default_factory=dict)  # DeepSpeed's keys
    path: str = ""  # the config file itself
    raw: dict = field(default_factory=dict)  # the file's object as read (saved in every checkpoint)
    notes: list[str] = field(default_factory=list)  # warnings to print once (training/compat.py)
    refusal: str | None = None  # rank 0's refusal that the other ranks cannot judge (RunDirectory._take_lock says it)

    @property
    def micro_batch(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    @property
    def grad_accum(self) -> int:
        return self.ds_config.get("gradient_accumulation_steps", 1)

    @property
    def template_settings(self) -> TemplateSettings:
        """The data knobs for every load_dataset call (TemplateSettings' fields are config keys of the same name)."""
        return TemplateSettings(**{f.name: getattr(self, f.name) for f in fields(TemplateSettings)})


PROJECT_KEYS = {f.name: f for f in fields(TrainConfig) if f.name not in ("ds_config", "path", "raw", "notes", "refusal")}
_TYPES: dict[str, tuple[type, ...]] = {
    "model_path": (str,), "save_path": (str,), "data_path": (str, list), "from_scratch": (bool,),
    "max_seq_len": (int,), "n_epoches": (int,), "max_steps": (int, type(None)), "use_grad_ckpt": (bool,),
    "seed": (int,), "log_interval": (int,), "pretrain_eos": (bool,), "template": (str,),
    "train_on_prompt": (bool,), "last_answer_only": (bool,), "packing": (bool,),
    "split_long_pretrain": (bool,), "data_cache_dir": (str, type(None)), "model_topo": (dict,),
    "attn_implementation": (str,), "pad_to_multiple_of": (int,), "group_by_length": (bool,),
    "defer_weight_grads": (bool,),
    "save_interval": (int, type(None)), "save_interval_minutes": (int, float, type(None)),
    "dist_timeout_minutes": (int, float), "keep_last": (int, type(None)), "resume": (str, bool),
    "overwrite_save_path": (bool,), "allow_data_change_on_resume": (bool,), "eval_data_path": (str, list, type(None)), "eval_split_ratio": (float, int, type(None)),
    "eval_interval": (int, type(None)), "early_stopping_patience": (int, type(None)), "keep_best": (int, type(None)),
    "lr_schedule": (dict, type(None)), "decay_norm_and_bias": (bool,), "max_bad_steps": (int,),
    "lora": (dict, type(None)), "quantization": (dict, type(None)), "report_to": (str, list),
}
_MIN = {"pad_to_multiple_of": 1, "max_seq_len": 2, "n_epoches": 1, "max_steps": 1, "log_interval": 1, "seed": 0, "save_interval": 1, "save_interval_minutes": 1e-6, "dist_timeout_minutes": 0.1,
        "keep_last": 1, "eval_interval": 1, "early_stopping_patience": 1, "keep_best": 1, "max_bad_steps": 1}
_MAX = {"seed": 2**32 - 1, "dist_timeout_minutes": 60 * 24 * 365}
_MAX_WHY = {"seed": " (a 32-bit seed)", "dist_timeout_minutes": " (a year)"}


def load_config(path: str | Path, world_size: int | None = None, require_model: bool = True) -> TrainConfig:
    """Read and check a config file. `world_size` (the launcher's process count) also checks the topology
    and batch sizes against it; `require_model` checks model_path holds a pipeline model (else only a dir)."""
    path = Path(path)
    raw = read_config_file(path)
    try:
        mapped, notes = map_gdgpt_keys(raw, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if (isinstance(raw.get("model_type"), str) and any(k in raw for k in ("architectures", "hidden_size", "vocab_size"))
            and not any(k in raw for k in ("model_path", "data_path"))):  # (its keys were "unknown key 'architectures'")
        raise ConfigError(f"{path}: a model's config.json (model_type {raw['model_type']!r}), not a training config: "
                          f"name its directory as model_path in a training config (e.g. configs/quickstart.json)")
    ours, ds = {}, {}
    for key, value in mapped.items():
        if key in PROJECT_KEYS:
            ours[key] = value
        elif key in DEEPSPEED_KEYS:
            ds[key] = value
        elif key in DEEPSPEED_UNSUPPORTED:
            raise ConfigError(f"{path}: '{key}': DeepSpeed's {DEEPSPEED_UNSUPPORTED[key]} is not supported here; a "
                              "model is split into pipeline stages and data-parallel replicas (model_topo)")
        else:
            close = difflib.get_close_matches(key, [*PROJECT_KEYS, *DEEPSPEED_KEYS], n=1, cutoff=0.6)
            hint = (f"; here it is '{OTHER_TOOLS_KEYS[key]}'" if key in OTHER_TOOLS_KEYS else
                    f"; did you mean '{close[0]}'?" if close else "")
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
    for key in ("model_path", "save_path", "data_path"):
        if key not in ours:
            raise ConfigError(f"{path}: missing required key '{key}'")
    for key, value in ours.items():
        if isinstance(value, float) and value.is_integer() and float not in _TYPES[key] and int in _TYPES[key]:
            value = ours[key] = int(value)  # a whole count written as a float (YAML's 1e4 for max_steps: 10000.0)
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in _TYPES[key])
            raise ConfigError(f"{path}: '{key}' must be {want}, got {json.dumps(value)}")
        if key in _MIN and value is not None and value < _MIN[key]:
            raise ConfigError(f"{path}: '{key}' must be >= {_MIN[key]}, got {value}")
        if key in _MAX and value is not None and value > _MAX[key]:
            raise ConfigError(f"{path}: '{key}' must be <= {_MAX[key]}{_MAX_WHY[key]}, got {value}")

    try:
        notes += check_deepspeed_sections(ds, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = TrainConfig(**ours, ds_config=ds, path=str(path), raw=raw, notes=notes)
    try:
        _ = cfg.template_settings  # checks the data keys together
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_run_keys(cfg, path)
    judge, alone = os.environ.get("RANK", "0") == "0", (world_size or 1) == 1

    def refuse(message: str) -> None:
        """A refusal only rank 0 can judge (the lock, the run in save_path, a restart): raised when it is the only
        process; with others it is kept for RunDirectory._take_lock, which stops every rank with it (the others
        would otherwise wait for rank 0 in the process group until its timeout)."""
        if alone:
            raise ConfigError(message)
        cfg.refusal = cfg.refusal or message

    restart = None  # rank 0 judges whether this is a restart; RunDirectory._take_lock gives its verdict to every rank
    if cfg.resume is False and judge:
        try:
            restart = restarted_job(cfg.save_path, config_identity(path, cfg.raw))
        except UnknownStart as e:  # the same torchrun run id, started by another torchrun agent
            refuse(f"{path}: {e}")
    if restart:
        cfg.resume, cfg.overwrite_save_path = "auto", False
        restart = (f"this is a restart of {restart}, which started the run in save_path {cfg.save_path}: it resumes "
                   "that run ('resume' false applies to the job's first start; to start over inside this same job, "
                   f"delete {Path(cfg.save_path) / JOB_FILE})")
        cfg.notes.append(restart)
    _check_batch(cfg, path, world_size)
    if problem := deepspeed_refusal(cfg.ds_config):  # after the project's own lines, which say more
        raise ConfigError(f"{path}: {problem}")
    check_paths(cfg, path, require_model)
    if note := eval_is_training_data(cfg):
        cfg.notes.append(note)
    if require_model and judge and (problem := save_path_in_use(cfg, path)):
        refuse(problem)
    if require_model:
        _check_model(cfg, path)
        lora = _check_lora(cfg, path, resumes(cfg))  # every rank refuses these alike
        if problem := resume_problem(cfg, lora):
            if not restart:
                raise ConfigError(f"{path}: {problem}")
            refuse(f"{path}: {problem} ({restart})")  # the others do not resume: only rank 0 refuses
    if require_model and world_size is not None:
        _check_parts(cfg, path, world_size)
    return cfg


def _check_run_keys(cfg: TrainConfig, path: Path) -> None:
    """Keys that only make sense together: resume, evaluation, early stopping, precision."""
    if cfg.resume not in ("auto", True, False):
        raise ConfigError(f"{path}: 'resume' must be \"auto\", true or false, got {json.dumps(cfg.resume)}")
    if cfg.overwrite_save_path and cfg.resume is not False:
        raise ConfigError(f"{path}: 'overwrite_save_path' only applies with \"resume\": false (resume "
                          f"{json.dumps(cfg.resume)} continues the run in save_path); set \"resume\": false to replace "
                          "that run, or remove 'overwrite_save_path'")
    if cfg.eval_split_ratio is not None and not 0 < cfg.eval_split_ratio < 1:
        raise ConfigError(f"{path}: 'eval_split_ratio' must be between 0 and 1 (exclusive), got {cfg.eval_split_ratio}"
                          + (" (null: no held-out split)" if cfg.eval_split_ratio == 0 else ""))
    has_eval = cfg.eval_data_path is not None or cfg.eval_split_ratio is not None
    for key in ("eval_interval", "early_stopping_patience", "keep_best"):  # all it needs, in one line
        needs = [] if has_eval else ["evaluation data: set 'eval_data_path' or 'eval_split_ratio'"]
        needs += ["'eval_interval' (steps between evaluations)"] if key != "eval_interval" and cfg.eval_interval is None \
            else []
        if getattr(cfg, key) is not None and needs:
            raise ConfigError(f"{path}: '{key}' needs {', and '.join(needs)}")
    ds = cfg.ds_config
    if problem := precision_problem(ds):
        raise ConfigError(f"{path}: {problem}")
    zero_on = bool(zero_stage(ds))
    opt = ds.get("optimizer")
    try:
        if cfg.lr_schedule is not None:
            parse_lr_schedule(cfg.lr_schedule)
        parse_report_to(cfg.report_to)  # training/trackers.py: known names, installed packages
        if opt is not None:
            check_optimizer(opt)
            if problem := optimizer_key_problem(opt, offload_device(ds) in ("cpu", "nvme")):
                raise ValueError(problem)
            if cfg.decay_norm_and_bias and "no_wd_kws" in opt:
                raise ValueError("'decay_norm_and_bias' and optimizer.no_wd_kws both choose the parameters without "
                                 "weight decay; keep one")
        if "scheduler" in ds and (problem := scheduler_problem(ds["scheduler"]) or scheduler_lr_problem(ds)):
            raise ValueError(problem)
        if (kind := torch_scheduler(ds)) and zero_on:
            raise ValueError(f"scheduler.type {kind!r} is torch's, which DeepSpeed builds on its ZeRO optimizer wrapper "
                             "(not a torch Optimizer: every rank would stop with a TypeError); with ZeRO (needed by "
                             "bf16 and fp16) use the project's \"lr_schedule\" or one of DeepSpeed's schedulers")
        if isinstance(opt, dict) and str(opt.get("type", "")).lower() == "lion":
            # the keys and values only: whether the triton kernel can run is judged at build time, where the
            # parameters' device is known (this CPU tensor made every CUDA run log a false fallback)
            build_lion([torch.zeros(1, requires_grad=True)], **{**(opt.get("params") or {}), "use_triton": False})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(ds.get("dataloader_drop_last", DROP_LAST), bool):
        raise ConfigError(f"{path}: 'dataloader_drop_last' must be true or false, got {json.dumps(ds['dataloader_drop_last'])}")
    clip = ds.get("gradient_clipping", 0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:  # null, NaN: refused too
        raise ConfigError(f"{path}: 'gradient_clipping' must be a number >= 0 (0: off), got {json.dumps(clip)}")
    every = ds.get("steps_per_print", 1)
    if not is_number(every) or not float(every).is_integer() or every < 1:  # DeepSpeed's step: step % it (0: a crash)
        raise ConfigError(f"{path}: 'steps_per_print' must be a whole number >= 1, got {json.dumps(every)}")
    if cfg.lr_schedule is not None and "scheduler" in ds:
        raise ConfigError(f"{path}: 'lr_schedule' and DeepSpeed's 'scheduler' section both set the learning rate; "
                          "keep one")


def _check_batch(cfg: TrainConfig, path: Path, world_size: int | None) -> None:
    ds = cfg.ds_config
    for key in BATCH_KEYS:
        value = ds.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}: '{key}' must be a positive integer, got {json.dumps(value)}")
    if "train_micro_batch_size_per_gpu" not in ds and "train_batch_size" not in ds:
        raise ConfigError(f"{path}: set 'train_micro_batch_size_per_gpu' or 'train_batch_size' (DeepSpeed's batch keys)")
    if world_size is None:
        return
    if not isinstance(ds.get("optimizer"), dict) or "type" not in ds["optimizer"]:
        raise ConfigError(f"{path}: missing DeepSpeed 'optimizer' section, e.g. "
                          '{"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.0}}')
    try:
        axes, dims = parse_topology(cfg.model_topo, world_size)
    except ModelConfigError as e:
        run = ""
        if world_size == 1 and (n := _processes_needed(cfg.model_topo)):  # `python train_ds.py`: the command it needs
            script = "train_ds.py" if command("train_ds.py").startswith("python ") else "$(which pipeft-train)"
            run = f"; on one machine: deepspeed --num_gpus {n} {script} --config {shlex.quote(str(path))}"
        raise ConfigError(f"{path}: {e}{run}") from None
    try:
        derive_batch(ds, dims[axes.index("data")], path)  # the missing batch keys, as DeepSpeed derives them
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section in ("zero_optimization",):
        stage = ds.get(section, {}).get("stage", 0) if isinstance(ds.get(section), dict) else 0
        if not isinstance(stage, int) or isinstance(stage, bool):
            raise ConfigError(f"{path}: zero_optimization.stage must be 0 or 1 (a number), got {json.dumps(stage)}")
        if stage > 1:
            raise ConfigError(f"{path}: zero_optimization.stage {stage} does not work with pipeline parallelism; use 0 or 1")


def _processes_needed(model_topo: dict | None) -> int | None:
    """How many processes `model_topo` takes, when that alone kept it from one process: its dims' product, else one
    per stage of `parts`; None when it says neither or has another problem."""
    topo = model_topo if isinstance(model_topo, dict) else {}
    pt, parts = topo.get("process_topology"), topo.get("parts")
    dims = pt.get("dims") if isinstance(pt, dict) else None
    for n in (math.prod(dims) if isinstance(dims, list) and all(isinstance(d, int) for d in dims) else None,
              len(parts) if isinstance(parts, list) else None):
        if n and n > 1:
            try:
                parse_topology(model_topo, n)
                return n
            except (ModelConfigError, TypeError):
                return None
    return None


def _check_model(cfg: TrainConfig, path: Path) -> None:
    """The model dir's tokenizer against its config and the data keys: an EOS token, a vocabulary the embedding
    covers, max_seq_len within the positions, a chat template for "template": "chat"."""
    from data.chat import require_chat_template
    from data.tokenizer_checks import require_eos, vocab_size_problem, vocabulary_problem

    model = Path(cfg.model_path)
    try:
        family, config = family_of(model)
        tokenizer = load_tokenizer(model)
        if no_vocabulary := vocabulary_problem(tokenizer):
            raise DataError([f"{model}: {no_vocabulary}"])
        require_eos(tokenizer)
        if cfg.template == "chat":
            require_chat_template(tokenizer)
    except (CheckpointError, ModelConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except DataError as e:
        raise ConfigError(f"{path}: {e.problems[0]}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: model_path {model}: cannot load a tokenizer ({one_line(e, 200)})") from None
    if not cfg.from_scratch and not weights_from_checkpoint(cfg) and (missing := missing_layer_file(model, family,
                                                                                                     config)):
        raise ConfigError(f"{path}: model_path: {missing}: an incomplete copy or conversion of the model")
    if problem := vocab_size_problem(config.vocab_size, tokenizer):
        raise ConfigError(f"{path}: model_path {model}: {problem}")
    attn = cfg.attn_implementation
    if attn not in ("auto", "eager"):
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
    else:
        device = "cpu"  # any device runs these
    precision = (half_precisions(cfg.ds_config) or ["fp32"])[0]  # both enabled is refused before
    if problem := attn_problem(attn, family.model_type, device, precision, getattr(config, "attention_dropout", 0.0)):
        raise ConfigError(f"{path}: 'attn_implementation' {attn!r}: {problem}")
    limit, how = family.max_positions(config)
    if limit is not None and cfg.max_seq_len > limit:
        raise ConfigError(f"{path}: 'max_seq_len' {cfg.max_seq_len} is above what the model's positions cover ({limit}, "
                          f"{how}); lower max_seq_len or use a model whose rope scaling covers it")
    switch = family.rope_switch_length(config)
    if cfg.packing and switch is not None and cfg.max_seq_len > switch:
        raise ConfigError(f"{path}: 'packing' with max_seq_len {cfg.max_seq_len} above {switch}: the model's "
                          "rope scaling (config.json: 'dynamic' or 'longrope') encodes every position of a row by its "
                          "longest segment, so a packed sample would depend on its neighbours; turn packing off or use "
                          f"max_seq_len <= {switch}")
    if switch is not None and cfg.max_seq_len > switch:  # unpacked: a warning (as transformers' batched forward does)
        cfg.notes.append(f"the model's rope scaling (config.json: 'dynamic' or 'longrope') encodes the rows of a "
                         f"micro-batch by its longest row: with max_seq_len {cfg.max_seq_len} above {switch}, a short "
                         "row batched with one longer than that trains (and evaluates) with other frequencies than it "
                         f"would alone, as in transformers' batched forward; max_seq_len <= {switch} avoids it")
    window = family.sliding_window(config)
    if window is not None and cfg.max_seq_len > window:
        raise ConfigError(f"{path}: 'max_seq_len' {cfg.max_seq_len} is above the model's sliding_window {window} (config.json), "
                          "which the pipeline's attention does not implement (it would attend beyond the window); "
                          f"use max_seq_len <= {window}")


def resume_hint(cfg: TrainConfig) -> str:
    """How to resume this run after a stop: the same command, unless its config starts a new run."""
    if cfg.raw.get("resume", "auto") is not False:  # the file's value (a restarted job runs with "auto")
        return "resume with the same command"
    again = ("a restart of this same job resumes by itself; run again otherwise, " if launch_job() else "run again, ")
    return (f"to resume, set \"resume\": \"auto\" in {cfg.path}: {again}\"resume\": false would "
            + ("start over and delete this run" if cfg.raw.get("overwrite_save_path") else "be refused"))


def start_over(cfg: TrainConfig) -> str:
    """How to start the run in save_path over instead of resuming it. A restart of the job that started it fresh
    already runs with "resume": false (and resumes whatever it says): it must forget the job first."""
    if cfg.raw.get("resume", "auto") is False and cfg.resume is not False:
        return (f"to start over, delete {Path(cfg.save_path) / JOB_FILE} (this is a restart of the job that started "
                "the run, which resumes it while that file names the job)")
    return "start a new run with \"resume\": false and \"overwrite_save_path\": true"


def _check_lora(cfg: TrainConfig, path: Path, resuming: bool = False) -> LoraSettings | None:
    """The parsed "lora" section (and "quantization" with it); ConfigError naming the key. `resuming` (see
    training.resume.resumes): the adapters come from the checkpoint, so lora.adapter_path is dropped from `cfg.lora`
    (the trainer loads no adapter dir; it may have moved since the run started) and not checked; `cfg.raw` keeps it."""
    if cfg.lora is None:
        if cfg.quantization is not None:
            raise ConfigError(f"{path}: 'quantization' needs a 'lora' section: the 4-bit base is frozen and only "
                              "adapters train (QLoRA)")
        return None
    if cfg.from_scratch:
        raise ConfigError(f"{path}: 'lora' needs a trained base: it cannot be combined with 'from_scratch' (the random "
                          "base would never be saved)")
    if resuming:
        cfg.lora = {k: v for k, v in cfg.lora.items() if k != "adapter_path"}
    try:
        family, config = family_of(Path(cfg.model_path))
        settings = parse_lora(cfg.lora, family, config)
        if settings.adapter_path:
            check_adapter_keys(settings.adapter_path, family, family.num_blocks(config), settings.target_modules)
        quant = None if cfg.quantization is None else parse_quantization(cfg.quantization, family, config, settings)
        if settings.adapter_path and (note := adapter_base_note(settings.adapter_path, quant)):
            cfg.notes.append(note)
    except (ValueError, CheckpointError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return settings


def adapter_base_note(adapter: str, quant) -> str | None:
    """A line when lora.adapter_path was exported from a run whose base was quantized otherwise than this run's
    (its quantization_config.json, models.quant.QUANT_FILE): its adapters were fitted to another base."""
    try:
        theirs = read_quant_file(Path(adapter))
    except ValueError as e:  # names the file
        raise ValueError(f"lora.adapter_path {adapter}: {e}") from None
    if theirs == quant:
        return None
    said = lambda q: "a full-precision base" if q is None else f"a {q.describe()} base"  # noqa: E731
    return (f"lora.adapter_path {adapter} was trained on {said(theirs)} ({QUANT_FILE}), and this run's is "
            f"{said(quant)}: its adapters start from weights fitted to another base (the first losses may differ "
            "from that run's last)")


def _check_parts(cfg: TrainConfig, path: Path, world_size: int) -> None:
    """`model_topo.parts` against the model's units and the pipeline stages."""
    try:
        family, config = family_of(Path(cfg.model_path))
        axes, dims = parse_topology(cfg.model_topo, world_size)
        plan_stages(family.unit_sizes(config), family.unit_costs(config, cfg.max_seq_len), dims[axes.index("pipe")],
                    cfg.model_topo.get("parts"))
    except (ModelConfigError, CheckpointError) as e:
        raise ConfigError(f"{path}: {e}") from None
