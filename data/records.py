"""Read and validate training records from .json (array), .jsonl, .csv, .parquet and .arrow files.

Every record is checked before anything is tokenized; all problems are collected and raised
together as one `DataError` whose lines read `FILE:LINE: problem`.

Adding a record type means one `RecordType` entry in `RECORD_TYPES` here, one prompt in
`data.templates.PROMPTS`, one renderer in `data.templates.RENDERERS` and, for chat-template mode,
one entry in `data.templates.CHAT_MESSAGES`. Adding a file format means one parser in `data.parsers.PARSERS`
(tabular formats, one row per record: `data.tabular`).

A record's JSON text may be at most MAX_RECORD_BYTES: longer records are refused (a sample is at
most `max_seq_len` tokens, so such a record would be tokenized only to be truncated). A table row
counts as the JSON text of its record.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.parsers import MAX_RECORD_BYTES, PARSERS  # noqa: F401 (MAX_RECORD_BYTES: part of this module's interface)
from data.tabular import absent
from pipeft import DuplicateKey, unique_keys

MAX_SHOWN = 20  # problems listed in a DataError message


class DataError(ValueError):
    """Bad input data: `problems` holds every `FILE:LINE: problem` line found; `more`, when given, is the message's
    last line in place of '... and N more problems' (the search stopped: how many there are is not known)."""

    def __init__(self, problems: Sequence[str], more: str | None = None):
        self.problems, self.more = list(problems), more
        lines = self.problems[:MAX_SHOWN]
        if more is not None:
            lines.append(more)
        elif len(self.problems) > MAX_SHOWN:
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

    `infer_key`: a record without "type" that has this key is of this type (types are tried in
    `RECORD_TYPES` order). `validate`: the problems of a record (its "type" key removed), [] if valid.
    """

    infer_key: str
    validate: Callable[[Mapping[str, Any]], list[str]]


FieldCheck = Callable[[str, Any], list[str]]  # (field name, value) -> problems


def json_type(value: Any) -> str:
    """A value's type as a problem line names it: JSON's null, NaN and Infinity (Python's json reads them) by those
    names, else the Python type's (int, float, list, dict, ...)."""
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity"
    return type(value).__name__


