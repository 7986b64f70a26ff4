"""Training operations under the real deepspeed launcher (2 CPU stages): exact resume after SIGTERM and after
a SIGKILL during a checkpoint write, evaluation against transformers, early stopping, keep_best, bf16.

Uninterrupted and interrupted runs must agree bit for bit (fp32 on CPU is deterministic): per-step losses
after the resume point and every tensor of the final checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from data.collate import collate, pad_id_of
from data.encode import load_dataset
from models import get_family
from models.convert import pp_to_hg
from tests.helpers import errors_of, finish_deepspeed, ops_config, output_of, run_deepspeed, start_deepspeed, workers_of

pytestmark = pytest.mark.distributed

def metrics_of(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def losses_of(save: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics_of(save) if "loss" in m}


def checkpoint_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the layer files and of the per-stage states (optimizer moments included)."""
    out = {}
    for f in sorted(tag_dir.glob("*.pt")):
        if f.name.startswith("rng_state"):
            continue
        flat = [("", torch.load(f, weights_only=False))]
        while flat:
            key, obj = flat.pop()
            if isinstance(obj, torch.Tensor):
                out[f"{f.name}:{key}"] = obj
            elif isinstance(obj, dict):
                flat += [(f"{key}.{k}", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple)):
                flat += [(f"{key}.{i}", v) for i, v in enumerate(obj)]
    return out


def wait_for(cond, proc, timeout: float = 300) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended early:\n{output_of(proc)[-4000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def sigterm_at_step_6_then_resume(tmp_path: Path, cfg: Path, step: int = 6, lower_to: int | None = None,
                                  beside: tuple[Path, ...] = ()) -> None:
    """Run `cfg`, preempt every training process with SIGTERM after `step` (6), then start it again to the end.
    A pause after that step's boundary work (PIPEFT_FAULT_PAUSE) gives a known moment to preempt the run. With
    `lower_to`, a resume with that max_steps (below `step`) runs first: it ends at once, and the run is finished.
    `beside`: configs of other runs (another save_path each, e.g. the uninterrupted run to compare with) started
    with the first one and finished (exit 0) before the resume: side by side, as a launch keeps one core idle for
    seconds while its launchers start."""
    others = [start_deepspeed("train_ds.py", ["--config", str(c)]) for c in beside]
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)], env={"PIPEFT_FAULT_PAUSE": f"step:{step}:20"})
    wait_for(lambda: (tmp_path / "out" / "metrics.jsonl").is_file() and step in losses_of(tmp_path / "out"), proc)
    for w in workers_of(proc):  # as a cluster scheduler preempts a job: every training process gets SIGTERM
        w.send_signal(signal.SIGTERM)
    _, out = finish_deepspeed(proc, expect=0)
    assert f"received SIGTERM: saving at step {step} and exiting" in out
    assert (tmp_path / "out" / "latest").read_text() == f"global_step{step}"
    assert sorted(losses_of(tmp_path / "out")) == list(range(1, step + 1))
    for other in others:
        finish_deepspeed(other)
    if lower_to is not None:
        lower = cfg.with_name("lower.json")
        lower.write_text(json.dumps({**json.loads(cfg.read_text()), "max_steps": lower_to}))
        out = run_deepspeed("train_ds.py", ["--config", str(lower)]).stdout
        assert f"the run is {lower_to} steps long now, and the checkpoint is at step {step}: it ends here" in out
        assert sorted(losses_of(tmp_path / "out")) == list(range(1, step + 1))
    proc = run_deepspeed("train_ds.py", ["--config", str(cfg)])
    assert f"resumed from {tmp_path / 'out' / f'global_step{step}'} at step {step}" in proc.stdout
    if lower_to is not None:
        assert f"continuing the finished run from step {step} to step" in proc.stdout


@pytest.mark.parametrize("over", [dict(group_by_length=True, pad_to_multiple_of=8),
                                  dict(packing=True, group_by_length=True, max_seq_len=48)], ids=["grouped", "packed"])
