"""Deferred weight gradients: the drain of the 1F1B pipeline schedule without the weight-gradient matmuls on its
critical path (the "W" of zero-bubble pipeline schedules, Qi et al. 2023).

A linear layer's backward is two matmuls: the input gradient (dx = dy W), which the previous stage waits for, and
the weight gradient (dW = dy^T x), which only the optimizer step needs. At the end of a step, the gradient of the
last micro-batch goes from the last stage to the first one stage after another, and each stage's full backward
sits on that chain while the stages after it have nothing left to do. Here a stage's trainable block linears
keep (x, dy) of its last `k` micro-batches instead of computing dW in the backward pass: the input gradient
leaves at once, and the deferred dW are computed at the end of the step (`flush`, before DeepSpeed reduces and
steps), while the stages before it are still busy. Same arithmetic: each dW is the matmul autograd computes, and
it reaches the parameter through autograd (so DeepSpeed's gradient hooks run once, with it), one micro-batch at a
time in the same order, so the gradients are bit-identical to the plain backward. A deferred micro-batch's
linears take a detached weight, so its backward pass does not touch the weight's gradient at all.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """The deferred (weight, x, dy) of the current step, by micro-batch. `start(i, defer)` says, before micro-batch
    i's forward pass and again before its backward pass (where activation checkpointing builds the graph), whether
    its weight gradients wait."""

    def __init__(self) -> None:
        self.deferring = False
        self.group: list | None = None
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.reused: set[int] = set()  # storages DeepSpeed writes again within the step: a dy kept there is copied
        self.flushed = 0  # micro-batches whose weight gradients were deferred, over the run

    def start(self, micro_batch: int, defer: bool) -> None:
        self.deferring = defer
        self.group = self.pending.setdefault(micro_batch, []) if defer else None

    def stop(self) -> None:
        self.deferring, self.group = False, None

    def flush(self, before=None, after=None) -> None:
        """Every deferred dW, accumulated into its parameter by autograd, micro-batch by micro-batch; `before` and
        `after` run around each micro-batch's (the optimizer's backward prologue and epilogue)."""
        for _, group in sorted(self.pending.items()):
            if group:
                self.flushed += 1
                if before is not None:
                    before()
                torch.autograd.backward([w for w, _, _ in group],
                                        [g.flatten(0, -2).t().mm(x.flatten(0, -2)) for _, x, g in group])
                if after is not None:
                    after()
        self.reset()

    def reset(self) -> None:
        self.pending = {}
        self.stop()

    @property
    def held_bytes(self) -> int:
        seen = {id(t): t for group in self.pending.values() for _, x, g in group for t in (x, g)}
        return sum(t.numel() * t.element_size() for t in seen.values())


class _DeferredLinear(torch.autograd.Function):
    """F.linear on a detached weight: the backward pass computes the input (and bias) gradient and leaves
    (weight, x, dy) in `group`; autograd holds no edge to the weight (so no gradient hook fires for it now)."""

    @staticmethod
    def forward(ctx, x, detached, bias, group, module):
        ctx.save_for_backward(x, detached)
        ctx.has_bias, ctx.group, ctx.module = bias is not None, group, module  # the module: no autograd edge
        return F.linear(x, detached, bias)

    @staticmethod
    def backward(ctx, grad):
        x, detached = ctx.saved_tensors
        if grad.untyped_storage().data_ptr() in ctx.module._wgrad_store.reused:  # received (the stage's last linear)
            grad = grad.clone()
        # x without its history: kept with it, x -> its graph -> an earlier deferred linear -> this group -> x would
        # be a cycle through autograd's nodes that the garbage collector cannot break (every step's kept tensors leak)
        ctx.group.append((ctx.module.weight, x.detach(), grad))
        gx = grad.matmul(detached) if ctx.needs_input_grad[0] else None
        gb = grad.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    store = self._wgrad_store
    if store.deferring and torch.is_grad_enabled():
        return _DeferredLinear.apply(x, self.weight.detach(), self.bias, store.group, self)
    return F.linear(x, self.weight, self.bias)


def make_deferrable(module: nn.Module, store: WeightGradStore) -> int:
    """Route every plain nn.Linear under `module` whose weight is trained through `store`; returns how many."""
    n = 0
    for sub in module.modules():
        if type(sub) is nn.Linear and sub.weight.requires_grad:
            sub._wgrad_store = store
            sub.forward = types.MethodType(_forward, sub)
            n += 1
    return n


def defers(enabled: bool, lora: bool, grad_ckpt: bool) -> bool:
    """Whether training defers weight gradients: `defer_weight_grads` on, full fine-tuning (LoRA's adapters have
    little to defer), no activation checkpointing (what is kept would be the activations it drops)."""
    return enabled and not lora and not grad_ckpt


def deferred_micro_batches(stage: int, micro_batches: int) -> int:
    """How many of its last micro-batches a stage defers: `stage` + 1, the first stage none (nothing waits for its
    input gradients). Each deferred backward pass leaves the chain of last backward passes the step ends on, and
    its weight gradients run while the stages before it still work. Zero-bubble's memory-neutral ZB-H1 defers s;
    one more shortens the step when a later stage is the slower one (the head's, usually) and equals s when the
    stages are balanced: `python bench/pipeline_timeline.py` (a 1F1B timeline model) gives 1,483 -> 1,463 ms a step
    with the CPU bench's measured stage times, 3,480 -> 3,450 ms on 8 stages whose last is a sixth heavier, the
    same step balanced; 2s is slower than s + 1 on 4 or 8 balanced stages. Each deferred micro-batch keeps its
    linears' inputs and output gradients (about two thirds of a Llama block's activations; models/cost.py counts
    them). Measured on the CPU
    bench, the second stage deferring 2 against 1: median 1.06x tokens/s over 12 alternating rounds (single rounds
    0.86-1.17x: that VM's noise is larger than the model's 1.4%)."""
    return min(micro_batches, stage + 1) if stage else 0


def defer_in_engine(engine, store: WeightGradStore, k: int) -> None:
    """Make DeepSpeed's pipeline engine defer the weight gradients of each step's last `k` backward passes on this
    stage and compute them before the step's gradient reduction (its ReduceTiedGrads instruction). Uses the
    engine's private `_INSTRUCTION_MAP`, `grad_layer` (the receive buffer of the incoming gradient: the dy of the
    stage's last linear, copied when kept, since DeepSpeed receives the next gradients and, from the same pool, the
    next activations there), and the bf16 optimizer's `clear_lp_grads` / `update_hp_grads` / `immediate_grad_update`."""
    from deepspeed.runtime.pipe import schedule

    table = dict(engine._INSTRUCTION_MAP)
    forward, backward = table[schedule.ForwardPass], table[schedule.BackwardPass]
    reduce_tied = table[schedule.ReduceTiedGrads]
    count = {"forward": 0, "backward": 0}

    def run(kind, instruction):
        def step(self, buffer_id):
            if kind == "forward" and not torch.is_grad_enabled():  # eval_batch: nothing to defer
                return instruction(self, buffer_id)
            defer = count[kind] >= self.micro_batches - k
            if kind == "backward" and defer:
                received = self.grad_layer if isinstance(self.grad_layer, (list, tuple)) else [self.grad_layer]
                store.reused = {t.untyped_storage().data_ptr() for t in received if t is not None}
            store.start(count[kind], defer)
            count[kind] += 1
            try:
                return instruction(self, buffer_id)
            finally:
                store.stop()
                store.reused = set()
        return step

    def reduce_tied_grads(self):
        opt = self.optimizer
        if getattr(self, "using_bf16_optimizer", False) and not opt.immediate_grad_update:
            # DeepSpeed's bf16 optimizer moves each backward pass's bf16 gradients into its fp32 ones right after
            # it (clear_lp_grads before, update_hp_grads after): the same for each deferred micro-batch
            store.flush(opt.clear_lp_grads, lambda: opt.update_hp_grads(clear_lp_grads=False))
        else:  # fp32, fp16, ZeRO-1 and the bf16 optimizer's immediate update read .grad or hook its accumulation
            store.flush()
        return reduce_tied(self)

    train_batch = engine.train_batch

    def train_batch_from_a_clean_state(*args, **kwargs):  # counts per step; a step that raised leaves nothing
        store.reset()
        count["forward"] = count["backward"] = 0
        return train_batch(*args, **kwargs)

    table[schedule.ForwardPass], table[schedule.BackwardPass] = run("forward", forward), run("backward", backward)
    table[schedule.ReduceTiedGrads] = reduce_tied_grads
    engine._INSTRUCTION_MAP = table  # the instance's own table: _exec_schedule looks it up on self
    engine.train_batch = train_batch_from_a_clean_state
