"""Chat-template mode ("template": "chat"), train_on_prompt / last_answer_only, and their config keys.

Acceptance: for every record type and both template modes, input_ids are the tokenizer's encoding of the
fully rendered text (in chat mode: exactly `apply_chat_template(messages)`, what inference sees) and
exactly the answers (+ EOS / end-of-turn token) carry labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data import inspect as data_inspect
from data.chat import _check_kept
from data.encode import IGNORE_INDEX, encode_one, encode_records, load_dataset
from data.records import DataError, load_records, record_type
from data.templates import CHAT_MESSAGES, TemplateSettings, render, render_prompt
from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer
from tests.helpers import answers_of, trained_runs
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEMPLATES = {"chatml_with_bos": "{{ bos_token }}" + CHATML, "chatml": CHATML}
END = "<|im_end|>"
CHAT = TemplateSettings(template="chat")
RECORDS = {
    "pretrain": {"text": "Tides follow the moon. 潮汐跟着月亮走。"},
    "instruct": {"instruct": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    "instruct_no_input": {"instruct": "把“河流”翻译成英文。", "output": "River."},
    "conversation": {"rounds": [["ask", "Hi!"], ["ask", "What is 2 plus 3?"], ["ans", "2 plus 3 is 5."],
                                ["ask", "And 2 times 3?"], ["ans", "2 times 3 is 6."]]},
    "ref_qa": {"reference": "The ferry leaves every 40 minutes.",
               "rounds": [["ask", "How often does it leave?"], ["ans", "Every 40 minutes."]]},
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def chat_dir(request, tmp_path_factory) -> Path:
    """A tiny tokenizer with ChatML's special tokens and a chat template (with or without BOS), saved."""
    path = tmp_path_factory.mktemp(request.param)
    tok = train_tiny_tokenizer(_texts_from_records(SAMPLES), path, vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END]})
    tok.chat_template = TEMPLATES[request.param]
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def chat_tok(chat_dir):
    return AutoTokenizer.from_pretrained(str(chat_dir))


def inference_ids(tok, rec: dict, settings: TemplateSettings) -> list[int]:
    """What inference sees for the whole record, computed without the data package's renderers."""
    if settings.template == "chat" and record_type(rec) != "pretrain":
        return tok.apply_chat_template(CHAT_MESSAGES[record_type(rec)](rec))["input_ids"]
    return tok(render(rec, tok.eos_token, settings).text)["input_ids"]


# --- acceptance: every type, both modes ------------------------------------------------------


@pytest.mark.parametrize("template", ["default", "chat"])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_ids_are_what_inference_sees_and_only_answers_are_trained(chat_tok, name, template):
    rec, settings = RECORDS[name], TemplateSettings(template=template)
    ids, labels, cut = encode_one(chat_tok, rec, 1024, settings)
    assert not cut and ids == inference_ids(chat_tok, rec, settings)
    chat = template == "chat" and name != "pretrain"
    end = END if chat else chat_tok.eos_token
    assert trained_runs(chat_tok, ids, labels) == [a + end for a in answers_of(rec)]
    assert ids.count(chat_tok.bos_token_id) == (0 if chat and "bos_token" not in chat_tok.chat_template else 1)
    if chat:  # the generation prompt for the last answer is a prefix, and the answer starts right after it
        messages = CHAT_MESSAGES[record_type(rec)](rec)
        prompt = chat_tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]


def test_every_sample_record_in_chat_mode(chat_tok):
    records = load_records(str(SAMPLES))
    ds = encode_records(records, chat_tok, 4096, CHAT)
    assert ds.stats.kept == len(records) and ds.stats.truncated == 0
    for i, r in enumerate(records):
        s = ds[ds.sample_of_record(i)]
        assert s["input_ids"] == inference_ids(chat_tok, r.data, CHAT)
        end = chat_tok.eos_token if r.type == "pretrain" else END
        assert trained_runs(chat_tok, s["input_ids"], s["labels"]) == [a + end for a in answers_of(r.data)]


