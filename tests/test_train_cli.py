"""train_ds.py: bad configs and bad data fail with one-line errors before any model is built or file written
exists; from_scratch builds the same model as `convert_model.py init` on any partition."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_model
import train_ds
from tests.helpers import run_deepspeed, write_config
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def variants(tmp_path_factory, base, sp_tokenizer_dir) -> dict[str, Path]:
    """Copies of `base` with one thing wrong: a tokenizer without EOS, a vocab_size below the tokenizer's, a
    tokenizer without its vocabulary (tokenizer_config.json alone)."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ("no_eos", "small_vocab", "no_vocab"):
        shutil.copytree(base, root / name)
        out[name] = root / name
    for name in ("tokenizer.json", "tokenizer.model"):  # a SentencePiece tokenizer_config.json alone loads
        (root / "no_vocab" / name).unlink(missing_ok=True)
    shutil.copy(sp_tokenizer_dir / "tokenizer_config.json", root / "no_vocab")
    tok_cfg = json.loads((root / "no_eos" / "tokenizer_config.json").read_text())
    tok_cfg.pop("eos_token")
    (root / "no_eos" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = json.loads((root / "small_vocab" / "config.json").read_text())
    (root / "small_vocab" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    return out


CASES = {  # name -> (config overrides, expected text)
    "misspelled key": ({"n_epochs": 2}, "unknown key 'n_epochs'; did you mean 'n_epoches'?"),
    "wrong type": ({"max_seq_len": "512"}, "'max_seq_len' must be int, got \"512\""),
    "missing data_path": ({"data_path": None}, "missing required key 'data_path'"),
    "zero 2": ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage 2 does not work with pipeline"),
    "zero stage a string": ({"zero_optimization": {"stage": "1"}}, "zero_optimization.stage must be 0 or 1 (a number), "
                            "got \"1\""),
    "bf16 under two names": ({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}, "zero_optimization": {"stage": 1}},
                             "'bf16' and 'bfloat16' are two names of one DeepSpeed section (with both, DeepSpeed reads "
                             "'bf16' and ignores 'bfloat16'); keep one"),
    "wall clock": ({"wall_clock_breakdown": True}, "'wall_clock_breakdown' true stops DeepSpeed's pipeline engine"),
    "pipeline checkpoint interval": ({"pipeline": {"activation_checkpoint_interval": 1}},
                                     "'pipeline.activation_checkpoint_interval' 1: DeepSpeed would checkpoint every layer "
                                     "of a stage with its reentrant checkpoint, the embedding too, whose output then "
                                     "needs no gradient: the first stage's layers would not train; set \"use_grad_ckpt\": true (the decoder blocks, "
                                     "non-reentrant); remove it"),
    "pipeline stages": ({"pipeline": {"stages": 2}}, "'pipeline.stages' 2: the stages are model_topo's (process_topology "
                        "dims); remove it"),
    "pipeline key unknown": ({"pipeline": {"partition_method": "uniform"}}, "'pipeline.partition_method' is not a key of "
                             "DeepSpeed's pipeline section (activation_checkpoint_interval, use_reentrant, stages, "),
    "pipeline not an object": ({"pipeline": [1]}, "'pipeline' must be an object, got [1]"),
    "pipeline flag not a bool": ({"pipeline": {"pipe_partitioned": "no"}}, "'pipeline.pipe_partitioned' must be true or "
                                 "false, got \"no\""),
    "torch autocast a bool": ({"torch_autocast": True}, "'torch_autocast' must be an object, got true"),
    # DeepSpeed's sections this pipeline would ignore, or that fail once it trains, saves or resumes (each run to that
    # failure over the project's pipeline with DeepSpeed 0.19.8), and values DeepSpeed's own config class refuses
    "flops profiler": ({"flops_profiler": {"enabled": True}}, "'flops_profiler.enabled' true stops DeepSpeed's pipeline "
                       "engine at the first backward pass"),
    "node-local checkpoints": ({"checkpoint": {"use_node_local_storage": True}}, "'checkpoint.use_node_local_storage' "
                               "true: DeepSpeed then writes only each node's local rank 0's files"),
    "universal checkpoint": ({"checkpoint": {"load_universal": True}}, "'checkpoint.load_universal' true: this project "
                             "resumes its own checkpoints"),
    "deepspeed activation checkpointing": ({"activation_checkpointing": {"cpu_checkpointing": True}},
                                           "'activation_checkpointing.cpu_checkpointing' true: DeepSpeed's "
                                           "activation_checkpointing section configures deepspeed.checkpointing, which "
                                           "this pipeline does not use"),
    "mock checkpoint writer": ({"checkpoint": {"writer": {"type": "mock"}}}, "'checkpoint.writer.type' \"mock\": "
                               "DeepSpeed's mock writer writes empty files"),
    "decoupled checkpoint writer": ({"checkpoint": {"writer": {"type": "python", "decoupled": True}}},
                                    "'checkpoint.writer.decoupled' true: DeepSpeed's decoupled writer saves from a "
                                    "background process"),
    "fast checkpoint writer": ({"checkpoint": {"writer": {}}}, "'checkpoint.writer.type' \"fast\" (DeepSpeed's default "
                               "once 'writer' is given): its fast writer is not checked with this pipeline"),
    "deepcompile": ({"compile": {"deepcompile": True}}, "'compile.deepcompile' true: this project does not compile"),
    "data efficiency": ({"data_efficiency": {"enabled": True}}, "'data_efficiency' enabled: DeepSpeed's data "
                        "efficiency (curriculum sampling, random-LTD) acts through its own data loader"),
    "comms logger": ({"comms_logger": {"enabled": True, "verbose": True}}, "'comms_logger' enabled: DeepSpeed's "
                     "communication logger prints nothing in this trainer"),
    "compile enabled": ({"compile": {"enabled": True}, "bf16": {"enabled": False}}, "DeepSpeed 0.19.8 refuses this config: 'compile.enabled': "
                        "not a key DeepSpeed accepts, got true"),
    "compile beside timers": ({"compile": {"enabled": True}, "timers": {"throughput": {"enabled": True}}},
                              "DeepSpeed 0.19.8 refuses this config: 'compile.enabled': not a key DeepSpeed accepts, got "
                              "true"),  # 'enabled' is a key of both: the section holding the refused value is named
    "nested timer key": ({"timers": {"throughput": {"enabled": "yes please"}}}, "DeepSpeed 0.19.8 refuses this config: "
                         "'timers.throughput.enabled': Input should be a valid boolean"),
    "communication type": ({"communication_data_type": "int8"}, "DeepSpeed 0.19.8 refuses this config: ValueError: "
                           "Invalid communication_data_type. Supported data types: ['fp16', 'bf16', 'fp32']. Got: int8"),
    "tag validation": ({"checkpoint": {"tag_validation": "bogus"}}, "DeepSpeed 0.19.8 refuses this config: "
                       "DeepSpeedConfigError: Checkpoint config contains invalid tag_validation value of BOGUS"),
    "removed section": ({"elasticity": {"enabled": True}}, "Elastic training has been removed; the 'elasticity' "
                        "configuration block is no longer supported."),
    "removed apex amp": ({"amp": {"enabled": True}}, "NVIDIA Apex AMP integration has been removed."),
    "torch autocast": ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "'torch_autocast' is not a precision "
                       "this project checks against transformers"),
    "batch sizes": ({"train_batch_size": 3}, "train_batch_size 3 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x data-parallel size 1"),
    "dims": ({"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}}}, "needs 2 processes but 1 were started (start 2 in all: "
             "deepspeed --num_gpus or hostfile slots, torchrun --nnodes x --nproc-per-node, srun --ntasks); on one "
             "machine: deepspeed --num_gpus 2 train_ds.py --config "),
    "topology a list": ({"model_topo": {"process_topology": [2, 1]}}, 'model_topo.process_topology must be an object '
                        '{"axes": ["pipe", "data"], "dims": [P, D]}, got [2, 1]'),
    "parts": ({"model_topo": {"parts": [7]}}, "model_topo.parts [7] sums to 7 but the model has 6 pipeline units"),
    "parts alone, one process": ({"model_topo": {"parts": [3, 3]}}, "model_topo.parts has 2 stages, which does not "
                                 "divide the 1 processes; on one machine: deepspeed --num_gpus 2 train_ds.py --config "),
    "no optimizer": ({"optimizer": None}, "missing DeepSpeed 'optimizer' section"),
    "split without packing": ({"split_long_pretrain": True}, "'split_long_pretrain' needs 'packing': true"),
    "no model": ({"model_path": "/nonexistent/model"}, "model_path /nonexistent/model is not a directory"),
    "resume value": ({"resume": "yes"}, "'resume' must be \"auto\", true or false, got \"yes\""),
    "resume nothing": ({"resume": True}, "'resume' is true but save_path"),
    "eval ratio": ({"eval_split_ratio": 1.5}, "'eval_split_ratio' must be between 0 and 1 (exclusive), got 1.5"),
    "eval without data": ({"eval_interval": 5}, "'eval_interval' needs evaluation data: set 'eval_data_path' or 'eval_split_ratio'"),
    "keep_best without interval": ({"eval_split_ratio": 0.2, "keep_best": 2}, "'keep_best' needs 'eval_interval'"),
    "patience without both": ({"early_stopping_patience": 2}, "'early_stopping_patience' needs evaluation data: set "
                              "'eval_data_path' or 'eval_split_ratio', and 'eval_interval' (steps between evaluations)"),
    "eval ratio zero": ({"eval_split_ratio": 0}, "'eval_split_ratio' must be between 0 and 1 (exclusive), got 0 (null: "
                        "no held-out split)"),
    "HF Trainer's key": ({"learning_rate": 2e-5}, "unknown key 'learning_rate'; here it is 'optimizer.params.lr'"),
    "eval data missing": ({"eval_data_path": "/nonexistent/eval.jsonl"}, "'eval_data_path': /nonexistent/eval.jsonl:0: file not found"),
    "eval data none": ({"eval_data_path": []}, "'eval_data_path': eval_data_path:0: no data files given"),  # data_path:0
    "save_interval": ({"save_interval": 0}, "'save_interval' must be >= 1, got 0"),
    "max_bad_steps": ({"max_bad_steps": 2.5}, "'max_bad_steps' must be int, got 2.5"),
    "fp16 on cpu": ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}},
                    "'fp16' is not supported on this device (cpu) (use bf16 or fp32)"),
    "fp16 without ZeRO": ({"fp16": {"enabled": True}},  # DeepSpeed's fp16 optimizer at stage 0: never scaled the loss
                          "'fp16' needs \"zero_optimization\": {\"stage\": 1}: without ZeRO, DeepSpeed "),
    "fp16 and bf16": ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "'fp16' and 'bf16' are both enabled; choose one"),
    "optimizer without its package": ({"optimizer": {"type": "MuAdamW", "params": {"lr": 1e-4}}},
                                      "optimizer.type 'MuAdamW' needs the mup package (pip install mup), which is not "
                                      "installed"),
    "bf16 without ZeRO": ({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 0}},
                          "'bf16' needs \"zero_optimization\": {\"stage\": 1}: without ZeRO, DeepSpeed "),
    "bf16 without immediate_grad_update": ({"bf16": {"enabled": True, "immediate_grad_update": False}},
                                           "'bf16.immediate_grad_update' false: the last stage computes the head inside "
                                           "the loss"),
    "schedule type": ({"lr_schedule": {"type": "cosin"}}, "lr_schedule.type must be one of cosine, linear, constant"),
    "schedule warmup": ({"lr_schedule": {"warmup_ratio": 1.5}}, "lr_schedule.warmup_ratio must be in [0, 1), got 1.5"),
    "two schedules": ({"lr_schedule": {"type": "cosine"}, "scheduler": {"type": "WarmupLR"}},
                      "'lr_schedule' and DeepSpeed's 'scheduler' section both set the learning rate"),
    "lion params": ({"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "beta": [0.9, 0.99]}}}, "unknown key(s) 'beta' for Lion"),
    "lora target": ({"lora": {"r": 4, "target_modules": ["qproj"]}}, "lora.target_modules: 'qproj' not in a llama block (known: q_proj,"),
    "lora rank": ({"lora": {"r": 0}}, "lora.r must be a positive integer, got 0"),
    "lora adapter path": ({"lora": {"r": 4, "adapter_path": 5}}, "lora.adapter_path must be a string, got 5"),
    "lora modules_to_save": ({"lora": {"r": 4, "modules_to_save": ["lm_heads"]}}, "lora.modules_to_save: 'lm_heads' names no module of a llama model"),
    "lora modules_to_save adapted": ({"lora": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["q_proj"]}},
                                     "lora.modules_to_save: 'q_proj' names model.layers.0.self_attn.q_proj, which "
                                     "lora.target_modules adapts"),
    "lora from scratch": ({"lora": {"r": 4}, "from_scratch": True}, "'lora' needs a trained base: it cannot be combined with 'from_scratch'"),
    "optimizer section typo": ({"optimizer": {"type": "AdamW", "parms": {"lr": 1e-5}}},
                               "optimizer: unknown key 'parms'; did you mean 'params'?"),
    "optimizer params typo": ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decy": 0.1}}},
                              "optimizer.params (AdamW): unknown key 'weight_decy'; did you mean 'weight_decay'?"),
    "torch.optim params typo": ({"optimizer": {"type": "SGD", "params": {"lr": 1e-2, "momentun": 0.9}}},
                                "optimizer.params (SGD): unknown key 'momentun'; did you mean 'momentum'?"),
    # DeepSpeed's engine refused these once the model was built, with a traceback on every rank
    "adagrad params typo": ({"optimizer": {"type": "Adagrad", "params": {"lr": 1e-2, "lr_decy": 0.1}}},
                            "optimizer.params (Adagrad): unknown key 'lr_decy'; did you mean 'lr_decay'?"),
    "max_grad_norm": ({"optimizer": {"type": "Adagrad", "params": {"lr": 1e-2, "max_grad_norm": 1.0}}},
                      "optimizer.params.max_grad_norm: DeepSpeed clips by its own top-level \"gradient_clipping\""),
    "lamb on cpu": ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}},
                    "optimizer.type Lamb is DeepSpeed's FusedLamb, a compiled op with no CPU build"),
    "momentum string": ({"optimizer": {"type": "SGD", "params": {"lr": 1e-2, "momentum": "0.9"}}},
                        "optimizer.params.momentum (SGD) must be a number, got \"0.9\""),
    "grad accum bf16 of fp32": ({"data_types": {"grad_accum_dtype": "bf16"}}, "'data_types.grad_accum_dtype' \"bf16\" "
                                "with fp32 weights and no ZeRO: DeepSpeed's engine accumulates their gradients in fp32 "
                                "only"),
    "grad accum fp64": ({"data_types": {"grad_accum_dtype": "fp64"}}, "'data_types.grad_accum_dtype' \"fp64\" is not a "
                        "dtype DeepSpeed knows (bf16, bfloat16, float, float16, float32, fp16, fp32, half, "),
    # a non-finite update was applied to every weight while the log said it was skipped
    "bf16 overflow check off": ({"bf16": {"enabled": True, "check_grad_overflow": False},
                                 "zero_optimization": {"stage": 1}},
                                "'bf16.check_grad_overflow' false: DeepSpeed's ZeRO optimizer would then apply a "
                                "non-finite (NaN / inf) update to every weight, not skip it; leave the key out"),
    "grad norm off": ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}},
                      "'zero_optimization.compute_grad_norm' false with fp32 weights: DeepSpeed's ZeRO optimizer "
                      "would then apply a non-finite (NaN / inf) update"),
    "scheduler params typo": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
                              "scheduler.params (WarmupLR): unknown key 'warmup_num_step'; did you mean "
                              "'warmup_num_steps'?"),
    "scheduler type": ({"scheduler": {"type": "WarmupCosine"}}, "scheduler.type \"WarmupCosine\" is neither a "
                       "DeepSpeed nor a torch.optim.lr_scheduler scheduler; did you mean 'WarmupCosineLR'?"),
    "torch scheduler params typo": ({"scheduler": {"type": "StepLR", "params": {"step_siz": 2}}},
                                    "scheduler.params (StepLR): unknown key 'step_siz'; did you mean 'step_size'?"),
    "scheduler param missing": ({"scheduler": {"type": "StepLR", "params": {"gamma": 0.5}}},
                                "scheduler.params (StepLR): 'step_size' is required"),
    "OneCycle param missing": ({"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}},
                               "scheduler.params (OneCycle): 'cycle_min_lr' is required"),
    "scheduler length auto": ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
                              "scheduler.params.total_num_steps (WarmupDecayLR) is \"auto\", HF Trainer's placeholder, "
                              "which DeepSpeed does not fill in: leave it out: it is filled in"),
    "scheduler steps a fraction": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2.5}}},
                                   "scheduler.params.warmup_num_steps (WarmupLR) must be a whole number, got 2.5"),
    "scheduler milestones a string": ({"scheduler": {"type": "MultiStepLR", "params": {"milestones": "3,6"}}},
                                      "scheduler.params.milestones (MultiStepLR) must be a list of whole numbers (steps), "
                                      "got \"3,6\""),
    "scheduler lr a string": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "3e-4"}}},
                              "scheduler.params.warmup_max_lr (WarmupLR) must be a number (or a list of them, one per "
                              "parameter group), got \"3e-4\""),
    "OneCycleLR without its length": ({"scheduler": {"type": "OneCycleLR", "params": {"max_lr": 1e-3}}},
                                      "scheduler.params (OneCycleLR): 'total_steps' is required"),
    "OneCycleLR with a null length": ({"scheduler": {"type": "OneCycleLR", "params": {"max_lr": 1e-3,
                                                                                   "total_steps": None}}},
                                      "scheduler.params (OneCycleLR): 'total_steps' is required"),
    "StepLR with a null step_size": ({"scheduler": {"type": "StepLR", "params": {"step_size": None}}},
                                     "scheduler.params (StepLR): 'step_size' is required"),
    "ReduceLROnPlateau": ({"scheduler": {"type": "ReduceLROnPlateau"}},
                          "scheduler.type 'ReduceLROnPlateau' steps on a metric the engine does not pass"),
    "LambdaLR": ({"scheduler": {"type": "LambdaLR", "params": {}}},
                 "scheduler.type 'LambdaLR' takes Python callables or schedulers, which a config cannot hold"),
    "torch scheduler with ZeRO": ({"scheduler": {"type": "StepLR", "params": {"step_size": 2}},
                                   "zero_optimization": {"stage": 1}},
                                  "scheduler.type 'StepLR' is torch's, which DeepSpeed builds on its ZeRO optimizer "),
    "lion lr": ({"optimizer": {"type": "Lion", "params": {"lr": -1}}}, "optimizer.params.lr must be a number > 0, got -1"),
    # bad input that used to surface only after the model was built (or as a device assert on CUDA)
    "optimizer type": ({"optimizer": {"type": "AdamWW", "params": {"lr": 1e-3}}},
                       "optimizer.type 'AdamWW' is not an optimizer DeepSpeed or torch.optim knows; did you mean 'AdamW'?"),
    "optimizer lr zero": ({"optimizer": {"type": "AdamW", "params": {"lr": 0}}}, "optimizer.params.lr must be a number > 0, got 0"),
    "optimizer lr text": ({"optimizer": {"type": "AdamW", "params": {"lr": "1e-3"}}},
                          "optimizer.params.lr must be a number > 0, got \"1e-3\""),
    "optimizer betas": ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 1.0]}}},
                        "optimizer.params.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    "optimizer weight_decay": ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": -0.1}}},
                               "optimizer.params.weight_decay must be a number >= 0, got -0.1"),
    "gradient_clipping": ({"gradient_clipping": -1}, "'gradient_clipping' must be a number >= 0 (0: off), got -1"),
    "gradient_clipping NaN": ({"gradient_clipping": float("nan")},  # NaN < 0 is false: it turned clipping off
                              "'gradient_clipping' is nan: a config's numbers must be finite"),
    "tokenizer without eos": ({"model_path": "@no_eos"}, ":0: the tokenizer has no EOS token (eos_token)"),
    "tokenizer without vocabulary": ({"model_path": "@no_vocab"}, "no_vocab: the tokenizer encodes text to no tokens: it "
                                     "has no vocabulary (its tokenizer.json or tokenizer.model is missing?)"),
    "vocab below tokenizer": ({"model_path": "@small_vocab"},
                              "the model's vocab_size 256 is smaller than the tokenizer's 512 tokens"),
    "max_seq_len above positions": ({"max_seq_len": 2048}, "'max_seq_len' 2048 is above what the model's positions "
                                    "cover (1024, max_position_embeddings); lower max_seq_len"),
    "save_path under a file": ({"save_path": "{tmp}/a_file/out"}, "/a_file, which is a file, not a directory"),
    "attn flash on cpu": ({"attn_implementation": "flash_attention_2"}, "'attn_implementation' 'flash_attention_2': "
                          "flash_attention_2 needs a CUDA device (this one is cpu)"),
    "attn unknown": ({"attn_implementation": "sdpa2"}, "'attn_implementation' 'sdpa2': must be one of 'auto', 'sdpa'"),
    "pad multiple": ({"pad_to_multiple_of": 0}, "'pad_to_multiple_of' must be >= 1, got 0"),
    # numbers past what torch and timedelta take were a traceback after the process group started
    "seed past 32 bits": ({"seed": 2**64}, "'seed' must be <= 4294967295 (a 32-bit seed), got 18446744073709551616"),
    "timeout past a year": ({"dist_timeout_minutes": 1e300}, "'dist_timeout_minutes' must be <= 525600 (a year), got"),
    "timeout infinite": ({"dist_timeout_minutes": float("inf")}, "'dist_timeout_minutes' is inf: a config's numbers must "
                         "be finite"),
    "save interval NaN": ({"save_interval_minutes": float("nan")},  # NaN: no time-based save, without a word
                          "'save_interval_minutes' is nan: a config's numbers must be finite"),
    "lora alpha NaN": ({"lora": {"r": 4, "alpha": float("nan")}},  # trained with loss nan, every update skipped
                       "'lora.alpha' is nan: a config's numbers must be finite"),
    "betas inf": ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, float("inf")]}}},
                               "'optimizer.params.betas[1]' is inf: a config's numbers must be finite"),
    "bf16 enabled auto": ({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 1}},  # DeepSpeed: off; we: on
                          "'bf16.enabled': \"auto\" is for HF Trainer's DeepSpeed integration, which fills it in from "
                          "its own arguments; DeepSpeed reads it as false: give true or false"),
    "bf16 enabled a string": ({"bf16": {"enabled": "false"}, "zero_optimization": {"stage": 1}},  # DeepSpeed: off
                              "'bf16.enabled' must be true or false, got \"false\""),
    "deprecated ZeRO key with its replacement": ({"zero_optimization": {"stage": 1, "cpu_offload": True,  # a traceback
                                                                        "offload_optimizer": {"device": "cpu"}}},
                                                 "'zero_optimization': Cannot provide deprecated parameter 'cpu_offload' "
                                                 "and replacing parameter 'offload_optimizer' together"),
    "save_path unwritable": ({"save_path": "/sys/pipeft-out/run"}, "save_path /sys/pipeft-out/run is not writable: /sys "
                             "refuses new files"),
    # the config fuzz's finds: silent wrong training, or a traceback on every rank once the model was built
    "check_grad_overflow 0": ({"bf16": {"enabled": True, "check_grad_overflow": 0}, "zero_optimization": {"stage": 1}},
                              "'bf16.check_grad_overflow' must be true or false, got 0"),  # DeepSpeed: false
    "compute_grad_norm a string": ({"zero_optimization": {"stage": 1, "compute_grad_norm": "false"}},
                                   "'zero_optimization.compute_grad_norm' must be true or false, got \"false\""),
    "negative scheduler lr": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": -1,
                                                                           "warmup_num_steps": 10}}},
                              "scheduler.params.warmup_max_lr (WarmupLR) must be >= 0 (a negative learning rate climbs "
                              "the loss), got -1"),
    "warmup of no steps": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
                           "scheduler.params.warmup_num_steps (WarmupLR) must be a whole number >= 1, got 0"),
    "warmup steps null": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": None}}},
                          "scheduler.params.warmup_num_steps (WarmupLR) must be a whole number >= 1, got null"),
    "steps_per_print 0": ({"steps_per_print": 0}, "'steps_per_print' must be a whole number >= 1, got 0"),
    "SGD momentum negative": ({"optimizer": {"type": "SGD", "params": {"lr": 0.003, "momentum": -1}}},
                              "optimizer.params (SGD): torch.optim.SGD refuses them: Invalid momentum value: -1"),
    "adam_w_mode a string": ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "adam_w_mode": "false"}}},
                             "optimizer.params.adam_w_mode (Adam) must be true or false, got \"false\""),
    "lora r past the width": ({"lora": {"r": 10**30}}, "lora.r 1000000000000000000000000000000 is above the model's "
                              "hidden_size"),
    "compute dtype a list": ({"lora": {"r": 4}, "quantization": {"load_in_4bit": True,
                                                                 "bnb_4bit_compute_dtype": ["float32"]}},
                             "quantization.bnb_4bit_compute_dtype must be one of bfloat16, float16, float32, got "
                             "[\"float32\"]"),
    "data_types not an object": ({"data_types": True}, "refuses this config: AttributeError: 'bool' object has no "
                                 "attribute 'get' (in 'data_types')"),
    "save_path empty": ({"save_path": ""}, "'save_path' is empty (it would be the working directory); give a directory"),
    "data_cache_dir empty": ({"data_cache_dir": ""}, "'data_cache_dir' is empty (it would be the working directory)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line(tmp_path, base, variants, capsys, monkeypatch, case):
    over, expected = CASES[case]
    if case == "fp16 on cpu":  # CPUs with AVX512-FP16 / AMX-FP16 do run fp16: the check runs as on one without
        from deepspeed.accelerator import get_accelerator

        monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    (tmp_path / "a_file").write_text("not a directory")
    over = {k: str(variants[v[1:]]) if isinstance(v, str) and v.startswith("@") else
            v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in over.items()}
    cfg = write_config(tmp_path, base, **over)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_ds.py: error: {cfg}: {expected}"] or (len(err) == 1 and expected in err[0]), err
    assert not (tmp_path / "out").exists()


def test_a_usage_error_is_an_exit_code_not_systemexit(capsys):
    """train_ds.main returns its exit code (a notebook calling it is not ended by argparse's SystemExit)."""
    assert train_ds.main(["--config"]) == 2
    assert capsys.readouterr().err.startswith("usage: train_ds.py ")
    assert train_ds.main(["--help"]) == 0


def test_gradient_clipping_null_is_refused(tmp_path, base, capsys):
    """A YAML `gradient_clipping:` with no value is null: one line, not a TypeError on every rank after the build."""
    cfg = write_config(tmp_path, base)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "gradient_clipping": None}))
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == (f"train_ds.py: error: {cfg}: 'gradient_clipping' must be a number >= 0 "
                                               "(0: off), got null")


