"""Pad samples into fixed-shape batches: ((input_ids, position_ids, segment_ids), labels).

DeepSpeed's pipeline engine caches tensor shapes from the first micro-batch, so training batches
are padded to exactly `max_seq_len`. Padding is segment 0 (attended by nothing). A sample may carry
its own "position_ids" and "segment_ids" (a packed sequence, data/packing.py); otherwise it is one
segment: segment id 1, position ids 0.. from its first real token. Padding has position id 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from data.encode import IGNORE_INDEX

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
    """Left-pad (for batched generation); position ids still start at 0 on each first real token."""
    return _pad(samples, max_seq_len, pad_id, left=True)