def test_chat_messages_per_type():
    assert CHAT_MESSAGES["instruct"](RECORDS["instruct"]) == [
        {"role": "user", "content": "Sort the numbers.\n\n3, 1, 2"}, {"role": "assistant", "content": "1, 2, 3"}]
    rec = {**RECORDS["instruct"], "input": ""}  # an empty input is none, in both template modes
    assert CHAT_MESSAGES["instruct"](rec)[0]["content"] == "Sort the numbers."
    without = {k: v for k, v in rec.items() if k != "input"}
    assert render(rec, "</s>") == render(without, "</s>") and render_prompt(rec) == render_prompt(without)
    assert [m["role"] for m in CHAT_MESSAGES["conversation"](RECORDS["conversation"])] == [
        "user", "user", "assistant", "user", "assistant"]
    system, *rest = CHAT_MESSAGES["ref_qa"](RECORDS["ref_qa"])
    assert system == {"role": "system", "content": "Generate responses to the given instruction series according to "
                      "the reference text.\n\n### Reference:\nThe ferry leaves every 40 minutes."}
    assert rest == CHAT_MESSAGES["conversation"](RECORDS["ref_qa"])


# --- train_on_prompt / last_answer_only ------------------------------------------------------


@pytest.mark.parametrize("template", ["default", "chat"])
def test_train_on_prompt_and_last_answer_only(chat_tok, template):
    rec = RECORDS["conversation"]
    base = TemplateSettings(template=template)
    ids, labels, _ = encode_one(chat_tok, rec, 1024, base)
    end = END if template == "chat" else chat_tok.eos_token
    every_ids, every, _ = encode_one(chat_tok, rec, 1024, TemplateSettings(template=template, train_on_prompt=True))
    assert every_ids == ids and every[1:] == ids[1:]  # all but a BOS the tokenizer adds (zero width)
    last_ids, last, _ = encode_one(chat_tok, rec, 1024, TemplateSettings(template=template, last_answer_only=True))
    assert last_ids == ids and trained_runs(chat_tok, ids, last) == [answers_of(rec)[-1] + end]
    assert trained_runs(chat_tok, ids, labels) == [a + end for a in answers_of(rec)]


# --- errors ----------------------------------------------------------------------------------


