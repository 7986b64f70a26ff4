"""Pad samples into batches: ((input_ids, position_ids, segment_ids), labels), all int64 [B, T].

Training: `collate_rows` builds a micro-batch straight from a data set's flat arrays (numpy, no per-token
Python), right-padded to `padded_length`: the micro-batch's longest row rounded up to `pad_to_multiple_of`,
never beyond max_seq_len (training.batches: a step's micro-batches may differ in rows and length).
`collate` / `collate_left` pad sample dicts (tests, generation). Padding is segment 0 (attended by nothing)
with position id 0. A packed sequence (data/packing.py) has its own position ids (restarting at 0 per
segment) and segment ids 1, 2, ...; otherwise a row is one segment: id 1, position ids 0.. from its first
real token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data.dataset import EncodedDataset
from data.encode import IGNORE_INDEX
from data.packing import PackedDataset

Batch = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _pad(samples: Sequence[Mapping[str, Sequence[int]]], max_seq_len: int | None, pad_id: int, left: bool) -> Batch:
    longest = max((len(s["input_ids"]) for s in samples), default=0)
    length = longest if max_seq_len is None else max_seq_len
    if longest > length:
        raise ValueError(f"a sample has {longest} tokens, more than max_seq_len={length}")
    shape = (len(samples), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    segment_ids = torch.zeros(shape, dtype=torch.int64)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(length - n, length) if left else slice(0, n)
        input_ids[row, cols] = torch.tensor(s["input_ids"], dtype=torch.int64)
        if "labels" in s:  # prompts for generation have none
            labels[row, cols] = torch.tensor(s["labels"], dtype=torch.int64)
        position_ids[row, cols] = torch.tensor(s["position_ids"]) if "position_ids" in s else torch.arange(n)
        segment_ids[row, cols] = torch.tensor(s["segment_ids"]) if "segment_ids" in s else 1
    return (input_ids, position_ids, segment_ids), labels


def collate(samples: Sequence[Mapping[str, Sequence[int]]], max_seq_len: int | None, pad_id: int) -> Batch:
    """Right-pad to `max_seq_len` (None: the longest sample). All tensors int64 [B, max_seq_len]."""
    return _pad(samples, max_seq_len, pad_id, left=False)


def collate_left(samples: Sequence[Mapping[str, Sequence[int]]], max_seq_len: int | None, pad_id: int) -> Batch:
    """Left-pad, the layout of batched generation (which the pipeline's left-padded attention path serves; demo.py
    generates one prompt at a time, unpadded); position ids still start at 0 on each first real token."""
    return _pad(samples, max_seq_len, pad_id, left=True)


def padded_lengths(lengths: np.ndarray, multiple: int, max_seq_len: int | None) -> np.ndarray:
    """Each of `lengths` rounded up to `multiple`, at most max_seq_len (None: no cap)."""
    padded = -(-np.asarray(lengths) // multiple) * multiple
    return padded if max_seq_len is None else np.minimum(padded, max_seq_len)


def padded_length(lengths: np.ndarray, multiple: int, max_seq_len: int | None) -> int:
    """The longest of `lengths` (none: 1) rounded up to `multiple`, at most max_seq_len: a micro-batch's length."""
    return int(padded_lengths(np.asarray(lengths).max(initial=1), multiple, max_seq_len))


def collate_rows(ds: EncodedDataset | PackedDataset, rows: Sequence[int], length: int, pad_id: int) -> Batch:
    """Rows `rows` of `ds` (-1: an empty row, one pad token and no label) right-padded to `length`."""
    shape = (len(rows), length)
    ids, labels = np.full(shape, pad_id, np.int64), np.full(shape, IGNORE_INDEX, np.int64)
    pos, seg = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    packed = isinstance(ds, PackedDataset)
    for r, i in enumerate(rows):
        if i < 0:
            seg[r, 0] = 1
            continue
        a, b = ds.offsets[i], ds.offsets[i + 1]
        n = b - a
        if n > length:
            raise ValueError(f"a sample has {n} tokens, more than the batch length {length}")
        ids[r, :n], labels[r, :n] = ds.input_ids[a:b], ds.labels[a:b]
        if packed:
            pos[r, :n], seg[r, :n] = ds.positions_and_segments(i)
        else:
            pos[r, :n], seg[r, :n] = np.arange(n), 1
    return tuple(torch.from_numpy(x) for x in (ids, pos, seg)), torch.from_numpy(labels)
