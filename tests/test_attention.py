"""Every attention path that runs on CPU against transformers (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM,
BloomForCausalLM holding the same weights): logits (atol 1e-5, fp32), loss and every gradient, for rows without
padding, right-padded, left-padded and packed; causality and segment isolation for each path; which path each row
kind takes; RoPE, the row kind and the mask built once per stage per micro-batch; and the config check of
`attn_implementation`.

FlexAttention has no backward on CPU (torch 2.13): its forward is checked here; training with it needs CUDA.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models import causal_lm_loss, get_family
from models.attention import BUILDS, CONTEXTS, attn_context, attn_problem
from tests.helpers import assert_causal, assert_segments_isolated, make_batch, sequential_from_hf, tiny_config

ATOL = 1e-5
PADDINGS = {"none": [12, 12, 12], "right": [12, 9, 5], "left": [12, 7, 4]}
CASES = [("llama", "gqa_tied", "auto"), ("llama", "gqa_tied", "sdpa"), ("llama", "gqa_tied", "eager"),
         ("llama", "mha_bias_untied", "auto"), ("llama", "gqa_llama3_rope", "auto"),
         ("qwen2", "tied", "auto"), ("qwen2", "tied", "eager"), ("mistral", "window", "auto"),
         ("bloom", "heads6_postln", "auto"), ("bloom", "tied", "eager"), ("bloom", "untied", "auto")]


def _pair(family: str, name: str, attn: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = get_family(family).hf_model_class(tiny_config(family, name)).float()
    return hf, sequential_from_hf(hf, attn=attn)


def _assert_grads_match(seq, hf) -> None:
    family = get_family(hf.config.model_type)
    n = family.num_blocks(hf.config)
    ours = {family.key_map.to_hf(int(idx), k, n): p.grad for idx, mod in seq.layers.items()
            for k, p in mod.named_parameters()}
    theirs = {k: p.grad for k, p in hf.named_parameters()}  # tied: one entry, both uses summed
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k, g in theirs.items():
        assert g is not None and ours[k] is not None, k
        torch.testing.assert_close(ours[k], g, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _hf_forward(hf, ids, mask, pos, labels):
    kw = {} if hf.config.model_type == "bloom" else {"position_ids": pos}  # Bloom's ALiBi: cumsum(mask) - 1
    return hf(input_ids=ids, attention_mask=mask, labels=labels, **kw)


@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("family, name, attn", CASES)
def test_padded_rows_match_transformers(family, name, attn, padding):
    hf, seq = _pair(family, name, attn)
    ids, mask, pos, seg, labels = make_batch(hf.config.vocab_size, PADDINGS[padding], 12, "left" if padding == "left" else "right")
    out = _hf_forward(hf, ids, mask, pos, labels)
    out.loss.backward()
    logits = seq((ids, pos, seg))
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
    _assert_grads_match(seq, hf)


def packed_batch(vocab: int, seed: int = 3, lengths: tuple[int, int, int] = (5, 4, 3), width: int = 12):
    """Segments of `lengths` tokens packed as [[a, b, pad...], [c, pad...]] in rows of `width`, and the same
    segments as their own right-padded rows: (packed ids, pos, seg, labels), (alone ids, mask, labels), and the
    packed positions of each alone row's tokens."""
    assert lengths[0] + lengths[1] <= width and lengths[2] <= width
    g = torch.Generator().manual_seed(seed)
    segs = [torch.randint(4, vocab, (n,), generator=g) for n in lengths]
    ids = torch.full((2, width), 3)
    pos, seg = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    where = [(0, 0), (0, lengths[0]), (1, 0)]
    for k, ((row, at), s) in enumerate(zip(where, segs, strict=True)):
        n = len(s)
        ids[row, at:at + n], pos[row, at:at + n] = s, torch.arange(n)
        seg[row, at:at + n] = 1 + (k == 1)
        labels[row, at + 1:at + n] = s[1:]  # a segment's first label is never predicted
    alone = torch.full((3, max(lengths)), 3)
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    alone_labels = torch.full((3, max(lengths)), -100)
    for k, s in enumerate(segs):
        alone[k, :len(s)], mask[k, :len(s)], alone_labels[k, :len(s)] = s, 1, s
    return (ids, pos, seg, labels), (alone, mask, alone_labels), where