def test_tokenizer_without_chat_template_is_a_clear_error(tokenizer, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS["conversation"]) + "\n")
    with pytest.raises(DataError) as e:
        load_dataset(data, tokenizer, 64, settings=CHAT)
    assert e.value.problems == [f"{tokenizer_dir}:0: \"template\": \"chat\" needs a tokenizer with a chat template, "
                                "and this one has none (no chat_template.jinja or \"chat_template\" in "
                                "tokenizer_config.json); add one or use \"template\": \"default\""]
    cfg = write_config(tmp_path, tokenizer_dir, data, template="chat")
    assert data_inspect.main(["--config", str(cfg), "--index", "0"]) == 2
    assert capsys.readouterr().err == f"python -m data.inspect: error: {e.value}\n"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_records_a_template_cannot_render_are_reported_with_file_and_line(chat_dir, tmp_path, num_proc):
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + CHATML)
    data = tmp_path / "d.jsonl"
    records = [RECORDS["ref_qa"], RECORDS["conversation"], {"rounds": [["ans", "Welcome!"]]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as e:
        encode_records(load_records(data), tok, 64, CHAT, num_proc=num_proc)
    assert e.value.problems == [
        f"{data}:2: the tokenizer's chat template rejected this record: roles must alternate (messages 0 and 1 are both "
        "user turns); use \"template\": \"default\" for such records",
        f"{data}:3: the first turn is an answer: chat templates need a user message before it"]
    # found while the records are validated, before anything is tokenized: each sequence of roles rendered once
    from data.encode import valid_records
    from data.records import read_files

    with pytest.raises(DataError) as early:
        valid_records(read_files(data), CHAT, tok)
    assert early.value.problems == e.value.problems
    tok.chat_template = "{{ messages | length }}" + CHATML  # earlier text changes as turns are added
    with pytest.raises(DataError, match=rf"^{data}:1: the chat template does not render this record turn by turn"):
        encode_records(load_records(data)[:1], tok, 64, CHAT, num_proc=num_proc)


def test_a_template_that_drops_part_of_a_record_is_a_file_line_error(chat_dir, tmp_path):
    """A ChatML variant that ignores system messages would train ref_qa records without their reference."""
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'system' %}" + CHATML.split("{% for m in messages %}")[1] \
        .replace("{% endfor %}", "{% endif %}{% endfor %}", 1)
    data = tmp_path / "d.jsonl"
    echo = {**RECORDS["ref_qa"], "rounds": [["ask", "What does it say?"], ["ans", RECORDS["ref_qa"]["reference"]]]}
    data.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS["conversation"], RECORDS["ref_qa"], echo]))
    with pytest.raises(DataError) as e:
        load_dataset(data, tok, 128, settings=CHAT, use_cache=False)
    said = ("the chat template dropped message 0 (system: the instruction and reference, 'Generate responses to the "
            "given instruct'); it would never be trained on: use a template that renders system messages, or "
            "\"template\": \"default\"")
    assert e.value.problems == [f"{data}:2: {said}", f"{data}:3: {said}"]  # 3: the answer quotes the reference
    # a template that writes the system message into the last user turn (Mistral-Nemo's) moved it, not dropped message 1
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    with pytest.raises(ValueError, match=r"^the chat template renders message 1 \(user\) before message 0 \(system\): "
                       "it moves or reorders messages"):
        _check_kept("[INST]Q1[/INST]A1</s>[INST]Be brief.\n\nQ2[/INST]", messages)


