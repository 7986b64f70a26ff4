"""Test helpers: tiny Llama and Bloom configs, HF -> pipeline weight copies through the key table, batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BloomConfig, LlamaConfig

from models import SequentialModel, get_family

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> LlamaConfig kwargs: MHA with biases untied, GQA tied, GQA with llama3 rope scaling
LLAMA_CONFIGS = {
    "mha_bias_untied": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                            mlp_bias=True, tie_word_embeddings=False),
    "gqa_tied": dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_parameters=LLAMA3_ROPE, max_position_embeddings=128),
}
LLAMA_CONFIGS["gqa_llama3_rope_tied"] = {**LLAMA_CONFIGS["gqa_llama3_rope"], "tie_word_embeddings": True}  # Llama 3.2's


def llama_config(name: str, vocab_size: int = 300, **overrides) -> LlamaConfig:
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, pad_token_id=3, bos_token_id=1,
              eos_token_id=2, attn_implementation="sdpa")
    kw.update(LLAMA_CONFIGS[name])
    kw.update(overrides)
    return LlamaConfig(**kw)


# name -> BloomConfig kwargs: tied (every published Bloom), 6 heads (non-power-of-2 ALiBi slopes) with the
# residual taken after the LayerNorms, and an untied head
BLOOM_CONFIGS = {
    "tied": dict(n_layer=2, n_head=4, hidden_size=64),
    "heads6_postln": dict(n_layer=3, n_head=6, hidden_size=96, apply_residual_connection_post_layernorm=True),
    "untied": dict(n_layer=2, n_head=4, hidden_size=64, tie_word_embeddings=False),
}


def bloom_config(name: str, vocab_size: int = 300, **overrides) -> BloomConfig:
    kw = dict(vocab_size=vocab_size, pad_token_id=3, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    kw.update(BLOOM_CONFIGS[name])
    kw.update(overrides)
    return BloomConfig(**kw)


# Llama-shaped families: name -> kwargs over llama_config's defaults. Qwen2: q/k/v biases by design, tied like the
# small Qwen2.5; Mistral: a sliding window longer than every test row (it never binds: exact)
LLAMA_LIKE_CONFIGS = {
    "qwen2": {"tied": dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)},
    "mistral": {"window": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=False, sliding_window=128)},
}


def llama_like_config(family: str, name: str, vocab_size: int = 300, **overrides):
    from models import get_family

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, pad_token_id=3, bos_token_id=1,
              eos_token_id=2, attn_implementation="sdpa")
    kw.update(LLAMA_LIKE_CONFIGS[family][name])
    kw.update(overrides)
    return get_family(family).config_class(**kw)


def tiny_config(family: str, name: str, vocab_size: int = 300, **overrides):
    """A tiny config of `family` by the name it has in LLAMA_CONFIGS / BLOOM_CONFIGS / LLAMA_LIKE_CONFIGS[family]."""
    if family in LLAMA_LIKE_CONFIGS:
        return llama_like_config(family, name, vocab_size, **overrides)
    return {"llama": llama_config, "bloom": bloom_config}[family](name, vocab_size, **overrides)


def sequential_from_hf(hf_model, family_name: str | None = None, attn: str = "auto") -> SequentialModel:
    """The pipeline spec list as one module, holding the HF model's weights (mapped by the key table), with
    attention implementation `attn`; the family is the config's model_type unless named. The HF model's
    config is not changed."""
    import copy

    from models.attention import set_attn_implementation

    family = get_family(family_name or hf_model.config.model_type)
    config = set_attn_implementation(copy.copy(hf_model.config), attn)
    seq = SequentialModel(family.layer_specs(config))
    hf_sd = hf_model.state_dict()
    n = family.num_blocks(config)
    for idx, mod in seq.layers.items():
        mod.load_state_dict({k: hf_sd[family.key_map.to_hf(int(idx), k, n)] for k in mod.state_dict()})
    return seq


def make_batch(vocab: int, lengths: list[int], seq_len: int, padding: str, seed: int = 0):
    """Random token rows of the given lengths padded to seq_len on `padding` ('right' or 'left').
    Returns (input_ids, attention_mask, position_ids, segment_ids, labels); labels mask pads and
    the first two tokens of each row (a stand-in prompt)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    ids = torch.full((b, seq_len), 3, dtype=torch.long)
    mask = torch.zeros(b, seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(seq_len - n, seq_len) if padding == "left" else slice(0, n)
        ids[i, sl] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    labels = ids.masked_fill(mask == 0, -100)
    first = mask.argmax(-1)
    for i in range(b):
        labels[i, first[i]:first[i] + 2] = -100
    return ids, mask, position_ids, mask.clone(), labels


def segments_of(row: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """A packed row (data.packing) cut into its segments ({input_ids, labels, position_ids}), in order."""
    seg = torch.tensor(row["segment_ids"])
    return [{k: torch.tensor(row[k])[seg == s].tolist() for k in ("input_ids", "labels", "position_ids")}
            for s in range(1, int(seg.max()) + 1)]


def pythonpath(*first) -> str:
    """PYTHONPATH for the processes a test starts: `first`, then tests/pyhooks (its sitecustomize imports mlflow
    on first use, not in every process DeepSpeed starts; see there)."""
    import os
    from pathlib import Path

    return os.pathsep.join([*map(str, first), str(Path(__file__).resolve().parent / "pyhooks")])


def own_extensions_dir() -> Path:
    """Set TORCH_EXTENSIONS_DIR (unless set) to a directory of this Python environment's own, and return it.
    DeepSpeed compiles its CPU communication op there on the first start (~1 min) and rebuilds it whenever another
    environment built it last, so checkouts sharing ~/.cache/torch_extensions rebuilt it for each other. A build's
    lock that is 15 minutes old is removed: a build killed midway leaves it, and torch waits on it forever."""
    import hashlib
    import os
    import sys
    import time
    from pathlib import Path

    own = Path.home() / ".cache" / "torch_extensions" / f"pipeft-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"
    where = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(own)))
    for lock in where.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > 15 * 60:
                lock.unlink()
        except FileNotFoundError:
            pass
    return where


