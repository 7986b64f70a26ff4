"""Which checkpoints rotation keeps, and best-eval bookkeeping (the saving itself runs under the launcher in
test_train_ops.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import STATE_FILE, Checkpoints, RunState, SaveFailed, tag_of
from training.resume import resume_tag


def state(evals) -> RunState:
    return RunState(step=evals[-1][0] if evals else 0, pipe=2, data=1, parts=[0, 3, 6], global_batch=4, evals=evals)


def test_a_non_finite_eval_loss_is_never_best(tmp_path):
    """Not even when no loss is finite (a diverged run): no best, `best` not written, keep_best keeps no such tag,
    and early stopping counts every evaluation (as HF Trainer, whose best stays None)."""
    st = state([(1, math.nan), (2, 1.0), (3, 0.5), (4, math.inf), (5, 0.7)])
    assert st.best_eval() == (3, 0.5) and st.evals_since_best() == 2
    assert state([(2, 0.5), (4, 0.5)]).best_eval() == (2, 0.5)  # ties: the earliest
    st = state([(2, math.nan), (4, math.inf)])
    assert st.best_eval() is None and st.evals_since_best() == 2
    st.write(tmp_path)  # strict JSON (null), read back as NaN
    assert json.loads((tmp_path / STATE_FILE).read_text(), parse_constant=lambda c: 1 / 0)["evals"] == [[2, None], [4, None]]
    back = RunState.read(tmp_path)
    assert [s for s, _ in back.evals] == [2, 4] and all(math.isnan(v) for _, v in back.evals)
    assert back.best_eval() is None and back.evals_since_best() == 2
    (tmp_path / STATE_FILE).unlink()
    for s in (2, 4):
        (tmp_path / tag_of(s)).mkdir()
    (tmp_path / "latest").write_text(tag_of(4))
    ckpts = Checkpoints(tmp_path, 0, 1, 1)
    ckpts._after_save(st)
    assert ckpts.best_tag(st) is None and not (tmp_path / "best").exists() and ckpts.tags() == [tag_of(4)]


def test_an_end_of_run_evaluation_ranks_for_best_but_early_stopping_does_not_count_it():
    """A run of 4 steps (eval_interval 3) evaluated at its end (step 4), then continued to 8: early stopping sees
    the evaluations of a run trained to 8 in one go (3, 6); keep_best and `best` still rank step 4's."""
    st = state([(3, 5.0), (4, 4.0), (6, 4.5)])
    st.end_evals = [4]
    assert st.best_eval() == (4, 4.0) and st.best_eval(scheduled=True) == (6, 4.5) and st.evals_since_best() == 0
    st.evals += [(9, 4.6), (12, 4.7)]
    assert st.evals_since_best() == 2  # after 4.5 at step 6, the scheduled best
    assert state(st.evals).evals_since_best() == 3  # without the marker: after step 4's 4.0


def test_the_closing_line_says_where_the_best_steps_weights_are(tmp_path):
    """Without keep_best the best step may have no checkpoint (save_interval, keep_last): the line said nothing."""
    (tmp_path / tag_of(4)).mkdir()
    st = state([(2, 1.0), (4, 2.0)])
    assert Checkpoints(tmp_path, 0, 1, None).best_line(st) == ("best eval loss 1.0000 at step 2 (no checkpoint of "
                                                               "that step: keep_best keeps the best evaluated ones)")
    assert Checkpoints(tmp_path, 0, 1, None).best_line(state([(4, 0.5)])) == \
        f"best eval loss 0.5000 at step 4 (its checkpoint: {tmp_path / tag_of(4)})"
    assert Checkpoints(tmp_path, 0, 1, 1).best_line(st) == (f"best eval loss 1.0000 at step 2 (no checkpoint of that "
                                                            f"step; {tmp_path / 'best'} names {tag_of(4)}, the best "
                                                            "evaluated one saved)")
    assert Checkpoints(tmp_path, 0, 1, 1).best_line(state([(2, math.nan)])) == "no eval loss was finite: no best " \
        "checkpoint"
    assert Checkpoints(tmp_path, 0, 1, 1).best_line(state([])) is None


def test_the_rng_state_saved_is_the_one_restored():
    """Python's, NumPy's and torch's generators all come back (a resume draws what the run would have drawn)."""
    import random

    import numpy as np

    from training.checkpoint import rng_state, set_rng_state

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    saved = rng_state()
    expected = draw()
    draw()
    set_rng_state(saved)
    assert draw() == expected


