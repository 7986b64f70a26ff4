"""HF <-> pipeline conversion: bit-exact round trips, formats, init, and one-line errors on bad input
that leave no partial output behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import convert_model
from models import SequentialModel, get_family
from tests.helpers import ROOT_TEXTS, llama_config, make_batch

ROOT = Path(__file__).resolve().parents[1]


def load_hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_hf(tmp: Path, tokenizer, name: str, shard: str = "60KB", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(name, vocab_size=len(tokenizer)))
    hf = tmp / f"hf_{name}"
    model.save_pretrained(hf, max_shard_size=shard)
    tokenizer.save_pretrained(hf)
    return hf


def run(*argv: str) -> int:
    return convert_model.main(list(argv))


@pytest.mark.parametrize("name", ["mha_bias_untied", "gqa_tied", "gqa_llama3_rope"])
def test_round_trip_is_bit_exact(tmp_path, tokenizer, name):
    hf = write_hf(tmp_path, tokenizer, name)
    assert len(list(hf.glob("model-*.safetensors"))) > 1, "the source must be sharded"
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
    t1, t2 = AutoTokenizer.from_pretrained(str(hf)), AutoTokenizer.from_pretrained(str(back))
    for text in ROOT_TEXTS:
        assert t1(text)["input_ids"] == t2(text)["input_ids"]

    m1, m2 = AutoModelForCausalLM.from_pretrained(str(hf)), AutoModelForCausalLM.from_pretrained(str(back))
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


def test_overwrite_replaces_only_when_asked(tmp_path, tokenizer):
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    target = tmp_path / "pp"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target)) == 2
    assert (target / "keep.txt").read_text() == "user data"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target), "--overwrite") == 0
    assert not (target / "keep.txt").exists() and (target / "layer_00-model_states.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"]  # no temp or backup dirs left


# ---------------------------------------------------------------------------------------------- bad input


def _edit_weights(hf: Path, edit) -> None:
    for f in hf.glob("model-*.safetensors"):
        sd = load_file(str(f))
        edit(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
    index = hf / "model.safetensors.index.json"
    wm = {}
    for f in hf.glob("model-*.safetensors"):
        wm.update(dict.fromkeys(load_file(str(f)), f.name))
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _extra_tensor(hf):
    _edit_weights(hf, lambda sd: sd.setdefault("model.layers.0.self_attn.extra.weight", torch.zeros(2)))


def _missing_tensor(hf):
    _edit_weights(hf, lambda sd: sd.pop("model.norm.weight", None))


def _layer_beyond_config(hf):
    _edit_weights(hf, lambda sd: sd.setdefault("model.layers.7.mlp.up_proj.weight", torch.zeros(2)))


def _unknown_model_type(hf):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))


def _no_weights(hf):
    for f in [*hf.glob("model*.safetensors*")]:
        f.unlink()


def _truncated_shard(hf):
    last = sorted(hf.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])


def _no_config(hf):
    (hf / "config.json").unlink()


BAD_HF = {  # case -> (damage, text expected in the message)
    "unexpected tensor": (_extra_tensor, "unexpected tensor model.layers.0.self_attn.extra.weight"),
    "missing tensor": (_missing_tensor, "missing tensor model.norm.weight"),
    "layer beyond config": (_layer_beyond_config, "model.layers.7.mlp.up_proj.weight"),
    "unknown model_type": (_unknown_model_type, "model_type 'gpt2' is not supported; supported: bloom, llama"),
    "no weights": (_no_weights, "no weights"),
    "truncated shard": (_truncated_shard, "truncated"),
    "no config": (_no_config, "config.json: missing"),
}


def _assert_one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert expected in last, last
    assert last.startswith("convert_model.py ") and ": error: " in last
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_input_fails_cleanly(tmp_path, tokenizer, capsys, case):
    damage, expected = BAD_HF[case]
    hf = write_hf(tmp_path, tokenizer, "mha_bias_untied")
    damage(hf)
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "out" / "pp")) == 2
    _assert_one_line_error(capsys, expected)
    assert not (tmp_path / "out" / "pp").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no temp dir left


def _pp(tmp_path, tokenizer) -> Path:
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    return tmp_path / "pp"


def _drop_layer(pp):
    (pp / "layer_02-model_states.pt").unlink()


def _wrong_layer_keys(pp):
    torch.save({"bogus": torch.zeros(1)}, pp / "layer_03-model_states.pt")


BAD_PP = {
    "missing layer file": (_drop_layer, "layer_02-model_states.pt: missing (block 1)"),
    "wrong layer keys": (_wrong_layer_keys, "layer_03-model_states.pt: missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PP))
def test_bad_pipeline_input_fails_cleanly(tmp_path, tokenizer, capsys, case):
    damage, expected = BAD_PP[case]
    pp = _pp(tmp_path, tokenizer)
    damage(pp)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_out")) == 2
    _assert_one_line_error(capsys, expected)
    assert not (tmp_path / "hf_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_arguments_fail_cleanly(tmp_path, tokenizer, tokenizer_dir, capsys):
    pp = _pp(tmp_path, tokenizer)
    cases = [
        (("hg_to_pp", "--input-path", str(tmp_path / "nope"), "--save-path", str(tmp_path / "x")), "no such directory"),
        (("pp_to_hg", "--input-path", str(tmp_path), "--save-path", str(tmp_path / "x")), "not a pipeline or checkpoint"),
        (("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "x"), "--max-shard-size", "lots"),
         "--max-shard-size 'lots'"),
        (("init", "--family", "llama", "--preset", "huge", "--tokenizer", str(tokenizer_dir), "--save-path",
          str(tmp_path / "x")), "--preset 'huge': unknown"),
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "nope"), "--save-path",
          str(tmp_path / "x")), "cannot load a tokenizer"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert run(*argv) == 2, argv
        _assert_one_line_error(capsys, expected)
        assert not (tmp_path / "x").exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "convert_model.py"), "hg_to_pp", "--input-path",
                           str(tmp_path / "missing"), "--save-path", str(tmp_path / "pp")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "[WARNING]" not in ln and ln.strip()]
    assert lines == [f"convert_model.py hg_to_pp: error: {tmp_path / 'missing'}: no such directory"]


def test_init_and_export_keep_what_downstream_tools_read(tmp_path, sp_tokenizer_dir):
    """llama.cpp's converter reads config.json's `architectures` and a SentencePiece model's tokenizer.model; `init`
    used to drop both. Outputs are readable by the group and others (the umask, not a private temporary mode)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(sp_tokenizer_dir),
                   "--save-path", str(tmp_path / "pp")) == 0
        assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "hf")) == 0
    finally:
        os.umask(old)
    for out in (tmp_path / "pp", tmp_path / "hf"):
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        for f in sp_tokenizer_dir.iterdir():
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name  # tokenizer.model included
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