def string_problem(what: str, value: Any, allow_empty: bool = False) -> str | None:
    """Why `value` is not a usable text (a string, valid Unicode, non-blank unless `allow_empty`), else None."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {json_type(value)}"
    if not allow_empty and not value.strip():
        return f"{what} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a \ud800-style escape
        return f"{what} holds an invalid character ({value[e.start]!r} at position {e.start})"
    return None


def _text(name: str, value: Any) -> list[str]:
    """A non-empty string."""
    problem = string_problem(f"field {name!r}", value)
    return [problem] if problem else []


def _maybe_empty_text(name: str, value: Any) -> list[str]:
    problem = string_problem(f"field {name!r}", value, allow_empty=True)
    return [problem] if problem else []


def _rounds(name: str, value: Any, api: bool = False) -> list[str]:
    """[[role, text], ...]: roles in ROLES (with `api` also "ans-api", then an object: `_api_turn`), texts
    non-empty, at least one turn, the last one an answer."""
    if not isinstance(value, list):
        return [f"field {name!r} must be a list of [role, text] pairs, got {json_type(value)}"]
    if not value:
        return [f"field {name!r} is empty"]
    problems = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, list) or len(turn) != 2:
            problems.append(f"{where} must be a [role, text] pair, got {json.dumps(turn, ensure_ascii=False, default=str)[:60]}")
            continue
        role, text = turn
        roles = (*ROLES, "ans-api") if api else ROLES
        if role not in roles:
            problems.append(f"{where}: unknown role {role!r} (allowed: {', '.join(map(repr, roles))})")
        elif role == "ans-api":
            problems += _api_turn(where, text)
        elif problem := string_problem(f"{where}: text", text):
            problems.append(problem)
    if not problems and value[-1][0] not in ("ans", "ans-api"):
        has_answer = any(role in ("ans", "ans-api") for role, _ in value)
        problems.append(f"{name} end with an 'ask' turn: a sample must end with an 'ans' turn"
                        if has_answer else f"{name} has no 'ans' turn: nothing to train on")
    return problems


API_ACTION_KEYS = ("inner_thought", "api_name", "api_param", "api_res")


def api_params(value: Any) -> dict[str, Any]:
    """An action's api_param as a dict: an object, or a string holding a JSON object (ValueError otherwise)."""
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(f"api_param must be an object or a string holding a JSON object ({e.msg})") from None
        except DuplicateKey as e:
            raise ValueError(f"api_param: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"api_param must be an object or a string holding a JSON object, got {json_type(value)}")
    return value


def _api_turn(where: str, turn: Any) -> list[str]:
    """gdGPT's "ans-api" turn: {"actions": [{inner_thought, api_name, api_param, api_res}, ...], "ans": text}."""
    if not isinstance(turn, dict):
        return [f"{where}: an 'ans-api' turn must be an object {{\"actions\": [...], \"ans\": text}}, got "
                f"{json_type(turn)}"]
    problems = [f"{where}: unknown key {k!r} (allowed: actions, ans)" for k in turn if k not in ("actions", "ans")]
    if "ans" in turn:
        problems += [p for p in [string_problem(f"{where}.ans", turn["ans"])] if p]
    else:
        problems.append(f"{where}: missing field 'ans' (the answer after the api calls)")
    actions = turn.get("actions")
    if not isinstance(actions, list):
        return [*problems, f"{where}.actions must be a list of api calls, got {json_type(actions)}"]
    for j, act in enumerate(actions):
        at = f"{where}.actions[{j}]"
        if not isinstance(act, dict):
            problems.append(f"{at} must be an object with {', '.join(API_ACTION_KEYS)}")
            continue
        problems += [f"{at}: unknown key {k!r} (allowed: {', '.join(API_ACTION_KEYS)})" for k in act
                     if k not in API_ACTION_KEYS]
        problems += [f"{at}: missing field {k!r}" for k in API_ACTION_KEYS if k not in act]
        problems += [p for p in (string_problem(f"{at}.inner_thought", act.get("inner_thought", ""), True),
                                 string_problem(f"{at}.api_name", act.get("api_name", "-"))) if p]
        try:
            api_params(act.get("api_param", {}))
        except ValueError as e:
            problems.append(f"{at}: {e}")
    return problems


def _fields(required: Mapping[str, FieldCheck], optional: Mapping[str, FieldCheck] | None = None
            ) -> Callable[[Mapping[str, Any]], list[str]]:
    """A validator for records with exactly these fields (required ones present), each checked by its check."""
    optional = optional or {}

    def validate(rec: Mapping[str, Any]) -> list[str]:
        allowed = ", ".join(["type", *required, *optional])
        problems = [f"unknown key {k!r} (allowed: {allowed})" for k in rec if k not in required and k not in optional]
        problems += [f"missing field {k!r}" for k in required if k not in rec]
        for name, check in {**required, **optional}.items():
            if name in rec:
                problems += check(name, rec[name])
        return problems

    return validate


ROLES = ("ask", "ans")  # conversation / ref_qa turns: a question (not trained) and an answer (trained)

# Type inference tries these in order, so "api_desc" (conver_has_api) and "reference" (ref_qa) are looked for
# before "rounds" (conversation).
RECORD_TYPES: dict[str, RecordType] = {
    "pretrain": RecordType("text", _fields({"text": _text})),
    "instruct": RecordType("instruct", _fields({"instruct": _text, "output": _text}, {"input": _maybe_empty_text})),
    # gdGPT's conversation with api calls: "ans-api" turns (`_api_turn`) beside "ask" / "ans"
    "conver_has_api": RecordType("api_desc", _fields({"api_desc": _text,
                                                      "rounds": lambda n, v: _rounds(n, v, api=True)})),
    "ref_qa": RecordType("reference", _fields({"reference": _text, "rounds": _rounds})),
    "conversation": RecordType("rounds", _fields({"rounds": _rounds})),
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
    hint = next((f"; {h}" for k, h in OTHER_FORMATS.items() if k in rec), "")
    raise ValueError(f"cannot tell the record type: no \"type\" key and none of the keys {keys}{hint}")


# other datasets' keys for what a record says here: a hint when none of the record types' keys is there
OTHER_FORMATS = {
    "instruction": "Alpaca's 'instruction' is 'instruct' here (with 'input' and 'output')",
    "messages": "chat 'messages' ([{role, content}, ...]) are 'rounds' here: [[\"ask\", text], [\"ans\", text], ...]",
    "conversations": "ShareGPT's 'conversations' are 'rounds' here: [[\"ask\", text], [\"ans\", text], ...]",
    "prompt": "a prompt and its completion are an instruct record here: 'instruct' and 'output'",
}


def _record_problems(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return [f"record must be a JSON object, got {json_type(obj)}"]
    try:
        kind = record_type(obj)
    except ValueError as e:
        return [str(e)]
    return RECORD_TYPES[kind].validate({k: v for k, v in obj.items() if k != "type"})


def prompt_problems(obj: Any) -> list[str]:
    """The problems of a record used as an inference prompt (demo.py --record): as a training record's, except
    that the answer to produce may be absent (an instruct record without "output", rounds ending with "ask")."""
    try:
        kind = record_type(obj) if isinstance(obj, dict) else None
    except ValueError as e:
        return [str(e)]
    rounds = obj.get("rounds") if kind else None
    if kind == "instruct" and "output" not in obj:
        obj = {**obj, "output": "-"}
    elif kind in ("conversation", "ref_qa", "conver_has_api") and isinstance(rounds, list) and rounds \
            and isinstance(rounds[-1], list):  # a last turn that is no list: the training check below says so
        last = rounds[-1]
        if last[:1] == ["ask"]:
            obj = {**obj, "rounds": [*rounds, ["ans", "-"]]}
        elif kind == "conver_has_api" and last[:1] == ["ans-api"] and len(last) == 2 \
                and isinstance(last[1], dict) and "ans" not in last[1]:  # the next action or the final answer
            obj = {**obj, "rounds": [*rounds[:-1], ["ans-api", {**last[1], "ans": "-"}]]}
    return _record_problems(obj)


def resolve_files(data_path: str | Path | Sequence[str | Path], key: str = "data_path") -> list[Path]:
    """Expand `data_path` (file, directory, glob, or a list of them; the config `key` it is) into existing files, in
    order, each once (a file named again, under any spelling or through a link, is not read twice).

    A directory stands for its files with a known suffix (PARSERS); one written by `datasets`' `save_to_disk`
    for its .arrow files only (not its state.json and dataset_info.json). Raises DataError for paths matching nothing.
    """
    items = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
    files: dict[Path, Path] = {}  # the real file -> the first spelling of it, ordered
    problems: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str | Path):
            problems.append(f"{key}:0: item {i} of the list must be a path (a string), got {json.dumps(item)}")
            continue
        p, found, what = Path(item), [], "file not found"
        if not str(item):
            what = "empty path"
        elif p.is_dir():
            suffixes = (".arrow",) if (p / "state.json").is_file() and (p / "dataset_info.json").is_file() else PARSERS
            files_there = sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file())  # as a glob
            found = [f for f in files_there if f.suffix in suffixes]
            problems += [f"{f}:0: unsupported file type {f.suffix!r}; rename it to {f.suffix.lower()!r}"
                         for f in files_there if f.suffix not in suffixes and f.suffix.lower() in suffixes]
            problems += _broken_links(f for f in sorted(p.iterdir()) if not f.name.startswith(".") and f.suffix in suffixes)
            what = f"directory has no data files ({', '.join(PARSERS)})"
            if (p / "dataset_dict.json").is_file():  # save_to_disk of a DatasetDict: a directory per split
                found, what = [], "a DatasetDict saved by save_to_disk (a directory per split)"
            if not found and (subdirs := _data_subdirs(p)):  # they are not read: which one is meant is not ours to say
                what += (f"; its subdirector{'ies' if len(subdirs) > 1 else 'y'} {', '.join(subdirs)} "
                         f"{'have' if len(subdirs) > 1 else 'has'} some: name {_example(p, subdirs)}")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(item)):
            found = sorted(Path(f) for f in glob.glob(str(item), recursive=True) if Path(f).is_file())
            problems += _broken_links(map(Path, sorted(glob.glob(str(item), recursive=True))))  # every file it names
            what = "no file matches this pattern"
            if not found and glob.glob(literal := str(item).replace("[", "[[]"), recursive=True):  # a dir "set [v2]"
                what += f" ('[...]' is a glob's set of characters: {literal} takes the brackets as they are)"
        if not found:
            problems.append(f"{item}:0: {what}" if str(item) else  # (an empty one read ":0: empty path")
                            "an empty path: give a file, a directory or a glob")
        for f in found:
            files.setdefault(f.resolve(), f)
    if not items:
        problems.append(f"{key}:0: no data files given")
    if problems:
        raise DataError(problems)
    return list(files.values())