def test_resume_is_bit_exact_with_group_by_length_and_packing(tmp_path_factory, ops_model, over):
    """Length-grouped batches whose row length changes between steps, and packed ones: preempted and resumed,
    the run ends bit-identical to an uninterrupted one. The packed run evaluates too: its eval set packed (and long
    pretrain text split) as the training rows are."""
    full, cut = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut")
    over = dict(save_interval=3, **over)
    if over.get("packing"):  # with a pretrain text of 3 rows (it failed the first evaluation: rows unpacked)
        evals = tmp_path_factory.mktemp("eval") / "eval.jsonl"
        evals.write_text((ops_model / "eval.jsonl").read_text() + json.dumps({"text": " ".join(["data"] * 120)}) + "\n")
        over.update(split_long_pretrain=True, eval_data_path=str(evals), eval_interval=4)
    sigterm_at_step_6_then_resume(cut, ops_config(cut, ops_model, **over), beside=(ops_config(full, ops_model, **over),))
    if not over.get("packing"):
        assert len({m["seq_len"] for m in metrics_of(full / "out")}) > 1  # the engine's activation shapes changed
    assert losses_of(cut / "out") == losses_of(full / "out")
    evals = [[(m["step"], m["eval_loss"]) for m in metrics_of(d / "out") if "eval_loss" in m] for d in (full, cut)]
    assert evals[0] == evals[1] and [s for s, _ in evals[0]] == ([4, 8] if over.get("packing") else [])
    a, b = checkpoint_tensors(full / "out" / "global_step8"), checkpoint_tensors(cut / "out" / "global_step8")
    assert a.keys() == b.keys() and len(a) > 20 and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resume_is_bit_exact(tmp_path, ops_model, ops_uninterrupted):
    """Also through a resume whose max_steps is below the checkpoint's step: that run ends at once, and the next
    one, at the first length again, continues it (it said "nothing to do": the finished run had kept its length)."""
    sigterm_at_step_6_then_resume(tmp_path, ops_config(tmp_path, ops_model, save_interval=3), lower_to=5)
    ref, got = losses_of(ops_uninterrupted), losses_of(tmp_path / "out")
    assert got == ref and list(got) == list(range(1, 9))  # steps 7-8 bit-identical, 1-6 kept from before
    a, b = checkpoint_tensors(ops_uninterrupted / "global_step8"), checkpoint_tensors(tmp_path / "out" / "global_step8")
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_sigkill_during_save_resumes_from_the_previous_checkpoint(tmp_path, ops_model, ops_uninterrupted):
    """The resume reads no layer file of model_path (a full fine-tune's weights are all the checkpoint's): its base
    without them resumes bit-exactly."""
    cfg = ops_config(tmp_path, ops_model, save_interval=3)
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)], env={"PIPEFT_FAULT_PAUSE": "save:6:60"})
    partial = tmp_path / "out" / ".tmp-global_step6"
    wait_for(lambda: partial.is_dir() and len(list(partial.glob("rng_state_rank*.pt"))) == 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launchers and both ranks, mid-save
    proc.wait()
    # the SIGKILLed ranks could not remove DeepSpeed's buffers; a restart on the same port must make new ones, not
    # reuse these (a peer could read the dead run's flags): a marker written into each stays where the run left it
    stale = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"))
    assert len(stale) == 2
    fds = [os.open(p, os.O_RDWR) for p in stale]
    for fd in fds:
        os.pwrite(fd, b"stale buffer....", 0)
    assert (tmp_path / "out" / "latest").read_text() == "global_step3" and partial.is_dir()
    assert not (tmp_path / "out" / "global_step6").exists()
    (tmp_path / "out" / "latest").unlink()  # lost too: the newest complete checkpoint is found and named again
    # the base without its layer files (deleted since the run started): a full fine-tune's resume reads none
    shutil.copytree(ops_model / "pp", tmp_path / "base", ignore=shutil.ignore_patterns("layer_*"))
    cfg = ops_config(tmp_path, ops_model, save_interval=3, model_path=str(tmp_path / "base"))

    _, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(cfg)], port=proc.port))
    proc = SimpleNamespace(stdout=out)
    try:
        assert [os.pread(fd, 16, 0) for fd in fds] == [b"stale buffer...."] * 2
    finally:
        for fd in fds:
            os.close(fd)
    assert f"removed {partial}: a checkpoint that was not completely written" in proc.stdout
    latest = tmp_path / "out" / "latest"
    assert f"resuming from {tmp_path / 'out' / 'global_step3'}, the newest complete checkpoint: {latest} is missing" \
        in proc.stdout and f"{latest} now names global_step3, the checkpoint resumed" in proc.stdout
    assert f"resumed from {tmp_path / 'out' / 'global_step3'} at step 3" in proc.stdout
    assert losses_of(tmp_path / "out") == losses_of(ops_uninterrupted)
    a, b = checkpoint_tensors(ops_uninterrupted / "global_step8"), checkpoint_tensors(tmp_path / "out" / "global_step8")
    assert a.keys() == b.keys() and len(a) > 20 and all(torch.equal(a[k], b[k]) for k in a)
    assert not partial.exists() and sorted(p.name for p in (tmp_path / "out").glob("global_step*")) == [
        "global_step3", "global_step6", "global_step8"]