@pytest.mark.parametrize("over", [
    {"scheduler": {"type": "StepLR", "params": {"step_size": 2, "gamma": 0.5}}},  # DeepSpeed falls back to torch's
    {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}}},
    {"optimizer": {"type": "Adam", "legacy_fusion": False, "params": {"lr": 1e-3, "torch_adam": True,
                                                                       "adam_w_mode": False, "decoupled_weight_decay": True,
                                                                       "amsgrad": False, "foreach": True}}},
    {"optimizer": {"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9, "nesterov": True}}},
    {"bf16": {"enabled": True}, "zero_optimization": True},  # DeepSpeed's older form: stage 1
], ids=["torch scheduler", "OneCycle", "Adam with torch.optim.Adam's keys", "SGD", "bf16 with zero_optimization true"])
def test_optimizer_and_scheduler_keys_deepspeed_takes_are_accepted(tmp_path, base, over):
    """The key checks refuse misspellings, not what DeepSpeed (or the torch class it builds) takes."""
    load_config(write_config(tmp_path, base, **over), world_size=1)


def test_zero_optimization_true_is_stage_1_without_deepspeeds_deprecation_dump(tmp_path, base, capfd):
    """DeepSpeed reads a bool zero_optimization with a 40-line deprecation message: the check gives it stage 1."""
    cfg = load_config(write_config(tmp_path, base, bf16={"enabled": True}, zero_optimization=True), world_size=1)
    assert cfg.ds_config["zero_optimization"] == {"stage": 1}
    out = capfd.readouterr()
    assert "deprecated" not in (out.out + out.err).lower(), out


