"""The eval set: held-out split and how eval_batch calls cover it (the loss itself is checked against
transformers under the launcher in test_train_ops.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.dataset import EncodedDataset, EncodeStats
from data.encode import IGNORE_INDEX
from data.packing import trained_tokens
from training.evaluate import EvalPlan, concat, perplexity, split_eval


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


@pytest.mark.parametrize("n, micro, num_micro, dp", [(10, 2, 2, 1), (7, 1, 3, 2), (4, 4, 2, 2)])
def test_eval_calls_cover_every_sample_once(n, micro, num_micro, dp):
    ds, pad = toy(n), 0
    plan = EvalPlan(ds, micro, num_micro, dp)
    assert plan.tokens == int(trained_tokens(ds).sum())
    seen, empty, widths = [], 0, set()
    for call in range(plan.calls):
        for rank in range(dp):
            lengths = plan.micro_lengths(call, rank, 3, 8)  # each micro-batch's longest row: a multiple of 3, at most 8
            assert lengths == [min(8, -(-max([len(ds[int(i)]["input_ids"]) for i in rows if i >= 0] or [1]) // 3) * 3)
                               for rows in plan.micro_rows(call, rank)]
            widths.update(lengths)
            batches = plan.micro_batches(call, rank, lengths, pad)
            assert len(batches) == num_micro
            for ((ids, _, seg), (labels, counts)), width in zip(batches, lengths, strict=True):
                assert ids.shape == (micro, width) and counts.tolist() == [plan.tokens, num_micro * dp]
                for row in range(micro):
                    if (labels[row] != IGNORE_INDEX).any():
                        seen.append(ids[row][seg[row] > 0].tolist())
                    else:
                        empty += 1
    assert sorted(seen) == sorted(ds[i]["input_ids"] for i in range(n))
    assert empty == plan.calls * plan.per_call - n
    # longest first, micro-batches dealt to the ranks in turn: rows of like length together, like work on each rank
    dealt = [r for call in range(plan.calls) for mbs in zip(*(plan.micro_rows(call, k) for k in range(dp)), strict=True)
             for mb in mbs for r in mb.tolist() if r >= 0]
    assert [len(ds[r]["input_ids"]) for r in dealt] == sorted(map(len, seen), reverse=True)
    assert len(widths) > 1


def test_perplexity_of_a_nan_loss_is_nan_and_of_a_huge_one_inf():
    """A NaN eval loss logged eval_ppl inf (nan < 700 is false)."""
    assert math.isnan(perplexity(float("nan"))) and perplexity(800.0) == math.inf
    assert perplexity(2.0) == pytest.approx(math.exp(2.0), rel=1e-15)
