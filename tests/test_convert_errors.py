"""HF <-> pipeline conversion refusing cleanly: one-line errors on bad input (HF dirs, pipeline dirs, LoRA
checkpoints, arguments) and on unsafe output targets, leaving no partial output behind; output modes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.hf_io import LFS_POINTER, CheckpointError
from models.outdir import atomic_output_dir, clean_leftovers, owner_name, pid_namespace
from tests.helpers import assert_one_line_error as _assert_one_line_error
from tests.helpers import edit_weights as _edit_weights
from tests.helpers import files as _files
from tests.helpers import lora_checkpoint as _lora_checkpoint
from tests.helpers import run, write_hf

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- bad input


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


def _truncated_index(hf):
    index = hf / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])


def _index_without_weight_map(hf):
    (hf / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _index_out_of_sync(hf):
    index = hf / "model.safetensors.index.json"
    body = json.loads(index.read_text())
    wm = body["weight_map"]
    wm["model.norm.weight"] = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    index.write_text(json.dumps(body))


def _patch_config(**patch):
    """A damage that sets config.json's keys to values transformers rejects."""
    def damage(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **patch}))
    return damage


BAD_HF = {  # case -> (damage, text expected in the message)
    "unexpected tensor": (_extra_tensor, "unexpected tensor model.layers.0.self_attn.extra.weight"),
    "missing tensor": (_missing_tensor, "missing tensor model.norm.weight"),
    "layer beyond config": (_layer_beyond_config, "model.layers.7.mlp.up_proj.weight"),
    "unknown model_type": (_unknown_model_type, "model_type 'gpt2' is not supported; supported: bloom, llama, mistral, qwen2"),
    "no weights": (_no_weights, "no weights"),
    "truncated shard": (_truncated_shard, "truncated"),
    "no config": (_no_config, "config.json: missing"),
    "truncated index": (_truncated_index, "model.safetensors.index.json: invalid JSON"),
    "config.json not UTF-8": (lambda hf: (hf / "config.json").write_bytes((hf / "config.json").read_bytes()[:-1] +
                                                                          b', "note": "caf\xe9"}'),
                              "config.json: invalid JSON ('utf-8' codec can't decode byte 0xe9"),
    "index without weight_map": (_index_without_weight_map, 'model.safetensors.index.json: no "weight_map" object'),
    "index out of sync with its shards": (_index_out_of_sync, "has no tensor model.norm.weight (named in "),
    # config.json values transformers rejects: huggingface_hub's validation, then its lookups when the layers are built
    "heads do not divide hidden": (_patch_config(num_attention_heads=5), "config.json: Class validation error for "
                                   "validator 'validate_architecture': ValueError: The hidden size (64) is not a multiple"),
    "a string for an int": (_patch_config(num_hidden_layers="four"), "config.json: Validation error for field "
                            "'num_hidden_layers': TypeError: Field 'num_hidden_layers' expected int, got str"),
    "vocab_size null": (_patch_config(vocab_size=None), "config.json: Validation error for field 'vocab_size'"),
    "unknown hidden_act": (_patch_config(hidden_act="nope"),
                           "config.json: hidden_act 'nope' is not one transformers knows"),
    "pad_token_id past the vocabulary": (_patch_config(pad_token_id=300, vocab_size=300),
                                         "config.json: pad_token_id 300 is not below vocab_size 300"),
    "heads not a multiple of key/value heads": (_patch_config(num_attention_heads=4, num_key_value_heads=3),
                                                "config.json: num_attention_heads 4 is not a multiple of "
                                                "num_key_value_heads 3"),
    "unknown rope type": (_patch_config(rope_scaling={"rope_type": "bogus", "factor": 2.0}),
                          "config.json: rope_parameters.rope_type 'bogus' is not one transformers knows"),
    "rope key missing": (_patch_config(rope_scaling={"rope_type": "linear"}),  # (it said: value ... is not one ...)
                         "config.json: Missing required keys in `rope_parameters` for 'rope_type'='linear': {'factor'}"),
    "rope factor a string": (_patch_config(rope_scaling={"rope_type": "dynamic", "factor": "2"}),  # (torch's TypeError)
                             'config.json: rope_parameters.factor must be a number, got "2"'),
    # accepted by transformers' validation; the layers cannot run them (transformers' model fails the same way)
    "partial rotary": (_patch_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5,
                                                   "original_max_position_embeddings": 64}),
                       "config.json: partial_rotary_factor 0.5: the rope gives 4 of the head's 8 rotary pairs"),
    "longrope factors of the wrong length": (_patch_config(rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
        "original_max_position_embeddings": 64}), "config.json: rope_parameters.short_factor has 3 entries, one per rotary pair of the head: 8 (head_dim 16 / 2)"),
}


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