LAUNCH_TIMEOUT_S = 1800  # a bench launch that has not exited by then is hung (a rank waiting on a lost peer)


def run_group(cmd: list[str], log, timeout: float = LAUNCH_TIMEOUT_S, **popen) -> str | None:
    """Run `cmd` in a session of its own (a launcher and its ranks), its output streamed to the file `log`. None when
    it exits 0, else why not ("exit 1", or "no exit after 30 min: killed" once it has run `timeout` seconds). The
    whole group is killed as it ends (a hung rank never ends a bench; a rank may outlive its launcher), and when the
    caller is interrupted (Ctrl-C reaches only the caller's own session)."""
    import os
    import signal
    import subprocess

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        rc = proc.wait(timeout=timeout)
        return None if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
        return f"no exit after {timeout / 60:g} min: killed"
    finally:  # the group holds this launch's processes only: a rank may outlive its launcher
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group ended with it
            pass
        proc.wait()


def free_port() -> int:
    """A free TCP port for which /dev/shm holds no DeepSpeed buffer (one left by a killed run elsewhere on this
    host would read as this run's leak)."""
    import socket
    from pathlib import Path

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not any(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")):
            return port


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def start_deepspeed(script: str, args: list[str], num_procs: int = 2, env: dict | None = None,
                    launcher_args: list[str] | None = None, port: int | None = None, prefix: list[str] | None = None):
    """Start `script` with the real deepspeed launcher on CPU (gloo), output to files; returns (Popen, port).
    The Popen's `.log` is the path holding stdout and stderr. `launcher_args` replace `--num_gpus N` (e.g. one
    simulated node of a hostfile); `prefix` goes before the launcher (e.g. `unshare -m ...`)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": pythonpath(root), "OMP_NUM_THREADS": "1", **(env or {})}
    port = port or free_port()
    cmd = [*(prefix or []), launcher, *(launcher_args or ["--num_gpus", str(num_procs)]), "--master_port", str(port),
           str(root / script), *args]
    log = Path(tempfile.mkstemp(prefix="deepspeed-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc.log, proc.port, proc.cmd = log, port, cmd
    return proc


def output_of(proc) -> str:
    return proc.log.read_text()


def workers_of(proc) -> list:
    """The training processes (not the launchers) under a start_deepspeed process."""
    import psutil

    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if "deepspeed.launcher" not in " ".join(k.cmdline()) and "python" in k.name()]


def finish_deepspeed(proc, timeout: int = 600, expect: int | None = 0):
    """Wait for a start_deepspeed run; check its exit code (`expect`, None: any) and that no shared-memory
    buffer of it is left. Returns (returncode, output)."""
    from pathlib import Path

    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
    text = output_of(proc)
    proc.log.unlink(missing_ok=True)
    if expect is not None:
        assert proc.returncode == expect, f"{' '.join(proc.cmd)} exited {proc.returncode}:\n{text[-6000:]}"
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"))
    assert not leaked, f"shared-memory buffers left behind: {leaked}"  # each rank must shut down cleanly
    return proc.returncode, text


def run_deepspeed(script: str, args: list[str], num_procs: int = 2, timeout: int = 600, env: dict | None = None):
    """Run `script` under the real deepspeed launcher on CPU; asserts exit 0 and a clean shutdown.
    Returns an object with .stdout (stdout and stderr together) and .returncode."""
    from types import SimpleNamespace

    code, text = finish_deepspeed(start_deepspeed(script, args, num_procs, env), timeout)
    return SimpleNamespace(returncode=code, stdout=text, stderr=text)


ROOT_TEXTS = ["Hello pipeline world.", "  leading spaces and\ttabs\n", "流水线并行", "</s> special <s> tokens <pad>", ""]


def answers_of(rec: dict) -> list[str]:
    """The texts a record trains on, in order (without EOS)."""
    from data.records import record_type

    kind = record_type(rec)
    if kind == "pretrain":
        return [rec["text"]]
    if kind == "instruct":
        return [rec["output"]]
    return [text for role, text in rec["rounds"] if role == "ans"]


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive trained tokens. A run may start with the space that ends the prompt
    ("### Assistant: ") when the tokenizer glues it to the answer's first word: that token is trained."""
    assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))
    runs, run = [], []
    for i, lab in zip([*ids, None], [*labels, -100], strict=True):
        if lab != -100:
            run.append(i)
        elif run:
            runs.append(tok.decode(run).removeprefix(" "))
            run = []
    return runs