def test_keep_last_keep_best_and_latest(tmp_path):
    for s in (2, 4, 6, 8, 10):
        (tmp_path / tag_of(s)).mkdir()
    (tmp_path / ".tmp-global_step12").mkdir()
    (tmp_path / "latest").write_text(tag_of(10))
    st = state([(2, 3.0), (4, 1.0), (6, math.nan), (8, 2.0), (10, 2.5)])
    assert Checkpoints(tmp_path, 0, None, None).keep(st) == {tag_of(s) for s in (2, 4, 6, 8, 10)}
    assert Checkpoints(tmp_path, 0, 2, None).keep(st) == {tag_of(8), tag_of(10)}
    assert Checkpoints(tmp_path, 0, None, 2).keep(st) == {tag_of(4), tag_of(8), tag_of(10)}  # 2 best + latest
    assert Checkpoints(tmp_path, 0, 1, 1).keep(st) == {tag_of(4), tag_of(10)}
    ckpts = Checkpoints(tmp_path, 0, 1, 1)
    assert sorted(ckpts.rotate(st)) == [tag_of(2), tag_of(6), tag_of(8)]
    assert ckpts.tags() == [tag_of(4), tag_of(10)] and ckpts.latest() == tag_of(10)
    assert ckpts.remove_partial() == [".tmp-global_step12"] and not (tmp_path / ".tmp-global_step12").exists()


def test_rotation_keeps_the_checkpoint_a_run_resumed_from(tmp_path):
    """A resume that passed over a damaged newest checkpoint (step 4) for an intact one (step 3) and ends there (its
    max_steps now 3) rotates with keep_last 1: it kept step 4, the damaged one (the newest, and `latest`), and deleted
    step 3, the only intact one. It keeps the state's own step too; and `latest` written by hand as "global_step3/"
    names that tag."""
    for s in (2, 3, 4):
        (tmp_path / tag_of(s)).mkdir()
    (tmp_path / "latest").write_text(tag_of(4))
    ckpts = Checkpoints(tmp_path, 0, 1, None)
    assert ckpts.rotate(state([(3, 1.0)])) == [tag_of(2)] and ckpts.tags() == [tag_of(3), tag_of(4)]
    (tmp_path / "latest").write_text(tag_of(3) + "/\n")
    assert ckpts.latest() == tag_of(3) and ckpts.keep(state([(4, 1.0)])) == {tag_of(3), tag_of(4)}
    # a path into another run's directory names this run's tag, for the resume as for rotation (the resume took the
    # other run's checkpoint, rotation this one's)
    other = tmp_path / "other"
    (other / tag_of(3)).mkdir(parents=True)
    (tmp_path / "latest").write_text(str(other / tag_of(3)))
    assert ckpts.latest() == tag_of(3)
    assert resume_tag(tmp_path)[1][0].startswith(f"checkpoint {tmp_path / tag_of(3)} cannot be resumed")
    for named in ("", ".."):  # save_path itself, its parent: no checkpoint (its size was taken as the last save's)
        (tmp_path / "latest").write_text(named)
        assert ckpts.latest() is None


def test_a_save_that_fails_once_written_is_one_line_and_keeps_the_previous_checkpoint(ds, tmp_path, monkeypatch):
    """The disk fills while rank 0 finishes a save DeepSpeed has written (its manifest, the rename, `latest`): that was
    a traceback on rank 0 alone, the other ranks waiting in the next barrier; now SaveFailed on every rank, as a
    failed write is, with the half-made tag removed and `latest` still naming the previous checkpoint."""
    import errno

    import training.checkpoint as checkpoint

    torch.manual_seed(0)
    engine = ds.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})[0]
    ckpts = Checkpoints(tmp_path, 0, None, None)
    st = RunState(step=2, pipe=1, data=1, parts=[0, 1], global_batch=1)
    ckpts.save(engine, st)
    assert ckpts.latest() == tag_of(2) and (tmp_path / tag_of(2) / "manifest.json").is_file()

    def full(tag_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(tag_dir / "manifest.json"))

    monkeypatch.setattr(checkpoint, "write_manifest", full)
    st.step = 4
    with pytest.raises(SaveFailed, match=rf"^saving checkpoint {tag_of(4)} in {tmp_path}: no space left on device .*; "
                                         rf"the previous checkpoint {tmp_path / tag_of(2)} is intact"):
        ckpts.save(engine, st)
    assert ckpts.latest() == tag_of(2) and sorted(p.name for p in tmp_path.iterdir()) == [tag_of(2), "latest"]
    (tmp_path / tag_of(2) / "manifest.json").write_text("{")  # damaged (a resume passes over it), saved again
    st.step = 2
    with pytest.raises(SaveFailed, match=rf"; `latest` names {tmp_path / tag_of(2)}, which is damaged \(.*\): a "
                                         "resume passes over it for the newest intact checkpoint$"):
        ckpts.save(engine, st)


