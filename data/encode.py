"""Tokenize rendered records once, label the trained tokens, truncate, and cache the result on disk.

    ds = load_dataset("data/samples", tokenizer, max_seq_len=512)
    ds[0]  # {"input_ids": [...], "labels": [...]}, labels -100 where no loss
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data.records import Record, read_files, records_from_files
from data.templates import render, template_settings

IGNORE_INDEX = -100
CACHE_VERSION = "encode-v1"  # bump when encoding or labelling changes
MIN_RECORDS_FOR_POOL = 2000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeStats:
    """Counts of one dataset build; `cache_hit` says whether it came from the disk cache."""

    records: int
    kept: int
    dropped: int  # no trained token left within max_seq_len
    truncated: int  # kept samples cut to max_seq_len
    cache_hit: bool = False
    cache_path: str | None = None


class EncodedDataset:
    """Ragged samples in flat arrays; a map-style dataset of {"input_ids", "labels"} lists."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, record_index: np.ndarray,
                 stats: EncodeStats):
        self.input_ids, self.labels, self.offsets, self.record_index = input_ids, labels, offsets, record_index
        self.stats = stats

    def __len__(self) -> int:
        return len(self.record_index)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def sample_of_record(self, record: int) -> int | None:
        """Index of the sample built from record number `record`, None if that record was dropped."""
        i = int(np.searchsorted(self.record_index, record))
        return i if i < len(self) and self.record_index[i] == record else None


