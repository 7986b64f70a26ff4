"""Tabular data files (data/tabular.py): .parquet, .arrow and .csv give the same records and samples as .jsonl,
and malformed ones give `FILE:LINE: problem` lines."""

from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path

import pytest

from data import inspect as data_inspect
from data import parsers
from data.encode import load_dataset
from data.records import DataError, load_records

datasets = pytest.importorskip("datasets")  # the optional package these formats need (the `dev` extra installs it)
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

RECORDS = [
    {"text": "The harbor was quiet at dawn.\nA second line. 港口很安静。"},
    {"instruct": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"type": "instruct", "instruct": "Spell \"river\" backwards.", "output": "revir"},
    {"instruct": "计算 2 加 3。", "input": "", "output": "2 加 3 等于 5。"},
    {"rounds": [["ask", "Hi!"], ["ask", "What is 2 plus 3?"], ["ans", "2 plus 3 is 5."], ["ask", "“河流”?"],
                ["ans", "River, with a comma."]]},
    {"type": "conversation", "rounds": [["ask", "Name a colour."], ["ans", "Blue {not a field}."]]},
    {"reference": "The ferry leaves every 40 minutes; a ticket is 3 dollars.",
     "rounds": [["ask", "How often?"], ["ans", "Every 40 minutes."], ["ask", "Cost?"], ["ans", "3 dollars."]]},
    {"text": "42"},  # a number-like text stays a string
]
FORMATS = ("parquet", "arrow", "arrow_file", "csv")


def frame(recs: list[dict]) -> pd.DataFrame:
    """Records as a table: a column per key, NaN where a record lacks it."""
    return pd.DataFrame(recs)


def write_parquet(path: Path, recs: list[dict]) -> Path:
    frame(recs).to_parquet(path, index=False)
    return path


def write_arrow(path: Path, recs: list[dict]) -> Path:
    """The IPC stream format `datasets` writes (one shard of `Dataset.save_to_disk`)."""
    table = pa.Table.from_pandas(frame(recs), preserve_index=False)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_arrow_file(path: Path, recs: list[dict]) -> Path:
    """The IPC file format (Feather v2)."""
    table = pa.Table.from_pandas(frame(recs), preserve_index=False)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_csv(path: Path, recs: list[dict]) -> Path:
    df = frame(recs)
    if "rounds" in df:
        df["rounds"] = [json.dumps(r, ensure_ascii=False) if isinstance(r, list) else r for r in df["rounds"]]
    df.to_csv(path, index=False)
    return path


WRITERS = {"parquet": (".parquet", write_parquet), "arrow": (".arrow", write_arrow),
           "arrow_file": (".arrow", write_arrow_file), "csv": (".csv", write_csv)}


def write(fmt: str, directory: Path, recs: list[dict], name: str = "d") -> Path:
    suffix, writer = WRITERS[fmt]
    return writer(directory / f"{name}{suffix}", recs)


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


