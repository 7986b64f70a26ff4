"""Attention for the pipeline blocks: the kernel each micro-batch's rows allow, and work done once per stage.

Rows are told apart by their segment ids ([B, T] int64, 0 = padding):
- "causal": every row is one segment, right-padded (the unpacked default). No mask tensor: SDPA with
  `is_causal` and native GQA (the flash kernel on CUDA), or flash-attn's `flash_attn_func`. Exact for the
  real tokens: the pads come last, and their outputs carry no loss.
- "segments": packed rows (several segments) or left padding. flash-attn's `flash_attn_varlen_func` over
  `cu_seqlens` (CUDA with flash-attn installed), else FlexAttention with a block mask (CUDA; it has no
  backward on CPU), else on the CPU causal SDPA segment by segment ("sdpa_varlen": no work across segments
  or on padding), else SDPA with the dense segment mask. Every path is exact per segment.

`attn_implementation` (config key): "auto" picks the fastest exact path per row kind; "sdpa", "eager",
"flash_attention_2", "flex_attention" force one (eager: transformers' eager attention with an additive
mask, the reference). Bloom has one exact path, its ALiBi (eager) attention: it takes "auto" or "eager", other
names are refused (`attn_problem`). A sliding window (Mistral,
Qwen2) is not implemented: a sequence longer than the window is refused (exact or refused, never different).

Once per stage, not per block: every block of a stage receives the very same position_ids / segment_ids
tensors, so `StageContexts`, keyed by those tensors' storage, builds RoPE cos/sin, the row kind, the mask /
cu_seqlens / block mask (and Bloom's ALiBi) once per micro-batch and serves them to all the stage's blocks,
and to activation checkpointing's recompute while the same tensors come back. `BUILDS` counts the builds.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from launch.cuda_only import flash_attn_available, flex_available, flex_problem

from .pipeline import ModelConfigError

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
PIPEFT_ATTENTION = "pipeft"  # the name our attention function is registered under in transformers
BUILDS: Counter = Counter()  # what StageContexts built: "rope", "kind", "mask", "cu_seqlens", "block_mask", "alibi"


def set_attn_implementation(config: Any, name: str) -> Any:
    """`config` for the pipeline's layer specs with attention implementation `name` (see ATTN_IMPLEMENTATIONS);
    transformers' own `_attn_implementation` is left alone (the blocks call through PIPEFT_ATTENTION)."""
    config.pipeft_attn_implementation = name
    return config


def attn_problem(name: str, family: str, device_type: str, precision: str | None = None,
                 dropout: float = 0.0) -> str | None:
    """Why `attn_implementation` `name` cannot run for `family` on `device_type` in `precision` ("fp32", "bf16",
    "fp16"; None: not checked) with the model's `attention_dropout`, None when it can."""
    if name not in ATTN_IMPLEMENTATIONS:
        return f"must be one of {', '.join(map(repr, ATTN_IMPLEMENTATIONS))}"
    if family == "bloom" and name not in ("auto", "eager"):
        return "Bloom's ALiBi attention has one exact path (eager, with the mask and ALiBi built once per stage); use \"auto\""
    if name == "flash_attention_2":
        if device_type != "cuda":
            return f"flash_attention_2 needs a CUDA device (this one is {device_type})"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attention_2 needs the flash-attn package (pip install flash-attn), which is not installed"
        if precision == "fp32":
            return "flash_attention_2 runs in bf16 or fp16 only (flash-attn has no fp32 kernels); enable bf16, or use \"auto\""
    if name == "flex_attention" and (problem := flex_problem(device_type)):
        return f"flex_attention {problem}; use \"auto\" or \"sdpa\""
    if name == "flex_attention" and dropout:
        return (f"flex_attention has no attention dropout, and the model's attention_dropout is {dropout:g} "
                "(config.json); use \"auto\" or \"sdpa\"")
    return None