def _wrong_last_shape(pp):
    f = sorted(pp.glob("layer_*-model_states.pt"))[-1]
    torch.save({"weight": torch.zeros(63, 64)}, f)


def _truncated_layer_file(pp):
    f = pp / "layer_02-model_states.pt"
    f.write_bytes(f.read_bytes()[:-200])


def _lfs_pointer_layer_file(pp):  # a clone made without git-lfs
    (pp / "layer_02-model_states.pt").write_bytes(LFS_POINTER + b"v1\noid sha256:ab\nsize 124774\n")


def _bad_lora_config(pp):
    (pp / "lora_config.json").write_text('{"r": 4, ')


BAD_PP = {
    "missing layer file": (_drop_layer, "layer_02-model_states.pt: missing (block 1)"),
    "wrong layer keys": (_wrong_layer_keys, "layer_03-model_states.pt: missing"),
    "truncated layer file": (_truncated_layer_file, "layer_02-model_states.pt: unreadable, the file is corrupt or "
                                                    "truncated ("),  # (its size, "not a torch.save archive" since)
    "malformed lora_config.json": (_bad_lora_config, "lora_config.json: invalid JSON"),
    "a Git LFS pointer layer file": (_lfs_pointer_layer_file, "layer_02-model_states.pt: a Git LFS pointer, not the "
                                                              "weights (the repository was cloned without git-lfs)"),
    "a wrong shape in the last layer file": (_wrong_last_shape, "layer_04-model_states.pt: tensor weight has shape "
                                                                "[63, 64] but config.json expects [64]"),
    "config.json transformers rejects": (_patch_config(hidden_act="nope"), "config.json: hidden_act 'nope' is not one"),
}


@pytest.mark.parametrize("case", sorted(BAD_PP))
def test_bad_pipeline_input_fails_cleanly(tmp_path, tokenizer, capsys, case):
    damage, expected = BAD_PP[case]
    pp = _pp(tmp_path, tokenizer)
    damage(pp)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_out")) == 2
    err = _assert_one_line_error(capsys, expected)
    assert not any(line.startswith("[1/") for line in err)  # every layer file is checked before one is converted
    assert not (tmp_path / "hf_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]



def test_a_layer_file_in_torchs_legacy_format_converts(tmp_path, tokenizer):
    """load_torch_file reads torch's pre-1.6 (non-zip) format: the check of the layer files before any is converted
    called such a file "corrupt or truncated"."""
    pp = _pp(tmp_path, tokenizer)
    f = pp / "layer_02-model_states.pt"
    torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_out")) == 0


def test_a_checkpoint_removed_while_it_is_exported_is_named_gone(tmp_path, tokenizer, capsys, monkeypatch):
    """A running run's keep_last rotation may delete the checkpoint an export is reading: one line saying so, not
    "corrupt or truncated", and no output left."""
    import models.convert

    pp, log = _pp(tmp_path, tokenizer), models.convert.log

    def rotate(line: str) -> None:  # the rotation lands once the first layer file is written
        log(line)
        if line.startswith("[1/"):
            shutil.rmtree(pp)

    monkeypatch.setattr(models.convert, "log", rotate)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_out")) == 2
    _assert_one_line_error(capsys, "layer_01-model_states.pt: no longer there: removed while it was being read "
                                   "(a running run's keep_last rotation deletes older checkpoints")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied"]


def test_a_checkpoint_saved_again_while_it_is_exported_is_not_mixed(tmp_path, tokenizer, capsys, monkeypatch):
    """A run resumed from an earlier step saves the same tag again, swapping the directory in place: the layers read
    before the swap and after it would be of two checkpoints (an export of a model that never existed, exit 0). The
    second pass reads the files the first checked, or says the checkpoint was replaced."""
    import models.convert

    pp, log = _pp(tmp_path, tokenizer), models.convert.log
    again = shutil.copytree(pp, tmp_path / ".tmp-again")  # the re-save, written beside it (new files)

    def touch(line: str) -> None:  # a chmod and a hard link (a backup's) change a file's ctime, not the file
        log(line)
        if line.startswith("[1/"):
            os.chmod(pp / "layer_02-model_states.pt", 0o600)
            os.link(pp / "layer_03-model_states.pt", tmp_path / "backup.pt")

    monkeypatch.setattr(models.convert, "log", touch)
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_ok")) == 0

    def resave(line: str) -> None:  # the swap lands once the first layer file is converted
        log(line)
        if line.startswith("[1/"):
            os.replace(pp, tmp_path / ".old-pp")
            os.replace(again, pp)

    monkeypatch.setattr(models.convert, "log", resave)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "hf_out")) == 2
    _assert_one_line_error(capsys, "layer_01-model_states.pt: replaced while it was being read (a run resumed from an "
                                   "earlier step saved this checkpoint again): run this again to read the new one whole")
    assert not (tmp_path / "hf_out").exists()