def test_a_used_save_path_needs_resume_or_overwrite(tmp_path, base, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = write_config(tmp_path, base, resume=False)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_ds.py: error: {cfg}: save_path {tmp_path / 'out'} already holds a training run and 'resume' "
                   "is false; set \"resume\": \"auto\" to continue it or \"overwrite_save_path\": true to replace it"]
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing touched


RESUME_CASES = {  # name -> (files under save_path, config overrides, expected text)
    "latest names nothing": ({"latest": "global_step9"}, {}, "latest names 'global_step9', which does not exist"),
    "old checkpoint": ({"latest": "global_step2", "global_step2/layer_00-model_states.pt": ""}, {},
                       "global_step2 has no trainer_state.json (written by an older version?): it cannot be resumed exactly"),
    "full checkpoint, lora config": ({"latest": "global_step2", "global_step2/trainer_state.json": "{}"},
                                     {"lora": {"r": 4}}, "is a full checkpoint but the config has a 'lora' section"),
    "lora rank changed": ({"latest": "global_step2", "global_step2/trainer_state.json": "{}",
                           "global_step2/lora_config.json": json.dumps({"r": 8, "alpha": 8.0, "dropout": 0.0,
                                                                     "target_modules": ["q_proj"], "base_model_path": "pp"})},
                          {"lora": {"r": 4, "target_modules": ["q_proj"]}}, "lora.r is 4 but the checkpoint"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_problems_are_found_before_training(tmp_path, base, capsys, case):
    files, over, expected = RESUME_CASES[case]
    for name, text in files.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    cfg = write_config(tmp_path, base, **over)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {cfg}: ") and expected in err[0], err


def test_other_eval_data_on_resume_is_refused_where_eval_losses_are_compared(tmp_path, base, capsys):
    """keep_best and early stopping compare each eval loss with the earlier ones: a resume with other eval data
    would rank checkpoints (and stop) by losses of different data. Without them the new eval data is applied."""
    evals = []
    for name in ("a.jsonl", "b.jsonl"):
        evals.append(tmp_path / name)
        evals[-1].write_text(json.dumps({"instruct": "say", "output": name}) + "\n")
    compared = {"eval_interval": 1, "keep_best": 1}
    saved = json.loads(write_config(tmp_path, base, eval_data_path=str(evals[0]), **compared).read_text())
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tag / "run_config.json").write_text(json.dumps(saved))
    (tmp_path / "out" / "latest").write_text("global_step1")
    cfg = write_config(tmp_path, base, eval_data_path=str(evals[1]), **compared)
    load_config(cfg, world_size=1)  # no eval loss in the checkpoint yet: nothing to compare with
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]]}))
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {cfg}: 'eval_data_path' changed since the "
                                               f"checkpoint {tag / 'run_config.json'}") and \
        "keep_best / early_stopping_patience compare every eval loss with the earlier ones" in err[0], err
    # a checkpoint with its eval rows' fingerprint: they are compared once read (test_train_ops), not the path
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]], "eval_fingerprint": "0" * 32}))
    load_config(cfg, world_size=1)
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]]}))
    (tag / "run_config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "keep_best"}))
    load_config(write_config(tmp_path, base, eval_data_path=str(evals[1]), eval_interval=1), world_size=1)


def test_a_batch_split_that_keeps_the_global_batch_resumes(tmp_path, base):
    """Twice the replicas and half the accumulation: the checkpoint's global batch, so the same data order (applied);
    another global batch is refused before training."""
    two = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}}}
    saved = json.loads(write_config(tmp_path, base, gradient_accumulation_steps=4).read_text())
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text(json.dumps({"step": 1, "global_batch": 8, "data_fingerprint": "0" * 32}))
    (tag / "run_config.json").write_text(json.dumps(saved))
    (tmp_path / "out" / "latest").write_text("global_step1")
    load_config(write_config(tmp_path, base, gradient_accumulation_steps=2, **two), world_size=2)
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps' changed since the checkpoint .*the global "
                                          "batch changes"):
        load_config(write_config(tmp_path, base, gradient_accumulation_steps=2), world_size=1)


