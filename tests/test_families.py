"""Qwen2 and Mistral beyond what test_attention.py (numerics), test_convert.py (round trips, init presets, what
llama.cpp reads) and test_train_reference.py share with Llama: the sliding window is exact or refused, and LoRA's
"all-linear" targets in the pipeline compute what peft computes on the transformers model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import convert_model
import train_ds
from models import ModelConfigError, get_family
from models.lora import apply_lora, load_adapter_into, parse_lora
from tests.helpers import make_batch, sequential_from_hf, tiny_config, write_config
from training.config import load_config


def test_sliding_window_in_effect():
    """The window only counts where a layer applies it (Qwen2: use_sliding_window and layers past max_window_layers;
    Mistral: every layer, whatever its config's layer_types say)."""
    window = lambda family, name, **kw: get_family(family).sliding_window(tiny_config(family, name, **kw))  # noqa: E731
    assert window("llama", "gqa_tied") is None
    assert window("qwen2", "tied") is None  # use_sliding_window false: every published Qwen2 / Qwen2.5
    assert window("qwen2", "tied", use_sliding_window=True, sliding_window=8, max_window_layers=1) == 8
    assert window("qwen2", "tied", use_sliding_window=True, sliding_window=8, max_window_layers=3) is None  # no such layer
    assert window("mistral", "window") == 128 and window("mistral", "window", sliding_window=None) is None
    # MistralAttention applies the window in every layer; MistralConfig keeps layer_types only to warn about them
    assert window("mistral", "window", layer_types=["full_attention"] * 2) == 128


@pytest.mark.parametrize("family, name, over", [
    ("mistral", "window", dict(sliding_window=8)),
    ("qwen2", "tied", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
], ids=["mistral", "qwen2"])
def test_sliding_window_is_exact_up_to_it_and_refused_beyond(family, name, over):
    """Rows as long as the window: transformers' sliding-window model exactly; one token more: refused, never a
    silently different (full causal) attention."""
    torch.manual_seed(0)
    hf = get_family(family).hf_model_class(tiny_config(family, name, **over)).float()
    seq = sequential_from_hf(hf)
    ids, mask, pos, seg, _ = make_batch(300, [8, 5], 8, "left")
    real = mask.bool()
    torch.testing.assert_close(seq((ids, pos, seg))[real], hf(ids, attention_mask=mask, position_ids=pos).logits[real],
                               atol=1e-5, rtol=0)
    ids, _, pos, seg, _ = make_batch(300, [9], 9, "right")
    with pytest.raises(ModelConfigError, match="a sequence of 9 tokens is longer than the model's sliding_window 8"):
        seq((ids, pos, seg))


def _init(tmp_path, tokenizer_dir, family: str, model: dict) -> None:
    """A pipeline dir of `model` (a config.json's keys) at tmp_path / "pp", made by `convert_model.py init`."""
    (tmp_path / "model.json").write_text(json.dumps(model))
    assert convert_model.main(["init", "--family", family, "--config-json", str(tmp_path / "model.json"),
                               "--tokenizer", str(tokenizer_dir), "--save-path", str(tmp_path / "pp")]) == 0


def _refused(cfg, capsys) -> list[str]:
    """train_ds.py's stderr lines for a config it refuses (exit 2)."""
    capsys.readouterr()
    assert train_ds.main(["--config", str(cfg)]) == 2
    return capsys.readouterr().err.strip().splitlines()


def test_config_refuses_max_seq_len_above_the_sliding_window(tmp_path, tokenizer_dir, capsys):
    _init(tmp_path, tokenizer_dir, "mistral", {**get_family("mistral").presets["tiny"], "sliding_window": 64})
    cfg = write_config(tmp_path, tmp_path / "pp", max_seq_len=96)
    err = _refused(cfg, capsys)
    assert err == [f"train_ds.py: error: {cfg}: 'max_seq_len' 96 is above the model's sliding_window 64 (config.json), "
                   "which the pipeline's attention does not implement (it would attend beyond the window); use "
                   "max_seq_len <= 64"], err
    assert load_config(write_config(tmp_path, tmp_path / "pp", max_seq_len=64), world_size=1).max_seq_len == 64


@pytest.mark.parametrize("family, name", [("qwen2", "tied"), ("mistral", "window")])
def test_all_linear_lora_matches_peft(family, name, tmp_path):
    """"all-linear" names every linear of the block (Qwen2's biased q/k/v included); adapters saved by peft load into
    the pipeline's blocks and give peft's logits."""
    torch.manual_seed(0)
    fam = get_family(family)
    hf = fam.hf_model_class(tiny_config(family, name)).float()
    settings = parse_lora({"r": 4, "alpha": 8, "target_modules": "all-linear"}, fam, hf.config)
    linears = {n.rsplit(".", 1)[-1] for n, m in hf.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(settings.target_modules) == linears
    seq = sequential_from_hf(hf)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(settings.target_modules)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:  # random A and B: a zero B would hide the adapters
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    seq.forward_funcs, seq._local_start = seq._funcs, 0  # what apply_lora reads of a PipelineModel
    n = fam.num_blocks(hf.config)
    assert apply_lora(seq, settings, fam, seed=0, num_blocks=n) == n
    assert load_adapter_into(seq, fam, tmp_path / "adapter", n) == 2 * n * len(linears)
    ids, mask, pos, seg, _ = make_batch(300, [12, 7], 12, "right")
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(seq((ids, pos, seg))[real], peft_model(input_ids=ids, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=0)


def test_dynamic_rope_encodes_each_micro_batch_as_a_fresh_model_does():
    """transformers' "dynamic" rope keeps the frequencies of the longest batch it has seen: the pipeline encodes every
    micro-batch by its own longest position, so its logits do not depend on the batches before it (an evaluation,
    or the batches before a resume)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config("llama", "gqa_tied", max_position_embeddings=64,
                      rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float().eval()
    seq = sequential_from_hf(hf)
    for order, (n, after) in enumerate([(80, 96), (40, 96)]):  # past the original 64 positions, and within them
        ids, _, pos, seg, _ = make_batch(300, [n], n, "right", seed=order)
        with torch.no_grad():
            fresh = LlamaForCausalLM(cfg).float().eval()
            fresh.load_state_dict(hf.state_dict())
            expected = fresh(ids, position_ids=pos).logits
            longer = make_batch(300, [after], after, "right", seed=9)
            seq((longer[0], longer[2], longer[3]))  # the longest batch so far: 96 positions
            torch.testing.assert_close(seq((ids, pos, seg)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "longrope", "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}], ids=["dynamic", "longrope"])
def test_packing_is_refused_where_rope_scaling_follows_the_longest_segment(tmp_path, tokenizer_dir, capsys, rope):
    """transformers' dynamic and longrope scaling encode a batch by its longest position: a packed segment past the
    switch length would change its neighbours' logits. Up to it, or unpacked (as transformers batches), it trains;
    unpacked above it, with a warning: a short row batched with a longer one gets other frequencies than alone."""
    _init(tmp_path, tokenizer_dir, "llama", {**get_family("llama").presets["tiny"], "rope_parameters": rope,
                                             "max_position_embeddings": 64 if rope["rope_type"] == "dynamic" else 256})
    cfg = write_config(tmp_path, tmp_path / "pp", max_seq_len=96, packing=True)
    err = _refused(cfg, capsys)
    assert err == [f"train_ds.py: error: {cfg}: 'packing' with max_seq_len 96 above 64: the model's rope scaling "
                   "(config.json: 'dynamic' or 'longrope') encodes every position of a row by its longest segment, so a "
                   "packed sample would depend on its neighbours; turn packing off or use max_seq_len <= 64"], err
    up_to = load_config(write_config(tmp_path, tmp_path / "pp", max_seq_len=64, packing=True), world_size=1)
    assert up_to.packing and not [n for n in up_to.notes if "rope scaling" in n]
    unpacked = load_config(write_config(tmp_path, tmp_path / "pp", max_seq_len=96), world_size=1)
    assert not unpacked.packing and [n for n in unpacked.notes if n.startswith(
        "the model's rope scaling (config.json: 'dynamic' or 'longrope') encodes the rows of a micro-batch by its "
        "longest row: with max_seq_len 96 above 64")], unpacked.notes
