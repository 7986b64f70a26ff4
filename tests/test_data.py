"""data/: record validation, default templates, encoding + labels, truncation, caching, collate, inspect CLI.

Chat-template mode and the label options: test_data_chat.py; malformed input: test_data_malformed.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data import encode as encode_module
from data import inspect as data_inspect
from data.collate import collate, collate_left, pad_id_of
from data.encode import IGNORE_INDEX, encode_one, encode_records, load_dataset
from data.records import RECORD_TYPES, DataError, load_records, record_type, resolve_files
from data.templates import CHAT_MESSAGES, PROMPTS, RENDERERS, TemplateSettings, render, render_prompt
from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer
from tests.helpers import answers_of, trained_runs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
PROBLEM_LINE = re.compile(r"^.+:\d+: \S")

RECORDS = {
    "pretrain": {"text": "The harbor was quiet at dawn. 港口很安静。"},
    "instruct_input": {"instruct": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    "instruct_no_input": {"type": "instruct", "instruct": "Spell \"river\" backwards.", "output": "revir"},
    "instruct_empty_input": {"instruct": "计算 2 加 3。", "input": "", "output": "2 加 3 等于 5。"},
    "conversation": {"rounds": [["ask", "Hi!"], ["ask", "What is 2 plus 3?"], ["ans", "2 plus 3 is 5."],
                                ["ask", "“河流”的英文是什么？"], ["ans", "River."]]},
    "conversation_one_turn": {"type": "conversation", "rounds": [["ask", "Name a colour."], ["ans", "Blue {not a field}."]]},
    "ref_qa": {"reference": "The ferry leaves every 40 minutes; a ticket is {3} dollars.",
               "rounds": [["ask", "How often?"], ["ans", "Every 40 minutes."], ["ask", "Cost?"], ["ask", "For kids?"],
                          ["ans", "Three dollars; nothing is said about children."]]},
}
SETTINGS = TemplateSettings()


@pytest.fixture(scope="module")
def sample_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample_tokenizer")
    train_tiny_tokenizer(_texts_from_records(SAMPLES), path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def tok(sample_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(sample_tokenizer_dir))


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*recs: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


# --- records and templates -------------------------------------------------------------------


def test_samples_cover_every_type_in_two_languages_and_are_small():
    records = load_records(str(SAMPLES))
    kinds = [r.type for r in records]
    assert {k: kinds.count(k) for k in RECORD_TYPES} == {"pretrain": 200, "instruct": 200, "ref_qa": 100,
                                                         "conversation": 100, "conver_has_api": 0}  # gdGPT's: test_gdgpt
    for kind in set(RECORD_TYPES) - {"conver_has_api"}:  # every type holds some Chinese
        assert any("\u4e00" <= c <= "\u9fff" for r in records if r.type == kind for c in json.dumps(r.data, ensure_ascii=False))
    dialogs = [r for r in records if r.type in ("conversation", "ref_qa")]
    assert any(len(r.data["rounds"]) > 2 for r in dialogs)  # multi-turn
    assert any(a[0] == b[0] == "ask" for r in dialogs for a, b in zip(r.data["rounds"], r.data["rounds"][1:], strict=False))
    assert all(f.stat().st_size < 200_000 for f in SAMPLES.glob("*.json*"))
    first = next(r for r in records if r.source.endswith("instruct.json"))
    assert first.line == 2  # the array's first element starts on line 2


def test_extension_point_is_consistent():
    assert set(RECORD_TYPES) == set(PROMPTS) == set(RENDERERS) == {"pretrain", "instruct", "conversation", "ref_qa",
                                                                   "conver_has_api"}
    # plain text has no chat turns; gdGPT's api turns render with the default template in chat mode too
    assert set(CHAT_MESSAGES) == set(RECORD_TYPES) - {"pretrain", "conver_has_api"}
    assert {name: record_type(rec) for name, rec in RECORDS.items()} == {
        "pretrain": "pretrain", "instruct_input": "instruct", "instruct_no_input": "instruct",
        "instruct_empty_input": "instruct", "conversation": "conversation", "conversation_one_turn": "conversation",
        "ref_qa": "ref_qa"}


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
    assert render(RECORDS["pretrain"], eos, TemplateSettings(pretrain_eos=False)).text == RECORDS["pretrain"]["text"]

    conv = render(RECORDS["conversation"], eos)
    assert conv.text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n\n### Human: Hi!\n### Human: What is 2 plus 3?\n"
        "### Assistant: 2 plus 3 is 5.</s>\n### Human: “河流”的英文是什么？\n### Assistant: River.</s>\n"
    )
    # the space after the role marker starts the answer (trained); the prompt ends at the colon
    assert [conv.text[a:b] for a, b in conv.spans] == [" 2 plus 3 is 5.</s>", " River.</s>"]
    assert [conv.text[:b].endswith("### Assistant:") for b in conv.prompt_ends] == [True, True]
    assert conv.prompt_ends == tuple(a for a, _ in conv.spans)
    ref = render(RECORDS["ref_qa"], eos)
    assert ref.text == (
        "Generate responses to the given instruction series according to the reference text.\n\n### Reference:\n"
        "The ferry leaves every 40 minutes; a ticket is {3} dollars.\n\n### Instruction: How often?\n"
        "### Response: Every 40 minutes.</s>\n### Instruction: Cost?\n### Instruction: For kids?\n"
        "### Response: Three dollars; nothing is said about children.</s>\n"
    )
    assert [ref.text[a:b] for a, b in ref.spans] == [" Every 40 minutes.</s>", " Three dollars; nothing is said about children.</s>"]


@pytest.mark.parametrize("name, role", [("conversation", "### Assistant:"), ("conversation_one_turn", "### Assistant:"),
                                        ("ref_qa", "### Response:")])
def test_render_prompt_is_the_training_text_before_the_next_answer(name, role):
    rec, eos = RECORDS[name], "</s>"
    full = render(rec, eos)
    prompt = render_prompt(rec, eos)  # a record ending with its answer: the text before that answer
    assert full.text.startswith(prompt) and prompt.endswith(role) and full.spans[-1][0] == len(prompt)
    asking = {**rec, "rounds": rec["rounds"][:-1]}  # what a user sends at inference: rounds ending with a question
    assert render_prompt(asking, eos) == prompt
    if len(full.spans) > 1:
        with pytest.raises(ValueError, match="EOS"):  # earlier answers end with EOS, as in training
            render_prompt(asking)
    else:
        assert render_prompt(asking) == prompt


def test_template_settings_pick_the_trained_spans():
    rec, eos = RECORDS["conversation"], "</s>"
    every = render(rec, eos).spans
    assert render(rec, eos, TemplateSettings(last_answer_only=True)).spans == every[-1:]
    everything = render(rec, eos, TemplateSettings(train_on_prompt=True))
    assert everything.spans == [(0, len(everything.text))]
    with pytest.raises(ValueError, match="cannot both be true"):
        TemplateSettings(train_on_prompt=True, last_answer_only=True)
    with pytest.raises(ValueError, match="'template' must be one of 'default', 'chat'"):
        TemplateSettings(template="chatml")


# --- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_encoding_matches_tokenizer_and_labels_only_answers(tok, name):
    rec = RECORDS[name]
    ids, labels, cut = encode_one(tok, rec, max_seq_len=1024)
    assert not cut
    assert ids == tok(render(rec, tok.eos_token).text)["input_ids"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX and tok.eos_token_id in ids
    assert trained_runs(tok, ids, labels) == [a + tok.eos_token for a in answers_of(rec)]


def test_every_sample_record_labels_exactly_its_answers(tok):
    records = load_records(str(SAMPLES))
    ds = encode_records(records, tok, max_seq_len=4096)
    assert ds.stats.kept == len(records) == 600 and ds.stats.dropped == ds.stats.truncated == 0
    for i, r in enumerate(records):
        s = ds[ds.sample_of_record(i)]
        assert s["input_ids"] == tok(render(r.data, tok.eos_token).text)["input_ids"]
        assert trained_runs(tok, s["input_ids"], s["labels"]) == [a + tok.eos_token for a in answers_of(r.data)]


def test_pretrain_without_eos(tok):
    ids, labels, _ = encode_one(tok, RECORDS["pretrain"], 1024, TemplateSettings(pretrain_eos=False))
    assert tok.eos_token_id not in ids
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == RECORDS["pretrain"]["text"]


def test_a_sample_whose_only_label_is_its_first_token_is_dropped(tmp_path):
    """A sample's first token is never predicted (the loss shifts labels by one): a one-token pretrain text from a
    tokenizer that adds no BOS (Bloom's, Qwen2's) trains nothing and is dropped, not kept as an empty sample (a step of
    such rows logged loss 0.0 and still stepped the optimizer)."""
    from data.encode import encode_records
    from data.records import Record
    from data.tiny_tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(["hello world a b c"] * 10, tmp_path / "tok", 300, "llama3")
    tok.backend_tokenizer.post_processor = None  # no BOS
    assert len(tok("a")["input_ids"]) == 1
    recs = [Record("pretrain", {"text": "a"}, "x.jsonl", 1), Record("pretrain", {"text": "hello world"}, "x.jsonl", 2)]
    ds = encode_records(recs, tok, 64, TemplateSettings(pretrain_eos=False), num_proc=1)
    assert (ds.stats.kept, ds.stats.dropped) == (1, 1) and ds.sample_of_record(0) is None


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


_ENCODE_RANGE = encode_module._encode_range


def _die_after_the_first_range(bounds):
    """A worker killed as the out-of-memory killer kills (SIGKILL) while it encodes."""
    import signal

    if bounds[0] > 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return _ENCODE_RANGE(bounds)


def test_a_tokenization_process_that_dies_is_an_error_not_a_hang(tok, monkeypatch):
    """multiprocessing.Pool replaced a killed worker and waited for its lost task forever (silently, for a week
    under the trainer's patient process group)."""
    records = load_records(str(SAMPLES))
    monkeypatch.setattr(encode_module, "_encode_range", _die_after_the_first_range)
    with pytest.raises(DataError, match=r":0: a tokenization process died \(killed for lack of memory\?\) while 2 "
                       rf"processes encoded {len(records)} records"):
        encode_records(records, tok, 96, num_proc=2)


def _signalled_at_each_range(bounds):
    """What a Ctrl-C (the terminal's whole process group) or a hangup does to a worker."""
    for sig in encode_module.WORKER_IGNORED:
        os.kill(os.getpid(), sig)
    return _ENCODE_RANGE(bounds)


def test_stop_signals_to_the_workers_are_the_parents_to_act_on(tok, monkeypatch):
    """A worker ended by a Ctrl-C was "a tokenization process died (killed for lack of memory?)": the parent (the
    trainer, data.inspect) acts on it."""
    records = load_records(str(SAMPLES))
    one = encode_records(records, tok, 96, num_proc=1)
    monkeypatch.setattr(encode_module, "_encode_range", _signalled_at_each_range)
    two = encode_records(records, tok, 96, num_proc=2)
    assert len(one) == len(two) and (one.input_ids == two.input_ids).all()


def _one_dies_the_other_busy(bounds):
    """One worker killed by the OOM killer while the other encodes a range whose result fills the pipe."""
    import signal

    if bounds[0] > 0:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    return _ENCODE_RANGE(bounds)._replace(input_ids=np.zeros(1_000_000, np.int32))


def test_a_worker_that_dies_beside_a_busy_one_under_the_trainers_handler_is_an_error(tok, monkeypatch):
    """The pool ends the other workers with SIGTERM when one dies; forked from the trainer, they had its SIGTERM
    handler (a note for the next step), kept encoding, then blocked on a full pipe: the run waited forever (the
    other ranks for a week) instead of "a tokenization process died"."""
    import signal
    import threading

    records = load_records(str(SAMPLES))
    monkeypatch.setattr(encode_module, "_encode_range", _one_dies_the_other_busy)
    before = signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's handler notes a SIGTERM for a step boundary
    said = []

    def encode():
        try:
            encode_records(records, tok, 96, num_proc=2)
        except DataError as e:
            said.append(str(e))

    try:
        worker = threading.Thread(target=encode, daemon=True)
        worker.start()
        worker.join(120)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not worker.is_alive(), "the tokenization hung"
    assert said and "a tokenization process died (killed for lack of memory?)" in said[0], said


def _slow_range(bounds):
    """One range encoded, named in the file of PIPEFT_TEST_RANGES."""
    with open(os.environ["PIPEFT_TEST_RANGES"], "a") as f:
        f.write(f"{bounds}\n")
    time.sleep(0.2)
    return _ENCODE_RANGE(bounds)


def test_an_interrupted_tokenization_ends_at_once(tok, monkeypatch, tmp_path):
    """A Ctrl-C (or a stop signal's exception) in the parent while the pool encodes: the pool's exit waited for every
    range left (minutes on a large data set, past a launcher's 30 s before its SIGKILL); only those running finish."""
    records = load_records(str(SAMPLES))
    monkeypatch.setenv("PIPEFT_TEST_RANGES", str(tmp_path / "ranges"))
    monkeypatch.setattr(encode_module, "_encode_range", _slow_range)

    def interrupted(self, part, bounds):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_module._Progress, "done", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_records(records, tok, 96, num_proc=2)
    ranges = -(-len(records) // min(encode_module.MAX_RANGE, -(-len(records) // 16)))
    # the ranges running or queued when the first came back, not all 16 (the two workers take 0.2 s each)
    assert ranges >= 16 and len((tmp_path / "ranges").read_text().splitlines()) <= 10
    assert not multiprocessing.active_children()


def test_long_tokenization_says_what_it_does(tok, monkeypatch, caplog):
    """A cold start of a large data set tokenizes for minutes: a line when it starts, then one every PROGRESS_EVERY s."""
    records = load_records(str(SAMPLES))
    monkeypatch.setattr(encode_module, "MIN_RECORDS_FOR_POOL", 10)
    monkeypatch.setattr(encode_module, "PROGRESS_EVERY", 0.0)
    with caplog.at_level("INFO", logger="data.encode"):
        encode_records(records, tok, 96, num_proc=1)
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == f"data: tokenizing {len(records)} records on 1 process(es) (written to the data cache for the " \
        "next start)"
    assert len(said) == 8 and said[-1].startswith("data: tokenized ") and said[-1].endswith(f" of {len(records)} records")


def test_few_long_records_are_tokenized_by_the_pool(tok, monkeypatch, caplog):
    """Books: fewer records than MIN_RECORDS_FOR_POOL but much text are tokenized on every core, after the start
    line (they were tokenized on one core, without a word)."""
    records = load_records(str(SAMPLES))
    text = sum(len(r.data.get("output", "")) for r in records)  # the instruct records' answers alone
    assert 1000 < text and len(json.dumps([r.data for r in records])) < 10**6
    monkeypatch.setattr(encode_module, "MIN_CHARS_FOR_POOL", 10**6)
    assert not encode_module.pooled(records)
    monkeypatch.setattr(encode_module, "MIN_CHARS_FOR_POOL", 1000)
    monkeypatch.setattr(encode_module, "usable_cores", lambda: 2)
    with caplog.at_level("INFO", logger="data.encode"):
        pooled = encode_records(records, tok, 96)
    assert caplog.records[0].getMessage().startswith(f"data: tokenizing {len(records)} records on 2 process(es)")
    alone = encode_records(records, tok, 96, num_proc=1)
    assert (pooled.input_ids == alone.input_ids).all() and (pooled.labels == alone.labels).all()


def test_training_prints_the_tokenization_progress(ops_model, tmp_path):
    """What `python train_ds.py` prints on a cold start: the start line and the progress lines (logging is set up by
    no training module, so they must not go through the root logger, which drops INFO). A global batch of more
    samples than the data has stops the run once the data are read, before the model is built."""
    from tests.helpers import ops_config, pythonpath

    topo = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}}
    cfg = ops_config(tmp_path, ops_model, max_steps=1, model_topo=topo, train_micro_batch_size_per_gpu=65,
                     gradient_accumulation_steps=1)
    script = ("import sys; import data.encode as e; e.PROGRESS_EVERY = 0.0; e.MIN_RECORDS_FOR_POOL = 10; "
              f"import train_ds; sys.exit(train_ds.main(['--config', {str(cfg)!r}]))")
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and ("64 samples are fewer than one global batch (65 = micro x accumulation x "
                                     "data-parallel); \"dataloader_drop_last\": false trains them as one smaller "
                                     "batch") in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(re.fullmatch(r"data: tokenizing 64 records on \d process\(es\) \(written to the data cache for the next "
                            r"start\)", line) for line in lines), proc.stdout
    assert any(re.fullmatch(r"data: tokenized \d+ of 64 records", line) for line in lines), proc.stdout
    assert not any(line.startswith("data: 64 records -> 64 samples kept") for line in proc.stdout.splitlines()
                   + proc.stderr.splitlines())  # only the progress: the trainer prints its own summary line