def test_a_full_run_resumes_only_with_the_model_config_it_was_built_with(tmp_path, base):
    """The weights come from the checkpoint, so model_path may move, but not to a config.json that builds another
    model (the checkpoint's model_config.json: config.json without who wrote it and what serving reads): refused before
    training, naming the key. A checkpoint without that record (an older version's) is not checked."""
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "latest").write_text("global_step1")
    config = json.loads((base / "config.json").read_text())
    cfg = write_config(tmp_path, base, model_path=str(moved))
    (moved / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    load_config(cfg, world_size=1)  # no record
    from training.resume import model_config

    (tag / "model_config.json").write_text(json.dumps(model_config(base)))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, world_size=1)
    said = str(e.value)
    assert "\n" not in said and said.startswith(f"{cfg}: model_path {moved}: its config.json differs from the model "
                                                f"config the checkpoint {tag} was trained with (model_config.json): "
                                                f"rms_norm_eps {config['rms_norm_eps']} -> 0.001; ") and \
        "restore that config.json" in said
    (moved / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9", "dtype": "float16",
                                                   "eos_token_id": [2, 7], "use_cache": False}))
    load_config(cfg, world_size=1)  # moved, the same model (what serving reads may change)
    rope = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": config["rope_parameters"]["rope_theta"]}
    for same in ({**config, "mlp_bias": False, "rope_scaling": None}, rope):  # defaults written out; 4.x's rope keys
        (moved / "config.json").write_text(json.dumps(same))
        load_config(cfg, world_size=1)  # the model transformers builds is the same


