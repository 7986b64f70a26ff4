"""Peak memory and time of the last stage's loss: the LM head inside the chunked loss (what training runs) against
the head called first and its [N, V] logits then chunked (what any other head gets).

    python bench/loss_memory.py [--positions 1024] [--hidden 256] [--vocab 32768] [--device cpu]

Prints, per precision, the loss's forward + backward peak memory growth and the best of 3 timings, and how far
the two paths' loss and gradients are apart. CPU: one fresh process per cell (peak resident memory), one thread,
about 30 s. A GPU: in this process (DeepSpeed's accelerator: max_memory_allocated); bench/gpu_checks.py runs it
at Llama-3-8B's shapes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(positions: int, hidden: int, vocab: int, dtype: str, fused: bool, device: str = "cpu") -> dict:
    """The loss's peak memory growth (MiB; on the CPU, of this process's resident memory: run it fresh) and its
    best time of 3 (ms), with the loss and the gradients of the last run."""
    import resource
    import time

    import torch
    from deepspeed.accelerator import get_accelerator

    from models.pipeline import causal_lm_loss

    dev = torch.device(device)
    acc = get_accelerator() if dev.type != "cpu" else None  # the one way to the device (launch/cuda_only.py)
    if acc is None:
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5)
    x = torch.randn(1, positions, hidden, generator=gen).to(dev, dt).requires_grad_()
    labels = torch.randint(0, vocab, (1, positions), generator=gen).to(dev)
    call = head if fused else (lambda h: head(h))  # a lambda is not a known linear head: logits first
    sync = acc.synchronize if acc else (lambda: None)
    sync()
    if acc:
        acc.reset_peak_memory_stats()
    before = acc.memory_allocated() if acc else int(open("/proc/self/statm").read().split()[1]) * 4096
    times = []
    for _ in range(3):
        x.grad = head.weight.grad = None
        t = time.perf_counter()
        loss = causal_lm_loss(x, labels, head=call)
        loss.backward()
        sync()
        times.append(time.perf_counter() - t)
    peak = acc.max_memory_allocated() if acc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth_mib": (peak - before) / 2**20, "ms": 1000 * min(times), "loss": loss.item(),
            "dx": x.grad.float().cpu(), "dw": head.weight.grad.float().cpu()}


def compare(positions: int, hidden: int, vocab: int, dtype: str, device: str = "cpu") -> dict:
    """Both paths in one process (a GPU; on the CPU the memory figures need `measure` in fresh processes): each
    path's figures, and the head-inside path's loss and gradients relative to the other's."""
    old, new = (measure(positions, hidden, vocab, dtype, fused, device) for fused in (False, True))
    return {"old": old, "new": new, **_differences(old, new)}


def _differences(old: dict, new: dict) -> dict:
    """The head-inside path's loss and gradients relative to the other path's (norm of the difference / norm)."""
    out = {"loss_rel": abs(new["loss"] - old["loss"]) / abs(old["loss"])}
    for k in ("dx", "dw"):
        out[f"{k}_rel"] = ((new[k] - old[k]).norm() / old[k].norm()).item()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = (a.positions, a.hidden, a.vocab)
    if a.child:  # one CPU cell: figures and the gradients' file
        dtype, fused, out = a.child.split(",")
        res = measure(*shape, dtype, fused == "1")
        import torch

        torch.save({"dx": res.pop("dx"), "dw": res.pop("dw")}, out)
        print(json.dumps(res))
        return 0
    import tempfile

    import torch

    from models.pipeline import LOSS_CHUNK_ELEMENTS

    n = a.positions * a.vocab
    print(f"{a.positions} positions x vocabulary {a.vocab} (hidden {a.hidden}) on {a.device}: {n / 2**20:.0f}M "
          f"logits, chunks of {LOSS_CHUNK_ELEMENTS / 2**20:.0f}M")
    print("| precision | logits | head then chunked loss | head inside the chunked loss | memory | time | grads rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        if torch.device(a.device).type != "cpu":
            res = compare(*shape, dtype, a.device)
        else:
            res = {}
            with tempfile.TemporaryDirectory() as tmp:
                for key, fused in (("old", 0), ("new", 1)):
                    cmd = [sys.executable, __file__, "--positions", str(a.positions), "--hidden", str(a.hidden),
                           "--vocab", str(a.vocab), "--child", f"{dtype},{fused},{tmp}/g.pt"]
                    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
                    res[key] = {**json.loads(run.stdout.strip().splitlines()[-1]), **torch.load(f"{tmp}/g.pt")}
            res.update(_differences(res["old"], res["new"]))
        old, new = res["old"], res["new"]
        print(f"| {dtype} | {n * size / 2**20:.0f} MiB | {old['growth_mib']:.0f} MiB, {old['ms']:.0f} ms | "
              f"{new['growth_mib']:.0f} MiB, {new['ms']:.0f} ms | {new['growth_mib'] / old['growth_mib']:.2f}x | "
              f"{new['ms'] / old['ms']:.2f}x | dx {res['dx_rel']:.1e}, dW {res['dw_rel']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
