"""gdGPT's configs (the seed project's, JSON and YAML) run unchanged but for paths and sizes: its keys mapped,
accepted with a warning or refused in one line; no_wd_kws and dataloader_drop_last honoured; conver_has_api
records rendered with gdGPT's semantics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from data.encode import IGNORE_INDEX, encode_one, encode_prompt, load_dataset
from data.records import prompt_problems
from data.templates import render
from tests.helpers import run_deepspeed, sequential_from_hf, tiny_config
from training.batches import BatchPlan, step_micro_batches
from training.config import ConfigError, load_config
from training.optim import hf_param_name, no_decay_patterns, param_groups
from training.schedule import parse_lr_schedule

# gdGPT's configs/ds_config_pp.yml with paths and sizes edited (2 stages, 4 samples a step, fp16 off: CPU)
GDGPT_YAML = """\
train_micro_batch_size_per_gpu: 1
train_batch_size: 4
dataloader_drop_last: false
steps_per_print: 20
optimizer:
  type: AdamW
  params:
    lr: 1e-3
    betas: [0.9, 0.999]
    weight_decay: 4.0e-5
    eps: 1.0e-8
    torch_adam: true  # not gdGPT's: torch's AdamW on CPU (DeepSpeed's CPU FusedAdam compiles for a minute)
  no_wd_kws: ['bias', '[a-zA-Z]*norm'] # remove this or empty list if no need of this
scheduler:
  type: WarmupCosineLR
  params:
    warmup_num_steps: 1
    warmup_min_ratio: 0.02
    cos_min_ratio: 0.2

bf16:
  enabled: false
fp16:
  enabled: false
  auto_cast: false
  fused_optimizer: false
  loss_scale: 0
  initial_scale_power: 16
  loss_scale_window: 1000
  hysteresis: 2
  min_loss_scale: 1

zero_allow_untested_optimizer: true

aux_max_z_loss: # remove this if you don't need this aux loss
    weight: 2.0e-4

model_topo:
  process_topology:
    axes: [pipe, data]
    dims: [2, 1]
  parts: [2, 3]

from_scratch: false
model_path: {model}
save_path: {save}

n_epoches: 1
max_seq_len: 512
data_path: {data}

use_grad_ckpt: false

use_flash_attn: false
"""

# gdGPT's configs/ds_config_pp.json, the same edits
GDGPT_JSON = {
    "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4, "dataloader_drop_last": False, "steps_per_print": 20,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 4e-5, "eps": 1e-8}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"warmup_num_steps": 1, "warmup_min_ratio": 0.02, "cos_min_ratio": 0.2}},
    "bf16": {"enabled": False},
    "fp16": {"enabled": False, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "zero_optimization": {},
    "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": [2, 3]},
    "from_scratch": False, "n_epoches": 1, "max_seq_len": 512, "use_grad_ckpt": False,
}

API_DESC = ("search: Search the book for a phrase.\nParameters: {\"query\": \"Required. string.\"}\n"
            "Output: a JSON object.\n")
API_RECORD = {"type": "conver_has_api", "api_desc": API_DESC, "rounds": [
    ["ask", "Hello"], ["ans", "Hi, what can I do for you?"],
    ["ask", "Where is the word pipeline?"],
    ["ans-api", {"actions": [
        {"inner_thought": "I search for it.", "api_name": "search", "api_param": "{\"query\": \"pipeline\"}",
         "api_res": "Status Code: 200. Response: {\"page\": 3}"},
        {"inner_thought": "Once more.", "api_name": "search", "api_param": {"query": "stage", "limit": 2},
         "api_res": {"page": [4, 5]}}],
        "ans": "On page 3."}],
    ["ask", "Thanks."], ["ans", "You are welcome."]]}


def write_data(path: Path, n: int = 10) -> Path:
    """n records: gdGPT's conversation and conver_has_api kinds."""
    recs = [API_RECORD if i % 2 else {"type": "conversation", "rounds": [["ask", f"Say {i}."], ["ans", f"{i} said."]]}
            for i in range(n)]
    path.write_text(json.dumps(recs, indent=1))
    return path


