"""train_ds.py: bad configs (tests/bad_configs.py) and bad data fail with one-line errors before any model exists
or file is written; from_scratch builds the same model as `convert_model.py init` on any partition."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_model
import train_ds
from tests.bad_configs import CASES
from tests.helpers import run_deepspeed, write_config
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def variants(tmp_path_factory, base, sp_tokenizer_dir) -> dict[str, Path]:
    """Copies of `base` with one thing wrong: a tokenizer without EOS, a vocab_size below the tokenizer's, a
    tokenizer without its vocabulary (tokenizer_config.json alone)."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ("no_eos", "small_vocab", "no_vocab"):
        shutil.copytree(base, root / name)
        out[name] = root / name
    for name in ("tokenizer.json", "tokenizer.model"):  # a SentencePiece tokenizer_config.json alone loads
        (root / "no_vocab" / name).unlink(missing_ok=True)
    shutil.copy(sp_tokenizer_dir / "tokenizer_config.json", root / "no_vocab")
    tok_cfg = json.loads((root / "no_eos" / "tokenizer_config.json").read_text())
    tok_cfg.pop("eos_token")
    (root / "no_eos" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = json.loads((root / "small_vocab" / "config.json").read_text())
    (root / "small_vocab" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    return out




@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line(tmp_path, base, variants, capsys, monkeypatch, case):
    over, expected = CASES[case]
    if case == "fp16 on cpu":  # CPUs with AVX512-FP16 / AMX-FP16 do run fp16: the check runs as on one without
        from deepspeed.accelerator import get_accelerator

        monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.chdir(tmp_path)  # an empty save_path or data_cache_dir is the working directory: never the checkout's
    over = {k: str(variants[v[1:]]) if isinstance(v, str) and v.startswith("@") else
            v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in over.items()}
    cfg = write_config(tmp_path, base, **over)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_ds.py: error: {cfg}: {expected}"] or (len(err) == 1 and expected in err[0]), err
    assert not (tmp_path / "out").exists()


def test_a_usage_error_is_an_exit_code_not_systemexit(capsys):
    """train_ds.main returns its exit code (a notebook calling it is not ended by argparse's SystemExit)."""
    assert train_ds.main(["--config"]) == 2
    assert capsys.readouterr().err.startswith("usage: train_ds.py ")
    assert train_ds.main(["--help"]) == 0


def test_gradient_clipping_null_is_refused(tmp_path, base, capsys):
    """A YAML `gradient_clipping:` with no value is null: one line, not a TypeError on every rank after the build."""
    cfg = write_config(tmp_path, base)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "gradient_clipping": None}))
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == (f"train_ds.py: error: {cfg}: 'gradient_clipping' must be a number >= 0 "
                                               "(0: off), got null")


@pytest.mark.parametrize("over", [
    {"scheduler": {"type": "StepLR", "params": {"step_size": 2, "gamma": 0.5}}},  # DeepSpeed falls back to torch's
    {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}}},
    {"optimizer": {"type": "Adam", "legacy_fusion": False, "params": {"lr": 1e-3, "torch_adam": True,
                                                                       "adam_w_mode": False, "decoupled_weight_decay": True,
                                                                       "amsgrad": False, "foreach": True}}},
    {"optimizer": {"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9, "nesterov": True}}},
    {"bf16": {"enabled": True}, "zero_optimization": True},  # DeepSpeed's older form: stage 1
], ids=["torch scheduler", "OneCycle", "Adam with torch.optim.Adam's keys", "SGD", "bf16 with zero_optimization true"])
def test_optimizer_and_scheduler_keys_deepspeed_takes_are_accepted(tmp_path, base, over):
    """The key checks refuse misspellings, not what DeepSpeed (or the torch class it builds) takes."""
    load_config(write_config(tmp_path, base, **over), world_size=1)


