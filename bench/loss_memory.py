"""Peak memory and time of the last stage's loss: the LM head inside the chunked loss (what training runs) against
the head called first and its [N, V] logits then chunked (what any other head gets), one fresh process each.

    python bench/loss_memory.py [--positions 1024] [--hidden 256] [--vocab 32768]

Prints, per precision, the growth of the process's peak resident memory over the loss's forward and backward
and the best of 3 timings (one thread). CPU; about 30 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(positions: int, hidden: int, vocab: int, dtype: str, fused: bool) -> dict:
    """In this process (run fresh): the loss's peak RSS growth (MiB) and its best time of 3 (ms)."""
    import resource
    import time

    import torch

    from models.pipeline import causal_lm_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dt)
    x = torch.randn(1, positions, hidden, dtype=dt, requires_grad=True)
    labels = torch.randint(0, vocab, (1, positions))
    call = head if fused else (lambda h: head(h))  # a lambda is not a known linear head: logits first
    before = int(open("/proc/self/statm").read().split()[1]) * 4096
    times = []
    for _ in range(3):
        t = time.perf_counter()
        causal_lm_loss(x, labels, head=call).backward()
        times.append(time.perf_counter() - t)
        x.grad = head.weight.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth_mib": (peak - before) / 2**20, "ms": 1000 * min(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        dtype, fused = a.child.split(",")
        print(json.dumps(measure(a.positions, a.hidden, a.vocab, dtype, fused == "1")))
        return 0
    from models.pipeline import LOSS_CHUNK_ELEMENTS

    n = a.positions * a.vocab
    print(f"{a.positions} positions x vocabulary {a.vocab} (hidden {a.hidden}): {n / 2**20:.0f}M logits, "
          f"chunks of {LOSS_CHUNK_ELEMENTS / 2**20:.0f}M")
    print("| precision | logits | head then chunked loss | head inside the chunked loss | ratio |")
    print("|---|---:|---:|---:|---:|")
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        out = {}
        for fused in (False, True):
            cmd = [sys.executable, __file__, "--positions", str(a.positions), "--hidden", str(a.hidden),
                   "--vocab", str(a.vocab), "--child", f"{dtype},{int(fused)}"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            out[fused] = json.loads(res.stdout.strip().splitlines()[-1])
        old, new = out[False], out[True]
        print(f"| {dtype} | {n * size / 2**20:.0f} MiB | {old['growth_mib']:.0f} MiB, {old['ms']:.0f} ms | "
              f"{new['growth_mib']:.0f} MiB, {new['ms']:.0f} ms | {new['growth_mib'] / old['growth_mib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
