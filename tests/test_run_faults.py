"""A run directory nothing can corrupt: a damaged checkpoint passed over, a full disk as one line, the stop of the
`deepspeed` command itself, and the converter's checks (shapes, corrupt headers, leftovers of a killed conversion).

Multi-process parts use the real deepspeed launcher on CPU; the full disk is a real tmpfs mounted for the
test (root), never an injected error."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.convert import hg_to_pp, pp_to_hg
from models.diskspace import tree_size
from models.hf_io import CheckpointError
from models.outdir import atomic_output_dir
from tests.helpers import (
    dead_pid,
    errors_of,
    finish_deepspeed,
    free_port,
    ops_config,
    output_of,
    pythonpath,
    run_deepspeed,
    start_deepspeed,
    workers_of,
)
from tests.test_train_ops import losses_of, wait_for
from training.resume import resume_tag

ROOT = Path(__file__).resolve().parents[1]


def test_a_damaged_checkpoint_is_passed_over(tmp_path, ops_model, ops_uninterrupted):
    """A truncated file (found by the manifest before loading) and a file whose bytes are garbage (found by the
    load itself, on one rank): the run resumes from the previous intact checkpoint, with a line saying so."""
    save = tmp_path / "out"
    shutil.copytree(ops_uninterrupted, save, ignore=shutil.ignore_patterns("runs"))
    layer = sorted((save / "global_step8").glob("layer_*-model_states.pt"))[0]
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    tag, notes = resume_tag(save)
    assert tag == "global_step6" and f"{layer.name} has {len(data) // 2} bytes, {len(data)} were written" in notes[0]

    (save / "latest").write_text("global_step6")
    bad = sorted((save / "global_step6").glob("layer_*-model_states.pt"))[-1]
    bad.write_bytes(b"\0" * bad.stat().st_size)  # same size: only loading it can tell
    # and written with other data (a resume under allow_data_change_on_resume): the checkpoint resumed instead has
    # this run's rows, so the data check before the model is built does not refuse the run for the damaged one's
    state = json.loads((save / "global_step6" / "trainer_state.json").read_text())
    (save / "global_step6" / "trainer_state.json").write_text(json.dumps({**state, "data_fingerprint": "other rows"}))
    out = run_deepspeed("train_ds.py", ["--config", str(ops_config(tmp_path, ops_model, save_interval=3))]).stdout
    assert f"checkpoint {save / 'global_step6'} cannot be loaded (rank " in out
    assert f"resuming from the previous intact checkpoint {save / 'global_step3'} instead" in out
    assert losses_of(save) == losses_of(ops_uninterrupted)  # steps 4-8 again, bit-identical


def test_a_layer_file_of_model_path_that_only_the_last_stage_reads_is_one_line(tmp_path, ops_model):
    """A layer file that does not load (another layer's tensors: a copy mixed up) read by rank 1 alone: every rank
    stops at once with one line naming it (rank 1 had raised a traceback while rank 0 waited in the tied-weight
    broadcast, then died of a closed connection). (A truncated one is refused with the config, before the ranks
    start: tests/test_train_cli.py.)"""
    base = tmp_path / "base"
    shutil.copytree(ops_model / "pp", base / "pp")
    shutil.copy(ops_model / "train.jsonl", base)
    first, *_, last = sorted((base / "pp").glob("layer_*-model_states.pt"))
    shutil.copy(first, last)
    code, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(ops_config(tmp_path, base))]),
                                 expect=2)
    said = errors_of(out)
    assert len(said) == 1 and said[0].startswith(f"train_ds.py: error: {last}: cannot be loaded (RuntimeError: "
                                                 "Error(s) in loading state_dict for "), out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "out" / "latest").exists()


# ------------------------------------------------------------------------------------------ a full disk (conftest's small_disk)


@pytest.mark.distributed
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, ops_model, ops_uninterrupted,
                                                                                small_disk):
    ckpt = tree_size(ops_uninterrupted / "global_step3")
    side = sum(f.stat().st_size for f in ops_uninterrupted.iterdir() if f.is_file())
    disk = small_disk(side + ckpt * 3 // 2 + 256 * 1024)  # room for one checkpoint, not two
    cfg = ops_config(tmp_path, ops_model, save_path=str(disk / "out"), max_steps=4, save_interval=2)
    code, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(cfg)]), expect=1)
    said = errors_of(out)
    assert len(said) == 1 and "Traceback" not in out, out[-4000:]
    assert said[0].startswith(f"train_ds.py: error: saving checkpoint global_step4 in {disk / 'out'}: no space left on "
                              "device (needed about ") and ", free " in said[0]
    assert f"the previous checkpoint {disk / 'out' / 'global_step2'} is intact" in said[0]
    assert (disk / "out" / "latest").read_text() == "global_step2" and resume_tag(disk / "out") == ("global_step2", [])
    assert not list((disk / "out").glob(".tmp-*"))

    filler = disk / "filler"  # the disk as full as the failed save left it
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with pytest.raises(CheckpointError) as e:  # an export onto the full disk: refused before anything is written
        pp_to_hg(disk / "out", disk / "hf")
    assert "no space left on device (needed about" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "out"]
    # a restart onto it: room for the lock and the probes that every node sees save_path (a page each on tmpfs), not
    # for the side files (they were OSError tracebacks on rank 0, a .probe- file left per start)
    before = {f: f.read_bytes() for f in (disk / "out").rglob("*") if f.is_file() and f.name != "metrics.jsonl"}
    os.truncate(filler, filler.stat().st_size - 3 * 4096)
    (disk / "out" / ".probe-0123abcd").touch()  # what a start killed while probing left: swept at the next
    code, out = finish_deepspeed(start_deepspeed("train_ds.py", ["--config", str(cfg)]), expect=1)
    said = errors_of(out)
    assert len(said) == 1 and "Traceback" not in out, out[-4000:]
    assert re.fullmatch(rf"train_ds.py: error: writing tokenizer.json in {disk / 'out'}: no space left on device \(free [^)]+\); "
                        "the run stops before its first step, nothing of it lost: start it again once save_path "
                        "can be written", said[0]), said[0]
    assert not list((disk / "out").glob(".probe-*")) and resume_tag(disk / "out") == ("global_step2", [])
    assert {f: f.read_bytes() for f in before} == before


def test_a_save_path_that_fills_between_saves_is_one_line_at_each_write(ds, small_disk):
    """save_path full after a checkpoint: the metrics line, the end-of-run state update and the lock of a new start
    each stop with one line (they were OSError tracebacks, and the lock's left an empty .run.lock that refused the
    retry for 5 minutes); the checkpoint stays intact."""
    from training.checkpoint import Checkpoints, RunState, SaveFailed, TrainingStopped
    from training.monitor import Monitor
    from training.runlock import LOCK_FILE, LockError, RunLock

    disk = small_disk(2 * 2**20)
    out = disk / "out"
    out.mkdir()
    engine = ds.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})[0]
    ckpts = Checkpoints(out, 0, 1, None)
    state = RunState(step=2, pipe=1, data=1, parts=[0, 1], global_batch=1)
    ckpts.save(engine, state)
    monitor = Monitor(out, 0, 4, 2, 1, report_to="none")
    with open(disk / "filler", "wb", buffering=0) as f:  # the disk fills
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(TrainingStopped, match=rf"^writing {out / 'metrics.jsonl'}: no space left on device \(free .*\); "
                                              "the run stops at step 3, its checkpoints intact: resume with the "
                                              "same command once save_path can be written$"):
        monitor.write({"step": 3, "loss": 1.0})
    with pytest.raises(SaveFailed, match=rf"^saving checkpoint global_step2 in {out}: no space left on device .*; the "
                                         rf"checkpoint {out / 'global_step2'} is intact: free space and resume"):
        ckpts.update_state(RunState(**{**state.__dict__, "finished": True}))
    with pytest.raises(LockError, match=rf"^save_path {out}: writing the lock {out / LOCK_FILE}: no space left on device"):
        RunLock(out).acquire()
    assert not (out / LOCK_FILE).exists()  # no empty lock: the retry once there is room takes it
    (disk / "filler").unlink()
    lock = RunLock(out)
    lock.acquire()
    lock.release()
    assert ckpts.latest() == "global_step2" and resume_tag(out) == ("global_step2", [])


def test_disk_full_while_writing_an_export_is_one_line(small_disk):
    disk = small_disk(64 * 1024)
    with pytest.raises(CheckpointError, match=r"^.*out: no space left on device \(free .*\)$"):
        with atomic_output_dir(disk / "out", overwrite=False) as tmp:
            torch.save(torch.zeros(100_000), tmp / "big.pt")
    assert list(disk.iterdir()) == []


# ------------------------------------------------------------------------------------------ stopping the launcher


def test_sigterm_during_set_up_exits_without_a_step_or_a_save(tmp_path, ops_model):
    """A preemption while the ranks load data and the model: they stop before the first step, saving nothing (a save
    of a big model after a whole step could outlast the scheduler's grace period). SIGHUP (torchrun passes it on)
    and SIGUSR1 (SLURM's --signal=USR1@N) stop a run as SIGTERM does: they ended it unsaved. The data are built by
    one process per node while the others wait without a deadline: a check of the records or a tokenization longer
    than dist_timeout_minutes (6 s here) is no timeout (the check ran before the others joined: they timed out)."""
    cfg = ops_config(tmp_path, ops_model, dist_timeout_minutes=0.1)
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)],
                           env={"PIPEFT_FAULT_PAUSE": "validate:0:8,data:0:8,setup:0:60"})
    wait_for(lambda: "activation checkpointing:" in output_of(proc), proc)  # the set-up's last line
    for w, sig in zip(workers_of(proc), (signal.SIGHUP, signal.SIGUSR1), strict=True):
        w.send_signal(sig)
    _, out = finish_deepspeed(proc, expect=0)
    assert re.search(r"received SIG(HUP|USR1) during set-up: exiting before step 1, with nothing new to save \(resume "
                     r"with the same command\)", out), out[-3000:]
    assert not list((tmp_path / "out").glob("*global_step*")) and not losses_of(tmp_path / "out")


def test_a_stop_signal_while_the_data_are_tokenized_ends_every_rank_at_once(tmp_path, ops_model):
    """Tokenizing a large data set takes minutes on the node's first reading rank: a SIGTERM there was noted for the
    first step and the tokenization went on, until the deepspeed launcher's SIGKILL 30 s after its SIGTERM, while the
    other rank said "another process of this run has ended" (a Ctrl-C alike). Now the tokenizing rank stops at once
    and tells the others, which were waiting for its data; all exit 0, with nothing saved."""
    cfg = ops_config(tmp_path, ops_model)
    paused = tmp_path / "paused"
    paused.mkdir()
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)],
                           env={"PIPEFT_FAULT_PAUSE": "data:0:300", "PIPEFT_FAULT_PAUSED": str(paused)})
    wait_for(lambda: (paused / "data-0-rank0").exists(), proc)  # rank 0 "tokenizes", rank 1 waits for it
    [builder] = [w for w in workers_of(proc) if w.environ().get("RANK") == "0"]
    builder.send_signal(signal.SIGTERM)
    _, out = finish_deepspeed(proc, expect=0, timeout=120)  # (not the 300 s pause)
    assert "received SIGTERM during set-up, while the data were tokenized: exiting with nothing new to save (resume " \
           "with the same command)" in out, out[-3000:]
    assert "another process of this run has ended" not in out, out[-3000:]
    assert not list((tmp_path / "out").glob("*global_step*")) and not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_records_are_checked_ends_every_rank_at_once(tmp_path, ops_model, sig):
    """Ranks started without a launcher that stops the others (srun's tasks: RANK, WORLD_SIZE by hand): local rank 0
    checks the records once all have joined, the other waits for it. A SIGTERM (a preemption) or a Ctrl-C to both ends
    both at once, nothing written, as while the group forms: the waiting rank only noted a SIGTERM, then ended with
    gloo's lost peer as "another process of this run has ended" (exit 1); rank 0 caught the Ctrl-C and said the same."""
    cfg = ops_config(tmp_path, ops_model)
    paused = tmp_path / "paused"
    paused.mkdir()
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(ROOT),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PIPEFT_FAULT_PAUSE": "validate:0:120", "PIPEFT_FAULT_PAUSED": str(paused)}
    for k in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID"):
        env.pop(k, None)
    ranks = [subprocess.Popen([sys.executable, "train_ds.py", "--config", str(cfg)], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        t0 = time.time()
        while not (paused / "validate-0-rank0").exists():  # both have joined: rank 1 waits
            assert all(p.poll() is None for p in ranks) and time.time() - t0 < 300, [p.poll() for p in ranks]
            time.sleep(0.05)
        time.sleep(1)
        for p in ranks:
            p.send_signal(sig)
        outs = [p.communicate(timeout=30)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    # rank 0's Ctrl-C: one line (it was Python's KeyboardInterrupt traceback); rank 1 waits in C++: the signal ends it
    assert [p.returncode for p in ranks] == ([130, -sig] if sig == signal.SIGINT else [-sig] * 2), outs
    if sig == signal.SIGINT:
        assert outs[0].endswith("train_ds.py: interrupted before the first step: nothing was saved\n"), outs
        assert "Traceback" not in outs[0], outs
    assert not any("another process of this run has ended" in out for out in outs), outs
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.distributed
def test_sigterm_to_the_deepspeed_command_saves_and_stops_the_ranks(tmp_path, ops_model, ops_uninterrupted):
    """What `timeout` sends: SIGTERM to the `deepspeed` command alone, which DeepSpeed's single-node runner does not
    forward. The ranks notice it has gone, save at the step boundary and exit 0: no orphan keeps training.
    The run replaces an earlier one ("resume" false, "overwrite_save_path"), started by SLURM job 4242: the stop
    says how to resume, and a requeue of that job (the same command) resumes it, not replaces it again."""
    save = tmp_path / "out"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the run it replaces
    cfg = ops_config(tmp_path, ops_model, resume=False, overwrite_save_path=True)
    job = {"SLURM_JOB_ID": "4242"}
    proc = start_deepspeed("train_ds.py", ["--config", str(cfg)], env={"PIPEFT_FAULT_PAUSE": "step:2:60", **job})
    wait_for(lambda: (save / "metrics.jsonl").is_file() and 2 in losses_of(save), proc)
    workers = workers_of(proc)
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)  # the runner only (the launcher and the ranks are its descendants)
    proc.wait(timeout=60)
    for w in workers:
        w.wait(timeout=120)
    assert (save / "latest").read_text() == "global_step2", output_of(proc)[-3000:]
    assert (f'saving at step 2 and exiting (to resume, set "resume": "auto" in {cfg}: a restart of this same job '
            'resumes by itself; run again otherwise, "resume": false would start over and delete this run)') in output_of(proc)
    finish_deepspeed(proc, expect=None)
    out = run_deepspeed("train_ds.py", ["--config", str(cfg)], env={**job, "SLURM_RESTART_COUNT": "1"}).stdout
    assert (f"warning: this is a restart of SLURM job 4242, start 1 of it (this is start 2), which started the run in "
            f"save_path {save}: it resumes that run") in out
    assert f"resumed from {save / 'global_step2'} at step 2" in out
    assert losses_of(save) == losses_of(ops_uninterrupted)  # steps 1-8, as one run without a stop


# ------------------------------------------------------------------------------------------ the converter


def _tiny_hf(tmp_path: Path, tokenizer) -> Path:
    from models import get_family
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    hf = get_family("llama").hf_model_class(tiny_config("llama", "gqa_tied", vocab_size=len(tokenizer)))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_converter_checks_shapes_and_headers(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    src = _tiny_hf(tmp_path, tokenizer)
    weights = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    good = weights[key]
    weights[key] = torch.zeros(good.shape[0] + 1, good.shape[1])
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[{good.shape[0] + 1}, {good.shape[1]}\] but "
                                              rf".*config.json expects \[{good.shape[0]}, {good.shape[1]}\]"):
        hg_to_pp(src, tmp_path / "pp")
    assert not (tmp_path / "pp").exists() and not list(tmp_path.glob(".pp.tmp-*"))

    raw = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + raw[8:])  # an absurd header length
    with pytest.raises(CheckpointError, match=r"header length field says 1152921504606846976 bytes, the file has"):
        hg_to_pp(src, tmp_path / "pp")
    (src / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated: offsets past the end
    with pytest.raises(CheckpointError, match=r"do not fit the file .*corrupt or truncated"):
        hg_to_pp(src, tmp_path / "pp")


def test_a_killed_conversion_leaves_nothing_the_next_one_does_not_clean(tmp_path, tokenizer, capsys):
    src = _tiny_hf(tmp_path, tokenizer)
    dst = tmp_path / "pp"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; from models.outdir import atomic_output_dir\n"
        "with atomic_output_dir(Path(sys.argv[1]), False) as tmp:\n"
        "    (tmp / 'layer_00-model_states.pt').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), 9)\n"), str(dst)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".pp.tmp-*"))
    assert len(left) == 1 and not dst.exists()
    done = subprocess.run([sys.executable, "convert_model.py", "hg_to_pp", "--input-path", str(src), "--save-path",
                           str(dst)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"removed {left[0]}: left by an interrupted conversion" in done.stderr
    assert not list(tmp_path.glob(".pp.tmp-*")) and (dst / "layer_00-model_states.pt").is_file()

    # a conversion refused before any work (the target is not empty) still removes a dead one's leftovers: nothing
    # else would (they may be a model's size)
    stale = tmp_path / f".pp.tmp-{socket.gethostname()}-{dead_pid()}"
    stale.mkdir()
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        hg_to_pp(src, dst)
    assert not stale.exists()
    other = tmp_path / ".pp.tmp-otherhost-123"  # another host's, maybe alive: left alone, said once
    other.mkdir()
    capsys.readouterr()
    hg_to_pp(src, dst, overwrite=True)
    assert capsys.readouterr().err.count(f"note: {other} may belong to a conversion still running") == 1
    assert other.is_dir()
    other.rmdir()

    # an --overwrite killed between moving the old output aside and renaming the new one: the old one comes back
    aside = tmp_path / f".pp.old-{socket.gethostname()}-{dead_pid()}"
    os.replace(dst, aside)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        hg_to_pp(src, dst)
    assert (dst / "layer_00-model_states.pt").is_file() and not aside.exists()


def test_disk_full_for_the_data_cache_is_one_warning(small_disk, ops_model, tokenizer, caplog):
    from data.encode import load_dataset

    disk = small_disk(4096)
    (disk / "filler").write_bytes(b"\0" * 4096)  # the cache's directory is full from the start
    with caplog.at_level("WARNING"):
        ds = load_dataset(str(ops_model / "train.jsonl"), tokenizer, 64, cache_dir=disk / "cache")
    said = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(ds) > 0 and len(said) == 1 and "no space left on device (needed about" in said[0], said
    assert "continuing without the cache (the next start tokenizes again: set data_cache_dir to a writable directory)" in said[0] and "\n" not in said[0]
    assert ds.stats.cache_status == f"not written ({said[0].split('; continuing')[0]})"  # what the trainer logs
