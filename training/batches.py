"""Which samples make each step's global batch, and how they become pipeline micro-batches.

The samples are a data set's samples, or its packed sequences with "packing" (data/packing.py).
Every rank derives the same seeded order, so no communication is needed: data-parallel rank r
takes a disjoint contiguous slice of each global batch, and the first and last stage of a
pipeline (same data-parallel rank) read the same micro-batches in the same order. Each
micro-batch carries the global batch's trained-token count for the global token-mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.collate import collate
from data.encode import EncodedDataset
from data.packing import PackedDataset


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    micro_batch: int
    grad_accum: int
    dp_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        """Incomplete global batches at an epoch's end are dropped (every step has the same shape)."""
        return self.num_samples // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within the epoch); max_steps may run past one epoch."""
        return divmod(step, self.steps_per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def global_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        g = self.global_batch
        return self.order(epoch)[step_in_epoch * g:(step_in_epoch + 1) * g]

    def micro_indices(self, epoch: int, step_in_epoch: int, dp_rank: int) -> list[np.ndarray]:
        """This data-parallel rank's grad_accum micro-batches for the step."""
        per_rank = self.micro_batch * self.grad_accum
        mine = self.global_indices(epoch, step_in_epoch)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]


def step_micro_batches(ds: EncodedDataset | PackedDataset, plan: BatchPlan, tokens: np.ndarray, epoch: int,
                       step_in_epoch: int, dp_rank: int, max_seq_len: int, pad_id: int) -> list:
    """[((input_ids, position_ids, segment_ids), (labels, counts))] for one step of one data-parallel rank."""
    n_global = int(tokens[plan.global_indices(epoch, step_in_epoch)].sum())
    counts = torch.tensor([max(n_global, 1), plan.grad_accum * plan.dp_size], dtype=torch.int64)
    out = []
    for idx in plan.micro_indices(epoch, step_in_epoch, dp_rank):
        inputs, labels = collate([ds[int(i)] for i in idx], max_seq_len, pad_id)
        out.append((inputs, (labels, counts)))
    return out
