"""RunDirectory._resume on a plain DeepSpeed engine (in process, no launcher): a resumed run continues every kind of
LR scheduler bit-exactly (lr, cycled momentum, weights), and says how the lr moved when the schedule changed; what a
resume reads of a checkpoint (its state once, every file it loads present) and of model_path (its config.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.checkpoint import RunState, tag_of
from training.config import ConfigError
from training.optim import param_groups
from training.resume import MODEL_CONFIG_FILE, RUN_CONFIG_FILE, model_config_problem
from training.rundir import RunDirectory
from training.schedule import LrSchedule, build_lr_scheduler

LR = 1e-3
BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "torch_adam": True}}}
COSINE = {"type": "cosine", "warmup_steps": 2}


class Run(RunDirectory):
    """What `RunDirectory._resume` reads of a Trainer, around a one-process engine (parts: its layer bounds)."""

    def __init__(self, engine, raw: dict, parts: list[int]):
        self.engine, self.lora, self.rank, self.world, self.pp_size, self.dp_size = engine, None, 0, 1, 1, 1
        self.model, self.plan = SimpleNamespace(parts=parts), SimpleNamespace(global_batch=2, steps_per_epoch=8)
        self.cfg = SimpleNamespace(path="cfg.json", raw=raw, allow_data_change_on_resume=False, eval_split_ratio=None,
                                   keep_best=None, early_stopping_patience=None, save_path=None, resume="auto",
                                   max_steps=raw.get("max_steps"), n_epoches=raw.get("n_epoches", 1))
        self.data_fingerprint = self.eval_fingerprint = None
        self.total_steps = raw.get("max_steps") or raw.get("n_epoches", 1) * self.plan.steps_per_epoch
        self.changes_lr = self.changes_length = self.schedule_switched = False
        self.lines: list[str] = []

    def log(self, msg: str) -> None:
        self.lines.append(msg)


def engine_for(ds, raw: dict):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    schedule = raw.get("lr_schedule")
    sched = (lambda opt: build_lr_scheduler(opt, LrSchedule(**schedule), raw["max_steps"])) if schedule else None
    config = {**BASE, **{k: raw[k] for k in ("scheduler", "zero_optimization") if k in raw}}
    return ds.initialize(model=model, config=config, model_parameters=param_groups(model, 0.1), lr_scheduler=sched)[0]


def train(engine, steps: range) -> list[tuple]:
    """(lr, betas) of each update, read before it."""
    seen = []
    for step in steps:
        group = engine.optimizer.param_groups[0]
        seen.append((group["lr"], tuple(group.get("betas", ()))))
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return seen


def save_at(engine, raw: dict, save: Path, step: int) -> Path:
    """Checkpoint `engine` as the trainer saves step `step` of a run of `raw` (no manifest); its tag directory."""
    engine.save_checkpoint(str(save), tag=tag_of(step))
    RunState(step=step, pipe=1, data=1, parts=[0, 1], global_batch=2).write(save / tag_of(step))
    (save / tag_of(step) / RUN_CONFIG_FILE).write_text(json.dumps(raw))
    return save / tag_of(step)


def save_at_3(ds, raw: dict, save: Path) -> tuple[list[tuple], dict]:
    """A run of `raw` checkpointed after 3 updates, as the trainer saves it; (lr, betas) of updates 4..6 and the
    weights after them."""
    engine = engine_for(ds, raw)
    train(engine, range(3))
    save_at(engine, raw, save, 3)
    return train(engine, range(3, 6)), {k: v.clone() for k, v in engine.module.state_dict().items()}


def resume(ds, raw: dict, save: Path, parts: list[int]) -> tuple[Run, list[tuple], dict]:
    run = Run(engine_for(ds, raw), raw, parts)
    run._resume(save / "global_step3")
    return run, train(run.engine, range(3, 6)), run.engine.module.state_dict()


@pytest.mark.parametrize("scheduler", [
    {"type": "ExponentialLR", "params": {"gamma": 0.5}},  # torch's, chained: lr_k = lr_(k-1) x gamma
    {"type": "StepLR", "params": {"step_size": 2, "gamma": 0.5}},
    {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 3e-3, "cycle_first_step_size": 2,
                                    "cycle_min_mom": 0.5, "cycle_max_mom": 0.99}},  # DeepSpeed's, cycles beta1 too
    {"type": "OneCycleLR", "params": {"max_lr": 3e-3, "total_steps": 8}},  # torch's, cycles beta1 too
], ids=lambda s: s["type"])
def test_a_resumed_scheduler_continues_bit_exactly(ds, tmp_path, scheduler):
    """Resumed after 3 updates, with no config change: the lr and beta1 of the next updates are the uninterrupted
    run's, and so are the weights; with another topology (optimizer state reset) the lr and beta1 still are."""
    raw = {"max_steps": 6, "scheduler": scheduler}
    want, weights = save_at_3(ds, raw, tmp_path)
    assert len({lr for lr, _ in want}) > 1 or scheduler["type"] == "StepLR"  # a schedule that moves
    run, got, resumed = resume(ds, raw, tmp_path, [0, 1])
    assert got == want and resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert not run.lines[:-1] and run.lines[-1] == f"resumed from {tmp_path / 'global_step3'} at step 3"
    _, got, _ = resume(ds, raw, tmp_path, [0, 2])  # the checkpoint's parts differ: optimizer state not loaded
    assert got == want


