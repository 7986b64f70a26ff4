"""An encoded dataset (flat arrays of ragged samples) and its two other forms: the cache file every reading rank of a
node memory-maps (`save_dataset` / `load_dataset_file`), and messages to a rank that cannot read it (`send_dataset` /
`recv_dataset`). data.encode builds datasets and decides where their cache lives."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

CACHE_SUFFIX = ".npys"  # .npy records back to back (save_dataset): memory-mapped by every rank, not copied into each
CACHE_ARRAYS = ("input_ids", "labels", "offsets", "record_index")  # after the stats, in this order
CACHE_ALIGN = 64  # every record (and so its data: numpy pads .npy headers to 64 bytes) starts 64-byte aligned
STATS_CRC = "stats_crc32"  # the stats record's own checksum
STALE_TMP_SECONDS = 3600.0  # a cache's temp file older than this is a killed writer's
SEND_CHUNK = 1 << 26  # array elements per message when a dataset is sent to another rank (send_dataset)


@dataclass(frozen=True)
class EncodeStats:
    """Counts of one dataset build; `cache_hit` says whether it came from the disk cache."""

    records: int
    kept: int
    dropped: int  # no trained token left within max_seq_len
    truncated: int  # kept samples cut to max_seq_len
    spliced: int = 0  # kept samples whose tokens were split at a prompt / answer boundary (data.boundary)
    prompted: int | None = None  # records rendered through a template (all but pretrain); None: a cache that predates it
    special_text: int | None = None  # records whose own text holds a special token's text; None: an older cache
    special_example: str = ""  # the first of them: 'FILE:LINE: field 'output' holds '</s>''
    default_in_chat: int | None = None  # records of a type without chat messages, rendered by the default template in
    # chat mode (conver_has_api); None: an older cache
    cache_hit: bool = False
    cache_path: str | None = None  # the cache read or written
    cache_problem: str = ""  # why the cache could not be written

    @property
    def cache_status(self) -> str:
        """'hit', 'written', 'not written (why)', or 'not used'."""
        if self.cache_hit:
            return "hit"
        if self.cache_problem:
            return f"not written ({self.cache_problem})"
        return "written" if self.cache_path else "not used"


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
        i %= len(self)  # ds[-1] is the last sample (offsets[-1] + 1 would be out of range)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def sample_of_record(self, record: int) -> int | None:
        """Index of the sample built from record number `record`, None if that record was dropped."""
        i = int(np.searchsorted(self.record_index, record))
        return i if i < len(self) and self.record_index[i] == record else None


def save_dataset(ds: EncodedDataset, path: Path) -> None:
    """Write atomically: a temp file in the cache dir, then linked to its name only if no other builder's is there
    (`_publish`). The file is the stats (JSON, as uint8; with each array's CRC-32, which `load_dataset_file` checks)
    and CACHE_ARRAYS as .npy records, each 64-byte aligned, so that `load_dataset_file` maps them instead of reading
    them. Caches of older versions (encoded-*.npz) are never read: their name and key differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # keep caches out of version control
    remove_stale_temps(path.parent)
    stats = {k: v for k, v in asdict(ds.stats).items() if not k.startswith("cache_")}
    stats[STATS_CRC] = _stats_crc(stats)
    stats["crc32"] = [zlib.crc32(memoryview(np.ascontiguousarray(getattr(ds, k))).cast("B")) for k in CACHE_ARRAYS]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for a in (np.frombuffer(json.dumps(stats).encode(), np.uint8), *(getattr(ds, k) for k in CACHE_ARRAYS)):
                f.write(b"\0" * (-f.tell() % CACHE_ALIGN))
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other ranks or users may read the cache
        _publish(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(cache_dir: Path) -> None:
    """Delete the temp files that writers killed mid-write (SIGKILL, out of memory) left in `cache_dir`: those older
    than STALE_TMP_SECONDS (not one another process writes now). Run at every write and every cache hit (a run
    restarted within the hour writes the cache, then only hits it)."""
    for old in cache_dir.glob("encoded-*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_TMP_SECONDS:
                old.unlink()


def _stats_crc(stats: dict) -> int:
    """CRC-32 of the stats record's counts (the arrays have their own)."""
    return zlib.crc32(json.dumps({k: v for k, v in stats.items() if k not in (STATS_CRC, "crc32")},
                                 sort_keys=True).encode())


def _publish(tmp: Path, path: Path) -> None:
    """`tmp` under the name `path`, unless another builder's cache (the same key: the same content) is there already:
    that one stays, as ranks of other nodes may have it memory-mapped (replaced on a network filesystem, their
    mapping would fault). A hard link creates the name atomically only where it is free; without hard links, the
    name is taken only when free at the time of asking."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links
        if not path.exists():
            os.replace(tmp, path)
    tmp.unlink(missing_ok=True)


def _record(f: Any) -> tuple[np.dtype, int, int]:
    """(dtype, length, data offset) of the 1-d .npy record at the next CACHE_ALIGN boundary of `f`; `f` after it."""
    f.seek(-f.tell() % CACHE_ALIGN, os.SEEK_CUR)
    try:  # numpy parses the header as a Python literal: damage raises tokenize.TokenError, SyntaxError, ...
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - whatever numpy raises for a damaged header, the file is damaged
        raise ValueError(f"a damaged record header ({type(e).__name__})") from e
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError(f"unexpected record {dtype} {shape}")
    at = f.tell()
    f.seek(at + shape[0] * dtype.itemsize)
    return dtype, shape[0], at


def load_dataset_file(path: Path) -> EncodedDataset:
    """The cache at `path`, its arrays read-only views of one shared memory map (the node's ranks share the pages:
    nothing is copied into each process). ValueError (or OSError) when it is damaged."""
    with open(path, "rb") as f:
        dtype, n, at = _record(f)
        if dtype != np.uint8:
            raise ValueError("no stats record")
        f.seek(at)
        stats = json.loads(f.read(n))
        if not isinstance(stats, dict):
            raise ValueError("no stats record")
        records = [_record(f) for _ in CACHE_ARRAYS]
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError if the file is empty
    ids, labels, offsets, index = (np.frombuffer(buf, dtype, n, at) for dtype, n, at in records)  # ValueError: short
    arrays = (ids, labels, offsets, index)
    if [zlib.crc32(a) for a in arrays] != stats.pop("crc32", None):  # damaged since (a zero-filled block after a crash)
        raise ValueError("a checksum does not match")
    if STATS_CRC in stats and stats.pop(STATS_CRC) != _stats_crc(stats):  # (caches written before it have none)
        raise ValueError("the counts' checksum does not match")
    if len(offsets) != len(index) + 1 or not len(ids) == len(labels) == offsets[-1] or offsets[0] != 0:
        raise ValueError("its arrays do not match")
    known = {field.name for field in fields(EncodeStats)}
    stats = EncodeStats(**{k: v for k, v in stats.items() if k in known}, cache_hit=True, cache_path=str(path))
    return EncodedDataset(ids, labels, offsets, index, stats)


def send_dataset(ds: EncodedDataset, dst: int, group: Any) -> None:
    """Send `ds` to rank `dst` over torch.distributed `group` (gloo: CPU tensors), for a rank that cannot read it
    from a cache; it calls `recv_dataset`."""
    import torch
    import torch.distributed as dist

    arrays = (ds.input_ids, ds.labels, ds.offsets, ds.record_index)
    dist.send_object_list([ds.stats, [(a.dtype.str, len(a)) for a in arrays]], dst, group=group)
    for a in arrays:
        for lo in range(0, len(a), SEND_CHUNK):
            dist.send(torch.from_numpy(np.ascontiguousarray(a[lo:lo + SEND_CHUNK])), dst, group=group)


def recv_dataset(src: int, group: Any) -> EncodedDataset:
    """The dataset that rank `src` sends with `send_dataset`."""
    import torch
    import torch.distributed as dist

    head: list[Any] = [None, None]
    dist.recv_object_list(head, src, group=group)
    stats, shapes = head
    arrays = []
    for dtype, n in shapes:
        a = np.empty(n, dtype=np.dtype(dtype))
        for lo in range(0, n, SEND_CHUNK):
            dist.recv(torch.from_numpy(a[lo:lo + SEND_CHUNK]), src, group=group)
        arrays.append(a)
    return EncodedDataset(*arrays, stats)
