"""Streaming access to HF checkpoints: tensors are read one at a time, never the whole model.

safetensors files are read with plain seek/read from the header offsets (no mmap, so resident
memory is only what was read); `pytorch_model*.bin` is a fallback loaded with torch's mmap.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeft import one_line

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
# transformers 5 saves a tokenizer's named chat templates (all but "default") as additional_chat_templates/NAME.jinja
TOKENIZER_DIRS = ("additional_chat_templates",)
# a licence its redistributors must pass on (Llama's asks for its agreement), carried into every output; not the
# README.md (the base's model card, and a file of the user's in a training save_path, which takes the side files)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md", "NOTICE")
# data_settings.json: how training rendered its records (data.settings.DATA_SETTINGS_FILE), read by demo.py
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "data_settings.json", *LICENSE_FILES)
LAYER_FILE = "layer_{:02d}-model_states.pt"  # a pipeline dir's (or checkpoint's) file of one layer, by its index
LAYER_GLOB = LAYER_FILE.replace("{:02d}", "*")  # every layer file
HF_SOURCE_FILE = "hf_source.json"  # in a pipeline dir: the HF model (dir or Hub id) hg_to_pp converted it from
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers' order (modeling_utils' checkpoint-file resolution): what from_pretrained loads is what is converted
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A bad checkpoint or target directory; the message is one line naming the file and the problem."""


def no_dir_error(path: Path) -> CheckpointError:
    """The one line for a path that should be a directory and is not; one that a conversion with --overwrite,
    interrupted between its two renames, had moved aside says where it is."""
    if path.exists():
        return CheckpointError(f"{path}: a file, not a directory")
    aside = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")) if path.name else []
    return CheckpointError(f"{path}: no such directory" + (
        f" ({aside[0]} holds it as it was before an interrupted --overwrite: the next conversion into {path.name} "
        "puts it back, or rename it yourself)" if aside else ""))


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's go on for lines of advice)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]


