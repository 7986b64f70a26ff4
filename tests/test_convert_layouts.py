"""hg_to_pp on the checkpoint layouts found in the wild (which weight files transformers loads, a tied model saved
with its head only, pickled objects, quantised or pipeline dirs) and the output dir's edge cases (`.`, a failed
rename, the space a --dtype cast needs). One tiny model, shared; most checks read headers only."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models.outdir as outdir
from models import get_family
from models.convert import hg_to_pp, pp_to_hg
from models.diskspace import fmt_size
from models.hf_io import CheckpointError, HFCheckpoint
from models.outdir import atomic_output_dir
from tests.helpers import tiny_config

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny tied Llama as an HF dir (one model.safetensors) and its state dict (no lm_head.weight)."""
    torch.manual_seed(0)
    model = get_family("llama").hf_model_class(tiny_config("llama", "gqa_tied"))
    hf = tmp_path_factory.mktemp("layouts") / "hf"
    model.save_pretrained(hf)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != HEAD}
    return hf, sd


def _dir(tmp_path: Path, hf: Path, name: str = "src", **config) -> Path:
    """A new dir holding `hf`'s config.json (with `config` merged in), no weights."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), **config}))
    return d


def _shards(d: Path, sd: dict[str, torch.Tensor], fmt: str, index: str | None) -> None:
    """`sd` in two torch.save / safetensors shards named by `fmt` (with {i}), and their index named `index`."""
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = fmt.format(i=i)
        (torch.save if name.endswith(".bin") else lambda t, p: save_file(t, str(p)))({k: sd[k] for k in part}, d / name)
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_weight_files_are_chosen_in_transformers_order(tmp_path, tied):
    """transformers loads model.safetensors, else its index, else pytorch_model.bin, else its index: a stale other
    format beside it is never what is converted (an index only when its shards are all there)."""
    hf, sd = tied
    other = {k: torch.randn_like(v) for k, v in sd.items()}
    d = _dir(tmp_path, hf)
    shutil.copy(hf / "model.safetensors", d)
    _shards(d, other, "pytorch_model-0000{i}-of-00002.bin", "pytorch_model.bin.index.json")
    _shards(d, other, "model-0000{i}-of-00002.safetensors", "model.safetensors.index.json")
    torch.save(other, d / "pytorch_model.bin")
    ckpt = HFCheckpoint(d)
    assert set(ckpt.keys()) == set(sd) and ckpt.file_of(EMBED) == d / "model.safetensors"
    assert torch.equal(ckpt.get(EMBED), sd[EMBED])
    (d / "model.safetensors").unlink()
    assert HFCheckpoint(d).file_of(EMBED).name.startswith("model-0000")
    (d / "model-00001-of-00002.safetensors").unlink()  # the index's shards are not all there
    assert HFCheckpoint(d).file_of(EMBED) == d / "pytorch_model.bin"


def test_a_tied_checkpoint_holding_only_the_head_converts(tmp_path, tied):
    """safetensors' save_model keeps the alphabetically first name of shared tensors: lm_head.weight, not the
    embedding. transformers loads that as the tied embedding; so does hg_to_pp."""
    hf, sd = tied
    d = _dir(tmp_path, hf)
    save_file({HEAD if k == EMBED else k: v for k, v in sd.items()}, str(d / "model.safetensors"))
    hg_to_pp(d, tmp_path / "pp")
    assert torch.equal(torch.load(tmp_path / "pp" / "layer_00-model_states.pt", weights_only=True)["weight"], sd[EMBED])
    assert not (tmp_path / "pp" / "layer_05-model_states.pt").exists()


def test_a_base_models_checkpoint_converts_as_transformers_loads_it(tmp_path, tied):
    """LlamaModel.save_pretrained (a base model: keys without `model.`), with a torch.save'd model-level RoPE buffer:
    transformers' LlamaForCausalLM loads both, adding the prefix and skipping the buffer; so does hg_to_pp."""
    hf, sd = tied
    d = _dir(tmp_path, hf)
    base = {k.removeprefix("model."): v for k, v in sd.items()}
    assert all(not k.startswith("model.") for k in base)
    torch.save({**base, "rotary_emb.inv_freq": torch.ones(8)}, d / "pytorch_model.bin")
    hg_to_pp(d, tmp_path / "pp")
    pp_to_hg(tmp_path / "pp", tmp_path / "back")
    back = HFCheckpoint(tmp_path / "back")
    assert sorted(back.keys()) == sorted(sd) and all(torch.equal(back.get(k), v) for k, v in sd.items())


def _pickled_object(d, sd):
    torch.save({**sd, "args": argparse.Namespace(lr=1.0)}, d / "pytorch_model.bin")


def _quantised(d, sd):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({**sd, "model.layers.0.mlp.up_proj.weight.absmax": torch.ones(4)}, str(d / "model.safetensors"))