def test_zero_optimization_true_is_stage_1_without_deepspeeds_deprecation_dump(tmp_path, base, capfd):
    """DeepSpeed reads a bool zero_optimization with a 40-line deprecation message: the check gives it stage 1."""
    cfg = load_config(write_config(tmp_path, base, bf16={"enabled": True}, zero_optimization=True), world_size=1)
    assert cfg.ds_config["zero_optimization"] == {"stage": 1}
    out = capfd.readouterr()
    assert "deprecated" not in (out.out + out.err).lower(), out


def test_a_used_save_path_needs_resume_or_overwrite(tmp_path, base, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = write_config(tmp_path, base, resume=False)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_ds.py: error: {cfg}: save_path {tmp_path / 'out'} already holds a training run and 'resume' "
                   "is false; set \"resume\": \"auto\" to continue it or \"overwrite_save_path\": true to replace it"]
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing touched


def test_a_model_dir_as_save_path_is_refused_and_left_as_it_was(tmp_path, base, capsys):
    """An HF export, another pipeline dir or an adapter as save_path: training would replace its config.json (a
    Bloom's weights then loaded as the Llama) and delete its tokenizer files. A run stopped before its first step (its
    side files, no checkpoint) is not a model dir: it is started again."""
    hf, pp = tmp_path / "hf", tmp_path / "pp"
    assert convert_model.main(["pp_to_hg", "--input-path", str(base), "--save-path", str(hf)]) == 0
    shutil.copytree(base, pp)
    capsys.readouterr()
    (hf / "tokenizer.model").write_text("another tokenizer's file")  # the base has none: it would be removed
    for save, named in ((hf, "model.safetensors)"), (pp, "layer_00-model_states.pt, layer_01")):
        before = {f: f.read_bytes() for f in save.rglob("*")}
        cfg = write_config(tmp_path, base, save_path=str(save))
        assert train_ds.main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"save_path {save} holds a model, not a training run ({named}" in err[0], err
        assert {f: f.read_bytes() for f in save.rglob("*")} == before
    stopped = tmp_path / "stopped"  # the side files a start writes first: it may stop there (a full disk)
    stopped.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, stopped / name)  # model_path's, copied
    load_config(write_config(tmp_path, base, save_path=str(stopped)))
    (stopped / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run, with an export the user put in it
    (stopped / "model.gguf").write_text("the user's")
    load_config(write_config(tmp_path, base, save_path=str(stopped)))
    with pytest.raises(ConfigError, match="the config is save_path's config.json, which training replaces"):
        load_config(write_config(stopped, base, name="config.json", save_path=str(stopped)))
    (tmp_path / "link.json").symlink_to(stopped / "config.json")  # the same file by another name
    with pytest.raises(ConfigError, match="the config is save_path's config.json, which training replaces"):
        load_config(tmp_path / "link.json")


def test_a_save_path_of_the_users_own_files_is_refused_and_left_as_it_was(tmp_path, base, capsys):
    """save_path "." or a project dir: a start put model_path's config and tokenizer files there, overwriting the user's
    config.json and deleting their LICENSE and vocab.txt (model_path has none), with one line said after the fact.
    Files a start would only add to (the user's main.py) are no obstacle, nor model_path's own copies (a start that
    stopped after its first writes), nor a run's save_path."""
    project = tmp_path / "project"
    project.mkdir()
    mine = {"config.json": '{"editor": 1}', "LICENSE": "MIT", "vocab.txt": "x", "main.py": "code"}
    for name, text in mine.items():
        (project / name).write_text(text)
    cfg = write_config(tmp_path, base, save_path=str(project))
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"train_ds.py: error: {cfg}: save_path {project} holds config.json, vocab.txt, LICENSE and no training run: a "
        "start puts model_path's config and tokenizer files there, replacing these (they are not model_path's) and "
        "removing those model_path lacks; give a new or empty directory (or delete them, if a start stopped before its "
        "first step left them)")
    assert {f.name: f.read_text() for f in project.iterdir()} == mine  # nothing touched
    for name in ("LICENSE", "vocab.txt"):
        (project / name).unlink()
    shutil.copy(base / "config.json", project / "config.json")  # model_path's own: a start replaces it with itself
    load_config(cfg)
    (project / "config.json").unlink()
    (project / "config.json").symlink_to(base / "config.json")  # a link to it: the same
    load_config(cfg)
    (project / "config.json").unlink()
    (project / "config.json").write_text('{"editor": 1}')
    (project / "data_settings.json").write_text("{}")  # an export's file too: no sign of a run
    with pytest.raises(ConfigError, match="holds config.json, data_settings.json and no training run"):
        load_config(cfg)
    (project / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run's save_path: its files are the run's
    load_config(cfg)


RESUME_CASES = {  # name -> (files under save_path, config overrides, expected text)
    "latest names nothing": ({"latest": "global_step9"}, {}, "latest names 'global_step9', which does not exist"),
    "latest names save_path": ({"latest": "\n"}, {}, "latest names '', which is not a checkpoint (global_stepN); point"),
    "latest names a file": ({"latest": "global_step9", "global_step9": ""}, {},
                            "latest names 'global_step9', which is not a directory; point"),
    "old checkpoint": ({"latest": "global_step2", "global_step2/layer_00-model_states.pt": ""}, {},
                       "global_step2 has no trainer_state.json (written by an older version?): it cannot be resumed exactly"),
    "full checkpoint, lora config": ({"latest": "global_step2", "global_step2/trainer_state.json": "{}"},
                                     {"lora": {"r": 4}}, "is a full checkpoint but the config has a 'lora' section"),
    "lora rank changed": ({"latest": "global_step2", "global_step2/trainer_state.json": "{}",
                           "global_step2/lora_config.json": json.dumps({"r": 8, "alpha": 8.0, "dropout": 0.0,
                                                                     "target_modules": ["q_proj"], "base_model_path": "pp"})},
                          {"lora": {"r": 4, "target_modules": ["q_proj"]}}, "lora.r is 4 but the checkpoint"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_problems_are_found_before_training(tmp_path, base, capsys, case):
    files, over, expected = RESUME_CASES[case]
    for name, text in files.items():
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text(text)
    cfg = write_config(tmp_path, base, **over)
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {cfg}: ") and expected in err[0], err


def test_other_eval_data_on_resume_is_refused_where_eval_losses_are_compared(tmp_path, base, capsys):
    """keep_best and early stopping compare each eval loss with the earlier ones: a resume with other eval data
    would rank checkpoints (and stop) by losses of different data. Without them the new eval data is applied."""
    evals = []
    for name in ("a.jsonl", "b.jsonl"):
        evals.append(tmp_path / name)
        evals[-1].write_text(json.dumps({"instruct": "say", "output": name}) + "\n")
    compared = {"eval_interval": 1, "keep_best": 1}
    saved = json.loads(write_config(tmp_path, base, eval_data_path=str(evals[0]), **compared).read_text())
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tag / "run_config.json").write_text(json.dumps(saved))
    (tmp_path / "out" / "latest").write_text("global_step1")
    cfg = write_config(tmp_path, base, eval_data_path=str(evals[1]), **compared)
    load_config(cfg, world_size=1)  # no eval loss in the checkpoint yet: nothing to compare with
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]]}))
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {cfg}: 'eval_data_path' changed since the "
                                               f"checkpoint {tag / 'run_config.json'}") and \
        "keep_best / early_stopping_patience compare every eval loss with the earlier ones" in err[0], err
    # a checkpoint with its eval rows' fingerprint: they are compared once read (test_train_ops), not the path
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]], "eval_fingerprint": "0" * 32}))
    load_config(cfg, world_size=1)
    (tag / "trainer_state.json").write_text(json.dumps({"evals": [[1, 2.5]]}))
    (tag / "run_config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "keep_best"}))
    load_config(write_config(tmp_path, base, eval_data_path=str(evals[1]), eval_interval=1), world_size=1)


def test_a_batch_split_that_keeps_the_global_batch_resumes(tmp_path, base):
    """Twice the replicas and half the accumulation: the checkpoint's global batch, so the same data order (applied);
    another global batch is refused before training."""
    two = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 2]}}}
    saved = json.loads(write_config(tmp_path, base, gradient_accumulation_steps=4).read_text())
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text(json.dumps({"step": 1, "global_batch": 8, "data_fingerprint": "0" * 32}))
    (tag / "run_config.json").write_text(json.dumps(saved))
    (tmp_path / "out" / "latest").write_text("global_step1")
    load_config(write_config(tmp_path, base, gradient_accumulation_steps=2, **two), world_size=2)
    with pytest.raises(ConfigError, match="'gradient_accumulation_steps' changed since the checkpoint .*the global "
                                          "batch changes"):
        load_config(write_config(tmp_path, base, gradient_accumulation_steps=2), world_size=1)


