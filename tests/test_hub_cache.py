"""`hg_to_pp --input-path org/name` (and `demo.py --model-path`): a Hub id resolved through a local Hugging Face
cache, offline; a local path wins."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import convert_model
from models.hf_io import hf_source_of
from tests.helpers import llama_config

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "tiny-org/tiny-llama"


def write_hf(path: Path, tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config("gqa_tied", vocab_size=len(tokenizer))).save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    return path


def add_to_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """`src`'s files laid out as huggingface_hub caches a download: content-addressed blobs, a snapshot of
    relative symlinks to them, refs/main naming the snapshot. Returns the snapshot dir."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", snapshot, repo / "refs"):
        d.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def layer_tensors(pp: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted(pp.glob("layer_*.pt")) for k, v in torch.load(f, weights_only=True).items()}


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = layer_tensors(a), layer_tensors(b)
    assert ta and sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_hub_id_converts_from_the_local_cache_offline(tmp_path, tokenizer):
    cache = tmp_path / "hub"
    hf = write_hf(tmp_path / "hf", tokenizer, seed=0)
    snapshot = add_to_hub_cache(cache, REPO_ID, hf)
    assert convert_model.main(["hg_to_pp", "--input-path", str(hf), "--save-path", str(tmp_path / "from_dir")]) == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "convert_model.py"), "hg_to_pp", "--input-path", REPO_ID,
                           "--save-path", "pp"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"{REPO_ID}: the Hugging Face cache's snapshot {snapshot}" in proc.stderr
    assert_same_model(tmp_path / "pp", tmp_path / "from_dir")
    # what a PEFT export of a run on it names as the base: the Hub id, or the local dir converted
    assert hf_source_of(tmp_path / "pp") == REPO_ID and hf_source_of(tmp_path / "from_dir") == str(hf.resolve())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # copied from the blobs, not as links
        assert not (tmp_path / "pp" / name).is_symlink()
        assert (tmp_path / "pp" / name).read_bytes() == (hf / name).read_bytes()


def test_demo_loads_a_hub_id_a_local_path_wins_a_missing_id_is_one_line(tmp_path, tokenizer, monkeypatch, capsys):
    from huggingface_hub import constants

    from models.convert import load_hf_model

    cache = tmp_path / "hub"
    cached = write_hf(tmp_path / "cached", tokenizer, seed=0)
    add_to_hub_cache(cache, REPO_ID, cached)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model, _, _ = load_hf_model(REPO_ID)  # demo.py --model-path org/name
    expected = LlamaForCausalLM.from_pretrained(str(cached)).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    local = write_hf(tmp_path / REPO_ID, tokenizer, seed=1)  # a local dir spelled like the Hub id
    assert convert_model.main(["hg_to_pp", "--input-path", REPO_ID, "--save-path", "pp"]) == 0
    assert convert_model.main(["hg_to_pp", "--input-path", str(local), "--save-path", "pp_local"]) == 0
    assert_same_model(tmp_path / "pp", tmp_path / "pp_local")

    capsys.readouterr()
    assert convert_model.main(["hg_to_pp", "--input-path", "tiny-org/absent", "--save-path", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"convert_model.py hg_to_pp: error: tiny-org/absent: no such directory, and not in the Hugging Face cache "
        f"{cache} (download it with `hf download tiny-org/absent`)"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", ["missing/dir/deeper", "./missing"])
def test_a_path_that_is_no_hub_id_stays_a_path(tmp_path, path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_model.main(["hg_to_pp", "--input-path", path, "--save-path", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"{Path(path)}: no such directory")


def test_the_project_keeps_the_hub_offline_and_bitsandbytes_quiet():
    """Importing the project's models puts huggingface_hub offline unless the user set HF_HUB_OFFLINE: bitsandbytes'
    CPU backend (imported by peft) otherwise looks a kernel up on the Hub at import on AVX512-BF16 CPUs, and warns
    that it could not (a line users read as a failure)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    for first in ("", "import transformers; "):  # huggingface_hub read the variable before the project set it
        code = f"{first}import models, peft, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.split()[-1] == "True", proc.stderr[-2000:]
        assert "kernels-community" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split()[-1] == "False"  # the user's choice stands
