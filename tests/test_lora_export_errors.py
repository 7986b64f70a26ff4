"""LoRA checkpoint exports (pp_to_hg --lora peft | merge) refusing cleanly: a base changed or moved since training,
no room for a merge, bad adapter layer files, a target that is the base."""

from __future__ import annotations

import json

import pytest
import torch

from models.convert import pp_to_hg
from models.diskspace import fmt_size
from models.hf_io import CheckpointError
from tests.helpers import assert_one_line_error as _assert_one_line_error
from tests.helpers import lora_checkpoint as _lora_checkpoint
from tests.helpers import run, write_hf


def test_lora_exports_refuse_a_base_that_changed_since_training(tmp_path, tokenizer):
    """The base a LoRA checkpoint names is checked by its fingerprint: merging into (or naming in an adapter) a
    model re-converted from other weights under the same path is refused; the same model re-converted is not."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    base = tmp_path / "pp"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(base)) == 0
    save = _lora_checkpoint(tmp_path, base)
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(base), "--overwrite") == 0  # the same model
    pp_to_hg(save, tmp_path / "merged", lora="merge")
    sd = torch.load(base / "layer_01-model_states.pt")
    sd["mlp.up_proj.weight"][0, 0] += 1.0
    torch.save(sd, base / "layer_01-model_states.pt")
    for mode in ("merge", "peft"):
        with pytest.raises(CheckpointError, match=f"^{save / 'global_step5' / 'lora_config.json'}: the base model "
                           f"{base} is not the one these adapters were trained on"):
            pp_to_hg(save, tmp_path / mode, lora=mode)
        assert not (tmp_path / mode).exists()


def test_a_lora_checkpoints_moved_base_is_named_with_base(tmp_path, tokenizer, capsys):
    """A base pipeline dir moved since training: the merge names the way out, the adapter export says its
    base_model_name_or_path is the old path; --base gives the new place, proven by the fingerprint."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    base = tmp_path / "pp"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(base)) == 0
    save = _lora_checkpoint(tmp_path, base)
    pp_to_hg(save, tmp_path / "merged", lora="merge")
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "m2"), "--lora", "merge") == 2
    _assert_one_line_error(capsys, f"base model {base} not found (the LoRA checkpoint holds only adapters; moved? "
                                   "an export with pp_to_hg --base DIR names where it is now (demo.py: run it on the export))")
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "a"), "--lora", "peft") == 0
    assert f"base model {base} not found: the adapter's base_model_name_or_path names it as it was" in \
        capsys.readouterr().err
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "m2"), "--lora", "merge",
               "--base", str(tmp_path / "moved")) == 0
    same = lambda d: {f.name: f.read_bytes() for f in d.iterdir()}  # noqa: E731
    assert same(tmp_path / "m2") == same(tmp_path / "merged")
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "a2"), "--lora", "peft",
               "--base", str(tmp_path / "moved")) == 0
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "m3"), "--lora", "merge",
               "--base", str(tmp_path / "nowhere")) == 2
    _assert_one_line_error(capsys, f"--base {tmp_path / 'nowhere'}: not a pipeline model dir (no config.json)")
    sd = torch.load(tmp_path / "moved" / "layer_01-model_states.pt")
    sd["mlp.up_proj.weight"][0, 0] += 1.0
    torch.save(sd, tmp_path / "moved" / "layer_01-model_states.pt")
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "m3"), "--lora", "merge",
               "--base", str(tmp_path / "moved")) == 2
    _assert_one_line_error(capsys, f"--base {tmp_path / 'moved'}: not the base these adapters were trained on")
    assert run("pp_to_hg", "--input-path", str(tmp_path / "moved"), "--save-path", str(tmp_path / "m3"),
               "--base", str(tmp_path / "moved")) == 2
    _assert_one_line_error(capsys, f"--base {tmp_path / 'moved'}: {tmp_path / 'moved'} is not a LoRA checkpoint")
    assert not (tmp_path / "m3").exists()


def test_lora_merge_checks_room_for_the_merged_model(tmp_path, tokenizer, small_disk):
    """--lora merge writes a full model while the checkpoint holds only adapters: the space check counts the base's
    layer files (QLoRA merges go through the same line), so a disk without room is refused before anything is
    written. The base is an input too: merging onto it is refused; a truncated adapter file is one line."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    base = tmp_path / "pp"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(base)) == 0
    save = _lora_checkpoint(tmp_path, base)
    base_bytes = sum(f.stat().st_size for f in base.glob("layer_*"))
    assert sum(f.stat().st_size for f in (save / "global_step5").glob("layer_*")) * 4 < base_bytes
    disk = small_disk(base_bytes // 2)
    with pytest.raises(CheckpointError) as e:
        pp_to_hg(save, disk / "merged", lora="merge")
    assert f"merged: no space left on device (needed about {fmt_size(base_bytes)}, free " in str(e.value)
    assert list(disk.iterdir()) == []
    with pytest.raises(CheckpointError, match=f"^{base}: is the input {base} itself"):
        pp_to_hg(save, base, lora="merge", overwrite=True)
    f = save / "global_step5" / "layer_02-model_states.pt"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"^{f}: unreadable, the file is corrupt or truncated"):
        pp_to_hg(save, tmp_path / "adapter", lora="peft")


Q_A, Q_B = "self_attn.q_proj.lora_A.default.weight", "self_attn.q_proj.lora_B.default.weight"
BAD_LORA_LAYER = {  # case -> (change of layer 2's state dict, text expected after the file's name)
    "lora_B missing": (lambda sd: sd.pop(Q_B), f"{Q_A} has no {Q_B} (an adapter needs both)"),
    "another rank": (lambda sd: sd.update({Q_A: torch.cat([sd[Q_A]] * 2), Q_B: torch.cat([sd[Q_B]] * 2, 1)}),
                     f"{Q_A} has shape [8, 64], not rank 4 as lora_config.json says ([r, in])"),
    "a key the table lacks": (lambda sd: sd.update({"self_attn.rotary_emb.inv_freq": torch.ones(8)}),
                              "unexpected tensor 'self_attn.rotary_emb.inv_freq' in layer 2 (block): no entry in the "
                              "key table"),
}


@pytest.mark.parametrize("case", sorted(BAD_LORA_LAYER))
def test_bad_lora_layer_files_fail_cleanly(tmp_path, tokenizer, capsys, case):
    """A LoRA checkpoint's layer files are checked before an export writes anything (peft could not load a missing
    lora_B or another rank, and a merge would scale it wrongly): one line naming the file and the key, either mode."""
    change, expected = BAD_LORA_LAYER[case]
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    save = _lora_checkpoint(tmp_path, tmp_path / "pp")
    f = save / "global_step5" / "layer_02-model_states.pt"
    sd = torch.load(f, weights_only=True)
    change(sd)
    torch.save(sd, f)
    for mode in ("peft", "merge"):
        capsys.readouterr()
        assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / mode), "--lora", mode) == 2
        _assert_one_line_error(capsys, f"{f}: {expected}")
        assert not (tmp_path / mode).exists()


def test_an_adapter_export_never_replaces_its_base(tmp_path, tokenizer, capsys):
    """The HF model the base pipeline came from is what the PEFT adapter names as its base: --overwrite there would
    delete the model the adapter needs (and make the adapter name itself as its base)."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
    save = _lora_checkpoint(tmp_path, tmp_path / "pp")
    for mode in ("peft", "merge"):
        capsys.readouterr()
        assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(hf), "--lora", mode, "--overwrite") == 2
        _assert_one_line_error(capsys, f"{hf}: ")
        assert (hf / "config.json").is_file()
