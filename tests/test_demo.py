"""demo.py: same greedy output from an HF dir, a pipeline dir and a training save dir; training's templates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_model
import demo
from data.encode import encode_prompt
from data.settings import DATA_SETTINGS_FILE, data_settings_of, write_data_settings
from data.templates import TemplateSettings, render_prompt

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT = ["--instruct", "Explain pipeline parallelism.", "--input", "Each stage owns a slice of layers."]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny random Llama as a pipeline dir, its HF export, and a training-style save dir with `latest`."""
    root = tmp_path_factory.mktemp("demo")
    pp, hf, save = root / "pp", root / "hf", root / "save"
    assert convert_model.main(["init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
                               "--save-path", str(pp)]) == 0
    assert convert_model.main(["pp_to_hg", "--input-path", str(pp), "--save-path", str(hf)]) == 0
    (save / "global_step5").mkdir(parents=True)
    for f in pp.iterdir():  # layer files into the tag dir, config + tokenizer beside `latest`
        shutil.copy2(f, save / ("global_step5" if f.name.startswith("layer_") else "") / f.name)
    (save / "latest").write_text("global_step5")
    return {"pp": pp, "hf": hf, "save": save}


def run_demo(capsys, *argv: str) -> str:
    assert demo.main(list(argv)) == 0
    return capsys.readouterr().out


def reference(hf_dir: Path, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation computed with plain transformers from the HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_same_greedy_output_from_hf_pipeline_and_save_dirs(dirs, capsys):
    outs = {k: run_demo(capsys, "--model-path", str(d), *INSTRUCT, "--max-new-tokens", "20") for k, d in dirs.items()}
    prompt = render_prompt({"instruct": INSTRUCT[1], "input": INSTRUCT[3]})
    expected = reference(dirs["hf"], prompt) + "\n"
    assert outs["hf"] == expected
    assert outs["pp"] == expected
    assert outs["save"] == expected
    assert len(expected.strip()) > 0


def test_prompt_mode_and_no_stream_match_reference(dirs, capsys):
    args = ["--prompt", "The quick brown fox", "--max-new-tokens", "12"]
    streamed = run_demo(capsys, "--model-path", str(dirs["pp"]), *args)
    printed = run_demo(capsys, "--model-path", str(dirs["hf"]), *args, "--no-stream")
    assert streamed == printed == reference(dirs["hf"], "The quick brown fox", 12) + "\n"


def test_a_record_naming_a_key_twice_is_refused_as_training_refuses_it():
    args = demo.build_parser().parse_args(["--model-path", "x", "--record", '{"instruct": "Say hi", "instruct": "Bye"}'])
    with pytest.raises(demo.DemoError, match="^--record: key 'instruct' appears twice in one object"):
        demo.build_record(args)


@pytest.mark.parametrize("argv, record", [
    (["--instruct", "Say hi."], {"instruct": "Say hi."}),
    (["--instruct", "Translate.", "--input", "bonjour"], {"instruct": "Translate.", "input": "bonjour"}),
    (["--prompt", "Once upon a time"], {"text": "Once upon a time"}),
    (["--record", '{"instruct": "Say hi.", "input": null, "output": null}'], {"instruct": "Say hi."}),  # null: absent
])
def test_build_record_is_the_training_record(argv, record, tokenizer):
    args = demo.build_parser().parse_args(["--model-path", "x", "--local_rank=0", *argv])  # as `deepspeed` passes it
    assert demo.build_record(args) == record
    prompt = encode_prompt(tokenizer, record)
    assert prompt == tokenizer(render_prompt(record))["input_ids"]
    assert all(v in tokenizer.decode(prompt) for v in record.values())


def test_sampling_is_seeded(dirs, capsys):
    model, tok, _ = demo.load(dirs["hf"])
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, stream=False)
    a = demo.generate(model, tok, "Pipeline", seed=1, **kw)
    assert a == demo.generate(model, tok, "Pipeline", seed=1, **kw)
    assert len({demo.generate(model, tok, "Pipeline", seed=s, **kw) for s in range(2, 6)} | {a}) > 1
    out = run_demo(capsys, "--model-path", str(dirs["pp"]), "--prompt", "Pipeline", "--max-new-tokens", "16",
                   "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", "1")
    assert out == a + "\n"