def test_a_resume_with_other_zero_buckets_continues_bit_exactly(ds, tmp_path):
    """ZeRO-1's communication keys (README: applied on resume) change nothing its optimizer state holds: a run
    resumed with other bucket sizes and overlap_comm makes the uninterrupted run's updates, bit for bit."""
    want, weights = save_at_3(ds, {"max_steps": 6, "zero_optimization": {"stage": 1}}, tmp_path)
    other = {"max_steps": 6, "zero_optimization": {"stage": 1, "reduce_bucket_size": 16, "allgather_bucket_size": 16,
                                                   "overlap_comm": True, "contiguous_gradients": False}}
    run, got, resumed = resume(ds, other, tmp_path, [0, 1])
    assert got == want and all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert "  zero_optimization.reduce_bucket_size: 500000000 -> 16 (applied: gradient communication only: takes " \
        "effect from this step (the optimizer state's partition does not depend on it))" in run.lines, run.lines


def test_another_kind_of_scheduler_starts_where_a_run_under_it_would_be(ds, tmp_path):
    """The project's schedule -> torch's ExponentialLR (its saved state does not fit): the new scheduler is stepped to
    the checkpoint's step, from the values it was built with (its lr is chained on the previous one)."""
    save_at_3(ds, {"max_steps": 6, "lr_schedule": COSINE}, tmp_path)
    raw = {"max_steps": 6, "scheduler": {"type": "ExponentialLR", "params": {"gamma": 0.5}}}
    want, _ = save_at_3(ds, raw, tmp_path / "ref")
    run, got, _ = resume(ds, raw, tmp_path, [0, 1])
    assert run.schedule_switched and [lr for lr, _ in got] == [lr for lr, _ in want] == [LR * 0.5**k for k in (3, 4, 5)]


def test_a_longer_run_says_how_its_lr_moves(ds, tmp_path):
    """max_steps raised under the cosine schedule: the curve over the new length puts the next update's lr elsewhere;
    the resume says where it was and where it is."""
    save_at_3(ds, {"max_steps": 6, "lr_schedule": COSINE}, tmp_path)
    run, got, _ = resume(ds, {"max_steps": 12, "lr_schedule": COSINE}, tmp_path, [0, 1])
    was, now = (LR * LrSchedule(**COSINE).factor(3, total) for total in (6, 12))
    assert got[0][0] == now != was
    assert f"optimizer settings from the config in force: lr of the next update (step 4) {was:.6g} as saved -> " \
        f"{now:.6g} now" in run.lines


# ---------------------------------------------------------------------------------------------- LoRA settings on resume