def load_tokenizer(path: Path, purpose: str = ""):
    """transformers' tokenizer of dir `path`; CheckpointError with one line (`purpose`: what it is loaded for) when
    it has no tokenizer file or transformers cannot load it."""
    from transformers import AutoTokenizer

    why = f" {purpose}" if purpose else ""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (none of tokenizer.json, tokenizer.model, "
                              f"tokenizer_config.json, vocab.json); cannot load a tokenizer{why}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for a bad tokenizer dir
        raise CheckpointError(f"{path}: cannot load a tokenizer{why} ({one_line(e, named=True)})") from None


GONE = ("no longer there: removed while it was being read (a running run's keep_last rotation deletes older "
        "checkpoints; export one it keeps, or a copy)")
REPLACED = ("replaced while it was being read (a run resumed from an earlier step saved this checkpoint again): run "
            "this again to read the new one whole")


def unreadable(path: Path, e: OSError) -> CheckpointError:
    """The CheckpointError for an input file that cannot be read at all: gone (it was listed: removed while being
    read), not readable by this user (a model directory another user downloaded with a private umask), an I/O
    error; not a damaged file."""
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{path}: {GONE}")
    why = e.strerror or _first_line(e)
    hint = "; check its permissions" if isinstance(e, PermissionError) else ""
    return CheckpointError(f"{path}: cannot be read ({why}){hint}")


def open_input(path: Path):
    """`path` opened for reading in binary; CheckpointError (`unreadable`) when it cannot be."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise unreadable(path, e) from None


def read_json(path: Path):
    """A JSON file's value; CheckpointError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # (UnicodeDecodeError: read_text's, before json's)
        raise CheckpointError(f"{path}: invalid JSON ({_first_line(e)})") from None
    except OSError as e:
        raise unreadable(Path(path), e) from None


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_not_lfs_pointer(path: Path) -> None:
    """A CheckpointError if `path` is a Git LFS pointer (a clone made without git-lfs): a small text file in place of
    the weights, which would otherwise read as a corrupt checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError:
        return  # the reader reports it
    if head == LFS_POINTER:
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (the repository was cloned without "
                              "git-lfs): run `git lfs pull` in it, or download it with `hf download`")


def load_torch_file(path: Path) -> dict:
    """A `torch.save`d state dict (weights only; memory-mapped, but for torch's legacy pre-1.6 format, which cannot
    be); a truncated or corrupt file is a CheckpointError naming it, never torch's traceback."""
    check_not_lfs_pointer(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise unreadable(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):  # a whole object pickled, not tensors
            raise CheckpointError(f"{path}: holds non-tensor objects ({found[1]}), which torch.load(weights_only=True) "
                                  "refuses to unpickle; save a state dict of tensors only") from None
        raise CheckpointError(f"{path}: unreadable, the file is corrupt or truncated ({_first_line(e)})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def read_index(path: Path) -> dict[str, Path]:
    """An HF checkpoint index (`*.index.json`): {tensor name: the file that holds it}."""
    body = read_json(path)
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: no \"weight_map\" object (tensor name -> file name); not a checkpoint index")
    return {k: path.parent / v for k, v in weight_map.items()}


def resolve_hf_dir(path: str | Path) -> Path:
    """An HF model dir: `path` itself when it exists (a local path always wins), else, when it reads as a Hub id
    (`org/name`), its snapshot in the local Hugging Face cache (HF_HUB_CACHE; nothing is downloaded)."""
    p = Path(path)
    if p.exists():
        return p
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(path))
    except HFValidationError:
        return p  # a path, not a Hub id: the caller reports it missing
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except OSError:  # LocalEntryNotFoundError: not cached, or only in part
        raise CheckpointError(f"{path}: no such directory, and not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                              f"(download it with `hf download {path}`)") from None


ST_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors_header(path: Path) -> dict:
    """The tensors' header of a safetensors file, validated against the file's size before anything is read:
    a corrupt length field or offsets past the end are a CheckpointError, never a huge allocation."""
    check_not_lfs_pointer(path)
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (its header length field says {n} bytes, "
                                  f"the file has {size}); the file is corrupt or truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            want = count * ST_ITEM_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a valid safetensors file (bad header entry for {key})") from None
        if not 0 <= begin <= end <= data_bytes or (info["dtype"] in ST_ITEM_BYTES and end - begin != want):
            raise CheckpointError(f"{path}: tensor {key}: its offsets [{begin}, {end}) do not fit the file ({data_bytes} "
                                  f"data bytes) or its shape {info['shape']} ({info['dtype']}); the file is corrupt or "
                                  "truncated")
        info["start"] = 8 + n + begin
    return header


def pipeline_dir_problem(directory: Path) -> str | None:
    """The line for a pipeline dir, a run's save_path or one of its checkpoints given where an HF model belongs."""
    if (directory / LAYER_FILE.format(0)).is_file() or (directory / "latest").is_file():
        return f"{directory}: a pipeline dir (layer files), not an HF model: use pp_to_hg to convert it"
    return None


class HFCheckpoint:
    """The tensors of an HF model directory, by key, read lazily."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise no_dir_error(self.dir)
        self._file_of: dict[str, Path] = {}
        self._headers: dict[Path, dict] = {}
        self._bin: tuple[Path, dict] | None = None
        self._index: Path | None = None  # the index file that named each tensor's file, if any
        # the first of WEIGHT_FILES there, an index only when its files all are: a partial download (`--include
        # "*.json" "*.bin"`) may hold the safetensors index without its shards beside a complete .bin checkpoint
        incomplete: str | None = None
        for f in (self.dir / n for n in WEIGHT_FILES):
            if not f.is_file():
                continue
            if f.name not in INDEX_FILES:
                self._file_of = dict.fromkeys(self._keys_of(f), f)
                break
            file_of = read_index(f)
            missing = sorted({s for s in file_of.values() if not s.is_file()})
            if not missing:
                self._file_of, self._index = file_of, f
                break
            incomplete = incomplete or f"{missing[0]}: named in {f.name} but missing"
        else:
            raise CheckpointError(incomplete or self._no_weights())

    def _no_weights(self) -> str:
        """Why the dir has no weights to convert, in one line."""
        if problem := pipeline_dir_problem(self.dir):
            return problem
        for shards, index in (("model-*.safetensors", INDEX_FILES[0]), ("pytorch_model-*.bin", INDEX_FILES[1])):
            if found := sorted(self.dir.glob(shards)):
                return (f"{self.dir / index}: missing (it names the tensors of each shard, {found[0].name} ...); "
                        "download it with the shards")
        return f"{self.dir}: no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model*.bin)"

    def _keys_of(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._header(path))
        return list(self._load_bin(path))

    def _header(self, path: Path) -> dict:
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path)
        return self._headers[path]

    def _load_bin(self, path: Path) -> dict:
        if self._bin is None or self._bin[0] != path:  # hold one .bin shard's mapping at a time
            self._bin = (path, load_torch_file(path))
        return self._bin[1]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> Path:
        """The file that holds tensor `key`."""
        return self._file_of[key]

    def _entry(self, key: str):
        """(file, its header entry for `key` | the .bin's tensor); CheckpointError when the file lacks the tensor its
        index names."""
        path = self._file_of[key]
        entries = self._header(path) if path.suffix == ".safetensors" else self._load_bin(path)
        if key not in entries:
            raise CheckpointError(f"{path}: has no tensor {key} (named in {self._index})")
        return path, entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape without reading its data."""
        path, entry = self._entry(key)
        return tuple(entry["shape"] if path.suffix == ".safetensors" else entry.shape)

    def nbytes(self, keys: Iterable[str] | None = None, cast: torch.dtype | None = None) -> int:
        """Bytes of the tensors `keys` (default: all), the floating ones as `cast` when given (what a conversion
        writes, about)."""
        total = 0
        for key in sorted(self._file_of if keys is None else keys, key=lambda k: str(self._file_of[k])):  # file by file
            path, entry = self._entry(key)
            if path.suffix == ".safetensors":
                size, dtype = entry["data_offsets"][1] - entry["data_offsets"][0], ST_DTYPES.get(entry["dtype"])
            else:
                size, dtype = entry.numel() * entry.element_size(), entry.dtype
            if cast is not None and dtype is not None and dtype.is_floating_point:
                size = size // dtype.itemsize * cast.itemsize
            total += size
        return total

    def get(self, key: str) -> torch.Tensor:
        path, info = self._entry(key)
        if path.suffix != ".safetensors":
            return info.clone()
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open_input(path) as f:
            f.seek(info["start"])
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: truncated while reading {key}")
        if not buf:
            return torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
        return torch.frombuffer(buf, dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the file mode the umask gives (save_file creates it private, 0600)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class ShardWriter:
    """Write tensors as `model-0000k-of-0000n.safetensors` + index (or one `model.safetensors`)."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir, self.max = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        save_safetensors(self.pending, self.dir / f"shard-{len(self.shards)}.tmp")
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Name the shards now that their number is known; returns the number of shards."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.dir / "shard-0.tmp", self.dir / "model.safetensors")
            return 1
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i}.tmp", self.dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def _copy_content(src: Path, dst: Path) -> None:
    """Copy a file, or a directory tree, by content: the copies get the modes the umask gives, not the source's (a
    read-only or private source file would make the output so too)."""
    if src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _copy_content(child, dst / child.name)
    else:
        shutil.copyfile(src, dst)


def copy_side_files(src: Path, dst: Path, names=(*SIDE_FILES, *TOKENIZER_DIRS),
                    transform: dict[str, Callable[[str], str]] | None = None) -> list[str]:
    """Copy config / generation config / tokenizer files (and directories, whole) that exist in `src`, by content
    (modes from the umask); returns what was copied."""
    copied = []
    for name in names:
        if not ((src / name).is_file() or (src / name).is_dir()):
            continue
        _check_readable(src / name)  # (a copy's error may be the output's: a full disk, which atomic_output_dir says)
        if transform and name in transform and (src / name).is_file():
            (dst / name).write_text(transform[name]((src / name).read_text(encoding="utf-8")), encoding="utf-8")
        else:
            _copy_content(src / name, dst / name)
        copied.append(name)
    return copied


def _check_readable(path: Path) -> None:
    """CheckpointError (`unreadable`) when `path`, a file or every file under a directory, cannot be opened."""
    def fail(e: OSError) -> None:
        raise e

    try:
        files = [path] if path.is_file() else [Path(d) / n for d, _, names in os.walk(path, onerror=fail) for n in names]
        for f in files:
            with open(f, "rb"):
                pass
    except OSError as e:
        raise unreadable(Path(e.filename or path), e) from None


def replace_side_files(src: Path, dst: Path, names=(*SIDE_FILES, *TOKENIZER_DIRS), kept=(),
                       say: Callable[[str], None] | None = None) -> list[str]:
    """Make `dst`'s side files `src`'s: each of `src`'s copied into the existing `dst` and put in place by a rename
    (a reader never sees half of one; a directory replaces the old one whole), and those of `names` that `src` lacks
    removed from `dst` (an earlier model's chat template, tokenizer.model or licence would go into every export of
    this one), except `kept`; `say` is told what was removed. What a process killed while copying left is removed
    first. Returns the names copied."""
    for old in dst.glob(".side-files.*"):
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".side-files.", dir=dst))
    try:
        copied = copy_side_files(src, staging, names)
        for name in copied:
            if (dst / name).is_dir() and not (dst / name).is_symlink():
                os.replace(dst / name, staging / f"{name}.old")  # a rename does not replace a non-empty directory
            os.replace(staging / name, dst / name)
        stale = [n for n in names if n not in copied and n not in kept and os.path.lexists(dst / n)]
        for name in stale:
            os.replace(dst / name, staging / f"{name}.old")
        if stale and say is not None:
            say(f"removed {', '.join(stale)} from {dst}: left by an earlier model, {src} has none")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return copied


def hf_source_of(pipeline_dir: str | Path) -> str | None:
    """The HF model a pipeline dir was converted from (HF_SOURCE_FILE): a Hub id, or a local dir that still holds
    a config.json; None when unknown (an `init` model, an older conversion) or gone."""
    f = Path(pipeline_dir) / HF_SOURCE_FILE
    if not f.is_file():
        return None
    body = read_json(f)
    src = body.get("hf_model") if isinstance(body, dict) else None
    if not isinstance(src, str):
        raise CheckpointError(f"{f}: no \"hf_model\" string")
    return src if not Path(src).is_absolute() or (Path(src) / "config.json").is_file() else None
