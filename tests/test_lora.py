"""LoRA inside the pipeline under the real deepspeed launcher, against transformers + peft.

The reference is `peft.get_peft_model` on the HF model with the same LoraConfig and the same initial adapter
weights (random A and B, so the adapters act from the first step; the pipeline starts from them through
`lora.adapter_path`), torch AdamW, the same global batches. Exports are checked with peft itself:
`PeftModel.from_pretrained` for the adapter dir and `merge_and_unload` for the merged model."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import demo
from data.collate import pad_id_of
from data.encode import load_dataset
from data.templates import TemplateSettings
from models import get_family
from models.convert import hg_to_pp, pp_to_hg
from models.hf_io import CheckpointError
from models.lora import base_fingerprint, parse_lora
from tests.helpers import (
    ops_config,
    run_deepspeed,
    tiny_config,
    write_word_records,
)
from tests.test_train_ops import (
    checkpoint_tensors,
    hf_token_mean_loss,
    losses_of,
    metrics_of,
    sigterm_at_step_6_then_resume,
)
from tests.test_train_reference import BETAS, EPS, GAS, LR, MICRO, SEED, SEQ, WD, reference_losses, write_records
from training.batches import BatchPlan
from training.config import ConfigError, load_config

pytestmark = pytest.mark.distributed

STEPS, R, ALPHA = 5, 4, 8.0


def lora_config(family: str, modules_to_save: list[str] | None = None) -> LoraConfig:
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["query_key_value", "dense_4h_to_h"]
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                      modules_to_save=modules_to_save)


@pytest.mark.parametrize("family, name, procs, parts, saves", [
    ("llama", "gqa_tied", 3, [1, 3, 1], None),  # an embedding-only first stage and a head-only last stage (frozen, tied)
    ("llama", "mha_bias_untied", 2, None, ["lm_head", "norm"]),  # also trained whole: the LM head and the norms peft's
    # rule names (the final one; with peft < 0.22 every norm)
    ("bloom", "tied", 2, None, None),
], ids=["llama-pipe3-embed-only-head-only", "llama-pipe2-modules-to-save", "bloom-pipe2"])
def test_lora_matches_peft_and_exports_load_in_peft(tmp_path, tokenizer, family, name, procs, parts, saves, capsys):
    torch.manual_seed(0)
    hf = get_family(family).hf_model_class(tiny_config(family, name, vocab_size=len(tokenizer)))
    blocks = hf.config.num_hidden_layers
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    write_records(tmp_path / "train.jsonl", 100)
    write_word_records(tmp_path / "eval.jsonl", 9, seed=5)

    # the initial adapters: peft's layout, every A and B random (a zero B would hide the adapters' forward pass)
    init = get_peft_model(get_family(family).hf_model_class.from_pretrained(str(tmp_path / "hf")),
                          lora_config(family, saves))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "lora_" in n:  # (modules_to_save start as the base's copies)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    init.save_pretrained(str(tmp_path / "init_adapter"))

    targets = list(lora_config(family).target_modules)
    config = {
        "model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / "out"), "data_path": str(tmp_path / "train.jsonl"),
        "eval_data_path": str(tmp_path / "eval.jsonl"), "max_seq_len": SEQ, "max_steps": STEPS, "seed": SEED,
        "data_cache_dir": str(tmp_path / "cache"), "use_grad_ckpt": family == "bloom",
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [procs, 1]}, **({"parts": parts} if parts else {})},
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                                                  "torch_adam": True}},
        "lora": {"r": R, "alpha": ALPHA, "target_modules": targets, "adapter_path": str(tmp_path / "init_adapter"),
                 **({"modules_to_save": saves} if saves else {})},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    proc = run_deepspeed("train_ds.py", ["--config", str(tmp_path / "cfg.json")], num_procs=procs)
    frozen = "base frozen" + (f" except {', '.join(saves)}" if saves else "")
    assert f"LoRA: r {R}, alpha {ALPHA:g}, dropout 0 on {', '.join(targets)} of every block; {frozen}" in proc.stdout
    if parts:  # the frozen stages hold no trainable parameter
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()[:1].isdigit() and "|" in line]
        per_block = R * ((64 + 64) + (64 + 32) + (96 + 64))  # q_proj 64->64, v_proj 64->32 (GQA), down_proj 96->64
        assert [r[2].split("(")[1].strip(" )") for r in rows] == ["0", f"{blocks * per_block:,}", "0"]
        # the middle stage neither feeds inputs nor reads labels: it does not load the data set (same losses below)
        assert "data: read by the first and last pipeline stages; the 1 middle stage(s) get the rows' lengths only" in \
            proc.stdout

    dataset = load_dataset(str(tmp_path / "train.jsonl"), tokenizer, SEQ, tmp_path / "cache", TemplateSettings())
    plan = BatchPlan(len(dataset), MICRO, GAS, 1, SEED, dataset.offsets[1:] - dataset.offsets[:-1])
    ref_model = {}

    def wrap(model):
        ref_model["m"] = PeftModel.from_pretrained(model, str(tmp_path / "init_adapter"), is_trainable=True)
        return ref_model["m"]

    ref_losses, _ = reference_losses(tmp_path / "hf", dataset, plan, pad_id_of(tokenizer), 1.0, False, wrap=wrap,
                                     steps=STEPS)
    got = losses_of(tmp_path / "out")
    assert list(got) == list(range(1, STEPS + 1))
    for step, ref in zip(got, ref_losses, strict=True):
        assert got[step] == pytest.approx(ref, rel=1e-4), (step, got[step], ref)

    # PEFT export == the reference's adapters; PeftModel.from_pretrained reproduces the pipeline's eval loss
    with pytest.raises(CheckpointError, match="a LoRA checkpoint .adapters only.: pass --lora peft"):
        pp_to_hg(tmp_path / "out", tmp_path / "nope")
    capsys.readouterr()
    pp_to_hg(tmp_path / "out", tmp_path / "adapter", lora="peft")
    # llama.cpp takes LoRA pairs only: it refuses whole modules, or ignores norms (checked with its converter and
    # runtime); vLLM refuses modules_to_save (its PEFTHelper._validate_features)
    assert ("vLLM refuses such an adapter (modules_to_save), and llama.cpp does not take them (its "
            "convert_lora_to_gguf.py refuses them" in capsys.readouterr().err) == bool(saves)
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(ref_model["m"])
    from models.lora import _peft_matches_components

    # lm_head, the final norm, and with peft < 0.22 ("norm" ends "input_layernorm") two norms per block
    whole = 1 + 1 + (0 if _peft_matches_components() else 2 * blocks) if saves else 0
    assert sorted(exported) == sorted(expected) and len(exported) == blocks * len(targets) * 2 + whole
    initial = load_file(str(tmp_path / "init_adapter" / "adapter_model.safetensors"))
    for k, v in expected.items():
        torch.testing.assert_close(exported[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        assert not torch.equal(v, initial[k]), f"{k} was never updated"
    base = get_family(family).hf_model_class.from_pretrained(str(tmp_path / "hf"))
    get_family(family).prepare_config(base.config)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    eval_loss = [m["eval_loss"] for m in metrics_of(tmp_path / "out") if "eval_loss" in m]
    assert len(eval_loss) == 1
    assert hf_token_mean_loss(loaded, tmp_path / "eval.jsonl", tokenizer, SEQ) == pytest.approx(eval_loss[0], rel=1e-5)
    # the adapter names the HF model its base pipeline dir was converted from: AutoPeftModelForCausalLM loads it alone
    ours, peft_own = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapter", "init_adapter"))
    assert ours.pop("base_model_name_or_path") == str((tmp_path / "hf").resolve())
    peft_own.pop("base_model_name_or_path")
    for cfg in ours, peft_own:  # (sets, written in any order)
        cfg["target_modules"], cfg["modules_to_save"] = sorted(cfg["target_modules"]), sorted(cfg["modules_to_save"] or [])
    assert ours == peft_own  # otherwise what peft's own save_pretrained writes (inference_mode true and all)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).state_dict()
    assert auto.keys() == loaded.state_dict().keys() and all(torch.equal(t, loaded.state_dict()[k]) for k, t in auto.items())

    # merged export == peft's merge_and_unload; demo.py reads the LoRA checkpoint as that merged model
    pp_to_hg(tmp_path / "out", tmp_path / "merged", lora="merge")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    reference = loaded.merge_and_unload().eval()
    ids = torch.tensor([tokenizer("pipeline stage layer token batch loss gradient")["input_ids"]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)
        from_ckpt, _, _ = demo.load(tmp_path / "out")
        torch.testing.assert_close(from_ckpt(input_ids=ids).logits, want, atol=1e-4, rtol=0)
        with_adapter = demo.with_adapter(demo.load(tmp_path / "hf")[0], tmp_path / "adapter")
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, want, atol=1e-4, rtol=0)
    # the adapter carries how training rendered prompts, for demo.py --adapter
    assert (tmp_path / "adapter" / "data_settings.json").read_text() == (tmp_path / "out" / "data_settings.json").read_text()


LORA = {"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.3}  # dropout: the resume restores RNGs


def test_lora_checkpoint_is_small_and_resumes_bit_exactly_after_sigterm(tmp_path_factory, ops_model, ops_uninterrupted):
    """The same model, data and steps as test_train_ops' full run (ops_uninterrupted), with LoRA."""
    full, tmp_path = tmp_path_factory.mktemp("lora-full"), tmp_path_factory.mktemp("lora-resumed")
    cfg = ops_config(tmp_path, ops_model, lora=LORA, save_interval=3)
    sigterm_at_step_6_then_resume(tmp_path, cfg, beside=(ops_config(full, ops_model, lora=LORA, save_interval=3),))
    uninterrupted = full / "out"
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    lora_size, full_size = size(uninterrupted / "global_step8"), size(ops_uninterrupted / "global_step8")
    assert lora_size < 0.05 * full_size, (lora_size, full_size)
    tensors = checkpoint_tensors(uninterrupted / "global_step8")
    assert all("lora_" in k for k in tensors if k.startswith("layer_")) and any("lora_A" in k for k in tensors)
    # the base is recorded by its fingerprint: a model_path whose weights changed since is refused on resume
    info = json.loads((uninterrupted / "global_step8" / "lora_config.json").read_text())
    assert info["base_fingerprint"] == base_fingerprint(ops_model / "pp")
    changed = full / "changed-base"
    shutil.copytree(ops_model / "pp", changed)
    sd = torch.load(changed / "layer_02-model_states.pt")
    sd["mlp.up_proj.weight"][0, 0] += 1.0
    torch.save(sd, changed / "layer_02-model_states.pt")
    with pytest.raises(ConfigError, match=rf"the model in model_path {changed} is not the base the checkpoint "
                       rf"{uninterrupted / 'global_step8'} was trained on \(its config.json or weights changed"):
        load_config(ops_config(full, ops_model, "resume.json", lora=LORA, save_interval=3, model_path=str(changed)),
                    world_size=2)
    moved = full / "moved-base"  # the same base moved (or through a link, or a relative path): it resumes
    shutil.copytree(ops_model / "pp", moved)
    resumed = load_config(ops_config(full, ops_model, "resume.json", lora=LORA, save_interval=3, model_path=str(moved)),
                          world_size=2)
    assert resumed.resume and resumed.refusal is None

    assert losses_of(tmp_path / "out") == losses_of(uninterrupted)
    a, b = tensors, checkpoint_tensors(tmp_path / "out" / "global_step8")
    assert a.keys() == b.keys() and len(a) >= 12 and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_bf16_zero1_data_parallel_and_an_embedding_only_stage(tmp_path, ops_model):
    """2 stages x 2 replicas, bf16 with fp32 gradient accumulation (ZeRO-1), activation checkpointing; the first
    stage holds only the frozen embedding (DeepSpeed's bf16 optimizer still needs a gradient there)."""
    saves = ["norm", "input_layernorm", "post_attention_layernorm"]  # every norm, by peft 0.22's rule and earlier ones
    cfg = ops_config(tmp_path, ops_model, lora={**LORA, "modules_to_save": saves}, bf16={"enabled": True},
                     zero_optimization={"stage": 1},
                     data_types={"grad_accum_dtype": "fp32"}, use_grad_ckpt=True, lr_schedule={"type": "constant"},
                     model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 2]}, "parts": [1, 4]})
    proc = run_deepspeed("train_ds.py", ["--config", str(cfg)], num_procs=4)
    assert "precision: bf16; ZeRO stage 1; gradient accumulation in float32" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [r[2].split("(")[1].strip(" )") for r in rows][0] == "0"
    metrics = metrics_of(tmp_path / "out")
    assert len(metrics) == 8 and all(m["loss"] > 0 and m["grad_norm"] > 0 and not m.get("skipped") for m in metrics)
    # DeepSpeed's BF16_Optimizer steps this config: stage 0 keeps its one group (even_groups is for its ZeRO optimizer,
    # which hung; a group added here changed the checkpoints that resumes of earlier runs load)
    states = sorted((tmp_path / "out" / "global_step8").glob("bf16_zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    groups = [len(torch.load(f, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"])
              for f in states]
    assert groups == [1, 2, 1, 2], groups
    pp_to_hg(tmp_path / "out", tmp_path / "adapter", lora="peft")
    adapters = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora = {k: t for k, t in adapters.items() if "lora_" in k}
    assert len(lora) == 3 * 2 * 2 and all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)
    assert len(adapters) - len(lora) == 1 + 2 * 3  # the final norm, two per block, trained whole (in bf16)
    # the optimizer line counts both stages' groups (stage 0 has only its placeholder, which is not counted)
    groups = re.search(r"optimizer: \S+ \(lr [^)]*\) on ([\d,]+) decay \(wd [^)]*\) \+ ([\d,]+) no_decay", proc.stdout)
    assert [int(g.replace(",", "")) for g in groups.groups()] == [
        sum(t.numel() for t in lora.values()), sum(t.numel() for k, t in adapters.items() if k not in lora)]
    alpha = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"]
    assert type(alpha) is int and alpha == 16  # as peft writes it
    # the merged model is in its config's dtype (the base's fp32), the bf16-trained norms too
    pp_to_hg(tmp_path / "out", tmp_path / "merged", lora="merge")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.float32}


