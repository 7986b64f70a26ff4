"""HF <-> pipeline conversion: bit-exact round trips, formats, init, and what an export holds (bad input and
output targets, refused in one line: test_convert_errors.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from data.settings import data_settings_of, read_data_settings, write_data_settings
from data.templates import TemplateSettings
from data.tiny_tokenizer import train_tiny_tokenizer
from models import SequentialModel, get_family
from models.convert import pp_to_hg
from models.hf_io import TOKENIZER_FILES, CheckpointError
from tests.helpers import ROOT_TEXTS, load_hf_tensors, make_batch, run, tiny_config, write_hf
from tests.helpers import assert_one_line_error as _assert_one_line_error
from tests.helpers import edit_weights as _edit_weights
from tests.helpers import files as _files
from tests.helpers import lora_checkpoint as _lora_checkpoint


@pytest.mark.parametrize("family, name", [("llama", "mha_bias_untied"), ("llama", "gqa_tied"), ("llama", "gqa_llama3_rope"),
                                          ("qwen2", "tied"), ("mistral", "window")])
def test_round_trip_is_bit_exact(tmp_path, tokenizer, family, name):
    hf = write_hf(tmp_path, tokenizer, name, family=family)
    assert len(list(hf.glob("model-*.safetensors"))) > 1, "the source must be sharded"
    (hf / "LICENSE").write_text("a licence asking redistributors to include it")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back"),
               "--max-shard-size", "50KB") == 0
    back = tmp_path / "back"

    a, b = load_hf_tensors(hf), load_hf_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tied = json.loads((hf / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in b) == (not tied)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    assert json.loads((hf / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    assert (back / "LICENSE").read_bytes() == (hf / "LICENSE").read_bytes()  # carried, as Llama's licence asks
    for f in TOKENIZER_FILES:  # hg_to_pp and pp_to_hg copy the tokenizer's files byte for byte
        assert (hf / f).is_file() == (back / f).is_file() and (not (hf / f).is_file() or (hf / f).read_bytes() == (back / f).read_bytes()), f
    t1, t2 = AutoTokenizer.from_pretrained(str(hf)), AutoTokenizer.from_pretrained(str(back))
    for text in ROOT_TEXTS:
        assert t1(text)["input_ids"] == t2(text)["input_ids"]

    m1, m2 = AutoModelForCausalLM.from_pretrained(str(hf)), AutoModelForCausalLM.from_pretrained(str(back))
    assert type(m2) is get_family(family).hf_model_class
    ids = torch.randint(4, len(tokenizer), (2, 9))
    assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_pytorch_bin_fallback_and_dtype(tmp_path, tokenizer):
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    sd = load_hf_tensors(hf)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / f).write_bytes((hf / f).read_bytes())
    # old checkpoints also carry the rotary buffer; it is derived and must be skipped
    torch.save({**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, bin_dir / "pytorch_model.bin")
    assert run("hg_to_pp", "--input-path", str(bin_dir), "--save-path", str(tmp_path / "pp"), "--dtype", "bf16") == 0
    layer = torch.load(tmp_path / "pp" / "layer_01-model_states.pt", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in layer.values())
    assert json.loads((tmp_path / "pp" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
    back = load_hf_tensors(tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").is_file()  # one shard: no index, as save_pretrained does
    for k, t in sd.items():
        assert torch.equal(back[k], t.to(torch.bfloat16)), k


def test_a_legacy_pytorch_bin_converts(tmp_path, tokenizer):
    """torch's pre-1.6 (non-zip) pytorch_model.bin, which transformers loads and torch cannot memory-map."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    sd = load_hf_tensors(hf)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_bytes((hf / "config.json").read_bytes())
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert run("hg_to_pp", "--input-path", str(legacy), "--save-path", str(tmp_path / "pp")) == 0
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
    back = load_hf_tensors(tmp_path / "back")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], t) for k, t in sd.items())