def test_a_model_path_that_is_no_pipeline_model_names_the_way_on(tmp_path, base, capsys):
    """An HF dir (safetensors or .bin weights), a Hub id, a training run's save_path or one of its checkpoints: the
    first mistakes with model_path, each with what to run."""
    hf, bins, save = tmp_path / "hf", tmp_path / "bins", tmp_path / "run"
    assert convert_model.main(["pp_to_hg", "--input-path", str(base), "--save-path", str(hf)]) == 0
    bins.mkdir()
    (bins / "config.json").write_text((hf / "config.json").read_text())
    (bins / "pytorch_model.bin").write_bytes(b"")
    (save / "global_step300").mkdir(parents=True)
    (save / "latest").write_text("global_step300")
    (save / "config.json").write_text((hf / "config.json").read_text())
    capsys.readouterr()
    convert = "python convert_model.py"
    ckpt = (f"(a training run's checkpoints: resume that run with its own config, or, to train further from it as a "
            f"new run, export it ({convert} pp_to_hg --input-path ... --save-path HF_DIR), then convert that ({convert} "
            "hg_to_pp --input-path HF_DIR --save-path PP_DIR) and use PP_DIR)")
    for model, says in ((hf, f"has no pipeline layer files (an HF dir? convert it first: {convert} hg_to_pp "
                              f"--input-path {hf} --save-path PP_DIR, then use PP_DIR)"),
                        (bins, "has no pipeline layer files (an HF dir? convert it first"),
                        ("meta-llama/Llama-2-7b-hf", f"is not a directory (a Hub id? convert it first: {convert} hg_to_pp "
                                                     "--input-path meta-llama/Llama-2-7b-hf --save-path DIR, then use DIR)"),
                        (save, f"has no pipeline layer files {ckpt}"),
                        (hf / "config.json", f"is not a directory (a file; model_path is the pipeline dir {convert} "
                                             "hg_to_pp writes)"),
                        ("tests/no_such_model", f"is not a directory (relative to the working directory {Path.cwd()})"),
                        (save / "global_step300", f"has no config.json {ckpt}")):
        cfg = write_config(tmp_path, base, model_path=str(model))
        assert train_ds.main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"model_path {model} {says}" in err and len(err.splitlines()) == 1, err


