"""Peak resident memory of `convert_model.py hg_to_pp` versus the model size.

    python bench/convert_memory.py [--workdir DIR] [--layers 12] [--hidden 768]

Writes a random Llama checkpoint (default ~0.54 GB fp32, sharded safetensors) tensor group by
tensor group, converts it in a fresh interpreter and prints the interpreter's baseline peak RSS
(current RSS after imports), the peak RSS during conversion, and their difference against the model size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
import convert_model
base = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])  # current, not peak
rc = convert_model.main(["hg_to_pp", "--input-path", sys.argv[1], "--save-path", sys.argv[2]])
# VmHWM, not ru_maxrss: after the parent's vfork + exec, ru_maxrss starts at the parent's (pytest's) peak
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
print(json.dumps({"rc": rc, "baseline_kb": base, "peak_kb": peak}))
"""


def write_random_llama(directory: Path, hidden: int = 768, layers: int = 12, intermediate: int = 2048,
                       vocab: int = 32000) -> int:
    """A random HF Llama dir written without building the model; returns the weight bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 64, "vocab_size": vocab, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weight_map, total, g = {}, 0, torch.Generator().manual_seed(0)
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in group.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def measure(hf_dir: Path, out_dir: Path) -> dict:
    """Convert in a fresh interpreter; returns {rc, baseline_kb, peak_kb}."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(hf_dir), str(out_dir)], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"]:  # no figures of a conversion that failed
        raise RuntimeError(f"hg_to_pp failed (exit {result['rc']}): {proc.stderr.strip()[-1000:]}")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        size = write_random_llama(Path(tmp) / "hf", hidden=args.hidden, layers=args.layers)
        r = measure(Path(tmp) / "hf", Path(tmp) / "pp")
    grew = (r["peak_kb"] - r["baseline_kb"]) * 1024
    print(f"model weights       {size / 2**20:8.1f} MiB")
    print(f"baseline RSS        {r['baseline_kb'] / 1024:8.1f} MiB (interpreter + imports, before converting)")
    print(f"conversion peak RSS {r['peak_kb'] / 1024:8.1f} MiB")
    print(f"growth              {grew / 2**20:8.1f} MiB = {grew / size:.1%} of the model (target < 50%)")


if __name__ == "__main__":
    main()