@pytest.mark.parametrize("family, name, attn", CASES)
def test_packed_rows_match_each_segment_alone_in_transformers(family, name, attn):
    hf, seq = _pair(family, name, attn)
    (ids, pos, seg, labels), (alone, mask, alone_labels), where = packed_batch(hf.config.vocab_size)
    out = _hf_forward(hf, alone, mask, (mask.cumsum(-1) - 1).clamp(min=0), alone_labels)
    out.loss.backward()
    logits = seq((ids, pos, seg))
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    for k, (row, at) in enumerate(where):
        n = int(mask[k].sum())
        torch.testing.assert_close(logits[row, at:at + n], out.logits[k, :n], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
    _assert_grads_match(seq, hf)


@pytest.mark.parametrize("family, name, attn", CASES)
def test_causal_and_segments_isolated(family, name, attn):
    _, seq = _pair(family, name, attn, seed=1)
    assert_causal(seq)
    assert_segments_isolated(seq, atol=ATOL)


@torch.no_grad()
def test_flex_attention_forward_matches_transformers():
    """FlexAttention's block mask (forward only on CPU) on left-padded and packed rows."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    hf, seq = _pair("llama", "gqa_tied", "flex_attention")
    ids, mask, pos, seg, labels = make_batch(hf.config.vocab_size, PADDINGS["left"], 12, "left")
    real = mask.bool()
    torch.testing.assert_close(seq((ids, pos, seg))[real], _hf_forward(hf, ids, mask, pos, labels).logits[real],
                               atol=ATOL, rtol=0)
    (ids, pos, seg, _), (alone, mask, alone_labels), where = packed_batch(hf.config.vocab_size)
    logits, ref = seq((ids, pos, seg)), _hf_forward(hf, alone, mask, None, alone_labels).logits
    for k, (row, at) in enumerate(where):
        n = int(mask[k].sum())
        torch.testing.assert_close(logits[row, at:at + n], ref[k, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn, padding, path", [
    ("auto", "none", "sdpa_causal"), ("auto", "right", "sdpa_causal"), ("auto", "left", "sdpa_varlen"),
    ("auto", "packed", "sdpa_varlen"), ("sdpa", "right", "sdpa_causal"), ("sdpa", "left", "sdpa_mask"),
    ("sdpa", "packed", "sdpa_mask"), ("eager", "right", "eager"), ("flex_attention", "right", "flex")])
def test_each_row_kind_takes_its_path_on_cpu(attn, padding, path):
    if padding == "packed":
        (_, pos, seg, _), _, _ = packed_batch(300)
    else:
        _, _, pos, seg, _ = make_batch(300, PADDINGS[padding], 12, "left" if padding == "left" else "right")
    ctx = attn_context(pos, seg, attn, torch.float32)
    assert ctx.path == path
    assert (ctx.mask is None) == (path in ("sdpa_causal", "sdpa_varlen", "flex"))  # the fast paths: no [B,1,T,T]
    if path == "sdpa_varlen":  # per row, the (start, end) of each segment: what SDPA runs on, one by one
        assert ctx.runs == (((0, 5), (5, 9)), ((0, 3),)) if padding == "packed" else (((0, 12),), ((5, 12),), ((8, 12),))


@pytest.mark.parametrize("family, name", [("llama", "gqa_llama3_rope"), ("bloom", "heads6_postln")])
def test_rope_kind_and_mask_are_built_once_per_stage_per_micro_batch(family, name):
    """A stage's blocks (here: all of them, as one stage) share one RoPE / ALiBi, one row kind and one mask per
    micro-batch; a new micro-batch builds them again; the backward, and a second forward of detached views of
    the same tensors (what DeepSpeed's activation checkpointing recomputes with), build nothing more."""
    _, seq = _pair(family, name, "auto")
    blocks = get_family(family).num_blocks(seq.layers["1"].config if family == "llama" else tiny_config(family, name))
    assert blocks >= 3
    CONTEXTS.clear()
    BUILDS.clear()
    micro = [make_batch(300, PADDINGS[p], 12, "left" if p == "left" else "right", seed=i)
             for i, p in enumerate(["right", "left", "none"])]
    for ids, _, pos, seg, labels in micro:
        causal_lm_loss(seq((ids, pos, seg)), labels).backward()
        seq((ids, pos.detach(), seg.detach()))  # activation checkpointing's recompute: detached views
    if family == "llama":  # rope and the row kind per micro-batch; segment runs only for the left-padded one
        assert dict(BUILDS) == {"rope": 3, "kind": 3, "runs": 1}
    else:  # Bloom's exact path: ALiBi and the additive mask per micro-batch
        assert dict(BUILDS) == {"alibi": 3, "mask": 3}


@pytest.mark.parametrize("name, family, device, problem", [
    ("flash_attention_2", "llama", "cpu", "flash_attention_2 needs a CUDA device (this one is cpu)"),
    ("flex_attention", "llama", "cpu", "flex_attention has no backward on cpu"),
    ("sdpa", "bloom", "cpu", "Bloom's ALiBi attention has one exact path"),
    ("spda", "llama", "cpu", "must be one of 'auto', 'sdpa', 'eager', 'flash_attention_2', 'flex_attention'"),
])
def test_attn_problems(name, family, device, problem):
    assert problem in attn_problem(name, family, device)
    assert attn_problem("auto", family, device) is None and attn_problem("eager", family, device) is None


def test_auto_passes_over_flex_attention_for_a_model_with_attention_dropout(monkeypatch):
    """FlexAttention has no dropout: "auto" takes another exact path for such a model, and naming it is refused (it
    trained packed rows without the dropout that unpacked rows had). On CUDA it is compiled with triton: without
    triton "auto" passes over it too (it crashed at the first packed micro-batch), and naming it is refused."""
    import importlib.util

    from models.attention import choose_path
    from models.llama import LlamaBlockPipe

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert choose_path("auto", "segments", "cuda", torch.float32) == "sdpa_mask"
    assert attn_problem("flex_attention", "llama", "cuda") == ("flex_attention is compiled with triton on CUDA, and "
                                                               "triton is not installed (pip install triton); use "
                                                               "\"auto\" or \"sdpa\"")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    assert choose_path("auto", "segments", "cuda", torch.float32) == "flex"  # what this torch offers on CUDA
    assert choose_path("auto", "segments", "cuda", torch.float32, dropout=True) == "sdpa_mask"
    assert "flex_attention has no attention dropout, and the model's attention_dropout is 0.1" in attn_problem(
        "flex_attention", "llama", "cuda", dropout=0.1)
    assert attn_problem("flex_attention", "llama", "cuda") is None
    assert LlamaBlockPipe(tiny_config("llama", "gqa_tied", attention_dropout=0.1), 0).attn_dropout
    assert not LlamaBlockPipe(tiny_config("llama", "gqa_tied"), 0).attn_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_full_one(dtype, monkeypatch):
    """Chunks of 3 rows over 10 rows (the last chunk short), one chunk with every target ignored."""
    import torch.nn.functional as F

    from models import pipeline

    monkeypatch.setattr(pipeline, "LOSS_CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 50, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (10,), generator=g)
    targets[3:6] = -100  # the second chunk: nothing to learn
    targets[8] = -100
    for reduction in ("sum", "mean"):
        ours = pipeline.chunked_cross_entropy(logits, targets, reduction)
        (g_ours,) = torch.autograd.grad(ours * 1.7, logits)
        ref = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction=reduction)
        (g_ref,) = torch.autograd.grad(ref * 1.7, logits)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
        assert g_ours.dtype == dtype and (g_ours[3:6] == 0).all()
        torch.testing.assert_close(g_ours, g_ref, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    with torch.no_grad():  # evaluation: the loss alone
        assert pipeline.chunked_cross_entropy(logits, targets).item() == pytest.approx(
            F.cross_entropy(logits.float(), targets, reduction="sum").item(), rel=1e-6)


class _Outputs(torch.overrides.TorchFunctionMode):
    """The shapes of the floating-point tensors every torch function returns inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.shapes.append((getattr(func, "__name__", str(func)), tuple(out.shape), out.dtype))
        return out


def test_loss_chunks_are_whole_64_row_tiles(monkeypatch):
    """Chunks of 130 rows' worth of logits run as 128-row chunks (whole tiles for the head's matmul on a GPU);
    fewer than 64 rows stay as they are."""
    from models import pipeline

    hidden, weight = torch.randn(300, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (300,))
    for rows, chunks in ((130, [128, 128, 44]), (40, [40] * 7 + [20])):
        monkeypatch.setattr(pipeline, "LOSS_CHUNK_ELEMENTS", rows * 50)
        with _Outputs() as seen:
            pipeline.chunked_cross_entropy(hidden, targets, weight=weight)
        assert [s[0] for f, s, _ in seen.shapes if f == "linear"] == chunks


def _peak_allocated(fn) -> int:
    """The most bytes torch's CPU allocator held at once during fn() beyond what it held before (the profiler's
    allocation and free events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_holds_one_chunks_buffers_at_a_time(dtype, monkeypatch):
    """Beyond the gradient it keeps for backward ([N, V], the logits' dtype), the chunked loss holds one chunk's
    logits, their fp32 copy (half precision) and their fp32 log-softmax: the estimate's `_logits_bytes`. The
    previous chunk's log-softmax had stayed alive while the next chunk's were made (one fp32 chunk more)."""
    from models import pipeline
    from models.cost import _logits_bytes

    rows, vocab, n = 64, 4096, 1024
    monkeypatch.setattr(pipeline, "LOSS_CHUNK_ELEMENTS", rows * vocab)
    monkeypatch.setattr("models.cost.LOSS_CHUNK_ELEMENTS", rows * vocab)
    hidden = torch.randn(n, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 32, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    peak = _peak_allocated(lambda: pipeline.chunked_cross_entropy(hidden, targets, weight=weight))
    b, chunk = dtype.itemsize, rows * vocab
    expected = n * vocab * b + chunk * (b + 4 + (4 if b == 2 else 0))
    assert _logits_bytes(SimpleNamespace(vocab_size=vocab), n, b) == expected
    assert expected <= peak < expected + chunk  # + small buffers (the targets' masks, the sum): not a fp32 chunk more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "tied", "callable"])
@pytest.mark.parametrize("chunk", [None, 3 * 50], ids=["one-chunk", "chunked"])
def test_head_in_the_loss_equals_logits_then_loss(chunk, kind, dtype, monkeypatch):
    """causal_lm_loss(hidden, labels, head=...) runs the head only at positions with a target (counted) and gives
    the loss and the gradients (hidden, head weight) of causal_lm_loss(head(hidden), labels); a row with no
    target, the (labels, counts) form and a micro-batch with no target at all included. A bias-free linear head
    (nn.Linear, or a tied head's partial(forward_fn, embedding)) runs inside the chunked loss: no [N, V] logits
    exist, only the gradient in the logits' dtype; any other callable is called, then chunked."""
    from functools import partial

    from transformers import LlamaConfig

    from models import pipeline
    from models.llama import LlamaEmbeddingPipe, tied_head_forward

    if chunk:
        monkeypatch.setattr(pipeline, "LOSS_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False).to(dtype)
    hidden = torch.randn(3, 8, 16, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 8), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[1] = -100  # a row with nothing to learn
    labels[2, 6:] = -100  # padding
    rows = []
    if kind == "tied":
        embed = LlamaEmbeddingPipe(LlamaConfig(vocab_size=50, hidden_size=16, num_attention_heads=2)).to(dtype)
        embed.weight.data.copy_(linear.weight.data)
        head, weight = partial(tied_head_forward, embed), embed.weight
    else:
        head, weight = linear, linear.weight
    if kind == "callable":
        head = lambda h: rows.append(h.shape[0]) or linear(h)  # noqa: E731
    assert (pipeline.linear_head_weight(head) is weight) == (kind != "callable")
    fp32 = dtype == torch.float32  # bf16: the head's matmul over other rows may round differently
    loss_tol, grad_tol = (dict(atol=1e-6, rtol=1e-6), dict(atol=1e-6, rtol=1e-5)) if fp32 else \
        (dict(atol=1e-3, rtol=1e-3), dict(atol=1e-2, rtol=1e-2))
    for lab in (labels, (labels, torch.tensor([40, 4]))):
        with _Outputs() as seen:
            ours = pipeline.causal_lm_loss(hidden, lab, head=head)
        g_ours = torch.autograd.grad(ours, (hidden, weight))
        ref = pipeline.causal_lm_loss(torch.nn.functional.linear(hidden, weight), lab)
        g_ref = torch.autograd.grad(ref, (hidden, weight))
        torch.testing.assert_close(ours, ref, **loss_tol)
        # and an independent reference: transformers' shift, torch's cross entropy (summed x 4 / 40 with counts)
        logits_ref = torch.nn.functional.linear(hidden, weight).float()[:, :-1].reshape(-1, 50)
        ce = torch.nn.functional.cross_entropy(logits_ref, labels[:, 1:].reshape(-1), ignore_index=-100,
                                               reduction="mean" if lab is labels else "sum")
        torch.testing.assert_close(ours.float(), ce if lab is labels else ce * 4 / 40, **loss_tol)
        for a, b in zip(g_ours, g_ref, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **grad_tol)
        logits = [(f, s) for f, s, _ in seen.shapes if len(s) == 2 and s[1] == 50 and f != "new_empty"]
        largest = max(s[0] for _, s in logits)
        assert largest == (8 if not chunk or kind == "callable" else 3), logits  # 8 positions have a target
    assert rows == ([3 + 0 + 5] * 2 if kind == "callable" else [])  # targets: row 0 at 4-6, row 1 none, row 2 at 0-4
    nothing = torch.full_like(labels, -100)
    loss = pipeline.causal_lm_loss(hidden, (nothing, torch.tensor([40, 4])), head=head)
    (g_h,) = torch.autograd.grad(loss, hidden)
    assert loss.item() == 0 and not g_h.any()
    with torch.no_grad(), _Outputs() as seen:  # evaluation: the loss alone, no gradient buffer
        ours = pipeline.causal_lm_loss(hidden, labels, head=head)
        ref = pipeline.causal_lm_loss(torch.nn.functional.linear(hidden, weight), labels)
    torch.testing.assert_close(ours, ref, **loss_tol)
    assert not any(f == "new_empty" for f, _, _ in seen.shapes)