def test_a_conversion_of_another_container_with_this_host_name_is_left_alone(tmp_path):
    """Containers that share a host name and a disk number their processes apart: a temporary output whose PID is
    not running here, or is this process's own, but that another PID namespace wrote, may be a live conversion
    there. It was removed (or, of the same PID, written over), and that conversion failed in torch.save with a
    traceback. One of this namespace whose process is gone is removed, as one of no recorded namespace is."""
    assert pid_namespace(), "no /proc/self/ns/pid here"
    host, dead = socket.gethostname(), 2**22 + 1  # above pid_max: no process
    theirs = [tmp_path / f".pp.tmp-{host}-{pid}.1" for pid in (dead, os.getpid())]  # namespace inode 1: not ours
    gone = [tmp_path / f".pp.tmp-{host}-{dead}.{pid_namespace()}", tmp_path / f".pp.tmp-{host}-{dead}"]
    for d in theirs + gone:
        d.mkdir()
    said: list[str] = []
    with atomic_output_dir(tmp_path / "pp", overwrite=False, say=said.append) as tmp:
        assert tmp.name == f".pp.tmp-{owner_name()}" and tmp not in theirs
        (tmp / "config.json").write_text("{}")
    assert all(d.is_dir() for d in theirs) and not any(d.exists() for d in gone)
    assert sorted(said) == sorted([f"note: {d} may belong to a conversion still running ({d.name.rpartition('.tmp-')[2]}): "
                                   "left alone" for d in theirs] + [f"removed {d}: left by an interrupted conversion"
                                                                    for d in gone])


def test_an_input_file_this_user_cannot_read_is_one_line_naming_it(tmp_path, tokenizer, capsys, monkeypatch):
    """A model directory another user downloaded with a private umask (shards 0600): a weights shard, a tokenizer
    file or a layer file that cannot be opened is one line naming it and the permission, not a traceback, nor
    "corrupt"; nothing is left behind. (open() refuses them here: the suite may run as root, whom modes do not stop.)"""
    import builtins

    pp = _pp(tmp_path, tokenizer)
    hf = tmp_path / "hf_gqa_tied"
    real_open, denied = builtins.open, []

    def guarded(file, *args, **kwargs):
        if denied and Path(os.fspath(file)).name == denied[0]:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    shard = sorted(hf.glob("model-*.safetensors"))[0].name
    for cmd, src, name in [("hg_to_pp", hf, shard), ("hg_to_pp", hf, "tokenizer.json"),
                           ("pp_to_hg", pp, "layer_01-model_states.pt")]:
        denied[:] = [name]
        capsys.readouterr()
        assert run(cmd, "--input-path", str(src), "--save-path", str(tmp_path / "out")) == 2, name
        _assert_one_line_error(capsys, f"{src / name}: cannot be read (Permission denied); check its permissions")
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_side_files_are_copied_is_named_as_such(tmp_path, tokenizer, capsys, monkeypatch):
    """sendfile's ENOSPC names the source file (and the target as filename2): the output's full disk, not an input
    "that cannot be read"."""
    import errno

    import models.hf_io as hf_io

    hf = write_hf(tmp_path, tokenizer, "gqa_tied")

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(hf_io.shutil, "copyfile", full)
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "out")) == 2
    _assert_one_line_error(capsys, f"{tmp_path / 'out'}: no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied"]


