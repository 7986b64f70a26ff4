"""Training throughput side by side, in one run: the project against raw DeepSpeed, ZeRO-3 and one process.

    python bench/train_throughput.py [--rounds 2] [--steps 6] [--warmup 2] [--workdir DIR]
    python bench/train_throughput.py --gpu [--layers 16 --hidden 2048 --seq 2048]   # one GPU: tokens/s and MFU

CPU mode. A Llama of hidden 256, 8 layers (8 heads, 4 KV heads), a tokenizer built locally; global batch 32
(micro 4 x 8 accumulation); every multi-process variant on 2 CPU processes (1 thread each):
  (a) the project: train_ds.py, 2 stages (auto balance), unpacked (with group_by_length on SFT data; each
      micro-batch padded to its longest row, rounded up to the default pad_to_multiple_of 64, and to 8), and packed;
      on SFT data also with its defaults (no group_by_length: other global batches of the same records, in a
      seeded random order; its ratios to the baselines compare those batches with the grouped ones)
  (b) raw DeepSpeed PipelineModule over transformers' LlamaDecoderLayer, written here as a user would: HF's 4D
      mask and RoPE built in every layer, rows padded to max_seq_len
  (c) DeepSpeed ZeRO-3 data parallel over LlamaForCausalLM (2 ranks, micro-batches dealt in turn), rows padded per
      micro-batch (HF's collator)
  (d) one process, LlamaForCausalLM + torch AdamW, 2 threads (d1: 1 thread, for the pipeline efficiency)
Every variant but the packed and ungrouped ones trains on the same global batches (the project's order; checked:
(a)'s real tokens of every timed step are the baselines'), from the same weights, with the same loss (the token mean
over the global batch) and AdamW (no weight decay): their per-step losses are checked against (d)'s (relative 1e-3;
(b), which clips by its first stage's gradient norm as DeepSpeed's PipelineModule does unless told otherwise, on the
first step), so a variant that computed something else cannot pass for a fast one. Data: "full" rows of 128 tokens
(pretrain text cut to max_seq_len) and "sft": 192 of data/samples' records, spread evenly over their lengths, at
max_seq_len 512 (about 4x their mean): one epoch is the 6 timed steps, so they hold every part of the length-grouped
epoch once; the project also runs full 512-token rows, the reference for SFT throughput at the same max_seq_len.
Columns: real (non-padding) tokens/s of the measured steps; ratios to (b), (c), (d); the pipeline efficiency
a / (2 x d1), (a)'s real tokens/s per process relative to one transformers process on the same batches unpacked,
and its share of the 1F1B ideal m / (m + p - 1) = 8/9 (not a bound: the project's kernels, head and deferred weight
gradients differ from d1's, and packed rows meet d1 on unpacked ones, so values above the ideal can occur).
"real / computed tokens": the share of the rows' tokens, pads included, that is not padding (from the batches).
Compare figures of one run on an otherwise idle machine only. The variants of one kind of data run in turn, `--rounds` times over, each round
starting one variant later (a slow minute of the machine then hits each variant alike); tokens/s are over every
round, the data time is the highest of the rounds, and the per-round ratios of (a) to (b) and (c) show the spread.

GPU mode (--gpu): bench/gpu_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MICRO, GAS, PROCS, SEED, LR = 4, 8, 2, 7, 1e-3
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=1024, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------ data


def prepare(work: Path, sft_records: int) -> dict:
    """Tokenizer, model (HF + pipeline dirs) and the data files; returns their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data.records import load_records
    from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer
    from models.convert import hg_to_pp

    samples = ROOT / "data" / "samples"
    tok = train_tiny_tokenizer(_texts_from_records(samples), work / "tok", 2048)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **MODEL)
    LlamaForCausalLM(cfg).save_pretrained(work / "hf")
    tok.save_pretrained(work / "hf")
    hg_to_pp(work / "hf", work / "pp", overwrite=True)  # (a --workdir of an earlier run)
    records = load_records(samples)
    texts = [r.data.get("text") or r.data.get("output") or r.data["rounds"][-1][1] for r in records]
    with open(work / "full.jsonl", "w") as f:  # long pretrain texts: every row is cut to max_seq_len
        for i in range(400):
            f.write(json.dumps({"text": " ".join(texts[(i + k) % len(texts)] for k in range(80))}) + "\n")
    # SFT: `sft_records` of data/samples' 600 records (`--steps` global batches), evenly spread over their lengths
    # (every ~3rd by length for 6 steps, so the mean and the mix of types are the whole set's): one epoch is the
    # timed steps, which (after the untimed ones) hold every part of the length-grouped epoch once, not only its
    # longest rows
    by_length = sorted(records, key=lambda r: len(json.dumps(r.data)))
    with open(work / "sft.jsonl", "w") as f:
        for i in range(sft_records):
            f.write(json.dumps(by_length[i * len(by_length) // sft_records].data) + "\n")
    return {"hf": work / "hf", "pp": work / "pp", "full": work / "full.jsonl", "sft": work / "sft.jsonl"}


def _plan(paths: dict, data: str, seq: int, packing: bool, grouped: bool, multiple: int = 64) -> tuple:
    """(data set, the project's BatchPlan) of a variant."""
    from transformers import AutoTokenizer

    from data.encode import load_dataset
    from data.packing import pack
    from training.batches import BatchPlan

    tok = AutoTokenizer.from_pretrained(str(paths["hf"]))
    ds = load_dataset(paths[data], tok, seq, paths["hf"].parent / "cache")
    if data == "sft" and not packing:  # every record a sample: an epoch is `--steps` global batches (up to 18)
        assert len(ds) == ds.stats.records and ds.stats.dropped == 0, ds.stats
    ds = pack(ds, seq, SEED) if packing else ds
    return ds, BatchPlan(len(ds), MICRO, GAS, 1, SEED, ds.offsets[1:] - ds.offsets[:-1], grouped,
                         pad_multiple=multiple, max_seq_len=seq)


def global_batches(paths: dict, data: str, seq: int, steps: int, packing: bool, grouped: bool) -> list:
    """The project's global batches for `steps` steps: lists of {"input_ids", "labels"} rows (packed rows keep
    their "position_ids" / "segment_ids")."""
    ds, plan = _plan(paths, data, seq, packing, grouped)
    return [[ds[int(i)] for i in plan.global_indices(*plan.position(s))] for s in range(steps)]


def project_fill(paths: dict, data: str, seq: int, steps: range, packing: bool, grouped: bool, multiple: int) -> float:
    """Real tokens / the tokens (a) computes, pads included, over `steps`: each micro-batch (a run of a step's
    length-sorted rows) padded to its longest row, rounded up to `multiple` (training.batches)."""
    ds, plan = _plan(paths, data, seq, packing, grouped, multiple)
    lengths = ds.offsets[1:] - ds.offsets[:-1]
    real = sum(int(lengths[plan.global_indices(*plan.position(s), real=True)].sum()) for s in steps)
    return real / sum(plan.computed_tokens(*plan.position(s)) for s in steps)


def baseline_fill(batches: list, seq: int | None) -> float:
    """Real tokens / tokens computed of the baselines: micro-batches of MICRO rows in the batches' order, padded
    to `seq` ((b)) or to their longest row (None: (c), (d), HF's collator)."""
    n = [len(r["input_ids"]) for b in batches for r in b]
    micro = [n[i:i + MICRO] for i in range(0, len(n), MICRO)]
    return sum(n) / sum(len(m) * (seq or max(m)) for m in micro)


# ------------------------------------------------------------------------------------------------ workers


def _timed(steps: int, warmup: int, run_step) -> dict:
    """Run `run_step(step) -> (real tokens, loss)`; time the steps after `warmup`; every step's loss."""
    tokens, t0, losses = 0, None, []
    for s in range(steps):
        if s == warmup:
            t0 = time.perf_counter()
        n, loss = run_step(s)
        losses.append(loss)
        if s >= warmup:
            tokens += n
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "losses": losses}


def targets(rows: list) -> int:
    """The tokens of `rows` with a target (HF's shifted labels): each step's loss is their mean, as the project's is
    (each micro-batch's mean loss weighted by its share of the step's targets, as HF Trainer weights them)."""
    return sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)


def _pad(rows: list, length: int | None, pad_id: int):
    """(input_ids, attention_mask, labels) right-padded to `length` (None: the longest row), int64."""
    import torch

    n = length or max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    labels = torch.full((len(rows), n), -100)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k], mask[i, :k], labels[i, :k] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return ids, mask, labels