def test_a_tied_head_is_dropped_only_when_it_is_the_embedding(tmp_path, tokenizer, capsys):
    """tie_word_embeddings with an lm_head.weight saved too: a copy of the embedding is redundant; a different head is
    what transformers 5 loads (untied), so converting it as tied would change the model: one line, nothing written."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")

    def head(make):  # lm_head.weight = make(the embedding), saved in the embedding's shard
        return lambda sd: sd.update({"lm_head.weight": make(sd["model.embed_tokens.weight"])}) \
            if "model.embed_tokens.weight" in sd else None

    _edit_weights(hf, head(torch.clone))
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    assert not (tmp_path / "pp" / "layer_05-model_states.pt").exists()  # tied: the head owns no layer file
    _edit_weights(hf, head(torch.randn_like))
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp2")) == 2
    shard = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    _assert_one_line_error(capsys, f"{hf / shard}: lm_head.weight differs from model.embed_tokens.weight, but "
                           "config.json says \"tie_word_embeddings\": true (transformers loads them untied); set it to "
                           f"false in {hf / 'config.json'}")
    assert not (tmp_path / "pp2").exists()


def test_named_chat_templates_are_kept(tmp_path, tokenizer_dir):
    """transformers 5 saves the chat templates but "default" as additional_chat_templates/NAME.jinja: init, hg_to_pp
    and pp_to_hg carry the directory, so the exported tokenizer has every template."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = {"default": "{{ messages[0]['content'] }}", "tool_use": "TOOLS {{ messages[0]['content'] }}"}
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"),
               "--save-path", str(tmp_path / "init")) == 0
    assert run("pp_to_hg", "--input-path", str(tmp_path / "init"), "--save-path", str(tmp_path / "hf")) == 0
    assert run("hg_to_pp", "--input-path", str(tmp_path / "hf"), "--save-path", str(tmp_path / "pp")) == 0
    for d in ("init", "hf", "pp"):
        assert _files(tmp_path / d / "additional_chat_templates") == {
            str(tmp_path / d / k.removeprefix(str(tmp_path / "tok") + "/")): v
            for k, v in _files(tmp_path / "tok").items() if "additional_chat_templates" in k}, d
        assert AutoTokenizer.from_pretrained(str(tmp_path / d)).chat_template == tok.chat_template, d
    # a training save_path takes them too, again on every resume (a rename does not replace a non-empty directory)
    from models.hf_io import replace_side_files

    save = tmp_path / "save"
    (save / "additional_chat_templates").mkdir(parents=True)
    (save / "additional_chat_templates" / "gone.jinja").write_text("from an earlier model")
    # an earlier model's run in this save_path (killed before its first checkpoint) left files this model has not:
    # they went into every export of this one (its licence, a tokenizer.model llama.cpp reads first)
    for name in ("LICENSE", "tokenizer.model", "data_settings.json"):
        (save / name).write_text("from an earlier model")
    said = []
    for _ in range(2):
        assert "additional_chat_templates" in replace_side_files(tmp_path / "hf", save, kept=("data_settings.json",),
                                                                 say=said.append)
        assert not (save / "LICENSE").exists() and not (save / "tokenizer.model").exists()
        assert (save / "data_settings.json").read_text() == "from an earlier model"  # the run writes its own
        assert AutoTokenizer.from_pretrained(str(save)).chat_template == tok.chat_template
        assert sorted(p.name for p in (save / "additional_chat_templates").iterdir()) == ["tool_use.jinja"]
        assert not list(save.glob(".side-files.*"))
    assert said == [f"removed tokenizer.model, LICENSE from {save}: left by an earlier model, {tmp_path / 'hf'} has none"]


