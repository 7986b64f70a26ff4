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

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.chat import end_of_turn
from data.encode import IGNORE_INDEX, encode_batch, encode_one, encode_prompt, encode_records, load_dataset
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


def _variant(tok, tmp_path, kind: str):
    """`tok` as some real tokenizers ship: "add_eos" (a post-processor that appends EOS, `add_eos_token`), "rstrip"
    (EOS and the end-of-turn token take the whitespace after them, as Phi-3's "<|end|>"), "legacy" (a dummy
    prefix after every special token: a Llama tokenizer with "legacy": true; a byte-level one whose ByteLevel
    pre-tokenizer has add_prefix_space, as some GPT-2/RoBERTa-derived tokenizers ship), "trim_offsets" (a
    post-processor that trims the spaces out of byte-level tokens' offsets: `processors.ByteLevel()`'s default, which
    gives a token of spaces only no width)."""
    from tokenizers.processors import ByteLevel, Sequence, TemplateProcessing

    if kind == "add_eos":
        out = AutoTokenizer.from_pretrained(tok.name_or_path)
        bos, eos = out.bos_token, out.eos_token
        out.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, out.bos_token_id), (eos, out.eos_token_id)])
        assert out("a")["input_ids"][-1] == out.eos_token_id
        return out
    if kind == "trim_offsets":
        out = AutoTokenizer.from_pretrained(tok.name_or_path)
        backend = out.backend_tokenizer
        trim = ByteLevel(add_prefix_space=False, trim_offsets=True)
        backend.post_processor = trim if backend.post_processor is None else Sequence([trim, backend.post_processor])
        if "ByteLevel" in json.dumps(json.loads(backend.to_str())["pre_tokenizer"]):  # the spaces of "x  =" lose width
            offsets = out("x  =", return_offsets_mapping=True)["offset_mapping"]
            assert any(s == e for s, e in offsets) and offsets != tok("x  =", return_offsets_mapping=True)["offset_mapping"]
        return out
    for f in Path(tok.name_or_path).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    if kind == "legacy" and type(tok).__name__ != "LlamaTokenizer":
        spec = json.loads((tmp_path / "tokenizer.json").read_text())
        pre = spec["pre_tokenizer"]
        for p in pre.get("pretokenizers", [pre]):
            if p["type"] == "ByteLevel":
                p["add_prefix_space"] = True
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
        out = AutoTokenizer.from_pretrained(str(tmp_path))
        assert out.convert_ids_to_tokens(out(f"a{out.eos_token}b")["input_ids"])[-1].startswith("Ġ")
        return out
    if kind == "legacy":  # from the SentencePiece model: transformers builds the legacy pre-tokenizer
        (tmp_path / "tokenizer.json").unlink()
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
        out = AutoTokenizer.from_pretrained(str(tmp_path))
        assert json.loads(out.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == "always"
        return out
    ends = {tok.eos_token, end_of_turn(tok)}
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    for t in spec["added_tokens"]:
        t["rstrip"] = t["rstrip"] or t["content"] in ends
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    out = AutoTokenizer.from_pretrained(str(tmp_path))
    assert {t.content for t in out.added_tokens_decoder.values() if t.rstrip} >= ends
    return out


@pytest.mark.parametrize("kind", ["add_eos", "rstrip", "legacy", "trim_offsets"])
def test_tokenizer_conventions_keep_the_prefix_and_train_one_end_per_answer(tok, tmp_path, kind, caplog):
    """A tokenizer that appends EOS is trained and prompted exactly as the same tokenizer without it (a prompt never
    ends with EOS); an end token that takes the newline after it is trained at the end of every answer; a legacy
    dummy prefix after EOS (legacy Llama; ByteLevel's add_prefix_space) does not refuse a spliced answer; trimmed
    offsets change no label (a token of spaces in an answer is trained). The prefix property holds in each."""
    variant = _variant(tok, tmp_path, kind)
    records = [*JOINED, {"instruct": "Write a markdown heading.", "output": "### Heading"}, {"text": "plain text"},
               {"instruct": "Align it.", "output": "x  = 1  # two spaces"}]
    for mode, settings in MODES.items():
        for rec in records:
            ids, labels, _ = encode_one(variant, rec, 4096, settings)
            prompts = prompts_of(rec)
            for prompt_rec in prompts:
                assert_prefix(ids, labels, encode_prompt(variant, prompt_rec, settings))
            if kind in ("add_eos", "trim_offsets"):
                assert (ids, labels) == encode_one(tok, rec, 4096, settings)[:2], (mode, rec)
                assert all(encode_prompt(variant, p, settings) == encode_prompt(tok, p, settings) for p in prompts)
            chat = mode == "chat" and record_type(rec) != "pretrain"  # pretrain text ends with EOS in both modes
            ends = {variant.convert_tokens_to_ids(end_of_turn(variant)) if chat else variant.eos_token_id}
            trained = sum(label in ends for label in labels)
            assert trained == max(len(prompts), 1), (mode, rec, variant.convert_ids_to_tokens(ids))
    if kind == "add_eos":  # said once per data set: a serving stack that calls the tokenizer on a prompt appends it
        (tmp_path / "d.jsonl").write_text(json.dumps(JOINED[0]) + "\n")
        load_dataset(tmp_path / "d.jsonl", variant, 64, use_cache=False)
        assert f"the tokenizer appends {variant.eos_token} to every text it encodes" in caplog.text


def test_prompts_are_tokenized_a_group_of_records_at_a_time(tok, monkeypatch):
    """A record of n answers has n prompts of up to its whole length: a batch of long conversations tokenized in one
    call held all their prompts' tokens at once (~2 GB per worker for 1000 50-turn records). Tokenized a group of
    about GROUP_CHARS characters at a time, the ids and labels are the same and the peak is a fraction."""
    import tracemalloc

    from data import boundary

    rounds = [["ask", f"Question {i}: which stage holds layer {i}?"] if i % 2 == 0 else
              ["ans", f"Answer {i}: the stage of layer {i} holds its tokens and its gradient."] for i in range(100)]
    recs = [{"rounds": rounds[:n]} for n in range(80, 100, 2)] + JOINED
    runs = []
    for chars in (10**9, 4000):
        monkeypatch.setattr(boundary, "GROUP_CHARS", chars)
        tracemalloc.start()
        out = encode_batch(tok, recs, 10**6)
        runs.append((out, tracemalloc.get_traced_memory()[1]))
        tracemalloc.stop()
    (whole, peak_whole), (grouped, peak_grouped) = runs
    assert not any(isinstance(e, str) for e in whole)
    assert [(list(a.input_ids), list(a.labels)) for a in whole] == [(list(b.input_ids), list(b.labels)) for b in grouped]
    assert peak_grouped < peak_whole / 3, (peak_grouped, peak_whole)


def test_a_token_added_after_the_first_encode_is_one_token(tok, tmp_path):
    """data.boundary keeps copies of the Rust tokenizer (offsets untrimmed; continuations without a dummy prefix),
    built from its serialization with the added tokens of that time: one added later is read as that token, not
    split into characters by a stale copy."""
    variant = _variant(tok, tmp_path, "trim_offsets")
    rec = {"instruct": "Call <|tool|> now.", "output": "  <|tool|> x  = 1"}  # (the answer's spaces: a splice)
    encode_one(variant, rec, 4096)
    variant.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    ids, _, _ = encode_one(variant, rec, 4096)
    assert ids.count(variant.convert_tokens_to_ids("<|tool|>")) == 2, variant.convert_ids_to_tokens(ids)


def test_special_token_text_in_a_record_is_counted_and_named(tok, tmp_path):
    """Text of a special token inside a record's own fields is read as that control token (as transformers and
    serving stacks read it): the data set counts such records and names the first, from the cache too."""
    from data.inspect import dataset_stats, show_stats

    eos = tok.eos_token
    records = [{"instruct": "Say hi.", "output": "Hi."}, {"instruct": "Strike it.", "output": f"<del>old{eos} new"},
               {"rounds": [["ask", f"What is {eos}?"], ["ans", "An end token."]]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    first = load_dataset(data, tok, 256, cache_dir=tmp_path / "cache")
    ids, _, _ = encode_one(tok, records[1], 256)
    assert ids.count(tok.eos_token_id) == 2  # the answer's and the template's
    again = load_dataset(data, tok, 256, cache_dir=tmp_path / "cache")
    assert again.stats.cache_hit and not first.stats.cache_hit
    for st in (first.stats, again.stats):
        assert (st.special_text, st.special_example) == (2, f"{data}:2: field 'output' holds {eos!r}")
    assert "special-token text: 2 record(s) hold a special token's text" in show_stats(dataset_stats(again, 256))


def test_a_long_conversation_is_encoded_in_time_linear_in_what_is_kept(tok, monkeypatch):
    """A conversation far longer than max_seq_len: the answers past what its first max_seq_len ids can reach are not
    located or spliced (a record of n answers cost n prompts of up to n turns: 29 s for 800 turn pairs in chat mode),
    and the kept ids and labels are those of encoding every answer, at each cut, in both modes, for last_answer_only
    too; answers that need splices (JOINED's) included."""
    import random

    import data.boundary
    import data.chat

    rng = random.Random(0)
    answers = [r["output"] for r in JOINED if "output" in r] + ["\nok", "   fine", "123456", "Plain words here."]
    rounds = [x for i in range(60) for x in (["ask", f"Question {i}: what now?"], ["ans", rng.choice(answers)])]
    rec = {"rounds": rounds}
    renders = []
    real_apply = data.chat._apply
    monkeypatch.setattr(data.chat, "_apply", lambda *a, **k: renders.append(1) or real_apply(*a, **k))
    left_out = []
    real_within = data.boundary.within_reach

    def within(offsets, bounds, max_tokens):
        kept = real_within(offsets, bounds, max_tokens)
        left_out.append(len(bounds) - len(kept))
        return kept
    monkeypatch.setattr(data.boundary, "within_reach", within)
    for mode, settings in MODES.items():
        for last in (False, True):
            s = TemplateSettings(template=settings.template, last_answer_only=last)
            for max_seq_len in (20, 97, 300):
                monkeypatch.setattr(data.boundary, "REACH_SLACK", 64)
                renders.clear()
                got = encode_batch(tok, [rec], max_seq_len, s)[0]
                ids, labels, cut = got.input_ids.tolist(), got.labels.tolist(), got.truncated
                trimmed = len(renders)
                monkeypatch.setattr(data.boundary, "REACH_SLACK", 10**9)  # every answer located and spliced
                renders.clear()
                full = encode_batch(tok, [rec], max_seq_len, s)[0]
                assert (ids, labels, cut) == (full.input_ids.tolist(), full.labels.tolist(), full.truncated)
                assert got.spliced == full.spliced  # the splices among the kept tokens (data.inspect --stats)
                assert cut and len(ids) == max_seq_len
                if mode == "chat":
                    assert trimmed < len(renders) / 2  # 2 renders an answer, for those within reach only
                if max_seq_len > 20:  # answers within the kept ids are trained; the last one never is
                    assert any(x != IGNORE_INDEX for x in labels) != last
        assert mode == "chat" or max(left_out) > 30  # the default templates' boundaries past the reach: not spliced


def test_a_splice_at_the_cut_is_counted(tok):
    """max_seq_len ending exactly where a spliced answer starts: the kept ids end with that prompt's own ids, so the
    sample counts as spliced, as with room for the answer (data.inspect --stats)."""
    rec = {"rounds": [["ask", "Start with a newline."], ["ans", "ok"], ["ask", "And spaces?"], ["ans", "\n\n- red"]]}
    settings = MODES["chat"]
    cut = len(encode_prompt(tok, {"rounds": rec["rounds"][:3]}, settings))
    at_cut, whole = (encode_batch(tok, [rec], n, settings)[0] for n in (cut, 4096))
    assert at_cut.input_ids.tolist() == whole.input_ids[:cut].tolist() and at_cut.spliced == whole.spliced


VICUNA = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\\n' }}"
          "{% else %}{{ m['role'].upper() + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def answered(rec: dict) -> list[tuple[dict, str]]:
    """(the record up to and with one of its answers, that answer's text), for each answer."""
    if record_type(rec) == "instruct":
        return [(rec, rec["output"])]
    return [({**rec, "rounds": rec["rounds"][:i + 1]}, text) for i, (role, text) in enumerate(rec["rounds"])
            if role == "ans"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_demo_prints_each_answer_as_the_record_holds_it(tok, mode, capsys):
    """A model that generates the trained answer ids prints (streamed or not) the answer's text as the record
    holds it: without the dialog template's space after its role marker (byte-level BPE decodes it; the answer fed
    back as a turn got a second one, and its prompt was no longer the training prefix) and with the spaces that
    start it (SentencePiece's decoder drops the first space of a text decoded alone: "   fine" became "  fine")."""
    import torch
    from transformers import LlamaForCausalLM

    import demo
    from data.templates import answer_lead
    from tests.helpers import llama_config

    class Scripted(LlamaForCausalLM):
        """Generates `script` after a prompt of `start` tokens, whatever its weights (a model that learned it)."""

        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            out.logits = torch.full_like(out.logits, -1e4)  # the cache holds every token so far
            out.logits[:, -1, self.script[kw["cache"].get_seq_length() - self.start]] = 0.0
            return out

    settings = MODES[mode]
    model = Scripted(llama_config("gqa_tied", vocab_size=len(tok), num_hidden_layers=1)).eval()
    first = {record_type(r.data): r.data for r in reversed(load_records(str(SAMPLES)))}  # the first of each type
    records = [first["conversation"], first["instruct"], first["ref_qa"], *JOINED]
    own = tok.chat_template
    # chat mode: the kind's own template, and a Vicuna-style one whose answers start with a space the generation
    # prompt lacks ("ASSISTANT:" / "ASSISTANT: " + answer): printed with it, " Yes." for "Yes."
    for template in (own, *([VICUNA] if mode == "chat" else [])):
        tok.chat_template = template
        eos_ids, stops = demo.stop_ids(None, tok, settings), demo.stop_strings(tok, settings)
        trims = mode == "chat" and "trim" in template  # Llama-3's template trims each message
        leads = 0
        for rec, answer in (pair for r in records for pair in answered(r)):
            prompt = encode_prompt(tok, rec, settings)
            ids = encode_one(tok, rec, 10**6, settings)[0]
            end = next(i for i in range(len(prompt), len(ids)) if ids[i] in eos_ids)
            model.script, model.start = ids[len(prompt):end + 1], len(prompt)
            lead = answer_lead(rec, settings, tok)
            leads += lead != ""
            for stream in (False, True):
                new: list[int] = []
                text = demo.generate(model, tok, prompt, end + 2 - len(prompt), stream=stream, eos_ids=eos_ids,
                                     stops=stops, new_ids=new, lead=lead)
                assert new == model.script
                assert text == (answer.strip() if trims else answer), (template, rec, text)
                assert capsys.readouterr().out == (text + "\n" if stream else "")
        # the default templates: the dialogs' answers (7 of 11); chat mode: none with the kind's own, all with VICUNA
        assert leads == (7 if mode == "default" else 0 if template == own else 11)
    tok.chat_template = own
