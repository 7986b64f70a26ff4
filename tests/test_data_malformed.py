"""A corpus of malformed inputs: each gives exactly one `FILE:LINE: problem` line, from the library and
from `python -m data.inspect` (exit 2, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data import inspect as data_inspect
from data.records import MAX_RECORD_BYTES, DataError, load_records

ROOT = Path(__file__).resolve().parents[1]
PROBLEM_LINE = re.compile(r"^.+:\d+( \(record \d+\))?: \S")
GOOD = '{"text": "fine"}\n'
QA = '[["ask", "Where?"], ["ans", "Here."]]'
HUGE = MAX_RECORD_BYTES + 1_000_000

# name -> (file name, content, line of the problem (a record's number too where records share it), part of the message)
CASES: dict[str, tuple[str, str | bytes, int | str, str]] = {
    "bad_json_line": ("a.jsonl", GOOD * 2 + '{"text": "oops"\n', 3, "malformed JSON: Expecting ',' delimiter"),
    "bad_json_in_array": ("a.json", '[\n {"text": "a"},\n {"text": "b",,}\n]\n', 3, "malformed JSON"),
    "unterminated_array": ("a.json", '[\n{"text": "a"},\n', 3, "malformed JSON: unterminated array"),
    "json_not_array": ("a.json", '\n{"text": "a"}\n', 2, "must hold a JSON array"),
    "data_after_array": ("a.json", '[{"text": "a"}]\n\n]', 3, "extra data after the array"),
    "nested_too_deep": ("a.json", "[\n" + "[" * 100_000, 2, "nested too deeply"),
    "huge_integer": ("a.jsonl", GOOD + '{"text": ' + "7" * 5000 + "}\n", 2, "malformed JSON: Exceeds the limit"),
    "not_utf8": ("a.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', 2, "not valid UTF-8 (byte offset 30)"),
    "lone_surrogate": ("a.jsonl", '{"text": "a\\ud800b"}\n', 1, "field 'text' holds an invalid character"),
    "empty_file": ("a.jsonl", "", 1, "empty file (no records)"),
    "blank_lines_only": ("a.jsonl", "\n \n\n", 1, "empty file (no records)"),
    "empty_array": ("a.json", "[ ]", 1, "empty file (no records)"),
    "not_an_object": ("a.jsonl", GOOD + "[1, 2]\n", 2, "record must be a JSON object, got list"),
    "unknown_type": ("a.jsonl", '{"type": "poem", "text": "x"}\n', 1, "unknown type 'poem' (known: pretrain, instruct"),
    "type_not_inferable": ("a.jsonl", GOOD + '{"question": "x"}\n', 2, "cannot tell the record type"),
    "alpaca_keys": ("a.jsonl", '{"instruction": "x", "input": "", "output": "y"}\n', 1, "cannot tell the record type: no "
                    "\"type\" key and none of the keys 'text' (pretrain), 'instruct' (instruct), 'api_desc' (conver_has_api), "
                    "'reference' (ref_qa), 'rounds' (conversation); Alpaca's 'instruction' is 'instruct' here"),
    "openai_messages": ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', 1,
                        "; chat 'messages' ([{role, content}, ...]) are 'rounds' here: [[\"ask\", text], [\"ans\", text]"),
    "missing_field": ("a.json", '[{"text": "a"},\n\n  {"instruct": "do it"}]', 3, "missing field 'output'"),
    "wrong_field_type": ("a.jsonl", '{"instruct": "x", "input": 3, "output": "y"}\n', 1,
                         "field 'input' must be a string, got int"),
    "empty_text": ("a.jsonl", GOOD * 2 + '{"text": "  "}\n', 3, "field 'text' is empty"),
    "unknown_key": ("a.jsonl", '{"text": "a", "lang": "en"}\n', 1, "unknown key 'lang' (allowed: type, text)"),
    "rounds_not_a_list": ("a.jsonl", '{"rounds": "Hi there"}\n', 1, "field 'rounds' must be a list of [role, text] pairs"),
    "empty_rounds": ("a.jsonl", GOOD + '{"type": "conversation", "rounds": []}\n', 2, "field 'rounds' is empty"),
    "round_not_a_pair": ("a.jsonl", '{"rounds": [["ask", "Hi", "extra"], ["ans", "Hello."]]}\n', 1,
                         'rounds[0] must be a [role, text] pair, got ["ask", "Hi", "extra"]'),
    "unknown_role": ("a.json", '[\n{"rounds": [["ask", "Hi"], ["answer", "Hello."]]}\n]', 2,
                     "rounds[1]: unknown role 'answer' (allowed: 'ask', 'ans')"),
    "round_text_not_a_string": ("a.jsonl", '{"rounds": [["ask", 42], ["ans", "Yes."]]}\n', 1,
                                "rounds[0]: text must be a string, got int"),
    "empty_answer": ("a.jsonl", '{"rounds": [["ask", "Hi"], ["ans", " "]]}\n', 1, "rounds[1]: text is empty"),
    "ends_with_ask": ("a.jsonl", '{"rounds": [["ask", "Hi"], ["ans", "Hello."], ["ask", "And?"]]}\n', 1,
                      "rounds end with an 'ask' turn: a sample must end with an 'ans' turn"),
    "no_answer": ("a.jsonl", '{"rounds": [["ask", "Hi"], ["ask", "Anyone?"]]}\n', 1,
                  "rounds has no 'ans' turn: nothing to train on"),
    "ref_qa_without_reference": ("a.jsonl", '{"type": "ref_qa", "rounds": ' + QA + "}\n", 1,
                                 "missing field 'reference'"),
    "ref_qa_empty_reference": ("a.json", '[{"reference": "\\n", "rounds": ' + QA + "}]", 1, "field 'reference' is empty"),
    "ref_qa_reference_not_text": ("a.jsonl", '{"reference": ["a"], "rounds": ' + QA + "}\n", 1,
                                  "field 'reference' must be a string, got list"),
    "conversation_with_reference": ("a.jsonl", '{"type": "conversation", "reference": "r", "rounds": ' + QA + "}\n", 1,
                                    "unknown key 'reference' (allowed: type, rounds)"),
    "duplicate_key": ("a.jsonl", GOOD + '{"instruct": "Say it.", "output": "chat", "output": "chien"}\n', 2,
                      "key 'output' appears twice in one object: only one of its values would be kept"),
    "duplicate_key_in_array": ("a.json", '[\n{"text": "a"},\n{"text": "b", "text": "c"},\n{"text": "d"}\n]', 3,
                               "key 'text' appears twice in one object"),
    "duplicate_key_then_malformed": ("a.json", '[\n{"text": "a"},\n{"text": "b", "meta": {"k": 1, "k": 2}, "x": [1,}\n]', 3,
                                     "malformed JSON: Expecting value"),
    "huge_line": ("a.jsonl", GOOD + '{"text": "' + "x" * (5 * HUGE) + '"}\n', 2,
                  f"record is {(5 * HUGE + 12) / 1e6:.1f} MB, over the 10 MB limit per record"),
    "huge_array_element": ("a.json", '[\n{"text": "a"},\n{"text": "' + "多" * (HUGE // 3) + '"}\n]', 3,
                           "MB, over the 10 MB limit per record"),
    # a one-line array (pandas' / datasets' to_json): the line says which record
    "one_line_array": ("a.json", '[{"text": "a"}, {"text": "b"}, {"text": " "}, {"text": "d"}]', "1 (record 3)",
                       "field 'text' is empty"),
    "one_line_array_malformed": ("a.json", '[{"text": "a"}, {"text": "b",,}]', "1 (record 2)",
                                 "malformed JSON: Expecting property name"),
    # no record per line in a .jsonl: one hint, not a malformed line per line
    "array_in_jsonl": ("a.jsonl", json.dumps([{"text": f"t{i}"} for i in range(30)], indent=2), 1,
                       "holds a JSON array, not one record per line: name it .json"),
    "one_line_array_in_jsonl": ("a.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]) + "\n", 1,
                                "holds a JSON array, not one record per line: name it .json"),
    "pretty_records_in_jsonl": ("a.jsonl", "\n" + json.dumps({"text": "a"}, indent=2) + "\n" + json.dumps({"text": "b"}, indent=2),
                                2, "holds records that span several lines (pretty-printed JSON), not one record per line"),
    # a record on its line with more after it (an array's commas kept) is malformed there, not "several lines"
    "trailing_comma_in_jsonl": ("a.jsonl", '{"text": "a"},\n{"text": "b"}\n', 1, "malformed JSON: Extra data (column 14)"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Each case in its own directory (the same file name may serve several cases)."""
    root = tmp_path_factory.mktemp("malformed")
    paths = {}
    for case, (name, content, _, _) in CASES.items():
        (root / case).mkdir()
        paths[case] = root / case / name
        paths[case].write_bytes(content.encode() if isinstance(content, str) else content)
    return paths


