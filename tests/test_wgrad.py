"""Deferred weight gradients (models/wgrad.py): the same gradients, bit for bit, as the plain backward pass, through
autograd (so gradient hooks run), with and without activation checkpointing, for Llama-shaped and Bloom blocks;
and the stages that defer. The training reference tests (test_train_reference.py) run every 2-stage full
fine-tuning case with it on, against transformers."""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from models import get_family
from models.attention import set_attn_implementation
from models.cost import LoraShape, Setup, deferred_bytes, stage_memory
from models.wgrad import WeightGradStore, deferred_micro_batches, make_deferrable
from tests.helpers import tiny_config


@pytest.mark.parametrize("family, name, ckpt", [("llama", "mha_bias_untied", False), ("llama", "gqa_tied", True),
                                                ("bloom", "tied", False)])
def test_deferred_weight_grads_equal_the_plain_backward(family, name, ckpt):
    fam = get_family(family)
    config = set_attn_implementation(fam.prepare_config(tiny_config(family, name)), "auto")
    torch.manual_seed(0)
    plain = fam.block_class(config, 0)
    deferred = copy.deepcopy(plain)
    store = WeightGradStore()
    linears = sum(isinstance(m, torch.nn.Linear) for m in deferred.modules())
    assert make_deferrable(deferred, store) == linears > 0
    hooked = []
    for p in deferred.parameters():  # what DeepSpeed's gradient hooks see
        p.register_post_accumulate_grad_hook(lambda p: hooked.append(p))
    b, t, h = 3, 10, config.hidden_size
    pos = torch.arange(t).expand(b, t).contiguous()
    seg = torch.ones(b, t, dtype=torch.long)
    grads_in = {}
    for label, block, defer in (("plain", plain, [False] * 4), ("deferred", deferred, [False, False, True, True])):
        grads_in[label] = []
        for i, d in enumerate(defer):
            x = torch.randn(b, t, h, generator=torch.Generator().manual_seed(i)).requires_grad_()

            def run(x, block=block):
                return block((x, pos, seg))[0]

            store.start(i, d)  # as the engine does before the forward pass ...
            out = checkpoint(run, x, use_reentrant=False) if ckpt else run(x)
            store.start(i, d)  # ... and before the backward pass (where checkpointing recomputes)
            out.square().mean().backward()
            store.stop()
            grads_in[label].append(x.grad)
        if label == "deferred":
            assert sorted(store.pending) == [2, 3] and store.held_bytes > 0
            before = {n: p.grad.clone() for n, p in deferred.named_parameters()}
            store.flush()
            assert not store.pending and not store.deferring
            changed = {n for n, p in deferred.named_parameters() if not torch.equal(p.grad, before[n])}
            assert changed == {n for n, m in deferred.named_modules() if isinstance(m, torch.nn.Linear)
                               for n in (f"{n}.weight",)}  # only the linear weights waited (biases did not)
    assert all(torch.equal(a, b) for a, b in zip(grads_in["plain"], grads_in["deferred"], strict=True))
    for (n, p), q in zip(plain.named_parameters(), deferred.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    assert len(hooked) == 4 * sum(1 for _ in deferred.parameters())  # once per micro-batch and parameter


def test_frozen_linears_are_left_alone_and_the_stages_that_defer():
    fam = get_family("llama")
    config = fam.prepare_config(tiny_config("llama", "gqa_tied", num_hidden_layers=8))
    block = fam.block_class(config, 0)
    block.mlp.requires_grad_(False)
    assert make_deferrable(block, WeightGradStore()) == 4  # q, k, v, o; the frozen MLP is not routed
    assert [deferred_micro_batches(s, 8) for s in range(4)] == [0, 2, 3, 4]
    assert deferred_micro_batches(3, 2) == deferred_micro_batches(1, 2) == 2
    # the memory model: stage s > 0 holds s + 1 micro-batches' linear inputs and output gradients more (2 blocks each here),
    # full fine-tuning only
    parts = [3, 2, 2, 3]  # embedding + 2 blocks | 2 | 2 | 2 + head
    on, off = Setup(2, 64, 4, grad_accum=8), Setup(2, 64, 4, grad_accum=8, defer_wgrad=False)
    extra = [a.activations - b.activations for a, b in zip(stage_memory(fam, config, on, parts),
                                                            stage_memory(fam, config, off, parts), strict=True)]
    per_block = deferred_bytes(fam, config, 2) * 2 * 64
    assert extra == pytest.approx([0, 2 * 2 * per_block, 3 * 2 * per_block, 4 * 2 * per_block])
    h, kv, inter = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    assert deferred_bytes(fam, config, 2) == 2 * ((h + h + h + inter) + (h + 2 * kv + h + 2 * inter + h))
    lora = Setup(2, 64, 4, grad_accum=8, lora=LoraShape(8, ("q_proj",)))
    assert [m.activations for m in stage_memory(fam, config, lora, parts)] == \
        [m.activations for m in stage_memory(fam, config, replace(lora, defer_wgrad=False), parts)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deferral_inside_deepspeeds_pipeline_engine_gives_the_same_steps(ds, precision):
    """The real engine (one stage, in this process) with its instruction table wrapped by `defer_in_engine`: two
    steps equal those of the plain engine bit for bit. bf16 runs DeepSpeed's BF16_Optimizer, which moves each
    backward pass's bf16 gradients into fp32 right after it; the deferred ones go the same way."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    from models import PipelineModel, causal_lm_loss, plan_stages
    from models.wgrad import defer_in_engine

    fam = get_family("llama")
    config = set_attn_implementation(fam.prepare_config(tiny_config("llama", "mha_bias_untied")), "auto")
    conf = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    if precision == "bf16":
        conf |= {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(4, 300, (2, 12), generator=g) for _ in range(8)]
    pos, seg = torch.arange(12).expand(2, 12).contiguous(), torch.ones(2, 12, dtype=torch.long)
    counts = torch.tensor([2 * 4 * 11, 4])  # trained tokens of the step, micro-batches

    def run(defer: bool):
        torch.manual_seed(0)
        model = PipelineModel(fam.layer_specs(config), lambda n: plan_stages(fam.unit_sizes(config),
                              fam.unit_costs(config), n, None), ProcessTopology(axes=["pipe", "data"], dims=[1, 1]),
                              loss_fn=causal_lm_loss)
        engine, *_ = ds.initialize(model=model, config=conf, model_parameters=[p for p in model.parameters()])
        assert engine.using_bf16_optimizer == (precision == "bf16")
        store = WeightGradStore()
        if defer:
            assert make_deferrable(model, store) == 7 * config.num_hidden_layers
            defer_in_engine(engine, store, 2)
        for step in range(2):
            engine.train_batch(iter([((i, pos, seg), (i, counts)) for i in ids[4 * step:4 * step + 4]]))
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}, store.flushed

    (plain, _), (deferred, flushed) = run(False), run(True)
    assert flushed == 2 * 2  # two micro-batches of each step waited
    assert plain.keys() == deferred.keys()
    for n, p in plain.items():
        assert torch.equal(p, deferred[n]), n


def test_flush_frees_what_the_deferred_micro_batches_held():
    """The kept (x, dy) die with the flush: a kept x that still carried its autograd history would close a cycle
    (x -> its graph -> an earlier deferred linear's node -> the group that holds x) that Python's collector cannot
    see through, and each step's deferred inputs would stay alive for good (the last stage of the CPU bench grew by
    ~50 MB per step)."""
    fam = get_family("llama")
    config = set_attn_implementation(fam.prepare_config(tiny_config("llama", "gqa_tied")), "auto")
    torch.manual_seed(0)
    block, store = fam.block_class(config, 0), WeightGradStore()
    make_deferrable(block, store)
    b, t = 2, 8
    pos, seg = torch.arange(t).expand(b, t).contiguous(), torch.ones(b, t, dtype=torch.long)
    x = torch.randn(b, t, config.hidden_size, requires_grad=True)
    store.start(0, True)
    out = block((block((x, pos, seg))[0], pos, seg))[0]  # two passes: the second's inputs come from deferred linears
    out.square().mean().backward()
    store.stop()
    held = [weakref.ref(k) for group in store.pending.values() for _, a, g in group for k in (a, g)]
    assert len(held) == 2 * 2 * sum(isinstance(m, torch.nn.Linear) for m in block.modules())
    store.flush()
    del out, x
    gc.collect()
    assert [r for r in held if r() is not None] == []


def test_timeline_model_is_1f1b_and_the_rule_never_lengthens_a_step():
    """bench/pipeline_timeline.py, the model the deferral rule is argued with: without deferral, balanced stages
    take the 1F1B step (m + p - 1)(F + B); deferring s + 1 is never slower than ZB-H1's s, and faster when the last
    stage is the heavier one."""
    from bench.pipeline_timeline import RULES, step_ms

    for p, m in ((1, 4), (2, 8), (4, 8), (4, 3), (8, 16)):
        assert step_ms([50.0] * p, [100.0] * p, [45.0] * p, m, [0] * p) == (m + p - 1) * 150
    for p, m, heavier in ((2, 8, 0.0), (4, 8, 0.0), (8, 16, 0.0), (2, 8, 20.0), (4, 16, 20.0), (8, 16, 20.0)):
        fwd, bwd, w = [50.0] * (p - 1) + [50.0 + heavier], [100.0] * (p - 1) + [100.0 + 2 * heavier], [45.0] * p
        zb_h1 = step_ms(fwd, bwd, w, m, [RULES["s (ZB-H1)"](s, m) for s in range(p)])
        ours = step_ms(fwd, bwd, w, m, [deferred_micro_batches(s, m) for s in range(p)])
        assert ours <= zb_h1 and (ours < zb_h1 or not heavier), (p, m, heavier, ours, zb_h1)