def test_a_re_save_of_a_tag_keeps_the_old_copy_until_the_new_one_is_in_place(ds, tmp_path, monkeypatch):
    """Saving a step whose tag exists (a resume from before it) deleted the old tag before renaming the new one in: a
    failed rename lost both. The old copy now waits aside (`.old-TAG`) and comes back when the rename fails, or at the
    next start when the run was killed in between."""
    import training.checkpoint as checkpoint

    engine = ds.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})[0]
    ckpts = Checkpoints(tmp_path, 0, None, None)
    st = RunState(step=2, pipe=1, data=1, parts=[0, 1], global_batch=1)
    ckpts.save(engine, st)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / tag_of(2)).rglob("*") if p.is_file()}
    replace = os.replace

    def fail_new_copy(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fail_new_copy)
    with pytest.raises(SaveFailed, match=rf"^finishing checkpoint {tag_of(2)} in {tmp_path} failed: OSError: .*; the "
                                         rf"checkpoint {tmp_path / tag_of(2)} is intact: resume"):
        ckpts.save(engine, st)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / tag_of(2)).rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == [tag_of(2), "latest"]
    os.replace(tmp_path / tag_of(2), tmp_path / f".old-{tag_of(2)}")  # killed between the two renames
    (tmp_path / f".tmp-{tag_of(4)}").mkdir()
    assert ckpts.remove_partial() == [f".tmp-{tag_of(4)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_of(2), "latest"]
    ckpts.save(engine, st)  # a re-save that works leaves nothing aside
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_of(2), "latest"]


def test_a_run_that_lost_save_paths_lock_saves_nothing_more_there(ds, tmp_path, monkeypatch):
    """A run paused (SIGSTOP, scontrol suspend) on another host past the heartbeat's limit has had its lock taken over
    by a new run; continued, it went on saving into that run's save_path (renames, `latest`, rotation). Its next save
    now stops it with one line: before the write, nothing written; during it, its .tmp- directory is left unnamed;
    at its end (the last step already saved: update_state), no state rewritten and nothing rotated."""
    import json

    import training.checkpoint as checkpoint
    from training.runlock import LOCK_FILE, RunLock

    engine = ds.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})[0]
    lock = RunLock(tmp_path)
    lock.acquire()
    ckpts = Checkpoints(tmp_path, 0, 1, None, lock=lock)
    ckpts.save(engine, RunState(step=2, pipe=1, data=1, parts=[0, 1], global_batch=1))
    taken = {"host": "elsewhere", "pid": 7, "started": 0, "token": "theirs"}

    def take_over(*args):
        (tmp_path / LOCK_FILE).write_text(json.dumps(taken))

    try:
        monkeypatch.setattr(checkpoint, "fault_pause", take_over)  # while the checkpoint is written
        with pytest.raises(SaveFailed, match=rf"^checkpoint {tag_of(4)} not saved in {tmp_path}: another run took the "
                                             r"lock .* over \(host elsewhere, pid 7, .*; this run stops"):
            ckpts.save(engine, RunState(step=4, pipe=1, data=1, parts=[0, 1], global_batch=1))
        assert ckpts.latest() == tag_of(2) and (tmp_path / f".tmp-{tag_of(4)}").is_dir()
        with pytest.raises(SaveFailed, match=rf"^checkpoint {tag_of(6)} not saved in "):  # before: nothing written
            ckpts.save(engine, RunState(step=6, pipe=1, data=1, parts=[0, 1], global_batch=1))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_FILE, f".tmp-{tag_of(4)}", tag_of(2), "latest"])
        for s in (20, 30):  # the new run's checkpoints: the lost run's rotation (keep_last 1) after a final evaluation
            (tmp_path / tag_of(s)).mkdir()  # rewrote its own tag's state and deleted them
        with pytest.raises(SaveFailed, match=rf"^checkpoint {tag_of(2)} not saved in "):
            ckpts.update_state(RunState(step=2, pipe=1, data=1, parts=[0, 1], global_batch=1))
        assert ckpts.tags() == [tag_of(2), tag_of(20), tag_of(30)]
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == taken  # not ours to remove