def test_bad_arguments_fail_cleanly(tmp_path, tokenizer, tokenizer_dir, sp_tokenizer_dir, capsys):
    pp = _pp(tmp_path, tokenizer)
    bad_config = tmp_path / "bad_config.json"
    bad_config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                      "num_attention_heads": 5}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_vocab = tmp_path / "no_vocab"  # a SentencePiece tokenizer_config.json alone loads: its special tokens only
    no_vocab.mkdir()
    shutil.copy(sp_tokenizer_dir / "tokenizer_config.json", no_vocab)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"a": "caf\xe9"}')  # (a UnicodeDecodeError traceback)
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest").write_bytes(b"global_step2\xe9")  # (a UnicodeDecodeError traceback)
    cases = [
        (("init", "--family", "llama", "--config-json", str(latin1), "--tokenizer", str(tokenizer_dir), "--save-path",
          str(tmp_path / "x")), f"{latin1}: cannot read config ('utf-8' codec can't decode byte 0xe9"),
        (("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "x")),
         f"{save / 'global_step2'}\ufffd: no layer_00-model_states.pt (not a pipeline or checkpoint directory)"),
        (("hg_to_pp", "--input-path", str(tmp_path / "nope"), "--save-path", str(tmp_path / "x")), "no such directory"),
        (("pp_to_hg", "--input-path", str(tmp_path), "--save-path", str(tmp_path / "x")), "not a pipeline or checkpoint"),
        (("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "x"), "--max-shard-size", "lots"),
         "--max-shard-size 'lots'"),
        (("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "x"), "--max-shard-size", "0GB"),
         "--max-shard-size '0GB': must be at least 1 byte"),
        (("pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "x"), "--max-shard-size", "1.5"),
         "--max-shard-size '1.5': not a size such as 5GB, 500MB or 2000000 (a whole number of bytes, or a unit)"),
        (("init", "--family", "llama", "--preset", "huge", "--tokenizer", str(tokenizer_dir), "--save-path",
          str(tmp_path / "x")), "--preset 'huge': unknown"),
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tmp_path / "nope"), "--save-path",
          str(tmp_path / "x")), f"{tmp_path / 'nope'}: no such directory"),  # not a Hub connection error
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(bad_config), "--save-path",
          str(tmp_path / "x")), f"{bad_config}: a file, not a directory"),
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(empty),
          "--save-path", str(tmp_path / "x")), "cannot load a tokenizer"),
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(no_vocab), "--save-path",
          str(tmp_path / "x")), f"{no_vocab}: the tokenizer encodes text to no tokens: it has no vocabulary"),
        (("init", "--family", "llama", "--config-json", str(bad_config), "--tokenizer", str(tokenizer_dir), "--save-path",
          str(tmp_path / "x")), f"{bad_config}: Class validation error for validator 'validate_architecture'"),
        (("hg_to_pp", "--input-path", str(tmp_path / "hf_gqa_tied"), "--save-path", str(a_file / "x")),
         f"{a_file / 'x'}: {a_file} is a file, not a directory"),
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