def row_kind(segment_ids: torch.Tensor) -> str:
    """"causal" when every row is one segment followed by right padding (ids 1..1 0..0), else "segments"."""
    one = bool((segment_ids.max() <= 1) & (segment_ids[:, 0] == 1).all()
               & (segment_ids[:, 1:] <= segment_ids[:, :-1]).all())
    return "causal" if one else "segments"


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64 segment ids (0 = padding) -> [B, 1, T, T] bool, True = may attend.

    Causal, never across segments, never to padding; a padding query sees only itself so no row is
    empty (its output is never used)."""
    t = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    keep = same & (segment_ids[:, None, :] != 0)
    keep &= torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    keep |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    return keep[:, None]


def additive_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,T] segment ids -> [B,1,T,T] float: 0 where attention is allowed, the dtype's min elsewhere (what
    eager attention adds to the scores)."""
    keep = segment_causal_mask(segment_ids)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def _storage_key(t: torch.Tensor) -> tuple:
    """The same for a tensor and its detached views (activation checkpointing's recompute receives `detach()`ed
    inputs: same storage, same version counter); `_version` moves when the tensor is changed in place."""
    return t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version


class StageContexts:
    """Per-micro-batch values built once per stage: keyed by the storage (and in-place version) of the
    position_ids / segment_ids tensors (held, so their memory is never reused while the entry lives) and a tag; the `size` newest are kept
    (1F1B keeps at most one micro-batch per stage in flight, plus the recompute)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def get(self, tensors: tuple, tag: tuple, build: Callable[[], Any], owner: object = None) -> Any:
        """The value for (tensors, tag), built by `build()` the first time; `owner` (e.g. the model's config,
        whose id is in the tag) is held with the entry so that its id cannot be reused while the entry lives."""
        key = (*(_storage_key(t) for t in tensors), *tag)
        hit = self.entries.get(key)
        if hit is not None and hit[1] is owner:
            self.entries.move_to_end(key)
            return hit[2]
        value = build()
        BUILDS[tag[0]] += 1
        self.entries[key] = (tensors, owner, value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


CONTEXTS = StageContexts()  # one process = one stage


@dataclass(frozen=True)
class AttnContext:
    """How one micro-batch's attention runs on this stage, and what that path needs."""

    path: str  # "sdpa_causal" | "sdpa_mask" | "sdpa_varlen" | "eager" | "flash" | "flash_varlen" | "flex"
    mask: torch.Tensor | None = None  # bool [B,1,T,T] (sdpa_mask) or additive float (eager)
    runs: tuple = ()  # per row, the (start, end) of each segment's tokens (sdpa_varlen)
    cu_seqlens: torch.Tensor | None = None  # int32 [segments + 1] over the flattened batch (flash_varlen)
    max_seqlen: int = 0
    block_mask: Any = None  # FlexAttention BlockMask (flex)


def choose_path(impl: str, kind: str, device_type: str, dtype: torch.dtype | None = None, dropout: bool = False) -> str:
    """The path for rows of `kind` ("causal" | "segments"); "auto" passes over FlexAttention, which has no dropout,
    for a model with attention dropout."""
    if impl == "eager":
        return "eager"
    if impl == "sdpa":
        return "sdpa_causal" if kind == "causal" else "sdpa_mask"
    if impl == "flash_attention_2":
        return "flash" if kind == "causal" else "flash_varlen"
    if impl == "flex_attention":
        return "flex"
    if kind == "causal":  # auto: SDPA's is_causal path is flash attention on CUDA already
        return "sdpa_causal"
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flash_attn_available():
        return "flash_varlen"  # flash-attn has half-precision kernels only
    if flex_available(device_type) and not dropout:
        return "flex"
    return "sdpa_varlen" if device_type == "cpu" else "sdpa_mask"  # one kernel call per segment: for the CPU