def test_sigterm_during_a_periodic_save_stops_after_it(tmp_path, ops_model):
    """SIGTERM while the save_interval checkpoint of step 6 is being written: the run stops once it is written,
    without training step 7 and writing a second checkpoint inside the grace period."""
    cfg = ops_config(tmp_path, ops_model, save_interval=3)
    release = tmp_path / "release"
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)], env={"PIPEFT_FAULT_PAUSE": f"save:6:60:{release}"})
    partial = tmp_path / "out" / ".tmp-global_step6"
    wait_for(lambda: partial.is_dir() and len(list(partial.glob("rng_state_rank*.pt"))) == 2, proc)
    for w in workers_of(proc):
        w.send_signal(signal.SIGTERM)
    time.sleep(1)
    release.touch()
    _, out = finish_deepspeed(proc, expect=0)
    assert "received SIGTERM: saving at step 6 and exiting" in out
    assert (tmp_path / "out" / "latest").read_text() == "global_step6"
    assert sorted(losses_of(tmp_path / "out")) == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "out").glob("global_step*")) == ["global_step3", "global_step6"]


def hf_token_mean_loss(model_or_dir, eval_path: Path, tokenizer, seq: int) -> float:
    """transformers' token-mean loss over every sample of `eval_path` (an HF model, or a dir to load one from)."""
    model = model_or_dir
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        get_family(model.config.model_type).prepare_config(model.config)
    ds = load_dataset(str(eval_path), tokenizer, seq, use_cache=False)
    (ids, pos, seg), labels = collate([ds[i] for i in range(len(ds))], seq, pad_id_of(tokenizer))
    with torch.no_grad():  # right padding: the default positions are the samples' own (Bloom takes none)
        logits = model(input_ids=ids, attention_mask=(seg > 0).long()).logits
    target = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100).item()


