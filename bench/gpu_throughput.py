"""The one-GPU mode of bench/train_throughput.py (`python bench/train_throughput.py --gpu`; its options there).

GPU mode (--gpu): PP=1, bf16, a ~1B Llama at 2048 tokens per row on one GPU, the project's blocks with the
fast path (causal SDPA, no mask) and with the dense-mask path: tokens/s and MFU against --peak-tflops (default:
the device's dense bf16 peak by its name, 989 for an H100 SXM / H200) in two conventions: PaLM's / Megatron's, 6N + 12 L h T FLOPs per token (attention's
scores and weighted sum over all T x T pairs, the masked half of causal attention included), and causal,
6N + 6 L h T (the half a causal kernel computes); plus the fast path's bf16 logits against the dense path's.
It times the model's blocks under torch's AdamW in bf16, not train_ds.py's DeepSpeed engine (fp32 master weights and
gradient accumulation), with the head before the loss (training runs it inside the chunked loss).
"""

from __future__ import annotations

import argparse
import time

FAST, MFU_TARGET = "fast (causal SDPA, no mask)", 0.45  # --gpu: issue 12's target for the fast path
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H800 PCIe", 756.0), ("H200 NVL", 835.0), ("H100", 989.0),
         ("H800", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))  # dense bf16 TFLOP/s; words of the name


def peak_of(device_name: str, given: float | None) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, where it comes from) for MFU: `given` (--peak-tflops), else by the device's name."""
    if given is not None:
        return given, "--peak-tflops"
    words = device_name.upper().replace("-", " ").split()
    for name, peak in PEAKS:
        if all(w in words for w in name.upper().split()):
            return peak, f"{name}'s datasheet"
    return 989.0, f"{device_name!r} unknown: H100 SXM's assumed, give --peak-tflops"


def gpu_bench(args: argparse.Namespace) -> dict:
    """One device, PP=1, bf16: the project's spec list run as one module, fast path vs dense-mask path."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import LlamaConfig

    from launch.cuda_only import device_label
    from models import SequentialModel, causal_lm_loss, get_family
    from models import attention as attn
    from models.attention import set_attn_implementation

    device = torch.device(args.device)
    acc = get_accelerator()  # its synchronize() waits for the device (cuda, hpu, ...)
    dtype = torch.bfloat16
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq)
    set_attn_implementation(config, "auto")
    family = get_family("llama")
    torch.manual_seed(0)
    model = SequentialModel(family.layer_specs(config)).to(device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = n_params - config.vocab_size * config.hidden_size  # the embedding is a lookup
    # attention's QK^T and AV, forward and backward: 12 L h T FLOPs per token over every (query, key) pair (PaLM's and
    # Megatron's MFU convention); a causal kernel computes about half of them, 6 L h T
    attention_full = 12 * config.num_hidden_layers * config.hidden_size * args.seq
    flops_per_token = 6 * n_matmul + attention_full
    flops_causal = 6 * n_matmul + attention_full // 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    b, t = args.micro, args.seq
    ids = torch.randint(4, config.vocab_size, (b, t), device=device)
    pos = torch.arange(t, device=device).expand(b, t)
    seg = torch.ones(b, t, dtype=torch.long, device=device)
    peak, source = peak_of(device_label(device), args.peak_tflops)
    print(f"{device_label(device)}: Llama {n_params / 1e9:.2f}B "
          f"({config.num_hidden_layers} layers, hidden {config.hidden_size}), bf16, {b} x {t} tokens per step")
    original = attn.choose_path
    print(f"  MFU against {peak:g} TFLOP/s ({source}); the model's blocks under torch AdamW in bf16, not train_ds.py's "
          "DeepSpeed engine (fp32 master weights and gradient accumulation), the head before the loss (training runs "
          "it inside the chunked loss)")
    paths = ((FAST, None), ("dense mask (SDPA + [B,1,T,T])", "sdpa_mask"))
    logits = {}
    with torch.no_grad():  # the same weights through both paths
        for name, forced in paths:
            attn.choose_path = original if forced is None else (lambda *a, f=forced: f)
            attn.CONTEXTS.clear()
            logits[name] = model((ids[:1], pos[:1], seg[:1])).float()
    fast, dense = logits.values()
    result = {"logits_diff": (fast - dense).abs().max().item(), "logits_max": dense.abs().max().item(), "paths": {}}
    print(f"  bf16 logits, fast vs dense path: max abs diff {result['logits_diff']:.3e} "
          f"(logits up to {result['logits_max']:.1f})")

    def step() -> None:  # one training step, finished on the device
        # new position / segment tensors, as each micro-batch of training has: RoPE and the row kind built per step
        loss = causal_lm_loss(model((ids, pos.clone(), seg.clone())), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc.synchronize()

    for name, forced in paths:
        attn.choose_path = original if forced is None else (lambda *a, f=forced: f)
        attn.CONTEXTS.clear()
        times = []
        for k in range(args.steps + 2):
            acc.synchronize()
            t0 = time.perf_counter()
            step()
            if k >= 2:
                times.append(time.perf_counter() - t0)
        tps = b * t * len(times) / sum(times)
        mfu = tps * flops_per_token / (peak * 1e12)
        mfu_causal = tps * flops_causal / (peak * 1e12)
        print(f"  {name}: {tps:,.0f} tokens/s, MFU {mfu:.1%} (PaLM convention: full attention), "
              f"MFU {mfu_causal:.1%} (causal: attention FLOPs halved)")
        result["paths"][name] = (tps, mfu, mfu_causal)
        if getattr(args, "profile", 0) and forced is None:  # where the fast path's step time goes, by kernel
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                step()
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=70))
    attn.choose_path = original
    return result