def test_a_full_run_resumes_only_with_the_model_config_it_was_built_with(tmp_path, base):
    """The weights come from the checkpoint, so model_path may move, but not to a config.json that builds another
    model (the checkpoint's model_config.json: config.json without who wrote it and what serving reads): refused before
    training, naming the key. A checkpoint without that record (an older version's) is not checked."""
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    tag = tmp_path / "out" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "latest").write_text("global_step1")
    config = json.loads((base / "config.json").read_text())
    cfg = write_config(tmp_path, base, model_path=str(moved))
    (moved / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    load_config(cfg, world_size=1)  # no record
    from training.resume import model_config

    (tag / "model_config.json").write_text(json.dumps(model_config(base)))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, world_size=1)
    said = str(e.value)
    assert "\n" not in said and said.startswith(f"{cfg}: model_path {moved}: its config.json differs from the model "
                                                f"config the checkpoint {tag} was trained with (model_config.json): "
                                                f"rms_norm_eps {config['rms_norm_eps']} -> 0.001; ") and \
        "restore that config.json" in said
    (moved / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9", "dtype": "float16",
                                                   "eos_token_id": [2, 7], "use_cache": False}))
    load_config(cfg, world_size=1)  # moved, the same model (what serving reads may change)
    rope = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": config["rope_parameters"]["rope_theta"]}
    for same in ({**config, "mlp_bias": False, "rope_scaling": None}, rope):  # defaults written out; 4.x's rope keys
        (moved / "config.json").write_text(json.dumps(same))
        load_config(cfg, world_size=1)  # the model transformers builds is the same