def test_a_missing_or_damaged_layer_file_of_model_path_is_one_line(tmp_path, base, capsys):
    """A layer file missing: refused with the config, before the data are read; one that does not load (truncated,
    as an interrupted copy leaves it; another layer's tensors): one line naming it once the model is built (its
    rank's problem is every rank's, tests/test_run_faults.py)."""
    model = tmp_path / "pp"
    shutil.copytree(base, model)
    layer = model / "layer_02-model_states.pt"
    body = layer.read_bytes()
    layer.unlink()
    cfg = write_config(tmp_path, base, model_path=str(model))
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train_ds.py: error: {cfg}: model_path: {layer}: missing (block 1): an incomplete copy or conversion of the model"]
    qlora = write_config(tmp_path, base, model_path=str(model), lora={"r": 4}, name="qlora.json",
                         quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    truncated = (body[:1000], "cannot be loaded (RuntimeError: PytorchStreamReader failed reading zip archive")
    for damage, says, config in ((*truncated, cfg), (*truncated, qlora),  # QLoRA: the block loads as it is built
                                 ((model / "layer_00-model_states.pt").read_bytes(),
                                  "cannot be loaded (RuntimeError: Error(s) in loading state_dict for ", cfg)):
        layer.write_bytes(damage)
        assert train_ds.main(["--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {layer}: {says}"), err
    assert not (tmp_path / "out" / "latest").exists()


def test_lion_trains_with_the_optimizer_offloaded(tmp_path, base, capsys):
    """DeepSpeed refuses a client optimizer under offload_optimizer unless zero_force_ds_cpu_optimizer is false (a
    traceback on every rank before); lion-pytorch steps the offloaded fp32 weights."""
    lion = {"type": "Lion", "params": {"lr": 1e-4, "use_triton": False}}
    zero = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert train_ds.main(["--config", str(write_config(tmp_path, base, optimizer=lion, zero_optimization=zero))]) == 0
    assert "optimizer: Lion with the torch update" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_fp16_overflows_are_logged_and_stop_only_at_the_minimum_loss_scale(tmp_path, base, capsys):
    """An fp16 overflow is DeepSpeed's dynamic scaling at work: logged, the update skipped, not counted; at the minimum
    loss scale it counts among max_bad_steps, which stop the run with a save (DeepSpeed raised "Current loss scale
    already at minimum" on every rank, nothing saved; the overflows above it were not on the console)."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("this CPU runs no fp16 (AVX512-FP16 / AMX-FP16)")
    fp16 = {"enabled": True, "initial_scale_power": 32, "hysteresis": 1, "min_loss_scale": 2**30}
    cfg = write_config(tmp_path, base, fp16=fp16, zero_optimization={"stage": 1}, max_steps=6, max_bad_steps=2)
    assert train_ds.main(["--config", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("step ") and "skipped" in line] == [
        f"step 1: fp16 gradient overflow: update skipped, loss scale {2**32:g} -> {2**31:g} (DeepSpeed's dynamic loss "
        "scaling)",
        f"step 2: fp16 gradient overflow: update skipped, loss scale {2**31:g} -> {2**30:g} (DeepSpeed's dynamic loss "
        "scaling)",
        f"step 3: non-finite loss or gradient norm (loss {_loss(tmp_path, 3)}, grad norm inf) at the minimum fp16 loss "
        f"scale {2**30:g}: update skipped (1 in a row; stopping at 2)",
        f"step 4: non-finite loss or gradient norm (loss {_loss(tmp_path, 4)}, grad norm inf) at the minimum fp16 loss "
        f"scale {2**30:g}: update skipped (2 in a row; stopping at 2)"], out[-3000:]
    assert "2 consecutive steps had a non-finite loss or gradient norm (last: step 4)" in err and "Traceback" not in err
    assert err.rstrip().endswith("or use bf16 instead of fp16")
    assert f"precision: fp16 (dynamic loss scale, initial {2**32:g}); ZeRO stage 1" in out
    assert (tmp_path / "out" / "latest").read_text() == "global_step4"
    # a fixed loss scale (DeepSpeed's LossScaler: no minimum): trains; one that overflows stops at max_bad_steps
    for scale, code in ((128, 0), (2**40, 1)):
        run = tmp_path / f"fixed{scale}"
        run.mkdir()
        cfg = write_config(run, base, fp16={"enabled": True, "loss_scale": scale}, zero_optimization={"stage": 1},
                           max_steps=3, max_bad_steps=2)
        assert train_ds.main(["--config", str(cfg)]) == code
        out, err = capsys.readouterr()
        assert "Traceback" not in err and (code == 0) == ("finished 3 steps" in out), out[-2000:] + err[-2000:]
        assert f"precision: fp16 (fixed loss scale {scale:g}); ZeRO stage 1" in out  # it said "dynamic"
    assert f"at the fixed fp16 loss scale {2**40:g}: update skipped (2 in a row; stopping at 2)" in out


def _loss(tmp_path: Path, step: int) -> float:
    return next(m["loss"] for m in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
                if m["step"] == step)


def test_bad_records_fail_before_any_model_is_built(tmp_path, base):
    cfg = write_config(tmp_path, base)
    data = tmp_path / "d.jsonl"
    data.write_text(data.read_text() + '{"instruct": "x"}\n{"text": 5}\nnot json\n')
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train_ds.py: error:")]
    assert [e.split(": error: ")[1].split(":")[:2] for e in errors] == [[str(data), "17"], [str(data), "18"], [str(data), "19"]]
    assert "Traceback" not in proc.stderr and "SEED_LAYERS" not in proc.stdout  # no PipelineModule was built
    assert not (tmp_path / "out").exists()


def test_ds_accelerator_cuda_without_a_gpu_is_one_line(tmp_path, base):
    """DS_ACCELERATOR=cuda where this process sees no GPU (a CPU host; CUDA_VISIBLE_DEVICES empty): DeepSpeed's
    import accepts it, then the process group failed with NCCL's traceback (train_ds) or CUDA's (demo); now one line
    each, exit 2, before the data are read. Conversion, which needs no device, still runs (convert's own tests)."""
    cfg = write_config(tmp_path, base)
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": ""}
    procs = {prog: subprocess.Popen([sys.executable, prog, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # side by side: each is mostly imports
             for prog, args in (("train_ds.py", ["--config", str(cfg)]),
                                ("demo.py", ["--model-path", str(base), "--instruct", "hi"]))}
    said = "DS_ACCELERATOR=cuda, but this process sees no cuda device (CUDA_VISIBLE_DEVICES='') (unset DS_ACCELERATOR " \
           "to let DeepSpeed detect this machine's device)"
    for prog, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert err.splitlines()[-1] == f"{prog}: error: {'rank 0: ' if prog == 'train_ds.py' else ''}{said}"
        assert "data:" not in out and "loading" not in err  # neither the records nor the model were read
    assert not (tmp_path / "out").exists()


def test_from_scratch_one_stage_matches_init(tmp_path, base, tokenizer_dir):
    """One stage (tied embedding and head together), fresh weights (model_path holds no layer files): with lr 1e-30 (an lr of 0 is refused; AdamW's
    step of about lr moves no weight by more than 1e-20) the saved checkpoint equals
    `convert_model.py init` with the same seed, layer for layer."""
    tied = tmp_path / "tied"
    (tmp_path / "tied.json").write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2,
                                                    "tie_word_embeddings": True}))
    assert convert_model.main(["init", "--family", "llama", "--config-json", str(tmp_path / "tied.json"), "--tokenizer",
                               str(tokenizer_dir), "--save-path", str(tied), "--seed", "5"]) == 0
    bare = tmp_path / "bare"  # the model without its layer files: the weights can only come from the init
    shutil.copytree(tied, bare, ignore=shutil.ignore_patterns("layer_*"))
    cfg = write_config(tmp_path, bare, from_scratch=True, seed=5,
                       optimizer={"type": "AdamW", "params": {"lr": 1e-30, "weight_decay": 0.0, "torch_adam": True}})
    run_deepspeed("train_ds.py", ["--config", str(cfg)], num_procs=1)
    ckpt = tmp_path / "out" / "global_step2"
    files = sorted(p.name for p in tied.glob("layer_*"))
    assert files == sorted(p.name for p in ckpt.glob("layer_*")) and len(files) == 4  # embed, 2 blocks, norm
    for name in files:
        a, b = torch.load(tied / name, weights_only=True), torch.load(ckpt / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-20) for k in a), name
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)