def test_eval_early_stopping_and_keep_best(tmp_path, ops_model, tokenizer):
    """Eval loss == transformers' token mean on the eval file; a plateau stops the run; keep_best keeps the best."""
    patience, keep = 2, 2
    shutil.copy(ops_model / "eval.jsonl", tmp_path / "eval.jsonl")
    cfg = ops_config(tmp_path, ops_model, max_steps=40, eval_data_path=str(tmp_path / "eval.jsonl"),
                       eval_interval=2, early_stopping_patience=patience, keep_best=keep, keep_last=1,
                       optimizer={"type": "AdamW", "params": {"lr": 3e-2, "weight_decay": 0.0, "torch_adam": True}},
                       lr_schedule={"type": "constant"})
    proc = run_deepspeed("train_ds.py", ["--config", str(cfg)])
    save = tmp_path / "out"
    evals = [(m["step"], m["eval_loss"]) for m in metrics_of(save) if "eval_loss" in m]
    assert [s for s, _ in evals] == list(range(2, 2 * len(evals) + 1, 2))
    best_at = min(range(len(evals)), key=lambda i: evals[i][1])
    assert len(evals) - 1 - best_at == patience and evals[-1][0] < 40, evals  # stopped right at the patience
    assert "early stopping: eval loss has not improved for 2 evaluations" in proc.stdout
    n = len((tmp_path / "eval.jsonl").read_text().splitlines())  # the eval file's own counts, as the training data's
    assert f"eval data: {n} samples ({tmp_path / 'eval.jsonl'}: {n} records -> {n} samples, 0 dropped" in proc.stdout
    assert "c10d::broadcast_" not in proc.stdout  # the tied weights' broadcast is not recorded by autograd
    ranked = sorted(evals, key=lambda e: (e[1], e[0]))
    expected = {f"global_step{s}" for s, _ in ranked[:keep]} | {f"global_step{evals[-1][0]}"}
    assert {p.name for p in save.glob("global_step*")} == expected
    assert (save / "best").read_text() == f"global_step{ranked[0][0]}"

    last_step, last_loss = evals[-1]
    assert f"eval at step {last_step}: loss {last_loss:.4f} | perplexity" in proc.stdout
    pp_to_hg(save / f"global_step{last_step}", tmp_path / "hf")
    ref = hf_token_mean_loss(tmp_path / "hf", ops_model / "eval.jsonl", tokenizer, 64)
    assert last_loss == pytest.approx(ref, rel=1e-5)
    assert sorted(p.name for p in (save / "runs").iterdir()) and any((save / "runs").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "runs"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "memory/peak_gib_stage1"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([loss for _, loss in evals], rel=1e-6)
    state = json.loads((save / f"global_step{last_step}" / "trainer_state.json").read_text())
    assert state["finished"] and state["patience_ended"] and [tuple(e) for e in state["evals"]] == evals

    files = sorted(p.relative_to(save) for p in save.rglob("*"))
    again = run_deepspeed("train_ds.py", ["--config", str(cfg)])  # a finished run is not trained further, and its
    # start builds nothing (no model load, no checkpoint read, no side file or TensorBoard file written)
    assert sorted(p.relative_to(save) for p in save.rglob("*")) == files and "resumed from" not in again.stdout
    assert (f"nothing to do: this run finished at step {last_step} (early stopping ended it after {patience} "
            "evaluations without improvement: raise early_stopping_patience or turn it off to train further") in again.stdout
    assert [(m["step"], m["eval_loss"]) for m in metrics_of(save) if "eval_loss" in m] == evals
    patient = cfg.with_name("patient.json")  # a raised patience continues it (the length alone was not the limit)
    patient.write_text(json.dumps({**json.loads(cfg.read_text()), "early_stopping_patience": patience + 1}))
    more = run_deepspeed("train_ds.py", ["--config", str(patient)])
    assert (f"continuing the run early stopping ended at step {last_step}: early_stopping_patience is {patience + 1} "
            f"now ({patience} evaluations since the best)") in more.stdout
    after = [(m["step"], m["eval_loss"]) for m in metrics_of(save) if "eval_loss" in m]
    assert after[:len(evals)] == evals and after[len(evals)][0] == last_step + 2, after
    last_step = after[-1][0]
    # eval data rewritten under the same path: its losses would not compare with the earlier ones (judged by the
    # eval rows, as the training data are; a moved eval file would be the same eval data)
    (tmp_path / "eval.jsonl").write_text("".join((ops_model / "eval.jsonl").read_text().splitlines(keepends=True)[1:]))
    longer = cfg.with_name("longer.json")
    longer.write_text(json.dumps({**json.loads(cfg.read_text()), "max_steps": 41}))
    _, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(longer)]), expect=2)
    assert errors_of(out) == [f"train_ds.py: error: {longer}: cannot resume {save / f'global_step{last_step}'}: the eval "
                              "samples differ from the checkpoint's (eval data files, tokenizer or data settings): "
                              "keep_best / early_stopping_patience compare every eval loss with the earlier ones, and "
                              "losses on other eval data do not compare; restore the eval data, or start a new run"]
    # without keep_best and patience it is applied, and the earlier losses no longer rank: the best is of the new eval
    # data (the old best stayed the best, and a later keep_best or patience compared with it)
    other = cfg.with_name("other.json")
    other.write_text(json.dumps({**{k: v for k, v in json.loads(cfg.read_text()).items()
                                    if k not in ("keep_best", "early_stopping_patience")}, "max_steps": last_step + 2}))
    proc = run_deepspeed("train_ds.py", ["--config", str(other)])
    state = json.loads((save / f"global_step{last_step + 2}" / "trainer_state.json").read_text())
    assert [s for s, _ in state["evals"]] == [last_step + 2]
    assert f"best eval loss {state['evals'][0][1]:.4f} at step {last_step + 2} (its checkpoint:" in proc.stdout
    assert (f"the eval samples differ from the checkpoint's: later eval losses are on other data; the {len(after)} "
            "earlier ones are not ranked with them") in proc.stdout


