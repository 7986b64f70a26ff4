"""Which samples make each step's global batch, and how they become pipeline micro-batches.

The samples are a data set's samples, or its packed sequences with "packing" (data/packing.py).
Every rank derives the same seeded order, once per epoch, so no communication is needed. A step's rows are
sorted longest first and cut into runs, one micro-batch each (cut_micro_batches): a micro-batch's rows are
padded to its longest row (rounded up to pad_to_multiple_of, data.collate.padded_length), and it holds at most
the tokens of micro_batch rows of the step's longest, so that shorter rows make micro-batches of more rows, of
like size. The micro-batches are dealt to the data-parallel ranks in turn (micro_indices); the first and last
stage of a pipeline (same data-parallel rank) read the same micro-batches in the same order. Each micro-batch
carries the global batch's trained-token count for the global token-mean loss, so this grouping changes no
gradient (but see cut_micro_batches on `dynamic` rope). The micro-batches of a step may differ in shape (the
trainer then runs the pipeline engine with DeepSpeed's `dynamic_shape`). With `group_by_length` the order is
HF Trainer's LengthGroupedSampler's: megabatches of MEGABATCH_MULT global batches sorted longest first, so the
rows of a step have similar lengths. An epoch's last, incomplete global batch is dropped (`drop_last`, DeepSpeed's
`dataloader_drop_last`, true by default here; with group_by_length the same samples as without) or trained (with
group_by_length it holds the shortest samples of the last megabatch, as LengthGroupedSampler's order has them): the loss is the token mean over the samples present, as on a smaller batch, and a micro-batch with no
sample left gets an empty row (index -1: one pad token, no label).
"""

from __future__ import annotations

import heapq
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from data.collate import collate_rows, padded_length, padded_lengths
from data.dataset import EncodedDataset
from data.packing import PackedDataset, trained_tokens

DROP_LAST = True  # DeepSpeed's dataloader_drop_last when the config leaves it out (DeepSpeed's own: false)

MEGABATCH_MULT = 50  # transformers' LengthGroupedSampler: megabatches of 50 batches