def worker_raw_pipe(spec: dict) -> dict:
    """(b) DeepSpeed's PipelineModule over HF's layers, the way a user writes it (gpt-neox style)."""
    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed.pipe import LayerSpec, PipelineModule
    from safetensors.torch import load_file
    from torch import nn
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    deepspeed.init_distributed(dist_backend="gloo")
    config = LlamaConfig.from_pretrained(spec["hf"])
    config._attn_implementation = "sdpa"

    class Embed(nn.Embedding):
        def __init__(self):
            super().__init__(config.vocab_size, config.hidden_size)

        def forward(self, inputs):
            ids, mask = inputs
            return super().forward(ids), mask

    class Block(LlamaDecoderLayer):
        def __init__(self, i):
            super().__init__(config, i)
            self.rotary = LlamaRotaryEmbedding(config)

        def forward(self, inputs):
            hidden, mask = inputs
            t = mask.shape[1]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            mask4d = causal[None, None] & mask[:, None, None, :].bool()  # HF's causal + padding mask, per layer
            out = super().forward(hidden, attention_mask=mask4d, position_ids=pos,
                                  position_embeddings=self.rotary(hidden, pos))
            return out, mask

    class Norm(LlamaRMSNorm):
        def __init__(self):
            super().__init__(config.hidden_size, eps=config.rms_norm_eps)

        def forward(self, inputs):
            return super().forward(inputs[0])

    def loss_fn(logits, target):  # the micro-batch's mean x GAS x its share of the step's targets (see `targets`)
        labels, weight = target
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return weight * F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                        ignore_index=-100)

    specs = [LayerSpec(Embed), *(LayerSpec(Block, i) for i in range(config.num_hidden_layers)), LayerSpec(Norm),
             LayerSpec(nn.Linear, config.hidden_size, config.vocab_size, bias=False)]
    model = PipelineModule(specs, num_stages=PROCS, loss_fn=loss_fn, partition_method="parameters")
    n = config.num_hidden_layers  # this stage's layers get the HF model's weights: the same model as (a), (c), (d)
    hf = load_file(Path(spec["hf"]) / "model.safetensors")
    prefix = {0: "model.embed_tokens.", n + 1: "model.norm.", n + 2: "lm_head."}
    model.load_state_dict({k: hf[prefix.get(int(k.split(".")[0]), f"model.layers.{int(k.split('.')[0]) - 1}.")
                                 + k.split(".", 1)[1]] for k in model.state_dict()})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": 1.0})
    batches = json.loads(Path(spec["batches"]).read_text())

    def step(s):
        rows = batches[s]
        micro, total = [], targets(rows)
        for i in range(0, len(rows), MICRO):
            ids, mask, labels = _pad(rows[i:i + MICRO], spec["seq"], spec["pad_id"])
            micro.append(((ids, mask), (labels, torch.tensor(GAS * targets(rows[i:i + MICRO]) / total))))
        loss = engine.train_batch(data_iter=iter(micro))
        return sum(len(r["input_ids"]) for r in rows), float(loss)

    return _timed(spec["steps"], spec["warmup"], step)