@pytest.mark.parametrize("pattern", [{"alpha_pattern": {"v_proj": 64}}, {"rank_pattern": {"v_proj": 8}},
                                     {"lora_bias": True}], ids=["alpha_pattern", "rank_pattern", "lora_bias"])
def test_an_adapter_with_per_module_settings_is_refused(tmp_path, pattern):
    """peft's per-module rank / scale / bias would be dropped by the pipeline's one r and alpha: a wrong scale."""
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
               **pattern).save_pretrained(str(tmp_path))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    section = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "adapter_path": str(tmp_path)}
    with pytest.raises(ValueError, match=f"lora.adapter_path {tmp_path}: the adapter sets {next(iter(pattern))} "):
        parse_lora(section, get_family("llama"))


@pytest.mark.parametrize("over, says", [
    ({"bias": "all"}, "the adapter's bias is \"all\": LoRA bias modes are not supported (bias must be \"none\")"),
    ({"bias": "lora_only"}, "the adapter's bias is \"lora_only\": LoRA bias modes are not supported (bias must be "
                            "\"none\")"),
    ({"layers_to_transform": [1]}, "the adapter sets layers_to_transform [1] (adapters in some layers only), which is "
                                   "not supported: the pipeline adapts every layer"),
    ({"layers_to_transform": 0, "layers_pattern": "layers"}, "the adapter sets layers_to_transform 0, layers_pattern "
                                                             "\"layers\" (adapters in some layers only), which is not "
                                                             "supported: the pipeline adapts every layer"),
    ({"exclude_modules": ["model.layers.1.self_attn.q_proj"]}, "the adapter sets exclude_modules "
     "[\"model.layers.1.self_attn.q_proj\"] (adapters in some layers only), which is not supported: the pipeline "
     "adapts every layer"),
    # peft subtracts the initial adapters from the base as it loads these: the pipeline would count them twice
    ({"init_lora_weights": "pissa"}, "the adapter's init_lora_weights is \"pissa\": peft changes the base as it loads "
     "such an adapter (PiSSA, OLoRA, CorDA and LoftQ subtract their initial adapters from it), while these adapters add "
     "to the base as it is; convert it to a plain LoRA adapter first (peft: save_pretrained(..., "
     "path_initial_model_for_weight_conversion=...))"),
    # an adapter of some modules only, or of peft's dotted names for the configured ones
    ({"target_modules": r".*layers\.0\.self_attn\.q_proj"}, "the adapter has no model.layers.0.self_attn.v_proj.lora_A "
     "(10 of the 12 adapter tensors lora.target_modules ['q_proj', 'v_proj'] needs are missing): it adapts fewer "
     "modules, and those would start fresh; set lora.target_modules to what it adapts"),
    ({"target_modules": ["self_attn.q_proj", "self_attn.v_proj"]}, None),
], ids=["bias-all", "bias-lora_only", "layers_to_transform", "layers_pattern", "exclude_modules", "pissa", "regex",
        "dotted"])