def test_bf16_trains_with_fp32_gradient_accumulation(tmp_path, ops_model, ops_uninterrupted):
    """And the lr in metrics.jsonl is the one each update applied, also after a resume that makes the run longer
    under ZeRO (DeepSpeed loads the ZeRO optimizer state, lr included, after the scheduler's). The first step's
    gradient norm is the fp32 run's, within bf16 rounding: the tied head's share of the gradient, computed in the
    loss on the last stage, is kept (DeepSpeed's bf16 optimizer cleared it without immediate_grad_update)."""
    from training.schedule import LrSchedule

    schedule = {"type": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0}
    over = dict(bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"},
                lr_schedule=schedule, save_interval=6)
    for total in (6, 12):  # 6 steps, then the same run made 12 steps long
        cfg = ops_config(tmp_path, ops_model, max_steps=total, **over)
        proc = run_deepspeed("train_ds.py", ["--config", str(cfg)])
    assert "precision: bf16; ZeRO stage 1; gradient accumulation in float32" in proc.stdout, proc.stdout[-3000:]
    assert "DeepSpeed runs it as BF16_Optimizer" in proc.stdout and "resumed from" in proc.stdout
    losses = list(losses_of(tmp_path / "out").values())
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in metrics_of(tmp_path / "out"))
    fp32 = metrics_of(ops_uninterrupted)[0]["grad_norm"]  # the same weights and first batch
    assert metrics_of(tmp_path / "out")[0]["grad_norm"] == pytest.approx(fp32, rel=0.02)
    cosine = LrSchedule("cosine")
    applied = [3e-3 * cosine.factor(k, 6 if k < 6 else 12) for k in range(12)]  # update k+1 applies factor(k)
    assert [m["lr"] for m in metrics_of(tmp_path / "out")] == pytest.approx(applied, rel=1e-9, abs=1e-12)


def test_tied_weights_on_two_stages_train_as_one_with_fp32_accumulation_and_offload(tmp_path, ops_model,
                                                                                     ops_uninterrupted):
    """bf16 with fp32 gradient accumulation and offload_optimizer: DeepSpeed's ZeRO-1 optimizer accumulates into
    `grad_accum`, which its tied-weight all-reduce did not sum, so the embedding and the head (its tied copy on the
    last stage) each took only their own share of the gradient and drifted apart (PipelineModel.reduce_tied_grad_accum).
    The copies stay equal, and the first step's gradient norm is the fp32 run's."""
    over = dict(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}, max_steps=3,
                zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}})
    run_deepspeed("tests/workers/train_tied.py", ["--config", str(ops_config(tmp_path, ops_model, **over)),
                                                  "--out-dir", str(tmp_path)])
    reports = [json.loads((tmp_path / f"tied-rank{r}.json").read_text()) for r in range(2)]
    assert [list(r["tied"].values()) for r in reports] == [[{"ranks": [0, 1], "max_abs_diff": 0.0,
                                                                  "replica_max_abs_diff": 0.0}]] * 2, reports
    got, fp32 = metrics_of(tmp_path / "out"), metrics_of(ops_uninterrupted)
    assert got[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=0.02)  # was 0.78x: the head's share lost


