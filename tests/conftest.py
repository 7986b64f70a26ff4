"""Shared fixtures: a tiny local tokenizer and tiny model configs (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.helpers import own_extensions_dir, pythonpath  # noqa: E402

own_extensions_dir()  # DeepSpeed's CPU op: built once for this environment, not for whichever ran last

# every process a test starts loads mlflow on first use (tests/pyhooks); the launch helpers that set their own
# PYTHONPATH add it themselves
os.environ["PYTHONPATH"] = pythonpath(*filter(None, [os.environ.get("PYTHONPATH")]))

from data.templates import INSTRUCT_NO_INPUT, INSTRUCT_WITH_INPUT  # noqa: E402
from data.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402

CORPUS = [
    "Pipeline parallelism splits the layers of a model across several devices.",
    "Each stage owns a contiguous slice of layers and passes activations forward.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "流水线并行把模型的层切分到多个设备上。",
]


def build_tokenizer(path: Path) -> Path:
    """The suite's byte-level BPE tokenizer (vocabulary 512) saved at `path` (also bench/gpu_checks.py's)."""
    words = "pipeline stage layer token batch loss gradient weight model data train answer question reply"
    train_tiny_tokenizer(CORPUS + [INSTRUCT_WITH_INPUT, INSTRUCT_NO_INPUT, words] * 3, path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-2-style SentencePiece tokenizer (tokenizer.model beside the HF files)."""
    path = tmp_path_factory.mktemp("sp_tokenizer")
    train_tiny_tokenizer(CORPUS * 3, path, vocab_size=600, kind="sentencepiece")
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    """`convert_model.py init --preset tiny` with the suite's tokenizer: a Llama pipeline dir for `write_config`."""
    import convert_model

    path = tmp_path_factory.mktemp("base") / "pp"
    assert convert_model.main(["init", "--family", "llama", "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
                               "--save-path", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def ops_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny tied Llama as HF dir (hf/) and pipeline dir (pp/), with train.jsonl (64) and eval.jsonl (10)."""
    import torch

    from models import get_family
    from models.convert import hg_to_pp
    from tests.helpers import tiny_config, write_word_records

    root = tmp_path_factory.mktemp("ops")
    torch.manual_seed(0)
    hf = get_family("llama").hf_model_class(tiny_config("llama", "gqa_tied", vocab_size=len(tokenizer)))
    hf.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    hg_to_pp(root / "hf", root / "pp")
    write_word_records(root / "train.jsonl", 64, seed=1)
    write_word_records(root / "eval.jsonl", 10, seed=2)
    return root


@pytest.fixture(scope="session")
def ops_uninterrupted(tmp_path_factory, ops_model) -> Path:
    """The save_path of a full 2-stage run of 8 steps with save_interval 3: checkpoints at steps 3, 6 and 8."""
    from tests.helpers import ops_config, run_deepspeed

    tmp = tmp_path_factory.mktemp("full")
    run_deepspeed("train_ds.py", ["--config", str(ops_config(tmp, ops_model, save_interval=3))])
    return tmp / "out"


@pytest.fixture(scope="session")
def _ds_env():
    """One single-process gloo group for the session (as `deepspeed --num_gpus 1` would set it up; DeepSpeed keeps
    its groups, so it is made once), torn down at the end; its environment variables, for `ds`."""
    import deepspeed
    import torch

    from tests.helpers import free_port
    from training.distributed import shutdown_distributed

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = dict(os.environ)
    os.environ.update(env)
    owner = not torch.distributed.is_initialized()
    deepspeed.init_distributed(dist_backend="gloo")
    os.environ.clear()
    os.environ.update(saved)
    yield env
    if owner:
        shutdown_distributed()


@pytest.fixture
def ds(_ds_env, monkeypatch):
    """deepspeed, with the session's single-process group and, during the test, its environment variables."""
    import deepspeed

    for k, v in _ds_env.items():
        monkeypatch.setenv(k, v)
    return deepspeed


@pytest.fixture
def small_disk(tmp_path):
    """make(size) -> a directory on a tmpfs of that size, for full-disk tests (mount needs root: skipped elsewhere)."""
    mounted = []

    def make(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        size = max(4096, size // 4096 * 4096)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