def _hf_model(spec: dict):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


def _hf_micro(model, rows, pad_id):
    """HF's way: pad to the longest row of the micro-batch; the mask only when something is padded."""
    ids, mask, labels = _pad(rows, None, pad_id)
    return model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, labels=labels).loss


def worker_zero3(spec: dict) -> dict:
    """(c) ZeRO-3 data parallel over LlamaForCausalLM: rank r takes micro-batches r, r + world, ... of every global
    batch (a contiguous half would give rank 0 the longer rows of a length-grouped batch, and rank 1 would wait)."""
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = _hf_model(spec)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS // world, "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}})
    batches = json.loads(Path(spec["batches"]).read_text())

    def step(s):  # DeepSpeed divides by the rank's accumulation and averages the ranks: the weights sum to GAS
        rows, loss = batches[s], torch.zeros(())
        total = targets(rows)
        for micro in [rows[i:i + MICRO] for i in range(0, len(rows), MICRO)][rank::world]:
            share = targets(micro) / total
            mean = _hf_micro(engine, micro, spec["pad_id"])
            engine.backward(mean * GAS * share)
            engine.step()
            loss += mean.detach() * share
        torch.distributed.all_reduce(loss)
        return sum(len(r["input_ids"]) for r in rows), float(loss)

    return _timed(spec["steps"], spec["warmup"], step)


