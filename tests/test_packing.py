"""Packing (data/packing.py): packed vs unpacked numerics for a tiny Llama and a tiny Bloom (per-sample
losses and logits of one packed sequence equal the samples run alone through transformers), the
packing invariants, split_long_pretrain, and data.inspect with packing on. The 2-process training run
with packing against a transformers reference is a case of test_train_reference.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import inspect as data_inspect
from data.collate import collate, pad_id_of
from data.dataset import EncodedDataset, EncodeStats
from data.encode import IGNORE_INDEX, cache_key, load_dataset
from data.packing import pack, trained_tokens
from data.records import file_digests
from data.templates import TemplateSettings
from models import causal_lm_loss, get_family
from tests.helpers import segments_of, sequential_from_hf, tiny_config

ATOL = 1e-5
WORDS = "pipeline stage layer token batch loss gradient weight model data train answer question reply".split()
PACKED = TemplateSettings(packing=True)
SPLIT = TemplateSettings(packing=True, split_long_pretrain=True)


def write_records(path: Path, n: int, seed: int = 0, long_text: int = 40) -> Path:
    """Pretrain, instruct and conversation records of varied lengths (pretrain up to `long_text` words)."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    recs = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            recs.append({"text": say(rng.randint(2, long_text))})
        elif kind == 1:
            recs.append({"instruct": say(rng.randint(1, 6)), "input": say(rng.randint(0, 4)),
                         "output": say(rng.randint(1, 12))})
        else:
            recs.append({"rounds": [["ask", say(rng.randint(1, 5))], ["ans", say(rng.randint(1, 6))],
                                    ["ask", say(rng.randint(1, 5))], ["ans", say(rng.randint(1, 6))]]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("family, name", [("llama", "gqa_llama3_rope"), ("llama", "mha_bias_untied"),
                                          ("bloom", "heads6_postln"), ("bloom", "tied")])
def test_packed_losses_and_logits_equal_the_samples_alone(tmp_path, tokenizer, family, name):
    ds = load_dataset(write_records(tmp_path / "d.jsonl", 4, seed=3), tokenizer, 512, use_cache=False)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(ds) == 4 and len(set(lengths)) == 4, lengths
    seq_len = sum(lengths) + 5  # one row with room to spare: the padding after it must not matter either
    packed = pack(ds, seq_len, seed=0)
    assert len(packed) == 1 and packed.segments_per_row().tolist() == [4]
    (ids, pos, seg), labels = collate([packed[0]], seq_len, pad_id_of(tokenizer))

    torch.manual_seed(0)
    hf = get_family(family).hf_model_class(tiny_config(family, name, vocab_size=len(tokenizer))).float().eval()
    seq = sequential_from_hf(hf)
    with torch.no_grad():
        logits = seq((ids, pos, seg))[0]
        summed = causal_lm_loss(logits[None], (labels, torch.tensor([1, 1])))  # the packed row's summed CE
        total = 0.0
        for k, s in enumerate(packed.segment_sample.tolist(), 1):
            alone = torch.tensor([ds[s]["input_ids"]])
            ref = hf(input_ids=alone).logits[0]  # transformers, the sample alone: no position ids, no mask
            at = seg[0] == k
            torch.testing.assert_close(logits[at], ref, atol=ATOL, rtol=0, msg=lambda m, k=k: f"segment {k}: {m}")
            own = F.cross_entropy(ref[:-1], torch.tensor(ds[s]["labels"][1:]), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
            seg_labels = labels[0, at]
            assert seg_labels[0] == IGNORE_INDEX  # never predicted from the previous segment's last token
            from_packed = F.cross_entropy(logits[at][:-1], seg_labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
            torch.testing.assert_close(from_packed, own, atol=ATOL, rtol=0)
            total += own.item()
        assert summed.item() == pytest.approx(total, abs=ATOL * len(ds))
        assert int(trained_tokens(packed)[0]) == int(trained_tokens(ds).sum())

        # the premise: without segment isolation and restarting positions, the later samples' logits change
        leaky = seq((ids, (seg > 0).long().cumsum(-1) - 1, (seg > 0).long()))[0]
        assert not torch.allclose(leaky[seg[0] == 4], logits[seg[0] == 4], atol=1e-3)


# ---------------------------------------------------------------------------------------------- invariants


def test_packing_invariants(tmp_path, tokenizer):
    ds = load_dataset(write_records(tmp_path / "d.jsonl", 300, long_text=150), tokenizer, 128, use_cache=False)
    assert ds.stats.truncated > 0 and ds.stats.dropped == 0
    assert ds[-1] == ds[len(ds) - 1] and ds[-len(ds)] == ds[0]  # negative indices, as for a list
    packed = pack(ds, 128, seed=5)
    assert packed[-1] == packed[len(packed) - 1]
    st = packed.stats
    seen = []
    for r in range(len(packed)):
        row = packed[r]
        n = len(row["input_ids"])
        assert 0 < n <= 128 and len(row["labels"]) == len(row["position_ids"]) == len(row["segment_ids"]) == n
        segs = packed.segment_sample[packed.row_segments[r]:packed.row_segments[r + 1]].tolist()
        assert row["segment_ids"] == sorted(row["segment_ids"])
        assert set(row["segment_ids"]) == set(range(1, len(segs) + 1))
        for s, part in zip(segs, segments_of(row), strict=True):
            assert part["position_ids"] == list(range(len(part["input_ids"])))  # restart at 0 per segment
            assert part["input_ids"] == ds[s]["input_ids"]
            assert part["labels"] == [IGNORE_INDEX] + ds[s]["labels"][1:]
            seen.append(s)
    assert sorted(seen) == list(range(len(ds)))  # every kept sample exactly once
    assert trained_tokens(packed).sum() == trained_tokens(ds).sum()
    tokens = int(np.diff(ds.offsets).sum())
    assert (st.samples, st.segments, st.sequences, st.tokens, st.split) == (len(ds), len(ds), len(packed), tokens, 0)
    assert st.dropped == ds.stats.dropped and st.fill == tokens / (len(packed) * 128)
    assert st.efficiency == trained_tokens(ds).sum() / (len(packed) * 128) < st.fill  # trained / total tokens
    assert st.sequences <= -(-tokens // 128) + 5 and st.fill > 0.95  # first-fit decreasing packs tight
    assert pack(ds, 128, seed=5)[7] == packed[7]  # deterministic: every rank packs the same
    (_, pos, seg), labels = collate([packed[0], packed[1]], 160, 0)
    assert (seg[:, 128:] == 0).all() and (labels[:, 128:] == IGNORE_INDEX).all() and (pos[:, 128:] == 0).all()


def test_split_long_pretrain_splits_instead_of_truncating(tmp_path, tokenizer):
    L = 64
    data = tmp_path / "d.jsonl"
    long = {"text": " ".join(WORDS * 16)}
    instruct = {"instruct": "reply", "output": " ".join(WORDS * 4)}
    data.write_text("".join(json.dumps(r) + "\n" for r in (long, instruct, {"text": "short one"})))
    whole = load_dataset(data, tokenizer, 10_000, use_cache=False)
    n_long, n_instruct = (len(whole[i]["input_ids"]) for i in (0, 1))
    assert n_long > 3 * L and n_instruct > L
    cut = load_dataset(data, tokenizer, L, settings=PACKED, use_cache=False)
    ds = load_dataset(data, tokenizer, L, settings=SPLIT, use_cache=False)
    assert cut.stats.truncated == 2 and ds.stats.truncated == 1  # the instruct record is still truncated
    assert ds[0] == whole[0] and ds[1] == cut[1]
    files = file_digests(data)
    assert cache_key(files, tokenizer, L, SPLIT) != cache_key(files, tokenizer, L, PACKED)
    assert cache_key(files, tokenizer, L, PACKED) == cache_key(files, tokenizer, L, TemplateSettings())

    packed = pack(ds, L, seed=0)
    st = packed.stats
    chunks = -(-(n_long - 1) // (L - 1))  # chunks overlap by one token
    assert st.tokens == n_long + chunks - 1 + L + len(ds[2]["input_ids"])  # every token of the long text kept
    assert st.split == 1 and st.segments == 2 + chunks
    assert all(len(packed[r]["input_ids"]) <= L for r in range(len(packed)))
    parts = [part for r in range(len(packed))  # the segments that come from the long text
             for seg, part in zip(packed.segment_sample[packed.row_segments[r]:packed.row_segments[r + 1]].tolist(),
                                  segments_of(packed[r]), strict=True) if seg == 0]
    assert all(p["labels"][0] == IGNORE_INDEX and p["position_ids"][0] == 0 for p in parts)
    ids = whole[0]["input_ids"]
    assert sorted(tuple(p["input_ids"]) for p in parts) == sorted(tuple(ids[i:i + L]) for i in range(0, n_long - 1, L - 1))
    trained = sorted(t for p in parts for t in p["labels"] if t != IGNORE_INDEX)
    assert trained == sorted(ids[1:])  # every token but the text's first, once: none lost at a cut
    for seed in range(4):  # the chunks are placed in a seeded order: data.inspect shows the row of the first one
        packed = pack(ds, L, seed)
        row = packed[packed.row_of_sample(0)]
        assert any(part["input_ids"] == ids[:L] for part in segments_of(row)), seed


def test_a_text_one_token_past_max_seq_len_trains_its_last_token():
    """Cut without overlap, a text of L + 1 tokens left its EOS as a chunk of its own: one untrained token (the
    document's end never learned), and such chunks packed together made rows that train nothing. Each text's
    tokens but its first are trained exactly once, whatever its length."""
    L = 16
    lengths = [L + 1] * 6 + [2 * L - 1, L, 2 * L, 3 * L + 1, 2]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.arange(offsets[-1], dtype=np.int32) + 5  # every token its own id
    labels = ids.copy()
    labels[offsets[:-1]] = IGNORE_INDEX  # a text's first token (BOS) is never a target
    ds = EncodedDataset(ids, labels, offsets, np.arange(len(lengths)), EncodeStats(len(lengths), len(lengths), 0, 0))
    packed = pack(ds, L, seed=0)
    assert (np.diff(packed.seg_offsets) >= 2).all() and packed.stats.split == 9  # all but the L and 2 tokens
    assert all(any(t != IGNORE_INDEX for t in packed[r]["labels"]) for r in range(len(packed)))
    assert sorted(packed.labels[packed.labels != IGNORE_INDEX].tolist()) == sorted(labels[labels != IGNORE_INDEX].tolist())


def random_dataset(seed: int, rows: int, sigma: float, shortest: int, longest: int) -> EncodedDataset:
    """Rows of lognormal lengths (median ~150 tokens), 40% of their labels ignored."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5, sigma, rows).astype(np.int64), shortest, longest)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, 30000, offsets[-1], dtype=np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.4, IGNORE_INDEX, ids).astype(np.int32)
    return EncodedDataset(ids, labels, offsets, np.arange(rows), EncodeStats(rows, rows, 0, 0))


def test_packing_keeps_its_copy_of_the_tokens_and_little_more(monkeypatch):
    """pack() gathered every token through one int64 index of the whole dataset, built from temporaries of that
    size: a peak of 16.6 bytes a token for the 8 kept (here; 5 GB more than kept at 367M tokens, on every reading
    rank). Gathered a block at a time, the peak is the kept copy, the per-segment arrays and a block's index (10.4
    bytes a token here); the rows are those of one whole-dataset gather."""
    import tracemalloc

    from data import packing

    ds = random_dataset(0, 4000, 0.9, 2, 1000)
    ids, labels, offsets, lengths = ds.input_ids, ds.labels, ds.offsets, np.diff(ds.offsets)
    monkeypatch.setattr(packing, "GATHER_BLOCK", 1 << 16, raising=False)
    tracemalloc.start()
    packed = pack(ds, 512, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * len(ids) + 200 * len(lengths) + 40 * (1 << 16), (peak / len(ids), len(ids))  # was 16.6 a token
    seg_len, seg_off = np.diff(packed.seg_offsets), packed.seg_offsets
    start = offsets[packed.segment_sample] + packed.segment_chunk * packing.chunk_stride(512)
    take = np.arange(seg_off[-1]) - np.repeat(seg_off[:-1] - start, seg_len)  # the whole-dataset gather
    want = labels[take]
    want[seg_off[:-1]] = IGNORE_INDEX
    assert np.array_equal(packed.input_ids, ids[take]) and np.array_equal(packed.labels, want)


def test_trained_tokens_are_counted_a_block_of_rows_at_a_time(monkeypatch):
    """trained_tokens over blocks of rows (of unpacked and packed rows, a row longer than a block too) equals the
    whole-dataset count, without a per-token int64 copy of the dataset (9 bytes a token on every reading rank)."""
    import tracemalloc

    from data import packing

    ds = random_dataset(1, 3000, 1.0, 1, 3000)
    ids, lengths = ds.input_ids, np.diff(ds.offsets)
    packed = pack(ds, 1024, seed=0)
    want = [np.add.reduceat(packing.trained_mask(d.labels, d.offsets[:-1]).astype(np.int64), d.offsets[:-1])
            for d in (ds, packed)]
    monkeypatch.setattr(packing, "GATHER_BLOCK", 1000)  # several rows per block, and rows longer than one
    tracemalloc.start()
    got = [trained_tokens(d) for d in (ds, packed)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert peak < 2 * len(ids) + 16 * len(lengths) + 20 * 3000, peak / len(ids)  # was 9 bytes a token (+ 1 for the mask)


def test_eval_rows_are_packed_and_split_as_the_training_rows(tmp_path, tokenizer):
    """With split_long_pretrain the eval set (eval_data_path, plus the share eval_split_ratio holds out) has pretrain
    text longer than max_seq_len: it is packed and split as training's rows are, so every eval call collates (left
    unpacked, such a sample fits no row: the run failed at its first evaluation) and every eval token counts."""
    from training.evaluate import EvalPlan, training_and_eval_rows

    L = 64
    data = write_records(tmp_path / "d.jsonl", 12, long_text=300)
    ds = load_dataset(data, tokenizer, L, settings=SPLIT, use_cache=False)
    ev = load_dataset(data, tokenizer, L, settings=SPLIT, use_cache=False)
    assert max(len(ev[i]["input_ids"]) for i in range(len(ev))) > 2 * L

    def evaluated_tokens(rows) -> int:
        plan, n = EvalPlan(rows, 2, 1, 1, 8, L), 0
        for call in range(plan.calls):
            batches = plan.micro_batches(call, 0, plan.micro_shapes(call, 0), 0)
            assert all(labels.shape[1] <= L for _, (labels, _) in batches)
            n += sum(int((labels != IGNORE_INDEX).sum()) for _, (labels, _) in batches)
        assert n == plan.tokens > 0
        return n

    with pytest.raises(ValueError, match=f"more than the batch length {L}"):
        evaluated_tokens(ev)
    train, rows, samples, _ = training_and_eval_rows(ds, ev, 0.25, True, L, seed=3)
    n_eval = len(samples)
    held = round(len(ds) * 0.25)
    assert n_eval == len(ev) + held and len(np.unique(train.segment_sample)) == len(ds) - held
    assert evaluated_tokens(rows) == int(trained_tokens(rows).sum())
    assert len(np.unique(rows.segment_sample)) == n_eval and rows.stats.split > 0
    from training.rundir import data_fingerprint  # what a resume compares: the eval samples, packed or not

    assert data_fingerprint(training_and_eval_rows(ds, ev, 0.25, False, L, seed=3)[2]) == data_fingerprint(samples)


def test_inspect_shows_packed_sequences_and_efficiency(tmp_path, tokenizer_dir, tokenizer, capsys):
    data = write_records(tmp_path / "d.jsonl", 30)
    cfg = {"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": 128, "seed": 3, "packing": True, "train_micro_batch_size_per_gpu": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = ["--config", str(tmp_path / "cfg.json")]
    assert data_inspect.main([*args, "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    ds = load_dataset(data, tokenizer, 128, settings=PACKED)
    packed, sample = pack(ds, 128, seed=3), ds.sample_of_record(4)
    assert stats["sequences"] == len(packed) and stats["packing_efficiency"] == packed.stats.efficiency
    assert stats["unpacked_efficiency"] == packed.stats.trained / (stats["samples"] * 128) < stats["packing_efficiency"]
    assert stats["unpacked_fill"] == packed.stats.tokens / (stats["samples"] * 128) < stats["packed_fill"]
    assert data_inspect.main([*args, "--stats"]) == 0
    out = capsys.readouterr().out
    assert f"packing efficiency (trained / total tokens): {packed.stats.efficiency:.1%} ({stats['samples']} samples in {len(packed)} sequences" \
        in out and "unpacked with rows padded to max_seq_len" in out  # not what training pads unpacked rows to
    assert data_inspect.main([*args, "--index", "4"]) == 0
    out = capsys.readouterr().out
    row = packed.row_of_sample(sample)
    k = packed.row_segments[row + 1] - packed.row_segments[row]
    assert f"record 4 at {data}:5 -> sample {sample} -> packed sequence {row}: " in out and f"{k} segment(s)" in out
    assert out.count("=== segment ") == k and "=== segment 1: record " in out and f" record 4 at {data}:5, sample {sample}," in out
    assert "--- tokens: segment, position, id, label, text (piece) ---" in out


def test_inspect_packs_the_training_rows_without_what_eval_split_ratio_holds_out(tmp_path, tokenizer_dir, tokenizer,
                                                                                  capsys):
    """Training packs the samples left after the held-out share: inspect shows those sequences, and says when a record
    is held out for evaluation (it was shown packed beside training records it never meets)."""
    from training.evaluate import split_eval

    data = write_records(tmp_path / "d.jsonl", 40)
    cfg = {"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"), "data_path": str(data),
           "max_seq_len": 128, "seed": 3, "packing": True, "eval_split_ratio": 0.25, "eval_interval": 2,
           "train_micro_batch_size_per_gpu": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = ["--config", str(tmp_path / "cfg.json")]
    ds = load_dataset(data, tokenizer, 128, settings=PACKED)
    train, held = split_eval(ds, 0.25, 3)
    packed = pack(train, 128, seed=3)  # what the trainer packs (training_and_eval_rows)
    assert data_inspect.main([*args, "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["held_out"] == len(held) == 10 and stats["sequences"] == len(packed)
    unpacked = data_inspect.dataset_stats(train, 128)  # beside the packed figure: of the same (training) samples
    counts = ("unpacked_efficiency", "unpacked_fill", "tokens", "trained_tokens", "trained_fraction")
    assert [stats[k] for k in counts] == [unpacked[k] for k in counts]  # the trained tokens were the held-out's too
    assert stats["trained_tokens"] == int(trained_tokens(train).sum()) < int(trained_tokens(ds).sum())
    inside = int(train.record_index[0])
    assert data_inspect.main([*args, "--index", str(inside)]) == 0
    out = capsys.readouterr().out
    row = packed.row_of_sample(train.sample_of_record(inside))
    assert f"-> packed sequence {row}: " in out and f"packing: {len(train)} samples -> {len(packed)} sequences" in out
    outside = int(held.record_index[0])
    assert data_inspect.main([*args, "--index", str(outside)]) == 0
    out, err = capsys.readouterr()
    place = f"{data}:{outside + 1}"  # one record per line
    assert f"note: record {outside} at {place} is held out for evaluation (eval_split_ratio 0.25): it is never trained" in err
    assert f"record {outside} at {place} -> sample {ds.sample_of_record(outside)}: " in out and "packed sequence" not in out