def _pipeline_dir(d, sd):
    torch.save({"weight": sd[EMBED]}, d / "layer_00-model_states.pt")


def _checkpoint_tag_dir(d, sd):  # SAVE_PATH/global_stepN: layer files, no config.json (it is in SAVE_PATH)
    (d / "config.json").unlink()
    _pipeline_dir(d, sd)


def _config_a_list(d, sd):
    (d / "config.json").write_text("[1]")


def _bin_shards_without_index(d, sd):
    _shards(d, sd, "pytorch_model-0000{i}-of-00002.bin", None)


def _lfs_pointers(d, sd):  # a clone made without git-lfs
    (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2471645608\n")


BAD_LAYOUTS = {  # case -> (layout, the message after the path named)
    "a Git LFS pointer": (_lfs_pointers, "model.safetensors: a Git LFS pointer, not the weights (the repository was "
                                         "cloned without git-lfs): run `git lfs pull` in it"),
    "a .bin with a pickled object": (_pickled_object, "pytorch_model.bin: holds non-tensor objects (argparse.Namespace), "
                                                      "which torch.load(weights_only=True) refuses to unpickle"),
    "a quantised checkpoint": (_quantised, "config.json: a quantised checkpoint (quantization_config, quant_method "
                                           "bitsandbytes); convert an unquantised (fp16/bf16/fp32) checkpoint"),
    "a pipeline dir": (_pipeline_dir, ": a pipeline dir (layer files), not an HF model: use pp_to_hg"),
    "a checkpoint's tag dir": (_checkpoint_tag_dir, ": a pipeline dir (layer files), not an HF model: use pp_to_hg"),
    "a config.json not an object": (_config_a_list, "/config.json: not a JSON object"),  # "model_type None ..."
    ".bin shards without their index": (_bin_shards_without_index, "pytorch_model.bin.index.json: missing (it names "
                                                                    "the tensors of each shard, pytorch_model-00001-of"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_a_layout_that_cannot_convert_is_named(tmp_path, tied, case):
    layout, expected = BAD_LAYOUTS[case]
    hf, sd = tied
    d = _dir(tmp_path, hf)
    layout(d, sd)
    with pytest.raises(CheckpointError) as e:
        hg_to_pp(d, tmp_path / "pp")
    assert str(e.value).startswith(str(d)) and expected in str(e.value), str(e.value)
    assert not (tmp_path / "pp").exists()


def test_a_file_given_for_a_directory_is_named_so(tmp_path):
    (tmp_path / "f").write_text("")
    for convert in (hg_to_pp, pp_to_hg):
        with pytest.raises(CheckpointError, match=f"^{tmp_path / 'f'}: a file, not a directory$"):
            convert(tmp_path / "f", tmp_path / "out")


def test_the_space_check_counts_a_dtype_cast(tmp_path, tied, monkeypatch):
    """--dtype fp32 of an fp16 checkpoint writes twice its size: a disk with room for 1.5 times is refused up front."""
    hf, sd = tied
    d = _dir(tmp_path, hf)
    save_file({k: v.half() for k, v in sd.items()}, str(d / "model.safetensors"))
    half = sum(v.numel() * 2 for v in sd.values())
    monkeypatch.setattr(outdir, "free_bytes", lambda path: half * 3 // 2)
    with pytest.raises(CheckpointError, match=f"pp: no space left on device \\(needed about {fmt_size(2 * half)}"):
        hg_to_pp(d, tmp_path / "pp", dtype="fp32")
    assert not (tmp_path / "pp").exists()


def test_the_current_directory_is_never_a_target(tmp_path, tied, monkeypatch):
    """`--save-path .` (or `..`, or the cwd's absolute path) would rename the user's shell's directory away: one
    line up front, with or without --overwrite; a relative new dir is fine."""
    hf, _ = tied
    cwd = tmp_path / "a" / "work"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for target in (".", "..", str(cwd)):
        for overwrite in (False, True):
            with pytest.raises(CheckpointError, match="is the current directory \\(or contains it\\): give the new "
                                                      "directory's path, e.g. ./hf"):
                with atomic_output_dir(Path(target), overwrite):
                    pass
    with pytest.raises(CheckpointError, match="is the current directory"):
        hg_to_pp(hf, ".", overwrite=True)
    with atomic_output_dir(Path("out"), False) as tmp:
        (tmp / "x").write_text("1")
    assert [p.name for p in cwd.iterdir()] == ["out"] and (cwd / "out" / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and os.listdir(tmp_path / "a") == ["work"]


def test_a_failed_final_rename_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch):
    """With --overwrite the old output is moved aside before the new one is renamed in: if that rename fails, the old
    one is put back, the temporary dir removed, and the error is one CheckpointError line."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(16, "Device or resource busy")
        real(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    with pytest.raises(CheckpointError, match=f"^{target}: cannot move the finished output into place"):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old.txt"]