def worker_single(spec: dict) -> dict:
    """(d) one process: LlamaForCausalLM + torch AdamW, micro-batch losses averaged over the accumulation."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = _hf_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batches = json.loads(Path(spec["batches"]).read_text())

    def step(s):
        rows, loss = batches[s], 0.0
        total = targets(rows)
        for i in range(0, len(rows), MICRO):
            share = targets(rows[i:i + MICRO]) / total
            mean = _hf_micro(model, rows[i:i + MICRO], spec["pad_id"])
            (mean * share).backward()
            loss += mean.item() * share
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return sum(len(r["input_ids"]) for r in rows), loss

    return _timed(spec["steps"], spec["warmup"], step)


WORKERS = {"raw_pipe": worker_raw_pipe, "zero3": worker_zero3, "single": worker_single}


# ------------------------------------------------------------------------------------------------ runs


def _env(threads: int) -> dict:
    from tests.helpers import own_extensions_dir

    own_extensions_dir()
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}


def _launch(args: list[str], work: Path, name: str, procs: int = PROCS, threads: int = 1) -> None:
    from tests.helpers import free_port, run_group

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", str(procs), "--master_port", str(free_port()), *args] if procs else [sys.executable, *args]
    log = work / f"{name}.log"
    if why := run_group(cmd, log, cwd=ROOT, env=_env(threads)):
        raise SystemExit(f"{name} failed ({why}); see {log}:\n" + log.read_text()[-3000:])


def run_worker(kind: str, spec: dict, work: Path, name: str, procs: int = PROCS, threads: int = 1) -> dict:
    spec = {**spec, "out": str(work / f"{name}.json")}
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    _launch([str(Path(__file__).resolve()), "--worker", kind, "--spec", str(work / f"{name}.spec.json")], work, name,
            procs, threads)
    return json.loads(Path(spec["out"]).read_text())


def run_project(paths: dict, work: Path, name: str, data: str, seq: int, steps: int, warmup: int, packing: bool,
                grouped: bool, **over) -> dict:
    """(a) train_ds.py; real tokens/s from metrics.jsonl's per-step times after `warmup` steps."""
    cfg = {"model_path": str(paths["pp"]), "save_path": str(work / name), "data_path": str(paths[data]),
           "data_cache_dir": str(work / "cache"), "max_seq_len": seq, "max_steps": steps, "seed": SEED,
           "packing": packing, "group_by_length": grouped, "save_interval": 10**6, "log_interval": 10**6,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [PROCS, 1]}},
           "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}, **over}
    shutil.rmtree(work / name, ignore_errors=True)  # a finished run in save_path would do nothing
    (work / f"{name}.cfg.json").write_text(json.dumps(cfg))
    _launch(["train_ds.py", "--config", str(work / f"{name}.cfg.json")], work, name)
    metrics = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    measured = [m for m in metrics if m["step"] > warmup]
    if packing and data == "sft":  # the variant ran as labelled: several samples in a row (full rows hold one)
        assert all(m["samples"] > m["sequences"] for m in measured), f"{name}: packing did not pack ({work / name})"
    seconds = measured[-1]["time"] - metrics[warmup - 1]["time"]
    step_s = seconds / len(measured)
    return {"tokens": sum(m["tokens"] for m in measured), "seconds": seconds, "step_tokens": [m["tokens"] for m in measured],
            "data_share": sum(m["data_s"] for m in measured) / len(measured) / step_s,
            "seq_lens": sorted({m["seq_len"] for m in measured}), "losses": [m["loss"] for m in metrics]}


