"""The file formats records come in: one parser per suffix (`PARSERS`), each turning a file's bytes into
((line, record), ...) and ((line, problem), ...). JSON Lines and JSON arrays here; tables, one row per record, in
`data.tabular`. A record's JSON text (a table row's, as JSON) may be at most MAX_RECORD_BYTES."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from data import tabular
from pipeft import DuplicateKey, unique_keys

MAX_RECORD_BYTES = 10_000_000  # per record, in UTF-8 JSON text
TOO_DEEP = "malformed JSON: nested too deeply"


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _oversize(text: str, start: int, end: int) -> str | None:
    """The problem with the record text[start:end] if it is over MAX_RECORD_BYTES, else None."""
    if (end - start) * 4 <= MAX_RECORD_BYTES:  # a character is at most 4 bytes: cheap common case
        return None
    chunk = text[start:end]
    size = len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "surrogatepass"))
    if size <= MAX_RECORD_BYTES:
        return None
    return (f"record is {size / 1e6:.1f} MB, over the {MAX_RECORD_BYTES / 1e6:.0f} MB limit per record "
            "(split long texts into several records)")


Parsed = tuple[list[tuple[int, Any]], list[tuple[int, str]]]  # ((line, record), ...), ((line, problem), ...)


def _not_jsonl(text: str, first: str) -> str | None:
    """Why a .jsonl text whose first non-blank line `first` is malformed JSON holds no record per line (a JSON array,
    or pretty-printed records), else None. Decodes the first record only, and only when that line starts an object."""
    if first.lstrip().startswith("["):
        return "holds a JSON array, not one record per line: name it .json"
    if not first.lstrip().startswith("{"):
        return None
    start = text.index("{")  # only blank lines before: the first '{' is the line's
    try:
        end = json.JSONDecoder().raw_decode(text, start)[1]
    except (ValueError, RecursionError):
        return None
    if "\n" not in text[start:end]:  # a record on its line, then more (a trailing comma, two records): not this
        return None
    return ("holds records that span several lines (pretty-printed JSON), not one record per line: write each record "
            "on one line (json.dumps without indent)")


def _lines(text: str) -> Iterator[str]:
    """text.split("\n") one line at a time (not splitlines(): U+2028 may sit inside a string): the list of every
    line was another copy of the file while its records were parsed."""
    at = 0
    while at <= len(text):
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        yield text[at:end]
        at = end + 1


def _parse_jsonl(text: str) -> Parsed:
    items, errors = [], []
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        if too_big := _oversize(line, 0, len(line)):
            errors.append((lineno, too_big))
            continue
        try:
            items.append((lineno, json.loads(line, object_pairs_hook=unique_keys)))
        except json.JSONDecodeError as e:
            if not items and not errors and (hint := _not_jsonl(text, line)):  # the first line: one record per line?
                return [], [(lineno, hint)]
            errors.append((lineno, f"malformed JSON: {e.msg} (column {e.colno})"))
        except DuplicateKey as e:
            errors.append((lineno, str(e)))
        except RecursionError:
            errors.append((lineno, TOO_DEEP))
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            errors.append((lineno, f"malformed JSON: {str(e).split(';')[0]}"))
    if len(items) == 1 and not errors and isinstance(items[0][1], list):  # a one-line array (to_json without lines)
        return [], [(items[0][0], "holds a JSON array, not one record per line: name it .json")]
    return items, errors


class RecordLine(int):
    """The line of a .json array's record that shares it with other records (a one-line array, as pandas' and
    `datasets`' to_json write): it reads '1 (record 100000)', the record's 1-based number in the array (as table rows
    are numbered). An int everywhere else."""

    record: int

    def __new__(cls, line: int, record: int) -> RecordLine:
        at = super().__new__(cls, line)
        at.record = record
        return at

    def __getnewargs__(self) -> tuple[int, int]:  # pickle, copy
        return int(self), self.record

    def __str__(self) -> str:
        return f"{int(self)} (record {self.record})"

    def __format__(self, spec: str) -> str:  # "{line}": the record too; a number format: the line
        return str(self) if not spec else format(int(self), spec)


def _parse_json_array(text: str) -> Parsed:
    """A .json array's records and problems, located by line; a line that starts several records also says which."""
    starts: list[int] = []
    items, errors = _json_elements(text, starts)
    shared = {line for line, n in Counter(starts).items() if n > 1}

    def at(line: int) -> int:
        return line if line in shared or not isinstance(line, RecordLine) else int(line)

    return [(at(line), obj) for line, obj in items], [(at(line), problem) for line, problem in errors]