def one_problem(path: Path | list[Path]) -> str:
    with pytest.raises(DataError) as e:
        load_records(path)
    assert len(e.value.problems) == 1, e.value.problems
    return e.value.problems[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_match_jsonl(fmt, tmp_path):
    expected = load_records(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    got = load_records(write(fmt, tmp_path, RECORDS))
    want = [r.data for r in expected]
    if fmt == "csv":  # an empty CSV cell is an absent field (it renders the same: see the next test)
        want = [{k: v for k, v in d.items() if v != ""} for d in want]
    assert [r.data for r in got] == want
    assert [r.type for r in got] == [r.type for r in expected]
    assert all(type(t) is str for r in got for turn in r.data.get("rounds", []) for t in turn)
    if fmt == "csv":  # a row's first line in the file: the header is line 1, the first text spans 2 lines
        assert [r.line for r in got] == [2, *range(4, 4 + len(RECORDS) - 1)]
    else:
        assert [r.line for r in got] == list(range(1, len(RECORDS) + 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_samples_match_jsonl(fmt, tmp_path, tokenizer):
    expected = load_dataset(write_jsonl(tmp_path / "d.jsonl", RECORDS), tokenizer, 512, use_cache=False)
    got = load_dataset(write(fmt, tmp_path, RECORDS), tokenizer, 512, use_cache=False)
    assert len(got) == len(expected) == len(RECORDS)
    assert [got[i] for i in range(len(got))] == [expected[i] for i in range(len(expected))]


def test_cache_covers_the_file_bytes(tmp_path, tokenizer):
    data = write_parquet(tmp_path / "d.parquet", RECORDS)
    first = load_dataset(data, tokenizer, 512, cache_dir=tmp_path / "cache")
    again = load_dataset(data, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert not first.stats.cache_hit and again.stats.cache_hit and again[3] == first[3]
    write_parquet(data, RECORDS[:3])
    changed = load_dataset(data, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert not changed.stats.cache_hit and len(changed) == 3


def test_directory_mixes_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    write_parquet(tmp_path / "b.parquet", RECORDS[2:5])
    write_csv(tmp_path / "c.csv", RECORDS[5:])
    (tmp_path / "notes.txt").write_text("not data")
    recs = load_records(tmp_path)
    assert [Path(r.source).name for r in recs] == ["a.jsonl"] * 2 + ["b.parquet"] * 3 + ["c.csv"] * 3
    assert [r.data for r in recs[:5]] == RECORDS[:5]
    (tmp_path / "eval").mkdir()  # a subdirectory beside the files (the eval data, an older copy) is not read
    write_jsonl(tmp_path / "eval" / "e.jsonl", RECORDS[:1])
    assert len(load_records(tmp_path)) == len(RECORDS)


def test_a_directory_of_subdirectories_names_them(tmp_path):
    """A Hub snapshot's data/{train,test}, a DatasetDict's splits: a directory without data files of its own names
    the subdirectories that have some (it reads none of them: which split is meant is the user's to say)."""
    for split in ("test", "train"):
        (tmp_path / "snap" / split).mkdir(parents=True)
        write_jsonl(tmp_path / "snap" / split / "part-0.jsonl", RECORDS)
    assert one_problem(tmp_path / "snap").endswith(
        f"snap:0: directory has no data files (.json, .jsonl, .csv, .parquet, .arrow); its subdirectories test, train "
        f"have some: name one (e.g. {tmp_path / 'snap' / 'train'})")
    dd = tmp_path / "dd"
    ds = datasets.Dataset.from_pandas(frame(RECORDS), preserve_index=False)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(dd))
    assert one_problem(dd).endswith(f"dd:0: a DatasetDict saved by save_to_disk (a directory per split); its "
                                    f"subdirectories train, validation have some: name one (e.g. {dd / 'train'})")
    assert [r.data for r in load_records(dd / "train")] == RECORDS
    (tmp_path / "hub" / "data").mkdir(parents=True)  # a Hub snapshot: every split's files in one folder
    for split in ("test", "train"):
        write_jsonl(tmp_path / "hub" / "data" / f"{split}-00000.jsonl", RECORDS)
    assert one_problem(tmp_path / "hub").endswith(f"its subdirectory data has some: name the training split's files "
                                                  f"(e.g. {tmp_path / 'hub' / 'data' / 'train*.jsonl'})")


def test_save_to_disk_directory(tmp_path):
    datasets.Dataset.from_pandas(frame(RECORDS), preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    assert [r.data for r in load_records(tmp_path / "saved")] == RECORDS  # its state.json etc. are not records


def test_parquet_keeps_empty_strings_and_drops_nan_columns(tmp_path):
    df = pd.DataFrame({"instruct": ["a", "b"], "input": [float("nan"), ""], "output": ["x", "y"]})
    df.index = [7, 9]  # a non-default index is stored as a column: not a field
    df.to_parquet(tmp_path / "d.parquet")
    assert [r.data for r in load_records(tmp_path / "d.parquet")] == [
        {"instruct": "a", "output": "x"}, {"instruct": "b", "input": "", "output": "y"}]


# --- malformed files ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [*FORMATS, "jsonl", "json_nan"])
def test_a_null_or_empty_cell_a_record_needs_is_named_as_such(fmt, tmp_path):
    """A null / NaN / empty cell (or JSON null, or NaN as json.dumps writes pandas' rows) where a record needs a value
    is named as that in every format, not as a missing field or an untold record type (the column exists)."""
    null = {"parquet": "a null cell", "arrow": "a null cell", "arrow_file": "a null cell", "csv": "an empty cell",
            "jsonl": "null", "json_nan": "null or NaN"}[fmt]
    line = {"csv": 3, "json_nan": "1 (record 2)"}.get(fmt, 2)  # CSV: the header is line 1; a one-line array
    for recs, field in (([{"instruct": "q1", "output": "a1"}, {"instruct": "q2", "output": None}], "output"),
                        ([{"text": "a"}, {"text": None}], "text")):
        if fmt == "jsonl":
            path = write_jsonl(tmp_path / "d.jsonl", recs)
        elif fmt == "json_nan":
            path = tmp_path / "d.json"
            path.write_text(json.dumps(frame(recs).to_dict("records")))
            assert "NaN" in path.read_text()
        else:
            path = write(fmt, tmp_path, recs)
        assert one_problem(path) == f"{path}:{line}: field {field!r} is {null} ({null} means absent; it needs a value)"
    if fmt == "json_nan":  # a NaN in a column only some records have: absent, as a table's
        path.write_text(json.dumps(frame(RECORDS[1:3]).to_dict("records")))
        assert [r.data for r in load_records(path)] == RECORDS[1:3]


def test_missing_required_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"instruct": "Do it."}])
    assert one_problem(path) == f"{path}:1: missing field 'output'"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_role_in_a_row(fmt, tmp_path):
    path = write(fmt, tmp_path, [RECORDS[4], {"rounds": [["ask", "Hi"], ["answer", "Hello."]]}])
    line = 3 if fmt == "csv" else 2  # CSV: the header is line 1
    assert one_problem(path) == f"{path}:{line}: rounds[1]: unknown role 'answer' (allowed: 'ask', 'ans')"


def test_wrong_cell_type(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [5]}), path)
    assert one_problem(path) == f"{path}:1: field 'text' must be a string, got int"


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_corrupt_binary_file(suffix, tmp_path):
    good = write_parquet(tmp_path / "g.parquet", RECORDS) if suffix == ".parquet" else write_arrow(
        tmp_path / "g.arrow", RECORDS)
    for i, content in enumerate([b"", b"PAR1 not really", good.read_bytes()[:-40], b"\0" * 100]):
        path = tmp_path / f"bad{i}{suffix}"
        path.write_bytes(content)
        problem = one_problem(path)
        assert "\n" not in problem and problem.startswith(f"{path}:0: cannot read {suffix} file: "), problem


def test_csv_problems(tmp_path):
    cases = {
        "bad_json": ('rounds\n"[[""ask"", ""Hi""], [""ans"", ""Yo""]]"\n"[[""ask"", ""Hi""], [""ans"" ""Yo""]]"\n', 3,
                     "malformed JSON in column 'rounds': Expecting ',' delimiter (column 24)"),
        "rounds_text": ("rounds\nHi there\n", 2, "field 'rounds' must be a list of [role, text] pairs, got str"),
        "empty": ("", 1, "empty file (no records)"),
        "header_only": ("text,instruct\n", 1, "empty file (no records)"),
        "cells": ("instruct,output\nDo it.,Done.,extra\n", 2, "row has 3 cells, the header has 2 columns"),
        "index": (",text\n0,hello\n", 1, "header: column 1 has no name (a pandas index?"),
        "dup": ("text,text\na,b\n", 1, "header: column 'text' appears twice"),
        "dup_in_json_cell": ('rounds\n"[[""ask"", ""q""], [""ans"", {""ans"": ""a"", ""ans"": ""b""}]]"\n', 2,
                             "column 'rounds': key 'ans' appears twice in one object"),
        "semicolons": ("instruct;output\nDo it.;Done.\n", 1, "header: one column 'instruct;output': columns separated "
                       "by ';'? a .csv file's are separated by commas"),
        "unterminated": ('text\n"open\n', 2, "malformed CSV: unexpected end of data"),
        "not_utf8": (b"text\ncaf\xe9\n", 2, "not valid UTF-8 (byte offset 8)"),
        "unknown_column": ("text,lang\nhello,en\n", 2, "unknown key 'lang' (allowed: type, text)"),
    }
    for name, (content, line, msg) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        problem = one_problem(path)
        assert problem.startswith(f"{path}:{line}: {msg}"), (name, problem)


def test_records_over_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(parsers, "MAX_RECORD_BYTES", 1000)
    pq_path = write_parquet(tmp_path / "d.parquet", [{"text": "ok"}, {"text": "x" * 1200}])
    assert "over the" in one_problem(pq_path) and one_problem(pq_path).startswith(f"{pq_path}:2: record is ")
    row = write_csv(tmp_path / "row.csv", [{"instruct": "a" * 600, "output": "b" * 600}])
    assert one_problem(row).startswith(f"{row}:2: record is ")
    cell = write_csv(tmp_path / "cell.csv", [{"text": "ok"}, {"text": "x" * 1200}])
    assert one_problem(cell) == (f"{cell}:3: a cell is over 1000 characters, over the limit per record "
                                 "(split long texts into several records)")


def test_without_the_datasets_package(tmp_path, monkeypatch):
    paths = [write_parquet(tmp_path / "d.parquet", RECORDS), write_arrow(tmp_path / "d.arrow", RECORDS)]
    csv_path = write_csv(tmp_path / "d.csv", RECORDS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError) as e:
        load_records(paths)
    assert e.value.problems == [
        f"{paths[0]}:0: reading .parquet files needs the 'datasets' package (pip install datasets)",
        f"{paths[1]}:0: reading .arrow files needs the 'datasets' package (pip install datasets)"]
    assert len(load_records(csv_path)) == len(RECORDS)  # CSV needs no extra package


def test_inspect_reports_a_corrupt_file_in_one_line(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "data" / "d.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1" + bytes(range(256)))
    cfg = {"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"), "data_path": str(bad.parent),
           "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert data_inspect.main(["--config", str(tmp_path / "cfg.json"), "--index", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m data.inspect: error: {bad}:0: cannot read .parquet file: "), err


