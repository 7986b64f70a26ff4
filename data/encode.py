"""Tokenize rendered records once, label the trained tokens, truncate, and cache the result on disk.

    ds = load_dataset("data/samples", tokenizer, max_seq_len=512)
    ds[0]  # {"input_ids": [...], "labels": [...]}, labels -100 where no loss

A token carries a label iff its last character lies inside a trained span; zero-width tokens (a BOS
the tokenizer adds) never are. Texts are tokenized by data.boundary, so the ids the model is prompted
with at inference (`encode_prompt`, what demo.py sends) are a prefix of the training ids and the
answer's first trained token is the first token after them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data.boundary import Encoding, appended_ids, backend_spec, encode_texts
from data.chat import chat_problems, chat_prompt, render_chat, require_chat_template
from data.dataset import (
    CACHE_SUFFIX,
    EncodedDataset,
    EncodeStats,
    load_dataset_file,
    remove_stale_temps,
    save_dataset,
)
from data.records import (
    MAX_SHOWN,
    RECORD_TYPES,
    DataError,
    Record,
    digests_of,
    file_digests,
    read_files,
    record_type,
    records_from_files,
)
from data.templates import CHAT_MESSAGES, DEFAULT_SETTINGS, Rendered, Span, TemplateSettings, prompt_of, render
from data.templates import template_settings as template_state
from data.tokenizer_checks import require_eos, require_special_tokens_parsed, special_text

IGNORE_INDEX = -100
CACHE_VERSION = "encode-v13"  # bump when encoding, labelling or the cache file's layout changes (v9 was
# written for an hour by cf0d248, since reverted: never reuse it; v12: 0746ce2's chat labels, written under v11;
# v13: labels read from untrimmed offsets, data.boundary)
KEYED_PACKAGES = ("tokenizers", "transformers", "jinja2")  # their versions are in the key: tokenizing, chat rendering
MIN_RECORDS_FOR_POOL = 2000  # records, or MIN_CHARS_FOR_POOL characters of text (books: few records, long ones), that
MIN_CHARS_FOR_POOL = 1 << 23  # are tokenized by a process pool (`pooled`), after a line that says so
BATCH = 1000  # texts per tokenizer call
MAX_RANGE = 2 * BATCH  # records per task at most: what a worker holds for one range does not grow with the data
PROGRESS_EVERY = 30.0  # seconds between progress lines while records are tokenized
RUN_CACHE_DIR = ".data_cache"  # under save_path: a training run's data cache when the data's directory is read-only

log = logging.getLogger(__name__)
progress_log = logging.getLogger(f"{__name__}.progress")  # a cold start's lines: training shows them (show_progress)

# record types that chat mode renders with the default template: no chat messages hold their tool turns (pretrain is
# plain text in both modes)
DEFAULT_IN_CHAT = tuple(t for t in RECORD_TYPES if t not in CHAT_MESSAGES and t != "pretrain")


class Encoded(NamedTuple):
    """One record's int32 input_ids and labels (at most max_seq_len), whether it was truncated, and the
    number of prompt / answer boundaries where its tokens were spliced (data.boundary)."""

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool
    spliced: int = 0


def _render(rec: Mapping[str, Any], tokenizer: Any, settings: TemplateSettings, max_tokens: int | None) -> Rendered:
    if settings.template == "chat":
        return render_chat(rec, tokenizer, settings, max_tokens)
    return render(rec, tokenizer.eos_token, settings)


def _label(enc: Encoding, spans: list[Span], max_seq_len: int) -> Encoded:
    """The first max_seq_len tokens, labelled from character offsets: a token is trained iff its last character lies
    in a trained span. `spliced`: the splices at boundaries within them or at their end (those past them change no
    kept token; one at the cut ends the kept tokens with the prompt's own ids)."""
    ids_a = np.asarray(enc.ids[:max_seq_len], dtype=np.int32)
    offs = np.asarray(enc.offsets[:max_seq_len], dtype=np.int64).reshape(-1, 2)
    reach = int(offs[:, 1].max()) if len(offs) else 0
    trained = np.zeros(len(ids_a), dtype=bool)
    for s, e in spans:
        if s < reach:  # a span past the kept tokens trains none of them
            trained |= (offs[:, 1] > s) & (offs[:, 1] <= e)
    trained &= offs[:, 1] > offs[:, 0]  # zero-width tokens (a BOS the tokenizer adds) are never trained
    labels = np.where(trained, ids_a, np.int32(IGNORE_INDEX)).astype(np.int32)
    return Encoded(ids_a, labels, len(enc.ids) > max_seq_len, sum(b <= reach for b in enc.splices))


def encode_batch(tokenizer: Any, recs: Sequence[Mapping[str, Any]], max_seq_len: int,
                 settings: TemplateSettings = DEFAULT_SETTINGS) -> list[Encoded | str]:
    """Render and tokenize records: per record an `Encoded`, or the problem (a str) when a chat template cannot
    render it or its prompts cannot be kept token prefixes. At most `max_seq_len` tokens each.

    Texts are tokenized in batches by data.boundary: with the tokenizer's own special tokens (BOS etc.) for the
    default templates, without adding any in chat mode (as apply_chat_template does). Truncation drops
    the tail (an EOS that does not fit is absent, never re-added). With `settings.split_long_pretrain`
    pretrain samples are kept whole (data.packing splits them into max_seq_len chunks).
    """
    rendered: list[Rendered | str] = []
    for rec in recs:
        whole = settings.split_long_pretrain and record_type(rec) == "pretrain"
        try:
            rendered.append(_render(rec, tokenizer, settings, None if whole else max_seq_len))
        except ValueError as e:
            rendered.append(str(e))
    out: list[Encoded | str] = list(rendered)  # strings stay: the problems
    for has_special in (False, True):
        at = [i for i, r in enumerate(rendered) if isinstance(r, Rendered) and r.has_special_tokens == has_special]
        if at:
            encs = encode_texts(tokenizer, [(rendered[i].text, rendered[i].prompt_ends) for i in at], not has_special,
                                max_seq_len)  # a pretrain text kept whole has no prompt boundary
            for i, enc in zip(at, encs, strict=True):
                if isinstance(enc, str):
                    out[i] = enc
                    continue
                whole = settings.split_long_pretrain and record_type(recs[i]) == "pretrain"
                out[i] = _label(enc, rendered[i].spans, len(enc.ids) if whole else max_seq_len)
    return out


def encode_prompt(tokenizer: Any, rec: Mapping[str, Any], settings: TemplateSettings = DEFAULT_SETTINGS) -> list[int]:
    """The ids the model is prompted with for the record's (next) answer: a prefix of the training ids of the
    record with that answer (the whole text for pretrain). Records with earlier answers close them with EOS.
    ValueError when the record cannot be prompted (a chat template rejects it, ...)."""
    require_special_tokens_parsed(tokenizer)
    if settings.template == "chat" and record_type(rec) in CHAT_MESSAGES:
        prompt = chat_prompt(rec, tokenizer)
    else:
        prompt = prompt_of(rec, tokenizer.eos_token)
    enc = next(encode_texts(tokenizer, [(prompt.text, prompt.prompt_ends)], not prompt.has_special_tokens))
    if isinstance(enc, str):
        raise ValueError(enc)
    return enc.ids


def encode_one(tokenizer: Any, rec: Mapping[str, Any], max_seq_len: int, settings: TemplateSettings = DEFAULT_SETTINGS
               ) -> tuple[list[int], list[int], bool]:
    """One record's (input_ids, labels, truncated) as lists (see `encode_batch`); ValueError if it cannot render."""
    result = encode_batch(tokenizer, [rec], max_seq_len, settings)[0]
    if isinstance(result, str):
        raise ValueError(result)
    return result.input_ids.tolist(), result.labels.tolist(), result.truncated


# a container's CPU limit (Kubernetes `limits.cpu`, docker --cpus): cgroup v2's file, then v1's quota and period
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def cpu_quota() -> float | None:
    """The CPUs a cgroup CPU quota gives this process's container (2.5: 250 ms of CPU per 100 ms), None without one."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP_V1_CPU / "cpu.cfs_quota_us").read_text())
        period = int((CGROUP_V1_CPU / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, at most its container's CPU quota (rounded up). A quota is not
    an affinity: in a 4-CPU-limited container on a 64-core host, 64 tokenizing processes would share 4 CPUs' time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


_worker: dict[str, Any] = {}


class Part(NamedTuple):
    """The samples of a range of records that keep a trained token, in flat arrays, and the range's problems."""

    index: np.ndarray  # record index per sample, int64
    lengths: np.ndarray  # tokens per sample, int64
    input_ids: np.ndarray  # int32, concatenated
    labels: np.ndarray  # int32, concatenated
    truncated: int
    spliced: int  # samples with a spliced boundary
    problems: list[tuple[int, str]]  # (record index, problem)


def _init_worker(tokenizer: Any, recs: Sequence[Mapping[str, Any]], max_seq_len: int, settings: TemplateSettings
                 ) -> None:
    _worker.update(tokenizer=tokenizer, recs=recs, max_seq_len=max_seq_len, settings=settings)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when the thread that started it (the pool's caller, waiting in
    it) dies, also of SIGKILL (the OOM killer), which no Python code sees: a worker would block on its queue forever,
    holding the records. Then, if `parent` already died (before prctl), die now. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        done = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl
        return
    if done == 0 and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


WORKER_IGNORED = [getattr(signal, name) for name in ("SIGINT", "SIGHUP", "SIGUSR1") if hasattr(signal, name)]


def _init_pool_worker(parent: int, *args: Any) -> None:
    _die_with_parent(parent)
    # a Ctrl-C (to the terminal's whole process group) is the parent's to act on: it cancels the ranges not started;
    # a worker it ended was "a tokenization process died". SIGTERM ends a worker (not the handler it was forked
    # with, the trainer's): the pool stops the others with it when one dies (the OOM killer), or it waits forever
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism: no tokenizer threads per worker
    _init_worker(*args)


def _encode_range(bounds: tuple[int, int]) -> Part:
    """Encode the worker's records [start, end), BATCH texts per tokenizer call."""
    start, end = bounds
    idx, ids, labels, cuts, spliced, problems = [], [], [], 0, 0, []
    for lo in range(start, end, BATCH):
        found = encode_batch(_worker["tokenizer"], _worker["recs"][lo:min(lo + BATCH, end)], _worker["max_seq_len"],
                             _worker["settings"])
        for i, r in enumerate(found, lo):
            if isinstance(r, str):
                problems.append((i, r))
            elif (r.labels[1:] != IGNORE_INDEX).any():  # a trained token after the first (never predicted)
                idx.append(i)
                ids.append(r.input_ids)
                labels.append(r.labels)
                cuts += r.truncated
                spliced += r.spliced > 0
    empty = np.zeros(0, np.int32)
    return Part(np.array(idx, dtype=np.int64), np.array([len(x) for x in ids], dtype=np.int64),
                np.concatenate([empty, *ids]), np.concatenate([empty, *labels]), cuts, spliced, problems)


def pooled(records: Sequence[Record]) -> bool:
    """Whether encoding `records` takes long enough for a process pool and a line saying so: MIN_RECORDS_FOR_POOL
    records, or MIN_CHARS_FOR_POOL characters in their text fields."""
    if len(records) >= MIN_RECORDS_FOR_POOL:
        return True
    chars, todo = 0, [r.data for r in records]
    while todo and chars < MIN_CHARS_FOR_POOL:
        v = todo.pop()
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, dict | list):
            todo.extend(v.values() if isinstance(v, dict) else v)
    return chars >= MIN_CHARS_FOR_POOL


