"""What the model is prompted with at inference is exactly the token prefix it was trained on.

For every answer of data/samples, with three kinds of tokenizer built here (byte-level BPE with GPT-2's
pre-tokenizer, a Llama-2-style SentencePiece model, a byte-level BPE with Llama-3's split pattern), in the
default templates and in chat-template mode: the prompt's ids (`encode_prompt`, what demo.py sends) are a
prefix of the training ids, the prompt's last token is not trained and the first token after it is. On the
samples no boundary needs a splice, so the prompt is also the plain `tokenizer(render_prompt(...))` /
`apply_chat_template(..., add_generation_prompt=True)` any serving stack would send. Records built so that
a tokenizer joins the prompt's end with the answer's start are spliced, still keep the property, and are
counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.encode import IGNORE_INDEX, encode_one, encode_prompt, encode_records
from data.records import Record, load_records, record_type
from data.templates import CHAT_MESSAGES, TemplateSettings, render, render_prompt
from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
KINDS = {"bpe": "chatml", "sentencepiece": "chatml", "llama3": "llama3"}  # tokenizer kind -> its chat template
MODES = {"default": TemplateSettings(), "chat": TemplateSettings(template="chat")}


# Answers that start where a pre-tokenizer joins them with the prompt's end: GPT-2's `\s+(?!\S)` makes
# "\n" + "  x" one "\n " token; Llama-3's `[^\s\p{L}\p{N}]+[\r\n]*` makes ":\n" + "\nx" one ":\n\n" token.
JOINED = [
    {"instruct": "List two colours.", "output": "\n\n- red\n- blue"},
    {"instruct": "Indent the word.", "output": "  indented"},
    {"instruct": "Quote it.", "input": "a fox", "output": "\"a fox\""},
    {"rounds": [["ask", "Start with a newline."], ["ans", "\nok"], ["ask", "And spaces?"], ["ans", "   fine"],
                ["ask", "Digits?"], ["ans", "123456"]]},
    {"reference": "Two lines.", "rounds": [["ask", "Say it"], ["ans", "\n\nline one\nline two"]]},
]


@pytest.fixture(scope="module", params=sorted(KINDS))
def tok(request, tmp_path_factory):
    """Trained on the samples and on rendered records (as real tokenizers have seen templates), so that the
    vocabulary has the merges across boundaries that JOINED exercises ("\n\n", ":\n\n", "\n ")."""
    path = tmp_path_factory.mktemp(request.param)
    rendered = [render(r, "</s>").text for r in JOINED] * 50
    train_tiny_tokenizer(_texts_from_records(SAMPLES) + rendered, path, 1000, request.param, KINDS[request.param])
    return AutoTokenizer.from_pretrained(str(path))


def prompts_of(rec: dict) -> list[dict]:
    """One inference-time record per answer: the record up to (without) that answer."""
    kind = record_type(rec)
    if kind == "instruct":
        return [{k: v for k, v in rec.items() if k != "output"}]
    if kind == "pretrain":
        return []
    return [{**rec, "rounds": rec["rounds"][:i]} for i, (role, _) in enumerate(rec["rounds"]) if role == "ans"]


def plain_prompt(tok, rec: dict, settings: TemplateSettings) -> list[int]:
    """The prompt as any serving stack builds it, without data.boundary."""
    if settings.template == "chat":
        return tok.apply_chat_template(CHAT_MESSAGES[record_type(rec)](rec), add_generation_prompt=True)["input_ids"]
    return tok(render_prompt(rec, tok.eos_token))["input_ids"]


def assert_prefix(ids: list[int], labels: list[int], prompt: list[int]) -> None:
    n = len(prompt)
    assert ids[:n] == prompt
    assert labels[n - 1] == IGNORE_INDEX and labels[n] == ids[n]  # the answer's first token is the first trained


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_answer_of_the_samples_is_prompted_with_its_training_prefix(tok, mode):
    settings = MODES[mode]
    records = load_records(str(SAMPLES))
    ds = encode_records(records, tok, 4096, settings)
    assert ds.stats.kept == len(records) and ds.stats.truncated == 0
    answers = 0
    for i, r in enumerate(records):
        s = ds[ds.sample_of_record(i)]
        for rec in prompts_of(r.data):
            prompt = encode_prompt(tok, rec, settings)
            assert_prefix(s["input_ids"], s["labels"], prompt)
            assert prompt == plain_prompt(tok, rec, settings)  # no splice needed on the samples
            answers += 1
    assert answers == 602 and ds.stats.spliced == 0




def plain_full(tok, rec: dict, settings: TemplateSettings) -> list[int]:
    if settings.template == "chat":
        return tok.apply_chat_template(CHAT_MESSAGES[record_type(rec)](rec))["input_ids"]
    return tok(render(rec, tok.eos_token).text)["input_ids"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_joined_boundaries_are_spliced_and_keep_the_prefix(tok, mode):
    """Spliced exactly where plain tokenization breaks the prefix property; the property holds everywhere."""
    settings = MODES[mode]
    broken = []
    for rec in JOINED:
        ids, labels, _ = encode_one(tok, rec, 4096, settings)
        full = plain_full(tok, rec, settings)
        assert tok.decode(ids) == tok.decode(full)  # the same text, tokenized at the boundaries
        for prompt_rec in prompts_of(rec):
            assert_prefix(ids, labels, encode_prompt(tok, prompt_rec, settings))
        plain = [plain_prompt(tok, r, settings) for r in prompts_of(rec)]
        broken.append(any(full[:len(p)] != p for p in plain))
        assert (ids == full) != broken[-1]  # untouched unless plain tokenization breaks the property
    ds = encode_records([Record(record_type(r), r, "joined.jsonl", i + 1) for i, r in enumerate(JOINED)], tok, 4096,
                        settings)
    assert ds.stats.spliced == sum(broken)
    if mode == "default" and type(tok).__name__ != "LlamaTokenizer":
        assert ds.stats.spliced > 0  # byte-level BPE joins ":\n" + "\n" (Llama-3) or "\n" + "  " (GPT-2)


def test_inspect_stats_count_the_spliced_samples(tok, tmp_path, capsys):
    import json

    from data import inspect as data_inspect

    data = tmp_path / "joined.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in JOINED))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_path": tok.name_or_path, "save_path": str(tmp_path / "out"), "max_seq_len": 256,
                               "data_path": str(data), "train_micro_batch_size_per_gpu": 1}))
    expected = encode_records(load_records(data), tok, 256).stats.spliced
    assert data_inspect.main(["--config", str(cfg), "--stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spliced"] == expected
    assert data_inspect.main(["--config", str(cfg), "--stats"]) == 0
    assert f"prompt / answer boundary split: {expected} of {len(JOINED)} samples" in capsys.readouterr().out