def test_init_writes_a_loadable_model(tmp_path, tokenizer_dir, tokenizer):
    pp = tmp_path / "pp"
    assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
               "--save-path", str(pp), "--seed", "3") == 0
    family = get_family("llama")
    config = family.load_config(pp)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    seq = SequentialModel(family.layer_specs(config))
    seq.load_layer_files(pp)
    q = seq.layers["1"].self_attn.q_proj.weight
    assert abs(q.std().item() - config.initializer_range) < 0.004 and torch.equal(seq.layers[str(len(seq.layers) - 2)].weight,
                                                                                 torch.ones(config.hidden_size))
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf")) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids, mask, pos, seg, _ = make_batch(len(tokenizer), [10, 10], 10, "right")
    torch.testing.assert_close(seq((ids, pos, seg)), hf(ids).logits, atol=1e-5, rtol=0)
    # the same seed gives the same weights
    assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
               "--save-path", str(tmp_path / "pp2"), "--seed", "3") == 0
    for f in pp.glob("layer_*"):
        a, b = torch.load(f, weights_only=True), torch.load(tmp_path / "pp2" / f.name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


# What llama.cpp's convert_hf_to_gguf.py reads from an HF dir (the `gguf` package ships its writer but not this
# converter, so it cannot run offline here): config.json through AutoConfig, whose architectures[0] picks the
# converter class (LlamaModel for Llama and Mistral, Qwen2Model for Qwen2); the hyperparameters of its
# set_gguf_parameters and of the q/k permutation; the vocabulary from tokenizer.model (SentencePiece) or else
# tokenizer.json (BPE vocab + merges, every id below vocab_size) with gguf.SpecialVocab's special tokens
# (tokenizer_config.json's strings, config.json's ids); and tensor names its TensorNameMap knows.
GGUF_HPARAMS = ("num_hidden_layers", "max_position_embeddings", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size")
GGUF_TENSOR = re.compile(r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|model\.layers\.\d+\."
                         r"(input_layernorm\.weight|post_attention_layernorm\.weight|self_attn\.[qkv]_proj\.(weight|bias)"
                         r"|self_attn\.o_proj\.weight|mlp\.(gate|up|down)_proj\.weight))$")


def check_llama_cpp_reads(hf: Path, family: str) -> None:
    """The fields of `hf` (an HF dir) that llama.cpp's converter reads are there and consistent (see GGUF_HPARAMS)."""
    from transformers import AutoConfig

    hp = AutoConfig.from_pretrained(str(hf)).to_dict()
    assert hp["architectures"] == [get_family(family).hf_model_class.__name__]
    assert all(isinstance(hp.get(k), (int, float)) for k in GGUF_HPARAMS), {k: hp.get(k) for k in GGUF_HPARAMS}
    assert (hp.get("rope_parameters") or {}).get("rope_theta", hp.get("rope_theta")) is not None
    tensors = load_hf_tensors(hf)
    assert all(GGUF_TENSOR.match(k) for k in tensors), [k for k in tensors if not GGUF_TENSOR.match(k)]
    head_dim = tensors["model.layers.0.self_attn.q_proj.weight"].shape[0] // hp["num_attention_heads"]
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape[0] == head_dim * hp["num_key_value_heads"]
    assert tensors["model.embed_tokens.weight"].shape[0] == hp["vocab_size"]
    tok = AutoTokenizer.from_pretrained(str(hf))
    if (hf / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
        assert sp.vocab_size() <= hp["vocab_size"] and len({sp.GetScore(i) for i in range(sp.vocab_size())}) > 2
    else:
        model = json.loads((hf / "tokenizer.json").read_text())["model"]
        assert model["type"] == "BPE" and model["merges"] and max(tok.get_vocab().values()) < hp["vocab_size"]
    special = json.loads((hf / "tokenizer_config.json").read_text())
    assert special["eos_token"] == tok.eos_token and hp["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("family, tokenizer_fixture", [("llama", "sp_tokenizer_dir"), ("mistral", "sp_tokenizer_dir"),
                                                       ("qwen2", "tokenizer_dir")])
def test_init_and_export_keep_what_downstream_tools_read(tmp_path, request, family, tokenizer_fixture):
    """llama.cpp's converter reads config.json's `architectures` and a SentencePiece model's tokenizer.model; `init`
    used to drop both (check_llama_cpp_reads: every field it reads). Outputs are readable by the group and others
    (the umask, not a private temporary mode). Every family's `tiny` preset. pad_token_id is the tokenizer's (none
    for the SentencePiece one): EOS as the embedding's padding_idx would be a zero row that never learns."""
    import os
    import stat

    tokenizer_dir = request.getfixturevalue(tokenizer_fixture)
    old = os.umask(0o022)
    try:
        assert run("init", "--family", family, "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
                   "--save-path", str(tmp_path / "pp")) == 0
        assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "hf")) == 0
    finally:
        os.umask(old)
    for out in (tmp_path / "pp", tmp_path / "hf"):
        assert json.loads((out / "config.json").read_text())["architectures"] == [get_family(family).hf_model_class.__name__]
        for f in tokenizer_dir.iterdir():
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name  # tokenizer.model included
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}
    assert (tmp_path / "hf" / "tokenizer.model").is_file() == (tokenizer_fixture == "sp_tokenizer_dir")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert json.loads((tmp_path / "pp" / "config.json").read_text()).get("pad_token_id") == tok.pad_token_id
    assert (tok.pad_token_id is None) == (tokenizer_fixture == "sp_tokenizer_dir")
    embed = load_hf_tensors(tmp_path / "hf")["model.embed_tokens.weight"]
    assert embed[tok.eos_token_id].abs().sum() > 0 and (tok.pad_token_id is None or not embed[tok.pad_token_id].any())
    check_llama_cpp_reads(tmp_path / "hf", family)
    tied = get_family(family).presets["tiny"]["tie_word_embeddings"]
    assert ("lm_head.weight" in load_hf_tensors(tmp_path / "hf")) == (not tied)  # tied: llama.cpp reuses token_embd


