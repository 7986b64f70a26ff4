"""Generate from an HF dir or a pipeline / training checkpoint dir, prompted with the training templates.

  python demo.py --model-path DIR --prompt TEXT
  python demo.py --model-path DIR --instruct TEXT [--input TEXT] [--max-new-tokens 128 --temperature 0.7 --top-p 0.9]
  python demo.py --model-path BASE --adapter PEFT_DIR --prompt TEXT  # a LoRA adapter, merged in at load
  deepspeed --num_gpus N demo.py --model-path DIR ...   # tensor parallel over N GPUs (DeepSpeed inference)

A LoRA training checkpoint (adapters only) works as --model-path too: its base is merged with the adapters.

Greedy when --temperature is 0. Only the generated text goes to stdout; status goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from data.templates import render_prompt
from models.convert import load_hf_model
from models.hf_io import CheckpointError
from models.pipeline import ModelConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DemoError(ValueError):
    """A user-facing problem, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="HF dir, pipeline dir, checkpoint tag dir, or save_path with 'latest'")
    ap.add_argument("--adapter", help="a PEFT LoRA adapter dir (pp_to_hg --lora peft, or any peft adapter) for --model-path")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text to continue (a pretrain record)")
    src.add_argument("--instruct", help="an instruction, rendered with the training template")
    ap.add_argument("--input", help="context for --instruct")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on a GPU that has it, else fp32")
    ap.add_argument("--no-stream", action="store_true", help="print the continuation at the end instead of streaming")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # from `deepspeed`
    return ap


def check_args(args: argparse.Namespace) -> None:
    if args.input is not None and args.instruct is None:
        raise DemoError("--input needs --instruct")
    if args.max_new_tokens < 1:
        raise DemoError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise DemoError(f"--temperature {args.temperature}: must be >= 0")
    if args.top_k < 0:
        raise DemoError(f"--top-k {args.top_k}: must be >= 0")
    if not 0 < args.top_p <= 1:
        raise DemoError(f"--top-p {args.top_p}: must be in (0, 1]")


def build_prompt(args: argparse.Namespace) -> str:
    """The prompt text, rendered by the same code training uses (`data.templates.render_prompt`)."""
    if args.instruct is not None:
        rec = {"instruct": args.instruct}
        if args.input is not None:
            rec["input"] = args.input
        return render_prompt(rec)
    return render_prompt({"text": args.prompt})


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(model_path: str | Path, dtype: torch.dtype | None = None):
    """(eval-mode HF model on CPU, tokenizer) from any directory `load_hf_model` accepts.

    The generation config comes from the tokenizer/config dir in both cases, so an HF dir and the
    checkpoint it was exported from generate identically."""
    from transformers import AutoTokenizer, GenerationConfig

    model, _, config_dir = load_hf_model(model_path, dtype=dtype)
    if (Path(config_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(config_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(config_dir))
    except Exception as e:  # transformers raises many types for a bad tokenizer dir
        raise DemoError(f"{config_dir}: cannot load a tokenizer ({type(e).__name__}: {e})".splitlines()[0]) from None
    return model, tokenizer


@torch.inference_mode()
def generate(model, tokenizer, prompt_text: str, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stream: bool = True) -> str:
    """Generate a continuation of `prompt_text` (tokenized as training did: BOS etc. by the tokenizer).

    Greedy when temperature == 0, else sampling with temperature / top_k (0 = off) / top_p. With `stream`,
    tokens are printed to stdout as they come (TextStreamer, ending with a newline). Returns the
    continuation without the prompt, special tokens skipped."""
    from transformers import TextStreamer

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    enc = tokenizer(prompt_text, return_tensors="pt").to(device)  # input_ids: (1, T)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(do_sample=temperature > 0)
    if temperature > 0:
        kw.update(temperature=temperature, top_k=top_k, top_p=top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad, streamer=streamer, **kw)  # (1, T + new)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_adapter(model, adapter: str | Path):
    """`model` with a PEFT LoRA adapter merged into its weights (as PEFT's merge_and_unload)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise DemoError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter dir)")
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def run(args: argparse.Namespace) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not torch.cuda.is_available():
        raise DemoError(f"WORLD_SIZE={world_size}: the tensor-parallel demo needs GPUs (none found); "
                        "run `python demo.py ...` for one process on CPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    dtype = pick_dtype(args.dtype, device)
    prompt = build_prompt(args)
    t0 = time.time()
    if rank == 0:
        log(f"loading {args.model_path} ({str(dtype).removeprefix('torch.')}, {device.type}, {world_size} process(es))")
    model, tokenizer = load(args.model_path, dtype)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    if world_size > 1:
        import deepspeed

        torch.cuda.set_device(device)
        deepspeed.init_distributed()
        # AutoTP: shards the linear layers over the ranks; every rank runs generate with the same seed
        model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype)
    else:
        model = model.to(device)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        log(f"loaded {n / 1e6:.2f}M parameters{' per rank' if world_size > 1 else ''} in {time.time() - t0:.1f}s")
    try:
        text = generate(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed, stream=rank == 0 and not args.no_stream)
        if rank == 0 and args.no_stream:
            print(text, flush=True)
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        run(args)
    except (DemoError, CheckpointError, ModelConfigError, OSError) as e:
        print(f"demo.py: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