def test_an_adapter_with_bias_or_of_some_layers_is_refused_in_one_line(tmp_path, ops_model, over, says):
    """peft's bias "all" / "lora_only" was refused as a tensor that "does not fit this llama model" (the biases it
    trains; or accepted, the model having none); layers_to_transform was accepted and widened to every layer (the
    export then dropped the key)."""
    model = get_family("llama").hf_model_class.from_pretrained(str(ops_model / "hf"))
    get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **over})
                   ).save_pretrained(str(tmp_path / "adapter"))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "adapter_path": str(tmp_path / "adapter")}
    cfg = ops_config(tmp_path, ops_model, lora=lora)
    if says is None:
        assert load_config(cfg).lora == lora
        return
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg}: lora.adapter_path {tmp_path / 'adapter'}: {says}"


@pytest.mark.parametrize("alpha", [None, "8"])
def test_an_adapter_whose_alpha_is_no_number_is_refused_in_one_line(tmp_path, ops_model, alpha):
    """adapter_config.json's "lora_alpha": null was float(None)'s traceback; "8" named neither the file nor the key."""
    model = get_family("llama").hf_model_class.from_pretrained(str(ops_model / "hf"))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "adapter"))
    body = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**body, "lora_alpha": alpha}))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "adapter_path": str(tmp_path / "adapter")}
    cfg = ops_config(tmp_path, ops_model, lora=lora)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: lora.adapter_path {tmp_path / 'adapter'}: adapter_config.json's lora_alpha must "
                            f"be a number, got {json.dumps(alpha)}")