def test_cache_hit_is_identical_and_key_tracks_inputs(tok, tmp_path):
    data = write(tmp_path / "d.json", json.dumps([RECORDS["instruct_input"], RECORDS["pretrain"]]))
    first = load_dataset(data, tok, 200)
    assert not first.stats.cache_hit and Path(first.stats.cache_path).parent == tmp_path / ".cache"
    assert (tmp_path / ".cache" / ".gitignore").read_text() == "*\n"
    second = load_dataset(data, tok, 200)
    assert second.stats.cache_hit and second.stats.cache_path == first.stats.cache_path
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    assert second.stats.kept == first.stats.kept == 2
    assert second.stats.prompted == first.stats.prompted == 1  # the instruct record, not the pretrain text
    assert not load_dataset(data, tok, 199).stats.cache_hit  # max_seq_len is in the key
    for settings in (TemplateSettings(pretrain_eos=False), TemplateSettings(train_on_prompt=True),
                     TemplateSettings(last_answer_only=True)):  # template settings too
        assert not load_dataset(data, tok, 200, settings=settings).stats.cache_hit
    write(data, json.dumps([RECORDS["pretrain"]]))
    changed = load_dataset(data, tok, 200, cache_dir=tmp_path / "elsewhere")
    assert not changed.stats.cache_hit and len(changed) == 1 and changed.stats.prompted == 0
    assert list((tmp_path / "elsewhere").glob("*.tmp")) == []
    whole = Path(changed.stats.cache_path).read_bytes()
    # a damaged, empty or cut short cache (or one with a stats record but no arrays) is encoded again, not a crash
    for damaged in (b"PK\x03\x04 damaged", b"", whole[:-8], whole[:200]):
        Path(changed.stats.cache_path).write_bytes(damaged)
        again = load_dataset(data, tok, 200, cache_dir=tmp_path / "elsewhere")
        assert not again.stats.cache_hit and again[0] == changed[0]
    assert load_dataset(data, tok, 200, cache_dir=tmp_path / "elsewhere").stats.cache_hit  # and written whole again
    # a file's name is in the key: its suffix picks the parser, and a cache hit does not read the records again
    data.rename(tmp_path / "d.jsonl")  # a JSON array is not JSONL
    with pytest.raises(DataError, match=r"d\.jsonl:1: "):
        load_dataset(tmp_path / "d.jsonl", tok, 200, cache_dir=tmp_path / "elsewhere")