def test_a_first_turn_answer_is_found_when_the_records_are_validated(chat_dir, tmp_path, monkeypatch):
    """No chat template renders an answer first: the trainer's validation (before anything is written) says so, in
    the words encoding uses, and loading says so before tokenizing anything (it tokenized every record first)."""
    import training.trainer as trainer_module
    from data import encode as encode_module

    data = tmp_path / "d.jsonl"
    records = [RECORDS["conversation"], {"rounds": [["ans", "Welcome!"], ["ask", "Hi"], ["ans", "Hello"]]},
               RECORDS["ref_qa"], {"type": "conversation", "rounds": [["ans", "Again."]]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    first = "the first turn is an answer: chat templates need a user message before it"
    expected = [f"{data}:2: {first}", f"{data}:4: {first}"]
    trainer = trainer_module.Trainer(load_config(write_config(tmp_path, chat_dir, data, template="chat"),
                                                 require_model=False))
    with pytest.raises(DataError) as e:
        trainer.validate_data()
    trainer.close()
    assert e.value.problems == expected
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    load_dataset(data, tok, 64, use_cache=False)  # the default template renders them
    monkeypatch.setattr(encode_module, "encode_batch", lambda *a: pytest.fail("tokenized"))
    with pytest.raises(DataError) as e:
        load_dataset(data, tok, 64, settings=CHAT, use_cache=False)
    assert e.value.problems == expected
    monkeypatch.undo()
    # one rule, also where a record is rendered (encode_one, demo.py's prompts)
    with pytest.raises(ValueError, match=f"^{first}$"):
        encode_one(tok, records[1], 64, CHAT)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_encoding_stops_once_a_data_error_is_full(chat_dir, tmp_path, num_proc):
    """A DataError shows MAX_SHOWN problems: encoding stops after the range where that many are found, and says
    that the records after it were not checked (it encoded every record first: minutes at 1M records)."""
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + CHATML)
    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps({"rounds": [["ask", "Hi"], ["ask", "there"], ["ans", "Hello"]]}) + "\n") * 48)
    with pytest.raises(DataError) as e:
        encode_records(load_records(data), tok, 64, CHAT, num_proc=num_proc)
    size = -(-48 // (num_proc * 8))  # records per range
    found = -(-20 // size) * size  # whole ranges, up to the one where the 20th problem is
    assert [p.split(": ")[0] for p in e.value.problems] == [f"{data}:{i}" for i in range(1, found + 1)]
    assert str(e.value).splitlines()[-1] == (f"... {found} problems in the first {found} of 48 records; the others "
                                             "were not encoded (encoding stops after 20 problems)")


def test_cache_key_tracks_template_mode_and_chat_template(chat_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS["conversation"]) + "\n")
    first = load_dataset(data, tok, 128, settings=CHAT)
    assert not first.stats.cache_hit and load_dataset(data, tok, 128, settings=CHAT).stats.cache_hit
    assert not load_dataset(data, tok, 128).stats.cache_hit
    tok.chat_template = tok.chat_template.replace("<|im_end|>\\n", "<|im_end|>")
    changed = load_dataset(data, tok, 128, settings=CHAT)
    assert not changed.stats.cache_hit and len(changed[0]["input_ids"]) < len(first[0]["input_ids"])


# --- config keys and the inspect CLI ---------------------------------------------------------


def write_config(tmp_path: Path, model_path: Path, data: Path, **keys) -> Path:
    cfg = {"model_path": str(model_path), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": 128, "train_micro_batch_size_per_gpu": 1, **keys}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "cfg.json"


def test_config_keys(tokenizer_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    assert load_config(write_config(tmp_path, tokenizer_dir, data), require_model=False).template_settings == \
        TemplateSettings()
    cfg = load_config(write_config(tmp_path, tokenizer_dir, data, template="chat", last_answer_only=True,
                                   pretrain_eos=False), require_model=False)
    assert cfg.template_settings == TemplateSettings("chat", last_answer_only=True, pretrain_eos=False)
    for keys, message in [({"template": "chatml"}, "'template' must be one of 'default', 'chat', got 'chatml'"),
                          ({"train_on_prompt": True, "last_answer_only": True}, "cannot both be true"),
                          ({"train_on_prompt": "yes"}, "'train_on_prompt' must be bool, got \"yes\""),
                          ({"last_answer_onyl": True}, "did you mean 'last_answer_only'?")]:
        path = write_config(tmp_path, tokenizer_dir, data, **keys)
        with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
            load_config(path, require_model=False)


def test_inspect_in_chat_mode(chat_tok, chat_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS.values()))
    cfg = write_config(tmp_path, chat_dir, data, template="chat", train_on_prompt=False)
    assert data_inspect.main(["--config", str(cfg), "--index", "3", "--json"]) == 0
    ds = load_dataset(data, chat_tok, 128, settings=CHAT, use_cache=False)
    assert json.loads(capsys.readouterr().out) == ds[3]
    assert data_inspect.main(["--config", str(cfg), "--index", "3"]) == 0
    out = capsys.readouterr().out
    assert "[[2 plus 3 is 5.<|im_end|>]]\n<|im_start|>user\nAnd 2 times 3?" in out and "trained in 2 span(s)" in out


# Phi-3 (Jul 2024): every turn ends with <|end|>, and a finished conversation (no generation prompt) with EOS
PHI3 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '<|end|>\\n' }}{% elif m['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
# Llama 3.2: today's date in the system header unless date_string is given
DATED = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
         "{{ '<|system|>\\nToday Date: ' + date_string + '<|end|>\\n' }}" + PHI3.replace("{{ eos_token }}", ""))


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi3")
    tok = train_tiny_tokenizer(_texts_from_records(SAMPLES), path, vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = PHI3
    tok.save_pretrained(str(path))
    return path


def test_a_template_that_closes_a_finished_conversation_trains_every_answer(phi3_dir):
    """Phi-3 writes EOS after the last turn only: each earlier answer's turn is not a prefix of the whole text. Every
    answer is trained to its <|end|> (the end-of-turn token demo.py and the export stop on), the ids are
    apply_chat_template's, and each answer's prompt is the generation prompt transformers renders."""
    from data.chat import end_of_turn
    from data.encode import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(phi3_dir))
    assert end_of_turn(tok) == "<|end|>"
    rec = RECORDS["conversation"]
    ids, labels, _ = encode_one(tok, rec, 1024, CHAT)
    messages = CHAT_MESSAGES["conversation"](rec)
    assert ids == tok.apply_chat_template(messages)["input_ids"]
    runs = trained_runs(tok, ids, labels)
    # the last answer too: not the newline and the EOS that close a finished conversation
    assert runs == [answer + "<|end|>" for answer in answers_of(rec)], runs
    prompt = encode_prompt(tok, {"rounds": rec["rounds"][:-1]}, CHAT)
    assert prompt == tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"] == ids[:len(prompt)]
    instruct = RECORDS["instruct"]
    ids, labels, _ = encode_one(tok, instruct, 1024, CHAT)
    assert trained_runs(tok, ids, labels) == [instruct["output"] + "<|end|>"] and ids[-1] == tok.eos_token_id


def test_a_dated_template_renders_one_date_every_day(phi3_dir, tmp_path, monkeypatch):
    """A template that stamps today's date (strftime_now) unless date_string is given renders CHAT_DATE in training
    and in prompts, on any day; one that cannot be given the date is refused in one line."""
    import datetime

    from data.chat import CHAT_DATE
    from data.encode import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(phi3_dir))
    tok.chat_template = DATED
    rec = RECORDS["conversation"]
    ids, labels, _ = encode_one(tok, rec, 1024, CHAT)
    assert f"Today Date: {CHAT_DATE}" in tok.decode(ids)

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 1, 2, tzinfo=tz)

    monkeypatch.setattr(datetime, "datetime", Later)
    prompt = encode_prompt(tok, {"rounds": rec["rounds"][:-1]}, CHAT)
    assert prompt == ids[:len(prompt)] and labels[len(prompt)] != IGNORE_INDEX
    tok.chat_template = PHI3.replace("{% endfor %}", "{% endfor %}{{ strftime_now('%Y-%m-%d') }}")
    with pytest.raises(DataError, match="the chat template writes the current date or time \\(strftime_now\\)"):
        encode_records(load_records(str(SAMPLES))[:3], tok, 64, CHAT)