def test_a_damaged_adapter_is_one_line_and_one_of_another_base_quantization_is_said(tmp_path, ops_model):
    """A truncated adapter_model.safetensors, or an adapter_config.json that is no object, was a traceback (a
    safetensors error, an AttributeError) on every rank; demo.py --adapter too. An adapter exported from a QLoRA run
    (its quantization_config.json) started a run on another base without a word."""
    from models.quant import QUANT_FILE

    model = get_family("llama").hf_model_class.from_pretrained(str(ops_model / "hf"))
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adapter))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "adapter_path": str(adapter)}
    cfg = ops_config(tmp_path, ops_model, lora=lora)
    assert not any("lora.adapter_path" in n for n in load_config(cfg).notes)
    (adapter / QUANT_FILE).write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}))
    said = [n for n in load_config(cfg).notes if "lora.adapter_path" in n]
    assert said == [f"lora.adapter_path {adapter} was trained on a 4-bit fp4, no double quantisation, compute float32 "
                    f"base ({QUANT_FILE}), and this run's is a full-precision base: its adapters start from weights "
                    "fitted to another base (the first losses may differ from that run's last)"], said
    quant = adapter / QUANT_FILE  # damaged or edited: one line naming it (demo.py's was a traceback, or 8-bit read
    for text, problem in (('{"load_in_4bit": true, "bnb_4bit_qu', "unreadable, the file is corrupt or truncated "
                           "(JSONDecodeError: "),  # as 4-bit nf4 without a word)
                          ("[1]", "not a JSON object"),
                          ('{"load_in_4bit": true, "bnb_4bit_compute_dtype": "bf16"}',
                           'bnb_4bit_compute_dtype must be one of bfloat16, float16, float32, got "bf16"'),
                          ('{"load_in_8bit": true}', 'load_in_8bit is not supported; use "load_in_4bit": true'),
                          ('{"load_in_4bit": true, "bnb_4bit_compute_dtype": ["bf16"]}',  # unhashable: a TypeError
                           'bnb_4bit_compute_dtype must be one of bfloat16, float16, float32, got ["bf16"]'),
                          ('{"load_in_4bit": true, "quant_method": "bnb"}', "unknown key(s) 'quant_method'")):
        quant.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}: lora.adapter_path {re.escape(str(adapter))}: "
                                              rf"{re.escape(str(quant))}:? {re.escape(problem)}"):
            load_config(cfg)
        with pytest.raises(demo.DemoError, match=rf"^--adapter {re.escape(str(adapter))}: {re.escape(str(quant))}:? "
                                                 rf"{re.escape(problem)}"):
            demo.with_adapter(model, adapter)
    quant.unlink()
    weights = adapter / "adapter_model.safetensors"
    whole = weights.read_bytes()
    for damaged in (whole[:len(whole) // 2], whole[:4], b""):
        weights.write_bytes(damaged)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}: {re.escape(str(weights))}: unreadable, the "
                                              r"file is corrupt or truncated \(.+\)$"):
            load_config(cfg)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(weights))}: unreadable"):
            demo.load_adapter_strictly(model, adapter)
    weights.write_bytes(whole)
    fresh = lambda: get_family("llama").hf_model_class.from_pretrained(str(ops_model / "hf"))  # noqa: E731
    get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "bin"), safe_serialization=False)  # adapter_model.bin, as older peft saved: still loads
    assert isinstance(demo.load_adapter_strictly(fresh(), tmp_path / "bin"), PeftModel)
    for not_an_object in ("[]", "null", '"x"'):
        (adapter / "adapter_config.json").write_text(not_an_object)
        with pytest.raises(ConfigError, match=rf"adapter_config.json holds {re.escape(not_an_object)}, not an object"):
            load_config(cfg)