def test_a_tokenizer_that_splits_special_tokens_is_refused(sample_tokenizer_dir, tmp_path):
    """`split_special_tokens` reads the EOS the templates write as characters: no answer would end with it."""
    from data.encode import encode_prompt, tokenizer_fingerprint

    plain = AutoTokenizer.from_pretrained(str(sample_tokenizer_dir))
    split = AutoTokenizer.from_pretrained(str(sample_tokenizer_dir), split_special_tokens=True)
    assert tokenizer_fingerprint(split) != tokenizer_fingerprint(plain)  # a cache of one is never the other's
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["pretrain"]))
    load_dataset(data, plain, 64)
    with pytest.raises(DataError, match=r'the tokenizer has "split_special_tokens": true, which reads .* as plain'):
        load_dataset(data, split, 64)
    with pytest.raises(ValueError, match="split_special_tokens"):
        encode_prompt(split, RECORDS["instruct_input"])


# --- paths and problem collection (the malformed-record corpus: test_data_malformed.py) -------------


def test_missing_paths(tmp_path):
    with pytest.raises(DataError) as e:
        load_records([str(tmp_path / "nope.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path), 7, None])
    assert e.value.problems == [f"{tmp_path / 'nope.jsonl'}:0: file not found",
                                f"{tmp_path / '*.jsonl'}:0: no file matches this pattern",
                                f"{tmp_path}:0: directory has no data files (.json, .jsonl, .csv, .parquet, .arrow)",
                                "data_path:0: item 3 of the list must be a path (a string), got 7",
                                "data_path:0: item 4 of the list must be a path (a string), got null"]

    (tmp_path / "set [v2]").mkdir()  # a directory named with brackets
    write(tmp_path / "set [v2]" / "a.jsonl", jsonl({"text": "one"}))
    with pytest.raises(DataError) as e:
        load_records(str(tmp_path / "set [v2]" / "*.jsonl"))
    literal = str(tmp_path / "set [[]v2]" / "*.jsonl")
    assert e.value.problems == [f"{tmp_path / 'set [v2]' / '*.jsonl'}:0: no file matches this pattern ('[...]' is a "
                                f"glob's set of characters: {literal} takes the brackets as they are)"]
    assert [r.data["text"] for r in load_records(literal)] == ["one"]


def test_a_file_named_twice_is_read_once_under_any_spelling(tmp_path, monkeypatch):
    """The same file by the same path, by a glob and a directory, by a relative and an absolute path, or through a
    link: read once, under its first spelling (a relative and an absolute path were read twice)."""
    write(tmp_path / "a.jsonl", jsonl({"text": "one"}))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    monkeypatch.chdir(tmp_path)
    spellings = ["a.jsonl", str(tmp_path / "a.jsonl"), "*.jsonl", str(tmp_path), "link.jsonl", "./a.jsonl"]
    assert [r.data["text"] for r in load_records(spellings)] == ["one"]
    assert resolve_files(spellings) == [Path("a.jsonl")]


def test_a_data_file_that_links_to_nothing_is_named_not_passed_over(tmp_path):
    """In a directory or a glob, a data file that is a dangling link (moved on a shared disk) was left out silently,
    and training went on with the other files."""
    write(tmp_path / "a.jsonl", jsonl({"text": "kept"}))
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "moved" / "b.jsonl")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "moved" / "notes.txt")  # a directory reads no .txt: no word
    said = [f"{tmp_path / name}:0: a link to {tmp_path / 'moved' / name}, which does not exist"
            for name in ("b.jsonl", "notes.txt")]
    for path, problems in ((tmp_path, said[:1]), (str(tmp_path / "*.jsonl"), said[:1]), (str(tmp_path / "*"), said)):
        with pytest.raises(DataError) as e:  # a glob stands for every file it matches
            resolve_files(path)
        assert e.value.problems == problems


def test_a_directory_skips_hidden_files_and_refuses_a_suffix_in_other_case(tmp_path):
    write(tmp_path / "a.jsonl", jsonl({"text": "kept"}))
    write(tmp_path / ".b.jsonl", jsonl({"text": "hidden, as a glob leaves it"}))
    assert [r.data["text"] for r in load_records(tmp_path)] == ["kept"] == [r.data["text"] for r in
                                                                           load_records(str(tmp_path / "*.jsonl"))]
    write(tmp_path / "c.JSONL", jsonl({"text": "not skipped without a word"}))
    with pytest.raises(DataError) as e:
        load_records(tmp_path)
    assert e.value.problems == [f"{tmp_path / 'c.JSONL'}:0: unsupported file type '.JSONL'; rename it to '.jsonl'"]


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


def run_inspect(*args: str, as_file: bool = False) -> subprocess.CompletedProcess:
    how = ["data/inspect.py"] if as_file else ["-m", "data.inspect"]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed's detection warning: not stdout
    return subprocess.run([sys.executable, *how, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("as_file", [False, True], ids=["module", "file"])
def test_inspect_json_equals_encoder(tok, sample_tokenizer_dir, tmp_path, as_file):
    """`python -m data.inspect` and `python data/inspect.py` (which must not shadow the stdlib's inspect)."""
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["pretrain"], RECORDS["instruct_input"], RECORDS["instruct_no_input"]))
    cfg = make_config(tmp_path, sample_tokenizer_dir, data)
    out = run_inspect("--config", str(cfg), "--index", "1", "--json", as_file=as_file)
    assert out.returncode == 0, out.stderr
    expected = load_dataset(data, tok, 256, use_cache=False)
    assert json.loads(out.stdout) == expected[expected.sample_of_record(1)]
    assert "cache written" in out.stderr or as_file


def test_data_does_not_import_training():
    """data/ is the lower layer: importing any of its modules (the inspect CLI included) loads nothing of training/."""
    code = ("import sys, data.inspect, data.encode, data.packing, data.collate, data.chat, data.boundary; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_inspect_human_view_and_errors(sample_tokenizer_dir, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["instruct_no_input"], RECORDS["conversation"]))
    cfg = make_config(tmp_path, sample_tokenizer_dir, data)
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "[[revir</s>]]" in out and "### Response:\n[[" in out and "2 records, 2 samples, 0 dropped" in out
    assert data_inspect.main(["--config", str(cfg), "--index", "1"]) == 0  # a conversation: every answer marked
    out = capsys.readouterr().out
    assert "trained in 2 span(s)" in out
    text = out.split("--- text (trained: [[ ]]) ---\n")[1].split("\n--- tokens")[0]
    assert text.replace("[[", "").replace("]]", "") == "<s>" + render(RECORDS["conversation"], "</s>").text
    assert [m.removeprefix(" ") for m in re.findall(r"\[\[(.*?)\]\]", text)] == ["2 plus 3 is 5.</s>", "River.</s>"]
    assert data_inspect.main(["--config", str(cfg), "--index", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    write(cfg, json.dumps({"model_path": str(sample_tokenizer_dir), "data_path": str(data)}))
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 2
    assert capsys.readouterr().err == f"python -m data.inspect: error: {cfg}: missing required key 'save_path'\n"


def test_inspect_shows_the_seam_space_of_a_sentencepiece_answer(sp_tokenizer_dir, tmp_path, capsys):
    """The marked text is the sample's text: with SentencePiece, an answer run decoded alone lost its first piece's
    space (`▁S` read `S`), so inspect showed `Response:\n[[...` / `Assistant:[[S...` where training has a space."""
    from transformers import AutoTokenizer

    rec = {"rounds": [["ask", "Hi"], ["ans", "Sure thing."]]}
    data = write(tmp_path / "d.jsonl", jsonl(rec))
    assert data_inspect.main(["--config", str(make_config(tmp_path, sp_tokenizer_dir, data)), "--index", "0"]) == 0
    out = capsys.readouterr().out
    text = out.split("--- text (trained: [[ ]]) ---\n")[1].split("\n--- tokens")[0]
    sample = load_dataset(data, AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)), 256, use_cache=False)[0]
    full = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir)).decode(sample["input_ids"])
    assert text.replace("[[", "").replace("]]", "") == full and "[[ Sure thing.</s>]]" in text, text
    first = next(ln for ln in out.split("--- tokens")[1].splitlines() if re.match(r" +\d+ +\d+ +\d+ ", ln))
    assert first.split()[-1].startswith("'▁"), first  # a trained token's line names its piece: the space shows


