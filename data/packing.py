"""Pack encoded samples into sequences of at most max_seq_len tokens ("packing": true).

    packed = pack(load_dataset(...), max_seq_len=512, seed=42)
    packed[0]  # {"input_ids", "labels", "position_ids", "segment_ids"}: several samples, segments 1, 2, ...

Algorithm: first-fit decreasing, done once at load time. The samples are put in a seeded random order,
stably sorted longest first, and each goes into the first sequence with room (a max segment tree over
the sequences' free space finds it in O(log n)). The result depends only on (samples, max_seq_len,
seed), so every rank computes identical packs without communication; the training order of the
packed sequences is then BatchPlan's, as for unpacked samples.

In a sequence, segment k (1, 2, ...) has position ids 0.. and attends only to itself (the models'
segment-aware mask); its first label is -100: unpacked it is never predicted (the loss shifts labels),
and packed it would be predicted from the previous segment's last token. So a sequence's summed loss
is the sum of its samples' own summed losses. Samples longer than max_seq_len exist only for pretrain
text with "split_long_pretrain" (data.encode keeps them whole); they are cut into chunks of at most max_seq_len
tokens that overlap by one, each its own segment, as Megatron's samples overlap: a chunk's first (untrained) token
is the previous chunk's last (trained) one, so every token of the text but its first is trained exactly once, and
no chunk is a lone token that trains nothing (an EOS cut off alone was never learned). Nothing is dropped here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.dataset import EncodedDataset
from data.encode import IGNORE_INDEX


@dataclass(frozen=True)
class PackStats:
    """Counts of one packing; `dropped` and `truncated` are the encoder's (data.encode.EncodeStats)."""

    samples: int  # encoded samples packed
    segments: int  # after splitting long pretrain samples into chunks
    sequences: int
    tokens: int  # real (non-padding) tokens, all of the samples' tokens
    trained: int  # tokens that carry loss (labels != -100, segment starts excluded)
    max_seq_len: int
    split: int  # samples split into several chunks
    dropped: int
    truncated: int

    @property
    def efficiency(self) -> float:
        """Packing efficiency: trained tokens / total tokens (sequences x max_seq_len)."""
        return self.trained / (self.sequences * self.max_seq_len) if self.sequences else 0.0

    @property
    def fill(self) -> float:
        """Real tokens / (sequences x max_seq_len): the fraction of the sequences that is not padding."""
        return self.tokens / (self.sequences * self.max_seq_len) if self.sequences else 0.0


class PackedDataset:
    """Packed sequences in flat arrays; a map-style dataset of {"input_ids", "labels", "position_ids",
    "segment_ids"} lists. `offsets` bound the sequences and `seg_offsets` the segments in the flat
    arrays; sequence i holds segments row_segments[i]:row_segments[i + 1]; `segment_sample` is the
    encoded sample each segment comes from."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, seg_offsets: np.ndarray, row_segments: np.ndarray,
                 segment_sample: np.ndarray, stats: PackStats, segment_chunk: np.ndarray | None = None):
        self.input_ids, self.labels, self.seg_offsets = input_ids, labels, seg_offsets
        self.row_segments, self.segment_sample, self.stats = row_segments, segment_sample, stats
        self.segment_chunk = segment_chunk  # per segment, which max_seq_len chunk of its sample it is (0: the first)
        self.offsets = seg_offsets[row_segments]

    def __len__(self) -> int:
        return len(self.row_segments) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range ({len(self)} sequences)")
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        pos, seg = self.positions_and_segments(i)
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist(),
                "position_ids": pos.tolist(), "segment_ids": seg.tolist()}

    def positions_and_segments(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence i's position ids (0.. per segment) and segment ids (1, 2, ...), int64."""
        a = self.offsets[i]
        bounds = self.seg_offsets[self.row_segments[i]:self.row_segments[i + 1] + 1] - a
        lens = np.diff(bounds)
        return np.arange(bounds[-1]) - np.repeat(bounds[:-1], lens), np.repeat(np.arange(1, len(lens) + 1), lens)

    def segments_per_row(self) -> np.ndarray:
        return np.diff(self.row_segments)

    def row_of_sample(self, sample: int) -> int:
        """The sequence holding (the first chunk of) encoded sample `sample`."""
        return int(self.rows_of_sample(sample)[0])

    def rows_of_sample(self, sample: int) -> np.ndarray:
        """The sequences holding encoded sample `sample`'s chunks, in chunk order (one: it was not split)."""
        segs = np.flatnonzero(self.segment_sample == sample)  # a long sample's chunks are placed in any order
        if self.segment_chunk is not None:
            segs = segs[np.argsort(self.segment_chunk[segs], kind="stable")]
        return np.searchsorted(self.row_segments, segs, side="right") - 1


def _first_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Sequence index for each length, in order: the first sequence with room (first fit)."""
    size = 1
    while size < len(lengths):
        size *= 2
    free = [capacity] * (2 * size)  # max free space per subtree; leaf j = sequence j
    rows = np.empty(len(lengths), dtype=np.int64)
    for j, n in enumerate(lengths.tolist()):
        i = 1
        while i < size:
            i = 2 * i if free[2 * i] >= n else 2 * i + 1
        rows[j] = i - size
        free[i] -= n
        i //= 2
        while i:
            free[i] = max(free[2 * i], free[2 * i + 1])
            i //= 2
    return rows


def chunk_stride(max_seq_len: int) -> int:
    """Tokens between the starts of a long sample's chunks: they overlap by one (the module docstring)."""
    return max(max_seq_len - 1, 1)