def test_an_adapter_of_other_target_modules_is_refused_before_the_model_loads(tmp_path):
    """An adapter of q_proj + k_proj with target_modules [q_proj] failed only after every rank had loaded its layers
    (a k_proj tensor that fits no adapter); [q, k, v] silently started v_proj's adapters fresh."""
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    for targets in (["q_proj"], ["q_proj", "k_proj", "v_proj"]):
        section = {"r": 4, "alpha": 8, "target_modules": targets, "adapter_path": str(tmp_path)}
        with pytest.raises(ValueError, match=r"the adapter adapts \['k_proj', 'q_proj'\]; lora.target_modules says"):
            parse_lora(section, get_family("llama"))
    parse_lora({**section, "target_modules": ["k_proj", "q_proj"]}, get_family("llama"))


@pytest.mark.parametrize("family, dotted, leaves", [
    ("llama", ["self_attn.q_proj", "mlp.down_proj", "model.layers.self_attn.v_proj"], None),  # the last: no module's
    ("llama", ["self_attn.q_proj", "mlp.down_proj", "q_proj"], ("q_proj", "down_proj")),
    ("bloom", ["self_attention.query_key_value", "mlp.dense_4h_to_h"], ("query_key_value", "dense_4h_to_h")),
    ("llama", ["layers.0.self_attn.q_proj"], None),  # one block's: the pipeline adapts every block
])
def test_target_modules_take_peft_s_dotted_names(family, dotted, leaves):
    """peft matches a target name as a suffix of module paths: "self_attn.q_proj" adapts what "q_proj" does, so the
    config takes it as that block linear (it was refused); a name no block module ends with is refused naming it."""
    section = {"r": 4, "target_modules": dotted}
    if leaves is None:
        with pytest.raises(ValueError, match=rf"^lora.target_modules: '{re.escape(dotted[-1])}' not in a {family} block"):
            parse_lora(section, get_family(family))
        return
    assert parse_lora(section, get_family(family)).target_modules == leaves