class RowsView:
    """What a middle pipeline stage needs of a data set it does not read (it neither feeds inputs nor reads
    labels): the rows' boundaries, trained tokens and segment counts, for the batch plan, padding and metrics."""

    def __init__(self, offsets: np.ndarray, trained: np.ndarray, segments: np.ndarray | None = None):
        self.offsets, self.trained = offsets, trained
        self.segments = segments if segments is not None else np.ones(len(offsets) - 1, np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def segments_per_row(self) -> np.ndarray:
        return self.segments

    @classmethod
    def of(cls, ds) -> RowsView:
        return cls(ds.offsets, row_trained(ds), ds.segments_per_row() if isinstance(ds, PackedDataset) else None)


def row_trained(ds) -> np.ndarray:
    """Trained tokens per row (after the next-token shift) of a data set or a RowsView."""
    return ds.trained if isinstance(ds, RowsView) else trained_tokens(ds)


@dataclass(eq=False)
class BatchPlan:
    num_samples: int
    micro_batch: int
    grad_accum: int
    dp_size: int
    seed: int
    lengths: np.ndarray | None = None  # tokens per sample: needed for group_by_length and padded lengths
    group_by_length: bool = False
    drop_last: bool = True  # False: an epoch's last, incomplete global batch is trained (cut_micro_batches)
    pad_multiple: int = 1  # pad_to_multiple_of: a micro-batch's rows are padded to its longest row, rounded up
    max_seq_len: int | None = None  # ... and never beyond this
    # epoch -> its order: this epoch's and the next (the prefetch thread asks for the next step's while the
    # trainer's metrics ask for this one's), under a lock
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # (epoch, step) -> its micro-batches: the prefetch thread cuts the next step's, the metrics read this one's
    _cuts: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        """An incomplete global batch at an epoch's end is a step only without drop_last."""
        return self.num_samples // self.global_batch if self.drop_last else -(-self.num_samples // self.global_batch)

    def position(self, step: int) -> tuple[int, int]:
        """Global step (0-based) -> (epoch, step within the epoch); max_steps may run past one epoch."""
        return divmod(step, self.steps_per_epoch)

    def batch_change_note(self, step: int, old_global_batch: int) -> str:
        """Where a resume at `step` (0-based) continues in the data after the global batch changed from
        `old_global_batch`: the position is the step's, so samples of the epoch are skipped or repeated."""
        g, old = self.global_batch, old_global_batch
        old_steps = self.num_samples // old if self.drop_last else -(-self.num_samples // old)
        (was_epoch, was), (epoch, now) = divmod(step, max(old_steps, 1)), self.position(step)
        was, now = was * old, now * g
        note = (f"step {step + 1} starts at sample {now} of epoch {epoch}'s order; the checkpoint's batches had reached "
                f"sample {was} of epoch {was_epoch}'s")
        if self.group_by_length:
            return note + " (with group_by_length the order itself depends on the global batch)"
        if was_epoch == epoch and was != now:
            return note + f": {abs(now - was)} samples {'skipped' if now > was else 'repeated'} in this epoch"
        return note

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order, computed once per epoch."""
        with self._lock:
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) <= 1}
                self._orders[epoch] = self._compute_order(epoch)
            return self._orders[epoch]

    def _compute_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        if not self.group_by_length:
            return perm
        if self.lengths is None:
            raise ValueError("group_by_length needs the samples' lengths")
        # drop_last drops a random share, as without grouping: the samples past the epoch's last full global batch
        # in the permutation, not the last megabatch's shortest (the same ones every epoch)
        kept, dropped = np.split(perm, [self.steps_per_epoch * self.global_batch]) if self.drop_last else (perm, perm[:0])
        mega = MEGABATCH_MULT * self.global_batch
        chunks = [kept[i:i + mega] for i in range(0, len(kept), mega)]
        chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]  # longest first
        order = np.concatenate([*chunks, dropped])
        starts = np.arange(0, len(kept), mega)
        if len(starts):
            longest = starts[int(np.argmax(self.lengths[order[starts]]))]  # as HF: the longest sample goes first,
            order[[0, longest]] = order[[longest, 0]]  # so that running out of memory shows at the first step
        return order

    def global_indices(self, epoch: int, step_in_epoch: int, real: bool = False) -> np.ndarray:
        """The step's samples; -1 fills an epoch's last, incomplete batch (drop_last false) unless `real`."""
        g = self.global_batch
        idx = self.order(epoch)[step_in_epoch * g:(step_in_epoch + 1) * g]
        return idx if real or len(idx) == g else np.concatenate([idx, np.full(g - len(idx), -1, idx.dtype)])

    def micro_indices(self, epoch: int, step_in_epoch: int, dp_rank: int) -> list[np.ndarray]:
        """This data-parallel rank's grad_accum micro-batches for the step (cut_micro_batches), dealt to the ranks
        in turn, largest first; a rank runs its smallest first and its second smallest last (a pipeline fills and
        drains on its first and last micro-batch, while its other stages wait)."""
        return run_order(self._step_micro(epoch, step_in_epoch)[dp_rank::self.dp_size])

    def _step_micro(self, epoch: int, step_in_epoch: int) -> list[np.ndarray]:
        """The micro-batches of every rank, largest first, cut once per step. With group_by_length, the first
        step's first micro-batch is micro_batch rows of the epoch's longest (HF's longest sample first: running out
        of memory shows at the first step)."""
        key = (epoch, step_in_epoch)
        with self._lock:
            if key in self._cuts:
                return self._cuts[key]
        idx = self.global_indices(epoch, step_in_epoch)
        if self.lengths is None:
            cut = list(idx.reshape(-1, self.micro_batch))
        else:
            cut = cut_micro_batches(idx, self.lengths, self.grad_accum * self.dp_size, self.micro_batch,
                                    self.pad_multiple, self.max_seq_len,
                                    first_full=self.group_by_length and step_in_epoch == 0)
        with self._lock:
            self._cuts[key] = cut
            while len(self._cuts) > 4:  # the steps around the current one
                del self._cuts[min(self._cuts)]
        return cut

    def micro_shapes(self, epoch: int, step_in_epoch: int, dp_rank: int) -> list[tuple[int, int]]:
        """(rows, padded row length) of each of this rank's micro-batches of the step."""
        return [micro_shape(idx, self.lengths, self.pad_multiple, self.max_seq_len)
                for idx in self.micro_indices(epoch, step_in_epoch, dp_rank)]

    def step_shapes(self, epoch: int, step_in_epoch: int) -> list[tuple[int, int]]:
        """(rows, padded row length) of the step's micro-batches, on every data-parallel rank (the metrics' seq_len:
        the longest; computed_tokens: rows x length, summed)."""
        return [micro_shape(idx, self.lengths, self.pad_multiple, self.max_seq_len)
                for idx in self._step_micro(epoch, step_in_epoch)]

    def computed_tokens(self, epoch: int, step_in_epoch: int) -> int:
        """The tokens the step computes on every data-parallel rank, pads included: each micro-batch's rows x its
        padded length (micro_shapes)."""
        return sum(math.prod(shape) for shape in self.step_shapes(epoch, step_in_epoch))


def micro_shape(rows: np.ndarray, lengths: np.ndarray, multiple: int, max_seq_len: int | None) -> tuple[int, int]:
    """(rows, padded length) of a micro-batch: its longest row rounded up (data.collate.padded_length)."""
    return len(rows), padded_length(lengths[rows[rows >= 0]], multiple, max_seq_len)


def cut_micro_batches(rows: np.ndarray, lengths: np.ndarray, count: int, micro_batch: int, multiple: int,
                      max_seq_len: int | None, first_full: bool = False) -> list[np.ndarray]:
    """`rows` (sample indices, -1: none; at most count x micro_batch) cut into `count` micro-batches, largest
    (rows x padded length) first. The rows are sorted longest first, and each micro-batch is a run of them: a run
    of like rows is little padding. Each holds at most the tokens of micro_batch rows of the longest (no more
    memory than micro-batches of micro_batch rows each), and the largest is as small as that allows: a pipeline
    runs at the pace of its largest micro-batches, so shorter rows make micro-batches of more rows. Fewer samples
    than micro-batches (an epoch's last batch): one each, and the rest an empty row. The loss is the global
    batch's token mean, so the cut changes no gradient, only the order of float sums (except for rope scaling that
    follows a batch's longest position, `dynamic` / `longrope`, past its switch length: as in transformers, a row
    is then encoded by its micro-batch's longest row). `first_full`: the first micro-batch is micro_batch rows of
    the longest, the largest any step can have."""
    real = rows[rows >= 0]
    real = real[np.argsort(-lengths[real], kind="stable")]
    if len(real) <= count:
        return [real[i:i + 1] for i in range(len(real))] + [np.full(1, -1, rows.dtype)] * (count - len(real))
    if first_full and count > 1:
        return [real[:micro_batch], *cut_micro_batches(real[micro_batch:], lengths, count - 1, micro_batch, multiple,
                                                       max_seq_len)]
    pads = padded_lengths(lengths[real], multiple, max_seq_len).tolist()

    def starts(cap: int) -> list[int] | None:  # greedy runs of at most `cap` tokens (the fewest there can be)
        out, i = [], 0
        while i < len(pads):
            if len(out) == count:
                return None
            out.append(i)
            i += max(1, cap // pads[i])
        return out

    lo, hi = pads[0], micro_batch * pads[0]  # hi: micro_batch rows each fit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if starts(mid) is not None else (mid + 1, hi)
    cuts = starts(lo)
    bounds = list(zip(cuts, [*cuts[1:], len(real)], strict=True))
    whole = [b for b in bounds if b[1] - b[0] == 1]  # single rows: not halved
    heap = [(-(b - a) * pads[a], a, b) for a, b in bounds if b - a > 1]
    heapq.heapify(heap)
    while len(whole) + len(heap) < count:  # fewer, fuller runs than micro-batches: halve the largest of several rows
        _, a, b = heapq.heappop(heap)
        for a2, b2 in ((a, a + (b - a) // 2), (a + (b - a) // 2, b)):
            heapq.heappush(heap, (-(b2 - a2) * pads[a2], a2, b2)) if b2 - a2 > 1 else whole.append((a2, b2))
    bounds = whole + [(a, b) for _, a, b in heap]  # largest first; of like size, in the rows' order
    return [real[a:b] for a, b in sorted(bounds, key=lambda ab: (-(ab[1] - ab[0]) * pads[ab[0]], ab[0]))]


def run_order(micro: list[np.ndarray]) -> list[np.ndarray]:
    """Micro-batches largest first -> the order a pipeline runs them: the smallest first, the second smallest
    last, the others largest first."""
    return [micro[-1], *micro[:-2], micro[-2]] if len(micro) > 2 else micro[::-1]


def step_micro_batches(ds: EncodedDataset | PackedDataset, plan: BatchPlan, tokens: np.ndarray, epoch: int,
                       step_in_epoch: int, dp_rank: int, shapes: list[tuple[int, int]], pad_id: int) -> list:
    """[((input_ids, position_ids, segment_ids), (labels, counts))] for one step of one data-parallel rank,
    each micro-batch's rows padded to its length in `shapes` (plan.micro_shapes)."""
    n_global = int(tokens[plan.global_indices(epoch, step_in_epoch, real=True)].sum())
    counts = torch.tensor([max(n_global, 1), plan.grad_accum * plan.dp_size], dtype=torch.int64)
    micro = plan.micro_indices(epoch, step_in_epoch, dp_rank)
    return [(inputs, (labels, counts)) for inputs, labels in
            (collate_rows(ds, idx, n, pad_id) for idx, (_, n) in zip(micro, shapes, strict=True))]
