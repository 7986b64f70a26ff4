"""Every check that needs a GPU, in one run: each figure printed, a summary table at the end, exit 1 if one fails.

    python bench/gpu_checks.py [--out DIR]             # a machine with one CUDA GPU
    python bench/gpu_checks.py --device cpu --quick    # the same plumbing on the CPU, tiny sizes

On a lent machine with a time limit, stop it with SIGINT (the figures so far, the table and the count are still
printed) and bring back the summary and the logs, not --out's model and checkpoint dirs:

    timeout -k 30 -s INT 535 python3 bench/gpu_checks.py --out /tmp/gc; cp /tmp/gc/summary.json $OUT/;
    tar czf $OUT/logs.tgz -C /tmp/gc $(cd /tmp/gc && ls *.log)

Besides torch, transformers and peft it needs deepspeed, bitsandbytes and lion-pytorch (README "GPU checks":
how to carry them as wheels to a machine that cannot install). Sections (run in the order 5, 1, 6, 2, 3, 4: the
quick figures first; summary.json is rewritten after each check, so a run stopped by a time limit keeps them):
1. attention: every path that runs on the device ("auto": SDPA's flash kernel for one-segment rows, flash-attn's
   varlen kernel or FlexAttention for packed and left-padded rows; "sdpa": the dense mask; "eager";
   "flex_attention"; "flash_attention_2"), on rows without padding, right- and left-padded, and packed, Llama and
   Bloom, in bf16: the pipeline model's logits and gradients against transformers' fp32 model on the device,
   beside transformers' own bf16 error (pass: ours <= 2 x theirs + a floor); and in fp32 (logits atol 1e-4,
   gradients rel 1e-4).
2. training through the deepspeed launcher on the device (one process, one stage) against the suite's
   single-process reference (tests/test_train_reference.py, on the CPU): fp32 (losses rel 1e-4, exported weights
   atol 1e-5), with activation checkpointing, on packed rows (the varlen path), Lion with its triton kernel
   against the Lion formula, Bloom; and bf16, untied and tied head (losses rel 3e-2; each weight's update,
   exported - init, within rel 0.5 of the reference's, rounded to bf16, in norm: a weight never updated scores 1).
3. QLoRA: nf4 base weights quantised on the device, trained through the launcher, against transformers +
   bitsandbytes + peft on the same device (losses rel 1e-4).
4. memory: the memory model's prediction against max_memory_allocated, the 0.87B Llama of 5. trained through the
   launcher (bf16, full and LoRA; pass within 10%).
5. throughput: bench/train_throughput.py --gpu (PP=1, bf16, a 0.87B Llama, 16 layers of hidden 2048, at 2048 tokens,
   micro-batches of 4 and 8 rows; the fast path and the dense mask: tokens/s, MFU in PaLM's convention (full
   attention) and causal (attention FLOPs halved); --profile N: where a step's time goes), beside the device's own
   bf16 matmul rate.
6. loss: bench/loss_memory.py at Llama-3-8B's last stage (4,096 positions, hidden 4,096, vocabulary 128,256), bf16
   and fp32: the head inside the chunked loss against the head then the chunked loss, max_memory_allocated and
   time (pass: less memory, loss and gradients within rel 1e-2 in bf16, 1e-5 in fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[dict] = []  # {"section", "check", "figure", "status"}: "ok", "FAIL", "info" or "skipped: why"
SUMMARY: dict = {}  # "path" (summary.json), "head" (device, versions): rewritten after every check


INFO = "info"  # a figure with no pass mark (a rate, a ratio)


def record(section: str, check: str, figure: str, ok: bool | str | None, why: str = "") -> None:
    status = INFO if ok == INFO else "ok" if ok else "FAIL" if ok is not None else f"skipped: {why}"
    RESULTS.append({"section": section, "check": check, "figure": figure, "status": status})
    print(f"  [{status}] {check}: {figure}", flush=True)
    if "path" in SUMMARY:  # a run stopped at a time limit keeps every figure taken so far
        write_summary()


def write_summary() -> None:
    """summary.json, whole or not at all (written aside, then renamed: a kill mid-write keeps the previous one)."""
    path = SUMMARY["path"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**SUMMARY["head"], "results": RESULTS}, indent=1))
    os.replace(tmp, path)


def guarded(section: str, fn, *args) -> None:
    """Run one section; an exception is a failed check (the other sections still run)."""
    print(f"\n== {section}", flush=True)
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        traceback.print_exc()
        record(section, "ran to the end", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", False)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------------------ 1. attention


def _rows(quick: bool):
    """{kind: (ids, mask, pos, seg, labels)} and the packed batch, from the suite's helpers."""
    from tests.helpers import make_batch
    from tests.test_attention import packed_batch

    t = 12 if quick else 256
    lengths = {"none": [t] * 3, "right": [t, t * 3 // 4, t // 4 + 1], "left": [t, t // 2 + 2, t // 8 + 1]}
    rows = {k: make_batch(300, v, t, "left" if k == "left" else "right") for k, v in lengths.items()}
    packed = packed_batch(300, lengths=(5, 4, 3) if quick else (100, 80, 150), width=t)
    return rows, packed


def _rel(ours: dict, ref: dict) -> float:
    num = sum(float((ours[k] - g).pow(2).sum()) for k, g in ref.items())
    return (num / sum(float(g.pow(2).sum()) for g in ref.values())) ** 0.5


def attention(device, quick: bool) -> None:
    import torch

    from launch.cuda_only import flash_attn_available, flex_available
    from models import causal_lm_loss, get_family
    from models.attention import CONTEXTS, attn_context, attn_problem
    from tests.helpers import sequential_from_hf, tiny_config

    rows, ((pids, ppos, pseg, plabels), (alone, amask, alabels), where) = _rows(quick)
    paths = ["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"]
    for family_name, cfg_name in (("llama", "gqa_tied"), ("bloom", "tied")):
        family = get_family(family_name)
        torch.manual_seed(0)
        hf = family.hf_model_class(tiny_config(family_name, cfg_name, vocab_size=300)).float()
        takes_pos = family_name != "bloom"  # Bloom's ALiBi comes from the mask

        def hf_run(model, ids, mask, pos, labels, takes_pos=takes_pos):
            model.zero_grad(set_to_none=True)
            kw = {"position_ids": pos.to(device)} if takes_pos else {}
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), **kw)
            out.loss.backward()
            return out.logits.float(), float(out.loss), {k: p.grad.float() for k, p in model.named_parameters()}

        for dtype in (torch.bfloat16, torch.float32):
            ref_model = copy.deepcopy(hf).to(device)
            hf16 = copy.deepcopy(hf).to(device, dtype)
            for attn in paths:
                label = f"{family_name} {str(dtype).removeprefix('torch.')} {attn}"
                precision = "bf16" if dtype == torch.bfloat16 else "fp32"
                if why := attn_problem(attn, family_name, device.type, precision):
                    if family_name == "llama":
                        record("attention", label, "-", None, why)
                    continue
                seq = sequential_from_hf(hf, attn=attn).to(device, dtype)
                n_blocks = family.num_blocks(hf.config)
                def check(seq, kind, label=label, dtype=dtype, attn=attn, ref_model=ref_model, hf16=hf16,
                          family=family, n_blocks=n_blocks, hf_run=hf_run, family_name=family_name):
                    CONTEXTS.clear()
                    if kind == "packed":
                        ref = hf_run(ref_model, alone, amask, (amask.cumsum(-1) - 1).clamp(min=0), alabels)
                        theirs = hf_run(hf16, alone, amask, (amask.cumsum(-1) - 1).clamp(min=0), alabels)
                        ids, pos, seg, labels = pids, ppos, pseg, plabels
                    else:
                        ids, mask, pos, seg, labels = rows[kind]
                        ref = hf_run(ref_model, ids, mask, pos, labels)
                        theirs = hf_run(hf16, ids, mask, pos, labels)
                    seq.zero_grad(set_to_none=True)
                    d = [t.to(device) for t in (ids, pos, seg, labels)]
                    # Bloom runs its one exact path whatever is asked (models/bloom.py: eager, ALiBi built per stage)
                    path = "eager, ALiBi" if family_name == "bloom" else attn_context(d[1], d[2], attn, dtype).path
                    logits = seq((d[0], d[1], d[2]))
                    loss = causal_lm_loss(logits, d[3])
                    loss.backward()
                    ours_g = {family.key_map.to_hf(int(i), k, n_blocks): p.grad.float()
                              for i, mod in seq.layers.items() for k, p in mod.named_parameters()}
                    if kind == "packed":  # each segment's logits at its packed place
                        pairs = [(logits[r, a:a + int(amask[k].sum())].float(), ref[0][k, :int(amask[k].sum())],
                                  theirs[0][k, :int(amask[k].sum())]) for k, (r, a) in enumerate(where)]
                        err = max(float((o - f).abs().max()) for o, f, _ in pairs)
                        hf_err = max(float((t - f).abs().max()) for _, f, t in pairs)
                    else:
                        real = rows[kind][1].bool().to(device)
                        err = float((logits.float()[real] - ref[0][real]).abs().max())
                        hf_err = float((theirs[0][real] - ref[0][real]).abs().max())
                    g_err, g_hf = _rel(ours_g, ref[2]), _rel(theirs[2], ref[2])
                    loss_err = abs(float(loss) - ref[1]) / abs(ref[1])
                    if dtype == torch.float32:
                        ok = err <= 1e-4 and g_err <= 1e-4 and loss_err <= 1e-5
                    else:
                        ok = err <= 2 * hf_err + 1e-2 and g_err <= 2 * g_hf + 1e-2 and loss_err <= 1e-2
                    record("attention", f"{label} {kind} rows (path {path})",
                           f"logits max err {err:.2e} (transformers {hf_err:.2e}), grads rel err {g_err:.2e} "
                           f"(transformers {g_hf:.2e}), loss rel err {loss_err:.1e}", ok)
                for kind in (*rows, "packed"):
                    try:
                        check(seq, kind)
                    except Exception as e:  # noqa: BLE001 - one failed check, the others still run
                        traceback.print_exc()
                        record("attention", f"{label} {kind} rows", f"{type(e).__name__}: {str(e)[:200]}", False)
    if device.type == "cuda":
        print(f"  flash-attn installed: {flash_attn_available()}; FlexAttention: {flex_available('cuda')}")