def test_a_model_path_that_is_no_pipeline_model_names_the_way_on(tmp_path, base, capsys):
    """An HF dir (safetensors or .bin weights), a Hub id, a training run's save_path or one of its checkpoints: the
    first mistakes with model_path, each with what to run."""
    hf, bins, save = tmp_path / "hf", tmp_path / "bins", tmp_path / "run"
    assert convert_model.main(["pp_to_hg", "--input-path", str(base), "--save-path", str(hf)]) == 0
    bins.mkdir()
    (bins / "config.json").write_text((hf / "config.json").read_text())
    (bins / "pytorch_model.bin").write_bytes(b"")
    (save / "global_step300").mkdir(parents=True)
    (save / "latest").write_text("global_step300")
    (save / "config.json").write_text((hf / "config.json").read_text())
    spaced = shutil.copytree(hf, tmp_path / "my hf")  # the command shown pastes into a shell as it is
    capsys.readouterr()
    convert = "python convert_model.py"
    ckpt = (f"(a training run's checkpoints: resume that run with its own config, or, to train further from it as a "
            f"new run, export it ({convert} pp_to_hg --input-path ... --save-path HF_DIR), then convert that ({convert} "
            "hg_to_pp --input-path HF_DIR --save-path PP_DIR) and use PP_DIR)")
    for model, says in ((hf, f"has no pipeline layer files (an HF dir? convert it first: {convert} hg_to_pp "
                              f"--input-path {hf} --save-path PP_DIR, then use PP_DIR)"),
                        (bins, "has no pipeline layer files (an HF dir? convert it first"),
                        (spaced, f"has no pipeline layer files (an HF dir? convert it first: {convert} hg_to_pp --input-path '{spaced}' "
                                 "--save-path PP_DIR, then use PP_DIR)"),
                        ("meta-llama/Llama-2-7b-hf", f"is not a directory (a Hub id? convert it first: {convert} hg_to_pp "
                                                     "--input-path meta-llama/Llama-2-7b-hf --save-path DIR, then use DIR)"),
                        (save, f"has no pipeline layer files {ckpt}"),
                        (hf / "config.json", f"is not a directory (a file; model_path is the pipeline dir {convert} "
                                             "hg_to_pp writes)"),
                        ("tests/no_such_model", f"is not a directory (relative to the working directory {Path.cwd()})"),
                        (save / "global_step300", f"has no config.json {ckpt}")):
        cfg = write_config(tmp_path, base, model_path=str(model))
        assert train_ds.main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"model_path {model} {says}" in err and len(err.splitlines()) == 1, err