WRITES_EOT = "{% for m in messages %}{{ m['content'] + '<|eot_id|>' }}{% endfor %}"


@pytest.mark.parametrize("pad, template, kept", [
    ("</s>", WRITES_EOT, False), ("<unk>", WRITES_EOT, False), ("<s>", WRITES_EOT, False), ("!", WRITES_EOT, False),
    ("<|eot_id|>", WRITES_EOT, False), ("<|eot_id|>", {"default": WRITES_EOT, "tool_use": "{{ messages }}"}, False),
    ("<pad>", "{% for m in messages %}{{ m['content'] + pad_token }}{% endfor %}", False),
    ("<pad>", WRITES_EOT, True), ("<pad>", None, True), ("<pad>", {"default": WRITES_EOT}, True)])
@pytest.mark.parametrize("kind", ["tokenizer_dir", "sp_tokenizer_dir"])
def test_init_gives_a_real_token_no_padding_row(tmp_path, request, kind, pad, template, kept):
    """A pad set to EOS (the common Llama fix), BOS, UNK, a word of the vocabulary or a token the chat template writes
    is a real input: as the embedding's padding_idx its row would be zero and never learn. init writes
    pad_token_id only for a pad of its own (an added token); the collator pads with the pad (or EOS) either way."""
    tok = AutoTokenizer.from_pretrained(str(request.getfixturevalue(kind)))
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tok.chat_template = template
    tok.add_special_tokens({"pad_token": pad})  # added where the vocabulary lacks it
    tok.save_pretrained(tmp_path / "tok")
    assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"),
               "--save-path", str(tmp_path / "pp")) == 0
    pad_id = tok.convert_tokens_to_ids(pad)
    assert json.loads((tmp_path / "pp" / "config.json").read_text()).get("pad_token_id") == (pad_id if kept else None)
    embed = torch.load(tmp_path / "pp" / "layer_00-model_states.pt")["weight"]
    assert embed[pad_id].any() != kept  # a pad of its own: the zero padding row, as transformers initialises it
    assert AutoTokenizer.from_pretrained(str(tmp_path / "pp")).pad_token == pad  # the tokenizer keeps its pad


# ---------------------------------------------------------------------------------------------- what is exported


def test_export_config_records_the_dtype_of_the_weights_written(tmp_path, tokenizer):
    """DeepSpeed's bf16 training saves bf16 layer files from an fp16 base: the export's config says bfloat16 (`dtype`,
    and the legacy `torch_dtype` where the file has it), so from_pretrained loads it as trained."""
    torch.manual_seed(0)
    model = get_family("llama").hf_model_class(tiny_config("llama", "gqa_tied", vocab_size=len(tokenizer)))
    model.to(torch.float16).save_pretrained(tmp_path / "hf")
    assert run("hg_to_pp", "--input-path", str(tmp_path / "hf"), "--save-path", str(tmp_path / "pp")) == 0
    for f in (tmp_path / "pp").glob("layer_*"):
        torch.save({k: v.to(torch.bfloat16) for k, v in torch.load(f, weights_only=True).items()}, f)
    cfg = json.loads((tmp_path / "pp" / "config.json").read_text())
    assert cfg["dtype"] == "float16"
    (tmp_path / "pp" / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16"}))
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "out")) == 0
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out == {**cfg, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).dtype == torch.bfloat16


