"""Read records from tabular files: Parquet and Arrow (through the Hugging Face `datasets` package) and CSV.

Each row is one record, with the columns as its keys: `data.records` validates it exactly like a
JSON object. A null or NaN cell (a column that only some rows use, e.g. `input`) and an empty CSV
cell mean the key is absent. `rounds` is a list of [role, text] lists (a nested list column), or a
JSON text starting with '[' (the only way to write it in CSV). A row's LINE is its 1-based row
number in Parquet and Arrow, and its first line in the file in CSV (the header is line 1).

Parquet and Arrow need `datasets` (imported only when such a file is met; it brings pyarrow).
`.arrow` is what `Dataset.save_to_disk` writes (the Arrow IPC stream format); the IPC file format
(Feather v2) is read too. CSV is read with Python's csv module: every cell stays a string (no
number or "NA" guessing), so it needs no extra package.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from pipeft import DuplicateKey, unique_keys

Parsed = tuple[list[tuple[int, Any]], list[tuple[int, str]]]  # ((line, record), ...), ((line, problem), ...)

JSON_COLUMNS = ("rounds",)  # a text cell starting with '[' in these columns is JSON
PANDAS_INDEX = "__index_level_"  # columns pandas adds for a non-default index: not record fields


def _need_datasets(suffix: str) -> str | None:
    """The problem if the `datasets` package cannot be imported, else None."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return f"reading {suffix} files needs the 'datasets' package (pip install datasets)"
    except Exception as e:  # noqa: BLE001 - a broken install: one line, no traceback
        return f"reading {suffix} files needs the 'datasets' package, which fails to import: {_first_line(e)}"
    return None


def absent(value: Any) -> bool:
    """A null or NaN: the key is absent (a table's missing cell; JSON null, or NaN as json.dumps writes pandas')."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """Lists for tuples (an Arrow map cell), recursively; the rest as it is (pyarrow gives Python values)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def row_record(row: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the record of one table row, the problem with it or None): absent cells as None (dropped by the record check,
    which names one a record needs, as it does a JSON null), JSON cells parsed."""
    rec: dict[str, Any] = {}
    for key, value in row.items():
        if key.startswith(PANDAS_INDEX):
            continue
        if absent(value):
            rec[key] = None
            continue
        if key in JSON_COLUMNS and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as e:
                return rec, f"malformed JSON in column {key!r}: {e.msg} (column {e.colno})"
            except DuplicateKey as e:
                return rec, f"column {key!r}: {e}"
            except RecursionError:
                return rec, f"malformed JSON in column {key!r}: nested too deeply"
            except ValueError as e:  # e.g. an integer with more digits than Python converts
                return rec, f"malformed JSON in column {key!r}: {str(e).split(';')[0]}"
        rec[key] = _plain(value)
    return rec, None


def _rows(rows: list[dict[str, Any]]) -> Parsed:
    items, errors = [], []
    for line, row in enumerate(rows, 1):
        rec, problem = row_record(row)
        if problem:
            errors.append((line, problem))
        else:
            items.append((line, rec))
    return items, errors


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def parse_parquet(raw: bytes) -> Parsed:
    """The rows of a Parquet file's bytes."""
    if problem := _need_datasets(".parquet"):
        return [], [(0, problem)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
        rows = table.to_pylist()
    except Exception as e:  # noqa: BLE001 - any corrupt input: one line, no traceback
        return [], [(0, f"cannot read .parquet file: {_first_line(e)}")]
    return _rows(rows)


def parse_arrow(raw: bytes) -> Parsed:
    """The rows of an Arrow IPC file's bytes (the stream format `datasets` writes, or the file format)."""
    if problem := _need_datasets(".arrow"):
        return [], [(0, problem)]
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(raw) if raw[:6] == b"ARROW1" else pa.ipc.open_stream(raw)
        rows = reader.read_all().to_pylist()
    except Exception as e:  # noqa: BLE001 - any corrupt input: one line, no traceback
        return [], [(0, f"cannot read .arrow file: {_first_line(e)}")]
    return _rows(rows)


def parse_csv(text: str, max_cell_chars: int) -> Parsed:
    """The rows of a CSV text with a header line; cells over `max_cell_chars` stop the parse with a problem.

    Parsing stops at the first malformed row (as in a .json array)."""
    items: list[tuple[int, Any]] = []
    errors: list[tuple[int, str]] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    old_limit = csv.field_size_limit(max(max_cell_chars, 1))
    try:
        while True:
            line = reader.line_num + 1  # a row's first line: a quoted cell may span several
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                problem = (f"a cell is over {max_cell_chars} characters, over the limit per record (split long "
                           "texts into several records)" if "field limit" in str(e) else f"malformed CSV: {e}")
                return items, [*errors, (line, problem)]
            if not cells:
                continue  # a blank line
            if header is None:
                header = cells
                if problem := _header_problem(header):
                    return [], [(line, problem)]
                continue
            if len(cells) != len(header):
                errors.append((line, f"row has {len(cells)} cell{'s' * (len(cells) != 1)}, the header has "
                                     f"{len(header)} columns"))
                continue
            rec, problem = row_record({k: v if v != "" else None for k, v in zip(header, cells, strict=True)})
            if problem:
                errors.append((line, problem))
            else:
                items.append((line, rec))
    finally:
        csv.field_size_limit(old_limit)
    return items, errors


def _header_problem(header: list[str]) -> str | None:
    if unnamed := [i + 1 for i, name in enumerate(header) if not name.strip()]:
        return (f"header: column {unnamed[0]} has no name (a pandas index? write with to_csv(..., index=False))"
                if unnamed[0] == 1 else f"header: column {unnamed[0]} has no name")
    if dup := sorted({name for name in header if header.count(name) > 1}):
        return f"header: column {dup[0]!r} appears twice"
    if len(header) == 1 and (sep := next((c for c in ";\t|" if c in header[0]), None)):
        return (f"header: one column {header[0]!r}: columns separated by {sep!r}? a .csv file's are separated by "
                "commas (pandas: to_csv(..., sep=','))")
    return None