class _Progress:
    """Log lines while records are encoded: what starts (when it takes a while), then every PROGRESS_EVERY s."""

    def __init__(self, total: int, num_proc: int, announce: bool):
        self.total, self.count, self.last = total, 0, time.monotonic()
        if announce:
            progress_log.info("data: tokenizing %d records on %d process(es) (written to the data cache for the next "
                              "start)", total, num_proc)

    def done(self, part: Part, bounds: tuple[int, int]) -> Part:
        self.count += bounds[1] - bounds[0]
        if time.monotonic() - self.last >= PROGRESS_EVERY and self.count < self.total:
            self.last = time.monotonic()
            progress_log.info("data: tokenized %d of %d records", self.count, self.total)
        return part


@contextlib.contextmanager
def show_progress() -> Iterator[None]:
    """Within it, the progress lines of a cold start go to stdout as plain lines (as the trainer prints its own), unless
    logging is set up to show them (a training process sets up none: the root logger would drop them)."""
    if progress_log.isEnabledFor(logging.INFO) and progress_log.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = progress_log.level, progress_log.propagate
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False  # a root handler set to WARNING would print them a second time
    try:
        yield
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(saved[0])
        progress_log.propagate = saved[1]


def encode_records(records: Sequence[Record], tokenizer: Any, max_seq_len: int,
                   settings: TemplateSettings = DEFAULT_SETTINGS, num_proc: int | None = None) -> EncodedDataset:
    """Encode validated records, in parallel over `num_proc` processes (default: all cores, 1 for small inputs).

    Raises DataError (`FILE:LINE: problem` lines) for records the chat template cannot render; once MAX_SHOWN
    problems are found (all a DataError shows) the records after them are not encoded."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust-backed) tokenizer is required: labels need its offset mapping")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    require_eos(tokenizer)
    require_special_tokens_parsed(tokenizer)
    if settings.template == "chat":
        require_chat_template(tokenizer)
    large = pooled(records)
    if num_proc is None:
        num_proc = usable_cores() if large else 1
    num_proc = max(1, min(num_proc, len(records)))
    init = (tokenizer, [r.data for r in records], max_seq_len, settings)
    size = min(MAX_RANGE, -(-len(records) // (num_proc * 8)))  # ranges in order: progress lines, balanced processes
    ranges = [(i, min(i + size, len(records))) for i in range(0, len(records), size)]
    progress = _Progress(len(records), num_proc, large)
    parts: list[Part] = []

    def enough(part: Part, bounds: tuple[int, int]) -> bool:  # keeps the part; True once MAX_SHOWN problems are known
        parts.append(progress.done(part, bounds))
        return sum(len(p.problems) for p in parts) >= MAX_SHOWN

    if num_proc == 1:
        _init_worker(*init)
        try:
            any(enough(_encode_range(r), r) for r in ranges)
        finally:
            _worker.clear()
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: records are not copied
        # frozen, the objects (the records) are out of the collector's reach: a worker's collections would write to
        # every one of them, copying all the pages that hold them into each worker (the records' size per process)
        thawed = gc.get_freeze_count() == 0  # a caller's own frozen objects stay frozen
        gc.freeze()
        try:  # a worker that dies (out of memory) breaks the executor: an error, where a Pool waited forever
            parent = os.getpid()  # the workers' parent, checked by each (_die_with_parent)
            with ProcessPoolExecutor(num_proc, mp.get_context(method), _init_pool_worker, (parent, *init)) as pool:
                try:
                    if any(enough(part, r) for part, r in zip(pool.map(_encode_range, ranges), ranges, strict=True)):
                        pool.shutdown(cancel_futures=True)  # the ranges not started yet never are
                except BaseException:  # a Ctrl-C or a stop signal's exception: the pool's exit would encode every
                    pool.shutdown(cancel_futures=True)  # range left; the ranges running now finish, no other starts
                    raise
        except BrokenProcessPool:
            raise DataError([f"{records[0].source}:0: a tokenization process died (killed for lack of memory?) while "
                             f"{num_proc} processes encoded {len(records)} records: give the job more memory, or "
                             "fewer cores (one process per core)"]) from None
        finally:
            if thawed:
                gc.unfreeze()
    problems = [p for part in parts for p in part.problems]
    if problems:
        done = ranges[len(parts) - 1][1]  # ranges are encoded in order: the first `done` records were
        more = None if done == len(records) else f"... {len(problems)} problems in the first {done} of {len(records)} " \
            f"records; the others were not encoded (encoding stops after {MAX_SHOWN} problems)"
        raise DataError([f"{records[i].source}:{records[i].line}: {msg}" for i, msg in problems], more)
    index, lengths = (np.concatenate([getattr(part, k) for part in parts]) for k in ("index", "lengths"))
    flat, labels = np.empty(int(lengths.sum()), dtype=np.int32), np.empty(int(lengths.sum()), dtype=np.int32)
    at, part = 0, None
    for i, part in enumerate(parts):  # each part's tokens copied in and dropped: held once, not twice (concatenate)
        n = len(part.input_ids)
        flat[at:at + n], labels[at:at + n] = part.input_ids, part.labels
        parts[i], at = part._replace(input_ids=None, labels=None), at + n
    del part
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    special, example = special_text(records, tokenizer)
    chat = settings.template == "chat"
    stats = EncodeStats(records=len(records), kept=len(index), dropped=len(records) - len(index),
                        truncated=sum(part.truncated for part in parts), spliced=sum(part.spliced for part in parts),
                        prompted=sum(r.type != "pretrain" for r in records), special_text=special,
                        special_example=example,
                        default_in_chat=sum(r.type in DEFAULT_IN_CHAT for r in records) if chat else 0)
    return EncodedDataset(flat, labels, offsets, index, stats)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's serialized state: vocabulary, merges, normalizer, special-token conventions."""
    state = {
        "class": type(tokenizer).__name__,
        "backend": backend_spec(tokenizer),  # without truncation / padding: encoding turns them off
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "split_special": getattr(tokenizer.backend_tokenizer, "encode_special_tokens", None),  # not in to_str()
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return json.dumps(state, sort_keys=True, default=str)


def _package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return " ".join(f"{name} {of(name)}" for name in KEYED_PACKAGES)


def cache_key(digests: Sequence[tuple[Path, bytes]], tokenizer: Any, max_seq_len: int, settings: TemplateSettings) -> str:
    """sha256 over the data files' names and content digests (file_digests), tokenizer state, template settings,
    max_seq_len, CACHE_VERSION and the versions of KEYED_PACKAGES (a file's name: its suffix picks the parser, and a
    cache hit skips validating the records)."""
    h = hashlib.sha256()
    for part in (CACHE_VERSION, tokenizer_fingerprint(tokenizer), json.dumps(template_state(settings)),
                 str(max_seq_len), _package_versions()):
        h.update(part.encode())
        h.update(b"\0")
    for f, digest in digests:
        h.update(Path(f).name.encode() + b"\0" + digest)
    return h.hexdigest()


def cache_file(digests: Sequence[tuple[Path, bytes]], tokenizer: Any, max_seq_len: int, cache_dir: str | Path | None,
               settings: TemplateSettings = DEFAULT_SETTINGS, fallback_dir: str | Path | None = None) -> Path:
    """Where the encoding of the files of `digests` (file_digests' (path, sha256)) is cached: `cache_dir` /
    encoded-KEY.npys; without `cache_dir`, `.cache` beside the first file, or `fallback_dir` (a training run's
    save_path / RUN_CACHE_DIR) when it holds this cache (written there because `.cache`'s could not be: not
    writable, or damaged and not deletable; the same key, the same content) or `.cache` cannot be written and does not.
    It exists only if these bytes were valid records when it was written. The one place that decides: validation,
    loading and data.inspect all ask it."""
    name = f"encoded-{cache_key(digests, tokenizer, max_seq_len, settings)[:32]}{CACHE_SUFFIX}"
    if cache_dir is not None:
        return Path(cache_dir) / name
    default = _default_cache_dir(digests) / name
    if fallback_dir is None:
        return default
    fallback = Path(fallback_dir) / name
    return fallback if fallback.is_file() or not (default.is_file() or _writable(default.parent)) else default


def _default_cache_dir(files: Sequence[tuple[Path, bytes]]) -> Path:
    """`.cache` beside the first of `files` ((path, bytes or digest) pairs)."""
    return files[0][0].parent / ".cache"


def _writable(d: Path) -> bool:
    """Whether files can be made in directory `d`, or (missing) in the directory that would hold it."""
    at = d if d.exists() else d.parent
    return at.is_dir() and os.access(at, os.W_OK | os.X_OK)  # False on a read-only mount too (EROFS)


def valid_records(files: Sequence[tuple[Path, bytes]], settings: TemplateSettings = DEFAULT_SETTINGS,
                  tokenizer: Any = None) -> list[Record]:
    """Parse and validate every record of `files` (read_files' (path, bytes)) for `settings`: the records' own checks
    and, in chat mode, what no chat template renders and the roles the `tokenizer`'s template rejects
    (data.chat.chat_problems). One DataError lists every problem."""
    records = records_from_files(files)
    if settings.template == "chat" and (problems := chat_problems(records, tokenizer)):
        raise DataError(problems)
    return records


def load_dataset(data_path: str | Path | Sequence[str | Path], tokenizer: Any, max_seq_len: int,
                 cache_dir: str | Path | None = None, settings: TemplateSettings = DEFAULT_SETTINGS,
                 num_proc: int | None = None, use_cache: bool = True, fallback_cache_dir: str | Path | None = None,
                 validated: list | None = None) -> EncodedDataset:
    """Read, validate (all records, DataError on any problem) and encode `data_path`, using the disk cache.

    The cache lives in `cache_dir` (default: `.cache` beside the first data file, or `fallback_cache_dir` when that
    cannot be written: `cache_file`) under a key that covers the data bytes, the tokenizer (chat template included),
    the templates and `settings`, `max_seq_len` and the code version. Training config keys map to `settings`
    (`TrainConfig.template_settings`). `stats.cache_status` says whether the cache was hit, written or not written.
    `validated`: [`data_path`'s files (read_files' (path, bytes)), their `valid_records(files, settings)`], as the
    caller already read and checked them: used as they are, not read or parsed again, and taken out of the list (a
    caller's reference to the list, even the call's own argument, would keep the files' bytes while encoding).
    """
    files, records = validated if validated is not None else (None, None)
    if validated is not None:
        validated.clear()  # the files and records are held here alone, and dropped once used
    # a cache hit reads no file whole (hashed in chunks): every reading rank of a node loads at once
    digests = (digests_of(files) if files is not None else file_digests(data_path)) if use_cache else None
    if appended := appended_ids(tokenizer):
        log.warning("the tokenizer appends %s to every text it encodes (add_eos_token): the training texts end with "
                    "the template's EOS only and prompts end without one; a serving stack that calls the tokenizer "
                    "on a prompt appends it (prompt with add_special_tokens=False and the BOS by hand)",
                    " ".join(tokenizer.convert_ids_to_tokens(appended)))
    path = None
    if use_cache:
        path = cache_file(digests, tokenizer, max_seq_len, cache_dir, settings, fallback_cache_dir)
        beside = _default_cache_dir(digests) / path.name  # a damaged copy under save_path: this one may be intact
        for at in dict.fromkeys([path, *([beside] if cache_dir is None else [])]):
            if at.is_file() and (ds := _read_cache(at)) is not None:
                return ds
        path = cache_file(digests, tokenizer, max_seq_len, cache_dir, settings, fallback_cache_dir)  # (one deleted)
    if records is None:
        files = read_files(data_path)
        if use_cache and digests_of(files) != digests:  # a file changed since it was hashed: the key of what is encoded
            digests = digests_of(files)
            path = cache_file(digests, tokenizer, max_seq_len, cache_dir, settings, fallback_cache_dir)
        records = valid_records(files, settings, tokenizer)
    del files  # the records hold what they need: the bytes are not kept while encoding
    ds = encode_records(records, tokenizer, max_seq_len, settings, num_proc)
    del records  # not held while the cache is written
    if path is not None:
        default = _default_cache_dir(digests) if cache_dir is None else None
        _store(ds, path, default, None if fallback_cache_dir is None else Path(fallback_cache_dir))
    _log(ds.stats)
    return ds


def _read_cache(path: Path) -> EncodedDataset | None:
    """The cache at `path`, or None (with a warning, the file deleted where it can be) when it is damaged."""
    try:
        ds = load_dataset_file(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # written whole (os.replace): damaged since
        log.warning("the data cache %s cannot be read (%s): not used", path, e)
        with contextlib.suppress(OSError):  # _publish writes no name that is taken
            path.unlink()
        return None
    remove_stale_temps(path.parent)
    _log(ds.stats)
    return ds


def _store(ds: EncodedDataset, path: Path, default: Path | None, fallback: Path | None) -> None:
    """Write the cache at `path`, or where `default` (`.cache` beside the data) could not take it, in `fallback`;
    ds.stats say where, or why it was not written. One warning line when it is not in `default`."""
    tries = [path, *([fallback / path.name] if default is not None and fallback is not None and path.parent == default
                     else [])]
    why = f"{default} cannot be written" if default is not None and path.parent != default else ""
    for at in tries:
        try:
            save_dataset(ds, at)
        except OSError as e:
            from models.diskspace import is_no_space, no_space_message

            nbytes = ds.input_ids.nbytes + ds.labels.nbytes + ds.offsets.nbytes + ds.record_index.nbytes
            why = no_space_message(f"data cache {at}", at.parent, nbytes) if is_no_space(e, at.parent) else \
                f"could not write the data cache {at}: {e}"
            continue
        if why:
            log.warning("data: %s; the data cache is written to %s instead (set data_cache_dir to choose where)", why,
                        at.parent)
        ds.stats = replace(ds.stats, cache_path=str(at))
        return
    log.warning("%s; continuing without the cache (the next start tokenizes again: set data_cache_dir to a writable "
                "directory)", why)
    ds.stats = replace(ds.stats, cache_problem=why)


def _log(s: EncodeStats) -> None:
    if s.default_in_chat:
        log.warning("data: %d %s record(s) are rendered with the default template (\"### Human:\" turns), not the "
                    "tokenizer's chat template: chat templates do not render their tool turns alike; the model learns "
                    "both formats", s.default_in_chat, " / ".join(DEFAULT_IN_CHAT))
    log.info("data: %d records -> %d samples kept, %d dropped (no trained token within max_seq_len), "
             "%d truncated, %d split at a prompt / answer boundary; cache %s%s", s.records, s.kept, s.dropped,
             s.truncated, s.spliced, s.cache_status, f" ({s.cache_path})" if s.cache_path else "")