def _example(directory: Path, subdirs: list[str]) -> str:
    """What to name as data_path among `directory`'s subdirectories: its `train` one, or the training split's files
    where one folder holds every split's (a Hub snapshot's data/train-*.parquet beside test-*), else the first."""
    sub = directory / ("train" if "train" in subdirs else subdirs[0])
    names = [f for f in sorted(sub.rglob("*")) if f.suffix in PARSERS and not f.name.startswith(".")]
    train = [f for f in names if f.name.lower().startswith("train")]
    if train and len(train) < len(names):  # several splits side by side: their files, not the folder
        return f"the training split's files (e.g. {train[0].parent / ('train*' + train[0].suffix)})"
    return f"one (e.g. {sub})"


def _data_subdirs(directory: Path) -> list[str]:
    """The names of `directory`'s subdirectories (not starting with '.') that hold a data file, at any depth."""
    def holds(d: Path) -> bool:
        return any(Path(n).suffix in PARSERS for _, _, names in os.walk(d) for n in names if not n.startswith("."))
    return [d.name for d in sorted(directory.iterdir()) if d.is_dir() and not d.name.startswith(".") and holds(d)]


def _broken_links(paths) -> list[str]:
    """A problem line for each data file among `paths` that is a link to nothing (a file moved or not yet copied):
    a directory or a glob would pass it over without a word, as it does a file it does not read."""
    return [f"{f}:0: a link to {f.readlink()}, which does not exist" for f in paths if f.is_symlink() and not f.exists()]