def encode_one(tokenizer: Any, rec: dict[str, Any], max_seq_len: int, pretrain_eos: bool = True
               ) -> tuple[list[int], list[int], bool]:
    """Render and tokenize one record: (input_ids, labels, truncated), at most `max_seq_len` tokens.

    The text is tokenized once with the tokenizer's own special tokens (BOS etc.); a token is
    trained iff its character span lies inside a trained span. Truncation drops the tail (an EOS
    that does not fit is absent, never re-added).
    """
    r = render(rec, tokenizer.eos_token, pretrain_eos)
    enc = tokenizer(r.text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    for s, e in r.spans:
        trained |= (offs[:, 0] >= s) & (offs[:, 1] <= e) & (offs[:, 1] > offs[:, 0])
    labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    return ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len


_worker: dict[str, Any] = {}


def _cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init_worker(tokenizer: Any, max_seq_len: int, pretrain_eos: bool) -> None:
    _worker.update(tokenizer=tokenizer, max_seq_len=max_seq_len, pretrain_eos=pretrain_eos)


def _encode_chunk(chunk: Sequence[tuple[int, dict[str, Any]]]) -> list[tuple[int, list[int], list[int], bool]]:
    """Encode (record index, record) pairs, leaving out samples with no trained token."""
    out = []
    for idx, rec in chunk:
        ids, labels, cut = encode_one(_worker["tokenizer"], rec, _worker["max_seq_len"], _worker["pretrain_eos"])
        if any(x != IGNORE_INDEX for x in labels):
            out.append((idx, ids, labels, cut))
    return out


def encode_records(records: Sequence[Record], tokenizer: Any, max_seq_len: int, pretrain_eos: bool = True,
                   num_proc: int | None = None) -> EncodedDataset:
    """Encode validated records, in parallel over `num_proc` processes (default: all cores, 1 for small inputs)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust-backed) tokenizer is required: labels need its offset mapping")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if num_proc is None:
        num_proc = 1 if len(records) < MIN_RECORDS_FOR_POOL else _cpu_count()
    items = [(i, r.data) for i, r in enumerate(records)]
    init = (tokenizer, max_seq_len, pretrain_eos)
    if num_proc <= 1 or len(items) < 2:
        _init_worker(*init)
        results = _encode_chunk(items)
        _worker.clear()
    else:
        size = -(-len(items) // (num_proc * 4))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(num_proc, initializer=_init_worker, initargs=init) as pool:
            results = [s for part in pool.imap(_encode_chunk, chunks) for s in part]
    lengths = [len(ids) for _, ids, _, _ in results]
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    flat = np.fromiter(itertools.chain.from_iterable(r[1] for r in results), dtype=np.int32, count=n)
    labels = np.fromiter(itertools.chain.from_iterable(r[2] for r in results), dtype=np.int32, count=n)
    stats = EncodeStats(records=len(records), kept=len(results), dropped=len(records) - len(results),
                        truncated=sum(cut for *_, cut in results))
    return EncodedDataset(flat, labels, offsets, np.array([i for i, *_ in results], dtype=np.int64), stats)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's serialized state: vocabulary, merges, normalizer, special-token conventions."""
    state = {
        "class": type(tokenizer).__name__,
        "backend": tokenizer.backend_tokenizer.to_str(),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return json.dumps(state, sort_keys=True, default=str)


def cache_key(files: Sequence[tuple[Path, bytes]], tokenizer: Any, max_seq_len: int, pretrain_eos: bool) -> str:
    """sha256 over data bytes, tokenizer state, template settings, max_seq_len and CACHE_VERSION."""
    h = hashlib.sha256()
    for part in (CACHE_VERSION, tokenizer_fingerprint(tokenizer), json.dumps(template_settings(pretrain_eos)),
                 str(max_seq_len)):
        h.update(part.encode())
        h.update(b"\0")
    for _, raw in files:
        h.update(hashlib.sha256(raw).digest())
    return h.hexdigest()


def _save(ds: EncodedDataset, path: Path) -> None:
    """Write atomically: a temp file in the cache dir, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # keep caches out of version control
    s = ds.stats
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, input_ids=ds.input_ids, labels=ds.labels, offsets=ds.offsets, record_index=ds.record_index,
                     counts=np.array([s.records, s.kept, s.dropped, s.truncated], dtype=np.int64))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other ranks or users may read the cache
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load(path: Path) -> EncodedDataset:
    with np.load(path) as z:
        records, kept, dropped, truncated = (int(x) for x in z["counts"])
        stats = EncodeStats(records, kept, dropped, truncated, cache_hit=True, cache_path=str(path))
        return EncodedDataset(z["input_ids"], z["labels"], z["offsets"], z["record_index"], stats)


def load_dataset(data_path: str | Path | Sequence[str | Path], tokenizer: Any, max_seq_len: int,
                 cache_dir: str | Path | None = None, pretrain_eos: bool = True, num_proc: int | None = None,
                 use_cache: bool = True) -> EncodedDataset:
    """Read, validate (all records, DataError on any problem) and encode `data_path`, using the disk cache.

    The cache lives in `cache_dir` (default: `.cache` beside the first data file) under a key that
    covers the data bytes, the tokenizer, the templates, `max_seq_len` and the code version.
    """
    files = read_files(data_path)
    path = None
    if use_cache:
        key = cache_key(files, tokenizer, max_seq_len, pretrain_eos)
        path = Path(cache_dir) if cache_dir is not None else files[0][0].parent / ".cache"
        path = path / f"encoded-{key[:32]}.npz"
        if path.is_file():
            ds = _load(path)
            _log(ds.stats)
            return ds
    ds = encode_records(records_from_files(files), tokenizer, max_seq_len, pretrain_eos, num_proc)
    if path is not None:
        try:
            _save(ds, path)
            ds.stats = replace(ds.stats, cache_path=str(path))
        except OSError as e:
            log.warning("could not write the data cache %s: %s", path, e)
    _log(ds.stats)
    return ds


def _log(s: EncodeStats) -> None:
    log.info("data: %d records -> %d samples kept, %d dropped (no trained token within max_seq_len), "
             "%d truncated; cache %s%s", s.records, s.kept, s.dropped, s.truncated,
             "hit" if s.cache_hit else "miss", f" ({s.cache_path})" if s.cache_path else "")
