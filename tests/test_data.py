"""data/: record validation, templates, encoding + labels, truncation, cache, collate, inspect CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from data import inspect as data_inspect
from data.collate import collate, collate_left, pad_id_of
from data.encode import IGNORE_INDEX, encode_one, encode_records, load_dataset
from data.records import RECORD_TYPES, DataError, load_records, record_type
from data.templates import PROMPTS, RENDERERS, render, render_prompt
from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
PROBLEM_LINE = re.compile(r"^.+:\d+: \S")

RECORDS = {
    "pretrain": {"text": "The harbor was quiet at dawn. 港口很安静。"},
    "instruct_input": {"instruct": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    "instruct_no_input": {"type": "instruct", "instruct": "Spell \"river\" backwards.", "output": "revir"},
    "instruct_empty_input": {"instruct": "计算 2 加 3。", "input": "", "output": "2 加 3 等于 5。"},
}


@pytest.fixture(scope="module")
def sample_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample_tokenizer")
    train_tiny_tokenizer(_texts_from_records(SAMPLES), path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def tok(sample_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(sample_tokenizer_dir))


def answer_of(rec: dict, eos: str) -> str:
    return (rec["text"] if record_type(rec) == "pretrain" else rec["output"]) + eos


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*recs: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


# --- records and templates -------------------------------------------------------------------


def test_samples_load_and_are_small():
    records = load_records(str(SAMPLES / "*.json*"))
    kinds = [r.type for r in records]
    assert kinds.count("pretrain") == 200 and kinds.count("instruct") == 200
    for kind in ("pretrain", "instruct"):  # both hold some Chinese
        assert any("\u4e00" <= c <= "\u9fff" for r in records if r.type == kind for v in r.data.values() for c in v)
    assert all(f.stat().st_size < 200_000 for f in SAMPLES.glob("*.json*"))
    first = next(r for r in records if r.source.endswith("instruct.json"))
    assert first.line == 2  # the array's first element starts on line 2


def test_extension_point_is_consistent():
    assert set(RECORD_TYPES) == set(PROMPTS) == set(RENDERERS) == {"pretrain", "instruct"}


def test_default_templates_exact():
    eos = "</s>"
    with_input = render(RECORDS["instruct_input"], eos)
    assert with_input.text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSort the numbers.\n\n"
        "### Input:\n3, 1, 2\n\n### Response:\n1, 2, 3</s>"
    )
    no_input = render(RECORDS["instruct_no_input"], eos)
    prompt = render_prompt(RECORDS["instruct_no_input"])
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nSpell \"river\" backwards.\n\n### Response:\n")
    assert no_input.text == prompt + "revir</s>" and no_input.spans == [(len(prompt), len(no_input.text))]
    assert render_prompt(RECORDS["instruct_empty_input"]).count("### Input:") == 0
    pre = render(RECORDS["pretrain"], eos)
    assert pre.text == RECORDS["pretrain"]["text"] + eos and pre.spans == [(0, len(pre.text))]
    assert render(RECORDS["pretrain"], eos, pretrain_eos=False).text == RECORDS["pretrain"]["text"]


# --- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_encoding_matches_tokenizer_and_labels_only_answer(tok, name):
    rec = RECORDS[name]
    ids, labels, cut = encode_one(tok, rec, max_seq_len=1024)
    assert not cut
    assert ids == tok(render(rec, tok.eos_token).text)["input_ids"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX and ids[-1] == tok.eos_token_id
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert trained == list(range(trained[0], len(ids)))  # one contiguous span ending with EOS
    assert [labels[i] for i in trained] == ids[trained[0]:]
    assert tok.decode([labels[i] for i in trained]) == answer_of(rec, tok.eos_token)


def test_every_sample_record_labels_exactly_its_answer(tok):
    ds = encode_records(load_records(str(SAMPLES)), tok, max_seq_len=4096)
    records = load_records(str(SAMPLES))
    assert ds.stats.kept == len(records) == 400 and ds.stats.dropped == ds.stats.truncated == 0
    for i, r in enumerate(records):
        s = ds[ds.sample_of_record(i)]
        assert s["input_ids"] == tok(render(r.data, tok.eos_token).text)["input_ids"]
        assert tok.decode([x for x in s["labels"] if x != IGNORE_INDEX]) == answer_of(r.data, tok.eos_token)


def test_pretrain_without_eos(tok):
    ids, labels, _ = encode_one(tok, RECORDS["pretrain"], 1024, pretrain_eos=False)
    assert tok.eos_token_id not in ids
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == RECORDS["pretrain"]["text"]


def test_truncation_never_fakes_eos_and_drops_unlabelled(tok, tmp_path):
    rec = RECORDS["instruct_input"]
    full, full_labels, _ = encode_one(tok, rec, 1024)
    n = len(full) - 2
    ids, labels, cut = encode_one(tok, rec, n)
    assert cut and ids == full[:n] and labels == full_labels[:n] and tok.eos_token_id not in ids
    prompt_len = len(tok(render_prompt(rec))["input_ids"])
    write(tmp_path / "d.jsonl", jsonl(rec, {"text": "The tide came in. " * 40}, rec))
    ds = load_dataset(tmp_path / "d.jsonl", tok, max_seq_len=prompt_len, use_cache=False)
    assert (ds.stats.records, ds.stats.kept, ds.stats.dropped, ds.stats.truncated) == (3, 1, 2, 1)
    assert ds.sample_of_record(0) is None and ds.sample_of_record(1) == 0 and ds.sample_of_record(2) is None
    assert len(ds[0]["input_ids"]) == prompt_len


def test_pool_matches_single_process(tok):
    records = load_records(str(SAMPLES))
    one = encode_records(records, tok, 96, num_proc=1)
    two = encode_records(records, tok, 96, num_proc=2)
    assert one.stats == two.stats and len(one) == len(two)
    assert all(one[i] == two[i] for i in range(len(one)))
    assert (one.record_index == two.record_index).all()


def test_cache_hit_is_identical_and_key_tracks_inputs(tok, tmp_path):
    data = write(tmp_path / "d.json", json.dumps([RECORDS["instruct_input"], RECORDS["pretrain"]]))
    first = load_dataset(data, tok, 200)
    assert not first.stats.cache_hit and Path(first.stats.cache_path).parent == tmp_path / ".cache"
    assert (tmp_path / ".cache" / ".gitignore").read_text() == "*\n"
    second = load_dataset(data, tok, 200)
    assert second.stats.cache_hit and second.stats.cache_path == first.stats.cache_path
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    assert second.stats.kept == first.stats.kept == 2
    assert not load_dataset(data, tok, 199).stats.cache_hit  # max_seq_len is in the key
    assert not load_dataset(data, tok, 200, pretrain_eos=False).stats.cache_hit  # template settings too
    write(data, json.dumps([RECORDS["pretrain"]]))
    changed = load_dataset(data, tok, 200, cache_dir=tmp_path / "elsewhere")
    assert not changed.stats.cache_hit and len(changed) == 1
    assert list((tmp_path / "elsewhere").glob("*.tmp")) == []


# --- malformed data --------------------------------------------------------------------------

GOOD = '{"text": "fine"}\n'
BAD_CASES = {
    "malformed_jsonl": ("d.jsonl", GOOD * 2 + '{"text": "oops"\n', 3, "malformed JSON"),
    "malformed_json_array": ("d.json", '[\n {"text": "a"},\n {"text": "b",,}\n]\n', 3, "malformed JSON"),
    "non_object": ("d.jsonl", GOOD + "[1, 2]\n", 2, "must be a JSON object"),
    "unknown_type": ("d.jsonl", '{"type": "poem", "text": "x"}\n', 1, "unknown type 'poem'"),
    "no_type_inferred": ("d.jsonl", GOOD + '{"rounds": []}\n', 2, "cannot tell the record type"),
    "missing_field": ("d.json", '[{"text": "a"},\n\n  {"instruct": "do it"}]', 3, "missing field 'output'"),
    "wrong_type": ("d.jsonl", '{"instruct": "x", "input": 3, "output": "y"}\n', 1, "field 'input' must be a string"),
    "empty_text": ("d.jsonl", GOOD + GOOD + '{"text": "  "}\n', 3, "field 'text' is empty"),
    "unknown_key": ("d.jsonl", '{"text": "a", "lang": "en"}\n', 1, "unknown key 'lang'"),
    "empty_file": ("d.jsonl", "\n\n", 1, "empty file"),
    "empty_array": ("d.json", "[ ]", 1, "empty file"),
    "not_utf8": ("d.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', 2, "not valid UTF-8"),
    "json_not_array": ("d.json", '\n{"text": "a"}\n', 2, "must hold a JSON array"),
    "trailing_data": ("d.json", '[{"text": "a"}]\n\n]', 3, "extra data"),
    "wrong_extension": ("d.txt", "hello", 0, "unsupported file type"),
    "line_separator_in_string": ("d.jsonl", '{"text": "a\u2028b"}\r\n{"text": ""}\r\n', 2, "field 'text' is empty"),
    "too_deep": ("d.json", "[\n" + "[" * 100_000, 2, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_names_file_and_line(tmp_path, case):
    name, content, line, msg = BAD_CASES[case]
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert str(e.value).splitlines() == e.value.problems
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(f"{path}:{line}: ") and msg in e.value.problems[0]


def test_missing_paths(tmp_path):
    with pytest.raises(DataError) as e:
        load_records([str(tmp_path / "nope.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path)])
    assert e.value.problems == [f"{tmp_path / 'nope.jsonl'}:0: file not found",
                                f"{tmp_path / '*.jsonl'}:0: no file matches this pattern",
                                f"{tmp_path}:0: directory has no .json or .jsonl files"]


def test_all_problems_collected_before_tokenizing(tok, tmp_path):
    write(tmp_path / "a.jsonl", jsonl(*[{"text": ""}] * 25))
    write(tmp_path / "b.jsonl", jsonl({"text": "ok"}, {"txt": "typo"}))
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "*.jsonl"), tok, 64)
    assert len(e.value.problems) == 26 and e.value.problems[-1].startswith(f"{tmp_path / 'b.jsonl'}:2: ")
    lines = str(e.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 6 more problems"
    assert all(PROBLEM_LINE.match(x) for x in lines[:20])
    assert not (tmp_path / ".cache").exists()


# --- collate ---------------------------------------------------------------------------------


def test_collate_right_and_left():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    (ids, pos, seg), labels = collate(samples, max_seq_len=5, pad_id=3)
    for t in (ids, pos, seg, labels):
        assert t.dtype == torch.int64 and t.shape == (2, 5)
    assert ids.tolist() == [[5, 6, 7, 3, 3], [8, 3, 3, 3, 3]]
    assert labels.tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100]]
    assert pos.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0]]
    assert seg.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    (ids, pos, seg), labels = collate_left(samples, max_seq_len=None, pad_id=3)
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8]] and labels.tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]] and seg.tolist() == [[1, 1, 1], [0, 0, 1]]
    (ids, _, _), labels = collate_left([{"input_ids": [4, 5]}], max_seq_len=4, pad_id=0)
    assert ids.tolist() == [[0, 0, 4, 5]] and labels.tolist() == [[-100] * 4]
    with pytest.raises(ValueError, match="more than max_seq_len"):
        collate(samples, max_seq_len=2, pad_id=3)


def test_collate_encoded_batch(tok):
    ds = encode_records(load_records(str(SAMPLES / "instruct.json")), tok, max_seq_len=128)
    (ids, pos, seg), labels = collate([ds[0], ds[1]], 128, pad_id_of(tok))
    n = len(ds[0]["input_ids"])
    assert ids[0, :n].tolist() == ds[0]["input_ids"] and (ids[0, n:] == tok.pad_token_id).all()
    assert labels[0, :n].tolist() == ds[0]["labels"] and (labels[0, n:] == IGNORE_INDEX).all()
    assert seg[0].sum() == n and pos[0, n - 1] == n - 1


# --- inspect CLI -----------------------------------------------------------------------------


def make_config(tmp_path: Path, model_path: Path, data: Path, max_seq_len: int = 256) -> Path:
    cfg = {"model_path": str(model_path), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": max_seq_len, "n_epoches": 1, "train_micro_batch_size_per_gpu": 1}
    return write(tmp_path / "cfg.json", json.dumps(cfg))


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.inspect", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_inspect_json_equals_encoder(tok, sample_tokenizer_dir, tmp_path):
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["pretrain"], RECORDS["instruct_input"], RECORDS["instruct_no_input"]))
    cfg = make_config(tmp_path, sample_tokenizer_dir, data)
    out = run_inspect("--config", str(cfg), "--index", "1", "--json")
    assert out.returncode == 0, out.stderr
    expected = load_dataset(data, tok, 256, use_cache=False)
    assert json.loads(out.stdout) == expected[expected.sample_of_record(1)]
    assert "cache miss" in out.stderr


def test_inspect_bad_data_exits_2_with_one_line_errors(sample_tokenizer_dir, tmp_path):
    data = write(tmp_path / "d.jsonl", GOOD + '{"text": 1}\n{"oops"\n{"text": "a", "x": 1}\n')
    out = run_inspect("--config", str(make_config(tmp_path, sample_tokenizer_dir, data)), "--index", "0")
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert [int(x.split(":")[1]) for x in lines] == [2, 3, 4] and all(PROBLEM_LINE.match(x) for x in lines)


def test_inspect_human_view_and_errors(sample_tokenizer_dir, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["instruct_no_input"]))
    cfg = make_config(tmp_path, sample_tokenizer_dir, data)
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "[[revir</s>]]" in out and "### Response:\n[[" in out and "1 records, 1 samples, 0 dropped" in out
    assert data_inspect.main(["--config", str(cfg), "--index", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    write(cfg, json.dumps({"model_path": str(sample_tokenizer_dir), "data_path": str(data)}))
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 2
    assert capsys.readouterr().err == f"{cfg}: missing required key 'save_path'\n"