def test_a_stray_safetensors_index_does_not_hide_a_complete_bin_checkpoint(tmp_path, tokenizer, capsys):
    """`hf download --include "*.json" "*.bin"`: the safetensors index without its shards, beside complete .bin
    shards and their index. The first complete index is used; with none complete, the preferred one's missing file
    is named."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    dl = tmp_path / "dl"
    dl.mkdir()
    weight_map = {}
    for i, f in enumerate(sorted(hf.glob("model-*.safetensors"))):
        sd = load_file(str(f))
        torch.save(sd, dl / f"pytorch_model-{i + 1:05d}.bin")
        weight_map.update(dict.fromkeys(sd, f"pytorch_model-{i + 1:05d}.bin"))
    (dl / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "model.safetensors.index.json"):
        (dl / name).write_bytes((hf / name).read_bytes())
    assert run("hg_to_pp", "--input-path", str(dl), "--save-path", str(tmp_path / "pp")) == 0
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "ref")) == 0
    for f in (tmp_path / "ref").glob("layer_*"):
        a, b = torch.load(f, weights_only=True), torch.load(tmp_path / "pp" / f.name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    (dl / "pytorch_model-00001.bin").unlink()
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(dl), "--save-path", str(tmp_path / "pp2")) == 2
    first = sorted(hf.glob("model-*.safetensors"))[0].name
    _assert_one_line_error(capsys, f"{dl / first}: named in model.safetensors.index.json but missing")


def test_a_chat_run_exports_stop_at_the_end_of_turn_token(tmp_path):
    """A "template": "chat" run trains answers to end with the template's end-of-turn token (ChatML's <|im_end|>),
    not EOS: the exports' generation_config.json stops on both, [EOS, end-of-turn], as Llama-3-Instruct ships it, so
    transformers' generate (and vLLM) stop where demo.py does. A default-template run's is copied unchanged, unless it
    does not name the tokenizer's EOS."""
    tok = train_tiny_tokenizer(ROOT_TEXTS * 3, tmp_path / "tok", 400, "bpe", "chatml")
    base = tmp_path / "pp"
    assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"),
               "--save-path", str(base)) == 0
    write_data_settings(base, data_settings_of(TemplateSettings(), tok))
    assert run("pp_to_hg", "--input-path", str(base), "--save-path", str(tmp_path / "plain")) == 0
    assert (tmp_path / "plain" / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()

    write_data_settings(base, data_settings_of(TemplateSettings(template="chat"), tok))
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert eot != eos and GenerationConfig.from_pretrained(str(base)).eos_token_id == eos
    assert run("pp_to_hg", "--input-path", str(base), "--save-path", str(tmp_path / "hf")) == 0
    gen = GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert gen.eos_token_id == [eos, eot] and gen.bos_token_id == tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.generation_config.eos_token_id == [eos, eot]
    save = _lora_checkpoint(tmp_path, base)  # its side files include the chat run's data_settings.json
    pp_to_hg(save, tmp_path / "adapter", lora="peft")
    assert GenerationConfig.from_pretrained(str(tmp_path / "adapter")).eos_token_id == [eos, eot]
    # a base whose generation config names another EOS than its tokenizer's (ChatML's <|im_end|> made the EOS, the
    # file still naming </s>): answers end with the tokenizer's, so each export adds it, in either mode (they kept the
    # file as it was, and generate ran to max_new_tokens where demo.py stops)
    ended = tmp_path / "ended"
    shutil.copytree(base, ended, ignore=shutil.ignore_patterns("data_settings.json"))
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(ended)
    (ended / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": eos}))
    for mode in ("default", "chat"):
        write_data_settings(ended, data_settings_of(TemplateSettings(template=mode), tok))
        assert run("pp_to_hg", "--input-path", str(ended), "--save-path", str(tmp_path / mode)) == 0
        assert GenerationConfig.from_pretrained(str(tmp_path / mode)).eos_token_id == [eos, eot], mode
    # named templates (transformers 5 saves them as chat_template.jinja + additional_chat_templates/): the record is the
    # one apply_chat_template renders with, "default" (the whole dict made data_settings.json unreadable)
    tok.chat_template = {"default": tok.chat_template, "tool_use": "{{ tools }}"}
    write_data_settings(base, data_settings_of(TemplateSettings(template="chat"), tok))
    assert read_data_settings(base).chat_template == tok.chat_template["default"]
    written = json.loads((base / "data_settings.json").read_text())  # as runs before e5bfb61 wrote it: the whole dict
    (base / "data_settings.json").write_text(json.dumps({**written, "chat_template": tok.chat_template}))
    assert read_data_settings(base).chat_template == tok.chat_template["default"]
    assert run("pp_to_hg", "--input-path", str(base), "--save-path", str(tmp_path / "named")) == 0


def test_a_save_dirs_best_and_latest_files_name_their_checkpoint(tmp_path, tokenizer):
    """`pp_to_hg --input-path SAVE/best` (and demo.py's --model-path) read the tag the file names; one naming a tag
    that is gone is one line, and so is a save dir whose `latest` is gone or names no checkpoint: it names those it
    has."""
    from models.convert import resolve_checkpoint

    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    save = tmp_path / "run"
    (save / "global_step4").mkdir(parents=True)
    for f in (tmp_path / "pp").iterdir():
        (save / ("global_step4" if f.name.startswith("layer_") else "") / f.name).write_bytes(f.read_bytes())
    (save / "best").write_text("global_step4\n")
    (save / "latest").write_text("global_step9")
    assert resolve_checkpoint(save / "best") == (save / "global_step4", save)
    pp_to_hg(save / "best", tmp_path / "hf_best")
    pp_to_hg(tmp_path / "pp", tmp_path / "hf_pp")
    got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf_best", "hf_pp"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(CheckpointError, match=f"^{save / 'latest'}: names 'global_step9', which is not a checkpoint "
                       "directory beside it"):
        resolve_checkpoint(save / "latest")
    # the save dir itself, its latest naming a deleted checkpoint or gone: the checkpoints it has are named
    (save / "global_step2").mkdir()
    with pytest.raises(CheckpointError, match=f"^{save}: a training save_path, but its latest names 'global_step9', "
                       f"which is not a checkpoint; give one of its checkpoints, e.g. {save / 'global_step4'} "
                       r"\(the newest; it has global_step2, global_step4\)$"):
        resolve_checkpoint(save)
    (save / "latest").unlink()
    with pytest.raises(CheckpointError, match=f"^{save}: a training save_path, but it has no `latest` file; "):
        resolve_checkpoint(save)


def test_a_mixed_dtype_checkpoint_keeps_its_config_dtype(tmp_path, tokenizer):
    """bf16 linears beside fp32 norms and embeddings, config dtype float32: from_pretrained loads every weight as
    float32. The export keeps the source's dtype (it is set only when all floating weights share one), so the round
    trip loads the same model."""
    torch.manual_seed(0)
    model = get_family("llama").hf_model_class(tiny_config("llama", "mha_bias_untied", vocab_size=len(tokenizer)))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    model.config.dtype = "float32"
    model.save_pretrained(tmp_path / "hf")
    assert run("hg_to_pp", "--input-path", str(tmp_path / "hf"), "--save-path", str(tmp_path / "pp")) == 0
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["dtype"] == "float32" and json.loads((tmp_path / "back" / "config.json").read_text()) == cfg
    a, b = (AutoModelForCausalLM.from_pretrained(str(tmp_path / d)) for d in ("hf", "back"))
    ids = torch.randint(4, len(tokenizer), (2, 9))
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a(ids).logits, b(ids).logits)