def segment_runs(segment_ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, (start, end) of each run of one segment id other than 0 (padding), in order. Packing writes each
    segment contiguously with its own id, so a run is a segment."""
    seg = segment_ids.cpu().numpy()
    out = []
    for row in seg:
        cuts = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), len(row)]
        out.append(tuple((a, b) for a, b in itertools.pairwise(cuts) if row[a] != 0))
    return tuple(out)


def _cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence starts over the flattened [B*T] batch: every segment starts at position 0, and so does each pad
    (a length-1 sequence of its own); -> (int32 cu_seqlens, max length)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _block_mask(segment_ids: torch.Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = segment_ids.shape

    def document_causal(bi, hi, qi, ki):  # noqa: ARG001  (the head index: one mask for every head)
        return (segment_ids[bi, qi] == segment_ids[bi, ki]) & (qi >= ki) & ((segment_ids[bi, ki] != 0) | (qi == ki))

    return create_block_mask(document_causal, b, None, t, t, device=segment_ids.device)


def attn_context(position_ids: torch.Tensor, segment_ids: torch.Tensor, impl: str, dtype: torch.dtype,
                 dropout: bool = False) -> AttnContext:
    """This micro-batch's attention context on this stage, built once (see StageContexts). `dropout`: whether the
    model has attention dropout."""
    pair = (position_ids, segment_ids)
    kind = CONTEXTS.get(pair, ("kind",), lambda: row_kind(segment_ids))
    path = choose_path(impl, kind, segment_ids.device.type, dtype, dropout)
    if path == "sdpa_mask":
        return AttnContext(path, mask=CONTEXTS.get(pair, ("mask", "bool"), lambda: segment_causal_mask(segment_ids)))
    if path == "sdpa_varlen":
        return AttnContext(path, runs=CONTEXTS.get(pair, ("runs",), lambda: segment_runs(segment_ids)))
    if path == "eager":
        return AttnContext(path, mask=CONTEXTS.get(pair, ("mask", dtype), lambda: additive_mask(segment_ids, dtype)))
    if path == "flash_varlen":
        cu, longest = CONTEXTS.get(pair, ("cu_seqlens",), lambda: _cu_seqlens(position_ids))
        return AttnContext(path, cu_seqlens=cu, max_seqlen=longest)
    if path == "flex":
        return AttnContext(path, block_mask=CONTEXTS.get(pair, ("block_mask",), lambda: _block_mask(segment_ids)))
    return AttnContext(path)


_compiled_flex: Callable | None = None


def _sdpa_per_segment(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: tuple, dropout: float,
                      scaling: float | None) -> torch.Tensor:
    """Causal SDPA on each segment alone (q [B,H,T,D], k/v [B,KV,T,D] -> [B,T,H,D]); a padding token's output is
    its own value, as under the dense segment mask (a pad attends only to itself)."""
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b, segs in enumerate(runs):
        pieces, at = [], 0
        for start, end in segs:
            if start > at:  # padding before this segment
                pieces.append(value[b, :, at:start].repeat_interleave(groups, dim=0))
            pieces.append(F.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1)[0])
            at = end
        if at < query.shape[2]:
            pieces.append(value[b, :, at:].repeat_interleave(groups, dim=0))
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows).transpose(1, 2).contiguous()


def pipeft_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     pipeft_ctx: AttnContext | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface, run by the path in `pipeft_ctx`. q [B,H,T,D], k/v [B,KV,T,D] ->
    ([B,T,H,D], None)."""
    global _compiled_flex
    window = kwargs.get("sliding_window")  # Mistral / Qwen2 pass their window: exact only while it never binds
    if window is not None and query.shape[2] > window:
        raise ModelConfigError(f"a sequence of {query.shape[2]} tokens is longer than the model's sliding_window "
                               f"{window}, which the pipeline's attention does not implement; use max_seq_len <= {window}")
    ctx = pipeft_ctx if pipeft_ctx is not None else AttnContext("sdpa_mask", mask=attention_mask)
    if ctx.path == "sdpa_causal":
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, is_causal=True)
    if ctx.path == "sdpa_mask":
        return sdpa_attention_forward(module, query, key, value, ctx.mask, dropout, scaling, is_causal=False)
    if ctx.path == "sdpa_varlen":
        return _sdpa_per_segment(query, key, value, ctx.runs, dropout, scaling), None
    if ctx.path == "eager":
        return eager_attention_forward(module, query, key, value, ctx.mask, scaling=scaling, dropout=dropout)
    if ctx.path == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if _compiled_flex is None and query.is_cuda:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        run = _compiled_flex if query.is_cuda else flex_attention  # compiled on CUDA; eager (forward only) elsewhere
        out = run(query, key, value, block_mask=ctx.block_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B,T,heads,D]
    p = dropout if module.training else 0.0
    if ctx.path == "flash":
        return flash_attn_func(q, k, v, dropout_p=p, softmax_scale=scaling, causal=True), None
    b, t = q.shape[:2]
    out = flash_attn_varlen_func(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]),
                                 v.reshape(b * t, *v.shape[2:]), ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen,
                                 ctx.max_seqlen, dropout_p=p, softmax_scale=scaling, causal=True)
    return out.reshape(b, t, *out.shape[1:]), None


AttentionInterface.register(PIPEFT_ATTENTION, pipeft_attention)