def chunk_counts(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """How many chunks of at most max_seq_len tokens, overlapping by one, each sample of `lengths` is cut into."""
    return np.maximum(1, -(-(lengths - 1) // chunk_stride(max_seq_len)))


def pack(ds: EncodedDataset, max_seq_len: int, seed: int) -> PackedDataset:
    """Pack `ds` by first-fit decreasing (see the module docstring); samples over max_seq_len are split."""
    lengths = np.diff(ds.offsets)
    stride = chunk_stride(max_seq_len)
    n_chunks = chunk_counts(lengths, max_seq_len)
    sample = np.repeat(np.arange(len(ds)), n_chunks)
    k = np.arange(len(sample)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = ds.offsets[sample] + k * stride
    length = np.minimum(max_seq_len, ds.offsets[sample + 1] - start)

    order = np.random.default_rng(seed).permutation(len(sample))
    order = order[np.argsort(-length[order], kind="stable")]
    rows = _first_fit(length[order], max_seq_len)
    by_row = np.argsort(rows, kind="stable")  # segments grouped by sequence, in the order they were placed
    seg = order[by_row]
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    row_segments = np.searchsorted(rows[by_row], np.arange(n_rows + 1))

    seg_len = length[seg]
    seg_offsets = np.zeros(len(seg) + 1, dtype=np.int64)
    np.cumsum(seg_len, out=seg_offsets[1:])
    input_ids, labels = _gather(ds, start[seg], seg_len, seg_offsets)
    labels[seg_offsets[:-1]] = IGNORE_INDEX  # every segment has a token
    stats = PackStats(samples=len(ds), segments=len(seg), sequences=n_rows, tokens=int(seg_offsets[-1]),
                      trained=int(trained_mask(labels, seg_offsets[:-1]).sum()), max_seq_len=max_seq_len, split=int((n_chunks > 1).sum()), dropped=ds.stats.dropped,
                      truncated=ds.stats.truncated)
    return PackedDataset(input_ids, labels, seg_offsets, row_segments, sample[seg], stats, k[seg])


GATHER_BLOCK = 1 << 22  # tokens gathered at a time (an index of the whole dataset doubled pack's peak memory)


def _gather(ds: EncodedDataset, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ds's input_ids and labels of the segments (`starts`, `lengths`) laid end to end at `offsets`, a block of
    about GATHER_BLOCK tokens at a time (the copy is what is kept: 8 bytes a token with int32 ids and labels)."""
    ids, labels = np.empty(offsets[-1], ds.input_ids.dtype), np.empty(offsets[-1], ds.labels.dtype)
    i = 0
    while i < len(lengths):
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + GATHER_BLOCK, side="right")) - 1)
        lo, hi = offsets[i], offsets[j]
        take = np.arange(lo, hi) - np.repeat(offsets[i:j] - starts[i:j], lengths[i:j])
        ids[lo:hi], labels[lo:hi] = ds.input_ids[take], ds.labels[take]
        i = j
    return ids, labels


def describe(st: PackStats) -> str:
    """One line for logs: samples -> sequences, efficiency, dropped."""
    split = f", {st.split} split into {st.segments - st.samples + st.split} chunks" if st.split else ""
    return (f"packing: {st.samples} samples -> {st.sequences} sequences of {st.max_seq_len}, efficiency "
            f"{st.efficiency:.1%} (trained tokens / total tokens; {st.fill:.1%} not padding), {st.dropped} dropped{split}")


def trained_mask(labels: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per token, whether the loss counts it after the next-token shift: labels != -100, but never the first token
    of a sample (or segment) starting at `starts`, which nothing predicts (with a tokenizer that adds no BOS, a
    pretrain sample's first token carries a label). The one definition of a trained token (data.inspect's too)."""
    is_trained = np.asarray(labels) != IGNORE_INDEX
    starts = np.asarray(starts, dtype=np.int64)
    is_trained[starts[starts < len(is_trained)]] = False
    return is_trained


def trained_tokens(ds: EncodedDataset | PackedDataset) -> np.ndarray:
    """Per sample, the tokens that carry loss after the next-token shift (`trained_mask`: labels[1:] != -100); per
    packed sequence the same sum over its segments (each segment's first label is already -100). Counted over rows of
    about GATHER_BLOCK tokens at a time: a mask of the whole dataset cast to int64 took 9 bytes a token on every
    reading rank."""
    offsets = np.asarray(ds.offsets, dtype=np.int64)
    out = np.zeros(len(ds), np.int64)
    i = 0
    while i < len(ds):
        j = min(max(int(np.searchsorted(offsets, offsets[i] + GATHER_BLOCK, side="right")) - 1, i + 1), len(ds))
        a, b = offsets[i], offsets[j]
        starts = offsets[i:j] - a
        out[i:j] = np.add.reduceat(trained_mask(ds.labels[a:b], starts), starts, dtype=np.int64)
        i = j
    return out
