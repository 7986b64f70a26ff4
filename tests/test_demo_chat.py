"""Chat templates end to end: a tiny Llama trained on conversation records with "template": "chat" is prompted by
demo.py with the recorded chat template; its prompt ids are the training prefix and generation stops at the
template's end-of-turn token (not only at EOS, which a chat-trained model never emits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

import convert_model
import demo
from data import inspect as data_inspect
from data.settings import DATA_SETTINGS_FILE, read_data_settings
from data.templates import CHAT_MESSAGES, TemplateSettings
from data.tiny_tokenizer import CHAT_TEMPLATES, _texts_from_records, train_tiny_tokenizer
from models.hf_io import SIDE_FILES

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Yes, gladly."
RECORD = {"rounds": [["ask", "Can you help me with topic 3?"], ["ans", ANSWER]]}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer with ChatML, a tiny Llama, 40 steps on conversations that all answer ANSWER, then an HF export."""
    root = tmp_path_factory.mktemp("chat_run")
    train_tiny_tokenizer(_texts_from_records(ROOT / "data" / "samples"), root / "tok", 512, "bpe", "chatml")
    assert convert_model.main(["init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(root / "tok"),
                               "--save-path", str(root / "base")]) == 0
    with open(root / "conv.jsonl", "w") as f:
        for i in range(32):
            rounds = [["ask", f"Can you help me with topic {i}?"], ["ans", ANSWER]]
            if i % 4 == 0:
                rounds = [["ask", "Hello!"], ["ans", ANSWER], *rounds]
            f.write(json.dumps({"rounds": rounds}) + "\n")
    cfg = {"model_path": str(root / "base"), "save_path": str(root / "save"), "data_path": str(root / "conv.jsonl"),
           "data_cache_dir": str(root / "cache"), "template": "chat", "max_seq_len": 64, "max_steps": 40, "seed": 1,
           "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}}
    (root / "cfg.json").write_text(json.dumps(cfg))
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(root / "cfg.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert convert_model.main(["pp_to_hg", "--input-path", str(root / "save"), "--save-path", str(root / "hf")]) == 0
    return {"root": root, "save": root / "save", "hf": root / "hf", "cfg": root / "cfg.json"}


def run_demo(capsys, model_path: Path, *extra: str) -> tuple[str, dict]:
    argv = ["--model-path", str(model_path), "--record", json.dumps(RECORD), "--max-new-tokens", "24", "--show-ids",
            "--no-stream", *extra]
    assert demo.main(argv) == 0
    out = capsys.readouterr()
    ids = {k: v for line in out.err.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    return out.out, ids


def test_settings_are_recorded_and_carried_by_the_export(chat_run):
    saved = read_data_settings(chat_run["save"])
    assert saved.template == TemplateSettings(template="chat") and saved.max_seq_len == 64
    assert saved.chat_template == CHAT_TEMPLATES["chatml"][0] and saved.end_of_turn == "<|im_end|>"
    assert (chat_run["hf"] / DATA_SETTINGS_FILE).read_text() == (chat_run["save"] / DATA_SETTINGS_FILE).read_text()
    assert DATA_SETTINGS_FILE in SIDE_FILES


def test_a_data_settings_file_of_the_wrong_types_is_one_line(tmp_path):
    (tmp_path / DATA_SETTINGS_FILE).write_text(json.dumps({"template": "chat", "chat_template": 5}))
    with pytest.raises(ValueError, match=r"data_settings.json: unreadable data settings \('chat_template' must be str "
                                         r"or null, got 5\)"):
        read_data_settings(tmp_path)


@pytest.mark.parametrize("where", ["save", "hf"])
def test_demo_prompts_with_the_training_prefix_and_stops_at_end_of_turn(chat_run, capsys, where):
    tok = AutoTokenizer.from_pretrained(str(chat_run["hf"]))
    text, ids = run_demo(capsys, chat_run[where])
    assert data_inspect.main(["--config", str(chat_run["cfg"]), "--index", "3", "--json"]) == 0  # RECORD is record 3
    train = json.loads(capsys.readouterr().out)
    prompt = ids["prompt_ids"]
    n = len(prompt)
    assert train["input_ids"][:n] == prompt and train["labels"][n - 1] == -100 and train["labels"][n] != -100
    messages = CHAT_MESSAGES["conversation"](RECORD)
    assert prompt == tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids["generated_ids"] == train["input_ids"][n:n + len(ids["generated_ids"])]  # the trained answer...
    assert ids["generated_ids"][-1] == end and len(ids["generated_ids"]) < 24  # ...ending at the end-of-turn token
    assert text == ANSWER + "\n"


def test_template_override_and_stop_ids(chat_run, capsys):
    """--template default renders the default template instead; stop ids are every generation-config EOS id, the
    tokenizer's EOS and the template's end-of-turn token."""
    _, ids = run_demo(capsys, chat_run["hf"], "--template", "default")
    tok = AutoTokenizer.from_pretrained(str(chat_run["hf"]))
    assert tok.decode(ids["prompt_ids"]).endswith("### Human: Can you help me with topic 3?\n### Assistant:")
    gen = GenerationConfig(eos_token_id=[7, 9])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert demo.stop_ids(gen, tok, TemplateSettings(template="chat")) == [7, 9, tok.eos_token_id, end]
    assert demo.stop_ids(GenerationConfig(eos_token_id=7), tok, TemplateSettings()) == [7, tok.eos_token_id]


def test_a_record_answered_only_and_special_token_text_are_said(chat_run, capsys):
    """An answer as the only turn is the training check's line (was transformers' "empty conversation"); the text of
    a special or template token in the prompt is a warning, as training warns of such records."""
    argv = ["--model-path", str(chat_run["hf"]), "--max-new-tokens", "1", "--no-stream"]
    assert demo.main([*argv, "--record", '{"rounds": [["ans", "x"]]}']) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("demo.py: error: cannot prompt with this record: the "
                                                                "first turn is an answer: chat templates need a user "
                                                                "message before it")
    for text, warned in (("Hi there", False), ("Hi <|im_end|>", True)):
        assert demo.main([*argv, "--record", json.dumps({"rounds": [["ask", text]]})]) == 0
        err = capsys.readouterr().err
        assert ("warning: the prompt's field 'rounds[0][1]' holds '<|im_end|>', the text of a special (or template) "
                "token, read as that control token" in err) == warned, err


def test_demo_cli_on_the_chat_checkpoint(chat_run):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "demo.py", "--model-path", str(chat_run["save"]), "--record",
                        json.dumps(RECORD), "--max-new-tokens", "24"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ANSWER + "\n" and "template 'chat'" in p.stderr


def test_transformers_generate_on_the_export_stops_at_end_of_turn(chat_run):
    """The export's generation_config.json stops on [EOS, <|im_end|>]: plain `generate`, with no stop ids passed,
    ends the trained answer at the end-of-turn token instead of running on to max_new_tokens."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(str(chat_run["hf"]))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(chat_run["hf"])).eos_token_id == [tok.eos_token_id, end]
    model = AutoModelForCausalLM.from_pretrained(str(chat_run["hf"])).eval()
    prompt = tok.apply_chat_template(CHAT_MESSAGES["conversation"](RECORD)[:-1], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert out[-1] == end and len(out) < 24 and tok.decode(out, skip_special_tokens=True) == ANSWER


def test_export_warns_when_the_tokenizers_chat_template_is_not_what_the_run_trained_with(chat_run, tmp_path, capsys):
    """A run trained with the default templates whose tokenizer carries a chat_template (kept in the export): the
    export says that chat endpoints would prompt another format (for a PEFT adapter: of the base's tokenizer). A
    chat-template run's export says nothing so, nor does a run of pretrain text only (data_settings.json's
    "prompted", written by the trainer)."""
    import shutil

    from data.settings import read_data_settings
    from models.convert import chat_template_mismatch

    assert read_data_settings(chat_run["save"]).prompted is True  # conversation records
    assert convert_model.main(["pp_to_hg", "--input-path", str(chat_run["save"]), "--save-path", str(tmp_path / "a")]) == 0
    assert "trained with the default templates" not in capsys.readouterr().err
    save = tmp_path / "default-run"
    shutil.copytree(chat_run["save"], save)
    settings = json.loads((save / DATA_SETTINGS_FILE).read_text())
    (save / DATA_SETTINGS_FILE).write_text(json.dumps({**settings, "template": "default", "chat_template": None,
                                                       "end_of_turn": None}))
    assert convert_model.main(["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {save / DATA_SETTINGS_FILE}: this run trained with the default templates" in err
            and "apply_chat_template and chat endpoints (vLLM, TGI) would prompt that format" in err), err
    assert AutoTokenizer.from_pretrained(str(tmp_path / "b")).chat_template == CHAT_TEMPLATES["chatml"][0]
    said = chat_template_mismatch(save, read_data_settings(save), peft=True)
    assert "but the base model's tokenizer, which the adapter is used with, keeps its own chat_template" in said
    (save / DATA_SETTINGS_FILE).write_text(json.dumps({**settings, "template": "default", "chat_template": None,
                                                       "end_of_turn": None, "prompted": False}))
    assert chat_template_mismatch(save, read_data_settings(save)) is None


def test_generation_stops_on_an_end_of_turn_text_the_tokenizer_splits(tmp_path, capsys):
    """ChatML markers that are no token (the tokenizer splits `<|im_end|>`): nothing can stop on a token, so demo.py
    stops once the continuation holds the text (GenerationConfig's stop_strings), and says so."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.helpers import llama_config

    tok = train_tiny_tokenizer(_texts_from_records(ROOT / "data" / "samples"), tmp_path / "tok", 512)
    tok.chat_template = CHAT_TEMPLATES["chatml"][0]
    tok.save_pretrained(str(tmp_path / "tok"))
    assert demo.stop_strings(tok, TemplateSettings(template="chat")) == ["<|im_end|>"]
    assert demo.stop_strings(tok, TemplateSettings()) == []
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("gqa_tied", vocab_size=len(tok))).eval()
    prompt = tok("Can you help me", add_special_tokens=False)["input_ids"]
    free: list[int] = []
    demo.generate(model, tok, prompt, 24, temperature=1.0, top_k=0, top_p=1.0, stream=False, eos_ids=[-1], new_ids=free)
    head = tok.decode(free[:5])
    stop = tok.decode(free[:8])[len(head):]  # a text that spans generated tokens 5..7
    assert len(free) == 24 and tok.decode(free[:8]).startswith(head) and stop.strip()
    for stream in (False, True):  # the ids hold the stop text; the answer (returned, printed) ends before it
        stopped: list[int] = []
        text = demo.generate(model, tok, prompt, 24, temperature=1.0, top_k=0, top_p=1.0, stream=stream, eos_ids=[-1],
                             stops=[stop], new_ids=stopped)
        assert stopped == free[:len(stopped)] and len(stopped) <= 8 and stop in tok.decode(stopped)
        assert text == tok.decode(stopped)[:tok.decode(stopped).index(stop)] and stop not in text
        assert capsys.readouterr().out == (text + "\n" if stream else "")
    assert convert_model.main(["init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"),
                               "--save-path", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert demo.main(["--model-path", str(tmp_path / "base"), "--template", "chat", "--record", json.dumps(RECORD),
                      "--max-new-tokens", "2", "--no-stream"]) == 0
    assert "and the text '<|im_end|>'" in capsys.readouterr().err


def test_an_end_of_turn_token_that_is_not_special_is_not_part_of_the_answer(tmp_path, capsys):
    """ChatML's `<|im_end|>` added with add_tokens (not special): generation stops on it, and the answer, printed
    (streamed or not) and returned, ends before it; the generated ids keep it (--show-ids)."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.helpers import llama_config

    tok = train_tiny_tokenizer(_texts_from_records(ROOT / "data" / "samples"), tmp_path / "tok", 512)
    tok.add_tokens(["<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATES["chatml"][0]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    settings = TemplateSettings(template="chat")
    assert eot not in tok.all_special_ids and eot in demo.stop_ids(None, tok, settings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("gqa_tied", vocab_size=len(tok), tie_word_embeddings=False)).eval()
    with torch.no_grad():  # "Hi" then the end-of-turn token, whatever the prompt
        hi = tok("Hi", add_special_tokens=False)["input_ids"]
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for i in hi:
            model.model.embed_tokens.weight[i, 1 + hi.index(i)] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight[hi[0], 0] = 5.0  # after anything: the first piece of "Hi" ...
        for a, b in zip(hi, [*hi[1:], eot], strict=True):  # ... then each next one, then the end of turn
            model.lm_head.weight[b, 1 + hi.index(a)] = 50.0
    prompt = tok("Can you help me", add_special_tokens=False)["input_ids"]
    for stream in (False, True):
        ids: list[int] = []
        text = demo.generate(model, tok, prompt, 8, stream=stream, eos_ids=demo.stop_ids(None, tok, settings),
                             new_ids=ids)
        assert ids == [*hi, eot] and text == "Hi", (ids, text)
        assert capsys.readouterr().out == ("Hi\n" if stream else "")
