"""Shared fixtures: a tiny local tokenizer and tiny model configs (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from data.templates import INSTRUCT_NO_INPUT, INSTRUCT_WITH_INPUT  # noqa: E402
from data.tiny_tokenizer import train_tiny_tokenizer  # noqa: E402

CORPUS = [
    "Pipeline parallelism splits the layers of a model across several devices.",
    "Each stage owns a contiguous slice of layers and passes activations forward.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "流水线并行把模型的层切分到多个设备上。",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    words = "pipeline stage layer token batch loss gradient weight model data train answer question reply"
    train_tiny_tokenizer(CORPUS + [INSTRUCT_WITH_INPUT, INSTRUCT_NO_INPUT, words] * 3, path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
