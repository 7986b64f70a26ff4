"""The eval set: held-out split and how eval_batch calls cover it (the loss itself is checked against
transformers under the launcher in test_train_ops.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.dataset import EncodedDataset, EncodeStats
from data.encode import IGNORE_INDEX
from data.packing import trained_tokens
from training.evaluate import EvalPlan, concat, perplexity, split_eval, subset, trained_copies, training_and_eval_rows


def toy(n: int) -> EncodedDataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(5, 50, offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.6, ids, IGNORE_INDEX).astype(np.int32)
    labels[offsets[1:] - 1] = ids[offsets[1:] - 1]  # every sample keeps a trained token
    return EncodedDataset(ids, labels, offsets, np.arange(n) * 2, EncodeStats(n, n, 0, 0))


def test_split_holds_out_a_seeded_disjoint_share():
    ds = toy(50)
    train, held = split_eval(ds, 0.2, seed=3)
    assert (len(train), len(held)) == (40, 10)
    assert set(train.record_index) | set(held.record_index) == set(ds.record_index)
    assert not set(train.record_index) & set(held.record_index)
    for part in (train, held):
        for i, rec in enumerate(part.record_index):
            assert part[i] == ds[int(rec) // 2]
    again = split_eval(ds, 0.2, seed=3)[1]
    assert list(again.record_index) == list(held.record_index)
    assert list(split_eval(ds, 0.2, seed=4)[1].record_index) != list(held.record_index)
    assert len(concat(held, train)) == 50
    with pytest.raises(ValueError, match="leaves no training sample"):
        split_eval(toy(2), 0.9, seed=0)


def test_eval_samples_that_are_training_samples_too_are_counted():
    """README says to weight a file by copying its records: with eval_split_ratio one copy could be held out while
    the other trained, the eval loss then measuring trained text, unsaid. The trainer warns with this count."""
    ds = toy(30)
    twice = concat(ds, ds)  # every record given twice
    train, rows, samples, copies = training_and_eval_rows(twice, None, 0.2, False, 16, seed=3)
    both = set(map(int, train.record_index)) & set(map(int, samples.record_index))
    assert copies == len(both) > 0 and copies <= len(samples)  # a held-out sample whose copy trains
    assert training_and_eval_rows(ds, None, 0.2, True, 16, seed=3)[3] == 0  # (toy's samples all differ)
    copied = subset(ds, np.array([0, 5, 9]))
    assert training_and_eval_rows(ds, copied, None, False, 16, seed=3)[3] == 3  # eval_data_path's copies of data_path's
    copied.labels[:] = IGNORE_INDEX  # the same tokens, other labels: not the same sample
    assert trained_copies(ds, copied) == 0


@pytest.mark.parametrize("n, micro, num_micro, dp", [(10, 2, 2, 1), (7, 1, 3, 2), (4, 4, 2, 2), (30, 3, 2, 2)])
def test_eval_calls_cover_every_sample_once(n, micro, num_micro, dp):
    ds, pad = toy(n), 0
    plan = EvalPlan(ds, micro, num_micro, dp, 3, 8)  # each micro-batch's longest row: a multiple of 3, at most 8
    assert plan.tokens == int(trained_tokens(ds).sum())
    seen, empty, widths, runs = [], 0, set(), []
    for call in range(plan.calls):
        for rank in range(dp):
            shapes = plan.micro_shapes(call, rank)
            rows = plan.micro_rows(call, rank)
            assert shapes == [(len(r), min(8, -(-max([len(ds[int(i)]["input_ids"]) for i in r if i >= 0] or [1]) // 3) * 3))
                              for r in rows]
            widths.update(n for _, n in shapes)
            runs += [r for r in rows if r[0] >= 0]
            batches = plan.micro_batches(call, rank, shapes, pad)
            assert len(batches) == num_micro
            for ((ids, _, seg), (labels, counts)), shape in zip(batches, shapes, strict=True):
                assert ids.shape == shape and counts.tolist() == [plan.tokens, num_micro * dp]
                for row in range(shape[0]):
                    if (labels[row] != IGNORE_INDEX).any():
                        seen.append(ids[row][seg[row] > 0].tolist())
                    else:
                        empty += 1
    assert sorted(seen) == sorted(ds[i]["input_ids"] for i in range(n))
    # rows of like length share a micro-batch (training's cut, training.batches): runs of the longest-first order
    runs.sort(key=lambda r: (-len(ds[int(r[0])]["input_ids"]), -len(ds[int(r[-1])]["input_ids"])))
    assert [len(ds[int(r)]["input_ids"]) for run in runs for r in run] == sorted(map(len, seen), reverse=True)
    assert empty == sum(max(0, num_micro * dp - len(plan.order[c * plan.per_call:(c + 1) * plan.per_call]))
                        for c in range(plan.calls))
    assert len(widths) > 1


def test_perplexity_of_a_nan_loss_is_nan_and_of_a_huge_one_inf():
    """A NaN eval loss logged eval_ppl inf (nan < 700 is false)."""
    assert math.isnan(perplexity(float("nan"))) and perplexity(800.0) == math.inf
    assert perplexity(2.0) == pytest.approx(math.exp(2.0), rel=1e-15)
