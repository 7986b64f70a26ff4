"""Batches without compute on padding: per-step padded lengths, numpy micro-batches equal to the sample-dict
collate, length-grouped orders (HF's megabatches), and the epoch order computed once per epoch."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from data.collate import collate, collate_rows, padded_length
from data.encode import load_dataset
from data.packing import pack
from training.batches import MEGABATCH_MULT, BatchPlan, step_micro_batches

WORDS = "pipeline stage layer token batch loss gradient weight model data train answer question reply".split()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("batches") / "d.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(120):
            say = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
            f.write(json.dumps({"text": say} if i % 2 else {"instruct": "say", "output": say}) + "\n")
    ds = load_dataset(path, tokenizer, 64, use_cache=False)
    return ds, pack(ds, 64, 1)


def test_padded_length():
    assert padded_length(np.array([3, 17, 9]), 8, 64) == 24
    assert padded_length(np.array([63]), 64, 100) == 64 and padded_length(np.array([65]), 64, 100) == 100
    assert padded_length(np.array([5]), 1, 64) == 5


@pytest.mark.parametrize("kind", ["encoded", "packed"])
def test_collate_rows_equals_collate_of_the_samples(datasets, kind):
    ds = datasets[0] if kind == "encoded" else datasets[1]
    rows = [5, 0, 3, len(ds) - 1]
    length = padded_length(ds.offsets[np.array(rows) + 1] - ds.offsets[np.array(rows)], 16, 64)
    (ids, pos, seg), labels = collate_rows(ds, rows, length, 3)
    (ids2, pos2, seg2), labels2 = collate([ds[i] for i in rows], length, 3)
    for a, b in ((ids, ids2), (pos, pos2), (seg, seg2), (labels, labels2)):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    (ids, pos, seg), labels = collate_rows(ds, [-1], 8, 3)  # an empty row: one pad token of segment 1, no label
    assert ids.tolist() == [[3] * 8] and seg.tolist() == [[1] + [0] * 7] and (labels == -100).all()
    with pytest.raises(ValueError, match="more than the batch length"):
        collate_rows(ds, [int(np.argmax(np.diff(ds.offsets)))], 2, 3)


def test_each_micro_batch_is_padded_to_its_own_longest_row(datasets):
    ds = datasets[0]
    lengths = np.diff(ds.offsets)
    plan = BatchPlan(len(ds), 2, 3, 2, 7, lengths, pad_multiple=8, max_seq_len=64)
    tokens = np.ones(len(ds), np.int64)
    within_a_step = False
    for step in range(plan.steps_per_epoch):
        for rank in range(2):
            shapes = plan.micro_shapes(0, step, rank)
            micro = plan.micro_indices(0, step, rank)
            assert shapes == [(len(rows), min(64, -(-int(lengths[rows].max()) // 8) * 8)) for rows in micro]
            batches = step_micro_batches(ds, plan, tokens, 0, step, rank, shapes, 3)
            assert [b[0][0].shape for b in batches] == shapes
            within_a_step |= len(set(shapes)) > 1
    assert within_a_step


def _cut_sizes(plan, step):
    return [math.prod(plan.micro_shapes(0, step, r)[k]) for r in range(plan.dp_size) for k in range(plan.grad_accum)]


def _fewest_largest(pads: list[int], count: int, cap: int) -> int:
    """Brute force: the smallest largest micro-batch (rows x padded length) of any cut of the length-sorted
    rows into `count` runs of at most `cap` tokens."""
    n, best = len(pads), None
    for cuts in itertools.combinations(range(1, n), count - 1):
        bounds = [0, *cuts, n]
        size = max((b - a) * pads[a] for a, b in itertools.pairwise(bounds))
        best = size if size <= cap and (best is None or size < best) else best
    return best


@pytest.mark.parametrize("grouped", [False, True])
def test_a_steps_rows_are_cut_into_runs_of_like_size_dealt_to_the_ranks_in_turn(grouped):
    """The step's rows sorted longest first and cut into runs, one micro-batch each, the largest as small as any
    cut allows within the tokens of micro_batch rows of the longest (shorter rows: more of them); dealt to the
    ranks in turn, largest first; each rank runs its smallest first and its second smallest last."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=100)
    plan = BatchPlan(100, 3, 4, 2, 5, lengths, grouped, drop_last=False, pad_multiple=16, max_seq_len=256)
    pads = np.minimum(-(-lengths // 16) * 16, 256)
    smaller = 0
    for step in range(plan.steps_per_epoch):  # global batch 24, the last with 4 samples
        real = plan.global_indices(0, step, real=True)
        micro = [plan.micro_indices(0, step, rank) for rank in range(2)]
        assert [len(m) for m in micro] == [4, 4]
        runs = sorted((mb for m in micro for mb in m), key=lambda mb: (-lengths[mb[0]], -lengths[mb[-1]]))
        rows = np.concatenate(runs)
        if len(real) < 8:  # fewer samples than micro-batches: one each, the rest an empty row
            assert sorted(rows.tolist()) == sorted([*real.tolist(), *[-1] * (8 - len(real))])
            assert all(len(mb) == 1 for mb in runs)
            continue
        assert sorted(rows.tolist()) == sorted(real.tolist())  # every sample once, no empty row
        assert (np.diff(lengths[rows]) <= 0).all()  # runs of the longest-first order
        sizes = [len(mb) * pads[mb].max() for m in micro for mb in m]
        assert sizes == _cut_sizes(plan, step)
        order = np.sort(pads[real])[::-1].tolist()
        equal = [3 * max(order[i:i + 3]) for i in range(0, 24, 3)]  # micro_batch rows each
        if grouped and step == 0:  # the epoch's longest sample first (HF): its micro-batch the largest there can be
            assert max(sizes) == 3 * order[0] == 3 * pads.max()
        else:
            assert max(sizes) == _fewest_largest(order, 8, 3 * order[0]) <= max(equal)
            smaller += max(sizes) < max(equal)
        dealt = sorted(sizes, reverse=True)  # dealt in turn, largest first
        for rank in range(2):
            mine = sorted(dealt[rank::2], reverse=True)
            assert [len(mb) * pads[mb].max() for mb in micro[rank]] == [mine[-1], *mine[:-2], mine[-2]]
    assert smaller  # some step's largest micro-batch is smaller than micro_batch rows of the longest


def test_with_group_by_length_the_first_step_has_the_largest_micro_batch_of_the_epoch():
    """HF puts the longest sample first so that running out of memory shows at the first step; cutting that step
    into micro-batches of like size made later steps' largest micro-batches bigger than its (11 of them in a
    review's epoch of 20,000 lognormal lengths). Its first micro-batch is micro_batch rows of the longest again."""
    lengths = np.minimum(np.random.default_rng(0).lognormal(5, 1, size=4000).astype(int) + 1, 4096)
    for micro, accum in ((4, 4), (8, 2), (2, 8)):
        plan = BatchPlan(4000, micro, accum, 1, 3, lengths, group_by_length=True, pad_multiple=64, max_seq_len=4096)
        for epoch in range(2):
            largest = [max(math.prod(shape) for shape in plan.micro_shapes(epoch, s, 0))
                       for s in range(plan.steps_per_epoch)]
            assert largest[0] == max(largest) == micro * padded_length(lengths[plan.order(epoch)], 64, 4096)


def test_micro_batches_never_hold_more_tokens_than_micro_batch_rows_of_the_longest():
    rng = np.random.default_rng(3)
    for trial in range(200):
        micro, accum, dp = (int(x) for x in rng.integers(1, 5, size=3))
        n = int(rng.integers(1, micro * accum * dp + 1))
        lengths = rng.integers(1, int(rng.choice([8, 64, 600])), size=n)
        multiple, seq = int(rng.choice([1, 8, 64])), int(rng.choice([64, 512]))
        plan = BatchPlan(n, micro, accum, dp, trial, np.minimum(lengths, seq), drop_last=False, pad_multiple=multiple,
                         max_seq_len=seq)
        cap = micro * padded_length(np.minimum(lengths, seq), multiple, seq)
        micro_batches = [mb for r in range(dp) for mb in plan.micro_indices(0, 0, r)]
        assert len(micro_batches) == accum * dp and all(len(mb) for mb in micro_batches)
        assert sorted(np.concatenate(micro_batches).tolist()) == sorted(
            [*range(n), *[-1] * max(0, accum * dp - n)]), (trial, micro_batches)
        assert max(_cut_sizes(plan, 0)) <= cap and sum(_cut_sizes(plan, 0)) == plan.computed_tokens(0, 0)


def test_group_by_length_sorts_megabatches_and_puts_the_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=2000)
    plan = BatchPlan(2000, 2, 2, 1, 3, lengths, group_by_length=True)  # global batch 4, megabatch 200
    order = plan.order(1)
    assert sorted(order.tolist()) == list(range(2000)) and lengths[order[0]] == lengths.max()
    mega = MEGABATCH_MULT * plan.global_batch
    for start in range(0, 2000, mega):
        chunk = lengths[order[start:start + mega]][1:]  # (the first element may be the swapped-in longest)
        assert (np.diff(chunk) <= 0).all()
    spread = [np.ptp(lengths[plan.global_indices(1, s)]) for s in range(plan.steps_per_epoch)]
    assert np.mean(spread) < 0.1 * np.ptp(lengths)  # the rows of a step have similar lengths
    assert np.array_equal(BatchPlan(2000, 2, 2, 1, 3, lengths, True).order(1), order)  # seeded
    assert not np.array_equal(plan.order(2), order)


def test_the_epoch_order_is_computed_once_per_epoch(monkeypatch):
    plan = BatchPlan(1000, 2, 2, 1, 3)
    calls = []
    compute = plan._compute_order
    monkeypatch.setattr(plan, "_compute_order", lambda epoch: calls.append(epoch) or compute(epoch))
    for step in range(3 * plan.steps_per_epoch):
        plan.micro_indices(*plan.position(step), 0)
        plan.global_indices(*plan.position(step))
        if step + 1 < 3 * plan.steps_per_epoch:  # the prefetch thread reads the next step's order (next epoch's
            plan.micro_indices(*plan.position(step + 1), 0)  # at an epoch's end) before the metrics read this one's
        plan.global_indices(*plan.position(step), real=True)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("grouped", [False, True])
def test_an_epoch_has_as_many_steps_as_its_samples_fill(grouped):
    """drop_last: whole global batches only; else one more for a remainder, and none when there is no remainder (an
    extra step of padding rows alone would step the optimizer and scheduler on nothing and shift every resume)."""
    for n, drop_last, steps in [(16, True, 2), (16, False, 2), (17, True, 2), (17, False, 3), (7, False, 1)]:
        plan = BatchPlan(n, 2, 2, 2, 0, np.arange(1, n + 1), grouped, drop_last=drop_last)
        assert plan.steps_per_epoch == steps, (n, drop_last)
        rows = [plan.global_indices(0, k) for k in range(steps)]
        assert all((r >= 0).any() for r in rows)  # every step trains a sample
        real = np.concatenate([r[r >= 0] for r in rows])
        assert len(real) == len(set(real.tolist())) == (n if not drop_last else steps * plan.global_batch)
        assert plan.position(steps) == (1, 0)  # the next step is the next epoch's first


@pytest.mark.parametrize("drop_last", [True, False])
def test_group_by_length_trains_the_samples_an_ungrouped_epoch_trains(drop_last):
    """drop_last drops a random share of each epoch with group_by_length too, not the same shortest samples."""
    lengths = np.random.default_rng(0).integers(10, 500, size=1000)
    grouped, plain = (BatchPlan(1000, 4, 4, 2, 42, lengths, group_by_length=g, drop_last=drop_last) for g in (1, 0))
    assert grouped.steps_per_epoch == plain.steps_per_epoch == (31 if drop_last else 32)
    dropped = []
    for epoch in range(4):
        steps = [grouped.global_indices(epoch, s, real=True) for s in range(grouped.steps_per_epoch)]
        assert all(np.ptp(lengths[idx]) < 0.25 * np.ptp(lengths) for idx in steps[1:])  # still grouped
        trained = np.sort(np.concatenate(steps))
        assert np.array_equal(trained, np.sort(np.concatenate(
            [plain.global_indices(epoch, s, real=True) for s in range(plain.steps_per_epoch)])))
        dropped.append(frozenset(np.setdiff1d(np.arange(1000), trained).tolist()))
    assert [len(d) for d in dropped] == [8 if drop_last else 0] * 4
    assert not drop_last or len(set(dropped)) == 4


def test_a_resume_with_another_global_batch_says_which_samples_it_skips_or_repeats():
    """allow_data_change_on_resume with another global batch continues at the step's position of the new batch: the
    warning says where that is against where the checkpoint's batches had reached (a review found 37% of an epoch
    skipped under a warning that said only "not sample-exact")."""
    doubled = BatchPlan(num_samples=64, micro_batch=4, grad_accum=1, dp_size=2, seed=0)
    assert doubled.batch_change_note(6, 4) == ("step 7 starts at sample 48 of epoch 0's order; the checkpoint's batches "
                                               "had reached sample 24 of epoch 0's: 24 samples skipped in this epoch")
    halved = BatchPlan(num_samples=64, micro_batch=1, grad_accum=1, dp_size=2, seed=0)
    assert halved.batch_change_note(6, 4).endswith("reached sample 24 of epoch 0's: 12 samples repeated in this epoch")
    assert halved.batch_change_note(16, 4) == ("step 17 starts at sample 32 of epoch 0's order; the checkpoint's "
                                               "batches had reached sample 0 of epoch 1's")
    grouped = BatchPlan(num_samples=64, micro_batch=4, grad_accum=1, dp_size=2, seed=0, group_by_length=True,
                        lengths=np.arange(64))
    assert grouped.batch_change_note(6, 4).endswith("(with group_by_length the order itself depends on the global batch)")