def _json_elements(text: str, starts: list[int]) -> Parsed:
    """Decode a top-level JSON array element by element, remembering the line each element starts at (appended to
    `starts`; an element's RecordLine says its number).

    Parsing stops at the first malformed element (what follows cannot be located reliably)."""
    decoder, plain = json.JSONDecoder(object_pairs_hook=unique_keys), json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    errors: list[tuple[int, str]] = []  # oversized records, then at most one parse error

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
    pos, line, line_pos, seen = skip_ws(pos + 1), 1, 0, 0
    expect_item = True
    while True:
        if pos == len(text):
            return items, [*errors, (_line_at(text, pos), "malformed JSON: unterminated array")]
        if text[pos] == "]" and (not seen or not expect_item):
            break
        if not expect_item:
            if text[pos] != ",":
                return items, [*errors, (_line_at(text, pos), "malformed JSON: expected ',' or ']' between records")]
            pos, expect_item = skip_ws(pos + 1), True
            continue
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        starts.append(line)
        here = RecordLine(line, seen + 1)
        twice = None
        try:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except DuplicateKey as e:  # raised inside the record: the rest of it is decoded to find the next
                twice = str(e)
                obj, end = plain.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return items, [*errors, (here if e.lineno == line else e.lineno, f"malformed JSON: {e.msg} (column "
                                                                           f"{e.colno})")]
        except RecursionError:
            return items, [*errors, (here, TOO_DEEP)]
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            return items, [*errors, (here, f"malformed JSON: {str(e).split(';')[0]}")]
        pos = end
        if twice is not None:
            errors.append((here, twice))
        elif too_big := _oversize(text, line_pos, pos):
            errors.append((here, too_big))
        else:
            items.append((here, obj))
        pos, expect_item, seen = skip_ws(pos), False, seen + 1
    end = skip_ws(pos + 1)
    if end != len(text):
        return items, [*errors, (_line_at(text, end), "malformed JSON: extra data after the array")]
    return items, errors


def _decoded(parse: Callable[[str], Parsed]) -> Callable[[bytes], Parsed]:
    """A parser of UTF-8 text (a BOM is dropped) as a parser of the file's bytes."""

    def parse_bytes(raw: bytes) -> Parsed:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return [], [(raw.count(b"\n", 0, e.start) + 1, f"not valid UTF-8 (byte offset {e.start})")]
        return parse(text)

    return parse_bytes


def _row_oversize(rec: Any) -> str | None:
    """The problem with a table row's record if its JSON text is over MAX_RECORD_BYTES, else None."""
    chars, stack = 0, [rec]
    while stack:  # a cheap bound first: characters of all strings (keys included)
        x = stack.pop()
        if isinstance(x, str):
            chars += len(x)
        elif isinstance(x, dict):
            stack += [*x, *x.values()]
        elif isinstance(x, list):
            stack += x
    if chars * 4 <= MAX_RECORD_BYTES:
        return None
    try:
        text = json.dumps(rec, ensure_ascii=False, default=str)  # a table cell may hold a date, bytes, ...
    except RecursionError:
        return TOO_DEEP
    return _oversize(text, 0, len(text))


def _sized(parse: Callable[[bytes], Parsed]) -> Callable[[bytes], Parsed]:
    """A table parser whose rows over MAX_RECORD_BYTES become problems."""

    def parse_sized(raw: bytes) -> Parsed:
        items, errors = parse(raw)
        kept = []
        for line, rec in items:
            if too_big := _row_oversize(rec):
                errors.append((line, too_big))
            else:
                kept.append((line, rec))
        return kept, errors

    return parse_sized


def _parse_csv(text: str) -> Parsed:
    return tabular.parse_csv(text, MAX_RECORD_BYTES)


# file suffix -> parser of the file's bytes into ((line, record), ...) and ((line, problem), ...); line 0: the file
PARSERS: dict[str, Callable[[bytes], Parsed]] = {
    ".json": _decoded(_parse_json_array),
    ".jsonl": _decoded(_parse_jsonl),
    ".csv": _sized(_decoded(_parse_csv)),
    ".parquet": _sized(tabular.parse_parquet),
    ".arrow": _sized(tabular.parse_arrow),
}