def test_lora_on_a_model_without_decoder_blocks_is_refused():
    """A 0-layer model has no linear layer LoRA adapts: refused at load (it trained nothing, grad norm 0, and saved)."""
    with pytest.raises(ValueError, match=r"^lora: the model has no decoder blocks \(num_hidden_layers 0\): LoRA adapts"):
        parse_lora({"r": 4}, get_family("llama"), tiny_config("llama", "gqa_tied", num_hidden_layers=0))


@pytest.mark.parametrize("family, name, save, what", [
    ("llama", "gqa_tied", "lm_head", "lm_head, the tied embedding/LM head, which peft would untie"),
    ("bloom", "tied", "word_embeddings", "transformer.word_embeddings, the tied embedding/LM head"),
    # not tied itself (peft trains it and keeps the tie), but it sits in the pipeline's tied embedding module
    ("bloom", "tied", "word_embeddings_layernorm", "transformer.word_embeddings_layernorm, in the pipeline's tied "
                                                   "embedding module"),
], ids=["llama-lm_head", "bloom-embedding", "bloom-embedding-layernorm"])
def test_modules_to_save_in_a_tied_embedding_is_refused_naming_why(family, name, save, what):
    config = tiny_config(family, name)
    with pytest.raises(ValueError, match=re.escape(f"lora.modules_to_save: {save!r} names {what}")):
        parse_lora({"r": 4, "target_modules": sorted(lora_config(family).target_modules)[:1], "modules_to_save": [save]},
                   get_family(family), config)