def test_sampling_without_top_k_or_top_p_takes_the_models_generation_config(dirs):
    """As transformers' generate: --temperature alone samples with the generation config's top_k / top_p (here
    top_k 1: the greedy text, whatever the seed); the flags override them (they were always passed, 0 / 1.0)."""
    model, tok, _ = demo.load(dirs["hf"])
    greedy = demo.generate(model, tok, "Pipeline", max_new_tokens=16, stream=False)
    model.generation_config.top_k = 1
    sampled = {demo.generate(model, tok, "Pipeline", max_new_tokens=16, temperature=1.0, seed=s, stream=False)
               for s in range(3)}
    assert sampled == {greedy}
    free = {demo.generate(model, tok, "Pipeline", max_new_tokens=16, temperature=1.0, top_k=0, seed=s, stream=False)
            for s in range(3)}
    assert free != {greedy}


@pytest.mark.parametrize("argv, message", [
    (["--model-path", "{tmp}/missing", "--prompt", "x"], "no such directory"),
    (["--model-path", "{tmp}", "--prompt", "x"], "layer_00-model_states.pt"),
    (["--model-path", "{tmp}", "--prompt", "x", "--input", "y"], "--input needs --instruct"),
    (["--model-path", "{tmp}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--model-path", "{tmp}", "--prompt", "x", "--top-p", "0.5"], "--top-p samples, but --temperature 0 (the default) "
     "is greedy"),  # (it named an option the user had not given)
    (["--model-path", "{tmp}", "--record", '{"text": "a"}\n{"text": "b"}'], "--record: invalid JSON (Extra data: line 2 "
     "column 1 (char 14)): give one record (a .jsonl file holds several: pick one line of it)"),
    (["--model-path", "{tmp}", "--record", '{"text": "a"}}'], "--record: invalid JSON (Extra data: line 1 column 14 "
     "(char 13))"),  # a stray brace: no word of several records
    (["--model-path", "{tmp}", "--prompt", "x", "--temperature", "nan"], "--temperature nan: must be a number >= 0"),
    (["--model-path", "{tmp}", "--prompt", "x", "--temperature", "1e-40"], "--temperature 1e-40: must be 0 (greedy) or "
     "at least 1e-06"),  # (it overflowed inside torch.multinomial)
    (["--model-path", "{tmp}", "--prompt", "x", "--temperature", "1", "--seed", str(2**64)],
     f"--seed {2**64}: must be in [-2**63, 2**64)"),
    (["--model-path", "{tmp}", "--record", '[{"instruct": "x"}]'], "--record: a record is a JSON object"),
    (["--model-path", "{tmp}", "--record", "null"], "--record null: JSON null, not a record (a JSON object), and not a "
     "readable file (No such file or directory)"),
    (["--model-path", "{tmp}", "--record", "2024"], "--record 2024: JSON int, not a record (a JSON object), and not a "
     "readable file (No such file or directory)"),
    (["--model-path", "{tmp}/missing", "--prompt", "x", "--adapter", "{tmp}/nope"],
     "--adapter {tmp}/nope: no such directory"),  # before the base model loads (it said: no adapter_config.json)
    (["--model-path", "{tmp}/missing", "--prompt", "x", "--adapter", "{tmp}"],
     "--adapter {tmp}: no adapter_config.json (not a PEFT adapter dir)"),
    (["--model-path", "{tmp}", "--instruct", "   "], "--instruct: field 'instruct' is empty"),  # as training says
    (["--model-path", "{tmp}", "--record", '{"rounds": [{"role": "ask", "text": "Hi"}]}'],
     '--record: rounds[0] must be a [role, text] pair, got {"role": "ask", "text": "Hi"}'),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert demo.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # status lines may precede it
    assert last.startswith("demo.py: error:") and message.replace("{tmp}", str(tmp_path)) in last


def test_undecodable_prompt_text_is_one_line_before_the_model_loads(tmp_path, capsys):
    """A byte the locale cannot decode (argv's surrogate escape; was a TypeError inside the tokenizer) and a --record
    file that is not UTF-8 (was a UnicodeDecodeError): one line each, before the model is read."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"text": "caf\xe9"}')
    for argv, message in ((["--prompt", "caf\udce9"], "--prompt holds an invalid character ('\\udce9' at position 3)"),
                          (["--record", str(bad)], f"--record {bad}: not valid UTF-8 (byte offset 13)")):
        assert demo.main(["--model-path", str(tmp_path / "missing"), *argv]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"demo.py: error: {message}"


@pytest.mark.parametrize("rounds, problem", [
    ([{"role": "ask", "text": "Hi"}], 'rounds[0] must be a [role, text] pair, got {"role": "ask", "text": "Hi"}'),
    ([["ask", "Hi"], 5], "rounds[1] must be a [role, text] pair, got 5"),
    ([None], "rounds[0] must be a [role, text] pair, got null"),
    ([["ask", "Hi"], "ans"], 'rounds[1] must be a [role, text] pair, got "ans"'),
])
def test_a_prompt_record_with_a_malformed_last_turn_gets_the_training_check(rounds, problem):
    """demo.py --record: what the training validator says of the turn, not a TypeError."""
    from data.records import prompt_problems

    for rec in ({"rounds": rounds}, {"reference": "r", "rounds": rounds}, {"api_desc": "d", "rounds": rounds}):
        assert prompt_problems(rec) == [problem]


def test_a_lora_checkpoint_with_its_adapter_and_a_tokenizer_past_the_vocabulary_are_one_line(dirs, tmp_path, capsys):
    """A LoRA checkpoint's adapters are merged when it loads: its exported adapter on top would count them twice
    (logits off by up to 1.3 on a trained toy, no word said). A tokenizer with more tokens than the embedding has rows
    (one added without resizing) would index past it (a traceback); training refuses both in the same words."""
    from tests.helpers import lora_checkpoint as _lora_checkpoint

    save = _lora_checkpoint(tmp_path, dirs["pp"])
    assert convert_model.main(["pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "adapter"),
                               "--lora", "peft"]) == 0
    capsys.readouterr()
    assert demo.main(["--model-path", str(save), "--adapter", str(tmp_path / "adapter"), "--prompt", "x"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"demo.py: error: --model-path {save} is a LoRA checkpoint, whose adapters are merged when it is "
                    f"loaded: --adapter {tmp_path / 'adapter'} would add them a second time; give the base model with "
                    "--adapter, or drop --adapter")
    assert demo.main(["--model-path", str(dirs["hf"]), "--adapter", str(tmp_path / "adapter"), "--prompt", "x",
                      "--max-new-tokens", "2"]) == 0  # on its base
    capsys.readouterr()
    assert demo.main(["--model-path", str(tmp_path / "adapter"), "--prompt", "x"]) == 2  # the adapter alone
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"demo.py: error: {tmp_path / 'adapter'}: a PEFT adapter (adapter_config.json), not a model: give its base "
        f"model with the adapter beside it (demo.py --model-path {base} --adapter {tmp_path / 'adapter'})")
    hf = tmp_path / "hf"
    shutil.copytree(dirs["hf"], hf)
    model, tok, _ = demo.load(hf)
    tok.add_special_tokens({"additional_special_tokens": [f"<|extra{i}|>" for i in range(
        model.get_input_embeddings().num_embeddings - len(tok) + 1)]})
    tok.save_pretrained(str(hf))
    capsys.readouterr()
    assert demo.main(["--model-path", str(hf), "--prompt", "x"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"demo.py: error: {hf}: the model's vocab_size ") and "resize the model's embeddings" in last


def test_a_bad_adapter_or_generation_config_is_one_line_before_the_weights_load(dirs, tmp_path, capsys, monkeypatch):
    """A malformed adapter_config.json or generation_config.json was a traceback (JSONDecodeError, AttributeError,
    transformers' TypeError, generate's ValueError), each once the base model's weights had loaded."""
    monkeypatch.setattr(demo, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    adapter, hf = tmp_path / "adapter", tmp_path / "hf"
    adapter.mkdir()
    shutil.copytree(dirs["hf"], hf)
    gen = hf / "generation_config.json"
    cases = [(adapter / "adapter_config.json", "{", ["--adapter", str(adapter)], f"{adapter / 'adapter_config.json'}: "
              "invalid JSON"),
             (adapter / "adapter_config.json", "[1]", ["--adapter", str(adapter)],
              f"--adapter {adapter}: {adapter / 'adapter_config.json'} is not a JSON object"),
             (gen, "[1]", [], f"{gen}: not a JSON object"),
             (gen, '{"eos_token_id": "x"}', [], f'{gen}: eos_token_id must be a token id or a list of them, got "x"'),
             (gen, '{"eos_token_id": [2, true]}', [], f"{gen}: eos_token_id must be a token id or a list of them"),
             (gen, '{"top_k": "5", "do_sample": true}', [], f'{gen}: top_k must be a number, got "5"')]
    for path, text, extra, says in cases:
        saved = path.read_text() if path.exists() else None
        path.write_text(text)
        capsys.readouterr()
        assert demo.main(["--model-path", str(hf), *extra, "--prompt", "x"]) == 2, says
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"demo.py: error: {says}") and "Traceback" not in "".join(err), err
        if saved is not None:
            path.write_text(saved)


def test_a_damaged_hf_dir_a_prompt_past_the_positions_and_an_empty_prompt_are_one_line(dirs, tmp_path, capsys):
    """transformers would run a checkpoint that lacks a tensor with a random one, and a prompt longer than the
    positions with garbage: one line each, nothing generated. A prompt of at least the max_seq_len training kept
    (recorded in data_settings.json) is generated from, with a warning."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(dirs["hf"], hf)
    weights = next(hf.glob("*.safetensors"))
    sd = load_file(weights)
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, weights, metadata={"format": "pt"})
    assert demo.main(["--model-path", str(hf), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"demo.py: error: {hf}: missing tensor model.layers.1.mlp.down_proj.weight"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert demo.main(["--model-path", str(hf), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"demo.py: error: {hf}: cannot load the model's")

    long = " ".join(["fox"] * 1100)  # the tiny preset has 1024 positions
    assert demo.main(["--model-path", str(dirs["hf"]), "--prompt", long]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("demo.py: error: the prompt has ") and "the model's positions cover 1024" in last
    short = tmp_path / "short"  # trained with max_seq_len 16 (data_settings.json): a longer prompt gets a warning
    shutil.copytree(dirs["hf"], short)
    model, tok, _ = demo.load(dirs["hf"])
    write_data_settings(short, data_settings_of(TemplateSettings(), tok, 16))
    for words, warned in ((3, False), (20, True)):
        assert demo.main(["--model-path", str(short), "--prompt", " ".join(["fox"] * words), "--max-new-tokens", "1"]) == 0
        err = capsys.readouterr().err
        assert ("and training kept 16 per sample (max_seq_len in data_settings.json): the model never learned an answer "
                "after so long a prompt" in err) == warned, err
    with pytest.raises(demo.DemoError, match="the prompt is empty"):  # a tokenizer that adds no BOS, no text
        demo.generate(model, tok, [], stream=False)


def test_a_tokenizer_of_another_eos_than_trainings_is_a_warning(dirs, tmp_path, capsys):
    """data_settings.json records the EOS training closed answers with: a tokenizer with another one is said."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dirs["hf"]))
    for eos, warned in ((tok.eos_token, False), ("<|eot|>", True)):
        write_data_settings(tmp_path, replace(data_settings_of(TemplateSettings(), tok, 16), eos_token=eos))
        demo.prompt_settings([tmp_path], None, tok)
        err = capsys.readouterr().err
        assert (f"warning: training's tokenizer had the EOS '<|eot|>' (data_settings.json), this one {tok.eos_token!r}"
                in err) == warned, err


def test_tensor_parallel_without_gpus_is_refused(dirs, capsys, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("has an accelerator")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert demo.main(["--model-path", str(dirs["hf"]), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("demo.py: error:") and "needs accelerators" in err and "\n" not in err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ)  # without DS_ACCELERATOR: DeepSpeed's detection warns on a machine without a GPU, not on stdout
    env.pop("WORLD_SIZE", None), env.pop("DS_ACCELERATOR", None)
    p = subprocess.run([sys.executable, "demo.py", "--model-path", str(tmp_path / "nope"), "--instruct", "x"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith("demo.py: error:")
    with pytest.raises(SystemExit) as e:  # neither --prompt nor --instruct: argparse's own exit 2
        demo.main(["--model-path", str(tmp_path)])
    assert e.value.code == 2


def test_an_adapter_for_another_base_is_one_line(tmp_path):
    """PEFT drops an adapter's tensors that find no module (here: the last 2 layers of a 4-layer model's adapter)
    silently; another family or width is a traceback. demo.py refuses each in one line; the right base loads."""
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    def llama(layers: int, hidden: int = 32):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=layers)).eval()

    adapter = get_peft_model(llama(4), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(str(tmp_path / "adapter"))
    assert demo.with_adapter(llama(4), tmp_path / "adapter") is not None
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=4, n_head=4))
    for base, problem in [(llama(2), "its tensor base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight has "
                                     "no place in the base (8 unused, 0 missing)"),
                          (llama(4, hidden=64), "Error(s) in loading state_dict for PeftModel: size mismatch"),
                          (bloom, "Target modules {")]:
        with pytest.raises(demo.DemoError) as e:
            demo.with_adapter(base, tmp_path / "adapter")
        assert str(e.value).startswith(f"--adapter {tmp_path / 'adapter'} does not fit this base model (the adapter's "
                                       "base: not recorded): ") and problem in str(e.value) and "\n" not in str(e.value)


def test_an_adapter_on_a_base_of_other_weights_is_a_warning(tmp_path, capsys):
    """An adapter runs on any base of its shapes (a chat variant of the one it was trained on): a warning names the
    recorded base when that is a local dir whose weights differ; a copy of it elsewhere is the same base."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    for seed, name in ((0, "base"), (1, "variant")):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2)).save_pretrained(str(tmp_path / name))
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    load = lambda name: LlamaForCausalLM.from_pretrained(str(tmp_path / name)).eval()  # noqa: E731
    get_peft_model(load("base"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "adapter"))
    for name in ("base", "copy", "variant"):
        capsys.readouterr()
        demo.with_adapter(load(name), tmp_path / "adapter")
        warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warned == ([] if name != "variant" else [
            f"warning: --adapter {tmp_path / 'adapter'} was trained on {tmp_path / 'base'}, whose weights differ from "
            "--model-path's: the output is not the fine-tuned model's (give its base as --model-path)"]), (name, warned)
    import convert_model  # a pipeline dir converted from the base (bf16 here: other values) is that base

    assert convert_model.main(["hg_to_pp", "--input-path", str(tmp_path / "base"), "--save-path", str(tmp_path / "pp"),
                               "--dtype", "bf16"]) == 0
    capsys.readouterr()
    from models.convert import load_hf_model

    demo.with_adapter(load_hf_model(tmp_path / "pp", torch.float32)[0], tmp_path / "adapter", tmp_path / "pp")  # as on CPU
    assert "warning:" not in capsys.readouterr().err


def test_tokenizer_settings_and_prompt_problems_are_one_line_before_the_weights_load(dirs, tmp_path, capsys,
                                                                                     monkeypatch):
    """A dir without tokenizer files (was transformers' message cut at "from one of:"), a damaged data_settings.json,
    chat mode without a chat template: one line each, said before the weights are read (minutes for a 70B model)."""
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the problem was said")

    monkeypatch.setattr(demo, "load_hf_model", no_weights)
    cases = {}
    for kind, src in (("pp", dirs["pp"]), ("hf", dirs["hf"])):
        notok = tmp_path / f"{kind}_notok"
        shutil.copytree(src, notok)
        for f in notok.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.unlink()
        cases[notok] = (["--prompt", "hi"], f"{notok}: no tokenizer files (none of tokenizer.json, tokenizer.model, "
                                            "tokenizer_config.json, vocab.json); cannot load a tokenizer")
    bad = tmp_path / "bad_settings"
    shutil.copytree(dirs["hf"], bad)
    (bad / DATA_SETTINGS_FILE).write_text("{")
    cases[bad] = (["--prompt", "hi"], f"{bad / DATA_SETTINGS_FILE}: unreadable data settings")
    cases[dirs["hf"]] = (["--template", "chat", "--record", '{"rounds": [["ask", "Hi"]]}'],
                         "--template chat: the tokenizer has no chat template")
    for path, (argv, message) in cases.items():
        assert demo.main(["--model-path", str(path), *argv]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"demo.py: error: {message}"), path


def test_an_empty_answer_is_said(dirs, tmp_path, capsys):
    """A model whose answer decodes to nothing (here: its final norm zeroed, every logit 0, token 0 each step)
    printed a blank line alone, which looks like a failure of the demo."""
    from transformers import AutoModelForCausalLM

    hf = tmp_path / "hf"
    shutil.copytree(dirs["hf"], hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(hf)
    assert run_demo(capsys, "--model-path", str(hf), "--prompt", "Hello", "--max-new-tokens", "3") == "\n"
    assert demo.main(["--model-path", str(hf), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert "note: the answer is empty (the model generated 3 token(s): ids [0, 0, 0])" in capsys.readouterr().err
