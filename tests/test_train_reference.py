"""train_ds.py under the real deepspeed launcher against a single-process reference: the same weights in
the family's HF model (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, BloomForCausalLM), torch AdamW, the same global
batches, loss = token mean over the global batch. Per-step losses (rtol 1e-4) and the weights exported by pp_to_hg
(atol 1e-5) must match. With a tied embedding/head on two stages, both copies must end identical, and the loss
runs in chunks of 8 positions with the tied head inside it (models.pipeline: no [N, V] logits).

Adam's first step is nearly sign(g), so a gradient error that keeps signs (a scale) only shows from
step 2 on: hence several steps, and gradient clipping stated explicitly (DeepSpeed's default is 1.0).
Adam's eps is 1e-6 on both sides: with 1e-8, a weight whose gradient is near zero (1e-9) turns the last-bit
differences of another summation order (2 replicas, 2 stages) into a 3e-5 different update on some CPUs.

With "packing", the run trains on packed sequences; the reference runs each packed segment alone through
transformers (batched, padded), which gives the same token-mean loss as the packed global batch
(test_packing.py shows per-sample equality of packed and alone)."""

from __future__ import annotations

import inspect
import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from data.collate import collate, pad_id_of
from data.encode import load_dataset
from data.packing import pack
from data.templates import TemplateSettings
from models import get_family
from models.convert import hg_to_pp, pp_to_hg
from models.hf_io import TOKENIZER_FILES
from models.wgrad import deferred_micro_batches
from tests.helpers import run_deepspeed, segments_of, tiny_config
from training.batches import BatchPlan, step_micro_batches
from training.optim import lion_reference_update, param_groups

pytestmark = pytest.mark.distributed

STEPS, MICRO, GAS, SEQ, LR, WD, BETAS, SEED = 6, 2, 4, 128, 2e-3, 0.01, (0.9, 0.95), 7
LION_LR, LION_BETAS = 3e-4, (0.9, 0.99)
EPS = 1e-6
LOSS_CHUNK = 8  # positions per chunk of the loss in the tied-weights worker's runs (the head inside the loss)
WORDS = "pipeline stage layer token batch loss gradient weight model data train answer question reply".split()


def write_records(path, n: int = 100) -> None:
    """Mixed pretrain / instruct records of very different lengths: micro-batches get unequal trained tokens."""
    rng = random.Random(0)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0:
                rec = {"text": say(rng.randint(3, 25))}
            else:
                rec = {"instruct": say(rng.randint(2, 8)), "output": say(rng.randint(1, 14))}
                if i % 2:
                    rec["input"] = say(rng.randint(1, 5))
            f.write(json.dumps(rec) + "\n")


