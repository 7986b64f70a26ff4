"""Peak memory per pipeline stage and step time: LoRA on a bf16 base against QLoRA on an NF4 base.

    python bench/qlora_memory.py [--workdir DIR] [--steps 4] [--layers 16 --hidden 1024 --intermediate 2816]

A random Llama (default 16 layers, hidden 1024, vocab 32000: 0.27B parameters, 0.54 GB in bf16) written as a bf16
pipeline dir, a tokenizer built locally, data/samples/pretrain.jsonl at 128 tokens. Both runs: train_ds.py under the
deepspeed launcher with 2 processes (2 pipeline stages, `parts` auto), bf16, micro-batch 1 x 4 accumulation, LoRA r 16
on every linear layer of every block; the QLoRA run adds "quantization" (NF4, double quantisation, bf16 compute).
Printed per stage: the frozen base as the start-up summary reports it (4-bit and unquantised; the LoRA run's summary
has no such line, so its rows show the QLoRA run's unquantised figure of the stage), and the peak memory the trainer
records (the accelerator's max allocated; on CPU the process's peak RSS, which includes the ~0.5 GB of the
interpreter and its libraries). Step time: the median of the steps after the first. On CPU set DS_ACCELERATOR=cpu
(the default here when no GPU is visible); with GPUs, `--procs` GPUs are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> Path:
    """A bf16 pipeline dir of a random Llama (convert_model.py init, one layer in memory at a time)."""
    from data.tiny_tokenizer import train_tiny_tokenizer

    texts = [json.loads(line)["text"] for line in (ROOT / "data/samples/pretrain.jsonl").read_text().splitlines()]
    train_tiny_tokenizer(texts, work / "tokenizer", vocab_size=1024)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "vocab_size": vocab,
           "tie_word_embeddings": False, "max_position_embeddings": 2048}
    (work / "model.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "convert_model.py", "init", "--family", "llama", "--config-json",
                          str(work / "model.json"), "--tokenizer", str(work / "tokenizer"), "--save-path", str(work / "pp"),
                          "--dtype", "bf16", "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"convert_model.py init failed: {out.stderr.strip()[-2000:]}")
    return work / "pp"


def run(work: Path, name: str, model: Path, steps: int, procs: int, quant: bool, env: dict) -> dict:
    cfg = {"model_path": str(model), "save_path": str(work / name), "data_path": str(ROOT / "data/samples/pretrain.jsonl"),
           "data_cache_dir": str(work / "cache"), "max_seq_len": 128, "max_steps": steps, "seed": 1,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [procs, 1]}},
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}
    if quant:
        cfg["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                               "bnb_4bit_compute_dtype": "bfloat16"}
    (work / f"{name}.json").write_text(json.dumps(cfg))
    shutil.rmtree(work / name, ignore_errors=True)  # a finished run of an earlier --workdir would do nothing
    from tests.helpers import free_port, run_group

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    why = run_group([launcher, "--num_gpus", str(procs), "--master_port", str(free_port()), "train_ds.py",
                     "--config", str(work / f"{name}.json")], work / f"{name}.log", cwd=ROOT, env=env)
    stdout = (work / f"{name}.log").read_text()
    if why:
        sys.exit(f"{name} failed ({why}):\n{stdout[-4000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / name / "runs"))
    events.Reload()
    peaks = [max(e.value for e in events.Scalars(f"memory/peak_gib_stage{s}")) for s in range(procs)]
    times = [json.loads(line)["time"] for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 else times[0]
    base = re.findall(r"stage (\d): \d+ 4-bit layers; frozen base ([\d.]+ \w+) \(unquantised: ([\d.]+ \w+)\)", stdout)
    rows = [line for line in stdout.splitlines() if re.match(r"\s+\d+ \| ", line)]
    return {"peaks_gib": peaks, "step_s": step_s, "base": base, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from launch.cuda_only import cuda_available
    from tests.helpers import own_extensions_dir

    own_extensions_dir()  # DeepSpeed's CPU op, built for this environment
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not cuda_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    model = prepare(work, args.layers, args.hidden, args.intermediate, args.vocab)
    size = sum(f.stat().st_size for f in model.glob("layer_*.pt"))
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {size / 1e9:.2f} GB of bf16 layer files; "
          f"{args.procs} stages, {args.steps} steps, {'GPU' if cuda_available() else 'CPU'}")
    results = {name: run(work, name, model, args.steps, args.procs, name == "qlora", env) for name in ("lora", "qlora")}
    print("| run | stage | frozen base (unquantised) | peak memory | step time |")
    print("|---|---:|---:|---:|---:|")
    unquantised = {int(b[0]): b[2] for b in results["qlora"]["base"]}  # the LoRA run logs no frozen-base figure
    for name, r in results.items():
        for s, peak in enumerate(r["peaks_gib"]):
            base = next((f"{b[1]} ({b[2]})" for b in r["base"] if int(b[0]) == s),
                        f"bf16, as loaded (QLoRA run's unquantised: {unquantised.get(s, '?')})")
            print(f"| {'LoRA, bf16 base' if name == 'lora' else 'QLoRA, NF4 base'} | {s} | {base} | {peak:.2f} GiB | "
                  f"{r['step_s']:.2f} s |")
    for name, r in results.items():
        print(f"{name} summary rows:", *r["rows"], sep="\n  ")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