@pytest.mark.parametrize("components", [True, False])
def test_modules_to_save_are_matched_by_the_installed_pefts_rule(monkeypatch, components):
    """peft 0.22 matches a modules_to_save entry to whole name components ("norm": `model.norm`), earlier peft to any
    ending (every block's `input_layernorm` too): training follows the installed peft, so what it trains whole is
    what peft loads from the export."""
    from models import lora

    fam, config = get_family("llama"), tiny_config("llama", "mha_bias_untied")
    monkeypatch.setattr(lora, "_peft_matches_components", lambda: components)
    settings = parse_lora({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["norm"]}, fam, config)
    norms = {k for k in fam.hf_model_class(config).state_dict() if "norm" in k}
    assert {k for k in norms if settings.saves(k)} == ({"model.norm.weight"} if components else norms)


@pytest.mark.parametrize("family, name, targets, saves", [
    ("llama", "mha_bias_untied", ["q_proj", "v_proj"], ["mlp"]),  # a parent module: every block's MLP
    ("llama", "mha_bias_untied", ["q_proj", "v_proj"], ["layers.1.mlp.down_proj"]),  # one block's (was: block 0 only)
    ("llama", "mha_bias_untied", ["q_proj"], ["norm"]),
    ("bloom", "untied", ["query_key_value"], ["mlp"]),
])
def test_modules_to_save_trains_what_peft_trains_whole(family, name, targets, saves):
    """peft trains whole every module whose name ends with an entry, parents included ("mlp", "layers.1.mlp..."):
    such names were refused as naming no module (only leaves of block 0 were candidates)."""
    import warnings

    fam, config = get_family(family), tiny_config(family, name)
    settings = parse_lora({"r": 4, "target_modules": targets, "modules_to_save": saves}, fam, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fam.hf_model_class(config)
        ours = {k for k in model.state_dict() if settings.saves(k)}
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=saves))
    whole = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
             for n, p in peft.named_parameters() if p.requires_grad and "lora_" not in n}
    assert ours == whole and ours, (ours ^ whole)
    with pytest.raises(ValueError, match="which lora.target_modules adapts"):  # a parent of an adapted module
        parse_lora({"r": 4, "target_modules": targets, "modules_to_save": ["h.0" if family == "bloom" else "layers.0"]},
                   fam, config)