# --- end-of-turn markers that are not special tokens; reasoning templates; tool records ------------------------------


def chatml_tok(tmp_path: Path, add: str | None):
    """A tiny tokenizer with CHATML whose markers are added with `add_tokens` (not special) or, without `add`, not
    tokens at all (split into pieces)."""
    tok = train_tiny_tokenizer(_texts_from_records(SAMPLES), tmp_path, vocab_size=512)
    if add == "add_tokens":
        tok.add_tokens(["<|im_start|>", END, "River", "content"])  # words added to the vocabulary ("content": in the
        # template's source, not in what it writes)
    tok.chat_template = CHATML
    return tok


def test_an_end_of_turn_token_that_is_not_special_is_stopped_on(tmp_path):
    """`<|im_end|>` added with add_tokens (special=False) is one token every answer is trained to end with: it is the
    end of turn data_settings.json records (demo.py and the export stop on it), and a record holding its text is
    counted as holding a control token's text (an added word is not)."""
    from data.chat import end_of_turn, end_of_turn_text
    from data.records import Record
    from data.settings import data_settings_of
    from data.tokenizer_checks import special_text

    tok = chatml_tok(tmp_path, "add_tokens")
    ids, labels, _ = encode_one(tok, RECORDS["instruct"], 128, CHAT)
    assert trained_runs(tok, ids, labels) == ["1, 2, 3" + END] and tok.convert_tokens_to_ids(END) in ids
    assert end_of_turn(tok) == END and end_of_turn_text(tok) is None
    assert data_settings_of(CHAT, tok, 128, True).end_of_turn == END
    records = [Record("instruct", {"instruct": "q", "output": "River content."}, "x.jsonl", 1),
               Record("instruct", {"instruct": "q", "output": f"a {END} b"}, "x.jsonl", 2)]
    assert special_text(records, tok) == (1, f"x.jsonl:2: field 'output' holds {END!r}")