def test_a_save_missing_a_file_a_resume_loads_is_not_named_and_rotates_nothing(ds, tmp_path):
    """rank 0 built the manifest from what it saw, so a stage's file that never reached the shared disk made a
    checkpoint that `latest` named and that read as intact; rotation (keep_last 1) then deleted the last good one.
    Every rank now checks the files its resume loads are in the tag before it is named."""
    engine = ds.initialize(model=torch.nn.Linear(4, 2), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})[0]
    ckpts = Checkpoints(tmp_path, 0, 1, None)
    run = {"pipe": 1, "data": 1, "parts": [0, 1], "global_batch": 1}
    ckpts.save(engine, RunState(step=2, **run), needed=["mp_rank_00_model_states.pt"])
    with pytest.raises(SaveFailed, match=rf"saving checkpoint {tag_of(4)} in {tmp_path} failed: rank 0 does not see "
                                         rf"layer_01-model_states.pt in {tmp_path / ('.tmp-' + tag_of(4))} \(is "
                                         r"save_path one directory that every node shares\?\)"):
        ckpts.save(engine, RunState(step=4, **run), needed=["mp_rank_00_model_states.pt", "layer_01-model_states.pt"])
    assert ckpts.latest() == tag_of(2) and ckpts.tags() == [tag_of(2)] and not (tmp_path / f".tmp-{tag_of(4)}").exists()


def test_best_names_the_best_saved_tag_before_rotation_and_follows_keep_best_changes(tmp_path, monkeypatch):
    """`best` names the best-evaluated tag that has a checkpoint (the best eval's step may have none, e.g. keep_best
    turned on at a resume), is written before rotation deletes anything (a crash between them left it naming a
    deleted tag), and goes when keep_best is turned off on resume (rotation then deletes what it named)."""
    for s in (4, 8):
        (tmp_path / tag_of(s)).mkdir()
    (tmp_path / "latest").write_text(tag_of(8))
    st = state([(2, 0.5), (4, 1.0), (6, 0.7), (8, 0.9)])  # the best evals (2, 6) have no checkpoint
    ckpts = Checkpoints(tmp_path, 0, 1, 1)
    assert ckpts.best_tag(st) == tag_of(8)
    ckpts._after_save(st)
    assert (tmp_path / "best").read_text() == tag_of(8) and ckpts.tags() == [tag_of(8)]

    (tmp_path / tag_of(10)).mkdir()
    (tmp_path / "latest").write_text(tag_of(10))
    st = state([*st.evals, (10, 0.1)])
    order = []
    monkeypatch.setattr(Checkpoints, "rotate", lambda self, s: order.append(("rotate", (tmp_path / "best").read_text())))
    ckpts._after_save(st)
    assert order == [("rotate", tag_of(10))]  # the pointer moved before anything could be deleted
    monkeypatch.undo()

    Checkpoints(tmp_path, 0, 1, None)._after_save(st)  # keep_best off: rotation may delete what best named
    assert not (tmp_path / "best").exists()


def test_a_state_with_keys_this_version_does_not_know_loads(tmp_path, caplog):
    """A newer version's key is left out with a warning; d37d687's `early_stopped` (an hour on main) quietly, with
    its eval fingerprint (of packed rows then, of the samples now)."""
    import json

    st = state([(3, 5.0)])
    st.eval_fingerprint = "f" * 32
    st.write(tmp_path)
    raw = json.loads((tmp_path / "trainer_state.json").read_text())
    (tmp_path / "trainer_state.json").write_text(json.dumps({**raw, "from_the_future": 1}))
    assert RunState.read(tmp_path) == st and "keys this version does not know, left out: from_the_future" in caplog.text
    (tmp_path / "trainer_state.json").write_text(json.dumps({**raw, "early_stopped": False}))
    old = RunState.read(tmp_path)
    assert old.eval_fingerprint is None and old.evals == st.evals


def test_rng_states_load_with_weights_only_and_from_files_written_before(tmp_path):
    """rng_state() keeps numpy's key array as a tensor (the file loads with torch.load(weights_only=True)); a file
    written before, with numpy's array, still loads. Either restores the states exactly."""
    import pickle
    import random

    import numpy as np

    from training.checkpoint import load_rng_state, rng_state, set_rng_state

    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    np.random.randn()  # (numpy's cached gaussian is part of its state)
    state = rng_state()
    torch.save(state, tmp_path / "new.pt")
    torch.save({**state, "numpy": np.random.get_state()}, tmp_path / "old.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "old.pt", weights_only=True)
    draws = lambda: (np.random.rand(3).tolist(), np.random.randn(), random.random(), torch.rand(2).tolist())  # noqa: E731
    want = draws()
    for name in ("new.pt", "old.pt"):
        np.random.seed(0)
        set_rng_state(load_rng_state(tmp_path / name))
        assert draws() == want, name