def cpu_bench(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pipeft-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; {os.cpu_count()} cores; {PROCS} processes x 1 thread; global batch {MICRO * GAS} "
          f"(micro {MICRO} x {GAS}); {args.steps} timed steps after {args.warmup} untimed, {args.rounds} rounds",
          flush=True)
    sft_records = min(600, max(6, args.steps) * MICRO * GAS)  # (fewer would not fill one global batch packed)
    paths = prepare(work, sft_records)
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(str(paths["hf"])).pad_token_id
    steps, warmup = args.steps + args.warmup, args.warmup
    results: dict[tuple[str, str], list[dict]] = {}
    fills: dict[tuple[str, str], float] = {}  # real tokens / tokens computed, pads included, in the timed steps
    step_tokens: dict[str, list[int]] = {}  # the real tokens of each timed step of the batches every variant trains
    problems: list[str] = []  # variants whose losses are not (d)'s
    for data, seq in (("full", 128), ("sft", 512)):
        grouped = data == "sft"
        batches = work / f"{data}.batches.json"
        rows = global_batches(paths, data, seq, steps, False, grouped)
        batches.write_text(json.dumps(rows))
        step_tokens[data] = [sum(len(r["input_ids"]) for r in b) for b in rows[warmup:]]
        timed_steps = range(warmup, steps)
        fills.update({(data, "a"): project_fill(paths, data, seq, timed_steps, False, grouped, 64),
                      (data, "a packed"): project_fill(paths, data, seq, timed_steps, True, False, 64),
                      (data, "a pad8"): project_fill(paths, data, seq, timed_steps, False, grouped, 8),
                      (data, "a ungrouped"): project_fill(paths, data, seq, timed_steps, False, False, 64),
                      (data, "b"): baseline_fill(rows[warmup:], seq),
                      **{(data, k): baseline_fill(rows[warmup:], None) for k in ("c", "d", "d1")}})
        timed = [len(r["input_ids"]) for b in rows[warmup:] for r in b]
        print(f"{data}: the timed steps' rows: {len(timed)}, {sum(timed) / len(timed):.1f} real tokens each on average "
              f"(max_seq_len {seq})", flush=True)
        spec = {"hf": str(paths["hf"]), "batches": str(batches), "seq": seq, "pad_id": pad_id, "steps": steps,
                "warmup": warmup}
        runs = {"a": lambda d=data, s=seq, g=grouped: run_project(paths, work, f"project-{d}", d, s, steps, warmup,
                                                                    False, g),
                "a packed": lambda d=data, s=seq: run_project(paths, work, f"project-{d}-packed", d, s, steps, warmup,
                                                              True, False),
                "a pad8": lambda d=data, s=seq, g=grouped: run_project(paths, work, f"project-{d}-pad8", d, s, steps,
                                                                       warmup, False, g, pad_to_multiple_of=8),
                "a ungrouped": lambda d=data, s=seq: run_project(paths, work, f"project-{d}-ungrouped", d, s, steps,
                                                                 warmup, False, False),
                "b": lambda s=spec, d=data: run_worker("raw_pipe", s, work, f"raw-{d}"),
                "c": lambda s=spec, d=data: run_worker("zero3", s, work, f"zero3-{d}"),
                "d": lambda s=spec, d=data: run_worker("single", {**s, "threads": 2}, work, f"single-{d}", 0, 2),
                "d1": lambda s=spec, d=data: run_worker("single", {**s, "threads": 1}, work, f"single1-{d}", 0, 1)}
        if data == "full":  # every row is max_seq_len long: the padding multiple and grouping change nothing
            del runs["a pad8"], runs["a ungrouped"]
        if data == "sft":
            runs["full512"] = lambda: run_project(paths, work, "project-full512", "full", 512, steps, warmup, False,
                                                  False)
        keys = list(runs)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # each round starts one variant later
                run = runs[key]
                print(f"  round {r + 1}: {data}: {key} ...", flush=True)
                results.setdefault(("full512", "a") if key == "full512" else (data, key), []).append(run())
        for key in ("a", "a pad8"):  # the project trained the very batches the baselines did (order, grouping)
            for res in results.get((data, key), []):
                assert res["step_tokens"] == step_tokens[data], (data, key, res["step_tokens"], step_tokens[data])
        problems += same_losses(results, data)
    full512 = [len(r["input_ids"]) for b in global_batches(paths, "full", 512, steps, False, False)[warmup:] for r in b]
    print(f"full 512-token rows: {sum(full512) / len(full512):.1f} real tokens each on average", flush=True)
    report(results, fills)
    if problems:
        raise SystemExit("the variants did not train alike, so their figures do not compare:\n" + "\n".join(problems))


