"""QLoRA inside the pipeline (models/quant.py) under the real deepspeed launcher, against transformers + peft + bitsandbytes.

The reference is transformers' `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` with
`peft.PeftModel` on it, starting from the same random adapters the pipeline loads through `lora.adapter_path`, torch
AdamW, the same global batches. Llama runs NF4 with double quantisation and fp32 compute; Bloom FP4 with bf16 compute
activation checkpointing and 2 data-parallel replicas. The exported adapter is checked on the 4-bit HF base with peft itself."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import demo
from data.collate import pad_id_of
from data.encode import load_dataset
from data.templates import TemplateSettings
from models import get_family
from models.convert import hg_to_pp, pp_to_hg
from models.quant import QuantSettings
from tests.helpers import run_deepspeed, tiny_config, write_word_records
from tests.test_train_ops import (
    checkpoint_tensors,
    hf_token_mean_loss,
    losses_of,
    metrics_of,
    sigterm_at_step_6_then_resume,
)
from tests.test_train_reference import BETAS, EPS, GAS, LR, MICRO, SEED, SEQ, WD, reference_losses, write_records
from training.batches import BatchPlan

STEPS, R, ALPHA = 5, 4, 8.0
CASES = {  # family -> (tiny config, LoRA targets, quantization section, 4-bit layers per block, activation checkpointing
    # and 2 data-parallel replicas)
    "llama": ("mha_bias_untied", ["q_proj", "v_proj", "down_proj"],
              {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
               "bnb_4bit_compute_dtype": "float32"}, 7, False),
    "bloom": ("tied", ["query_key_value", "dense_4h_to_h"],
              {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bfloat16"}, 4, True),
}

# widths that are multiples of 64: bitsandbytes' CPU inference path (eval mode, AVX512-BF16 CPUs), which the
# transformers reference takes at evaluation, fails on an in_features of 96 (bitsandbytes 0.50.2)
SIZES = {"llama": {"intermediate_size": 128}, "bloom": {}}


def setup_run(tmp_path, tokenizer, family: str) -> dict:
    """HF + pipeline dirs of a tiny model, data, random initial adapters and the QLoRA training config."""
    name, targets, quant, _, ckpt = CASES[family]
    torch.manual_seed(0)
    hf = get_family(family).hf_model_class(tiny_config(family, name, vocab_size=len(tokenizer), **SIZES[family]))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    write_records(tmp_path / "train.jsonl", 100)
    write_word_records(tmp_path / "eval.jsonl", 9, seed=5)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    init = get_peft_model(hf, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every A and B random: a zero B would hide the adapters' forward pass
        for n, p in init.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    init.save_pretrained(str(tmp_path / "init_adapter"))
    return {
        "model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / "out"), "data_path": str(tmp_path / "train.jsonl"),
        "eval_data_path": str(tmp_path / "eval.jsonl"), "max_seq_len": SEQ, "max_steps": STEPS, "seed": SEED,
        "data_cache_dir": str(tmp_path / "cache"), "use_grad_ckpt": ckpt,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1 + ckpt]}, "parts": [2, 2]},  # a block each
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                                                  "torch_adam": True}},
        "lora": {"r": R, "alpha": ALPHA, "target_modules": targets, "adapter_path": str(tmp_path / "init_adapter")},
        "quantization": quant,
    }


def bnb_config(quant: dict) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(**{**quant, "bnb_4bit_compute_dtype": getattr(torch, quant["bnb_4bit_compute_dtype"])})


def bnb_base(hf_dir, quant: dict):
    """The HF base loaded 4-bit by transformers itself."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, quantization_config=bnb_config(quant))
    get_family(model.config.model_type).prepare_config(model.config)
    return model


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_qlora_matches_transformers_bnb_peft_and_exports(tmp_path, tokenizer, family, capsys):
    import bitsandbytes as bnb

    name, targets, quant, per_block, ckpt = CASES[family]
    config = setup_run(tmp_path, tokenizer, family)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    proc = run_deepspeed("train_ds.py", ["--config", str(tmp_path / "cfg.json")], num_procs=2 * (1 + ckpt))
    settings = QuantSettings.from_info(quant)
    assert f"QLoRA base: {settings.describe()} (bitsandbytes Linear4bit in every decoder block" in proc.stdout
    blocks = tiny_config(family, name, **SIZES[family]).num_hidden_layers
    rows = re.findall(r"stage (\d): (\d+) 4-bit layers; frozen base ([\d.]+ \w+) \(unquantised: ([\d.]+ \w+)\)", proc.stdout)
    assert [int(r[1]) for r in rows] == [per_block, per_block], rows  # each stage: its block's linears, all 4-bit
    assert all(r[2] != r[3] for r in rows)  # quantised base smaller than unquantised

    dataset = load_dataset(str(tmp_path / "train.jsonl"), tokenizer, SEQ, tmp_path / "cache", TemplateSettings())
    plan = BatchPlan(len(dataset), MICRO, GAS, 1 + ckpt, SEED, dataset.offsets[1:] - dataset.offsets[:-1])

    def wrap(model):  # transformers' 4-bit model: every block linear a Linear4bit, the head and embedding not
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == blocks * per_block
        return PeftModel.from_pretrained(model, str(tmp_path / "init_adapter"), is_trainable=True)

    ref_losses, ref_sd = reference_losses(tmp_path / "hf", dataset, plan, pad_id_of(tokenizer), 1.0, False, wrap=wrap,
                                          steps=STEPS, quantization_config=bnb_config(quant))
    got = losses_of(tmp_path / "out")
    assert list(got) == list(range(1, STEPS + 1))
    tol = 1e-6  # measured: 7.7e-8 (Llama and Bloom)
    for step, ref in zip(got, ref_losses, strict=True):
        assert got[step] == pytest.approx(ref, rel=tol), (step, got[step], ref)
    print(family, "max rel loss diff", max(abs(got[s] - r) / r for s, r in zip(got, ref_losses, strict=True)))  # noqa: T201

    # the checkpoint: adapters (and their optimizer state) only, and the quantisation named
    tag = tmp_path / "out" / f"global_step{STEPS}"
    info = json.loads((tag / "lora_config.json").read_text())
    assert info["quantization"] == settings.as_config()
    layer_keys = [k for k in checkpoint_tensors(tag) if k.startswith("layer_")]
    assert layer_keys and all("lora_" in k for k in layer_keys), layer_keys[:5]
    # fp32 adapters as peft's (not the 4-bit layers' compute dtype), in the checkpoint and the export
    assert {t.dtype for k, t in checkpoint_tensors(tag).items() if k.startswith("layer_")} == {torch.float32}

    # PEFT export on transformers' 4-bit base reproduces the pipeline's eval loss
    capsys.readouterr()
    pp_to_hg(tmp_path / "out", tmp_path / "adapter", lora="peft")
    assert ("note: vLLM serves no LoRA adapter on Bloom" in capsys.readouterr().err) == (family == "bloom")
    assert json.loads((tmp_path / "adapter" / "quantization_config.json").read_text()) == settings.as_config()
    exported, init = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("adapter", "init_adapter"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    # the trained adapters are peft's, relative to the updates (bf16 adapters lost most small updates)
    errors = [((t - ref_sd[k.replace(".weight", ".default.weight")]).norm() /
               (ref_sd[k.replace(".weight", ".default.weight")] - init[k]).norm()).item() for k, t in exported.items()]
    print(family, "max adapter error / update", max(errors))  # noqa: T201
    limit = 1e-5  # measured: 4.2e-7 (Llama), 9.6e-7 (Bloom); bf16 adapters, or peft's base repacked with bf16 scales: 0.036
    assert max(errors) < limit, errors  # an adapter that never moved: 1
    loaded = PeftModel.from_pretrained(bnb_base(tmp_path / "hf", quant), str(tmp_path / "adapter")).eval()
    eval_loss = [m["eval_loss"] for m in metrics_of(tmp_path / "out") if "eval_loss" in m]
    assert len(eval_loss) == 1
    hf_eval = hf_token_mean_loss(loaded, tmp_path / "eval.jsonl", tokenizer, SEQ)
    print(family, "eval", eval_loss[0], hf_eval)
    assert hf_eval == pytest.approx(eval_loss[0], rel=5e-4)  # measured: 2e-5 (bitsandbytes bf16 CPU scales), 2e-7

    # merged: the adapters in the dequantised base, full precision; demo reads the checkpoint as that model, and an
    # exported adapter on a 4-bit base
    pp_to_hg(tmp_path / "out", tmp_path / "merged", lora="merge")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([tokenizer("pipeline stage layer token batch loss gradient")["input_ids"]])
    with torch.no_grad():
        on_4bit = demo.with_adapter(demo.load(tmp_path / "hf")[0], tmp_path / "adapter")  # quantised as in training
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in on_4bit.modules()) == blocks * per_block
        want = on_4bit(input_ids=ids).logits
        # transformers' 4-bit model in eval mode takes bitsandbytes' CPU shortcut (bf16 block scales; see models/quant.py)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=2e-2, rtol=0)
        atol = 2e-2 if quant["bnb_4bit_compute_dtype"] == "bfloat16" else 1e-4
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=atol, rtol=0)
        from_ckpt, _, _ = demo.load(tmp_path / "out")
        torch.testing.assert_close(from_ckpt(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)

    if family == "llama":  # preempted after step 3 and resumed: bit-identical to the uninterrupted run
        cut = tmp_path / "cut"
        cut.mkdir()
        cfg = cut / "cfg.json"
        cfg.write_text(json.dumps({**config, "save_path": str(cut / "out")}))
        sigterm_at_step_6_then_resume(cut, cfg, step=3)
        assert losses_of(cut / "out") == got
        a, b = checkpoint_tensors(tag), checkpoint_tensors(cut / "out" / f"global_step{STEPS}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



Q4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
BAD = {  # name -> (config overrides, expected text)
    "no lora": ({"lora": None}, "'quantization' needs a 'lora' section"),
    "quant type": ({"quantization": {**Q4, "bnb_4bit_quant_type": "nf3"}},
                   "quantization.bnb_4bit_quant_type must be one of nf4, fp4, got \"nf3\""),
    "compute dtype": ({"quantization": {**Q4, "bnb_4bit_compute_dtype": "bf16"}},
                      "quantization.bnb_4bit_compute_dtype must be one of bfloat16, float16, float32, got \"bf16\""),
    "unknown key": ({"quantization": {**Q4, "bnb_4bit_quant_storage": "uint8"}},
                    "quantization: unknown key(s) 'bnb_4bit_quant_storage'; allowed:"),
    "8 bit": ({"quantization": {"load_in_8bit": True}}, "quantization.load_in_8bit is not supported"),
    "not 4 bit": ({"quantization": {"bnb_4bit_quant_type": "nf4"}}, "quantization.load_in_4bit must be true, got null"),
    "4-bit module trained whole": ({"lora": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["down_proj"]}},
                                   "lora.modules_to_save: 'down_proj' holds 4-bit layers under 'quantization'"),
    # one block's, or a block's attention, named as peft names them (they passed the check, then every rank crashed)
    "one block's 4-bit module": ({"lora": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["layers.1.mlp.down_proj"]}},
                                 "lora.modules_to_save: 'layers.1.mlp.down_proj' holds 4-bit layers under 'quantization' "
                                 "(model.layers.1.mlp.down_proj)"),
    "a block's attention": ({"lora": {"r": 4, "target_modules": ["gate_proj"], "modules_to_save": ["model.layers.0.self_attn"]}},
                            "lora.modules_to_save: 'model.layers.0.self_attn' holds 4-bit layers under 'quantization' "
                            "(model.layers.0.self_attn.q_proj)"),
    "bitsandbytes missing": ({}, "quantization needs the package bitsandbytes >= 0.46, which is not installed; pip install"),
    "bitsandbytes too old": ({}, "quantization needs bitsandbytes >= 0.46 (4-bit layers on CPU and GPU); installed: 0.45.5"),
    "resume a LoRA checkpoint": ({"@ckpt": {"r": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj"],
                                            "base_model_path": "pp"}},
                                 "'quantization' is {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\", "
                                 "\"bnb_4bit_use_double_quant\": false, \"bnb_4bit_compute_dtype\": \"float32\"} but the "
                                 "checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantization_is_one_line_before_any_model(tmp_path, ops_model, capsys, monkeypatch, case):
    import importlib.metadata

    import train_ds
    from tests.helpers import ops_config

    over, expected = BAD[case]
    if case.startswith("bitsandbytes"):
        real = importlib.metadata.version

        def version(name):
            if name != "bitsandbytes":
                return real(name)
            if case.endswith("missing"):
                raise importlib.metadata.PackageNotFoundError(name)
            return "0.45.5"
        monkeypatch.setattr(importlib.metadata, "version", version)
    if saved := over.pop("@ckpt", None):
        tag = tmp_path / "out" / "global_step2"
        tag.mkdir(parents=True)
        (tmp_path / "out" / "latest").write_text("global_step2")
        (tag / "trainer_state.json").write_text("{}")
        (tag / "lora_config.json").write_text(json.dumps(saved))
    cfg = ops_config(tmp_path, ops_model, **{"lora": {"r": 4, "target_modules": ["q_proj"]}, "quantization": Q4,
                                             "model_topo": None, **over})
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {cfg}: ") and expected in err[0], err
    assert not (tmp_path / "out").exists() or saved
    assert not saved or f"{tag} was trained with null; resume with the same base quantization, or start" in err[0], err


def test_a_block_without_linear_layers_cannot_be_quantised():
    import dataclasses

    from models.lora import parse_lora
    from models.quant import parse_quantization

    class ConvBlock(torch.nn.Module):  # e.g. GPT-2's Conv1D projections, which this integration does not convert
        def __init__(self, config, layer_idx):
            super().__init__()
            self.proj = torch.nn.Conv1d(config.hidden_size, config.hidden_size, 1)

    llama = get_family("llama")
    family = dataclasses.replace(llama, block_class=ConvBlock)
    config = tiny_config("llama", "gqa_tied")
    with pytest.raises(ValueError, match=r"^quantization: a llama block \(ConvBlock\) has no nn.Linear layer bitsandbytes "
                                         "can quantise$"):
        parse_quantization(Q4, family, config, parse_lora({"r": 4}, llama))



def built_with_adapters(tmp_path, quant: dict, targets: list[str], adapter):
    """The pipeline's layers of tmp_path/pp in one module, 4-bit as `quant` says, with adapters from `adapter`."""
    from models import SequentialModel
    from models.lora import apply_lora, load_adapter_into, parse_lora
    from models.quant import parse_quantization, quantized_specs

    fam = get_family("llama")
    config = fam.prepare_config(fam.config_class.from_pretrained(str(tmp_path / "pp")))
    n = fam.num_blocks(config)
    lora = parse_lora({"r": R, "alpha": ALPHA, "target_modules": targets, "adapter_path": str(adapter)}, fam, config)
    model = SequentialModel(quantized_specs(fam.layer_specs(config), fam, tmp_path / "pp",
                                            parse_quantization(quant, fam, config, lora)))
    for idx, layer in model.layers.items():  # the 4-bit blocks loaded their files when built
        if not hasattr(layer, "loaded_from"):
            layer.load_state_dict(torch.load(tmp_path / "pp" / f"layer_{int(idx):02d}-model_states.pt", weights_only=True))
    model.forward_funcs, model._local_start = model._funcs, 0  # what apply_lora reads of a PipelineModel
    apply_lora(model, lora, fam, SEED, n)
    load_adapter_into(model, fam, adapter, n)
    return model, config


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_half_compute_dtype_adapters_train_in_fp32_as_peft(tmp_path, compute):
    """With a float16 / bfloat16 compute dtype, peft's inject_adapter_in_model builds a Linear4bit's adapters in that
    dtype, where PeftModel upcasts them to fp32: AdamW updated half-precision weights (fp16 drifted from peft's
    losses from step 2, bf16 lost most small updates) and adapter_path weights were rounded. In process, torch AdamW
    on the adapters of both, the same batches."""
    from models.lora import peft_key
    from models.pipeline import causal_lm_loss
    from tests.helpers import make_batch

    targets = ["q_proj", "v_proj", "down_proj"]
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
    torch.manual_seed(0)
    hf = get_family("llama").hf_model_class(tiny_config("llama", "mha_bias_untied", **SIZES["llama"]))
    hf.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    init = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    init.save_pretrained(str(tmp_path / "init"))
    ours, config = built_with_adapters(tmp_path, quant, targets, tmp_path / "init")
    theirs = PeftModel.from_pretrained(bnb_base(tmp_path / "hf", quant), str(tmp_path / "init"), is_trainable=True)

    n = get_family("llama").num_blocks(config)
    adapters = {peft_key(get_family("llama"), int(k.split(".")[1]), k.split(".", 2)[2], n): p
                for k, p in ours.named_parameters() if p.requires_grad}
    start = {k: p.detach().clone() for k, p in adapters.items()}
    losses: dict[str, list[float]] = {"ours": [], "peft": []}
    for who, model in (("ours", ours), ("peft", theirs)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        for step in range(4):
            ids, mask, pos, seg, labels = make_batch(config.vocab_size, [12, 9], 12, "right", seed=step)
            loss = causal_lm_loss(model((ids, pos, seg)), labels) if who == "ours" else \
                model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[who].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["ours"], losses["peft"], strict=True)):  # measured: equal
        assert a == pytest.approx(b, rel=1e-6, abs=0), (step + 1, losses)
    assert {p.dtype for p in adapters.values()} == {torch.float32}, compute  # peft's, whatever the compute dtype
    saved = load_file(str(tmp_path / "init" / "adapter_model.safetensors"))  # fp32, loaded unrounded
    assert start.keys() == saved.keys() and all(torch.equal(t, saved[k]) for k, t in start.items())
    assert all((p != start[k]).all() for k, p in adapters.items())  # every element of every adapter updated