# ------------------------------------------------------------------------------------------------ 2./3. training


LAUNCH_TIMEOUT = 300  # s per training launch (under a minute each on an H200, the memory section's two included):
# a hung one costs this much of a time-limited run, not all of it


def _terminated_with_parent() -> None:
    """In a launcher's child before exec: SIGTERM when this script dies, even by SIGKILL (a time limit's `-k`), which
    DeepSpeed's launcher passes on to its ranks (Linux; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(signum, frame) -> None:
    """SIGTERM (`timeout`'s default signal, a lent machine's end) as Ctrl-C: the launch in flight is stopped, and the
    figures so far, the table and the count are printed."""
    raise KeyboardInterrupt


def _launcher(device_type: str, logs: Path):
    """launch(config_path, procs) for check_against_reference: train_ds.py under the deepspeed launcher, one
    process on `device_type`; the output is kept in `logs`."""
    from tests.helpers import free_port, own_extensions_dir

    own_extensions_dir()  # DeepSpeed's CPU op (--device cpu), built for this environment

    def launch(cfg_path: Path, procs: int) -> str:
        assert procs == 1
        env = {**os.environ, "DS_ACCELERATOR": device_type, "OMP_NUM_THREADS": "2",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               str(ROOT / "train_ds.py"), "--config", str(cfg_path)]
        # its own session: a time-out or a SIGINT stops the launcher and its ranks (subprocess.run's kill reached the
        # launcher alone: the ranks kept the device for the next sections), and the output so far is kept
        log = logs / f"{cfg_path.parent.name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, preexec_fn=_terminated_with_parent)
            try:
                code = proc.wait(timeout=LAUNCH_TIMEOUT)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        text = log.read_text()
        if code:
            raise RuntimeError(f"train_ds.py exited {code}: {text[-3000:]}")
        return text

    return launch


def _tokenizer(work: Path):
    from transformers import AutoTokenizer

    from tests.conftest import build_tokenizer

    if not (work / "tok" / "tokenizer.json").is_file():
        build_tokenizer(work / "tok")
    return AutoTokenizer.from_pretrained(str(work / "tok"))


SECTIONS = ("attention", "training", "qlora", "memory", "throughput", "loss")  # --only's names


# bf16 cases: each weight's update within this fraction of the reference's, in norm (_update_errors). On the CPU
# (`--device cpu --match bf16`, both bf16 cases) the worst weight was at 0.19 (a norm weight: values about 1, where
# one bf16 step, 2^-7, is about one update of 6 steps; 0.04 and less for matrices); a weight never updated scores 1.
UPDATE_REL = 0.5


def _update_errors(tmp: Path, ref_state: dict) -> dict:
    """Per exported weight, |exported - ref| / |ref - init| (Frobenius norms), ref: the reference's final weight
    rounded to the exported dtype (bf16 runs export bf16 weights): the run's update, exported - init, against the
    reference's, relative to the reference's update. A weight the run never updated scores about 1."""
    from safetensors.torch import load_file

    init, exported = {}, {}
    for d, into in ((tmp / "hf", init), (tmp / "exported", exported)):
        for f in d.glob("*.safetensors"):
            into.update(load_file(str(f)))
    errors = {}
    for k, e in exported.items():
        ref = ref_state[k].cpu().to(e.dtype).float()
        errors[k] = float((e.float() - ref).norm() / (ref - init[k].float()).norm())
    return errors


def training(device, work: Path, quick: bool, match: str | None = None) -> None:
    from tests.test_train_reference import LION_BETAS, LION_LR, WD, check_against_reference

    tok = _tokenizer(work)
    launch = _launcher(device.type, work)
    lion = {"optimizer": {"type": "Lion", "params": {"lr": LION_LR, "betas": list(LION_BETAS), "weight_decay": WD,
                                                     "use_triton": True}}}
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    cases = [  # label, (family, name, clip, checkpointing, packing, opt), config over the case's, rel, atol
        ("llama fp32", ("llama", "gqa_tied", 1.0, False, False, "adamw"), {}, 1e-4, 1e-5),
        # an untied head: without immediate_grad_update DeepSpeed's bf16 optimizer dropped its gradient (step 3's
        # loss 6.06 against 5.85 on CPU), which a tied head on one stage hides
        # bf16: the weights are checked by their update against the reference's (UPDATE_REL), not by an atol: 6 steps
        # move a weight by at most 0.012, so an atol of 3e-2 passed a weight that never moved
        ("llama bf16, untied head", ("llama", "mha_bias_untied", 1.0, False, False, "adamw"), bf16, 3e-2, None),
        ("llama bf16", ("llama", "gqa_tied", 1.0, False, False, "adamw"), bf16, 3e-2, None),
        ("llama fp32, activation checkpointing", ("llama", "mha_bias_untied", 0.0, True, False, "adamw"), {}, 1e-4, 1e-5),
        ("llama fp32, packed rows, group_by_length", ("llama", "mha_bias_untied", 1.0, False, True, "adamw+grouped"), {},
         1e-4, 1e-5),
        ("mistral fp32, Lion with use_triton", ("mistral", "window", 0.0, False, False, "lion"), lion, 1e-4, 1e-5),
        ("bloom fp32", ("bloom", "tied", 1.0, False, False, "adamw"), {}, 1e-4, 1e-5),
    ]
    for label, case, over, rel, atol in cases[:2] if quick else cases:
        if match and match not in label:
            continue
        if "use_triton" in label and device.type != "cuda":
            record("training", label, "-", None, "Lion's triton kernel needs CUDA")
            continue
        tmp = work / label.replace(" ", "_").replace(",", "")
        shutil.rmtree(tmp, ignore_errors=True)  # a run of an earlier call
        tmp.mkdir(parents=True)
        t0, ref_state = time.perf_counter(), {}
        try:
            losses = check_against_reference(tmp, tok, 1, [1, 1], *case, launch=launch, over=over, rel=rel,
                                             atol=float("inf") if atol is None else atol, ref_state=ref_state)
        except Exception as e:  # noqa: BLE001 - one failed case, the others still run
            traceback.print_exc()
            record("training", label, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", False)
            continue
        log = (work / f"{tmp.name}.log").read_text()
        if "Lion" in label:  # the optimizer line says which update ran (check_against_reference asserts it too)
            kernel = "optimizer: Lion with the triton kernel" in log
            record("training", f"{label}: the triton kernel ran", "yes" if kernel else "no (see the log)", kernel)
        weights, ok = f"weights within {atol}", True
        if atol is None:  # the weights by their update (the losses are checked already)
            errors = _update_errors(tmp, ref_state)
            worst = max(errors, key=errors.get)
            weights = (f"each weight's update (exported - init) within rel {errors[worst]:.3f} of the reference's "
                       f"(worst: {worst}; pass: <= {UPDATE_REL:g}; a weight never updated: 1)")
            ok = errors[worst] <= UPDATE_REL
        record("training", label, f"losses {losses[0]:.4f} -> {losses[-1]:.4f} within rel {rel:g} of the reference, "
               f"{weights} ({time.perf_counter() - t0:.0f} s)", ok)


def qlora(device, work: Path, quick: bool) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel

    from data.collate import pad_id_of
    from data.encode import load_dataset
    from data.templates import TemplateSettings
    from tests.test_qlora import CASES, STEPS, bnb_config, setup_run
    from tests.test_train_ops import losses_of
    from tests.test_train_reference import GAS, MICRO, SEED, SEQ, reference_losses
    from training.batches import BatchPlan

    tok = _tokenizer(work)
    tmp = work / "qlora"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = setup_run(tmp, tok, "llama")
    config["model_topo"] = {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}}
    (tmp / "cfg.json").write_text(json.dumps(config))
    out = _launcher(device.type, work)(tmp / "cfg.json", 1)
    assert "QLoRA base:" in out, out[-2000:]
    losses = list(losses_of(tmp / "out").values())
    dataset = load_dataset(str(tmp / "train.jsonl"), tok, SEQ, tmp / "cache", TemplateSettings())
    plan = BatchPlan(len(dataset), MICRO, GAS, 1, SEED, dataset.offsets[1:] - dataset.offsets[:-1])
    quant = CASES["llama"][2]

    def wrap(model):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        return PeftModel.from_pretrained(model, str(tmp / "init_adapter"), is_trainable=True)

    place = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    ref, _ = reference_losses(tmp / "hf", dataset, plan, pad_id_of(tok), 1.0, False, wrap=wrap, steps=STEPS,
                              quantization_config=bnb_config(quant), **place)
    worst = max(abs(a - b) / b for a, b in zip(losses, ref, strict=True))
    record("qlora", f"llama {quant['bnb_4bit_quant_type']} (double quant, {quant['bnb_4bit_compute_dtype']} compute) "
           f"on {device.type}", f"{len(losses)} steps, losses {losses[0]:.4f} -> {losses[-1]:.4f}, max rel diff to "
           f"transformers + bitsandbytes + peft {worst:.1e}", worst <= 1e-4)


def memory(device, work: Path, quick: bool) -> None:
    """The memory model (models/cost.py) against a measured peak: the 0.87B Llama of the throughput section trained
    2 steps through the launcher (one stage, bf16, 2 x 2048 tokens), full and LoRA. On a GPU the prediction less
    its assumed overhead (CUDA context, allocator slack) is compared with max_memory_allocated; pass within 10%."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.convert import hg_to_pp
    from tests.test_plan import WORDS

    tok = _tokenizer(work)
    tmp = work / "memory"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seq, hidden, layers = (256, 256, 2) if quick else (2048, 2048, 16)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=seq, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp / "hf")
    tok.save_pretrained(tmp / "hf")
    hg_to_pp(tmp / "hf", tmp / "pp")
    rng = random.Random(0)
    (tmp / "d.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(seq * 2))}) + "\n"
                                         for _ in range(16)))
    launch = _launcher(device.type, work)
    from deepspeed.accelerator import get_accelerator

    get_accelerator().empty_cache()  # what this process's earlier sections hold in the allocator's cache: the runs'
    # room (DS_ACCELERATOR is the device's, set in main)
    # LoRA first: the smaller run, whose figure lands even when a time limit stops the full one (a 12 GB checkpoint)
    for name, over in {"lora": {"lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}, "full": {}}.items():
        conf = {"model_path": str(tmp / "pp"), "save_path": str(tmp / name), "data_path": str(tmp / "d.jsonl"),
                "data_cache_dir": str(tmp / "cache"), "max_seq_len": seq, "max_steps": 2, "bf16": {"enabled": True},
                "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
                "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}},
                "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "save_interval": 10**6,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}, **over}
        (tmp / name).mkdir()
        (tmp / name / "cfg.json").write_text(json.dumps(conf))
        launch(tmp / name / "cfg.json", 1)
        est = json.loads((tmp / name / "memory_estimate.json").read_text())["stages"][0]
        lines = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        peak = [m["peak_memory"] for m in lines if "peak_memory" in m][-1][0]
        pred = est["total"] - (est["overhead"] if device.type == "cuda" else 0)
        what = "max_memory_allocated" if device.type == "cuda" else "peak resident memory"
        shutil.rmtree(tmp / name / "global_step2", ignore_errors=True)  # the full run's is about 12 GB
        record("memory", f"{layers} layers, hidden {hidden}, bf16, {name}, 2 x {seq} tokens",
               f"predicted {pred / 2**30:.2f} GiB, {what} {peak / 2**30:.2f} GiB ({pred / peak:.2f})",
               abs(pred - peak) <= 0.1 * peak if device.type == "cuda" else True)


# ------------------------------------------------------------------------------------------------ 4. throughput


def throughput(device, quick: bool, peak_tflops: float | None, micros: list[int], profile: int) -> None:
    from bench.gpu_throughput import FAST, MFU_TARGET, gpu_bench, peak_of
    from launch.cuda_only import device_label

    given = peak_tflops  # --peak-tflops, or None: by the device's name
    peak_tflops, source = peak_of(device_label(device), given)
    record("throughput", "peak for MFU", f"{peak_tflops:g} TFLOP/s dense bf16 ({source})", INFO)

    sizes = dict(layers=2, hidden=256, seq=256, steps=1) if quick else dict(layers=16, hidden=2048, seq=2048, steps=6)
    import torch
    from deepspeed.accelerator import get_accelerator

    n = 512 if quick else 8192  # the device's own bf16 matmul rate: the ceiling MFU's peak stands for
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = get_accelerator().synchronize
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    matmul = 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
    record("throughput", f"bf16 matmul {n}^3 (random data)", f"{matmul:,.1f} TFLOP/s", INFO)
    for micro in [1] if quick else micros:
        res = gpu_bench(argparse.Namespace(device=str(device), peak_tflops=given, micro=micro, profile=profile,
                                           **sizes))
        for name, (tps, mfu, mfu_causal) in res["paths"].items():
            record("throughput", f"{name}, {micro} x {sizes['seq']} tokens", f"{tps:,.0f} tokens/s, MFU {mfu:.1%} of "
                   f"{peak_tflops:g} TFLOP/s ({mfu * peak_tflops / matmul:.1%} of the measured matmul rate), PaLM "
                   f"convention (full attention); causal (attention FLOPs halved): {mfu_causal:.1%} "
                   f"({mfu_causal * peak_tflops / matmul:.1%})" + ("" if quick or name != FAST else
                   f"; issue 12's target {MFU_TARGET:.0%} (PaLM convention): {'met' if mfu >= MFU_TARGET else 'not met'}"),
                   INFO)  # a performance figure, not a correctness check: never a FAIL
        fast, dense = res["paths"].values()
        record("throughput", f"fast path / dense mask, {micro} x {sizes['seq']} tokens", f"{fast[0] / dense[0]:.2f}x",
               INFO)
        record("throughput", "bf16 logits, fast vs dense path", f"max abs diff {res['logits_diff']:.3e}",
               res["logits_diff"] <= 0.05 * max(1.0, res["logits_max"]))


# ------------------------------------------------------------------------------------------------ 6. loss


def loss(device, quick: bool) -> None:
    from bench.loss_memory import compare

    shape = (1024, 64, 32768) if quick else (4096, 4096, 128256)  # quick: still two 16M-logit chunks
    on_device = device.type != "cpu"  # compare() reads max_memory_allocated there, the CPU's RSS peak is shared
    for dtype, tol in (("bfloat16", 1e-2), ("float32", 1e-5)):
        res = compare(*shape, dtype, str(device))
        old, new = res["old"], res["new"]
        memory = (f"peak {old['growth_mib']:,.0f} -> {new['growth_mib']:,.0f} MiB" if on_device else
                  "memory not comparable in one CPU process (python bench/loss_memory.py)")
        record("loss", f"{dtype}, {shape[0]} positions x vocabulary {shape[2]}, hidden {shape[1]}",
               f"{memory}; {old['ms']:.1f} -> {new['ms']:.1f} ms ({new['ms'] / old['ms']:.2f}x); loss rel "
               f"{res['loss_rel']:.1e}, dx rel {res['dx_rel']:.1e}, dW rel {res['dw_rel']:.1e}",
               max(res["loss_rel"], res["dx_rel"], res["dw_rel"]) <= tol
               and (new["growth_mib"] < old["growth_mib"] or not on_device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, two training runs (the CPU dry run)")
    ap.add_argument("--out", default=None, help="where summary.json and the training logs go")
    ap.add_argument("--only", nargs="*", default=None, choices=SECTIONS, help="these sections only")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU (default: "
                    "by the device's name, H100 SXM / H200 989, H100 NVL 835, H100 PCIe 756, A100 312)")
    ap.add_argument("--match", default=None, help="training: only the cases whose label holds this text ('Lion')")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="throughput: print the N costliest ops of a step")
    ap.add_argument("--micro", type=int, nargs="*", default=[4, 8], help="throughput: micro-batch sizes to time")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before bitsandbytes' import below, which may look for a kernel on
    # the Hub (a machine without network would wait on the connection); `models` sets it too, imported later
    import torch

    from launch.cuda_only import cuda_available

    if torch.device(args.device).type == "cuda" and not cuda_available():
        print("bench/gpu_checks.py: no CUDA device here; `--device cpu --quick` runs the same checks on the CPU with "
              "tiny sizes", file=sys.stderr)
        sys.exit(2)
    os.environ["DS_ACCELERATOR"] = torch.device(args.device).type  # before anything imports deepspeed ("cuda:0": cuda)

    from launch.cuda_only import device_label

    device = torch.device(args.device)
    work = Path(args.out or tempfile.mkdtemp(prefix="pipeft-gpu-checks-"))
    work.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "lion_pytorch", "triton", "flash_attn"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: say so
            versions[name] = "not installed"
    gpu = device_label(device)
    print(f"device {device} ({gpu}); " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; out {work}", flush=True)
    SUMMARY.update(path=work / "summary.json", head={"device": gpu, "versions": versions})
    sections = {  # the quick, most asked-for figures first: a run cut short by a time limit still has them
        "throughput": (throughput, device, args.quick, args.peak_tflops, args.micro, args.profile), "attention": (attention, device, args.quick),
        "loss": (loss, device, args.quick), "training": (training, device, work, args.quick, args.match),
        "qlora": (qlora, device, work, args.quick), "memory": (memory, device, work, args.quick)}
    try:
        for name, (fn, *rest) in sections.items():
            if args.only is None or name in args.only:
                guarded(name, fn, *rest)
    except KeyboardInterrupt:  # `timeout -s INT`: the figures taken so far, the table and the count still come
        record(name, "ran to the end", "interrupted (SIGINT: a time limit?): it and the sections after it did not "
               "finish", False)
    failed = [r for r in RESULTS if r["status"] == "FAIL"]
    print("\n| section | check | figure | status |\n|---|---|---|---|")
    for r in RESULTS:
        print(f"| {r['section']} | {r['check']} | {r['figure']} | {r['status']} |")
    print(f"\n{len(RESULTS)} checks: {len(RESULTS) - len(failed)} ok, info or skipped, {len(failed)} failed")
    write_summary()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
