"""The shipped configs parse, and their `parts` fit the models they are written for."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from transformers import BloomConfig, LlamaConfig

from models import get_family, plan_stages
from models.cost import Setup, throughput
from models.lora import parse_lora
from models.pipeline import balance
from training.config import load_config, read_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").iterdir() if p.suffix in (".json", ".yaml"))
MODELS = {  # config name -> the HF config it is written for
    "bloom_7b1_pp8.json": BloomConfig(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880),  # bloomz-7b1-mt
    "llama2_7b_pp8.json": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2_7b_lora_pp4.json": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama2_70b_qlora_pp4.yaml": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                             num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama3_8b_pp8.json": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "quickstart.json": LlamaConfig(**get_family("llama").presets["tiny"], vocab_size=1024),
}


def test_every_config_has_a_model():
    assert sorted(c.name for c in CONFIGS) == sorted(MODELS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_parts_fit(path, tmp_path, monkeypatch):
    raw = read_config_file(path)
    dims = raw["model_topo"]["process_topology"]["dims"]
    monkeypatch.chdir(tmp_path)  # relative paths are the user's; only the shape of the config is checked here
    Path(raw["model_path"]).mkdir(parents=True)
    cfg = load_config(path, world_size=math.prod(dims), require_model=False)
    config = MODELS[path.name]
    family = get_family(config.model_type)
    bounds = plan_stages(family.unit_sizes(config), family.unit_costs(config), dims[0], cfg.model_topo["parts"])
    assert bounds[-1] == len(family.layer_specs(config))
    if cfg.lora is not None:
        parse_lora(cfg.lora, family)


def test_bloom_7b1_layout_is_the_seeds():
    """30 blocks + the two ends = 32 units; the first stage holds the embedding, the last ln_f and the tied head."""
    config = MODELS["bloom_7b1_pp8.json"]
    family = get_family("bloom")
    parts = json.loads((ROOT / "configs" / "bloom_7b1_pp8.json").read_text())["model_topo"]["parts"]
    assert parts == [1, 5, 5, 5, 5, 5, 5, 1]
    assert plan_stages(family.unit_sizes(config), family.unit_costs(config), 8, parts) == [0, 1, 6, 11, 16, 21, 26, 31, 33]


def test_llama3_8b_parts_are_balanced_for_its_vocabulary():
    """The 128k-vocabulary head costs about 2.3 blocks: the cost model's balance gives the last stage 2 blocks + the head
    (the 7B recipe's [5,4,...,4,5] would make it the slowest stage, 14% slower than any of these with checkpointing)."""
    config = MODELS["llama3_8b_pp8.json"]
    family = get_family("llama")
    raw = json.loads((ROOT / "configs" / "llama3_8b_pp8.json").read_text())
    parts, seq = raw["model_topo"]["parts"], raw["max_seq_len"]
    assert parts == balance(family.unit_costs(config, seq), 8) == [5, 4, 4, 4, 4, 5, 5, 3]
    setup = Setup(micro_batch=1, seq_len=seq, pipe=8, grad_accum=raw["gradient_accumulation_steps"], grad_ckpt=True)
    ours, llama2s = (max(throughput(family, config, setup, p).stage_costs) for p in (parts, [5, 4, 4, 4, 4, 4, 4, 5]))
    assert llama2s > 1.1 * ours


def predicted_peaks(name: str, **over) -> list[float]:
    """GiB per stage that models/cost.py predicts for the shipped config `name` (bf16 on a GPU), `over` on its Setup."""
    from models.cost import LoraShape, stage_memory

    config, raw = MODELS[name], read_config_file(ROOT / "configs" / name)
    family = get_family("bloom" if isinstance(config, BloomConfig) else "llama")
    lora = parse_lora(raw["lora"], family, config) if raw.get("lora") else None
    dims = raw["model_topo"]["process_topology"]["dims"]
    setup = Setup(micro_batch=raw["train_micro_batch_size_per_gpu"], seq_len=raw["max_seq_len"], pipe=dims[0],
                  data=dims[1], grad_accum=raw["gradient_accumulation_steps"], grad_ckpt=raw.get("use_grad_ckpt", False),
                  precision="bf16" if (raw.get("bf16") or {}).get("enabled") else "fp32",
                  zero_stage=(raw.get("zero_optimization") or {}).get("stage", 0),
                  quantization=(raw.get("quantization") or {}).get("bnb_4bit_quant_type"),
                  double_quant=bool((raw.get("quantization") or {}).get("bnb_4bit_use_double_quant", False)),
                  lora=LoraShape(lora.r, lora.target_modules, lora.dropout) if lora else None)
    setup = dataclasses.replace(setup, **over)
    parts = raw["model_topo"]["parts"]
    return [round(m.total / 2**30, 1) for m in stage_memory(family, family.prepare_config(config), setup, parts)]


def test_the_70b_qlora_recipes_comment_is_the_models_prediction():
    """The memory per stage written in the recipe's comment is what models/cost.py predicts for it."""
    import re

    path = ROOT / "configs" / "llama2_70b_qlora_pp4.yaml"
    stated = [float(x) for x in re.search(r"#   stage GiB: ([\d., ]+)\n", path.read_text()).group(1).split(",")]
    assert stated == predicted_peaks(path.name)
    low, high = (int(x) for x in re.search(r"LoRA on a bf16 base would need (\d+)-(\d+) GiB", path.read_text()).groups())
    bf16_base = predicted_peaks(path.name, quantization=None)
    assert (low, high) == (round(min(bf16_base)), round(max(bf16_base))), bf16_base


def test_the_readmes_recipe_table_is_the_models_prediction():
    """README "Recipes": each config's predicted peaks per stage ("19.3 (x6)": six stages) are models/cost.py's."""
    import re

    table = (ROOT / "README.md").read_text().split("| config | model, run | stages | parts | predicted peak", 1)[1]
    rows = [line.split("|") for line in table.split("\n\n", 1)[0].splitlines()[2:]]
    assert len(rows) == 5
    for row in rows:
        name, stated = row[1].strip().strip("`"), []
        for value, times in re.findall(r"(\d+\.\d)(?: \(x(\d+)\))?", re.sub(r"\([^x][^)]*\)", "", row[5])):
            stated += [float(value)] * int(times or 1)
        assert stated == predicted_peaks(name), name


def test_eval_data_that_is_training_data_is_a_note(tmp_path):
    """eval_data_path naming training files (the same file, or by a glob or directory) is said once, naming them."""
    (tmp_path / "model").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jsonl", "b.jsonl", "eval.jsonl"):
        (data / name).write_text('{"text": "x"}\n')

    def notes(train, evaluation) -> list[str]:
        raw = {"model_path": str(tmp_path / "model"), "save_path": str(tmp_path / "out"), "data_path": train,
               "eval_data_path": evaluation, "max_seq_len": 8, "train_micro_batch_size_per_gpu": 1}
        (tmp_path / "cfg.json").write_text(json.dumps(raw))
        return [n for n in load_config(tmp_path / "cfg.json", require_model=False).notes if "eval_data_path" in n]

    assert notes([str(data / "a.jsonl"), str(data / "b.jsonl")], str(data / "eval.jsonl")) == []
    said = notes(str(data / "a.jsonl"), str(data / "." / "a.jsonl"))
    assert len(said) == 1 and said[0].startswith(f"'eval_data_path' names 1 of the training files (data_path): "
                                                 f"{data / 'a.jsonl'}; ")
    said = notes(str(data / "*.jsonl"), str(data))  # a glob and a directory of the same files
    assert said[0].startswith(f"'eval_data_path' names 3 of the training files (data_path): {data / 'a.jsonl'}, "
                              f"{data / 'b.jsonl'}, {data / 'eval.jsonl'}; ")