def lora_run(tmp_path: Path, ops_model: Path, lora: dict) -> tuple[Path, dict]:
    """A config of `lora` whose save_path holds a LoRA checkpoint of it, as the trainer writes one (the files
    load_config reads); returns the config file and its raw content."""
    from models import get_family
    from models.lora import LORA_FILE, lora_info, parse_lora
    from tests.helpers import ops_config

    cfg = ops_config(tmp_path, ops_model, lora=lora)
    raw = json.loads(cfg.read_text())
    tag = tmp_path / "out" / "global_step2"
    tag.mkdir(parents=True)
    RunState(step=2, pipe=2, data=1, parts=[0, 2, 4], global_batch=4).write(tag)
    (tag / RUN_CONFIG_FILE).write_text(json.dumps(raw))
    (tag / LORA_FILE).write_text(lora_info(parse_lora(lora, get_family("llama")), raw["model_path"]))
    (tmp_path / "out" / "latest").write_text("global_step2")
    return cfg, raw


def test_a_lora_resume_needs_no_adapter_path_a_fresh_start_does(tmp_path, ops_model):
    """lora.adapter_path has no effect on resume (the adapters come from the checkpoint): a moved or deleted adapter
    dir was refused; a fresh start still checks it."""
    from peft import LoraConfig, get_peft_model

    from models import get_family
    from training.config import ConfigError, load_config

    adapter = tmp_path / "adapter"
    get_peft_model(get_family("llama").hf_model_class.from_pretrained(str(ops_model / "hf")),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(adapter))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "adapter_path": str(adapter)}
    cfg, raw = lora_run(tmp_path, ops_model, lora)
    adapter.rename(tmp_path / "moved")
    resumed = load_config(cfg)
    assert resumed.lora == {k: v for k, v in lora.items() if k != "adapter_path"}  # the trainer loads no adapter dir
    assert resumed.raw == raw  # what its checkpoints record as the run's config
    fresh = tmp_path / "fresh.json"
    for over in ({"save_path": str(tmp_path / "new")}, {"resume": False, "overwrite_save_path": True}):
        fresh.write_text(json.dumps({**raw, **over}))
        with pytest.raises(ConfigError, match=f"^{fresh}: lora.adapter_path {adapter}: no adapter_config.json"):
            load_config(fresh)


def test_lora_modules_in_another_order_resume(tmp_path, ops_model):
    """lora.target_modules and modules_to_save name sets of modules (as peft reads them): the same ones in another
    order were refused on resume."""
    from training.config import ConfigError, load_config

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["input_layernorm", "post_attention_layernorm"]}
    cfg, raw = lora_run(tmp_path, ops_model, lora)
    cfg.write_text(json.dumps({**raw, "lora": {**lora, "target_modules": ["v_proj", "q_proj", "v_proj"],
                                               "modules_to_save": ["post_attention_layernorm", "input_layernorm"]}}))
    load_config(cfg)
    cfg.write_text(json.dumps({**raw, "lora": {**lora, "target_modules": ["v_proj", "k_proj"]}}))
    with pytest.raises(ConfigError, match=r"lora.target_modules is \["):  # other modules still are
        load_config(cfg)


def test_an_allowed_data_change_since_a_checkpoint_without_a_fingerprint_is_a_warning(ds, tmp_path):
    """With no fingerprint of its rows in the checkpoint (an older version's), a data key is all there is to judge
    by: under allow_data_change_on_resume the run goes on with the warning README promises."""
    raw = {"max_steps": 6, "lr_schedule": COSINE, "data_path": "a.jsonl"}
    save_at_3(ds, raw, tmp_path)  # (its RunState has no data_fingerprint)
    run = Run(engine_for(ds, raw), {**raw, "data_path": "b.jsonl"}, [0, 1])
    run.cfg.allow_data_change_on_resume = True
    run._resume(tmp_path / "global_step3")
    assert 'warning: data_path changed ("a.jsonl" -> "b.jsonl"): the data order continues at this step\'s position, ' \
           "not sample-exact (allow_data_change_on_resume)" in run.lines, run.lines