class LionReference:
    """The textbook Lion update (training.optim.lion_reference_update), per parameter, with the groups' decay."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float]):
        self.groups, self.lr, self.betas = groups, lr, betas
        self.moments = {id(p): torch.zeros_like(p) for g in groups for p in g["params"]}

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                lion_reference_update(p, p.grad, self.moments[id(p)], self.lr, self.betas, g["weight_decay"])


def reference_losses(hf_dir, dataset, plan: BatchPlan, pad_id: int, clip: float, packing: bool, opt: str = "adamw",
                     wrap=None, steps: int = STEPS, norms: list | None = None, **load_kwargs):
    """Plain transformers + torch AdamW (or the Lion formula) over the same global batches, no weight decay on
    biases and norm weights, clipping by global norm when clip > 0; packed sequences are cut into their
    segments, each run alone. `wrap(model)` may return another model to train (e.g. peft's LoRA model);
    `load_kwargs` go to from_pretrained (e.g. a quantization_config); `norms`, if given, receives each step's
    global gradient norm before clipping."""
    family = get_family(json.loads((hf_dir / "config.json").read_text())["model_type"])
    model = family.hf_model_class.from_pretrained(str(hf_dir), dtype=torch.float32, **load_kwargs)
    family.prepare_config(model.config)  # the attention implementation the pipeline uses (sdpa / eager)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters  # Bloom: ALiBi from the mask
    if wrap is not None:
        model = wrap(model)
    # trained in train mode, as the pipeline: from_pretrained returns eval mode, and bitsandbytes' eval-mode CPU
    # shortcut repacks a 4-bit weight whose input needs no grad with bf16 block scales, for good (a different base)
    model.train()
    groups = param_groups(model, WD)
    if wrap is None:
        assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": WD, "no_decay": 0.0}
    opt = LionReference(groups, LION_LR, LION_BETAS) if opt == "lion" else \
        torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    losses, device = [], next(model.parameters()).device  # load_kwargs may place it (device_map)
    for step in range(steps):
        idx = plan.global_indices(*plan.position(step), real=True)  # an incomplete last batch: its samples only
        rows = [dataset[int(i)] for i in idx]
        (ids, pos, seg), labels = collate([s for r in rows for s in segments_of(r)] if packing else rows, SEQ, pad_id)
        ids, pos, seg, labels = (t.to(device) for t in (ids, pos, seg, labels))
        logits = model(input_ids=ids, attention_mask=(seg > 0).long(), **({"position_ids": pos} if takes_positions else {})).logits
        target = F.pad(labels, (0, 1), value=-100)[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)  # inf: the norm
        if norms is not None:
            norms.append(float(norm))
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("procs, dims, family, name, clip, ckpt, packing, opt, defer_more", [
    # the tied embedding/head on the first and last of 3 stages; every stage defers one more micro-batch's weight
    # gradients than train_ds.py would: the first keeps received gradients (DeepSpeed's receive buffer) as dy, and the
    # middle one keeps them past its last forward passes, whose activations DeepSpeed receives into the same buffer
    (3, [3, 1], "llama", "gqa_tied", 1.0, False, False, "adamw", 1),
    # clipping by the norm over both stages and both replicas, the tied embedding/head counted once; group_by_length;
    # no drop_last; a tied embedding/head on each replica's first and last stage
    (4, [2, 2], "llama", "gqa_llama3_rope_tied", 1.0, False, False, "adamw+grouped", 0),
    (2, [2, 1], "llama", "mha_bias_untied", 0.0, True, False, "adamw", 0),  # activation checkpointing of the decoder blocks
    (2, [2, 1], "bloom", "tied", 1.0, True, False, "adamw", 0),  # tied embedding/head on different stages (auto balance), checkpointing
    (1, [1, 1], "bloom", "tied", 1.0, False, False, "adamw", 0),  # one stage: the embedding and the tied head on the same stage
    (2, [2, 1], "llama", "mha_bias_untied", 1.0, False, True, "adamw+grouped", 0),  # packed sequences, group_by_length
    (2, [2, 1], "mistral", "window", 0.0, False, False, "lion", 0),  # Mistral; Lion (lion-pytorch) vs the Lion formula
    (2, [2, 1], "qwen2", "tied", 1.0, False, False, "adamw", 0),  # q/k/v biases; Qwen2.5's tied embedding/head on 2 stages
], ids=["pipe3-tied-clip", "pipe2xdata2-clip-grouped", "pipe2-noclip-gradckpt", "bloom-pipe2-tied-gradckpt", "bloom-pipe1",
        "pipe2-packing-grouped", "mistral-pipe2-lion", "qwen2-pipe2-tied"])
def test_training_matches_single_process_reference(tmp_path, tokenizer, procs, dims, family, name, clip, ckpt, packing,
                                                   opt, defer_more):
    # 3 stages: a block on each (the auto balance gives the last stage the head alone, with no linear to defer)
    topo = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": [2, 1, 2]}}
    # 2 x 2: also the epoch's incomplete last global batch (2 samples of 16, in one micro-batch: replica 1 holds no
    # sample at all)
    over = topo if dims[0] == 3 else {"dataloader_drop_last": False} if dims == [2, 2] else None
    check_against_reference(tmp_path, tokenizer, procs, dims, family, name, clip, ckpt, packing, opt, over=over,
                            defer_more=defer_more)


def check_against_reference(tmp_path, tokenizer, procs, dims, family, name, clip, ckpt, packing, opt, launch=None,
                            over: dict | None = None, rel: float = 1e-4, atol: float = 1e-5, defer_more: int = 0,
                            ref_state: dict | None = None) -> list[float]:
    """One case of the test above; returns the run's losses. `launch(config_path, procs)` starts train_ds.py and
    returns its output (default: the deepspeed launcher on CPU); the tied-weights worker is only started by the
    default. `over`: training config keys set over the case's (e.g. bf16 on a GPU, bench/gpu_checks.py), checked
    with losses within `rel` and exported weights within `atol` of the reference. `defer_more`: every stage defers
    that many more micro-batches than train_ds.py would (the tied-weights worker's --defer-more). `ref_state`, if
    given, receives the reference's final weights (bench/gpu_checks.py checks bf16 updates against them)."""
    opt, grouped = opt.removesuffix("+grouped"), opt.endswith("+grouped")
    drop_last = (over or {}).get("dataloader_drop_last", True)
    steps = STEPS if drop_last else STEPS + 1  # without drop_last, a step past the 6 full ones: the incomplete one
    torch.manual_seed(0)
    hf = get_family(family).hf_model_class(tiny_config(family, name, vocab_size=len(tokenizer)))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp")
    # packed: enough for STEPS; without drop_last, a last step of one sample: the other replica's rows are all empty
    write_records(tmp_path / "train.jsonl", 300 if packing else 100 if drop_last else 97)
    config = {
        "model_path": str(tmp_path / "pp"), "save_path": str(tmp_path / "out"), "data_path": str(tmp_path / "train.jsonl"),
        "max_seq_len": SEQ, "max_steps": steps, "seed": SEED, "use_grad_ckpt": ckpt, "data_cache_dir": str(tmp_path / "cache"),
        "packing": packing, "group_by_length": grouped, "pad_to_multiple_of": 16,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}},
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                                                  "torch_adam": True}},
    }
    if opt == "lion":
        config["optimizer"] = {"type": "Lion", "params": {"lr": LION_LR, "betas": list(LION_BETAS), "weight_decay": WD,
                                                          "use_triton": False}}
    config.update(over or {})
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    tied_stages = dims[0] > 1 and hf.config.tie_word_embeddings
    assert defer_more == 0 or tied_stages, "defer_more is the tied-weights worker's option"
    per_stage = [min(GAS, deferred_micro_batches(s, GAS) + defer_more) for s in range(dims[0])]  # whose dW wait
    if tied_stages:  # train_ds.py's Trainer, then both stages' copies of the tied weight are compared
        assert launch is None, "the tied-weights check runs its own worker under the deepspeed launcher"
        # ... with the loss chunked at LOSS_CHUNK rows x vocabulary: the tied head runs inside it, chunk by chunk
        out = run_deepspeed("tests/workers/train_tied.py", ["--config", str(tmp_path / "cfg.json"), "--out-dir",
                                                            str(tmp_path), "--defer-more", str(defer_more),
                                                            "--loss-chunk", str(LOSS_CHUNK * len(tokenizer))],
                            num_procs=procs).stdout
    elif launch is not None:
        out = launch(tmp_path / "cfg.json", procs)
    else:
        out = run_deepspeed("train_ds.py", ["--config", str(tmp_path / "cfg.json")], num_procs=procs).stdout
    assert bool(re.search(r"activation checkpointing: decoder blocks per stage \[[1-9]", out)) == ckpt, out[-2000:]
    # a stage of no decoder block (an LM head alone: its weight is the loss's F.linear) has no linear to defer
    parts = json.loads(re.search(r"its units \(model_topo.parts counts them, the final norm is the head's\): (\[.*\])",
                                 out)[1])
    ends, blocks = np.cumsum([0, *parts]), sum(parts) - 2  # units: the embedding, the blocks, the head
    per_stage = [n if range(max(ends[s], 1), min(ends[s + 1], blocks + 1)) else 0 for s, n in enumerate(per_stage)]
    if opt == "lion":  # the log says which update ran (bench/gpu_checks.py looks for the triton kernel on CUDA)
        use_triton = config["optimizer"]["params"]["use_triton"]
        assert ("optimizer: Lion with the triton kernel" if use_triton else "optimizer: Lion with the torch update") in out, \
            out[-2000:]
    if tied_stages:
        reports = [json.loads((tmp_path / f"tied-rank{r}.json").read_text()) for r in range(procs)]
        last, replicas = dims[0] - 1, dims[1]
        assert [r["stage"] for r in reports] == [rank // replicas for rank in range(procs)]  # axes pipe, data
        for rank, r in enumerate(reports):  # each replica's embedding stage and head stage hold a copy; they agree,
            if r["stage"] in (0, last):     # and with the other replicas' copies
                ends = [rank % replicas, last * replicas + rank % replicas]
                assert len(r["tied"]) == 1 and all(t["ranks"] == ends and t["max_abs_diff"] == 0 == t["replica_max_abs_diff"]
                                                   for t in r["tied"].values()), r
            else:  # a middle stage holds no tied module
                assert r["tied"] == {}, r
        # full fine-tuning: stage s > 0 deferred the weight gradients of each step's last s + 1 micro-batches (stage 0
        # none), each + defer_more
        # (the losses and weights below are those of the plain backward)
        assert [r["deferred"] for r in reports] == [0 if ckpt else per_stage[r["stage"]] * steps for r in reports], reports
        # the last stage's loss ran its head in chunks of LOSS_CHUNK positions: more chunks than micro-batches
        assert all(r["head_chunks"] == 0 if r["stage"] < last else r["head_chunks"] > steps * GAS for r in reports), reports
    deferred = f"deferred weight gradients: the last {per_stage} micro-batches per stage"
    assert (deferred in out) == (any(per_stage) and not ckpt), out[-2000:]

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    dataset = load_dataset(str(tmp_path / "train.jsonl"), tokenizer, SEQ, tmp_path / "cache", TemplateSettings(packing=packing))
    dataset = pack(dataset, SEQ, SEED) if packing else dataset
    plan = BatchPlan(len(dataset), MICRO, GAS, dims[1], SEED, dataset.offsets[1:] - dataset.offsets[:-1], grouped,
                     drop_last=drop_last, pad_multiple=16, max_seq_len=SEQ)
    lengths = [m["seq_len"] for m in metrics]  # each micro-batch padded to its longest row, a multiple of 16
    assert all(n % 16 == 0 and n <= SEQ for n in lengths)
    assert packing or len(set(lengths)) > 1, lengths
    micro_shapes = [plan.micro_shapes(*plan.position(s), 0) for s in range(steps)]
    assert lengths == [max(n for r in range(dims[1]) for _, n in plan.micro_shapes(*plan.position(s), r))
                       for s in range(steps)]  # the step's longest, on every replica
    # rows x padded length of every micro-batch of every replica, from the batches themselves
    computed = [sum(int(ids.numel()) for r in range(dims[1]) for (ids, _, _), _ in
                    step_micro_batches(dataset, plan, np.ones(len(dataset), np.int64), *plan.position(s), r,
                                       plan.micro_shapes(*plan.position(s), r), 0)) for s in range(steps)]
    assert [m["computed_tokens"] for m in metrics] == computed
    assert all(m["tokens"] <= m["computed_tokens"] for m in metrics) and (packing or any(
        m["tokens"] < m["computed_tokens"] for m in metrics))
    assert packing or any(len({n for _, n in m}) > 1 for m in micro_shapes), micro_shapes  # lengths differ in a step
    assert packing or any(len({r for r, _ in m}) > 1 for m in micro_shapes), micro_shapes  # and rows
    if tied_stages:  # each stage's forward passes got its replica's micro-batches, each padded to its own longest
        # row: of several lengths in a step with the engine's dynamic_shape, else with static shapes
        for rank, r in enumerate(reports):
            micro = [plan.micro_shapes(*plan.position(s), rank % dims[1]) for s in range(steps)]
            assert r["forwards"] == [[*shape, len(set(m)) > 1] for m in micro for shape in m], (rank, r["forwards"], micro)
        assert dims[1] == 1 or {len(set(m)) > 1 for m in micro} == {True, False}, micro  # 2 x 2 (grouped): both kinds
    if packing:  # the log line, and metrics count the samples in each step's sequences
        st = dataset.stats
        assert f"packing: {st.samples} samples -> {st.sequences} sequences of {SEQ}, efficiency {st.efficiency:.1%}" in out
        per_step = [int(dataset.segments_per_row()[plan.global_indices(*plan.position(s))].sum()) for s in range(steps)]
        assert [m["samples"] for m in metrics] == per_step
        assert all(m["sequences"] == plan.global_batch < m["samples"] for m in metrics)
    assert dataset.stats.dropped == 0 and plan.steps_per_epoch * plan.global_batch <= len(dataset) if drop_last else \
        plan.steps_per_epoch == steps and 0 < len(plan.global_indices(0, steps - 1, real=True)) <= MICRO and \
        all(i < 0 for r in range(1, dims[1]) for mb in plan.micro_indices(0, steps - 1, r) for i in mb)
    # the premise: micro-batches carry unequal numbers of trained tokens
    per_micro = [sum(int((torch.tensor(dataset[int(i)]["labels"][1:]) != -100).sum()) for i in mb)
                 for mb in plan.micro_indices(0, 0, 0)]
    assert len(set(per_micro)) > 1, per_micro

    ref_norms = []
    ref_losses, final = reference_losses(tmp_path / "hf", dataset, plan, pad_id_of(tokenizer), clip, packing, opt,
                                         steps=steps, norms=ref_norms)
    if ref_state is not None:
        ref_state.update(final)
    for m, ref in zip(metrics, ref_losses, strict=True):
        assert m["loss"] == pytest.approx(ref, rel=rel), (m["step"], m["loss"], ref)
    assert ref_losses[-1] < ref_losses[0]
    if launch is None:  # metrics.jsonl's grad_norm: the model's global norm before clipping, each weight once (tied
        # ones too: both stages hold the tied gradient, summed) over every stage and replica
        assert [m["grad_norm"] for m in metrics] == pytest.approx(ref_norms, rel=1e-5), [m["grad_norm"] for m in metrics]

    assert (tmp_path / "out" / "latest").read_text() == f"global_step{steps}"
    pp_to_hg(tmp_path / "out", tmp_path / "exported")
    exported = {}
    for f in (tmp_path / "exported").glob("*.safetensors"):
        exported.update(load_file(str(f)))
    expected = {k: v for k, v in final.items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(exported) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(exported[k].float(), v.float().cpu(), atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        assert not torch.equal(v, hf.state_dict()[k]), f"{k} was never updated"
    for f in TOKENIZER_FILES:  # through hg_to_pp, training's save_path and pp_to_hg, byte for byte
        if (tmp_path / "hf" / f).is_file():
            assert (tmp_path / "exported" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes(), f
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    assert type(loaded) is type(hf)
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in exported.items())
    return [m["loss"] for m in metrics]