def test_a_missing_or_damaged_layer_file_of_model_path_is_one_line(tmp_path, base, capsys):
    """A layer file missing, empty or truncated (as an interrupted copy leaves it): refused with the config, before
    the data are read (a truncated one failed once the data were tokenized, in torch's words); one that does not
    load (another layer's tensors): one line naming it once the model is built (its rank's problem is every rank's,
    tests/test_run_faults.py)."""
    model = tmp_path / "pp"
    shutil.copytree(base, model)
    layer = model / "layer_02-model_states.pt"
    body = layer.read_bytes()
    layer.unlink()
    cfg = write_config(tmp_path, base, model_path=str(model))
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train_ds.py: error: {cfg}: model_path: {layer}: missing (block 1): an incomplete copy or conversion of the model"]
    qlora = write_config(tmp_path, base, model_path=str(model), lora={"r": 4}, name="qlora.json",
                         quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    for cut in (b"", body[:1000]):
        for config in (cfg, qlora):
            layer.write_bytes(cut)
            assert train_ds.main(["--config", str(config)]) == 2
            assert capsys.readouterr().err.strip().splitlines() == [
                f"train_ds.py: error: {config}: model_path: {layer}: unreadable, the file is corrupt or truncated "
                f"({len(cut)} bytes, not a torch.save archive; block 1): an incomplete copy or conversion of the model"]
    layer.write_bytes((model / "layer_00-model_states.pt").read_bytes())
    assert train_ds.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    says = "cannot be loaded (RuntimeError: Error(s) in loading state_dict for "
    assert len(err) == 1 and err[0].startswith(f"train_ds.py: error: {layer}: {says}"), err
    assert not (tmp_path / "out" / "latest").exists()


def test_lion_trains_with_the_optimizer_offloaded(tmp_path, base, capsys):
    """DeepSpeed refuses a client optimizer under offload_optimizer unless zero_force_ds_cpu_optimizer is false (a
    traceback on every rank before); lion-pytorch steps the offloaded fp32 weights."""
    lion = {"type": "Lion", "params": {"lr": 1e-4, "use_triton": False}}
    zero = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert train_ds.main(["--config", str(write_config(tmp_path, base, optimizer=lion, zero_optimization=zero))]) == 0
    assert "optimizer: Lion with the torch update" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_fp16_overflows_are_logged_and_stop_only_at_the_minimum_loss_scale(tmp_path, base, capsys):
    """An fp16 overflow is DeepSpeed's dynamic scaling at work: logged, the update skipped, not counted; at the minimum
    loss scale it counts among max_bad_steps, which stop the run with a save (DeepSpeed raised "Current loss scale
    already at minimum" on every rank, nothing saved; the overflows above it were not on the console)."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("this CPU runs no fp16 (AVX512-FP16 / AMX-FP16)")
    fp16 = {"enabled": True, "initial_scale_power": 32, "hysteresis": 1, "min_loss_scale": 2**30}
    cfg = write_config(tmp_path, base, fp16=fp16, zero_optimization={"stage": 1}, max_steps=6, max_bad_steps=2)
    assert train_ds.main(["--config", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("step ") and "skipped" in line] == [
        f"step 1: fp16 gradient overflow: update skipped, loss scale {2**32:g} -> {2**31:g} (DeepSpeed's dynamic loss "
        "scaling)",
        f"step 2: fp16 gradient overflow: update skipped, loss scale {2**31:g} -> {2**30:g} (DeepSpeed's dynamic loss "
        "scaling)",
        f"step 3: non-finite loss or gradient norm (loss {_loss(tmp_path, 3)}, grad norm inf) at the minimum fp16 loss "
        f"scale {2**30:g}: update skipped (1 in a row; stopping at 2)",
        f"step 4: non-finite loss or gradient norm (loss {_loss(tmp_path, 4)}, grad norm inf) at the minimum fp16 loss "
        f"scale {2**30:g}: update skipped (2 in a row; stopping at 2)"], out[-3000:]
    assert "2 consecutive steps had a non-finite loss or gradient norm (last: step 4)" in err and "Traceback" not in err
    assert err.rstrip().endswith("or use bf16 instead of fp16")
    assert f"precision: fp16 (dynamic loss scale, initial {2**32:g}); ZeRO stage 1" in out
    assert (tmp_path / "out" / "latest").read_text() == "global_step4"
    # a fixed loss scale (DeepSpeed's LossScaler: no minimum): trains; one that overflows stops at max_bad_steps
    for scale, code in ((128, 0), (2**40, 1)):
        run = tmp_path / f"fixed{scale}"
        run.mkdir()
        cfg = write_config(run, base, fp16={"enabled": True, "loss_scale": scale}, zero_optimization={"stage": 1},
                           max_steps=3, max_bad_steps=2)
        assert train_ds.main(["--config", str(cfg)]) == code
        out, err = capsys.readouterr()
        assert "Traceback" not in err and (code == 0) == ("finished 3 steps" in out), out[-2000:] + err[-2000:]
        assert f"precision: fp16 (fixed loss scale {scale:g}); ZeRO stage 1" in out  # it said "dynamic"
    assert f"at the fixed fp16 loss scale {2**40:g}: update skipped (2 in a row; stopping at 2)" in out


def _loss(tmp_path: Path, step: int) -> float:
    return next(m["loss"] for m in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
                if m["step"] == step)


def test_bad_records_fail_before_any_model_is_built(tmp_path, base):
    cfg = write_config(tmp_path, base)
    data = tmp_path / "d.jsonl"
    data.write_text(data.read_text() + '{"instruct": "x"}\n{"text": 5}\nnot json\n')
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train_ds.py: error:")]
    assert [e.split(": error: ")[1].split(":")[:2] for e in errors] == [[str(data), "17"], [str(data), "18"], [str(data), "19"]]
    assert "Traceback" not in proc.stderr and "SEED_LAYERS" not in proc.stdout  # no PipelineModule was built
    assert not (tmp_path / "out").exists()


def test_ds_accelerator_cuda_without_a_gpu_is_one_line(tmp_path, base):
    """DS_ACCELERATOR=cuda where this process sees no GPU (a CPU host; CUDA_VISIBLE_DEVICES empty): DeepSpeed's
    import accepts it, then the process group failed with NCCL's traceback (train_ds) or CUDA's (demo); now one line
    each, exit 2, before the data are read. Conversion, which needs no device, still runs (convert's own tests)."""
    cfg = write_config(tmp_path, base)
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": ""}
    procs = {prog: subprocess.Popen([sys.executable, prog, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # side by side: each is mostly imports
             for prog, args in (("train_ds.py", ["--config", str(cfg)]),
                                ("demo.py", ["--model-path", str(base), "--instruct", "hi"]))}
    said = "DS_ACCELERATOR=cuda, but this process sees no cuda device (CUDA_VISIBLE_DEVICES='') (unset DS_ACCELERATOR " \
           "to let DeepSpeed detect this machine's device)"
    for prog, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert err.splitlines()[-1] == f"{prog}: error: {'rank 0: ' if prog == 'train_ds.py' else ''}{said}"
        assert "data:" not in out and "loading" not in err  # neither the records nor the model were read
    assert not (tmp_path / "out").exists()


def test_from_scratch_one_stage_matches_init(tmp_path, base, tokenizer_dir):
    """One stage (tied embedding and head together), fresh weights (model_path holds no layer files): with lr 1e-30 (an lr of 0 is refused; AdamW's
    step of about lr moves no weight by more than 1e-20) the saved checkpoint equals
    `convert_model.py init` with the same seed, layer for layer."""
    tied = tmp_path / "tied"
    (tmp_path / "tied.json").write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2,
                                                    "tie_word_embeddings": True}))
    assert convert_model.main(["init", "--family", "llama", "--config-json", str(tmp_path / "tied.json"), "--tokenizer",
                               str(tokenizer_dir), "--save-path", str(tied), "--seed", "5"]) == 0
    bare = tmp_path / "bare"  # the model without its layer files: the weights can only come from the init
    shutil.copytree(tied, bare, ignore=shutil.ignore_patterns("layer_*"))
    cfg = write_config(tmp_path, bare, from_scratch=True, seed=5,
                       optimizer={"type": "AdamW", "params": {"lr": 1e-30, "weight_decay": 0.0, "torch_adam": True}})
    run_deepspeed("train_ds.py", ["--config", str(cfg)], num_procs=1)
    ckpt = tmp_path / "out" / "global_step2"
    files = sorted(p.name for p in tied.glob("layer_*"))
    assert files == sorted(p.name for p in ckpt.glob("layer_*")) and len(files) == 4  # embed, 2 blocks, norm
    for name in files:
        a, b = torch.load(tied / name, weights_only=True), torch.load(ckpt / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-20) for k in a), name
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)


