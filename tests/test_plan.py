"""The fit planner (training/plan.py) on the published 7B configs, and the memory model (models/cost.py) against the
measured per-stage peak of real 2-stage CPU runs (full, LoRA, activation checkpointing)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import get_family
from models.cost import LoraShape, Setup, fused_rms_norm, stage_memory, unit_params
from training.plan import main as plan_main
from training.plan import plan

ROOT = Path(__file__).resolve().parents[1]

GIB40 = 40e9
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
BLOOM_7B1 = dict(model_type="bloom", hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880, tie_word_embeddings=True)


def _model(raw: dict):
    family = get_family(raw["model_type"])
    return family, family.prepare_config(family.config_class(**{k: v for k, v in raw.items() if k != "model_type"}))


def test_json_is_all_of_stdout_on_a_machine_deepspeed_warns_about(tmp_path):
    """Without DS_ACCELERATOR DeepSpeed's import warns (on a machine without a GPU) through a logger on stdout."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-m", "training.plan", "--model-config", str(tmp_path / "config.json"),
                           "--gpus", "8", "--gpu-memory", "40GB", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["pipe"] * json.loads(proc.stdout)["data"] == 8


@pytest.mark.parametrize("raw", [LLAMA2_7B, BLOOM_7B1], ids=["llama2-7b", "bloom-7b1"])
def test_published_configs_fit_8x40gb_and_lora_qlora_need_less(raw, tmp_path, capsys):
    family, config = _model(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert plan_main(["--model-config", str(tmp_path / "config.json"), "--gpus", "8", "--gpu-memory", "40GB",
                      "--max-seq-len", "1024", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["pipe"] * best["data"] == 8 and len(best["parts"]) == best["pipe"]
    assert sum(best["parts"]) == len(family.unit_sizes(config)) and min(best["parts"]) >= 1
    assert len(best["stage_memory_bytes"]) == best["pipe"] and max(best["stage_memory_bytes"]) <= GIB40
    for key in ("micro_batch", "gradient_accumulation_steps", "use_grad_ckpt"):
        assert key in best and best["config"]["model_topo"]["parts"] == best["parts"]
    # on the full fine-tuning plan's own topology, LoRA and QLoRA need less on every stage, QLoRA least
    setup = Setup(best["micro_batch"], 1024, best["pipe"], best["data"], best["gradient_accumulation_steps"],
                  grad_ckpt=best["use_grad_ckpt"])
    lora = LoraShape(16, family.lora_targets)
    full, lo, q = (stage_memory(family, config, s, best["parts"]) for s in
                   (setup, Setup(**{**setup.__dict__, "lora": lora}), Setup(**{**setup.__dict__, "lora": lora, "quantization": "nf4"})))
    n = len(family.unit_sizes(config))
    for f, a, b in zip(full, lo, q, strict=True):  # a stage without blocks (Bloom's head alone) has nothing to quantize
        assert f.total > a.total > b.total or (f.total > a.total == b.total and f.units[0] == f.units[1] == n - 1)
    assert sum(m.weights for m in q) < 0.6 * sum(m.weights for m in lo)  # 4-bit block weights (embeddings stay bf16)


def test_the_readmes_planner_example_is_what_it_prints(tmp_path, capsys):
    """README "Planning": the Llama-2-7B example is what the planner prints for that command, up to the config keys."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Llama-2-7B on 8 x 40 GB at 1024 tokens:\n\n```\n", 1)[1].split("```", 1)[0]
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert plan_main(["--model-config", str(tmp_path / "config.json"), "--gpus", "8", "--gpu-memory", "40GB",
                      "--max-seq-len", "1024"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert block.splitlines() == printed[:printed.index("config keys to paste:")], (block, printed)


def test_what_cannot_fit_says_what_would():
    family, config = _model(LLAMA2_7B)
    ans = plan(family, config, gpus=1, memory=24e9, seq_len=1024)
    assert not ans["fits"] and ans["best"] is None
    would = " ".join(ans["would_fit"])
    assert "LoRA" in would and "QLoRA" in would and "GPUs of this memory" in would
    assert plan(family, config, gpus=1, memory=24e9, seq_len=1024, quantization="nf4")["fits"]


def test_the_global_batch_planned_is_said_where_it_is_not_the_one_asked(tmp_path, capsys):
    """micro x accumulation x replicas can only round the asked batch up: 2 rows asked on 8 replicas planned 8, and
    neither the text nor --json said so (the pasted config then trained at another batch). And a search that finds
    nothing says what it tried, on stderr while it runs (16 s for a 70B on 8 x 24 GB)."""
    (tmp_path / "c.json").write_text(json.dumps(LLAMA2_7B))
    args = ["--model-config", str(tmp_path / "c.json"), "--gpus", "8", "--gpu-memory", "80GB", "--max-seq-len", "1024"]
    assert plan_main([*args, "--global-batch-tokens", "2048"]) == 0
    best = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("best: "))
    assert "global batch 8 rows, 8,192 tokens: 2 asked, rounded up to a multiple of micro-batch x replicas" in best
    assert plan_main([*args, "--global-batch-tokens", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["global_batch"], out["global_batch_tokens"]) == (8, 8192)
    assert out["micro_batch"] * out["gradient_accumulation_steps"] * out["data"] == 8
    assert plan_main([*args, "--global-batch-tokens", str(64 * 1024)]) == 0  # the asked one: said as it is
    assert "(global batch 64 rows, 65,536 tokens)" in capsys.readouterr().out
    tiny = {**LLAMA2_7B, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 256}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    assert plan_main(["--model-config", str(tmp_path / "tiny.json"), "--gpus", "2", "--gpu-memory", "1KB"]) == 1
    said = capsys.readouterr()
    assert said.out.rstrip().endswith("would fit: nothing (LoRA, QLoRA and up to 4096 GPUs tried): more memory per GPU is needed")
    assert said.err.strip() == ("python -m training.plan: does not fit on 2 GPUs: trying LoRA, QLoRA and up to 4096 GPUs "
                                "(some seconds for a large model)")


def test_the_config_keys_to_paste_enable_the_planned_precision():
    """The snippet trains in the precision the memory was planned for (fp16's lacked its section: fp32, twice the
    planned weights and gradients)."""
    from training.plan import snippet

    family, config = _model(LLAMA2_7B)
    keys = {p: snippet(plan(family, config, gpus=8, memory=80e9, seq_len=1024, precision=p)["best"])
            for p in ("bf16", "fp16", "fp32")}
    for p in ("bf16", "fp16", "fp32"):  # merged into a recipe that enables the other, the plan's precision holds
        assert keys[p]["bf16"] == {"enabled": p == "bf16"} and keys[p]["fp16"] == {"enabled": p == "fp16"}


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(LLAMA2_7B))
    for argv, text in ((["--gpu-memory", "lots"], "--gpu-memory 'lots': not a size"),
                       (["--gpu-memory", "40G"], "'40G': not a size such as 40GB or 80GiB (GB or GiB?)"),
                       (["--gpu-memory", "40I"], "'40I': not a size"), (["--gpu-memory", "40GI"], "(GB or GiB?)"),
                       (["--gpu-memory", "40"], "'40': not a size such as 40GB or 80GiB (a unit is needed)"),
                       (["--gpu-memory", "0GB"], "--gpu-memory '0GB': must be at least 1 byte"),
                       (["--max-seq-len", "8192"], "--max-seq-len 8192 is above what the model's positions cover "
                                                   "(4096, max_position_embeddings)"),
                       (["--double-quant"], "--double-quant needs --quantization nf4"),
                       (["--gpus", "6", "--nodes", "4"], "--gpus 6 is not a multiple of --nodes 4")):
        args = ["--model-config", str(tmp_path / "c.json"), "--gpus", "8", "--gpu-memory", "40GB", *argv]
        assert plan_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err
    for shipped in ("llama2_7b_pp8.json", "llama2_70b_qlora_pp4.yaml"):  # a training config given for the model's
        assert plan_main(["--model-config", str(ROOT / "configs" / shipped), "--gpus", "8", "--gpu-memory", "40GB"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{shipped}: a training config, not a model's config.json: give --model-path with its "
                            "model_path (or --model-config that model's config.json)") and "\n" not in err, err


@pytest.mark.parametrize("text, bare, size", [
    ("40GB", False, 40 * 10**9), ("80gib", False, 80 * 2**30), (" 5 mb ", True, 5 * 10**6), ("1TB", True, 10**12),
    ("2TiB", True, 2 * 2**40), ("0.5GB", True, 5 * 10**8), ("2000000", True, 2000000), ("123456789012345678901", True,
                                                                                    123456789012345678901)])
def test_one_size_parser_for_every_option(text, bare, size):
    """--gpu-memory (the planner) and --max-shard-size (pp_to_hg) had a parser each: 1TB / 2TiB were refused as a shard
    size, and 0.5B taken as a GPU's memory. One pipeft.parse_size now reads both, only a bare number of bytes
    differing (no unit is refused for a GPU's memory, where 80 could mean GB or GiB)."""
    from pipeft import parse_size

    assert parse_size(text, "--x", "40GB", bare=bare) == size
    assert parse_size(text, "--x", "40GB", bare=True) == size
    if bare and text.strip().isdigit():
        with pytest.raises(ValueError, match=rf"--x '{text}': not a size such as 40GB \(a unit is needed\)"):
            parse_size(text, "--x", "40GB")


@pytest.mark.parametrize("raw, text", [
    ({"model_type": "llama", "hidden_size": "x"}, "hidden_size"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}, "not a multiple of the number of attention"),
    ([1, 2], "not a JSON object"),
    ({**LLAMA2_7B, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({**LLAMA2_7B, "hidden_size": 0}, "hidden_size must be >= 1, got 0"),  # was torch's "0.0 cannot be raised to ..."
    ({"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 0}, "num_attention_heads must be >= 1, got 0"),
    ({**LLAMA2_7B, "num_hidden_layers": -1}, "num_hidden_layers must be >= 0, got -1"),  # was planned
    ({**LLAMA2_7B, "max_position_embeddings": -1}, "max_position_embeddings must be >= 1, got -1"),  # planned -1 tokens
    ({**LLAMA2_7B, "model_type": "mistral", "sliding_window": 0}, "sliding_window must be >= 1, got 0"),  # "covers 0"
    ({**LLAMA2_7B, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": -5},
     "sliding_window must be >= 1, got -5"),  # training then said "use max_seq_len <= -5"
], ids=["type", "heads", "list", "kv-heads", "no-width", "bloom-no-heads", "negative-layers", "negative-positions",
        "no-window", "negative-window"])
@pytest.mark.parametrize("option", ["--model-config", "--model-path"])
def test_a_config_transformers_rejects_is_one_line_naming_the_file(raw, text, option, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    if text == "hidden_size":  # once: a byte that is not UTF-8 (the message named no file)
        (tmp_path / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
        text = "not valid UTF-8 (byte offset 19)"
    where = tmp_path / "config.json" if option == "--model-config" else tmp_path
    assert plan_main([option, str(where), "--gpus", "1", "--gpu-memory", "40GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m training.plan: error: {tmp_path / 'config.json'}: "), err
    assert text in err and "\n" not in err, err


def test_the_plan_keeps_to_what_training_takes(tmp_path, capsys):
    """The planner planned what training's config check then refused: a max_seq_len above the model's sliding window
    (Mistral-7B-v0.1's 4096 under its 32768 positions; the default 2048 above a 512 window), rows of 1 token, and a
    LoRA rank above the hidden size."""
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256}
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "mistral", **tiny, "max_position_embeddings": 32768,
                                                 "sliding_window": 512}))
    args = ["--model-config", str(tmp_path / "c.json"), "--gpus", "2", "--gpu-memory", "40GB"]
    assert plan_main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["max_seq_len"] == 512
    for extra, said in ((["--max-seq-len", "1024"], "--max-seq-len 1024 is above the model's sliding_window 512, which "
                                                    "the pipeline's attention does not implement (training refuses it)"),
                        (["--max-seq-len", "1"], "--max-seq-len must be >= 2 (training's minimum), got 1"),
                        (["--lora", "--lora-r", "128"], "--lora-r: lora.r 128 is above the model's hidden_size 64: an "
                                                        "adapter of a higher rank than its layer's width adds nothing")):
        assert plan_main([*args, *extra]) == 2
        assert capsys.readouterr().err == f"python -m training.plan: error: {said}\n"
    assert plan_main([*args, "--lora", "--lora-r", "64", "--max-seq-len", "512", "--json"]) == 0  # the bounds: taken
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama", **tiny, "hidden_size": 8}))
    assert plan_main([*args, "--lora"]) == 2  # the rank the user did not give is named as the default
    assert capsys.readouterr().err == ("python -m training.plan: error: the default LoRA rank 16 is above the model's "
                                       "hidden_size 8: give --lora-r at most that\n")
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama", **tiny, "max_position_embeddings": 1}))
    assert plan_main(args) == 2
    assert capsys.readouterr().err == ("python -m training.plan: error: --max-seq-len: the model covers 1 token(s) "
                                       "(max_position_embeddings); training needs rows of at least 2\n")


def test_lora_options_need_lora_and_a_quantized_plan_says_lora(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(LLAMA2_7B))
    args = ["--model-config", str(tmp_path / "c.json"), "--gpus", "8", "--gpu-memory", "40GB", "--max-seq-len", "1024"]
    assert plan_main([*args, "--lora-r", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-r needs --lora (or --quantization nf4)" in err and "\n" not in err
    for extra in (["--lora", "--lora-r", "8"], ["--quantization", "nf4", "--lora-r", "8"]):
        assert plan_main([*args, *extra, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"]["lora"]["r"] == 8
    assert plan_main([*args, "--quantization", "nf4"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("1024 tokens, bf16, LoRA, NF4")
    (tmp_path / "c.json").write_text(json.dumps({**LLAMA2_7B, "num_hidden_layers": 0}))  # no block to adapt
    assert plan_main([*args, "--lora"]) == 2
    assert capsys.readouterr().err.strip() == ("python -m training.plan: error: --lora / --quantization: the model has "
                                               "no decoder blocks "
                                               "(num_hidden_layers 0): LoRA adapts the blocks' linear layers, so "
                                               "nothing would train; train it in full (without them)")


LORA_QV = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LORA_ALL = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


@pytest.mark.parametrize("family,name,lora", [
    ("llama", "gqa_tied", None), ("llama", "head_dim_4", None), ("llama", "head_dim_48", {**LORA_ALL, "dropout": 0.0}),
    ("llama", "gqa_tied", {**LORA_QV, "dropout": 0.0}),
    ("llama", "gqa_tied", {**LORA_QV, "dropout": 0.05}), ("llama", "gqa_tied", {**LORA_ALL, "dropout": 0.0}),
    ("llama", "gqa_tied", {**LORA_ALL, "dropout": 0.05}), ("bloom", "untied", None),
    ("bloom", "untied", {**LORA_ALL, "target_modules": ["query_key_value"], "dropout": 0.0}),
    ("bloom", "untied", {**LORA_ALL, "dropout": 0.05})],
    ids=["llama-full", "llama-full-head-dim-4", "llama-lora-all-head-dim-48", "llama-lora-qv", "llama-lora-qv-dropout", "llama-lora-all", "llama-lora-all-dropout",
         "bloom-full", "bloom-lora-qkv", "bloom-lora-all-dropout"])
def test_saved_tensors_of_the_blocks_are_the_models_activation_term(family, name, lora):
    """What autograd saves in the decoder blocks' forward (saved-tensor hooks, each storage once, parameters left
    out), 2 x 64 tokens, fp32, against n_blocks x block_activation_bytes x tokens (the CPU's dropout mask in the
    compute dtype), within 10%: full fine-tuning, LoRA on some or all linears, with and without dropout, and a
    head_dim that makes heads x head_dim differ from the hidden size."""
    import torch

    from models.cost import block_activation_bytes
    from models.lora import apply_lora, parse_lora
    from models.pipeline import SequentialModel
    from tests.helpers import make_batch, tiny_config

    fam = get_family(family)
    over = {"head_dim": int(name[9:])} if name.startswith("head_dim") else {}  # heads x head_dim != hidden (64)
    config = fam.prepare_config(tiny_config(family, "gqa_tied" if over else name, **over))
    torch.manual_seed(0)
    seq = SequentialModel(fam.layer_specs(config))
    n, shape = fam.num_blocks(config), None
    if lora:
        settings = parse_lora(lora, fam, config)
        seq.forward_funcs, seq._local_start = seq._funcs, 0  # what apply_lora reads of a PipelineModel
        apply_lora(seq, settings, fam, seed=0, num_blocks=n)
        shape = LoraShape(settings.r, settings.target_modules, settings.dropout)
    params = {p.untyped_storage().data_ptr() for p in seq.parameters()}
    ids, _, pos, seg, _ = make_batch(config.vocab_size, [64, 64], 64, "right")
    with torch.no_grad():
        x = seq._funcs[0]((ids, pos, seg))
    x = (x[0].requires_grad_(), *x[1:])
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for block in seq._funcs[1:1 + n]:
            x = block(x)
    predicted = n * block_activation_bytes(fam, config, 64, 4, shape, mask_bytes=4, fused_norm=False) * 2 * 64
    assert predicted == pytest.approx(sum(saved.values()), rel=0.1)


def test_the_memory_model_counts_the_fused_rms_norm_only_where_it_runs():
    """F.rms_norm's fused kernel (CUDA, torch >= 2.8) saves its input and 1 / rms; HPU, Neuron, the CPU and an older
    torch run the composite (the fp32 input, 1 / rms and, when the weight trains, the fp32 product): a GPU
    prediction counts the fused kernel only where it runs, for each block's two norms and the head's final one."""
    assert [fused_rms_norm("cuda", v) for v in ("2.4.1", "2.7.1+cu126", "2.8.0", "2.11.0+cu130", "3.0")] == \
        [False, False, True, True, True]  # 2.7 has aten._fused_rms_norm for MPS only
    assert not fused_rms_norm("hpu") and not fused_rms_norm("cpu") and not fused_rms_norm("cuda", "2.7.0")
    family, config = _model(LLAMA2_7B)
    h, tokens, pipe = config.hidden_size, 2 * 1024, 4
    setups = {f: Setup(2, 1024, pipe, grad_accum=8, fused_norm=f) for f in (True, False)}
    assert Setup(2, 1024, pipe).fused == fused_rms_norm("cuda") and not Setup(2, 1024, pipe, overhead_bytes=(1.0,) * 4).fused
    parts = [9, 8, 8, 9]  # the embedding + 8 blocks, 8, 8, 8 + the head
    fused, composite = (stage_memory(family, config, setups[f], parts) for f in (True, False))
    extra = (4 * h + 4 + 4 * h) - (2 * h + 4)  # per norm and token, bf16, full fine-tuning
    for stage, (f, c) in enumerate(zip(fused, composite, strict=True)):
        norms = 2 * 8 + (1 if stage == pipe - 1 else 0)  # per micro-batch in flight, + one block's in backward
        assert c.activations - f.activations == pytest.approx((norms * f.in_flight + 2) * extra * tokens), stage


# ---------------------------------------------------------------------------------------------- CPU validation

WORDS = "pipeline stage layer token batch loss gradient weight model data train answer question reply".split()
RUNS = {"full": {}, "lora": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}, "ckpt": {"use_grad_ckpt": True}}
TOLERANCE = 0.25


@pytest.mark.distributed
def test_predicted_stage_peaks_match_measured_cpu_runs(tmp_path, tokenizer):
    """Llama (hidden 256, 4 blocks, vocab 32768 untied: 20M parameters, 128 MiB of logits at 4 x 256 tokens)
    trained 2 steps on 2 stages (the second holds optimizer states), three ways at once; each stage's predicted peak (memory_estimate.json, whose
    overhead term is the process's memory measured before the model is built) against the peak resident memory
    the trainer records in metrics.jsonl."""
    import torch
    from transformers import LlamaConfig

    from models.convert import hg_to_pp
    from tests.helpers import finish_deepspeed, start_deepspeed

    cfg = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = get_family("llama").hf_model_class(cfg)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    rng = random.Random(0)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(400))}) + "\n"
                                              for _ in range(32)))
    procs = {}
    for name, over in RUNS.items():
        conf = {"model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / name), "data_path": str(tmp_path / "d.jsonl"),
                "data_cache_dir": str(tmp_path / f"cache-{name}"), "max_seq_len": 256, "max_steps": 2,
                "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
                "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, **over}
        (tmp_path / f"{name}.json").write_text(json.dumps(conf))
        procs[name] = start_deepspeed("train_ds.py", ["--config", str(tmp_path / f"{name}.json")])
    report = []
    for name, proc in procs.items():
        finish_deepspeed(proc, timeout=900)
        est = json.loads((tmp_path / name / "memory_estimate.json").read_text())["stages"]
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        measured = [rec["peak_memory"] for rec in lines if "peak_memory" in rec][-1]
        for stage, (pred, peak) in enumerate(zip(est, measured, strict=True)):
            report.append((name, stage, pred["total"], peak, pred["overhead"]))
    text = "\n".join(f"{n} stage {s}: predicted {p / 2**20:.0f} MiB, measured {m / 2**20:.0f} MiB ({p / m:.2f}); above the "
                     f"overhead {o / 2**20:.0f} MiB: {(p - o) / 2**20:.0f} vs {(m - o) / 2**20:.0f}" for n, s, p, m, o in report)
    print(text)
    assert len(report) == 6
    for _, _, pred, peak, overhead in report:
        assert abs(pred - peak) <= TOLERANCE * peak, text
        assert pred - overhead > 0.3 * (peak - overhead), text  # the model's own terms are predicted, not the overhead


OPTIMIZER_BYTES = """
import json, os, sys, deepspeed, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for name, extra in [("fp32-0", {}), ("fp32-1", {"zero_optimization": {"stage": 1}}),
                    ("bf16-1", {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}})]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 300))
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           **extra}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(2, 300, dtype=next(eng.module.parameters()).dtype)
    eng.backward(eng(x).float().pow(2).mean())
    eng.step()
    opt = eng.optimizer
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    base = getattr(opt, "optimizer", opt)
    moments = sum(v.numel() * v.element_size() for st in base.state.values() for v in st.values()
                  if torch.is_tensor(v) and v.dim())
    out[name] = [sum(p.numel() for p in model.parameters()), master + moments]
print("BYTES " + json.dumps(out))
"""


@pytest.mark.distributed
def test_the_optimizer_term_is_what_deepspeeds_optimizers_hold(tmp_path):
    """Adam's two fp32 moments, and the fp32 master weights ZeRO-1 keeps: of a bf16 model, and of an fp32 model too
    (DeepSpeedZeroOptimizer clones its partition whatever the dtype; planned fp32 runs lacked 4 bytes a parameter)."""
    from tests.helpers import free_port

    proc = subprocess.run([sys.executable, "-c", OPTIMIZER_BYTES, str(free_port())], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BYTES ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    family, config = _model(CPU_LLAMA)
    for name, (params, held) in json.loads(line[0][6:]).items():
        precision, zero = name.split("-")
        setup = Setup(1, 8, 1, precision=precision, zero_stage=int(zero), overhead_bytes=(1.0,))
        mem = stage_memory(family, config, setup, [len(unit_params(family, config))], counts=[(params, params)])[0]
        assert mem.optimizer == held, (name, mem.optimizer, held)


# ---------------------------------------------------------------------------------------------- the model's terms


CPU_LLAMA = dict(model_type="llama", vocab_size=32768, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)


def test_the_cpu_step_transients_are_sequential_and_the_loss_buffers_are_unmapped():
    """The terms the CPU validation's runs pinned down (the same Llama, 2 stages, fp32 without ZeRO; glibc's
    mallinfo2 and the resident size per pipeline instruction): the step's transients (DeepSpeed's gradient flatten,
    AdamW's temporaries; the trainer's own gradient norm copies no gradient) run one after another, so the step
    buffer is the largest, here AdamW's two fp32 temporaries of the 32 MiB embedding (64 MiB); the last stage's loss
    buffers (64 MiB and up) are unmapped by glibc when the backward frees them, so the step reuses that memory (max,
    not sum), while loss buffers small enough to stay in the heap still add to it; a GPU keeps max(live, step)."""
    family, config = _model(CPU_LLAMA)
    largest = 32768 * 256
    cpu = Setup(4, 256, 2, 1, 2, precision="fp32", zero_stage=0, overhead_bytes=(1.0, 1.0))
    s0, s1 = stage_memory(family, config, cpu, [5, 1])
    assert s0.step_buffer == s1.step_buffer == 2 * 4 * largest  # AdamW's: > the flatten (4 bytes a parameter)
    assert s0.step_buffer > 4 * s0.trainable and s1.step_buffer > 4 * s1.trainable
    assert not s0.logits_unmapped and s1.logits_unmapped
    static = [m.weights + m.gradients + m.optimizer + m.overhead for m in (s0, s1)]
    assert s0.total == static[0] + s0.activations + s0.step_buffer
    assert s1.total == static[1] + s1.activations + max(s1.logits, s1.step_buffer) and s1.logits > s1.step_buffer
    _, small = stage_memory(*_model({**CPU_LLAMA, "vocab_size": 2048}), cpu, [5, 1])  # 8 MiB of logits: in the heap
    assert not small.logits_unmapped
    bf16 = Setup(**{**cpu.__dict__, "precision": "bf16", "seq_len": 2048})  # chunks of 512 x 32000 bf16: 31.25 MiB
    assert not stage_memory(*_model({**CPU_LLAMA, "vocab_size": 32000}), bf16, [5, 1])[1].logits_unmapped
    assert stage_memory(*_model({**CPU_LLAMA, "vocab_size": 32768}), bf16, [5, 1])[1].logits_unmapped  # 32 MiB
    assert small.total == pytest.approx(small.weights + small.gradients + small.optimizer + small.activations
                                        + small.logits + small.step_buffer + small.overhead)
    gpu = stage_memory(family, config, Setup(**{**cpu.__dict__, "overhead_bytes": ()}), [5, 1])[1]
    assert not gpu.heap and not gpu.logits_unmapped and gpu.total == pytest.approx(
        gpu.weights + gpu.gradients + gpu.optimizer + max(gpu.activations + gpu.logits, gpu.step_buffer) + gpu.overhead)


@pytest.mark.parametrize("family,name", [("llama", "gqa_tied"), ("bloom", "tied"), ("qwen2", "tied"), ("llama", "mha_bias_untied")])
def test_stage_parameters_are_what_the_pipeline_builds(family, name):
    """Per stage, the model's parameter count is what building that stage's specs (models.pipeline.build_specs, as
    DeepSpeed's PipelineModule: a tied module once per stage that uses it) holds on the meta device: a tied
    embedding on both end stages, once when one stage holds both; one stage holds exactly transformers' model."""
    import torch

    from models import plan_stages
    from models.pipeline import build_specs
    from tests.helpers import tiny_config

    fam = get_family(family)
    config = fam.prepare_config(tiny_config(family, name))
    specs, sizes = fam.layer_specs(config), fam.unit_sizes(config)
    n = len(sizes)
    with torch.device("meta"):
        hf = sum(p.numel() for p in fam.hf_model_class(config).parameters())
    for parts in ([n], [1, n - 1], [n - 1, 1], [2, n - 2], [1, n - 2, 1]):
        bounds = plan_stages(sizes, fam.unit_costs(config), len(parts), parts)
        with torch.device("meta"):
            built = [sum(p.numel() for m in build_specs(specs, a, b)[0].values() for p in m.parameters())
                     for a, b in itertools.pairwise(bounds)]
        mem = stage_memory(fam, config, Setup(1, 64, len(parts)), parts)
        assert [m.params for m in mem] == built, parts
    assert stage_memory(fam, config, Setup(1, 64, 1), [n])[0].params == hf


def test_efficiency_counts_the_recompute_as_cost_not_work():
    """Checkpointing recomputes the blocks' forward: it lengthens the step but adds no useful work, so the same
    layout without it is faster (by the model's own rate: tokens per step over the step's time), and the planner,
    ranking by efficiency, picks it where it fits (Llama-2-7B, 8 x 40 GB, 1024 tokens: 4 x 2 fits both ways)."""
    from models.cost import throughput, unit_costs

    family, config = _model(LLAMA2_7B)
    parts, costs = [9, 8, 8, 9], unit_costs(family, config, 1024)
    on, off = (throughput(family, config, Setup(1, 1024, 4, 2, 32, grad_ckpt=c), parts) for c in (True, False))
    assert max(on.stage_costs) > max(off.stage_costs) and on.efficiency < off.efficiency
    for tp in (on, off):  # useful work (3 x every unit) over pipe x the slowest stage, times (1 - bubble)
        assert tp.efficiency == pytest.approx(3 * sum(costs) / (4 * max(tp.stage_costs)) * (1 - tp.bubble))
    assert off.efficiency / on.efficiency == pytest.approx(max(on.stage_costs) / max(off.stage_costs))
    best = plan(family, config, gpus=8, memory=GIB40, seq_len=1024)["best"]
    assert (best["setup"].pipe, best["setup"].data, best["setup"].grad_ckpt) == (4, 2, False)


def test_attention_widths_are_heads_times_head_dim():
    """q / k / v / o and attention's cost take the block's real widths (heads x head_dim), not the hidden size."""
    from models.cost import unit_costs
    from tests.helpers import tiny_config

    fam = get_family("llama")
    for head_dim in (4, 16, 48):  # hidden 64, 4 heads
        config = fam.prepare_config(tiny_config("llama", "gqa_tied", head_dim=head_dim))
        short, long = unit_costs(fam, config, 128), unit_costs(fam, config, 1024)
        assert long[1] - short[1] == (1024 - 128) * 4 * head_dim


def test_double_quantization_is_what_bitsandbytes_stores():
    """NF4 with bnb_4bit_use_double_quant stores 8-bit block scales (+ an fp32 scale per 256 of them): the model's
    bytes per weight are bitsandbytes' own (quantized on the CPU), and a QLoRA stage's weights follow the setting."""
    import dataclasses

    import torch

    from models.cost import NF4_BYTES, NF4_DQ_BYTES, LoraShape

    family, config = _model(LLAMA2_7B)
    setup = Setup(1, 1024, 4, lora=LoraShape(16, family.lora_targets), quantization="nf4")
    plain, dq = (stage_memory(family, config, dataclasses.replace(setup, double_quant=d), [9, 8, 8, 9]) for d in (False, True))
    linear = 8 * 4096 * (4 * 4096 + 3 * 11008)  # 8 blocks' linears
    assert plain[1].weights - dq[1].weights == pytest.approx(linear * (NF4_BYTES - NF4_DQ_BYTES))
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(2048, 2048)
    for double, predicted in ((False, NF4_BYTES), (True, NF4_DQ_BYTES)):
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double, quant_type="nf4")
        p = p._quantize("cpu") if hasattr(p, "_quantize") else p.to("cpu")
        state, stored = p.quant_state, p.data.numel() * p.data.element_size()
        for s in (state, getattr(state, "state2", None)):
            stored += sum(t.numel() * t.element_size() for t in (getattr(s, "absmax", None), getattr(s, "offset", None))
                          if t is not None) if s is not None else 0
        assert stored / w.numel() == pytest.approx(predicted, abs=2e-4), double


def _gib(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit] / 2**30


def test_the_printed_split_adds_up_to_the_peak(tmp_path, capsys):
    """Each printed stage row: weights + grads + optimizer + max(activations + logits, step buffer) + overhead is its
    peak (to the printed rounding); small models print their parameters in full, not 0.00B; the default 2048 tokens
    are clamped to a shorter model's position limit, with a note."""
    from tests.helpers import tiny_config

    for raw, memory in ((LLAMA2_7B, "40GB"), (BLOOM_7B1, "80GiB")):
        (tmp_path / "c.json").write_text(json.dumps(raw))
        assert plan_main(["--model-config", str(tmp_path / "c.json"), "--gpus", "8", "--gpu-memory", memory]) == 0
        lines = capsys.readouterr().out.splitlines()
        header = next(line for line in lines if line.lstrip().startswith("stage |"))
        assert "step buffer" in header and "peak = weights + grads + optimizer + max(activations + logits, step " \
            "buffer) + overhead" in "\n".join(lines)
        names = [c.strip() for c in header.split("|")]
        rows = [dict(zip(names, (c.strip() for c in line.split("|")), strict=True)) for line in lines
                if line.lstrip()[:1].isdigit() and line.count("|") == len(names) - 1]
        assert rows
        for r in rows:
            act = _gib(r["activations (in flight)"].rsplit(" (", 1)[0])
            total = sum(_gib(r[k]) for k in ("weights", "grads", "optimizer", "overhead"))
            total += max(act + _gib(r["logits"]), _gib(r["step buffer"]))
            assert total == pytest.approx(_gib(r["peak"]), abs=0.3), r
    config = tiny_config("llama", "gqa_tied", max_position_embeddings=512)
    (tmp_path / "t.json").write_text(json.dumps({**config.to_dict(), "model_type": "llama"}))
    assert plan_main(["--model-config", str(tmp_path / "t.json"), "--gpus", "1", "--gpu-memory", "4GB"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.match(r"llama, \d{3},\d{3} parameters;", first), first  # exact, not 0.00B
    assert "512 tokens (the model's limit, max_position_embeddings; default 2048)" in first, first


def test_the_readmes_bloom_plan_is_what_it_plans():
    """README "Planning": the Bloom-7b1 sentence (8 x 40 GB, 1024 tokens) is the planner's best layout and peaks."""
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    m = re.search(r"Bloom-7b1 \(vocab 250880, tied\): (\d+) x (\d+), parts `\[([\d, ]+)\]`, (no )?checkpointing, "
                  r"peaks ([\d.]+)-([\d.]+) GiB", readme)
    family, config = _model(BLOOM_7B1)
    best = plan(family, config, gpus=8, memory=GIB40, seq_len=1024)["best"]
    peaks = [round(x.total / 2**30, 1) for x in best["memory"]]
    assert m and (int(m[1]), int(m[2]), [int(x) for x in m[3].split(",")], not m[4], float(m[5]), float(m[6])) == \
        (best["setup"].pipe, best["setup"].data, best["parts"], best["setup"].grad_ckpt, min(peaks), max(peaks))