def test_runs_without_the_launcher_as_one_process(tmp_path, base):
    """`python train_ds.py --config X` is a 1-stage run (no MPI discovery, no leftover shared memory)."""
    cfg = write_config(tmp_path, base)
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: 1 pipeline stages x 1 data-parallel replicas (1 processes)" in proc.stdout
    assert (tmp_path / "out" / "latest").read_text() == "global_step2"
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= before


def test_optimizer_names_are_deepspeeds():
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as ours_upstream

    from training.optim import DEEPSPEED_OPTIMIZERS

    assert sorted(ours_upstream) == sorted(DEEPSPEED_OPTIMIZERS)


def test_max_positions_follow_rope_scaling():
    from models import get_family
    from tests.helpers import tiny_config

    llama = get_family("llama")
    plain = tiny_config("llama", "gqa_tied", max_position_embeddings=1024)
    assert llama.max_positions(plain) == (1024, "max_position_embeddings")
    linear = tiny_config("llama", "gqa_tied", max_position_embeddings=1024,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert llama.max_positions(linear) == (4096, "linear rope scaling x4 of 1024")
    llama3 = tiny_config("llama", "gqa_llama3_rope")  # factor 8 of an original 16: max_position_embeddings 128 already
    assert llama.max_positions(llama3) == (128, "max_position_embeddings")
    llama32 = tiny_config("llama", "gqa_tied", max_position_embeddings=128,  # Llama-3.2: 8192 x 32, 131072 stated
                          rope_parameters={"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 16,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0})
    assert llama.max_positions(llama32) == (128, "max_position_embeddings")
    yarn = tiny_config("llama", "gqa_tied", max_position_embeddings=128,  # Qwen2.5's: the original is the stated one
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                        "rope_theta": 10000.0})
    assert llama.max_positions(yarn) == (512, "yarn rope scaling x4 of 128")
    assert get_family("bloom").max_positions(tiny_config("bloom", "tied")) == (None, "no position limit")  # ALiBi


def test_a_deepspeed_section_left_empty_in_yaml_is_refused_not_a_traceback():
    """YAML's `pipeline:` with its keys commented out is null, which DeepSpeed iterates (AttributeError on every rank)."""
    from training.compat import unsupported_section_problem

    assert unsupported_section_problem({"pipeline": None}) == "'pipeline' must be an object, got null"
    assert unsupported_section_problem({"torch_autocast": None}) == "'torch_autocast' must be an object, got null"
    assert unsupported_section_problem({"pipeline": {"use_reentrant": True, "pipe_partitioned": True,
                                                     "activation_checkpoint_interval": 0}, "torch_autocast": {}}) is None