def assert_causal(seq) -> None:
    """Changing token k never moves the logits before k, and does move them from k on."""
    ids, _, pos, seg, _ = make_batch(300, [12, 12], 12, "right", seed=1)
    base = seq((ids, pos, seg))
    for k in (3, 8, 11):
        changed = ids.clone()
        changed[:, k] = (changed[:, k] + 17) % 296 + 4
        out = seq((changed, pos, seg))
        torch.testing.assert_close(out[:, :k], base[:, :k], atol=1e-6, rtol=0)
        assert (out[:, k:] - base[:, k:]).abs().max() > 1e-3  # the change is visible from k on


def assert_segments_isolated(seq, atol: float) -> None:
    """Two packed segments + padding: each segment's logits equal the segment run alone, and changing
    the second segment leaves the first bit-identical."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(4, 300, (5,), generator=g), torch.randint(4, 300, (4,), generator=g)
    ids = torch.cat([a, b, torch.full((3,), 3)])[None]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
    packed = seq((ids, pos, seg))

    alone_a = seq((a[None], torch.arange(5)[None], torch.ones(1, 5, dtype=torch.long)))
    alone_b = seq((b[None], torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long)))
    torch.testing.assert_close(packed[:, :5], alone_a, atol=atol, rtol=0)
    torch.testing.assert_close(packed[:, 5:9], alone_b, atol=atol, rtol=0)

    other = ids.clone()
    other[0, 5:9] = torch.randint(4, 300, (4,), generator=g)
    torch.testing.assert_close(seq((other, pos, seg))[:, :5], packed[:, :5], atol=0, rtol=0)


WORDS = "pipeline stage layer token batch loss gradient weight model data train answer question reply".split()


def write_word_records(path, n: int, seed: int) -> None:
    """Short pretrain / instruct records of random words (every third a pretrain text)."""
    import json
    import random

    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            rec = {"text": say(rng.randint(3, 20))} if i % 3 == 0 else {"instruct": say(rng.randint(2, 6)),
                                                                         "output": say(rng.randint(1, 10))}
            f.write(json.dumps(rec) + "\n")


def write_config(tmp_path: Path, base: Path, name: str = "cfg.json", **over) -> Path:
    """A 1-stage, 2-step training config at tmp_path/name for the `base` fixture's model, on 16 instruct records
    (tmp_path/d.jsonl, written unless there); None drops a key."""
    data = tmp_path / "d.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"instruct": f"say {i}", "output": f"word {i}"}) + "\n" for i in range(16)))
    cfg = {"model_path": str(base), "save_path": str(tmp_path / "out"), "data_path": str(data), "max_seq_len": 96,
           "max_steps": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, **over}
    (tmp_path / name).write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return tmp_path / name


def ops_config(tmp, base, name: str = "cfg.json", **over):
    """A 2-stage, 8-step training config for the `ops_model` fixture's model and data; None drops a key."""
    import json

    cfg = {"model_path": str(base / "pp"), "save_path": str(tmp / "out"), "data_path": str(base / "train.jsonl"),
           "data_cache_dir": str(tmp / "cache"), "max_seq_len": 64, "max_steps": 8, "seed": 3,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
           "lr_schedule": {"type": "cosine", "warmup_steps": 2}, **over}
    (tmp / name).write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return tmp / name