@pytest.fixture()
def configs(tmp_path, ops_model) -> tuple[Path, Path]:
    data = write_data(tmp_path / "dataset.json")
    paths = {"model": str(ops_model / "pp"), "save": str(tmp_path / "checkpoints"), "data": str(data)}
    yml = tmp_path / "ds_config_pp.yml"
    yml.write_text(GDGPT_YAML.format(**paths))
    js = tmp_path / "ds_config_pp.json"
    js.write_text(json.dumps({**GDGPT_JSON, "model_path": paths["model"], "save_path": paths["save"],
                              "data_path": paths["data"]}, indent=4))
    return yml, js


def test_gdgpt_yaml_and_json_configs_load(configs):
    yml, js = configs
    a, b = load_config(yml, world_size=2), load_config(js, world_size=2)
    assert a.ds_config["gradient_accumulation_steps"] == b.ds_config["gradient_accumulation_steps"] == 4  # 4 / (1 x 1)
    assert a.ds_config["optimizer"]["params"]["lr"] == 1e-3  # `1e-3` is a number in YAML too
    assert "fused_optimizer" not in a.ds_config["fp16"]
    assert a.ds_config["fp16"] == b.ds_config["fp16"] and a.ds_config["scheduler"] == b.ds_config["scheduler"]
    assert a.attn_implementation == "sdpa" and b.attn_implementation == "auto"  # use_flash_attn false; absent
    assert (a.n_epoches, a.max_seq_len, a.model_topo) == (b.n_epoches, b.max_seq_len, b.model_topo)
    assert len(a.notes) == 2 and not b.notes
    assert "'aux_max_z_loss' (gdGPT's z-loss on MoE router logits) has no effect here" in a.notes[0]
    assert re.search(r"'fp16.fused_optimizer' is not a key of DeepSpeed [\d.]+: dropped", a.notes[1])


