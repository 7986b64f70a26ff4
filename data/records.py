"""Read and validate training records from .json (array) and .jsonl files.

Every record is checked before anything is tokenized; all problems are collected and raised
together as one `DataError` whose lines read `FILE:LINE: problem`.

Adding a record type (e.g. `conversation`, `ref_qa`) means one `RecordType` entry in
`RECORD_TYPES` here and one renderer in `data.templates.RENDERERS`.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SHOWN = 20  # problems listed in a DataError message
TOO_DEEP = "malformed JSON: nested too deeply"


class DataError(ValueError):
    """Bad input data: `problems` holds every `FILE:LINE: problem` line found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = self.problems[:MAX_SHOWN]
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Record:
    """One validated record: its type, its raw fields (as in the file) and where it came from."""

    type: str
    data: dict[str, Any]
    source: str
    line: int


@dataclass(frozen=True)
class RecordType:
    """How to recognise and check one record type.

    `infer_key`: a record without "type" that has this key is of this type.
    `validate`: returns the problems of a record (its "type" key already removed), [] if valid.
    """

    infer_key: str
    validate: Callable[[Mapping[str, Any]], list[str]]


def _check_fields(rec: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """Problems with a flat record whose fields are all strings; required ones must be non-empty."""
    allowed = ", ".join(["type", *required, *optional])
    problems = [f"unknown key {k!r} (allowed: {allowed})" for k in rec if k not in required and k not in optional]
    for name in [*required, *optional]:
        if name not in rec:
            if name in required:
                problems.append(f"missing field {name!r}")
        elif not isinstance(rec[name], str):
            problems.append(f"field {name!r} must be a string, got {type(rec[name]).__name__}")
        elif name in required and not rec[name].strip():
            problems.append(f"field {name!r} is empty")
    return problems


RECORD_TYPES: dict[str, RecordType] = {
    "pretrain": RecordType("text", lambda r: _check_fields(r, ["text"])),
    "instruct": RecordType("instruct", lambda r: _check_fields(r, ["instruct", "output"], ["input"])),
}


def record_type(rec: Mapping[str, Any]) -> str:
    """The record's type: its "type" key, else inferred from the keys it has (raises ValueError)."""
    if "type" in rec:
        kind = rec["type"]
        if not isinstance(kind, str) or kind not in RECORD_TYPES:
            raise ValueError(f"unknown type {kind!r} (known: {', '.join(RECORD_TYPES)})")
        return kind
    for kind, spec in RECORD_TYPES.items():
        if spec.infer_key in rec:
            return kind
    keys = ", ".join(f"{s.infer_key!r} ({k})" for k, s in RECORD_TYPES.items())
    raise ValueError(f"cannot tell the record type: no \"type\" key and none of the keys {keys}")


def _record_problems(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return [f"record must be a JSON object, got {type(obj).__name__}"]
    try:
        kind = record_type(obj)
    except ValueError as e:
        return [str(e)]
    return RECORD_TYPES[kind].validate({k: v for k, v in obj.items() if k != "type"})


def resolve_files(data_path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand `data_path` (file, directory, glob, or a list of them) into existing files, in order.

    A directory stands for its *.json and *.jsonl files. Raises DataError for paths matching nothing.
    """
    items = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
    files: dict[Path, None] = {}  # ordered, without duplicates
    problems: list[str] = []
    for item in items:
        p, found, what = Path(item), [], "file not found"
        if not str(item):
            what = "empty path"
        elif p.is_dir():
            found, what = sorted([*p.glob("*.json"), *p.glob("*.jsonl")]), "directory has no .json or .jsonl files"
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(item)):
            found = sorted(Path(f) for f in glob.glob(str(item), recursive=True) if Path(f).is_file())
            what = "no file matches this pattern"
        if not found:
            problems.append(f"{item}:0: {what}")
        files.update(dict.fromkeys(found))
    if not items:
        problems.append("data_path:0: no data files given")
    if problems:
        raise DataError(problems)
    return list(files)


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_jsonl(text: str) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    items, errors = [], []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append((lineno, f"malformed JSON: {e.msg} (column {e.colno})"))
        except RecursionError:
            errors.append((lineno, TOO_DEEP))
    return items, errors


def _parse_json_array(text: str) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """Decode a top-level JSON array element by element, remembering the line each element starts at."""
    decoder = json.JSONDecoder()
    items: list[tuple[int, Any]] = []

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(0)
    if pos == len(text):
        return [], []
    if text[pos] != "[":
        return [], [(_line_at(text, pos), "a .json file must hold a JSON array of records (use .jsonl for one "
                     "record per line)")]
    pos, line, line_pos = skip_ws(pos + 1), 1, 0
    expect_item = True
    while True:
        if pos == len(text):
            return items, [(_line_at(text, pos), "malformed JSON: unterminated array")]
        if text[pos] == "]" and (not items or not expect_item):
            break
        if not expect_item:
            if text[pos] != ",":
                return items, [(_line_at(text, pos), "malformed JSON: expected ',' or ']' between records")]
            pos, expect_item = skip_ws(pos + 1), True
            continue
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return items, [(e.lineno, f"malformed JSON: {e.msg} (column {e.colno})")]
        except RecursionError:
            return items, [(line, TOO_DEEP)]
        items.append((line, obj))
        pos, expect_item = skip_ws(pos), False
    end = skip_ws(pos + 1)
    if end != len(text):
        return items, [(_line_at(text, end), "malformed JSON: extra data after the array")]
    return items, []


def parse_records(path: Path, raw: bytes) -> tuple[list[Record], list[str]]:
    """Parse and validate one file's bytes: (valid records, problem lines)."""
    if path.suffix not in (".json", ".jsonl"):
        return [], [f"{path}:0: unsupported file type {path.suffix!r} (use .json or .jsonl)"]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return [], [f"{path}:{line}: not valid UTF-8 (byte offset {e.start})"]
    items, errors = (_parse_jsonl if path.suffix == ".jsonl" else _parse_json_array)(text)
    if not items and not errors:
        errors.append((1, "empty file (no records)"))
    records = []
    for line, obj in items:
        found = _record_problems(obj)
        errors += [(line, p) for p in found]
        if not found:
            records.append(Record(record_type(obj), obj, str(path), line))
    return records, [f"{path}:{line}: {msg}" for line, msg in sorted(errors, key=lambda e: e[0])]


def read_files(data_path: str | Path | Sequence[str | Path]) -> list[tuple[Path, bytes]]:
    """Resolve `data_path` and read every file's bytes (raises DataError for unreadable paths)."""
    out, problems = [], []
    for f in resolve_files(data_path):
        try:
            out.append((f, f.read_bytes()))
        except OSError as e:
            problems.append(f"{f}:0: cannot read file: {e.strerror}")
    if problems:
        raise DataError(problems)
    return out


def records_from_files(files: Sequence[tuple[Path, bytes]]) -> list[Record]:
    """Parse and validate every file; raise one DataError listing all problems, or return all records."""
    records: list[Record] = []
    problems: list[str] = []
    for path, raw in files:
        recs, probs = parse_records(path, raw)
        records += recs
        problems += probs
    if problems:
        raise DataError(problems)
    return records


def load_records(data_path: str | Path | Sequence[str | Path]) -> list[Record]:
    """Read, parse and validate all records of `data_path` (raises DataError)."""
    return records_from_files(read_files(data_path))
