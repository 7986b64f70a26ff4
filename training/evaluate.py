"""The evaluation set and its batches: a token-mean loss over the whole set, all data-parallel ranks.

Each `engine.eval_batch` call evaluates `micro x num_micro x dp` samples; a micro-batch's loss is its
summed token loss x (num_micro x dp) / (trained tokens of the whole eval set), so DeepSpeed's average
over micro-batches and data-parallel ranks makes each call's result that call's share of the token
mean, and the calls' results add up to the eval set's token-mean loss. A last call of fewer samples than
micro-batches gives its other micro-batches an empty row (no trained token), which adds nothing. The rows go longest first (EvalPlan), each call's are cut
into micro-batches as training's are (training.batches.cut_micro_batches), and each micro-batch is padded to its
longest row (rounded up to pad_to_multiple_of).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data.collate import collate_rows
from data.dataset import EncodedDataset
from data.packing import pack
from training.batches import cut_micro_batches, micro_shape, row_trained, run_order


def perplexity(loss: float) -> float:
    """exp(loss); inf where it would overflow, NaN for a NaN loss."""
    return float("inf") if loss >= 700 else math.exp(loss)


def subset(ds: EncodedDataset, keep: np.ndarray) -> EncodedDataset:
    """The samples `keep` (indices, in this order) of `ds` as a new EncodedDataset (same stats object)."""
    keep = np.asarray(keep, dtype=np.int64)
    starts = ds.offsets[keep]
    lengths = ds.offsets[keep + 1] - starts
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])  # each kept token's source position
    return EncodedDataset(ds.input_ids[flat], ds.labels[flat], offsets, ds.record_index[keep], ds.stats)


def split_eval(ds: EncodedDataset, ratio: float, seed: int) -> tuple[EncodedDataset, EncodedDataset]:
    """(train, eval): a seeded `ratio` share of the samples (at least one) held out, the rest kept in order."""
    n_eval = max(1, round(len(ds) * ratio))
    if n_eval >= len(ds):
        raise ValueError(f"eval_split_ratio {ratio} leaves no training sample ({len(ds)} samples)")
    held = np.sort(np.random.default_rng([seed, 1_000_003]).permutation(len(ds))[:n_eval])
    train = np.setdiff1d(np.arange(len(ds)), held)
    return subset(ds, train), subset(ds, held)


def concat(a: EncodedDataset, b: EncodedDataset) -> EncodedDataset:
    offsets = np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]])
    return EncodedDataset(np.concatenate([a.input_ids, b.input_ids]), np.concatenate([a.labels, b.labels]), offsets,
                          np.concatenate([a.record_index, b.record_index]), a.stats)


def training_and_eval_rows(ds: EncodedDataset, eval_set: EncodedDataset | None, split_ratio: float | None,
                           packing: bool, max_seq_len: int, seed: int, count_copies: bool = True):
    """(training rows, eval rows or None, eval samples or None, how many eval samples are training samples too, 0
    unless `count_copies`):
    `split_ratio` of the samples held out for evaluation (before packing; added to `eval_set`), then with `packing`
    both packed the same way, so that pretrain text longer than max_seq_len ("split_long_pretrain") is cut into rows
    for evaluation as for training. ValueError: bad ratio."""
    if split_ratio is not None:
        ds, held = split_eval(ds, split_ratio, seed)
        eval_set = held if eval_set is None else concat(eval_set, held)
    samples = eval_set
    copies = trained_copies(ds, samples) if count_copies and samples is not None else 0
    if packing:
        ds = pack(ds, max_seq_len, seed)
        eval_set = None if eval_set is None else pack(eval_set, max_seq_len, seed)
    return ds, eval_set, samples, copies


def trained_copies(train: EncodedDataset, samples: EncodedDataset) -> int:
    """How many of `samples` are also samples of `train`: the same tokens and labels (a record given twice, as
    copies to weight a file, or in both data_path and eval_data_path)."""
    def key(ds: EncodedDataset, i: int) -> tuple[bytes, bytes]:
        a, b = ds.offsets[i], ds.offsets[i + 1]
        return ds.input_ids[a:b].tobytes(), ds.labels[a:b].tobytes()

    held: dict[tuple[bytes, bytes], int] = {}  # an eval sample -> its copies among the eval samples
    for i in range(len(samples)):
        held[k] = held.get(k := key(samples, i), 0) + 1
    lengths = samples.offsets[1:] - samples.offsets[:-1]
    found = set()  # (the training samples are looked up one at a time: only the eval set's are held)
    for i in np.flatnonzero(np.isin(train.offsets[1:] - train.offsets[:-1], lengths)):
        if (k := key(train, int(i))) in held:
            found.add(k)
    return sum(held[k] for k in found)


class EvalPlan:
    """How the eval set is cut into eval_batch calls and micro-batches: its rows longest first (the eval loss is a
    token mean over the whole set, so the order changes only the order of float sums), each call's cut into
    micro-batches and dealt to the data-parallel ranks as training's are (training.batches), so that rows of like
    length share a micro-batch, little is padding, and the ranks get like work."""

    def __init__(self, ds: EncodedDataset, micro_batch: int, num_micro: int, dp_size: int, pad_multiple: int = 1,
                 max_seq_len: int | None = None):
        self.ds, self.micro_batch, self.num_micro, self.dp_size = ds, micro_batch, num_micro, dp_size
        self.pad_multiple, self.max_seq_len = pad_multiple, max_seq_len
        self.per_call = micro_batch * num_micro * dp_size
        self.calls = math.ceil(len(ds) / self.per_call)
        self.tokens = int(row_trained(ds).sum())
        self.lengths = ds.offsets[1:] - ds.offsets[:-1]
        self.order = np.argsort(-self.lengths, kind="stable")
        self.cuts = [cut_micro_batches(self.order[c * self.per_call:(c + 1) * self.per_call], self.lengths,
                                       num_micro * dp_size, micro_batch, pad_multiple, max_seq_len)
                     for c in range(self.calls)]  # every call's micro-batches, cut once

    def micro_rows(self, call: int, dp_rank: int) -> list[np.ndarray]:
        """The sample indices of each micro-batch of one call for one data-parallel rank (-1: an empty row, in the
        last call's micro-batches with no sample left)."""
        return run_order(self.cuts[call][dp_rank::self.dp_size])

    def micro_shapes(self, call: int, dp_rank: int) -> list[tuple[int, int]]:
        """(rows, padded length) of each micro-batch of the call on this rank."""
        return [micro_shape(idx, self.lengths, self.pad_multiple, self.max_seq_len) for idx in self.micro_rows(call, dp_rank)]

    def micro_batches(self, call: int, dp_rank: int, shapes: list[tuple[int, int]], pad_id: int) -> list:
        """[((input_ids, position_ids, segment_ids), (labels, counts))] of one call for one data-parallel rank,
        each micro-batch padded to its length in `shapes` (micro_shapes)."""
        counts = torch.tensor([max(self.tokens, 1), self.num_micro * self.dp_size], dtype=torch.int64)
        return [(inputs, (labels, counts)) for inputs, labels in
                (collate_rows(self.ds, idx, n, pad_id) for idx, (_, n) in zip(self.micro_rows(call, dp_rank), shapes, strict=True))]