def errors_of(text: str) -> list[str]:
    """The one-line errors train_ds.py printed (each rank prints its own)."""
    return [line for line in text.splitlines() if line.startswith("train_ds.py: error:")]


# ------------------------------------------------------------------------- HF <-> pipeline conversion (test_convert*)


def load_hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `d`."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_hf(tmp: Path, tokenizer, name: str, shard: str = "60KB", seed: int = 0, family: str = "llama") -> Path:
    """A tiny HF model (`tiny_config(family, name)`), sharded at `shard`, with `tokenizer`, saved in tmp/hf_NAME."""
    torch.manual_seed(seed)
    model = get_family(family).hf_model_class(tiny_config(family, name, vocab_size=len(tokenizer)))
    hf = tmp / f"hf_{name}"
    model.save_pretrained(hf, max_shard_size=shard)
    tokenizer.save_pretrained(hf)
    return hf


def run(*argv: str) -> int:
    """convert_model.py's main with `argv`; returns its exit code."""
    import convert_model

    return convert_model.main(list(argv))


def edit_weights(hf: Path, edit) -> None:
    """Apply `edit` to the state dict of each shard of `hf` and rewrite the index to match."""
    for f in hf.glob("model-*.safetensors"):
        sd = load_file(str(f))
        edit(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
    index = hf / "model.safetensors.index.json"
    wm = {}
    for f in hf.glob("model-*.safetensors"):
        wm.update(dict.fromkeys(load_file(str(f)), f.name))
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def assert_one_line_error(capsys, expected: str) -> list[str]:
    """convert_model.py's stderr ends in one error line holding `expected`, with no traceback; returns the lines."""
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert expected in last, last
    assert last.startswith("convert_model.py ") and ": error: " in last
    assert not any("Traceback" in line for line in err)
    return err


def files(*dirs: Path) -> dict[str, bytes]:
    """path -> content of every file under `dirs`."""
    return {str(f): f.read_bytes() for d in dirs for f in sorted(d.rglob("*")) if f.is_file()}


def lora_checkpoint(tmp_path: Path, base: Path) -> Path:
    """A LoRA run's save_path over the pipeline dir `base`, laid out as training writes it (DeepSpeed's layer files
    holding only the adapters, lora_config.json naming the base, the side files beside `latest`)."""
    from models.lora import LoraSettings, base_fingerprint, lora_info

    config = get_family("llama").load_config(base)
    save = tmp_path / "lora_run"
    tag = save / "global_step5"
    tag.mkdir(parents=True)
    for f in base.iterdir():
        if not f.name.startswith("layer_"):
            (save / f.name).write_bytes(f.read_bytes())
    (save / "latest").write_text(tag.name)
    torch.manual_seed(1)
    h, r = config.hidden_size, 4
    for f in base.glob("layer_*"):  # every layer's file; the frozen ones empty
        torch.save({}, tag / f.name)
    for i in range(1, config.num_hidden_layers + 1):
        torch.save({"self_attn.q_proj.lora_A.default.weight": torch.randn(r, h) * 0.1,
                    "self_attn.q_proj.lora_B.default.weight": torch.randn(h, r) * 0.1}, tag / f"layer_{i:02d}-model_states.pt")
    (tag / "lora_config.json").write_text(lora_info(LoraSettings(r, 8.0, 0.0, ("q_proj",)), str(base),
                                                    fingerprint=base_fingerprint(base)))
    return save