def test_unsupported_suffix_lists_the_formats(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\nhello\n")
    assert one_problem(path) == f"{path}:0: unsupported file type '.tsv' (use .json, .jsonl, .csv, .parquet, .arrow)"



def test_null_fields_in_json_are_absent_as_pandas_and_datasets_write_them(tmp_path, tokenizer):
    """`DataFrame.to_json(lines=True)` / `Dataset.to_json` write null for every column a record lacks: the same
    records as the .jsonl without them; a null required field is named as null, also one that tells the type."""
    frame(RECORDS).to_json(tmp_path / "pandas.jsonl", orient="records", lines=True, force_ascii=False)
    datasets.Dataset.from_pandas(frame(RECORDS)).to_json(tmp_path / "datasets.jsonl", force_ascii=False)
    frame(RECORDS).to_json(tmp_path / "array.json", orient="records", force_ascii=False)
    want = load_records(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    for name in ("pandas.jsonl", "datasets.jsonl", "array.json"):
        assert "null" in (tmp_path / name).read_text()
        got = load_records(tmp_path / name)
        assert [(r.type, r.data) for r in got] == [(r.type, r.data) for r in want], name
    (tmp_path / "bad.jsonl").write_text('{"instruct": "a", "input": null, "output": null}\n')
    assert one_problem(tmp_path / "bad.jsonl").endswith("bad.jsonl:1: field 'output' is null (null means absent; it "
                                                        "needs a value)")
    (tmp_path / "bad.jsonl").write_text('{"instruct": null, "output": "o"}\n')  # was "cannot tell the record type"
    assert one_problem(tmp_path / "bad.jsonl").endswith("bad.jsonl:1: field 'instruct' is null (null means absent; it "
                                                        "needs a value)")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "completion": "a", "text": null}\n')  # a frame's null column
    assert "bad.jsonl:1: cannot tell the record type" in one_problem(tmp_path / "bad.jsonl")


def test_a_one_line_json_array_locates_records_by_number_as_table_rows(tmp_path):
    """pandas' to_json(orient="records") writes one line: a record there is located by its 1-based number too, the
    number a Parquet row of it gets; Record.line stays the line (an int) and reads as both."""
    recs = [{"instruct": f"q{i}", "output": f"a{i}"} for i in range(5)]
    bad = [*recs[:3], {"instruct": "q", "output": ""}, *recs[3:]]
    pd.DataFrame(bad).to_json(tmp_path / "d.json", orient="records")
    pd.DataFrame(bad).to_parquet(tmp_path / "d.parquet")
    assert one_problem(tmp_path / "d.json") == f"{tmp_path / 'd.json'}:1 (record 4): field 'output' is empty"
    assert one_problem(tmp_path / "d.parquet") == f"{tmp_path / 'd.parquet'}:4: field 'output' is empty"
    pd.DataFrame(recs).to_json(tmp_path / "ok.json", orient="records")
    got = load_records(tmp_path / "ok.json")
    assert [r.line for r in got] == [1] * 5 and [f"{r.source}:{r.line}" for r in got][-1] == \
        f"{tmp_path / 'ok.json'}:1 (record 5)"
    # records copy and pickle (a spawn pool, deepcopy), a number format is the line's
    assert [str(r.line) for r in copy.deepcopy(got)] == [str(r.line) for r in pickle.loads(pickle.dumps(got))] == [
        f"1 (record {i})" for i in range(1, 6)] and f"{got[0].line:3d}" == "  1"
    # problems in record order (a duplicate key, found while parsing, came before the earlier records' problems)
    (tmp_path / "two.json").write_text('[{"text": "a"}, {"text": " "}, {"text": "x", "text": "y"}]')
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "two.json")
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in e.value.problems] == ["1 (record 2)", "1 (record 3)"]
