"""Shared pipeline machinery: topology, stage planning, the PipelineModule subclass, a sequential
runner for the same spec list, layer files, the loss and the segment-aware causal mask.

Units vs specs: `model_topo.parts` counts *units*, as the seed does ("bloom-7b has 30 blocks, plus
the two ends, 32"): unit 0 is the embedding, units 1..N the decoder blocks, unit N+1 the head (final
norm + LM head, two specs). Layer files are numbered by spec index and do not depend on the partition.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from pipeft import one_line

from .hf_io import LAYER_FILE, CheckpointError

IGNORE_INDEX = -100


class ModelConfigError(ValueError):
    """A user-facing configuration problem; the message is one line naming the key and the problem."""


# ----------------------------------------------------------------------------------------------
# topology and stage planning (pure functions: validated before any process group exists)


def unknown_key_problem(where: str, keys, known) -> str | None:
    """The one-line problem with the first of `keys` not in `known` (the closest known one suggested), else None: a
    misspelled config key would silently fall back to its default (e.g. "partz": an automatic balance)."""
    known = list(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            return f"{where}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else
                                                      f" (known: {', '.join(known)})")
    return None


def _unknown_keys(where: str, section: dict, known: tuple[str, ...]) -> None:
    if problem := unknown_key_problem(where, section, known):
        raise ModelConfigError(problem)


def parse_topology(model_topo: dict | None, world_size: int) -> tuple[list[str], list[int]]:
    """`model_topo.process_topology` ({axes|axis, dims}) -> (axes, dims); default: all ranks in one pipeline,
    or `len(parts)` stages times data parallelism when only `parts` is given."""
    model_topo = model_topo or {}
    _unknown_keys("model_topo", model_topo, ("process_topology", "parts"))
    pt = model_topo.get("process_topology")
    if pt is not None and not isinstance(pt, dict):
        raise ModelConfigError('model_topo.process_topology must be an object {"axes": ["pipe", "data"], "dims": '
                               f"[P, D]}}, got {json.dumps(pt)}")
    if isinstance(pt, dict):
        _unknown_keys("model_topo.process_topology", pt, ("axes", "axis", "dims"))
    if pt is None:
        parts = model_topo.get("parts")
        pipe = len(parts) if isinstance(parts, list) and parts else world_size
        if world_size % pipe:
            raise ModelConfigError(f"model_topo.parts has {pipe} stages, which does not divide the {world_size} processes")
        return ["pipe", "data"], [pipe, world_size // pipe]
    if "axes" in pt and "axis" in pt:
        raise ModelConfigError("model_topo.process_topology: give 'axes' or the seed's 'axis', not both")
    axes, dims = pt.get("axes", pt.get("axis")), pt.get("dims")
    if not (isinstance(axes, list) and all(isinstance(a, str) for a in axes)):
        raise ModelConfigError(f"model_topo.process_topology.axes must be a list of axis names, got {axes!r}")
    if not set(axes) >= {"pipe", "data"} or not set(axes) <= {"pipe", "data", "model"} or len(set(axes)) != len(axes):
        raise ModelConfigError(f"model_topo.process_topology.axes must name 'pipe' and 'data' (and optionally 'model') once each, got {axes}")
    if not (isinstance(dims, list) and len(dims) == len(axes) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)):
        raise ModelConfigError(f"model_topo.process_topology.dims must be {len(axes)} positive integers (one per axis {axes}), got {dims!r}")
    if "model" in axes and dims[axes.index("model")] != 1:
        raise ModelConfigError("model_topo.process_topology: tensor parallelism ('model' > 1) is not supported; use 'pipe' and 'data'")
    if math.prod(dims) != world_size:
        raise ModelConfigError(f"model_topo.process_topology.dims {dims} needs {math.prod(dims)} processes but {world_size} "
                               f"were started (start {math.prod(dims)} in all: deepspeed --num_gpus or hostfile slots, "
                               "torchrun --nnodes x --nproc-per-node, srun --ntasks)")
    return axes, dims


def balance(costs: Sequence[float], num_parts: int, fits: Callable[[int, int, int], bool] | None = None) -> list[int] | None:
    """Contiguous split of `costs` into `num_parts` non-empty parts minimising the largest part; returns counts.
    `fits(part, a, b)`: whether items [a, b) may form part `part` (a memory limit); None when no split fits."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-part cost splitting the first i items into k parts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                if fits is not None and (best[k - 1][j] == inf or not fits(k - 1, j, i)):
                    continue
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    if best[num_parts][n] == inf:
        return None
    counts, i = [], n
    for k in range(num_parts, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


def plan_stages(unit_sizes: Sequence[int], unit_costs: Sequence[float], num_stages: int,
                parts: Sequence[int] | None = None) -> list[int]:
    """Spec-index boundaries (length num_stages + 1) from explicit unit counts `parts` or a cost balance."""
    n_units = len(unit_sizes)
    if parts is None:
        if num_stages > n_units:
            raise ModelConfigError(f"model_topo.process_topology.dims: {num_stages} pipeline stages but the model has "
                                   f"only {n_units} pipeline units (the embedding, each block, the head)")
        parts = balance(unit_costs, num_stages)
    else:
        if not (isinstance(parts, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in parts)):
            raise ModelConfigError(f"model_topo.parts must be a list of integers, got {parts!r}")
        if len(parts) != num_stages:
            raise ModelConfigError(f"model_topo.parts {list(parts)} has {len(parts)} entries but the topology has {num_stages} pipeline stages")
        if any(p < 1 for p in parts):
            raise ModelConfigError(f"model_topo.parts {list(parts)}: every stage needs at least one unit (no zero or negative entries)")
        if sum(parts) != n_units:
            raise ModelConfigError(
                f"model_topo.parts {list(parts)} sums to {sum(parts)} but the model has {n_units} pipeline units "
                f"(embedding + {n_units - 2} blocks + head)")
    bounds, u = [0], 0
    for p in parts:
        bounds.append(bounds[-1] + sum(unit_sizes[u:u + p]))
        u += p
    return bounds


def parts_of(unit_sizes: Sequence[int], bounds: Sequence[int]) -> list[int]:
    """Units per stage from spec-index boundaries (the inverse of `plan_stages`)."""
    ends = list(itertools.accumulate(unit_sizes))
    return [sum(1 for e in ends if lo < e <= hi) for lo, hi in itertools.pairwise(bounds)]


# ----------------------------------------------------------------------------------------------
# model-side helpers shared by the families


LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the loss (16M: 64 MB in fp32), whatever the vocabulary


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed next-token cross entropy over [N, V] logits, computed N-chunk by N-chunk in fp32 so that the fp32
    logits are never materialised whole. With `weight` ([V, H]; `x` is then the head's input [N, H]) each chunk's
    logits are F.linear(x chunk, weight), so no [N, V] logits exist at all. The gradient (softmax - onehot, in the
    logits' dtype) is computed in the same pass when one is needed (`grad`: the caller's grad mode, which is off
    inside forward), so backward is a multiply (the head's two matmuls with it); ignored rows get 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, rows: int,
                grad: bool) -> torch.Tensor:
        n = x.shape[0]
        g_all = x.new_empty(n, x.shape[1] if weight is None else weight.shape[0]) if grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for a in range(0, n, rows):
            t = targets[a:a + rows]
            ignored = t == IGNORE_INDEX
            safe = t.masked_fill(ignored, 0)[:, None]
            chunk = x[a:a + rows] if weight is None else F.linear(x[a:a + rows], weight)
            logp = torch.log_softmax(chunk.float(), dim=-1)
            del chunk
            total -= logp.gather(1, safe).masked_fill_(ignored[:, None], 0.0).sum()
            if g_all is not None:
                g = logp.exp_()
                g.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=g.dtype))
                g_all[a:a + rows] = g.masked_fill_(ignored[:, None], 0.0)
                del g
            del logp  # before the next chunk's logits: two chunks alive at most, not three
        ctx.save_for_backward(g_all, x if weight is not None else None, weight)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g, x, weight = ctx.saved_tensors
        if weight is None:
            return g * grad_out.to(g.dtype), None, None, None, None
        dx = g.matmul(weight).mul_(grad_out) if ctx.needs_input_grad[0] else None
        dw = g.t().matmul(x).mul_(grad_out) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum",
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum" | "mean") for [N, V] logits, or
    for the logits F.linear(logits, weight) of a bias-free LM head (`weight` [V, H], `logits` then its [N, H]
    input), in chunks of at most LOSS_CHUNK_ELEMENTS logits: the same loss and gradients, never [N, V] in fp32 at
    once, and with `weight` no [N, V] logits at all. Logits that fit one chunk go to F.cross_entropy itself (its
    fused kernels)."""
    vocab = logits.shape[-1] if weight is None else weight.shape[0]
    if logits.shape[0] * vocab <= LOSS_CHUNK_ELEMENTS:
        logits = logits if weight is None else F.linear(logits, weight)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    grad = torch.is_grad_enabled() and (logits.requires_grad or (weight is not None and weight.requires_grad))
    total = _ChunkedCrossEntropy.apply(logits, weight, targets, loss_chunk_rows(vocab), grad)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum()


def loss_chunk_rows(vocab: int) -> int:
    """Positions per chunk of the chunked loss: at most LOSS_CHUNK_ELEMENTS logits, in whole 64-row tiles (the head's
    matmul on a GPU)."""
    rows = LOSS_CHUNK_ELEMENTS // vocab
    return rows - rows % 64 if rows >= 64 else max(1, rows)


def linear_head_weight(head: Callable) -> torch.Tensor | None:
    """The weight W of an LM head that computes F.linear(hidden, W): a bias-free nn.Linear, or a tied head
    (DeepSpeed's partial(forward_fn, module)) whose forward_fn names the module's attribute it multiplies by
    (`forward_fn.linear_weight`). None for any other head: the loss then calls it."""
    if isinstance(head, nn.Linear):
        return head.weight if head.bias is None and type(head).forward is nn.Linear.forward else None
    if isinstance(head, partial) and len(head.args) == 1 and not head.keywords:
        attr = getattr(head.func, "linear_weight", None)
        return None if attr is None else attrgetter(attr)(head.args[0])
    return None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                   head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token cross entropy; labels are aligned with the inputs (shifted here) as in transformers'
    ForCausalLMLoss, -100 ignored; computed in chunks (`chunked_cross_entropy`).

    With `head` (the LM head; `logits` are then the final hidden states [B, T, H]), the logits are computed only
    at the positions that have a target: the same loss and gradients without the head's matmul and the softmax on
    prompt tokens, padding and each row's last position (on SFT data most of them).

    `labels` alone: the token mean of this micro-batch. `(labels, counts)` with int64 counts =
    [trained tokens in the global batch, micro-batches per global batch (GAS x data-parallel size)]:
    this micro-batch's summed loss x counts[1] / counts[0]. DeepSpeed averages micro-batch losses over
    GAS and data-parallel ranks (and scales gradients alike), so the step's loss and gradients become
    the token mean over the whole global batch, as a single-process reference computes it."""
    counts = None
    if isinstance(labels, (tuple, list)):
        labels, counts = labels
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    weight = None
    if head is not None:
        keep = shifted != IGNORE_INDEX
        logits, shifted = logits[keep], shifted[keep]
        weight = linear_head_weight(head)
        if weight is None:
            logits = head(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    if counts is None:
        return chunked_cross_entropy(flat, shifted.reshape(-1), reduction="mean", weight=weight)
    total = chunked_cross_entropy(flat, shifted.reshape(-1), weight=weight)
    return total * counts[1].float() / counts[0].float()


# ----------------------------------------------------------------------------------------------
# running the spec list


def build_specs(specs: Sequence, start: int = 0, stop: int | None = None) -> tuple[dict[int, nn.Module], list[Callable]]:
    """Build specs[start:stop] like DeepSpeed does: tied modules are built once; the first occurrence
    owns the state (and the layer file), later ones call `forward_fn(module, x)`."""

    owned: dict[int, nn.Module] = {}
    tied: dict[str, nn.Module] = {}
    funcs: list[Callable] = []
    for idx in range(start, len(specs) if stop is None else stop):
        spec = specs[idx]
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = owned[idx] = spec.build()
            mod = tied[spec.key]
            funcs.append(mod if spec.forward_fn is None else partial(spec.forward_fn, mod))
        elif isinstance(spec, LayerSpec):
            owned[idx] = spec.build()
            funcs.append(owned[idx])
        else:
            raise TypeError(f"spec {idx} is {type(spec).__name__}, expected LayerSpec or TiedLayerSpec")
    return owned, funcs


class SequentialModel(nn.Module):
    """The same spec list as one plain module in one process (tests, bench/gpu_throughput.py: a single-device reference).
    `layers[str(i)]` is the module owning layer file i."""

    def __init__(self, specs: Sequence):
        super().__init__()
        owned, self._funcs = build_specs(specs)
        self.num_specs = len(specs)
        self.layers = nn.ModuleDict({str(i): m for i, m in owned.items()})

    def forward(self, inputs):
        for f in self._funcs:
            inputs = f(inputs)
        return inputs

    def load_layer_files(self, directory: str | Path) -> None:
        load_layer_files(self.layers, directory)


def load_layer_files(layers: dict | nn.ModuleDict, directory: str | Path) -> None:
    """Load `layer_XX-model_states.pt` into each module of {spec index: module}; strict keys."""
    for idx, mod in layers.items():
        path = Path(directory) / LAYER_FILE.format(int(idx))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: layer file missing")
        mod.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def layer_file_problem(path: Path, e: Exception) -> str:
    """Why the layer file `path` did not load (read or fit its module: `e`), as one line naming it."""
    if not path.is_file():
        return f"{path}: layer file missing"
    said = one_line(e, None)
    if len(said) > 200:  # the sentences that fit (torch's zip errors go on about the file being corrupt)
        said = said[:said.rfind(". ", 0, 200) + 1] if ". " in said[:200] else said[:200] + "..."
    return f"{path}: cannot be loaded ({type(e).__name__}: {said})"


class PipelineModel(PipelineModule):
    """DeepSpeed PipelineModule whose stage bounds come from `stage_bounds_fn(num_stages)` (see
    `plan_stages`: explicit `parts` or a cost balance over units). Only this stage's layers are built."""

    def __init__(self, specs: Sequence, stage_bounds_fn: Callable[[int], list[int]], topology, loss_fn=None,
                 grad_ckpt_layers: list[str] | None = None, **kwargs):
        self._stage_bounds_fn = stage_bounds_fn
        if grad_ckpt_layers:  # decoder blocks only (never the embedding), non-reentrant
            from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

            kwargs.update(activation_checkpoint_interval=1, checkpointable_layers=grad_ckpt_layers,
                          activation_checkpoint_func=non_reentrant_checkpoint)
        super().__init__(layers=specs, topology=topology, loss_fn=loss_fn, partition_method="explicit", **kwargs)
        # The last stage's LM head runs inside the loss, on the positions that have a target (causal_lm_loss's
        # `head`): forward() stops before it. Its module stays where it is (layer files, LoRA, tied weights).
        self.head_in_loss = loss_fn is causal_lm_loss and self._local_stop == self._num_layers
        if self.head_in_loss:
            self.loss_fn = self._loss_with_head
        # DeepSpeed's gradient norm (clipping, fp32 and ZeRO-1 paths) sums over the pipeline group but
        # counts a parameter only on the pipeline's first stage unless it is marked model-parallel: without
        # this, "global" clipping uses stage 0's norm alone. Every parameter a stage owns is its own;
        # the copy of a tied weight on a later stage (ds_pipe_replicated) is counted once, on the first.
        for p in self.parameters():
            p.model_parallel = not getattr(p, "ds_pipe_replicated", False)

    def ensure_trainable(self) -> bool:
        """Give a stage without trainable parameters (LoRA: an embedding- or head-only stage) one zero parameter,
        `grad_placeholder`: DeepSpeed cannot build an optimizer (or a gradient norm) over no parameters. It sits in
        no layer (never in a layer file) and enters the output as 0 x p, so it always gets a zero (or, if the
        stage's gradient is non-finite, a non-finite) gradient and never changes. Returns whether it was added."""
        if any(p.requires_grad for p in self.parameters()):
            return False
        self.placeholder("grad_placeholder")
        return True

    def placeholder(self, name: str) -> nn.Parameter:
        """A zero parameter `name` of this stage in no layer (never in a layer file): it enters the output as 0 x p
        (forward), so it always gets a zero gradient and never changes (see ensure_trainable; training.optim's
        even_groups gives one to a stage lacking a parameter group)."""
        p = nn.Parameter(torch.zeros(1, device=next(self.parameters(), torch.zeros(0)).device))
        p.model_parallel = True
        p.placeholder = True  # not a parameter of the model (training.optim.owned_sizes)
        self.register_parameter(name, p)
        return p

    def get_tied_weights_and_groups(self):
        """Tied weights whose gradients DeepSpeed all-reduces between their stages: a frozen one (LoRA) has none
        (DeepSpeed's bf16 path would read its missing `_hp_grad`)."""
        return [(w, g) for w, g in super().get_tied_weights_and_groups() if w.requires_grad]

    def _loss_with_head(self, hidden: torch.Tensor, labels) -> torch.Tensor:
        return causal_lm_loss(hidden, labels, head=self.forward_funcs[-1])

    def forward(self, forward_input):
        funcs = self.forward_funcs
        if self.head_in_loss:  # every layer but the head (DeepSpeed's forward runs self.forward_funcs)
            self.forward_funcs = funcs[:-1]
        try:
            out = super().forward(forward_input)
        finally:
            self.forward_funcs = funcs
        phs = [p for p in self.parameters(recurse=False) if getattr(p, "placeholder", False)]
        if phs and torch.is_grad_enabled():
            outs = list(out) if isinstance(out, tuple) else [out]
            i = next(i for i, t in enumerate(outs) if t.is_floating_point())
            for ph in phs:
                outs[i] = outs[i] + 0.0 * ph.to(outs[i].dtype).sum()
            out = tuple(outs) if isinstance(out, tuple) else outs[0]
        return out

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = self._stage_bounds_fn(self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _synchronize_tied_weights(self) -> None:
        """DeepSpeed's broadcast of tied weights, outside autograd: an in-place collective on a parameter that
        requires grad is otherwise recorded (c10d::broadcast_ has no autograd kernel: a warning at every backward)."""
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def load_layer_files(self, directory: str | Path) -> None:
        """Load the layer files of the layers this stage owns (then re-broadcast tied weights). A layer that loaded
        its file while being built (`loaded_from`: a 4-bit block, models/quant.py) is skipped; one that failed to
        (`load_problem`) counts as this rank's problem. Collective: a file that does not load (truncated, other keys
        or shapes) on any rank is one CheckpointError naming it on every rank, not a traceback on one while the
        others wait in the tied-weight broadcast."""
        problem = None
        for idx, layer in enumerate(self.forward_funcs):
            path = Path(directory) / LAYER_FILE.format(self._local_start + idx)
            problem = getattr(layer, "load_problem", None)
            if problem is None and hasattr(layer, "load_state_dict") and not getattr(layer, "loaded_from", None):
                try:
                    layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
                except Exception as e:  # noqa: BLE001 - any failure to read or fit it
                    problem = layer_file_problem(path, e)
            if problem:
                break
        found = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, problem)
        if problem := next((p for p in found if p), None):
            raise CheckpointError(problem)
        self._synchronize_tied_weights()

    def reduce_tied_grad_accum(self, engine) -> bool:
        """Make `engine` also sum the tied weights' `grad_accum` over their stages. DeepSpeed's ZeRO-1 optimizer,
        when gradients accumulate in another dtype than the weights' (fp16 with fp32 accumulation; bf16 or fp16 with
        fp32 accumulation and offload_optimizer), moves each backward pass's gradient into `param.grad_accum` and
        clears `.grad`; its pipeline engine's ReduceTiedGrads all-reduces `.grad` only (None then), so each stage
        stepped its own share of the tied gradient and the copies drifted apart. Returns whether it was needed."""
        from deepspeed.runtime.pipe import schedule

        if not self.tied_comms or not getattr(engine.optimizer, "use_grad_accum_attribute", False):
            return False
        table = dict(engine._INSTRUCTION_MAP)
        reduce_tied = table[schedule.ReduceTiedGrads]

        def reduce_tied_grads(engine_self):
            reduce_tied(engine_self)
            for weight, group in self.get_tied_weights_and_groups():
                if getattr(weight, "grad_accum", None) is not None:
                    torch.distributed.all_reduce(weight.grad_accum, group=group)

        table[schedule.ReduceTiedGrads] = reduce_tied_grads
        engine._INSTRUCTION_MAP = table  # the instance's own table (models/wgrad.py's defer_in_engine wraps it)
        return True

    def _get_frozen_parameter_names(self, layer):
        """Frozen parameters, which LoRA checkpoints leave out, and with them the quantisation state bitsandbytes
        stores beside a frozen 4-bit weight (`weight.absmax`, `weight.quant_map`, ...)."""
        names = super()._get_frozen_parameter_names(layer)
        if isinstance(layer, nn.Module) and names:
            frozen = set(names)
            names += [k for k in layer.state_dict() if k not in frozen
                      and any(k[:i] in frozen for i in range(len(k)) if k[i] == ".")]
        return names
