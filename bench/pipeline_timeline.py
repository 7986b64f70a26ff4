"""A timeline model of one 1F1B step (DeepSpeed's TrainSchedule order) with deferred weight gradients: how long
a step takes when stage s defers the weight gradients of its last k_s micro-batches (models/wgrad.py), for
several deferral rules. A model, not a measurement: fixed per-stage forward, backward and weight-gradient times,
no communication time. It prints the step in ms and its share of the ideal (all work spread evenly, no bubble).

    python bench/pipeline_timeline.py              # the CPU bench's measured stage times, then generic cases

The CPU bench's times (a per-instruction timeline of `bench/train_throughput.py`'s full-row run): stage 0
(embedding + 4 blocks) forward 52 ms, backward 100; stage 1 (4 blocks + head in the loss) forward 65, backward
107; a micro-batch's weight gradients on stage 1 about 45 (what its deferred flush took).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.wgrad import deferred_micro_batches  # noqa: E402

RULES = {"off": lambda s, m: 0, "s (ZB-H1)": lambda s, m: min(m, s), "s + 1 (wgrad.py)": deferred_micro_batches,
         "2s": lambda s, m: min(m, 2 * s)}


def order(p: int, m: int, s: int) -> list[tuple[str, int]]:
    """Stage s's instructions under 1F1B: p - s - 1 warm-up forwards, then forward / backward pairs, then the
    remaining backwards."""
    w = min(p - s - 1, m)
    seq = [("F", i) for i in range(1, w + 1)]
    for j in range(1, m - w + 1):
        seq += [("F", w + j), ("B", j)]
    return seq + [("B", j) for j in range(m - w + 1, m + 1)]


def step_ms(fwd: list[float], bwd: list[float], wgrad: list[float], m: int, deferred: list[int]) -> float:
    """The step's length: every stage runs its instructions in order, each as soon as its input is there (a
    forward after the previous stage's, a backward after the next stage's); a deferred backward takes its weight
    gradients off (`wgrad`), and they run after the stage's last backward."""
    p = len(fwd)
    ops = [order(p, m, s) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    clock, nxt = [0.0] * p, [0] * p
    while any(nxt[s] < len(ops[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if nxt[s] == len(ops[s]):
                continue
            kind, i = ops[s][nxt[s]]
            dep = (("F", s - 1, i) if s else None) if kind == "F" else (("B", s + 1, i) if s < p - 1 else ("F", s, i))
            if dep is not None and dep not in done:
                continue
            took = fwd[s] if kind == "F" else bwd[s] - (wgrad[s] if i > m - deferred[s] else 0.0)
            clock[s] = max(clock[s], done.get(dep, 0.0)) + took
            done[(kind, s, i)] = clock[s]
            nxt[s] += 1
            moved = True
        assert moved, "the schedule deadlocked"
    return max(clock[s] + deferred[s] * wgrad[s] for s in range(p))


def table(name: str, fwd: list[float], bwd: list[float], wgrad: list[float], m: int) -> None:
    p = len(fwd)
    ideal = m * sum(f + b for f, b in zip(fwd, bwd, strict=True)) / p
    cells = []
    for rule in RULES.values():
        t = step_ms(fwd, bwd, wgrad, m, [rule(s, m) for s in range(p)])
        cells.append(f"{t:,.0f} ({ideal / t:.3f})")
    print(f"| {name} | {p} | {m} | " + " | ".join(cells) + " |")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| stage times | p | m | " + " | ".join(RULES) + " |")
    print("|---|---:|---:|" + "---:|" * len(RULES))
    table("CPU bench (52/100, 65/107, W 45)", [52, 65], [100, 107], [0, 45], 8)
    for p, m in ((2, 8), (4, 8), (4, 16), (8, 16)):
        table("balanced (50/100, W 45)", [50.0] * p, [100.0] * p, [45.0] * p, m)
        table("last stage + head (+8/+17)", [50.0] * (p - 1) + [58.0], [100.0] * (p - 1) + [117.0], [45.0] * p, m)


if __name__ == "__main__":
    main()