def test_exports_name_their_architectures(tmp_path, tokenizer):
    """llama.cpp's converter reads config.json's architectures[0]: pp_to_hg writes it (the family's HF class) when the
    source's config lacks it, and keeps the source's otherwise."""
    hf = write_hf(tmp_path, tokenizer, "tied", family="qwen2")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architectures"}))
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == {**cfg, "architectures": ["Qwen2ForCausalLM"]}
    (tmp_path / "pp" / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2Custom"]}))
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back"), "--overwrite") == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Qwen2Custom"]


def test_an_auto_map_is_not_exported(tmp_path, tokenizer, capsys):
    """A source with custom code (config.json's auto_map): the model trains and exports as transformers' class, and
    the code files are not carried, so an export keeping auto_map failed to load with trust_remote_code=True."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    cfg = json.loads((hf / "config.json").read_text())
    auto = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (hf / "config.json").write_text(json.dumps({**cfg, "auto_map": auto, "architectures": ["XForCausalLM"]}))
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "auto_map": {"AutoTokenizer": [
        "tokenization_x.XTokenizer", "tokenization_x.XTokenizerFast"]}}))
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    assert "auto_map (custom model code) is not used: the model trains as transformers' LlamaForCausalLM" in \
        capsys.readouterr().err
    assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "auto_map" not in exported and exported["architectures"] == ["LlamaForCausalLM"]  # the class trained
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text()) == tok_cfg
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "back"), trust_remote_code=True)) == len(tokenizer)
