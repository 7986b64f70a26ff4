"""Bloom: ALiBi against transformers', the tied head (numerics against BloomForCausalLM for every row kind:
test_attention.py);
bit-exact HF -> pipeline -> HF round trips for checkpoints with and without the "transformer." prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import convert_model
from models import SequentialModel, get_family
from models.bloom import alibi_bias
from models.convert import load_hf_model
from tests.helpers import (
    bloom_config,
    make_batch,
    sequential_from_hf,
)

FAMILY = get_family("bloom")


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = BloomForCausalLM(bloom_config(name)).float()
    return hf, sequential_from_hf(hf)


# ---------------------------------------------------------------------------------------------- numerics


def test_alibi_equals_transformers_up_to_a_per_row_shift():
    """Left padding: the same values as build_alibi_tensor; a packed segment: HF's absolute positions minus
    the segment's start, a constant per query row (softmax ignores it)."""
    _, mask, pos, _, _ = make_batch(300, [12, 7, 4], 12, "left")
    heads = 6
    assert torch.equal(alibi_bias(pos, heads, torch.float32), build_alibi_tensor(mask, heads, torch.float32))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    ours, absolute = alibi_bias(packed, heads, torch.float32), build_alibi_tensor(torch.ones(1, 7), heads, torch.float32)
    torch.testing.assert_close(absolute[..., 4:] - ours[..., 4:], absolute[..., 4:5].expand(-1, -1, 3))


def test_tied_head_shares_the_embedding_weight():
    hf, seq = _pair("tied")
    n = hf.config.num_hidden_layers
    assert sorted(map(int, seq.layers)) == list(range(n + 2))  # embed, blocks, ln_f; the head owns no file
    assert len({id(p) for p in seq.parameters()}) == sum(1 for _ in hf.parameters())
    assert sorted(seq.layers["0"].state_dict()) == ["word_embeddings.weight", "word_embeddings_layernorm.bias",
                                                    "word_embeddings_layernorm.weight"]


# ---------------------------------------------------------------------------------------------- conversion


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _write_hf(tmp: Path, tokenizer, name: str, shard: str = "60KB") -> Path:
    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config(name, vocab_size=len(tokenizer)))
    hf = tmp / f"hf_{name}"
    model.save_pretrained(hf, max_shard_size=shard)
    tokenizer.save_pretrained(hf)
    return hf


def _convert(*argv: str) -> None:
    assert convert_model.main(list(argv)) == 0, argv


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_round_trip_is_bit_exact_and_loads(tmp_path, tokenizer, name):
    hf = _write_hf(tmp_path, tokenizer, name)
    assert len(list(hf.glob("model-*.safetensors"))) > 1, "the source must be sharded"
    _convert("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp"))
    _convert("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back"), "--max-shard-size", "50KB")
    back = tmp_path / "back"

    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b) and all(k.startswith("transformer.") or k == "lm_head.weight" for k in b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ("lm_head.weight" in b) == (name == "untied")  # tied: the embedding is saved once, as save_pretrained does
    assert json.loads((hf / "config.json").read_text()) == json.loads((back / "config.json").read_text())

    m1, m2 = AutoModelForCausalLM.from_pretrained(str(hf)), AutoModelForCausalLM.from_pretrained(str(back))
    assert isinstance(m2, BloomForCausalLM)
    if name == "tied":
        assert m2.lm_head.weight is m2.transformer.word_embeddings.weight
    ids = torch.randint(4, len(tokenizer), (2, 9))
    assert torch.equal(m1(ids).logits, m2(ids).logits)


def _prefixless(sd):  # as published (bigscience/bloom*): base-model keys, no lm_head
    return {k.removeprefix("transformer."): v.clone() for k, v in sd.items() if k != "lm_head.weight"}


def _with_lm_head(sd):  # prefixed, and a redundant copy of the tied head
    return {k: v.clone() for k, v in sd.items()}


def _prefixless_with_lm_head(sd):  # base-model keys and a redundant copy of the tied head (which must match them)
    return {k.removeprefix("transformer."): v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("variant", [_prefixless, _with_lm_head, _prefixless_with_lm_head],
                         ids=["no-prefix-no-head", "prefix-redundant-head", "no-prefix-redundant-head"])
def test_published_key_spellings_import(tmp_path, tokenizer, variant):
    hf = _write_hf(tmp_path, tokenizer, "tied", shard="10GB")
    _convert("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp_ref"))
    model = BloomForCausalLM.from_pretrained(str(hf))
    src = tmp_path / "published"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((hf / f).read_bytes())
    sd = variant(model.state_dict())
    assert ("transformer.ln_f.weight" in sd) == (variant is _with_lm_head) and ("lm_head.weight" in sd) != (variant is _prefixless)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})

    _convert("hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "pp"))
    files = sorted(p.name for p in (tmp_path / "pp_ref").glob("layer_*"))
    assert files == sorted(p.name for p in (tmp_path / "pp").glob("layer_*"))
    for f in files:
        x, y = torch.load(tmp_path / "pp_ref" / f, weights_only=True), torch.load(tmp_path / "pp" / f, weights_only=True)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
    _convert("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back"))
    a, b = _tensors(hf), _tensors(tmp_path / "back")  # export writes what save_pretrained writes
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, expected", [
    ({"h.0.self_attention.extra.weight": torch.zeros(2)}, "unexpected tensor h.0.self_attention.extra.weight"),
    ({"transformer.ln_f.bias": torch.zeros(64)}, "tensors ln_f.bias and transformer.ln_f.bias are the same weight"),
], ids=["unknown", "both-spellings"])
def test_bad_prefixless_keys_are_named(tmp_path, tokenizer, capsys, extra, expected):
    hf = _write_hf(tmp_path, tokenizer, "tied", shard="10GB")
    sd = _prefixless(load_file(str(hf / "model.safetensors")))
    save_file({**sd, **extra}, str(hf / "model.safetensors"))
    capsys.readouterr()
    assert convert_model.main(["hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "pp").exists()


def test_init_preset_exports_a_loadable_model(tmp_path, tokenizer_dir, tokenizer):
    pp = tmp_path / "pp"
    _convert("init", "--family", "bloom", "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--save-path", str(pp))
    config = FAMILY.load_config(pp)
    seq = SequentialModel(FAMILY.layer_specs(config))
    seq.load_layer_files(pp)
    qkv = seq.layers["1"].self_attention.query_key_value
    assert abs(qkv.weight.std().item() - config.initializer_range) < 0.004 and not qkv.bias.any()
    ln = seq.layers["0"].word_embeddings_layernorm
    assert torch.equal(ln.weight, torch.ones(config.hidden_size)) and not ln.bias.any()
    _convert("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf"))
    assert "lm_head.weight" not in _tensors(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids, mask, pos, seg, _ = make_batch(len(tokenizer), [10, 6], 10, "left")
    real = mask.bool()
    logits = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(seq((ids, pos, seg))[real], logits[real], atol=1e-5, rtol=0)
    direct, family, _ = load_hf_model(pp)  # what demo.py loads from a pipeline dir: the family from config.json
    assert family is FAMILY and direct.lm_head.weight is direct.transformer.word_embeddings.weight
    assert torch.equal(direct(ids, attention_mask=mask).logits, logits)