def test_an_end_of_turn_the_tokenizer_splits_is_warned_once_and_stopped_on_as_text(tmp_path, caplog):
    """Markers that are no token at all: nothing can stop on a token there; the chat template's check says so once,
    in one line, and demo.py stops on the text (tests/test_demo_chat.py)."""
    import logging

    from data.chat import end_of_turn, end_of_turn_text, require_chat_template

    tok = chatml_tok(tmp_path, None)
    assert len(tok(END, add_special_tokens=False)["input_ids"]) > 1
    assert end_of_turn(tok) is None and end_of_turn_text(tok) == END
    with caplog.at_level(logging.WARNING, logger="data.chat"):
        require_chat_template(tok)
        require_chat_template(tok)
    said = [r.getMessage() for r in caplog.records if r.name == "data.chat" and "no BOS" not in r.getMessage()]
    assert said == [f"{tmp_path}: the chat template ends each answer with {END!r}, which the tokenizer splits into "
                    "several tokens: generation cannot stop on it (demo.py stops on the text; an export's "
                    "generation_config and serving stacks do not); add it as a special token"]


# a DeepSeek-R1 (Feb 2025)-like template: the generation prompt opens <think>, answers are rendered without reasoning
R1_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
           "{% else %}{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
# a Qwen3-like template: an empty <think></think> before the last answer only
QWEN3_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + "
              "'<|im_end|>\\n' }}{% else %}{{ '<|im_start|>assistant\\n' }}{% if loop.last and '</think>' not in "
              "m['content'] %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_reasoning_templates_are_refused_for_what_they_do(chat_dir):
    """Each refusal names the cause: a generation prompt the answer does not start with, an answer rendered otherwise
    once later turns follow, reasoning the template drops."""
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    think = {"instruct": "2+3?", "output": "<think>\nadd them\n</think>\n\n5."}
    two = {"rounds": [["ask", "2+3?"], ["ans", "5."], ["ask", "2+4?"], ["ans", "6."]]}
    tok.chat_template = R1_LIKE
    with pytest.raises(ValueError) as e:
        encode_one(tok, {"instruct": "2+3?", "output": "5."}, 128, CHAT)
    assert str(e.value) == ("the chat template's generation prompt ends with '<|im_start|>assistant\\n<think>\\n', which "
                            "is not a prefix of how it renders the answer (message 1: '<|im_start|>assistant\\n5.<|im_end|>"
                            "\\n'): a prompt would not be the start of the trained text; use \"template\": \"default\"")
    with pytest.raises(ValueError) as e:
        encode_one(tok, think, 128, CHAT)
    assert str(e.value) == ("the chat template rewrote message 1 (assistant: an answer, '<think>\\nadd them\\n</think>"
                            "\\n\\n5.'): it drops the <think> reasoning; it would not be trained as written: use a "
                            "template that renders assistant messages as they are, or \"template\": \"default\"")
    tok.chat_template = QWEN3_LIKE
    assert encode_one(tok, think, 128, CHAT)[1]  # one answer: rendered as written
    with pytest.raises(ValueError) as e:
        encode_one(tok, two, 128, CHAT)
    assert str(e.value) == ("the chat template renders message 1 differently once later messages follow, so its "
                            "answers cannot be located; use \"template\": \"default\"")