def test_an_allowed_global_batch_change_says_where_the_data_continues(ds, tmp_path):
    """The warning names the samples skipped (or repeated) in the epoch: the position is the step's."""
    from training.batches import BatchPlan

    raw = {"max_steps": 6, "lr_schedule": COSINE}
    save_at_3(ds, raw, tmp_path)  # global batch 2
    run = Run(engine_for(ds, raw), raw, [0, 1])
    run.plan, run.unit = BatchPlan(num_samples=16, micro_batch=4, grad_accum=1, dp_size=1, seed=0), "sample"
    run.cfg.allow_data_change_on_resume = True
    run._resume(tmp_path / "global_step3")
    assert "warning: the global batch changed (2 -> 4 samples; step 4 starts at sample 12 of epoch 0's order; the " \
           "checkpoint's batches had reached sample 6 of epoch 0's: 6 samples skipped in this epoch): the data order " \
           "continues at this step's position, not sample-exact (allow_data_change_on_resume)" in run.lines, run.lines


# ---------------------------------------------------------------------------------------------- what a resume reads


def test_a_checkpoint_state_is_read_once_per_run(ds, tmp_path, caplog):
    """The data check before the model is built and the resume itself read the checkpoint's trainer_state.json once:
    a key this version does not know is warned about once, not twice; a `latest` that does not load is passed over
    for the earlier checkpoint as before, each state warned about once."""
    raw = {"max_steps": 6, "lr_schedule": COSINE}
    save_at_3(ds, raw, tmp_path)
    shutil.copytree(tmp_path / "global_step3", tmp_path / "global_step6")
    for step in (3, 6):
        f = tmp_path / tag_of(step) / "trainer_state.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "step": step, "from_the_future": 1}))
    (tmp_path / "latest").write_text("global_step3")
    run = Run(engine_for(ds, raw), raw, [0, 1])
    run.cfg.save_path = str(tmp_path)
    run.refuse_data_changes()
    run._resume(tmp_path / "global_step3")
    assert caplog.text.count("keys this version does not know") == 1 and run.state.step == 3

    caplog.clear()
    (tmp_path / "latest").write_text("global_step6")
    bad = tmp_path / "global_step6" / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"\0" * bad.stat().st_size)  # same size: only loading it can tell
    run = Run(engine_for(ds, raw), raw, [0, 1])
    run.cfg.save_path = str(tmp_path)
    run.refuse_data_changes()
    run._resume(tmp_path / "global_step6")
    assert f"resuming from the previous intact checkpoint {tmp_path / 'global_step3'} instead" in run.lines[0]
    assert run.state.step == 3 and caplog.text.count("keys this version does not know") == 2
    assert all(caplog.text.count(f"{tmp_path / tag_of(s) / 'trainer_state.json'}: keys") == 1 for s in (3, 6))


def test_a_checkpoint_without_a_manifest_missing_a_file_is_passed_over(ds, tmp_path):
    """A checkpoint of an older version (no manifest.json) that lost a file DeepSpeed loads (here a ZeRO optimizer
    state) is passed over for the previous intact one, as a damaged file is, not a traceback inside DeepSpeed's
    load; with no intact one left, one line names the checkpoint and the file."""
    raw = {"max_steps": 9, "lr_schedule": COSINE, "zero_optimization": {"stage": 1}}
    engine = engine_for(ds, raw)
    for step in (3, 6):
        train(engine, range(step - 3, step))
        save_at(engine, raw, tmp_path, step)
    (tmp_path / "latest").write_text("global_step6")
    optim = tmp_path / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.unlink()
    run = Run(engine_for(ds, raw), raw, [0, 1])
    run._resume(tmp_path / "global_step6")
    assert run.lines[0] == (f"checkpoint {tmp_path / 'global_step6'} cannot be loaded (rank 0: {optim.name} is missing); "
                            f"resuming from the previous intact checkpoint {tmp_path / 'global_step3'} instead "
                            f"({tmp_path / 'global_step6'} is left in place)")
    assert run.state.step == 3

    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^cfg.json: checkpoint {tmp_path / 'global_step3'} cannot be loaded "
                                          r"\(rank 0: mp_rank_00_model_states.pt is missing\) and no earlier "
                                          "checkpoint is intact; start a new run"):
        Run(engine_for(ds, raw), raw, [0, 1])._resume(tmp_path / "global_step3")


