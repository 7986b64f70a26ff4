"""Which checkpoints rotation keeps, and best-eval bookkeeping (the saving itself runs under the launcher in
test_train_ops.py)."""

from __future__ import annotations

import math

from training.checkpoint import Checkpoints, RunState, tag_of


def state(evals) -> RunState:
    return RunState(step=evals[-1][0] if evals else 0, pipe=2, data=1, parts=[0, 3, 6], global_batch=4, evals=evals)


def test_a_non_finite_eval_loss_is_never_best():
    st = state([(1, math.nan), (2, 1.0), (3, 0.5), (4, math.inf), (5, 0.7)])
    assert st.best_eval() == (3, 0.5) and st.evals_since_best() == 2
    assert state([(1, math.nan), (2, math.nan)]).best_eval()[0] == 1  # all bad: the earliest
    assert state([(2, 0.5), (4, 0.5)]).best_eval() == (2, 0.5)  # ties: the earliest


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