# gpt-oss's shape (without its date): an earlier answer ends with <|end|>, the last of a finished conversation <|return|>
GPT_OSS_LIKE = ("{% for m in messages %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] }}{% if m['role'] == "
                "'assistant' and loop.last and not add_generation_prompt %}{{ '<|return|>' }}{% else %}{{ '<|end|>' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant<|message|>' }}{% endif %}")


# OLMo-3's: earlier answers end with <|im_end|>, the last of a finished conversation with EOS
OLMO_LIKE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% if m['role'] == 'assistant' "
             "and loop.last and not add_generation_prompt %}{{ eos_token }}{% else %}{{ '<|im_end|>\\n' }}{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_real_template_shapes_train_each_answer_to_its_end_or_are_refused_in_one_line(chat_dir):
    """Found with real templates (chat-template review): Qwen's SFT example template has no generation prompt (its
    role header was trained as part of every answer); gpt-oss- and OLMo-shaped ones end earlier answers with another
    token than the last (accepted, as before: only the last answer learns its end); Phi-4-mini's iterates
    `tools`, which transformers passes as None (a TypeError traceback); R1's `split('</think>')` of a one-line
    reasoning was called a dropped answer."""
    from data.chat import require_chat_template

    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END, "<|start|>", "<|message|>", "<|end|>",
                                                          "<|return|>"]})
    two = {"rounds": [["ask", "2+3?"], ["ans", "5."], ["ask", "2+4?"], ["ans", "6."]]}
    tok.chat_template = CHATML.split("{% if add_generation_prompt %}")[0]
    with pytest.raises(DataError, match=r"the chat template writes no generation prompt \(it has no add_generation_prompt "
                                        r"branch\), so the '<\|im_start\|>assistant' it writes before each answer would "
                                        "be trained as part of the answer"):
        require_chat_template(tok)
    for template, last_end in ((GPT_OSS_LIKE, "<|return|>"), (OLMO_LIKE, "</s>")):
        tok.chat_template = template  # accepted; the earlier answers' own end token is not trained (not refused)
        require_chat_template(tok)
        assert trained_runs(tok, *encode_one(tok, two, 128, CHAT)[:2]) == ["5.", f"6.{last_end}"]
    tok.chat_template = "{% if tools is defined %}{% for t in tools %}{{ t }}{% endfor %}{% endif %}" + CHATML
    with pytest.raises(DataError, match=r":0: the chat template fails on a user message and an answer \(TypeError: "
                                        "'NoneType' object is not iterable\\)"):
        require_chat_template(tok)
    tok.chat_template = R1_LIKE.replace("<think>\\n' }}{% endif %}", "' }}{% endif %}")
    with pytest.raises(ValueError, match="^the chat template rewrote message 1 .*: it drops the <think> reasoning"):
        encode_one(tok, {"instruct": "2+3?", "output": "<think>add them</think>5."}, 128, CHAT)