def present_fields(obj: Any) -> Any:
    """A record without its top-level null (or NaN) fields: JSON null means absent, as a null table cell does (pandas'
    and `datasets`' `to_json` write null for every column a record lacks; `json.dumps` of pandas' rows, NaN). Anything
    else as it is."""
    if isinstance(obj, dict) and any(absent(v) for v in obj.values()):
        return {k: v for k, v in obj.items() if not absent(v)}
    return obj


def _name_nulls(problems: list[str], rec: dict, nulls: list[str], null: str = "null") -> list[str]:
    """`problems` of a record `rec` whose `nulls` fields were dropped as absent, where one is about such a field: the
    type that cannot be told (when the record's other keys are that type's: a frame's null column of another type
    is no clue), or a required field missing, said as the field being `null` (a JSON null, a table's null cell, a
    CSV's empty cell)."""
    typed = [k for k in nulls for t in RECORD_TYPES.values() if t.infer_key == k
             and not any(p.startswith("unknown key") for p in t.validate({**rec, k: "-"}))]
    said = f"is {null} ({null} means absent; it needs a value)"
    out = []
    for problem in problems:
        if typed and problem.startswith("cannot tell the record type"):
            problem = f"field {typed[0]!r} {said}"
        elif (field := problem.removeprefix("missing field ").strip("'")) in nulls and problem.startswith("missing"):
            problem = f"field {field!r} {said}"
        out.append(problem)
    return out


def parse_records(path: Path, raw: bytes) -> tuple[list[Record], list[str]]:
    """Parse and validate one file's bytes: (valid records, problem lines)."""
    if path.suffix not in PARSERS:
        known = ", ".join(PARSERS)
        return [], [f"{path}:0: unsupported file type {path.suffix!r} (use {known})"]
    items, errors = PARSERS[path.suffix](raw)
    if not items and not errors:
        errors.append((1, "empty file (no records)"))
    records = []
    for line, raw_obj in items:
        obj = present_fields(raw_obj)
        found = _record_problems(obj)
        if obj is not raw_obj:  # it had null fields: a problem about one names it as null, not as absent
            nulls = [k for k, v in raw_obj.items() if absent(v)]
            null = {".csv": "an empty cell", ".parquet": "a null cell", ".arrow": "a null cell"}.get(
                path.suffix, "null" if all(raw_obj[k] is None for k in nulls) else "null or NaN")
            found = _name_nulls(found, obj, nulls, null)
        errors += [(line, p) for p in found]
        if not found:
            records.append(Record(record_type(obj), obj, str(path), line))
    return records, [f"{path}:{line}: {msg}" for line, msg in sorted(errors, key=lambda e: (e[0], getattr(e[0], "record", 0)))]


def _each_file(data_path: str | Path | Sequence[str | Path], read: Callable[[Path], bytes]) -> list[tuple[Path, bytes]]:
    """(file, read(file)) for every file of `data_path` (raises DataError for unreadable paths)."""
    out, problems = [], []
    for f in resolve_files(data_path):
        try:
            out.append((f, read(f)))
        except OSError as e:
            problems.append(f"{f}:0: cannot read file: {e.strerror}")
    if problems:
        raise DataError(problems)
    return out


def read_files(data_path: str | Path | Sequence[str | Path]) -> list[tuple[Path, bytes]]:
    """Resolve `data_path` and read every file's bytes (raises DataError for unreadable paths)."""
    return _each_file(data_path, Path.read_bytes)


def _sha256(path: Path) -> bytes:
    with open(path, "rb") as f:
        h = hashlib.sha256()
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.digest()


def file_digests(data_path: str | Path | Sequence[str | Path]) -> list[tuple[Path, bytes]]:
    """Resolve `data_path` and hash every file (sha256, read in chunks: a cache hit never holds a file whole); the
    same digests as `digests_of(read_files(data_path))` (raises DataError for unreadable paths)."""
    return _each_file(data_path, _sha256)


def digests_of(files: Sequence[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """(path, sha256 digest) of read_files' (path, bytes)."""
    return [(f, hashlib.sha256(raw).digest()) for f, raw in files]


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