def test_a_model_config_section_set_from_null_is_one_key(tmp_path):
    """A config.json key that goes from null to a section (or back) is named once, with the section whole; a change
    inside a section that both sides have names the key inside it."""
    from tests.helpers import tiny_config

    ckpt, model = tmp_path / "ckpt", tmp_path / "model"
    ckpt.mkdir()
    tiny_config("llama", "gqa_tied").save_pretrained(model)
    base = json.loads((model / "config.json").read_text())
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    for was, now, said in [
        ({**base, "quantization_config": None}, {**base, "quantization_config": quant},
         f"quantization_config null -> {json.dumps(quant)}; "),
        ({**base, "quantization_config": quant}, {**base, "quantization_config": None},
         f"quantization_config {json.dumps(quant)} -> null; "),
        # (a model_type transformers does not know: compared as written)
        ({"model_type": "other", "rope_scaling": None}, {"model_type": "other", "rope_scaling": {"type": "linear"}},
         'rope_scaling null -> {"type": "linear"}; '),
        ({"model_type": "other", "rope_scaling": {"type": "linear", "factor": 4.0}},
         {"model_type": "other", "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.factor 4.0 -> 2.0; "),
    ]:
        (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(was))
        (model / "config.json").write_text(json.dumps(now))
        problem = model_config_problem(ckpt, str(model))
        assert f"trained with ({MODEL_CONFIG_FILE}): {said}the checkpoint's weights" in problem, problem


def test_a_pipeline_checkpoint_missing_a_layer_file_is_one_line(ds, tmp_path):
    """A resume checks the files DeepSpeed's pipeline save wrote (a layer file per layer that owns weights, none for
    the tied head; the model states of each stage; each data-parallel rank's ZeRO state) before DeepSpeed's load: a
    manifest-less checkpoint that lost a layer file, with no earlier one, is one line naming it, not a traceback."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from models import PipelineModel, causal_lm_loss, get_family, plan_stages
    from tests.helpers import tiny_config

    fam = get_family("llama")
    config = fam.prepare_config(tiny_config("llama", "gqa_tied"))
    model = PipelineModel(fam.layer_specs(config), lambda n: plan_stages(fam.unit_sizes(config), fam.unit_costs(config),
                          n, None), ProcessTopology(axes=["pipe", "data"], dims=[1, 1]), loss_fn=causal_lm_loss)
    raw = {**BASE, "zero_optimization": {"stage": 1}}
    engine = ds.initialize(model=model, config=raw, model_parameters=list(model.parameters()))[0]
    engine.save_checkpoint(str(tmp_path), tag="global_step2")
    RunState(step=2, pipe=1, data=1, parts=list(model.parts), global_batch=2).write(tmp_path / "global_step2")
    run = Run(engine, raw, list(model.parts))
    run.model = model
    written = sorted(f.name for f in (tmp_path / "global_step2").glob("*.pt"))
    assert sorted(run._needed_files(tmp_path / "global_step2")) == written and "layer_05-model_states.pt" not in written
    (tmp_path / "global_step2" / "layer_02-model_states.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^cfg.json: checkpoint {tmp_path / 'global_step2'} cannot be loaded "
                                          r"\(rank 0: layer_02-model_states.pt is missing\) and no earlier checkpoint "
                                          "is intact; "):
        run._resume(tmp_path / "global_step2")


def test_every_template_setting_changes_the_samples_on_resume():
    """The resume rules list the template settings by hand: a TemplateSettings field added without its SAMPLES rule
    would be "applied" on resume, changing the trained tokens under a run that says nothing."""
    from dataclasses import fields

    from data.templates import TemplateSettings
    from training.config_diff import RESUME_RULES, SAMPLES

    kinds = {key: kind for key, kind, _ in RESUME_RULES}
    assert {f.name: kinds.get(f.name) for f in fields(TemplateSettings)} == {f.name: SAMPLES for f in fields(TemplateSettings)}


def test_a_finished_run_continues_only_when_its_length_was_raised():
    """resume.course, with the checkpoint run's length from the config changes since it (length_before), on a run
    early stopping ended at step 3 of 8 and on one that ran its 8 steps. An edit of max_steps or n_epoches that left
    the length (n_epoches beside max_steps) or lowered it above the step continued the first (saying its length was
    raised); only a longer length continues a finished run, and a lower one ends an unfinished run there."""
    from training.config_diff import config_changes
    from training.resume import course, knob, length_before

    def go(step: int, old: dict, new: dict, epoch: int = 4, **state) -> tuple[str | None, RunState]:
        st = RunState(step, 1, 1, [1], 4, evals=[(1, 2.0), (2, 1.0), (3, 1.5)][:step], **state)
        cfg = SimpleNamespace(max_steps=new.get("max_steps"), n_epoches=new.get("n_epoches", 1))
        total = cfg.max_steps or cfg.n_epoches * epoch  # (4 steps an epoch)
        return course(st, total, length_before(st, config_changes(old, new), cfg, epoch), 1, knob(cfg)), st

    stopped = {"finished": True, "patience_ended": True}
    for new in ({"max_steps": 8, "n_epoches": 5}, {"max_steps": 5}, {"max_steps": 8}):
        line, st = go(3, {"max_steps": 8}, new, **stopped)
        assert line.startswith("nothing to do: this run finished at step 3 (early stopping ended it after 1 "
                               "evaluations") and st.finished, (new, line)
    line, st = go(3, {"max_steps": 8}, {"max_steps": 9}, **stopped)  # longer: it continues (to stop again)
    assert line == "continuing the finished run from step 3 to step 9 (its length was raised)" and not st.finished
    line, st = go(3, {"n_epoches": 2}, {}, **stopped)  # 8 -> 4 steps: still above the step
    assert line.startswith("nothing to do") and st.finished
    for old, new, raise_ in (({"n_epoches": 2}, {"n_epoches": 2, "max_steps": 8}, "max_steps to"),
                             ({"max_steps": 8}, {"n_epoches": 2}, "max_steps or n_epoches")):
        line, st = go(8, old, new, finished=True, patience_ended=False)  # the same 8 steps, written otherwise
        assert line.startswith(f"nothing to do: this run finished at step 8 (raise {raise_}") and st.finished
    line, st = go(8, {"max_steps": 8}, {"n_epoches": 3}, finished=True, patience_ended=False)
    assert line == "continuing the finished run from step 8 to step 12 (its length was raised)" and not st.finished
    line, st = go(3, {"max_steps": 8}, {"max_steps": 3})  # unfinished, at the new length: it ends there
    assert line.startswith("the run is 3 steps long now, and the checkpoint is at step 3: it ends here") and st.cut_short
    assert go(3, {"max_steps": 8}, {"max_steps": 8})[0] is None  # unfinished at its length: it trains on
    # a run that ended at its length was as long as its step, whatever an epoch is now: 2 epochs of 4 steps, 12 steps
    # now with an epoch of 8 (a halved micro-batch, allow_data_change_on_resume) was read as 2 x 8 = 16 long
    line, st = go(8, {"n_epoches": 2}, {"max_steps": 12}, epoch=8, finished=True, patience_ended=False)
    assert line == "continuing the finished run from step 8 to step 12 (its length was raised)"
    line, st = go(3, {"n_epoches": 2}, {"max_steps": 12}, finished=True, patience_ended=True, length=16)  # recorded
    assert line.startswith("nothing to do: this run finished at step 3 (early stopping") and st.finished
    for length in (4, None):  # an n_epoches run after a batch or data change (an epoch of 8 steps now): counted in
        # epochs, its length is not raised (it was taken as 4 steps, raised to 8)
        line, st = go(4, {}, {}, epoch=8, finished=True, patience_ended=False, length=length)
        assert line.startswith("nothing to do: this run finished at step 4 (raise max_steps or n_epoches") and st.finished
    line, st = go(4, {}, {"n_epoches": 2}, epoch=8, finished=True, patience_ended=False, length=4)
    assert line == "continuing the finished run from step 4 to step 16 (its length was raised)"
    line, st = go(3, {"max_steps": 8}, {"max_steps": 2})
    assert line.endswith("it ends here (a longer max_steps later continues it)") and st.cut_short
    line, st = go(2, {"max_steps": 2}, {"max_steps": 2, "n_epoches": 5}, finished=True, patience_ended=False)
    assert line.startswith("nothing to do: this run finished at step 2 (raise max_steps to train further")  # only it