def test_tool_records_rendered_by_the_default_template_in_chat_mode_are_counted(chat_dir, tmp_path, caplog):
    """conver_has_api records have no chat messages: chat mode renders them with the default template, and each load
    (cache hit too) says how many, in one line."""
    import logging

    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    api = {"type": "conver_has_api", "api_desc": "search: Search the book.", "rounds": [["ask", "Hi"], ["ans", "Hello."]]}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [api, RECORDS["conversation"], api]))
    said = ("data: 2 conver_has_api record(s) are rendered with the default template (\"### Human:\" turns), not the "
            "tokenizer's chat template: chat templates do not render their tool turns alike; the model learns both formats")
    for hit in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.encode"):
            ds = load_dataset(data, tok, 256, cache_dir=tmp_path / "cache", settings=CHAT)
        assert ds.stats.cache_hit == hit and ds.stats.default_in_chat == 2
        assert [r.getMessage() for r in caplog.records if r.name == "data.encode"] == [said]
        assert "### Human: Hi" in tok.decode(ds[0]["input_ids"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.encode"):
        assert load_dataset(data, tok, 256, cache_dir=tmp_path / "cache").stats.default_in_chat == 0
    assert not caplog.records


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_a_chat_template_without_the_bos_the_tokenizer_adds_to_text_is_warned_once(tmp_path, kind, caplog):
    """ChatML on a tokenizer that puts BOS before plain text (Llama-2's, Llama-3's): chat samples start without it
    (as apply_chat_template(tokenize=True) renders them), silently; now one line says so. A template that writes
    {{ bos_token }} is not warned about."""
    import logging

    from data.chat import require_chat_template

    for template, warned in ((CHATML, True), ("{{ bos_token }}" + CHATML, False)):
        path = tmp_path / str(warned)
        tok = train_tiny_tokenizer(_texts_from_records(SAMPLES), path, vocab_size=512 if kind == "bpe" else 1200,
                                   kind=kind)
        tok.chat_template = template
        assert tok("x")["input_ids"][0] == tok.bos_token_id
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.chat"):
            require_chat_template(tok)
            require_chat_template(tok)
        said = [r.getMessage() for r in caplog.records if "no BOS" in r.getMessage()]
        assert said == ([f"{path}: the chat template writes no BOS (<s>), which this tokenizer puts before plain text: "
                         "chat samples are trained without it, as apply_chat_template(tokenize=True) renders them; a "
                         "base model pretrained with a BOS at position 0 may want {{ bos_token }} at the template's "
                         "start"] if warned else []), said
        ids = tok.apply_chat_template(CHAT_MESSAGES["instruct"](RECORDS["instruct"]))["input_ids"]
        assert (ids[0] == tok.bos_token_id) != warned


def test_a_template_whose_only_end_of_an_answer_is_the_closing_eos_keeps_it_trained(tokenizer):
    """The last answer ends where the conversation continued by a user message parts from it only when what it keeps
    ends with a token of the template's (Phi-3's <|end|>): here nothing but the closing EOS can teach the model to
    stop, so it stays trained."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% else %}{{ eos_token }}{% endif %}")
    ids, labels, _ = encode_one(tok, RECORDS["instruct"], 128, CHAT)
    assert trained_runs(tok, ids, labels) == [RECORDS["instruct"]["output"] + "\n</s>"]


def test_a_template_that_writes_the_last_answers_reasoning_only_still_trains_it(tmp_path):
    """GLM-4.5's template keeps <think>...</think> only for an answer after the last user message: continued by a
    user message, the conversation parts from it right after the added token <think>. The last answer's end must
    not be cut there (the record was refused as rendered differently once later messages follow): only a closing
    of added tokens and whitespace is cut, as Phi-3's EOS."""
    tok = train_tiny_tokenizer(_texts_from_records(SAMPLES), tmp_path, vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.add_tokens(["<think>", "</think>"])  # GLM-4.5 and Qwen3 add these (not special)
    tok.chat_template = (
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role']=='user' %}{% set ns.last = "
        "loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}{% if m['role']=='user' %}{{ '<|user|>\\n' + "
        "m['content'] + '<|end|>' }}{% else %}{% set c = m['content'] %}{% set r = '' %}{% if '</think>' in c %}"
        "{% set r = c.split('</think>')[0].split('<think>')[-1] %}{% set c = c.split('</think>')[-1].lstrip('\\n') %}"
        "{% endif %}{{ '<|assistant|>' }}{% if loop.index0 > ns.last and r %}{{ '\\n<think>' + r.strip() + "
        "'</think>' }}{% else %}{{ '\\n<think></think>' }}{% endif %}{{ '\\n' + c.strip() + '<|end|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    rec = {"instruct": "2+3?", "output": "<think>add them</think>\n5."}
    ids, labels, _ = encode_one(tok, rec, 128, CHAT)
    assert trained_runs(tok, ids, labels) == ["\n<think>add them</think>\n5.<|end|>"]