def test_a_cast_to_fp16_never_makes_inf(tmp_path, tokenizer, capsys):
    """A value beyond float16's range (65504) would become inf: hg_to_pp --dtype fp16 is one line naming the file, the
    tensor and its largest |value| (suggesting bf16), and leaves nothing behind; so is a LoRA merge into an fp16 base
    whose merged weight overflows. A value that rounds to 65504 is fine."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    key = "model.layers.1.mlp.up_proj.weight"

    def big(value):
        def edit(sd):
            if key in sd:
                sd[key][0, 0] = value
        return edit
    _edit_weights(hf, big(65510.0))  # rounds to 65504
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "ok"), "--dtype", "fp16") == 0
    _edit_weights(hf, big(-1e6))
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp"), "--dtype", "fp16") == 2
    shard = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][key]
    _assert_one_line_error(capsys, f"{hf / shard}: tensor {key} has values up to 1e+06 in magnitude, beyond float16's "
                                   "range (65504): they would be inf; convert with --dtype bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "ok"]  # no temp dir left

    base = tmp_path / "ok"  # an fp16 base whose merged q_proj overflows
    save = _lora_checkpoint(tmp_path, base)
    f = save / "global_step5" / "layer_02-model_states.pt"
    torch.save({k: v * 1e4 for k, v in torch.load(f, weights_only=True).items()}, f)
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(tmp_path / "merged"), "--lora", "merge") == 2
    _assert_one_line_error(capsys, "tensor model.layers.1.self_attn.q_proj.weight: the merged weight has values beyond "
                                   "float16's range (65504)")
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- targets


def test_overwrite_replaces_only_when_asked(tmp_path, tokenizer, capsys):
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    target = tmp_path / "pp"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target)) == 2
    assert (target / "keep.txt").read_text() == "user data"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(target), "--overwrite") == 0
    assert not (target / "keep.txt").exists() and (target / "layer_00-model_states.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "pp"]  # no temp or backup dirs left
    run_dir = tmp_path / "run"  # a training save_path, given by mistake: --overwrite would delete its checkpoints
    run_dir.mkdir()
    for holds in ([".run.lock"], ["metrics.jsonl"], ["global_step4"], ["latest", "global_step4"]):
        for name in holds:  # a live run before its first checkpoint holds its lock and metrics only
            (run_dir / name).mkdir() if name.startswith("global_step") else (run_dir / name).write_text("x")
        assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(run_dir), "--overwrite") == 2
        _assert_one_line_error(capsys, f"{run_dir}: is a training run's save_path (it holds {', '.join(holds)}): "
                                       "--overwrite would delete its checkpoints and metrics; write the output "
                                       "somewhere else")
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(holds)
        for p in run_dir.iterdir():
            p.rmdir() if p.is_dir() else p.unlink()


def test_a_target_that_is_or_holds_the_input_is_refused_before_any_work(tmp_path, tokenizer, tokenizer_dir, capsys):
    """With --overwrite the target is replaced at the end: the input itself, a directory holding it, or a file of it
    (also reached through `..` or a symbolic link) is one line up front. A new entry inside an input dir is fine."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    save = tmp_path / "run"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(save / "global_step10")) == 0
    (save / "latest").write_text("global_step10")
    (tmp_path / "alias").symlink_to(hf)
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in tokenizer_dir.iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    before = _files(hf, save, tok)
    step = save / "global_step10"
    cases = [
        (("hg_to_pp", "--input-path", str(hf), "--save-path", str(hf)), f"{hf}: is the input {hf} itself"),
        (("hg_to_pp", "--input-path", str(tmp_path / "alias"), "--save-path", str(hf)), f"is the input {hf} itself"),
        (("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path)), f"{tmp_path}: holds the input {hf}"),
        (("hg_to_pp", "--input-path", str(hf), "--save-path", str(hf / "config.json")), f"a file of the input {hf}"),
        (("pp_to_hg", "--input-path", str(step), "--save-path", str(save)), f"{save}: holds the input {step}"),
        (("pp_to_hg", "--input-path", str(save), "--save-path", str(step)), f"{step}: is the input {step} itself"),
        (("pp_to_hg", "--input-path", str(save), "--save-path", str(step / "..")), f"is the input {save} itself"),
        (("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tok), "--save-path", str(tok)),
         f"is the input {tok} itself"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert run(*argv, "--overwrite") == 2, argv
        _assert_one_line_error(capsys, expected)
    assert _files(hf, save, tok) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "hf_gqa_tied", "run", "tok"]  # no temp dirs
    for _ in range(2):  # an export into the run dir, then replacing it: the checkpoint it reads is untouched
        assert run("pp_to_hg", "--input-path", str(save), "--save-path", str(save / "hf"), "--overwrite") == 0
    assert {k: v for k, v in _files(hf, save, tok).items() if not k.startswith(f"{save / 'hf'}/")} == before
    assert (save / "hf" / "model.safetensors").is_file()


def test_an_empty_target_in_a_directory_that_cannot_be_written_names_a_way_out(tmp_path, tokenizer, capsys):
    """The output is built beside its target and renamed into place: an admin-made empty directory in a parent the
    user cannot write (made immutable here, which binds root too) is refused in one line that says to give a
    directory inside it, and that works."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    parent = tmp_path / "shared"
    (parent / "me").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(parent / "me")) == 2
        last = _assert_one_line_error(capsys, f"{parent / 'me'}: cannot write in {parent} (")[-1]
        assert last.endswith(f"; the output is built beside me and renamed into place, so give a directory inside "
                             f"it, e.g. {parent / 'me' / 'model'}")
        assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(parent / "me" / "model")) == 0
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_a_target_created_during_a_conversion_is_left_alone(tmp_path):
    """Without --overwrite the finished output takes the target's place only if it is still absent or empty: one
    that appeared meanwhile is kept, and so is the output (beside it, named in the error, not removed by the next
    conversion's clean-up of interrupted runs)."""
    target = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(target, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_text("new")
            target.mkdir()
            (target / "users_file.txt").write_text("precious")
    kept = tmp_path / f"out.new-{owner_name()}"
    assert str(e.value) == (f"{target}: was created while the conversion ran and is not empty: left as it is; the "
                            f"finished output is in {kept} (move it, or convert again with --overwrite)")
    assert (target / "users_file.txt").read_text() == "precious" and len(list(target.iterdir())) == 1
    said: list[str] = []
    clean_leftovers(target, said.append)
    assert (kept / "model.safetensors").read_text() == "new" and said == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", kept.name]
    with atomic_output_dir(tmp_path / "empty", overwrite=False) as tmp:  # an empty dir, as an empty target is, is fine
        (tmp / "x").write_text("1")
        (tmp_path / "empty").mkdir()
    assert (tmp_path / "empty" / "x").read_text() == "1"


def test_a_symlinked_target_is_replaced_as_a_link(tmp_path, tokenizer, capsys):
    """A target that is a symbolic link is refused without --overwrite; with it the link itself is replaced and what
    it points to is never touched; a link an interrupted --overwrite moved aside is removed as a link or put back."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    v1, current = tmp_path / "v1", tmp_path / "current"
    v1.mkdir()
    (v1 / "old.txt").write_text("v1")
    current.symlink_to(v1)
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(current)) == 2
    _assert_one_line_error(capsys, f"{current}: is a symbolic link (to {v1}); pass --overwrite to replace the link itself")
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(current), "--overwrite") == 0
    assert not current.is_symlink() and (current / "layer_00-model_states.pt").is_file()
    assert [p.name for p in v1.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "hf_gqa_tied", "v1"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".current.old-{socket.gethostname()}-{dead.pid}"
    aside.symlink_to(v1)
    said: list[str] = []
    clean_leftovers(current, said.append)
    assert not os.path.lexists(aside) and [p.name for p in v1.iterdir()] == ["old.txt"] and len(said) == 1
    current.rename(tmp_path / "new")
    aside.symlink_to(v1)  # killed between its two renames: a reader is told where the output is
    capsys.readouterr()
    assert run("pp_to_hg", "--input-path", str(current), "--save-path", str(tmp_path / "hf_out")) == 2
    _assert_one_line_error(capsys, f"{current}: no such directory ({aside} holds it as it was before an interrupted "
                                   "--overwrite: the next conversion into current puts it back, or rename it yourself)")
    clean_leftovers(current, said.append)
    assert current.is_symlink() and os.readlink(current) == str(v1) and not os.path.lexists(aside)
    # a target's name is not a pattern: converting into "exp[12]" leaves exp1's moved-aside output alone
    aside = tmp_path / f".exp1.old-{socket.gethostname()}-{dead.pid}"
    aside.mkdir()
    said.clear()
    clean_leftovers(tmp_path / "exp[12]", said.append)
    assert aside.is_dir() and said == []


# ---------------------------------------------------------------------------------------------- output targets, modes


def test_a_mount_point_target_is_refused_before_any_work(tmp_path, tokenizer, tokenizer_dir, capsys, monkeypatch):
    """An (empty) mount point as the target, as `docker -v host:/out` gives: the output is built beside it and renamed
    into place, which a mount point refuses (EBUSY) only after the whole conversion, and --overwrite would delete the
    finished output. Every command refuses it up front, with or without --overwrite, naming a directory inside it."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    pp = tmp_path / "pp"
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(pp)) == 0
    save = _lora_checkpoint(tmp_path, pp)
    out = tmp_path / "out"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.abspath(p) == str(out) or real_ismount(p))
    expected = f"{out}: is a mount point (the output is renamed into place): give a directory inside it, e.g. " \
               f"{out / 'model'}"
    for argv in [("hg_to_pp", "--input-path", str(hf)), ("pp_to_hg", "--input-path", str(pp)),
                 ("pp_to_hg", "--input-path", str(save), "--lora", "peft"),
                 ("pp_to_hg", "--input-path", str(save), "--lora", "merge"),
                 ("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tokenizer_dir))]:
        for overwrite in ((), ("--overwrite",)):
            capsys.readouterr()
            assert run(*argv, "--save-path", str(out), *overwrite) == 2, argv
            err = _assert_one_line_error(capsys, expected)
            assert not any(line.startswith("[1/") for line in err), argv  # before any work
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        with atomic_output_dir(out, overwrite=True):
            pass
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_gqa_tied", "lora_run", "out", "pp"]  # no temp dirs
    assert run("pp_to_hg", "--input-path", str(pp), "--save-path", str(out / "model")) == 0  # inside it: fine


def test_a_real_mount_point_target_is_refused(tmp_path, tokenizer, capsys, small_disk):
    """The same on a real mount (a tmpfs; skipped where mount is not allowed): --overwrite leaves it as it was."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    disk = small_disk(4 * 2**20)
    capsys.readouterr()
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(disk), "--overwrite") == 2
    _assert_one_line_error(capsys, f"{disk}: is a mount point")
    assert list(disk.iterdir()) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith((".", "disk0."))]
    assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(disk / "model")) == 0


def test_outputs_get_the_modes_the_umask_gives(tmp_path, tokenizer, tokenizer_dir):
    """Side files are copied by content, not with their source's mode: a private (0600) tokenizer_config.json does not
    make an export unreadable to others, and a read-only (0444) generation_config.json does not stop pp_to_hg (as a
    user who is not root) rewriting it for a chat run."""
    hf = write_hf(tmp_path, tokenizer, "gqa_tied")
    (hf / "additional_chat_templates").mkdir(mode=0o700)
    (hf / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS")
    modes = {"tokenizer_config.json": 0o600, "generation_config.json": 0o444, "config.json": 0o444,
             "tokenizer.json": 0o600, "additional_chat_templates/tool_use.jinja": 0o400}
    for name, mode in modes.items():
        (hf / name).chmod(mode)
    umask = os.umask(0o027)
    try:
        assert run("hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "pp")) == 0
        assert run("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")) == 0
        assert run("init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(hf), "--save-path",
                   str(tmp_path / "init")) == 0
    finally:
        os.umask(umask)
    for out in ("pp", "back", "init"):
        for name in modes:
            if out != "init" or name.startswith(("tokenizer", "additional")):
                assert (tmp_path / out / name).stat().st_mode & 0o777 == 0o640, (out, name)
        assert (tmp_path / out / "additional_chat_templates").stat().st_mode & 0o777 == 0o750, out