def test_runs_without_the_launcher_as_one_process(tmp_path, base):
    """`python train_ds.py --config X` is a 1-stage run (no MPI discovery, no leftover shared memory)."""
    cfg = write_config(tmp_path, base)
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = subprocess.run([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: 1 pipeline stages x 1 data-parallel replicas (1 processes)" in proc.stdout
    # the memory rows' terms as the header names them; the units model_topo.parts counts (embedding, 4 blocks, head)
    assert "(weights + grads + optimizer + activations, logits and step buffer, added or max() where they do not " \
        "coexist + overhead)" in proc.stdout and "; 1 micro-batch in flight)" in proc.stdout
    assert "  layers: the stage's layer files; its units (model_topo.parts counts them, the final norm is the head's): " \
        "[6]" in proc.stdout, proc.stdout[:3000]
    assert (tmp_path / "out" / "latest").read_text() == "global_step2"
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= before


def test_optimizer_names_are_deepspeeds():
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as ours_upstream

    from training.optim import DEEPSPEED_OPTIMIZERS

    assert sorted(ours_upstream) == sorted(DEEPSPEED_OPTIMIZERS)


def test_max_positions_follow_rope_scaling():
    from models import get_family
    from tests.helpers import tiny_config

    llama = get_family("llama")
    plain = tiny_config("llama", "gqa_tied", max_position_embeddings=1024)
    assert llama.max_positions(plain) == (1024, "max_position_embeddings")
    linear = tiny_config("llama", "gqa_tied", max_position_embeddings=1024,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert llama.max_positions(linear) == (4096, "linear rope scaling x4 of 1024")
    llama3 = tiny_config("llama", "gqa_llama3_rope")  # factor 8 of an original 16: max_position_embeddings 128 already
    assert llama.max_positions(llama3) == (128, "max_position_embeddings")
    llama32 = tiny_config("llama", "gqa_tied", max_position_embeddings=128,  # Llama-3.2: 8192 x 32, 131072 stated
                          rope_parameters={"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 16,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0})
    assert llama.max_positions(llama32) == (128, "max_position_embeddings")
    yarn = tiny_config("llama", "gqa_tied", max_position_embeddings=128,  # Qwen2.5's: the original is the stated one
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                        "rope_theta": 10000.0})
    assert llama.max_positions(yarn) == (512, "yarn rope scaling x4 of 128")
    assert get_family("bloom").max_positions(tiny_config("bloom", "tied")) == (None, "no position limit")  # ALiBi


def test_a_deepspeed_section_left_empty_in_yaml_is_refused_not_a_traceback():
    """YAML's `pipeline:` with its keys commented out is null, which DeepSpeed iterates (AttributeError on every rank)."""
    from training.compat import unsupported_section_problem

    assert unsupported_section_problem({"pipeline": None}) == "'pipeline' must be an object, got null"
    assert unsupported_section_problem({"torch_autocast": None}) == "'torch_autocast' must be an object, got null"
    assert unsupported_section_problem({"pipeline": {"use_reentrant": True, "pipe_partitioned": True,
                                                     "activation_checkpoint_interval": 0}, "torch_autocast": {}}) is None


def test_a_run_that_fills_save_path_after_the_config_check_is_not_replaced(tmp_path, base, capsys, monkeypatch):
    """"resume": false without overwrite_save_path, the same job submitted twice: the second start waits (records
    checked, nodes joining) while the first runs to its end. The used save_path is refused again under the lock: it
    deleted the first run's checkpoints ("overwrite_save_path: removed ...", a key not set) and trained afresh."""
    from training.runlock import RunLock

    cfg, save, acquire = write_config(tmp_path, base, resume=False), tmp_path / "out", RunLock.acquire

    def meanwhile(self):  # the other run, from its start to its end, before this one takes the lock
        (save / "global_step2").mkdir(parents=True)
        (save / "latest").write_text("global_step2")
        (save / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
        return acquire(self)

    monkeypatch.setattr(RunLock, "acquire", meanwhile)
    assert train_ds.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train_ds.py: error: {cfg}: save_path {save} already holds a training run and 'resume' is false; set "
        "\"resume\": \"auto\" to continue it or \"overwrite_save_path\": true to replace it"]
    assert sorted(p.name for p in save.iterdir()) == ["global_step2", "latest", "metrics.jsonl"]  # the lock released


def test_paths_like_those_refused_but_harmless_are_taken(tmp_path, base):
    """The refusals of a shell variable in a path and of data inside save_path stop at what is harmless: a file
    whose name holds a '$' (it exists: not a variable), a glob under such a dir, a save_path to be made there; data in a subdirectory of save_path that a run does not
    write (save_path/data/); a glob whose '**' would reach save_path only through a hidden directory (glob passes
    over those, as it would over .runs/ here)."""
    write_config(tmp_path, base)  # (its d.jsonl)
    shutil.copy(tmp_path / "d.jsonl", tmp_path / "price$usd.jsonl")
    (tmp_path / "out" / "data").mkdir(parents=True)
    shutil.copy(tmp_path / "d.jsonl", tmp_path / "out" / "data" / "d.jsonl")
    (tmp_path / "sets" / "a").mkdir(parents=True)
    shutil.copy(tmp_path / "d.jsonl", tmp_path / "sets" / "a" / "d.jsonl")
    (tmp_path / "a$HOME" / "deep").mkdir(parents=True)
    shutil.copy(tmp_path / "d.jsonl", tmp_path / "a$HOME" / "deep" / "d.jsonl")
    for over in ({"data_path": str(tmp_path / "price$usd.jsonl")},
                 {"data_path": str(tmp_path / "a$HOME" / "**" / "*.jsonl")}, {"save_path": str(tmp_path / "a$HOME" / "run")},
                 {"data_path": [str(tmp_path / "out" / "data"), str(tmp_path / "out" / "data" / "d.jsonl")]},
                 {"data_path": str(tmp_path / "sets" / "**" / "*.jsonl"), "save_path": str(tmp_path / "sets" / ".runs" / "r1")}):
        load_config(write_config(tmp_path, base, **over), world_size=1)