CASES = {  # name -> (YAML text replaced -> by, or a JSON override; expected one-line error)
    "yaml syntax": (("  type: AdamW", "  type: [AdamW"), ":7: invalid YAML (expected ',' or ']'"),
    "flash and attn": (("use_flash_attn: false", "use_flash_attn: true\nattn_implementation: sdpa"),
                       "'use_flash_attn' (gdGPT's) and 'attn_implementation' both choose the attention; keep one"),
    "flash not bool": (("use_flash_attn: false", "use_flash_attn: 1"), "'use_flash_attn' must be true or false, got 1"),
    "batch not a multiple": (("train_batch_size: 4", "train_batch_size: 5\ngradient_accumulation_steps: 2"),
                             "train_batch_size 5 != train_micro_batch_size_per_gpu 1 x gradient_accumulation_steps 2 "
                             "x data-parallel size 1"),
    "unknown fp16 key": (("  hysteresis: 2", "  hysteresis: 2\n  fused_lamb: true"),
                         "'fp16.fused_lamb': not a key DeepSpeed accepts (DeepSpeed "),
    "bad zero value": (("zero_allow_untested_optimizer: true", "zero_optimization:\n  stage: x"),
                       "'zero_optimization.stage': Input should be 0, 1, 2"),
    "no_wd_kws regex": (("'[a-zA-Z]*norm'", "'[a-z'"), "optimizer.no_wd_kws: '[a-z' is not a regular expression"),
    "no_wd_kws and decay_norm_and_bias": (("use_grad_ckpt: false", "decay_norm_and_bias: true"),
                                          "'decay_norm_and_bias' and optimizer.no_wd_kws both choose"),
    "a key twice": (("use_grad_ckpt: false", "use_grad_ckpt: false\nuse_grad_ckpt: true"),
                    ":53: invalid YAML (key 'use_grad_ckpt' appears twice in one mapping: only one of its values would"),
    "a number as a key": (("use_grad_ckpt: false", "use_grad_ckpt: false\n1: x"),
                          "the key 1 is not a string (YAML reads 1, on, yes, no and ~ as a number"),  # a traceback
    "on as a key": (("  type: AdamW", "  type: AdamW\n  on: true"), "the key true in 'optimizer' is not a string"),
    "drop_last type": (("dataloader_drop_last: false", "dataloader_drop_last: 0"),
                       "'dataloader_drop_last' must be true or false, got 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gdgpt_config_errors_are_one_line(configs, case):
    yml = configs[0]
    (old, new), expected = CASES[case]
    assert old in yml.read_text()
    yml.write_text(yml.read_text().replace(old, new))
    with pytest.raises(ConfigError) as e:
        load_config(yml, world_size=2)
    assert str(e.value).startswith(str(yml)) and expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_whole_counts_written_as_floats_are_counts(configs):
    """YAML reads 1e4 as 10000.0: the scheduler's step counts took it, the project's counts said "must be int"."""
    yml = configs[0]
    yml.write_text(yml.read_text() + "max_steps: 1e4\nsave_interval: 100.0\n")
    cfg = load_config(yml, world_size=2)
    assert (cfg.max_steps, cfg.save_interval) == (10000, 100)
    assert type(cfg.max_steps) is type(cfg.save_interval) is int
    warmup = parse_lr_schedule({"warmup_steps": 10.0}).warmup_steps  # (YAML's 1e1 in the project's own schedule)
    assert warmup == 10 and type(warmup) is int
    yml.write_text(yml.read_text().replace("save_interval: 100.0", "save_interval: 2.5"))
    with pytest.raises(ConfigError, match="'save_interval' must be int or null, got 2.5$"):
        load_config(yml, world_size=2)


def test_a_yaml_config_named_json_gets_a_hint(configs):
    yml, js = configs
    js.write_text(yml.read_text())
    with pytest.raises(ConfigError, match=r"invalid JSON .*\(a YAML config\? name it \.yml or \.yaml\)$"):
        load_config(js)


def test_a_key_twice_in_a_json_config_is_refused(configs):
    """json keeps the last value of a repeated key without a word: a pasted-over `lr` would train with either."""
    js = configs[1]
    js.write_text(js.read_text().replace('"lr": 0.001', '"lr": 0.001, "lr": 1'))
    with pytest.raises(ConfigError) as e:
        load_config(js)
    assert str(e.value) == f"{js}: key 'lr' appears twice in one object: only one of its values would be kept"


def test_yaml_merge_keys_are_no_key_written_twice():
    """An override of a key a merge (<<:) brings is YAML's way to share sections; `1` and `true` are one dict key."""
    from training.compat import parse_yaml

    text = "base: &b {lr: 1, wd: 2}\nx:\n  <<: *b\n  lr: 3\n"
    assert parse_yaml(Path("c.yml"), text) == {"base": {"lr": 1, "wd": 2}, "x": {"lr": 3, "wd": 2}}
    nested = "base: &base {lr: 1}\ntop:\n  <<: &mid\n    <<: *base\n    lr: 2\n  x: 3\nagain: *mid\n"  # merged, aliased
    assert parse_yaml(Path("c.yml"), nested) == {"base": {"lr": 1}, "top": {"lr": 2, "x": 3}, "again": {"lr": 2}}
    with pytest.raises(ValueError, match=r"^c.yml:2: invalid YAML \(key True appears twice in one mapping"):
        parse_yaml(Path("c.yml"), "1: a\ntrue: b\n")


def test_no_wd_kws_groups_parameters_by_name():
    """gdGPT's patterns, matched in HF names, put exactly the biases and norm weights (the final norm too) in the
    no-decay group; [] decays everything."""
    from models import get_family

    hf = _tiny_llama()
    seq = sequential_from_hf(hf, "llama")
    name_of = hf_param_name(get_family("llama"), hf.config)
    names = {name_of(n): p for n, p in seq.named_parameters()}
    assert set(names) == {n for n, _ in hf.named_parameters()}  # untied: every HF parameter, by its HF name
    by_shape = param_groups(seq, 0.1)
    by_name = param_groups(seq, 0.1, no_decay=no_decay_patterns(["bias", "[a-zA-Z]*norm"]), name_of=name_of)
    ids = lambda groups: [sorted(id(p) for p in g["params"]) for g in groups]  # noqa: E731
    assert ids(by_name) == ids(by_shape) and by_name[1]["weight_decay"] == 0.0
    assert {n for n, p in names.items() if any(p is q for q in by_name[1]["params"])} == \
        {n for n in names if n.endswith("bias") or "norm" in n} > {"model.norm.weight"}
    everything = param_groups(seq, 0.1, no_decay=no_decay_patterns([]))
    assert len(everything) == 1 and len(everything[0]["params"]) == len(names)
    with pytest.raises(ValueError, match="must be a list of regular expressions"):
        no_decay_patterns("bias")


def test_no_wd_kws_match_a_tied_embedding_and_lora_adapters_by_their_hf_names(ds):
    """DeepSpeed names a tied embedding "tied_modules.embed.weight" and peft's adapters sit under their module: both
    are matched by the HF names a user writes patterns for (an "embed_tokens" pattern exempts a tied embedding too)."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from models import PipelineModel, causal_lm_loss, get_family, plan_stages

    fam = get_family("llama")
    config = fam.prepare_config(tiny_config("llama", "gqa_tied"))
    model = PipelineModel(fam.layer_specs(config), lambda n: plan_stages(fam.unit_sizes(config), fam.unit_costs(config),
                          n, None), ProcessTopology(axes=["pipe", "data"], dims=[1, 1]), loss_fn=causal_lm_loss)
    name_of = hf_param_name(fam, config)
    hf = fam.hf_model_class(config)
    assert {name_of(n) for n, _ in model.named_parameters()} == {n for n, _ in hf.named_parameters()}
    assert "tied_modules.embed.weight" in dict(model.named_parameters())
    groups = param_groups(model, 0.1, no_decay=no_decay_patterns(["embed_tokens"]), name_of=name_of)
    assert [p.shape for p in groups[1]["params"]] == [hf.model.embed_tokens.weight.shape]
    assert name_of("1.self_attn.q_proj.lora_A.default.weight") == "model.layers.0.self_attn.q_proj.lora_A.default.weight"


def _tiny_llama():
    from models import get_family

    torch.manual_seed(0)
    return get_family("llama").hf_model_class(tiny_config("llama", "mha_bias_untied"))


def test_drop_last_false_trains_the_last_partial_batch(tokenizer, tmp_path):
    """10 samples, global batch 4: 3 steps, the last with 2 samples and 2 empty rows that carry no label; every
    sample once per epoch; the loss divisor counts only the real samples' tokens."""
    ds = load_dataset(write_data(tmp_path / "d.json"), tokenizer, 512, use_cache=False)
    lengths = ds.offsets[1:] - ds.offsets[:-1]
    plan = BatchPlan(len(ds), 1, 2, 2, 7, lengths, drop_last=False)
    assert BatchPlan(len(ds), 1, 2, 2, 7, lengths).steps_per_epoch == 2 and plan.steps_per_epoch == 3
    seen = np.concatenate([plan.global_indices(0, s, real=True) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(10))
    assert plan.global_indices(0, 2).tolist()[2:] == [-1, -1]
    tokens = (ds.labels != IGNORE_INDEX).astype(np.int64)  # any per-row count works for the divisor check
    per_row = np.add.reduceat(tokens, ds.offsets[:-1])
    for rank in (0, 1):
        batches = step_micro_batches(ds, plan, per_row, 0, 2, rank, plan.micro_shapes(0, 2, rank), 3)
        assert all(int(counts[0]) == per_row[plan.global_indices(0, 2, real=True)].sum() for _, (_, counts) in batches)
        # a sample per micro-batch and an empty row in the rest, dealt in turn: each rank has a sample and an empty
        # row (which runs first: a rank's smallest micro-batch does)
        assert [bool((labels == IGNORE_INDEX).all()) for _, (labels, _) in batches] == [True, False]


def test_conver_has_api_renders_with_gdgpts_semantics(tokenizer):
    """The api doc and the tool's outputs are not trained; each thought + call and the final answer are, with EOS."""
    r = render(API_RECORD, "</s>")
    trained = [r.text[a:b] for a, b in r.spans]
    assert trained == [" Hi, what can I do for you?</s>",
                       " I search for it.\n#### api call\n```python\nsearch(query='pipeline')\n```</s>",
                       " Once more.\n#### api call\n```python\nsearch(query='stage', limit=2)\n```</s>",
                       " On page 3.</s>", " You are welcome.</s>"]
    assert r.text.startswith("Answer the following questions as best as you can. You have access to the following "
                             "tool(s):\n" + API_DESC + "\n\n### Human: Hello\n### Assistant:")
    assert "### Assistant: Once more." in r.text and "\n#### api output\n{\n  \"page\": [\n    4,\n    5\n  ]\n}\n" in r.text
    ids, labels, _ = encode_one(tokenizer, API_RECORD, 1024)
    for prompt_rec in api_prompts(API_RECORD):  # every answer is prompted with its training token prefix
        assert not prompt_problems(prompt_rec)
        prompt = encode_prompt(tokenizer, prompt_rec)
        assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX
        assert labels[len(prompt)] == ids[len(prompt)]


def api_prompts(rec: dict) -> list[dict]:
    """One inference record per answer: the rounds before it; inside an "ans-api" turn, the actions before it."""
    out = []
    for i, (role, turn) in enumerate(rec["rounds"]):
        if role == "ans":
            out.append({**rec, "rounds": rec["rounds"][:i]})
        elif role == "ans-api":
            out += [{**rec, "rounds": [*rec["rounds"][:i], ["ans-api", {"actions": turn["actions"][:j]}]]}
                    for j in range(len(turn["actions"]) + 1)]
    return out


@pytest.mark.parametrize("bad, expected", [
    ({"api_desc": "x", "rounds": [["ask", "q"], ["ans-api", {"actions": []}]]}, "missing field 'ans'"),
    ({"api_desc": "x", "rounds": [["ask", "q"], ["ans-api", {"actions": [{"inner_thought": "", "api_name": "f",
                                                                          "api_param": "[1]", "api_res": ""}],
                                                             "ans": "a"}]]},
     "rounds[1].actions[0]: api_param must be an object or a string holding a JSON object, got list"),
    ({"rounds": [["ask", "q"], ["ans-api", {"ans": "a", "actions": []}]]}, "unknown role 'ans-api'"),
    ({"api_desc": "x", "rounds": [["ask", "q"], ["ans-api", {"actions": [{"inner_thought": "", "api_name": "f",
                                                                          "api_param": '{"k": 1, "k": 2}',
                                                                          "api_res": ""}], "ans": "a"}]]},
     "rounds[1].actions[0]: api_param: key 'k' appears twice in one object"),  # json keeps the last without a word
])
def test_bad_api_records(tmp_path, tokenizer, bad, expected):
    from data.records import DataError, load_records

    (tmp_path / "d.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "d.jsonl")
    assert any(expected in p for p in e.value.problems), e.value.problems


@pytest.mark.distributed
def test_gdgpt_yaml_config_trains_through_the_launcher(configs, tmp_path, ops_model):
    """gdGPT's YAML config, 2 stages, 3 steps (10 samples, 4 a step, the last partial one kept), a checkpoint; one
    warning line each for aux_max_z_loss and fp16.fused_optimizer, no_wd_kws groups. (Its JSON twin loads to the same
    settings, test_gdgpt_yaml_and_json_configs_load, so one launcher run covers both.)"""
    out = run_deepspeed("train_ds.py", ["--config", str(configs[0])], num_procs=2).stdout
    assert out.count("warning: ") == 2 and out.count("'aux_max_z_loss'") == 1, out[-3000:]
    groups = re.search(r"AdamW \(lr 0.001\) on ([\d,]+) decay \(wd 4e-05\) \+ ([\d,]+) no_decay \(wd 0\)", out)
    hf = AutoModelForCausalLM.from_pretrained(ops_model / "hf")  # tied: its embedding counted once
    matrices = sum(p.numel() for p in hf.parameters() if p.ndim >= 2)
    assert [int(g.replace(",", "")) for g in groups.groups()] == [matrices, hf.num_parameters() - matrices]  # both stages
    metrics = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and [m["sequences"] for m in metrics] == [4, 4, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step3"