def expected(corpus: dict[str, Path], case: str) -> tuple[str, str]:
    """(the problem line's `FILE:LINE: ` prefix, part of its message)."""
    _, _, line, msg = CASES[case]
    return f"{corpus[case]}:{line}: ", msg


def test_corpus_is_large_and_varied():
    assert len(CASES) >= 15
    assert {name.rsplit(".")[-1] for name, *_ in CASES.values()} == {"json", "jsonl"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_library_reports_one_line_with_file_and_line(corpus, case):
    with pytest.raises(DataError) as e:
        load_records(corpus[case])
    prefix, msg = expected(corpus, case)
    assert e.value.problems == str(e.value).splitlines()
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(prefix) and msg in e.value.problems[0], e.value.problems[0]


INSPECT = "python -m data.inspect: error: "  # what data.inspect puts before each problem line


def write_config(tmp_path: Path, tokenizer_dir: Path, data: str | list[str]) -> Path:
    cfg = {"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"), "data_path": data,
           "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "cfg.json"


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_exits_2_with_the_one_line(corpus, case, tokenizer_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tokenizer_dir, str(corpus[case].parent))  # a directory of files
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    prefix, msg = expected(corpus, case)
    assert len(err) == 1 and err[0].startswith(INSPECT + prefix) and msg in err[0], err


def test_inspect_process_reports_every_file_without_traceback(corpus, tokenizer_dir, tmp_path):
    """The real CLI on the whole corpus at once: every problem found, the first 20 shown, exit status 2."""
    cfg = write_config(tmp_path, tokenizer_dir, [str(corpus[case]) for case in CASES])
    out = subprocess.run([sys.executable, "-m", "data.inspect", "--config", str(cfg), "--index", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert all(line.startswith(INSPECT) for line in out.stderr.splitlines())
    lines = [line.removeprefix(INSPECT) for line in out.stderr.splitlines()]
    assert lines[-1] == f"... and {len(CASES) - 20} more problems" and len(lines) == 21
    for line, case in zip(lines[:20], CASES, strict=False):
        prefix, msg = expected(corpus, case)
        assert PROBLEM_LINE.match(line) and line.startswith(prefix) and msg in line, line
