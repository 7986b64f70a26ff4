"""`python -m training.plan`: which topology, partition, micro-batch and accumulation fit a model on a cluster, and
how fast; the memory and cost model is models/cost.py (the one the automatic partition and the trainer's summary use).

    python -m training.plan --model-config config.json --gpus 8 --gpu-memory 40GB --max-seq-len 1024 [--lora] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from launch import deepspeed_logs_on_stderr, exit_if_ds_accelerator_unusable
from pipeft import module_command, parse_size

exit_if_ds_accelerator_unusable(module_command("training.plan"))  # before DeepSpeed's import builds it
with deepspeed_logs_on_stderr():  # --json: stdout holds the object only
    from models.cost import LoraShape, Setup, stage_memory, throughput
    from models.pipeline import balance
    from training.monitor import fmt_bytes, fmt_count

MICRO_BATCHES = (1, 2, 4, 8, 16)


class PlanError(ValueError):
    """Bad planner input; one line naming the option."""


def load_model(config_path: str | None, model_path: str | None):
    """(family, config) from a config.json or a model dir (HF or pipeline); a config transformers or the pipeline
    rejects is one line naming the file."""
    from models.family import config_errors, get_family

    path = Path(model_path) / "config.json" if model_path else Path(config_path)
    training = (f"{path}: a training config, not a model's config.json: give --model-path with its model_path "
                "(or --model-config that model's config.json)")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        raise PlanError(training)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise PlanError(f"{'--model-path' if model_path else '--model-config'}: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: not a JSON object")
    if "model_type" not in raw and {"model_path", "save_path", "data_path"} & raw.keys():
        raise PlanError(training)
    family = get_family(raw.get("model_type"), str(path))
    with config_errors(path):
        config = family.prepare_config(family.config_class(**{k: v for k, v in raw.items() if k != "model_type"}))
    return family, family.check_config(config, path)


def candidates(family, config, base: Setup, gpus: int, memory: float, global_seqs: int) -> list[dict]:
    """Every (pipe, data, micro-batch, checkpointing, offload) that fits, with its partition, memory and efficiency."""
    from models.cost import unit_costs

    n_units = len(family.unit_sizes(config))
    costs = unit_costs(family, config, base.seq_len)
    found = []
    for pipe in [p for p in range(1, gpus + 1) if gpus % p == 0 and p <= n_units]:
        data = gpus // pipe
        for ckpt in (False, True):
            for offload in (False, True):
                for micro in MICRO_BATCHES:
                    accum = max(1, math.ceil(global_seqs / (micro * data)))
                    setup = replace(base, micro_batch=micro, pipe=pipe, data=data, grad_accum=accum, grad_ckpt=ckpt,
                                    offload=offload)
                    parts = fitting_parts(family, config, setup, costs, memory)
                    if parts is None:
                        continue
                    mem = stage_memory(family, config, setup, parts)
                    tp = throughput(family, config, setup, parts)
                    found.append({"setup": setup, "parts": parts, "memory": mem, "throughput": tp})
    # no offload (the optimizer step on the host is slow) first, then the fastest, no checkpointing, fewer stages
    found.sort(key=lambda c: (c["setup"].offload, -round(c["throughput"].efficiency, 4), c["setup"].grad_ckpt,
                              c["setup"].pipe, c["setup"].micro_batch))
    return found


def fitting_parts(family, config, setup: Setup, costs: list[float], memory: float) -> list[int] | None:
    """The automatic partition (a compute balance) if every stage fits; else the best balance under the memory
    limit per stage (stages near the front hold more micro-batches in flight); None if none fits."""
    parts = balance(costs, setup.pipe)
    if all(m.total <= memory for m in stage_memory(family, config, setup, parts)):
        return parts
    cache: dict = {}

    def fits(stage: int, a: int, b: int) -> bool:
        if (stage, a, b) not in cache:
            cache[stage, a, b] = _stage_fits(family, config, setup, stage, a, b, memory)
        return cache[stage, a, b]

    parts = balance(costs, setup.pipe, fits=fits)
    return parts if parts and all(m.total <= memory for m in stage_memory(family, config, setup, parts)) else None


def _stage_fits(family, config, setup: Setup, stage: int, a: int, b: int, memory: float) -> bool:
    """Whether units [a, b) fit on pipeline stage `stage` (its micro-batches in flight)."""
    n_units = len(family.unit_sizes(config))
    # lay the other units out as single-unit filler stages around this one, so stage_memory sees the right position
    before, after = a, n_units - b
    if before < stage or after < setup.pipe - stage - 1:
        return False
    parts = [*([1] * (stage - 1)), before - (stage - 1)] if stage else []
    parts += [b - a]
    rest = setup.pipe - stage - 1
    parts += [after - (rest - 1), *([1] * (rest - 1))] if rest else []
    return stage_memory(family, config, setup, parts, only=stage)[0].total <= memory


def plan(family, config, gpus: int, memory: float, seq_len: int, precision: str = "bf16", lora: bool = False,
         quantization: str | None = None, global_tokens: int | None = None, lora_r: int = 16,
         double_quant: bool = False, progress=None) -> dict:
    """The planner's answer: {"fits": bool, "best": candidate | None, "candidates": [...], "would_fit": [...],
    "asked_sequences": the global batch asked, in rows}. `progress(line)` is told when the search for what would fit
    starts (it takes long for a large model)."""
    shape = LoraShape(lora_r, family.lora_targets) if lora or quantization else None
    base = Setup(1, seq_len, 1, precision=precision, lora=shape, quantization=quantization, double_quant=double_quant)
    seqs = max(1, math.ceil((global_tokens or 64 * seq_len) / seq_len))
    found = candidates(family, config, base, gpus, memory, seqs)
    answer = {"fits": bool(found), "best": found[0] if found else None, "candidates": found, "would_fit": [],
              "asked_sequences": seqs}
    if not found:  # what would: LoRA, QLoRA, more GPUs (checkpointing and offload were tried already)
        if progress is not None:
            progress(f"does not fit on {gpus} GPUs: trying {'QLoRA' if shape is not None else 'LoRA, QLoRA'} and up "
                     "to 4096 GPUs (some seconds for a large model)")
        if shape is None:
            for name, q in (("LoRA (--lora)", None), ("QLoRA (--quantization nf4)", "nf4")):
                if candidates(family, config, replace(base, lora=LoraShape(lora_r, family.lora_targets), quantization=q),
                              gpus, memory, seqs):
                    answer["would_fit"].append(f"{name} on the same {gpus} GPUs")
        elif quantization is None and candidates(family, config, replace(base, quantization="nf4"), gpus, memory, seqs):
            answer["would_fit"].append(f"QLoRA (--quantization nf4) on the same {gpus} GPUs")
        more = gpus * 2
        while more <= 4096 and not candidates(family, config, base, more, memory, seqs):
            more *= 2
        if more <= 4096:
            answer["would_fit"].append(f"{more} GPUs of this memory, as configured (with activation checkpointing "
                                       "and optimizer offload where needed)")
    return answer


def seq_len_for(family, config, asked: int | None) -> tuple[int, str]:
    """(tokens per row, a note): `asked`, refused where training refuses it (`training.config`: under 2, above the
    model's position limit or its sliding window); unset, 2048 clamped to those."""
    limit, how = family.max_positions(config)
    above = f"what the model's positions cover ({limit}, {how})"
    if (window := family.sliding_window(config)) is not None and (limit is None or window < limit):
        limit, how = window, "sliding_window"
        above = f"the model's sliding_window {window}, which the pipeline's attention does not implement (training refuses it)"
    if asked is not None:
        if limit is not None and asked > limit:
            raise PlanError(f"--max-seq-len {asked} is above {above}")
        if asked < 2:
            raise PlanError(f"--max-seq-len must be >= 2 (training's minimum), got {asked}")
        return asked, ""
    if limit is not None and limit < 2:
        raise PlanError(f"--max-seq-len: the model covers {limit} token(s) ({how}); training needs rows of at least 2")
    if limit is not None and limit < 2048:
        return limit, f" (the model's limit, {how}; default 2048)"
    return 2048, ""


def global_batch(c: dict) -> int:
    """A candidate's global batch in rows: micro x accumulation x replicas (the asked one rounded up to a multiple of
    micro x replicas)."""
    s = c["setup"]
    return s.micro_batch * s.grad_accum * s.data


def to_json(c: dict) -> dict:
    s = c["setup"]
    return {"pipe": s.pipe, "data": s.data, "parts": c["parts"], "micro_batch": s.micro_batch,
            "gradient_accumulation_steps": s.grad_accum, "global_batch": global_batch(c),
            "global_batch_tokens": global_batch(c) * s.seq_len, "use_grad_ckpt": s.grad_ckpt,
            "zero_stage": s.zero_stage, "offload_optimizer": s.offload, "precision": s.precision,
            "lora": s.lora is not None, "quantization": s.quantization, "double_quant": s.double_quant,
            "max_seq_len": s.seq_len,
            "stage_memory_bytes": [round(m.total) for m in c["memory"]],
            "stage_memory": [{k: v for k, v in m.as_dict().items() if k not in ("heap", "logits_unmapped")}
                             for m in c["memory"]],
            "bubble": c["throughput"].bubble, "efficiency": c["throughput"].efficiency}


def snippet(c: dict) -> dict:
    """The training config's keys for this plan (merge into a recipe such as configs/llama2_7b_pp8.json)."""
    s = c["setup"]
    out = {"max_seq_len": s.seq_len, "use_grad_ckpt": s.grad_ckpt,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [s.pipe, s.data]}, "parts": c["parts"]},
           "train_micro_batch_size_per_gpu": s.micro_batch, "gradient_accumulation_steps": s.grad_accum,
           "zero_optimization": {"stage": 1, **({"offload_optimizer": {"device": "cpu"}} if s.offload else {})}}
    # both precisions said: merged into a recipe that enables the other, the plan's still holds
    out |= {"bf16": {"enabled": s.precision == "bf16"}, "fp16": {"enabled": s.precision == "fp16"}}
    if s.precision == "bf16":
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if s.lora is not None:
        out["lora"] = {"r": s.lora.r, "alpha": 2 * s.lora.r, "target_modules": "all-linear"}
    if s.quantization is not None:
        out["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": s.quantization,
                               "bnb_4bit_use_double_quant": s.double_quant,
                               "bnb_4bit_compute_dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(s.precision, "float32")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=module_command("training.plan"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-config", help="a model's config.json (HF)")
    src.add_argument("--model-path", help="an HF or pipeline model dir")
    ap.add_argument("--gpus", type=int, required=True, help="devices in all")
    ap.add_argument("--gpu-memory", required=True, help="memory per device, e.g. 40GB, 80GiB")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, help="tokens per row (default 2048, or the model's limit if lower)")
    ap.add_argument("--lora", action="store_true", help="LoRA (r 16, all linear layers of every block)")
    ap.add_argument("--lora-r", type=int, help="with --lora or --quantization: the LoRA rank (default 16)")
    ap.add_argument("--quantization", choices=["nf4"], help="QLoRA: 4-bit NF4 frozen block weights + LoRA")
    ap.add_argument("--double-quant", action="store_true", help="with --quantization: bnb_4bit_use_double_quant")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--global-batch-tokens", type=int, help="tokens per optimizer step (default 64 sequences)")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args(argv)
    try:
        for key in ("gpus", "nodes", "lora_r"):  # max_seq_len: seq_len_for, as training bounds it
            if getattr(args, key) is not None and getattr(args, key) < 1:
                raise PlanError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
        if args.gpus % args.nodes:
            raise PlanError(f"--gpus {args.gpus} is not a multiple of --nodes {args.nodes}")
        if args.global_batch_tokens is not None and args.global_batch_tokens < 1:
            raise PlanError(f"--global-batch-tokens must be >= 1, got {args.global_batch_tokens}")
        if args.double_quant and not args.quantization:
            raise PlanError("--double-quant needs --quantization nf4")
        if args.lora_r is not None and not (args.lora or args.quantization):
            raise PlanError("--lora-r needs --lora (or --quantization nf4)")
        try:
            memory = parse_size(args.gpu_memory, "--gpu-memory", "40GB or 80GiB")  # a bare 80 is GB or GiB: a unit
        except ValueError as e:
            raise PlanError(str(e)) from None
        family, config = load_model(args.model_config, args.model_path)
        lora_r = 16 if args.lora_r is None else args.lora_r
        if (args.lora or args.quantization) and family.num_blocks(config) == 0:
            from models.lora import NO_BLOCKS

            raise PlanError(f"--lora / --quantization: {NO_BLOCKS} (without them)")
        if args.lora or args.quantization:  # the rank as training checks it (not above the layers' width)
            from models.lora import parse_lora

            try:
                parse_lora({"r": lora_r}, family, config)
            except ValueError as e:
                raise PlanError(f"--lora-r: {e}" if args.lora_r is not None else
                                f"the default LoRA rank 16 is above the model's hidden_size {config.hidden_size}: "
                                "give --lora-r at most that") from None
        args.max_seq_len, note = seq_len_for(family, config, args.max_seq_len)
    except (PlanError, ValueError) as e:
        print(f"{module_command('training.plan')}: error: {e}", file=sys.stderr)
        return 2
    ans = plan(family, config, args.gpus, memory, args.max_seq_len, args.precision, args.lora, args.quantization,
               args.global_batch_tokens, lora_r, args.double_quant,
               progress=lambda line: print(f"{module_command('training.plan')}: {line}", file=sys.stderr, flush=True))
    if args.json:
        best = ans["best"]
        print(json.dumps({"fits": ans["fits"], **(to_json(best) if best else {}), "config": snippet(best) if best else None,
                          "topologies": sorted({(c["setup"].pipe, c["setup"].data) for c in ans["candidates"]}),
                          "would_fit": ans["would_fit"]}))
        return 0 if ans["fits"] else 1
    params = stage_memory(family, config, Setup(1, args.max_seq_len, 1), [len(family.unit_sizes(config))])[0].params
    print(f"{config.model_type}, {fmt_count(params)} parameters; {args.gpus} x {fmt_bytes(memory)} ({args.nodes} "
          f"node{'s' if args.nodes > 1 else ''}), {args.max_seq_len} tokens{note}, {args.precision}"
          f"{', LoRA' if args.lora or args.quantization else ''}{', NF4' if args.quantization else ''}"
          f"{' (double quant)' if args.double_quant else ''}")
    if not ans["fits"]:
        print(f"does not fit on {args.gpus} x {fmt_bytes(memory)}, even with activation checkpointing and the optimizer "
              "offloaded to CPU; would fit: " + ("; ".join(ans["would_fit"]) or
                                                 f"nothing ({'QLoRA' if args.lora or args.quantization else 'LoRA, QLoRA'} and up "
                                                 "to 4096 GPUs tried): more memory per GPU is needed"))
        return 1
    tops = {}
    for c in ans["candidates"]:
        tops.setdefault((c["setup"].pipe, c["setup"].data), c)
    print("topologies that fit (pipe x data): " + ", ".join(
        f"{p}x{d} ({c['throughput'].efficiency:.0%}{', optimizer offloaded' if c['setup'].offload else ''})"
        for (p, d), c in tops.items()))
    best = ans["best"]
    s, tp = best["setup"], best["throughput"]
    per_node = args.gpus // args.nodes
    rows = global_batch(best)
    asked = "" if rows == ans["asked_sequences"] else \
        f": {ans['asked_sequences']} asked, rounded up to a multiple of micro-batch x replicas"
    print(f"best: {s.pipe} stage{'s' * (s.pipe > 1)} x {s.data} replica{'s' * (s.data > 1)}, parts {best['parts']}, micro-batch {s.micro_batch} x "
          f"{s.grad_accum} accumulation (global batch {rows} rows, {rows * s.seq_len:,} tokens{asked}), activation checkpointing {'on' if s.grad_ckpt else 'off'}, ZeRO-1"
          f"{' + optimizer offload to CPU' if s.offload else ''}; bubble {tp.bubble:.1%}, efficiency {tp.efficiency:.1%}"
          + (f" (data-parallel groups span nodes: {s.data} replicas > {per_node} GPUs per node)" if s.data > per_node else ""))
    print("  stage | units   | params | weights | grads | optimizer | activations (in flight) | logits | step buffer "
          "| overhead | peak")
    for i, m in enumerate(best["memory"]):
        print(f"  {i:5d} | {m.units[0]:3d}..{m.units[1]:<3d} | {fmt_count(m.params):>6} | {fmt_bytes(m.weights):>9} | "
              f"{fmt_bytes(m.gradients):>9} | {fmt_bytes(m.optimizer):>9} | {fmt_bytes(m.activations):>9} ({m.in_flight}) | "
              f"{fmt_bytes(m.logits):>9} | {fmt_bytes(m.step_buffer):>9} | {fmt_bytes(m.overhead):>9} | {fmt_bytes(m.total)}"
              + (f" (+ {fmt_bytes(m.host)} in host memory)" if m.host else ""))
    print("  peak = weights + grads + optimizer + max(activations + logits, step buffer) + overhead: the step buffer "
          "(gradient reduction, after the backward) reuses the activations' memory")
    print("  overhead: CUDA context and NCCL (1.5 GiB) + 5% allocator slack, assumed (not measured on a GPU here)")
    print("config keys to paste:\n" + json.dumps(snippet(best), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