LOSS_RTOL = 1e-3  # fp32; the variants differ in reduction order only


def same_losses(results: dict, data: str) -> list[str]:
    """Print how far each variant's per-step losses are from (d)'s, on the batches they all train (not the packed or
    ungrouped ones); return the variants past LOSS_RTOL. (b) is compared on its first step only: DeepSpeed's
    PipelineModule, written as a user would, clips by its first stage's gradient norm, not the model's."""
    ref = results[(data, "d")][0]["losses"]
    said, problems = [], []
    for key in ("a", "a pad8", "b", "c", "d", "d1"):
        worst = None
        for res in results.get((data, key), []):
            got = res["losses"][:1] if key == "b" else res["losses"]
            if len(got) != (1 if key == "b" else len(ref)):
                problems.append(f"{data}: ({key}) has {len(res['losses'])} losses, (d) {len(ref)}")
                continue
            diff = max(abs(g - r) / abs(r) for g, r in zip(got, ref, strict=False))
            worst = diff if worst is None else max(worst, diff)
            if diff > LOSS_RTOL:
                problems.append(f"{data}: ({key}) losses {res['losses']} against (d)'s {ref}")
        if worst is not None:
            said.append(f"({key}) {worst:.1e}" + (" (step 1)" if key == "b" else ""))
    print(f"{data}: per-step losses ({ref[0]:.4f} -> {ref[-1]:.4f} in (d)), largest relative difference to (d)'s: "
          + ", ".join(said), flush=True)
    return problems


