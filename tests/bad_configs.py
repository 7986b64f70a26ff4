"""Bad training configs and the one line each is refused with (test_train_cli.py's test_bad_config_is_one_line):
config overrides of the test's base config ("@NAME": one of its variant model dirs, "{tmp}": its tmp_path)."""

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
    "tensor parallel": ({"tensor_parallel": {"autotp_size": 2}}, "'tensor_parallel': DeepSpeed's tensor parallelism "
                        "(AutoTP) is not supported here; a model is split into pipeline stages and data-parallel "
                        "replicas (model_topo)"),  # was "unknown key 'tensor_parallel'; did you mean 'tensorboard'?"
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
    # the base config's optimizer.params.lr is 1e-3: these trained at another lr than every line named
    "scheduler peak not the lr": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-3}}},
                                  "scheduler.params.warmup_max_lr (WarmupLR) is 0.003, and optimizer.params.lr is "
                                  "0.001: WarmupLR trains at warmup_max_lr, never at the optimizer's lr; give the lr "
                                  "to train at as optimizer.params.lr and leave warmup_max_lr out (a run resumed from "
                                  "a checkpoint trained at warmup_max_lr's)"),
    "scheduler peak per group": ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3, 2e-3]}}},
                                 "scheduler.params.warmup_max_lr (WarmupLR) is [0.001, 0.002], and optimizer.params.lr"),
    "scheduler peak by default": ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}},
                                   "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "torch_adam": True}}},
                                  "scheduler.params.warmup_max_lr (WarmupDecayLR) is not given: DeepSpeed's default "
                                  "0.001, and optimizer.params.lr is 0.0002: WarmupDecayLR trains at warmup_max_lr, never "
                                  "at the optimizer's lr; give the lr to train at as both"),
    "scheduler peak by Lion's default": ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}},
                                          "optimizer": {"type": "Lion", "params": {}}},
                                         "is not given: DeepSpeed's default 0.001, and optimizer.params.lr is 0.0001 "
                                         "(Lion default): WarmupDecayLR trains at warmup_max_lr"),
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
    "1-bit optimizer": ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}},
                        "optimizer.type 'OneBitAdam': DeepSpeed's 1-bit optimizers are not supported here; use AdamW, "
                        "Adam, Lion or a torch.optim class"),
    "1-bit optimizer spelt otherwise": ({"optimizer": {"type": "ZeroOne_Adam", "params": {"lr": 1e-3}}},
                                        "optimizer.type 'ZeroOne_Adam': DeepSpeed's 1-bit optimizers are not supported"),
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
    "data_cache_dir a file": ({"data_cache_dir": "{tmp}/a_file"}, "/a_file is a file, not a directory"),  # was a
    "data_cache_dir under a file": ({"data_cache_dir": "{tmp}/a_file/cache"}, "/a_file is a file, not a directory"),
    # warning naming [Errno 17] or [Errno 20] at the data loading, and no cache
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
    "data_types misspelled": ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                               "data_types": {"grad_accum_dtyp": "fp32"}},  # bf16 accumulation, without a word
                              "data_types: unknown key 'grad_accum_dtyp'; did you mean 'grad_accum_dtype'?"),
    "fused with foreach": ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "fused": True, "foreach": True}}},
                           "optimizer.params (SGD): torch.optim.SGD refuses them: `fused` and `foreach` cannot be"),
    "OneCycle of no steps": ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-5, "cycle_max_lr": 1e-3,
                                                                          "cycle_first_step_size": 0}}},
                             "scheduler.params.cycle_first_step_size (OneCycle) must be a whole number >= 1, got 0"),
    "negative eta_min": ({"scheduler": {"type": "CosineAnnealingLR", "params": {"T_max": 10, "eta_min": -1e-3}}},
                         "scheduler.params.eta_min (CosineAnnealingLR) must be >= 0"),
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
    "a model's config.json": ({"model_type": "llama", "hidden_size": 64, "model_path": None, "data_path": None,
                               "save_path": None}, "a model's config.json (model_type 'llama'), not a training config: "
                               "name its directory as model_path in a training config"),
    "save_path with ~": ({"save_path": "~/pipeft-out"}, "'save_path' ~/pipeft-out: a config's paths are not expanded "
                         "as the shell expands '~' (it names a directory ~ here); give the full path ("),
    "data_path with ~": ({"data_path": ["{tmp}/d.jsonl", "~nobody-such/d.jsonl"]}, "'data_path' ~nobody-such/d.jsonl: a "
                         "config's paths are not expanded as the shell expands '~' (it names a directory ~nobody-such "
                         "here); give the full path"),
    "empty data_path": ({"data_path": ""}, "'data_path': an empty path: give a file, a directory or a glob"),
    "save_path with $": ({"save_path": "$HOME/pipeft-out"}, "'save_path' $HOME/pipeft-out: a config's paths are not "
                         "expanded as the shell expands $HOME (it is read as written, '$HOME'); give the full path ("),
    "data_path with ${}": ({"data_path": "${{PIPEFT_NO_SUCH}}/d.jsonl"}, "'data_path' "
                           "${PIPEFT_NO_SUCH}/d.jsonl: a config's paths are not expanded as the shell expands "
                           "${PIPEFT_NO_SUCH} (it is read as written, '${PIPEFT_NO_SUCH}'); give the full path"),
    "data in save_path": ({"save_path": "{tmp}", "data_path": "{tmp}"}, "/cfg.json, inside save_path "),
    "data glob over save_path": ({"save_path": "{tmp}/data/run", "data_path": "{tmp}/**/*.jsonl"},
                                 "/**/*.jsonl matches files a run writes in save_path "),
}
