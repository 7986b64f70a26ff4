"""Where the data cache lives when the data's directory is read-only, and what the reading ranks do then.

A read-only data directory made the cache write fail with a warning; the trainer then logged "cache written", and
every other reading rank of the node tokenized again, all at once, each with a pool of all cores (out of memory on
an 8-GPU node), on every start. Now the cache goes to save_path/.data_cache (data.encode.cache_file decides, for
validation and loading alike), and where no cache can be written the builder sends its arrays to the node's others.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
from pathlib import Path

import pytest

from data import encode as encode_module
from data.encode import RUN_CACHE_DIR, cache_file, load_dataset
from data.records import read_files
from tests.helpers import write_word_records


@pytest.fixture
def read_only(tmp_path):
    """read_only(dir): make `dir` read-only, as a read-only mount is (root: a read-only bind mount of it)."""
    mounted = []

    def make(where: Path) -> Path:
        if os.geteuid() != 0:
            where.chmod(0o555)
            return where
        for cmd in (["mount", "--bind", str(where), str(where)], ["mount", "-o", "remount,bind,ro", str(where)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount read-only here: {done.stderr.strip()}")
            if cmd[1] == "--bind":
                mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
    for where in tmp_path.rglob("*"):
        if where.is_dir():
            where.chmod(0o755)


def data_file(tmp_path: Path, n: int = 30) -> Path:
    (tmp_path / "data").mkdir()
    write_word_records(tmp_path / "data" / "train.jsonl", n, seed=4)
    return tmp_path / "data" / "train.jsonl"


def test_a_read_only_data_dir_caches_under_save_path(tokenizer, tmp_path, read_only, caplog):
    data = data_file(tmp_path)
    read_only(data.parent)
    fallback = tmp_path / "save" / RUN_CACHE_DIR
    with caplog.at_level("INFO", logger="data.encode"):
        first = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"data: {data.parent / '.cache'} cannot be written; the data cache is written to {fallback} "
                      "instead (set data_cache_dir to choose where)"]
    assert first.stats.cache_status == "written" and Path(first.stats.cache_path).parent == fallback
    # the one decision: validation (which skips cached data) and every later start look where it was written
    assert cache_file(read_files(data), tokenizer, 64, None, fallback_dir=fallback) == Path(first.stats.cache_path)
    caplog.clear()
    with caplog.at_level("INFO", logger="data.encode"):
        again = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    assert again.stats.cache_status == "hit" and again.stats.cache_path == first.stats.cache_path
    assert (again.input_ids == first.input_ids).all() and (again.labels == first.labels).all()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # with no fallback (a direct call) it says so, and the status is not 'written'
    alone = load_dataset(data, tokenizer, 32)
    assert alone.stats.cache_status.startswith(f"not written (could not write the data cache {data.parent / '.cache'}")


def test_a_cache_beside_the_data_is_read_though_the_dir_is_read_only(tokenizer, tmp_path, read_only):
    """Data shipped read-only with their cache: read there, nothing written to save_path."""
    data = data_file(tmp_path)
    built = load_dataset(data, tokenizer, 64)
    read_only(data.parent)
    fallback = tmp_path / "save" / RUN_CACHE_DIR
    ds = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    assert ds.stats.cache_hit and ds.stats.cache_path == built.stats.cache_path and not fallback.exists()


def _rank(rank: int, store: str, cfg_path: str, out: str) -> None:
    """One reading rank of a 2-rank node: Trainer._load_datasets over a gloo group, as setup runs it."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from training.config import load_config
    from training.trainer import Trainer

    encode_module.SEND_CHUNK = 7  # arrays go in several messages
    encoded = []
    real = encode_module.encode_records
    encode_module.encode_records = lambda *a, **k: encoded.append(1) or real(*a, **k)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = load_config(cfg_path, require_model=False)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.rank, trainer.world, trainer.monitor, trainer.reads_data = cfg, rank, 2, None, True
    trainer.readers, trainer.hosts = [True, True], ["node", "node"]
    trainer.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    trainer.patient = dist.new_group(backend="gloo")
    ds, _ = trainer._load_datasets()
    Path(out).write_text(json.dumps({"encoded": len(encoded), "cache": ds.stats.cache_status,
                                     "ids": ds.input_ids.tolist(), "labels": ds.labels.tolist(),
                                     "offsets": ds.offsets.tolist(), "records": ds.record_index.tolist()}))
    dist.destroy_process_group()


def _two_ranks(tmp_path: Path, cfg: Path, name: str) -> list[dict]:
    import torch.distributed as dist

    # fork: the test's imports are inherited (no second start of torch); spawn when this process holds a group (the
    # session's `ds` fixture), which a forked rank would inherit
    ctx = mp.get_context("spawn" if dist.is_initialized() else "fork")
    outs = [tmp_path / f"{name}-{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / f"{name}.store"), str(cfg), str(outs[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads(o.read_text()) for o in outs]


def test_a_reading_rank_never_tokenizes_what_its_node_built(tokenizer_dir, tmp_path, read_only):
    """Read-only data: the node's first reading rank writes the cache under save_path, the other reads it. Neither
    writable: the builder sends the arrays; the other does not tokenize a second time."""
    data = data_file(tmp_path)
    read_only(data.parent)
    cfgs = {}
    for name, save in (("fallback", tmp_path / "out"), ("none", data.parent / "out")):  # the second cannot be written
        cfgs[name] = tmp_path / f"{name}.json"
        cfgs[name].write_text(json.dumps({"model_path": str(tokenizer_dir), "save_path": str(save),
                                          "data_path": str(data), "max_seq_len": 64, "n_epoches": 1,
                                          "train_micro_batch_size_per_gpu": 1}))
    built, read = _two_ranks(tmp_path, cfgs["fallback"], "fallback")
    assert (built["encoded"], built["cache"], read["encoded"], read["cache"]) == (1, "written", 0, "hit")
    assert all(built[k] == read[k] for k in ("ids", "labels", "offsets", "records"))
    assert list((tmp_path / "out" / RUN_CACHE_DIR).glob("encoded-*.npz"))

    built, sent = _two_ranks(tmp_path, cfgs["none"], "none")
    assert (built["encoded"], sent["encoded"]) == (1, 0)
    assert built["cache"] == sent["cache"] and built["cache"].startswith("not written (could not write the data cache")
    assert all(built[k] == sent[k] for k in ("ids", "labels", "offsets", "records"))


def test_validation_skips_data_cached_under_save_path(tokenizer_dir, tokenizer, tmp_path, read_only, monkeypatch):
    """Trainer.validate_data looks for the cache where loading puts it (a cache of these bytes: they were valid)."""
    import training.trainer as trainer_module
    from training.config import load_config

    data = data_file(tmp_path)
    read_only(data.parent)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"),
                                    "data_path": str(data), "max_seq_len": 64, "n_epoches": 1,
                                    "train_micro_batch_size_per_gpu": 1}))
    cfg = load_config(cfg_path, require_model=False)
    load_dataset(data, tokenizer, 64, fallback_cache_dir=tmp_path / "out" / RUN_CACHE_DIR)  # what the trainer writes
    parsed = []
    real = encode_module.records_from_files
    monkeypatch.setattr(encode_module, "records_from_files", lambda files: parsed.append(files) or real(files))
    trainer = trainer_module.Trainer(cfg)
    trainer.validate_data()
    assert not parsed
    trainer.close()
