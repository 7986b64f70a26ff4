"""data.inspect against training: it counts and marks as trained the tokens the loss counts (data.packing's one
definition), and with split_long_pretrain it says where every chunk of a long record is packed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data import inspect as data_inspect
from data.encode import load_dataset
from data.packing import pack, trained_tokens
from data.templates import TemplateSettings

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, tokenizer_dir: Path, data: Path, **extra) -> list[str]:
    cfg = {"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": 64, "train_micro_batch_size_per_gpu": 1, **extra}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return ["--config", str(tmp_path / "cfg.json")]


def test_inspect_counts_what_the_loss_counts_without_a_bos(tokenizer_dir, tmp_path, capsys):
    """A tokenizer that adds no BOS (Bloom's, Qwen's): a pretrain sample's first token carries its label, but nothing
    predicts it (the loss shifts labels; packing sets it to -100) and training does not count it. Inspect counted and
    marked it trained: 24 of 24 where the trainer counts 22."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None  # no BOS
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    first = tok("The quick brown fox.", add_special_tokens=True)["input_ids"][0]
    assert first != tok.bos_token_id and tok.decode([first]) == "The"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ("Each stage owns a contiguous slice of layers.", "The quick brown fox.")))
    args = config(tmp_path, tok_dir, data)
    ds = load_dataset(data, tok, 64)
    learned = trained_tokens(ds)
    assert data_inspect.main([*args, "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["trained_tokens"] == int(learned.sum()) == stats["tokens"] - 2
    assert data_inspect.main([*args, "--stats"]) == 0
    assert f"trained tokens: {int(learned.sum())} of {stats['tokens']} " in capsys.readouterr().out
    assert data_inspect.main([*args, "--index", "1"]) == 0
    out = capsys.readouterr().out
    sample = ds.sample_of_record(1)
    assert f"record 1 at {data}:2 -> sample {sample}: 6 tokens, {learned[sample]} trained in 1 span(s)" in out and learned[sample] == 5
    text = out.split("--- text (trained: [[ ]]) ---\n")[1].split("\n--- tokens")[0]
    assert text == "The[[ quick brown fox.</s>]]", text
    rows = [ln.split() for ln in out.split("--- tokens")[1].splitlines()[1:]]
    assert rows[0][:3] == ["0", str(first), "-"] and all(r[2] != "-" for r in rows[1:]), rows
    assert data_inspect.main([*args, "--index", "1", "--json"]) == 0  # the sample's own labels, as encoded
    assert json.loads(capsys.readouterr().out) == ds[sample]


def test_a_ctrl_c_while_tokenizing_is_one_line(tokenizer_dir, tmp_path, capsys, monkeypatch):
    """A cold --stats of a large data set tokenizes for minutes: a Ctrl-C then was a 34-line traceback."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox."}) + "\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_inspect, "load_dataset", interrupted)
    assert data_inspect.main([*config(tmp_path, tokenizer_dir, data), "--stats"]) == 130
    assert capsys.readouterr().err == "python -m data.inspect: interrupted: the data cache is as it was (a cache file " \
        "is written whole)\n"


def test_inspect_says_where_every_chunk_of_a_split_record_is(tokenizer_dir, tokenizer, tmp_path, capsys):
    """split_long_pretrain cuts a long pretrain record into chunks packed into several sequences: --index showed the
    sequence of its first chunk only, and did not say there were others."""
    data = tmp_path / "d.jsonl"
    long = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 12
    data.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"text": long}, *({"text": f"Each stage owns a slice {i}."} for i in range(6))]))
    args = config(tmp_path, tokenizer_dir, data, packing=True, split_long_pretrain=True)
    ds = load_dataset(data, tokenizer, 64, settings=TemplateSettings(packing=True, split_long_pretrain=True))
    packed = pack(ds, 64, seed=42)
    sample = ds.sample_of_record(0)
    segs = np.flatnonzero(packed.segment_sample == sample)
    rows = [int(np.searchsorted(packed.row_segments, s, side="right")) - 1
            for s in segs[np.argsort(packed.segment_chunk[segs])]]
    n = len(rows)
    assert n >= 4 and len(set(rows)) == n
    assert data_inspect.main([*args, "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert f"record 0 at {data}:1 -> sample {sample} -> packed sequence {rows[0]}: " in out
    assert (f"sample {sample} is cut into {n} chunks (split_long_pretrain): chunk 1 is shown; chunks 2..{n} are in "
            f"packed sequences {', '.join(map(str, rows[1:]))}") in out, out
    assert re.search(rf"=== segment \d+: record 0 at {re.escape(str(data))}:1, sample {sample}, chunk 1 of {n}, tokens ",
                     out), out
    short = ds.sample_of_record(1)
    assert data_inspect.main([*args, "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "cut into" not in out.split("\n=== segment")[0] and f"record 1 at {data}:2, sample {short}, tokens " in out


def test_a_record_is_named_by_its_file_and_line_and_found_by_them(tokenizer_dir, tmp_path, capsys, monkeypatch):
    """Warnings and errors name a record by FILE:LINE, --index took its number only and showed no place: now each
    record shown is named by both, and --index takes FILE:LINE too (the line a record starts at: a blank line of a
    .jsonl with a BOM and \\r\\n endings and a pretty-printed .json array counted; FILE:1 (record K) in a one-line array, as
    pandas writes it), the same record with the same output."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(("\ufeff\n" + json.dumps({"text": "Each stage owns a contiguous slice of layers."})
                                    + "\r\r\n\r\n" + json.dumps({"text": "The quick brown fox."}) + "\r\n").encode())
    # a BOM, then a blank line 1; a lone \r ends no line (the parser splits at \n only): records at lines 2 and 4
    (data / "c.json").write_text(json.dumps([{"text": f"Record {k} of a one-line array."} for k in (1, 2, 3)]))
    long = " ".join(["Name the seven colours of a rainbow."] * 30)  # no answer token within max_seq_len: dropped
    (data / "b.json").write_text(json.dumps([{"instruct": "Add 2 and 3.", "output": "5"},
                                             {"instruct": long, "output": "Red and the rest."}], indent=1))
    starts = [n for n, ln in enumerate((data / "b.json").read_text().splitlines(), 1) if ln.strip() == "{"]
    places = [f"{data / 'a.jsonl'}:2", f"{data / 'a.jsonl'}:4", *(f"{data / 'b.json'}:{n}" for n in starts),
              *(f"{data / 'c.json'}:1 (record {k})" for k in (1, 2, 3))]  # as pandas' to_json writes it: one line
    args = config(tmp_path, tokenizer_dir, data, max_seq_len=96)
    for n, place in [*enumerate(places[:3]), (5, places[5])]:
        assert data_inspect.main([*args, "--index", str(n)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"record {n} at {place} -> sample {n - (n > 3)}: "), out  # record 3: dropped
        assert data_inspect.main([*args, "--index", place]) == 0
        assert capsys.readouterr().out == out
    monkeypatch.chdir(tmp_path)  # a relative FILE, as the user's shell has it
    assert data_inspect.main([*args, "--index", "data/a.jsonl:04"]) == 0
    assert capsys.readouterr().out.startswith(f"record 1 at {places[1]} -> ")
    for index, said in [(places[3], f"record 3 at {places[3]} was dropped: no trained token within max_seq_len=96"),
                        (f"{data / 'a.jsonl'}:3", f"--index {data / 'a.jsonl'}:3: no record of {data / 'a.jsonl'} "
                                                  "starts at line 3; the one before it starts at line 2"),
                        (f"{data / 'c.json'}:1", f"--index {data / 'c.json'}:1: 3 records start at line 1 of "
                                                 f"{data / 'c.json'}: name one, {places[4]} to {places[6]}"),
                        (f"{tmp_path}/c.jsonl:1", f"--index {tmp_path}/c.jsonl:1: {tmp_path}/c.jsonl is not one of the "
                                                  f"data files of data_path (3 files: {data / 'a.jsonl'}, "
                                                  f"{data / 'b.json'}, {data / 'c.json'})")]:
        assert data_inspect.main([*args, "--index", index]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m data.inspect: error: {said}"
    with pytest.raises(SystemExit) as e:  # not a place: refused before the data are read
        data_inspect.main([*args, "--index", "a.jsonl"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("error: argument --index: 'a.jsonl': give a record number (0-based) or FILE:LINE\n") and \
        "data:" not in err, err


def test_stats_with_packing_on_and_no_sample_kept_say_packing_on(tokenizer_dir, tmp_path, capsys):
    """Packing on, every record dropped (no trained token within max_seq_len): an empty PackedDataset is falsy, and
    the statistics said "packing off"."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruct": "Name the seven colours of a rainbow.", "output": "Red and the rest."}) + "\n")
    args = config(tmp_path, tokenizer_dir, data, max_seq_len=4, packing=True)
    assert data_inspect.main([*args, "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["samples"], stats["dropped"], stats["sequences"], stats["packing_efficiency"]) == (0, 1, 0, 0.0)
    assert data_inspect.main([*args, "--stats"]) == 0
    assert "packing off" not in capsys.readouterr().out


def test_output_to_a_reader_that_stopped_is_no_traceback(tokenizer_dir, tmp_path):
    """`python -m data.inspect ... | head -1`: head exits after its line, and the next write was a BrokenPipeError
    traceback and exit code 1. Here the reader is gone before the first write."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "Each stage owns a contiguous slice of layers."}) + "\n")
    args = config(tmp_path, tokenizer_dir, data)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "data.inspect", *args, "--index", "0"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_tokenizer_past_the_models_vocabulary_is_refused_as_training_refuses_it(tokenizer_dir, tmp_path, capsys):
    """inspect shows what training trains: with ids past the model's embedding rows training refuses the config, so
    inspect does too (it showed them as ordinary tokens)."""
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "Pipeline parallelism splits the layers."}) + "\n")
    args = config(tmp_path, model, data)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 500}))
    assert data_inspect.main([*args, "--index", "0"]) == 2
    assert capsys.readouterr().err == (f"python -m data.inspect: error: {model}: the model's vocab_size 500 "
                                       "is smaller than the tokenizer's 512 tokens (ids >= 500 have no embedding row); "
                                       "resize the model's embeddings or use its own tokenizer\n")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512}))
    assert data_inspect.main([*args, "--index", "0"]) == 0
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert data_inspect._vocab_size(model) == 32000  # as training reads it: transformers' default where none is set
    assert data_inspect.main([*args, "--index", "0"]) == 0
    (model / "config.json").write_text(json.dumps({"model_type": "bloom", "vocab_size": 300}))
    assert data_inspect.main([*args, "--index", "0"]) == 2
    assert "the model's vocab_size 300 is smaller than the tokenizer's 512 tokens" in capsys.readouterr().err