def test_zero_with_an_embedding_only_stage_trains_as_the_reference(tmp_path, ops_model, ops_uninterrupted):
    """ZeRO-1 on 3 stages, the first holding only the embedding: that stage has one parameter group (no norm weight
    or bias), the others two, and DeepSpeed's gradient norm runs collectives per group: every rank hung at the first
    step. The stage gets a placeholder no_decay group (training.optim.even_groups); the losses are the fp32 run's.
    The last stage holds the final norm and the tied head alone: it has no nn.Linear whose weight gradients it could
    defer, and the start line says it defers none (it said 2)."""
    cfg = ops_config(tmp_path, ops_model, max_steps=3, zero_optimization={"stage": 1},
                     model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [3, 1]}, "parts": [1, 3, 1]})
    out = run_deepspeed("train_ds.py", ["--config", str(cfg)], num_procs=3, timeout=300).stdout
    assert re.search(r"\n +0 \| +0\.\.0 +\| +32,768 \(32,768\)", out), out[-3000:]  # the embedding alone
    assert "deferred weight gradients: the last [0, 2, 0] micro-batches per stage" in out, out[-3000:]
    got, ref = losses_of(tmp_path / "out"), losses_of(ops_uninterrupted)
    assert list(got) == [1, 2, 3] and all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in got), (got, ref)
    # not DeepSpeed's zero_to_fp32.py (it fails on a pipeline checkpoint, whose weights are in its layer files); the
    # RNG files hold tensors and plain values only
    assert not list((tmp_path / "out").glob("zero_to_*.py"))
    for rank in range(3):
        torch.load(tmp_path / "out" / "global_step3" / f"rng_state_rank{rank}.pt", weights_only=True)


def test_resume_on_another_topology_loads_weights_and_resets_the_optimizer(tmp_path, ops_model, ops_uninterrupted):
    """New layer bounds: stage 0 holds only the embedding now, so it has one parameter group where the checkpoint's
    stage 0 had two (the saved LR scheduler state, per group, does not fit it: it is started at the step instead)."""
    save = tmp_path / "out"
    shutil.copytree(ops_uninterrupted, save, ignore=shutil.ignore_patterns("global_step3", "global_step8", "runs"))
    (save / "latest").write_text("global_step6")
    cfg = ops_config(tmp_path, ops_model, model_topo={"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]},
                                                      "parts": [1, 4]})
    proc = run_deepspeed("train_ds.py", ["--config", str(cfg)])
    said = [line for line in proc.stdout.splitlines() if line.startswith("resumed from")]
    assert said == [f"resumed from {save / 'global_step6'} at step 6; topology changed (pipe 2 -> 2, data 1 -> 1, layer "
                    "bounds [0, 3, 6] -> [0, 1, 6]): weights, step and LR schedule loaded, optimizer state was reset"]
    got, ref = losses_of(save), losses_of(ops_uninterrupted)
    assert sorted(got) == list(range(1, 9))
    assert got[7] == pytest.approx(ref[7], rel=1e-5)  # step 7's forward pass sees step 6's weights


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, ops_model):
    """A poisoned weight (inf in the final norm) makes every loss NaN: each update is skipped, and after
    max_bad_steps training stops (exit 1) with the last good state saved."""
    pp = tmp_path / "pp"
    shutil.copytree(ops_model / "pp", pp)
    norm = sorted(pp.glob("layer_*-model_states.pt"))[-1]
    state = torch.load(norm, weights_only=True)
    assert list(state) == ["weight"] and state["weight"].dim() == 1  # the final RMSNorm (the head is tied)
    torch.save({"weight": torch.full_like(state["weight"], float("inf"))}, norm)
    cfg = ops_config(tmp_path, ops_model, model_path=str(pp), max_bad_steps=3)
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)])
    code, out = finish_deepspeed(proc, expect=1)
    assert "step 2: non-finite loss or gradient norm (loss nan, grad norm nan): update skipped (2 in a row; stopping at 3)" in out
    error = [line for line in out.splitlines() if line.startswith("train_ds.py: error:")]
    assert len(error) == 1 and "3 consecutive steps had a non-finite loss or gradient norm (last: step 3)" in error[0]
    assert (tmp_path / "out" / "latest").read_text() == "global_step3"
    assert [m.get("skipped") for m in metrics_of(tmp_path / "out")] == [True, True, True]
    for f in pp.glob("layer_*-model_states.pt"):  # no update was applied: the checkpoint holds the initial weights
        a, b = torch.load(f, weights_only=True), torch.load(tmp_path / "out" / "global_step3" / f.name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), f.name