def test_inspect_stats(tok, sample_tokenizer_dir, tmp_path, capsys):
    long = {"text": "The tide came in. " * 60}
    data = write(tmp_path / "d.jsonl", jsonl(*RECORDS.values(), long))
    cfg = make_config(tmp_path, sample_tokenizer_dir, data, max_seq_len=64)
    assert data_inspect.main(["--config", str(cfg), "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    ds = load_dataset(data, tok, 64)
    lengths = sorted(len(ds[i]["input_ids"]) for i in range(len(ds)))
    labels = [lab for i in range(len(ds)) for lab in ds[i]["labels"]]
    assert stats["records"] == len(RECORDS) + 1 and stats["samples"] == len(ds) == len(lengths)
    assert stats["truncated"] == ds.stats.truncated >= 1 and stats["truncated_fraction"] == ds.stats.truncated / len(ds)
    assert stats["length_percentiles"]["p100"] == lengths[-1] == 64 and stats["length_percentiles"]["p50"] in lengths
    assert stats["trained_tokens"] == sum(lab != IGNORE_INDEX for lab in labels)
    assert stats["trained_fraction"] == stats["trained_tokens"] / len(labels) and stats["packing_efficiency"] is None
    assert data_inspect.main(["--config", str(cfg), "--stats"]) == 0
    out = capsys.readouterr().out
    assert f"truncated: {ds.stats.truncated} of {len(ds)} samples" in out and "packing efficiency (trained / total tokens): n/a" in out
    assert "tokens per sample (after truncation to 64): p50 " in out and ", max 64" in out and "trained tokens: " in out


def test_a_start_whose_data_are_cached_does_not_parse_them_again(tmp_path, sample_tokenizer_dir, monkeypatch):
    """The trainer validates every record once the process group forms (local rank 0 of each node); a cache of the
    very same bytes means they were valid when it was written, so a warm start skips the parse (16 s and ~1 GB that
    stayed resident at 1M records). Bad records are still found on a cold start."""
    import training.trainer as trainer_module
    from training.config import load_config

    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["pretrain"], RECORDS["instruct_input"]))
    cfg = load_config(make_config(tmp_path, sample_tokenizer_dir, data), require_model=False)
    parsed = []
    real = encode_module.records_from_files
    monkeypatch.setattr(encode_module, "records_from_files", lambda files: parsed.append(files) or real(files))
    trainer = trainer_module.Trainer(cfg)
    trainer.validate_data()
    assert len(parsed) == 1  # cold: parsed
    load_dataset(data, trainer.tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.template_settings)  # the cache
    parsed.clear()
    trainer.validate_data()
    assert not parsed  # warm: not parsed again
    write(data, '{"text": ""}\n')
    with pytest.raises(DataError, match="d.jsonl:1: "):
        trainer.validate_data()
    trainer.close()


