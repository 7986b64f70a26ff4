"""The shipped configs parse, and their `parts` fit the models they are written for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import LlamaConfig

from models import get_family, plan_stages
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))
MODELS = {  # config name -> the HF config it is written for
    "llama2_7b_pp8.json": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "quickstart.json": LlamaConfig(**get_family("llama").presets["tiny"], vocab_size=1024),
}


def test_every_config_has_a_model():
    assert sorted(c.name for c in CONFIGS) == sorted(MODELS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_parts_fit(path, tmp_path, monkeypatch):
    raw = json.loads(path.read_text())
    dims = raw["model_topo"]["process_topology"]["dims"]
    monkeypatch.chdir(tmp_path)  # relative paths are the user's; only the shape of the config is checked here
    Path(raw["model_path"]).mkdir(parents=True)
    cfg = load_config(path, world_size=math.prod(dims), require_model=False)
    family = get_family("llama")
    config = MODELS[path.name]
    bounds = plan_stages(family.unit_sizes(config), family.unit_costs(config), dims[0], cfg.model_topo["parts"])
    assert bounds[-1] == len(family.layer_specs(config))