def report(results: dict, fills: dict) -> None:
    """The table; `results[(data, variant)]` holds one measurement per round (the data time: the highest);
    `fills[(data, variant)]`: real tokens / tokens computed."""
    rate = {k: sum(r["tokens"] for r in v) / sum(r["seconds"] for r in v) for k, v in results.items()}
    ideal = GAS / (GAS + PROCS - 1)
    names = {"a": "(a) project, 2 stages", "a packed": "(a) project, packed", "a pad8": "(a) project, pad_to_multiple_of 8",
             "a ungrouped": "(a) project, defaults (no group_by_length: other batches of the same records)",
             "b": "(b) raw DeepSpeed pipeline",
             "c": "(c) DeepSpeed ZeRO-3", "d": "(d) one process, 2 threads", "d1": "(d1) one process, 1 thread"}
    print()
    print(f"| data | variant | real tokens/s | vs (b) | vs (c) | vs (d) | pipeline eff. (of 1F1B ideal {ideal:.3f}) "
          "| real / computed tokens | data time / step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for data, label in (("full", "full rows, 128"), ("sft", "SFT records, max 512")):
        for key in ("a", "a packed", "a pad8", "a ungrouped", "b", "c", "d", "d1"):
            if (data, key) not in rate:
                continue
            r = rate[(data, key)]
            eff = ""
            if key.startswith("a"):
                e = r / (PROCS * rate[(data, "d1")])
                eff = f"{e:.3f} ({e / ideal:.2f})"
            shares = [r["data_share"] for r in results[(data, key)] if "data_share" in r]
            share = max(shares) if shares else None
            print(f"| {label} | {names[key]} | {r:,.0f} | {r / rate[(data, 'b')]:.2f}x | {r / rate[(data, 'c')]:.2f}x | "
                  f"{r / rate[(data, 'd')]:.2f}x | {eff} | {fills[(data, key)]:.3f} | "
                  f"{'' if share is None else f'{share:.2%}'} |")
    full512 = rate[("full512", "a")]
    print(f"\nSFT unpacked vs full 512-token rows, the project at the same max_seq_len: "
          f"{rate[('sft', 'a')]:,.0f} / {full512:,.0f} = {rate[('sft', 'a')] / full512:.2f}x (packed: "
          f"{rate[('sft', 'a packed')] / full512:.2f}x, pad_to_multiple_of 8: {rate[('sft', 'a pad8')] / full512:.2f}x, "
          f"no group_by_length: {rate[('sft', 'a ungrouped')] / full512:.2f}x); "
          f"step lengths of the SFT runs: {results[('sft', 'a')][0]['seq_lens']}, "
          f"{results[('sft', 'a pad8')][0]['seq_lens']}")
    per_round = {k: [r["tokens"] / r["seconds"] for r in v] for k, v in results.items()}
    for data in ("full", "sft"):
        for base in ("b", "c"):
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(per_round[(data, "a")], per_round[(data, base)], strict=True))
            print(f"{data}: (a) / ({base}) per round: {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="CPU mode: untimed steps first (--gpu: 2)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU mode: every variant this many times, in turn")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--gpu", action="store_true", help="the one-GPU mode")
    ap.add_argument("--device", default="cuda", help="--gpu: the device")
    ap.add_argument("--layers", type=int, default=16, help="--gpu: the model's layers (CPU mode: 8)")
    ap.add_argument("--hidden", type=int, default=2048, help="--gpu: its hidden size (CPU mode: 256)")
    ap.add_argument("--seq", type=int, default=2048, help="--gpu: tokens per row (CPU mode: 128 and 512)")
    ap.add_argument("--micro", type=int, default=4, help="--gpu: rows per step (CPU mode: micro 4 x 8)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="--gpu: the device's dense bf16 peak (default: "
                    "by its name, H100 SXM / H200 989, H100 NVL 835, H100 PCIe 756, A100 312)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="--gpu: after the fast path's timed steps, profile one step and print its N costliest ops")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or (args.warmup < 1 and not args.gpu):
        ap.error("--rounds, --steps and --warmup must be at least 1")
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = WORKERS[args.worker](spec)
        import torch

        from training.distributed import shutdown_distributed

        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            Path(spec["out"]).write_text(json.dumps(result))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            shutdown_distributed()  # and DeepSpeed's /dev/shm buffer, which it leaves behind on CPU
        return
    if args.gpu:
        import torch

        from launch.cuda_only import cuda_available

        if torch.device(args.device).type == "cuda" and not cuda_available():
            print("bench/train_throughput.py: --gpu needs a CUDA device, and there is none here; `--gpu --device cpu` "
                  "runs the same code on the CPU (use small sizes: --layers 2 --hidden 256 --seq 256 --steps 1)",
                  file=sys.stderr)
            sys.exit(2)
    if args.gpu:
        from bench.gpu_throughput import gpu_bench

        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