def test_a_problem_another_node_found_in_its_copy_of_the_data_says_so():
    """Every rank raises the first problem any rank found (local rank 0 of each node checks its copy): another node's
    problems, printed on this node, name the rank and node that found them (this copy may not hold them)."""
    from training.trainer import found_elsewhere

    every = [(None, "a"), (None, "a"), ((["d.jsonl:3: missing field 'output'"], None), "b"), (None, "b")]
    assert found_elsewhere(every, "b").problems == ["d.jsonl:3: missing field 'output'"]
    assert found_elsewhere(every, "a").problems == ["rank 2 on b found these problems in its copy of the data:",
                                                     "d.jsonl:3: missing field 'output'"]
    assert found_elsewhere([(None, "a")] * 2, "a") is None


def test_a_killed_writers_cache_temp_file_is_removed_by_the_next_write(tok, tmp_path):
    data = write(tmp_path / "d.jsonl", jsonl(RECORDS["pretrain"]))
    cache = tmp_path / ".cache"
    cache.mkdir()
    old, recent = cache / "encoded-abc.npzx1.tmp", cache / "encoded-abc.npzx2.tmp"
    for f in (old, recent):
        f.write_bytes(b"\0" * 100)
    os.utime(old, (0, 0))
    load_dataset(data, tok, 64)
    assert not old.exists() and recent.exists()  # another writer may be writing the recent one


def test_a_tokenizer_without_vocabulary_is_told_from_one_of_another_script(sp_tokenizer_dir, tmp_path):
    """vocabulary_problem refuses a tokenizer of added tokens only (tokenizer_config.json without tokenizer.json /
    tokenizer.model), not a working one that encodes Latin text to nothing (trained on Chinese, no unk) or raises on
    it (WordLevel without [UNK]): it decides from the vocabulary, not from encoding a probe text."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from data.tokenizer_checks import vocabulary_problem

    zh = Tokenizer(models.BPE())
    zh.pre_tokenizer = pre_tokenizers.Whitespace()
    zh.train_from_iterator(["流水线并行把模型的层切分到多个设备上。"] * 5, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<s>", "</s>", "<pad>"]))
    words = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4}))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    for backend in (zh, words):
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        assert vocabulary_problem(tok) is None
    (tmp_path / "empty").mkdir()
    shutil.copy(sp_tokenizer_dir / "tokenizer_config.json", tmp_path / "empty")
    empty = AutoTokenizer.from_pretrained(str(tmp_path / "empty"))
    assert vocabulary_problem(empty).startswith("the tokenizer encodes text to no tokens: it has no vocabulary")
    assert vocabulary_problem(AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))) is None
