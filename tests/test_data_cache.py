"""Where the data cache lives when the data's directory is read-only, and what the reading ranks do then.

A read-only data directory made the cache write fail with a warning; the trainer then logged "cache written", and
every other reading rank of the node tokenized again, all at once, each with a pool of all cores (out of memory on
an 8-GPU node), on every start. Now the cache goes to save_path/.data_cache (data.encode.cache_file decides, for
validation and loading alike), and where no cache can be written the builder sends its arrays to the node's others.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data import dataset as dataset_module
from data import encode as encode_module
from data.collate import collate_rows
from data.encode import CACHE_SUFFIX, RUN_CACHE_DIR, cache_file, load_dataset
from data.packing import pack, trained_tokens
from data.records import file_digests, read_files
from tests.helpers import pythonpath, write_word_records
from training.evaluate import split_eval
from training.rundir import data_fingerprint

ROOT = Path(__file__).resolve().parents[1]


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
    assert cache_file(file_digests(data), tokenizer, 64, None, fallback_dir=fallback) == Path(first.stats.cache_path)
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

    dataset_module.SEND_CHUNK = 7  # arrays go in several messages
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
    assert list((tmp_path / "out" / RUN_CACHE_DIR).glob(f"encoded-*{CACHE_SUFFIX}"))

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


def _mapped(a) -> bool:
    """Whether array `a` is a view of a memory map (not a private copy)."""
    while a is not None:
        if isinstance(a, mmap.mmap | np.memmap):
            return True
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return False


def test_a_warm_load_maps_the_cache_instead_of_copying_it(tokenizer, tmp_path):
    """Every reading rank of a node loads the cache: an .npz was read into each one's own memory (8 copies of a 600 MB
    cache on an 8-GPU node); now every rank maps the same file read-only, and what uses the arrays still works."""
    data = data_file(tmp_path)
    stale = data.parent / ".cache" / "encoded-0123456789abcdef0123456789abcdef.npz"  # an older version's cache
    cold = load_dataset(data, tokenizer, 64)
    stale.write_bytes(b"PK\x03\x04 an old cache")
    warm = load_dataset(data, tokenizer, 64)
    assert warm.stats.cache_hit and warm.stats == encode_module.replace(cold.stats, cache_hit=True)
    assert {f.name for f in stale.parent.glob("encoded-*")} == {stale.name, Path(cold.stats.cache_path).name}
    for k in dataset_module.CACHE_ARRAYS:
        a, b = getattr(warm, k), getattr(cold, k)
        assert _mapped(a) and not a.flags.writeable and a.dtype == b.dtype and (a == b).all(), k
    # what consumes the arrays reads them only
    assert data_fingerprint(warm) == data_fingerprint(cold)
    assert (trained_tokens(warm) == trained_tokens(cold)).all()
    assert data_fingerprint(pack(warm, 64, 0)) == data_fingerprint(pack(cold, 64, 0))
    assert [data_fingerprint(d) for d in split_eval(warm, 0.2, 0)] == \
        [data_fingerprint(d) for d in split_eval(cold, 0.2, 0)]
    (batch, labels), (expected, expected_labels) = (collate_rows(d, [0, 3, -1], 64, 0) for d in (warm, cold))
    assert all((x == y).all() for x, y in zip((*batch, labels), (*expected, expected_labels), strict=True))
    assert warm[-1] == cold[-1]


def test_a_warm_load_reads_no_data_file_whole(tokenizer, tmp_path, monkeypatch):
    """The cache key hashes each file in chunks: every reading rank of a node held the whole corpus at once, on a
    warm start too, only to compute it (8 x 10 GB on an 8-GPU node). A cold start keys by the bytes it encodes."""
    data = data_file(tmp_path)
    cold = load_dataset(data, tokenizer, 64)
    assert file_digests(data) == encode_module.digests_of(read_files(data))
    monkeypatch.setattr(encode_module, "read_files", lambda path: pytest.fail("read whole on a cache hit"))
    warm = load_dataset(data, tokenizer, 64)
    assert warm.stats.cache_status == "hit" and warm.stats.cache_path == cold.stats.cache_path


def test_a_full_disk_under_the_data_cache_says_so(tokenizer, tmp_path, monkeypatch, caplog):
    """numpy's short write ("N requested and M written", no errno) on a full disk is the no-space line (needed,
    free), not numpy's text; the run goes on without the cache."""
    import models.diskspace as diskspace

    data = data_file(tmp_path)

    def short_write(ds, path):
        raise OSError("350659 requested and 147328 written")

    monkeypatch.setattr(encode_module, "save_dataset", short_write)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1024)
    with caplog.at_level("WARNING", logger="data.encode"):
        ds = load_dataset(data, tokenizer, 64)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"data cache {data.parent / '.cache'}" in warned[0], warned
    assert "no space left on device (needed about" in warned[0] and "free 1.0 KiB)" in warned[0], warned
    assert ds.stats.cache_status != "hit" and ds.stats.cache_problem


def _build(data: str, out: str) -> None:
    os.environ["RACE_OUT"] = out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.environ["RACE_TOK"])
    ds = load_dataset(data, tok, 64, num_proc=1)
    Path(out).write_text(json.dumps([ds.stats.cache_status, ds.stats.cache_path]))


def test_builders_that_race_both_succeed_and_leave_one_cache(tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    data = data_file(tmp_path, 300)
    monkeypatch.setenv("RACE_TOK", str(tokenizer_dir))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build, args=(str(data), str(tmp_path / f"b{i}.json"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    said = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in range(2)]
    assert said[0][1] == said[1][1] and {s for s, _ in said} <= {"written", "hit"}
    assert [f.name for f in (data.parent / ".cache").glob("encoded-*")] == [Path(said[0][1]).name]  # no temp file
    assert load_dataset(data, tokenizer, 64).stats.cache_hit


_BUILDER = """
import sys, time
from data import encode

def busy(*args, **kwargs):  # the workers are still tokenizing when their parent is killed
    time.sleep(300)

encode.encode_batch = busy
from transformers import AutoTokenizer
encode.load_dataset(sys.argv[2], AutoTokenizer.from_pretrained(sys.argv[1]), 64, num_proc=2)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_builder_ends_its_tokenizing_workers(tokenizer_dir, tmp_path):
    """SIGKILL of the tokenizing rank (the OOM killer) left its pool's workers running for ever, each holding the
    records (about 1 GB at 500k records); now the kernel kills them with it."""
    data = data_file(tmp_path)
    script = tmp_path / "build.py"
    script.write_text(_BUILDER)
    env = {**os.environ, "PYTHONPATH": pythonpath(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tokenizer_dir), str(data)], cwd=ROOT, env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) == 2, f"the build started {workers} workers (exit {proc.poll()})"
        time.sleep(0.5)  # past their initializer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "workers outlived their killed parent"


def _cold_start(store: str, cfg_path: str, out: str) -> None:
    """A one-rank trainer's cold start: validate_data, the process group, then _load_datasets (as setup runs them)."""
    import torch.distributed as dist

    from training.config import load_config
    from training.trainer import Trainer

    parsed = []
    real = encode_module.records_from_files
    encode_module.records_from_files = lambda files: parsed.append(files[0][0].name) or real(files)
    cfg = load_config(cfg_path, require_model=False)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.rank, trainer.local_rank, trainer.world, trainer.monitor = cfg, 0, 0, 1, None
    trainer.reads_data, trainer.readers, trainer.hosts, trainer.tokenizer = True, [True], ["node"], None
    trainer.validate_data()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    trainer.patient = dist.new_group(backend="gloo")
    ds, eval_set = trainer._load_datasets()
    Path(out).write_text(json.dumps({"parsed": parsed, "sizes": [ds.stats.kept, eval_set.stats.kept],
                                     "cache": [ds.stats.cache_status, eval_set.stats.cache_status]}))
    dist.destroy_process_group()


def test_a_cold_start_parses_the_records_once(tokenizer_dir, tmp_path):
    """The trainer validated every record (local rank 0, before anything is written), threw them away and parsed them
    again to encode them (7.5 s and 1 GB more at 500k records): the checked records are now the ones encoded."""
    import torch.distributed as dist

    data = data_file(tmp_path)
    write_word_records(data.parent / "eval.jsonl", 7, seed=5)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_path": str(tokenizer_dir), "save_path": str(tmp_path / "out"),
                               "data_path": str(data), "eval_data_path": str(data.parent / "eval.jsonl"),
                               "max_seq_len": 64, "n_epoches": 1, "train_micro_batch_size_per_gpu": 1}))
    ctx = mp.get_context("spawn" if dist.is_initialized() else "fork")
    outs = [tmp_path / f"start{i}.json" for i in range(2)]
    for i, out in enumerate(outs):  # cold, then warm
        p = ctx.Process(target=_cold_start, args=(str(tmp_path / f"store{i}"), str(cfg), str(out)))
        p.start()
        p.join(120)
        assert p.exitcode == 0
    cold, warm = (json.loads(out.read_text()) for out in outs)
    assert cold == {"parsed": ["train.jsonl", "eval.jsonl"], "sizes": [30, 7], "cache": ["written", "written"]}
    assert warm == {"parsed": [], "sizes": [30, 7], "cache": ["hit", "hit"]}
    # the training file as the eval file too (cold: another max_seq_len): parsed and held once, not once per key
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "eval_data_path": str(data), "max_seq_len": 48}))
    p = ctx.Process(target=_cold_start, args=(str(tmp_path / "store2"), str(cfg), str(tmp_path / "same.json")))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["parsed"] == ["train.jsonl"] and same["cache"] == ["written", "hit"], same


def _zero_last_ids(raw: bytearray, ds) -> None:
    at = raw.rindex(ds.input_ids[-8:].tobytes())  # the last ids, inside the input_ids record
    raw[at:at + 8] = bytes(8)


def _zero_a_header(raw: bytearray, ds) -> None:
    raw[64:64 + 4096] = bytes(4096)  # a zero-filled page over the first array's .npy header: numpy's header parser
    # raised tokenize.TokenError, which escaped the rebuild (every later start then failed the same way)


def _change_a_count(raw: bytearray, ds) -> None:
    at = raw.index(b'"kept": ') + len(b'"kept": ')
    raw[at] = ord("9") if raw[at] != ord("9") else ord("8")  # a valid number of the same width: only a checksum sees it


def _damaged_cache(tokenizer, tmp_path: Path, damage=_zero_last_ids, into=None):
    """data_file's records encoded once (their cache written beside them), then the cache's bytes damaged by
    `damage` and written back in place, or to `into(cache path)`. Returns (data file, the encoded set, cache path)."""
    data = data_file(tmp_path)
    cold = load_dataset(data, tokenizer, 64)
    path = Path(cold.stats.cache_path)
    raw = bytearray(path.read_bytes())
    damage(raw, cold)
    (into(path) if into else path).write_bytes(bytes(raw))
    return data, cold, path


@pytest.mark.parametrize("damage, said", [(_zero_last_ids, "a checksum does not match"),
                                          (_zero_a_header, "a damaged record header (TokenError)"),
                                          (_change_a_count, "the counts' checksum does not match")],
                         ids=["ids", "header", "counts"])
def test_a_damaged_cache_is_rebuilt_not_trained_on(tokenizer, tmp_path, caplog, damage, said):
    """A block of the cache zeroed (a crash before the page reached the disk), or a count changed: its layout still
    reads, so only the checksums (or the header's parse) find it. It is encoded again, with one warning."""
    data, cold, _ = _damaged_cache(tokenizer, tmp_path, damage)
    again = load_dataset(data, tokenizer, 64)
    assert not again.stats.cache_hit and f"cannot be read ({said})" in caplog.text
    assert (again.input_ids == cold.input_ids).all() and load_dataset(data, tokenizer, 64).stats.cache_hit
    assert again.stats.kept == cold.stats.kept


def test_a_damaged_cache_in_a_read_only_data_dir_is_encoded_once(tokenizer, tmp_path, read_only, caplog):
    """The damaged cache beside read-only data cannot be deleted: the copy written under save_path is read from the
    next start on (it was never read: every start tokenized again and said "written")."""
    data, cold, path = _damaged_cache(tokenizer, tmp_path)
    read_only(data.parent)
    fallback = tmp_path / "save" / RUN_CACHE_DIR
    first = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    assert first.stats.cache_status == "written" and Path(first.stats.cache_path).parent == fallback
    assert path.is_file() and "a checksum does not match" in caplog.text
    assert cache_file(file_digests(data), tokenizer, 64, None, fallback_dir=fallback) == Path(first.stats.cache_path)
    caplog.clear()
    second = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    assert second.stats.cache_status == "hit" and second.stats.cache_path == first.stats.cache_path
    assert (second.input_ids == cold.input_ids).all() and "WARNING" not in caplog.text


def test_a_damaged_copy_under_save_path_falls_back_to_the_intact_one_beside_the_data(tokenizer, tmp_path, caplog):
    """Both copies exist (the data's directory was read-only once, writable later): the one under save_path is read
    first, and when it is damaged the one beside the data is, not a tokenization (which then wrote under save_path
    again, saying the data's directory "cannot be written")."""
    fallback = tmp_path / "save" / RUN_CACHE_DIR
    fallback.mkdir(parents=True)
    data, first, beside = _damaged_cache(tokenizer, tmp_path, into=lambda cache: fallback / cache.name)
    copy = fallback / beside.name  # the save_path copy, damaged; the one beside the data intact
    assert cache_file(file_digests(data), tokenizer, 64, None, fallback_dir=fallback) == copy
    again = load_dataset(data, tokenizer, 64, fallback_cache_dir=fallback)
    assert again.stats.cache_status == "hit" and again.stats.cache_path == str(beside) and not copy.exists()
    assert "a checksum does not match" in caplog.text and "cannot be written" not in caplog.text
    assert (again.input_ids == first.input_ids).all()


def test_a_killed_writers_temp_file_goes_on_a_cache_hit(tokenizer, tmp_path):
    """A job killed while writing the cache and requeued within the hour writes it, then only hits it: the sweep of
    stale temp files runs on hits too (a temp file is the size of the cache)."""
    data = data_file(tmp_path)
    cold = load_dataset(data, tokenizer, 64)
    path = Path(cold.stats.cache_path)
    stale, fresh = path.parent / f"{path.name}abc.tmp", path.parent / f"{path.name}def.tmp"
    for tmp in (stale, fresh):
        tmp.write_bytes(bytes(100))
    day_ago = time.time() - 86400
    os.utime(stale, (day_ago, day_ago))
    assert load_dataset(data, tokenizer, 64).stats.cache_hit
    assert not stale.exists() and fresh.exists()  # one another process may be writing now stays


@pytest.mark.parametrize("kind", ["tokenizer_dir", "sp_tokenizer_dir"])
def test_a_tokenizer_with_truncation_and_padding_keeps_one_cache_key(kind, request, tmp_path):
    """Many Hub tokenizer.json files carry a truncation and a padding section. Encoding turns both off on the tokenizer
    (data.boundary._backend) and the cache key hashed the backend with them, so a tokenizer's key changed once it had
    encoded: Trainer.validate_data (a fresh tokenizer) looked for a key that loading never wrote, and every warm start
    parsed and validated all records again. The key is now that of the tokenizer without them (an older cache of a
    tokenizer without them keeps its key), whichever computes it first, and computing it changes nothing."""
    from transformers import AutoTokenizer

    src = request.getfixturevalue(kind)
    shutil.copytree(src, tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    truncation = {"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0}
    spec["truncation"] = truncation
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 2,
                       "pad_type_id": 0, "pad_token": "</s>"}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    data = data_file(tmp_path)
    files = file_digests(data)
    fresh = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    loaded = (fresh.backend_tokenizer.truncation, fresh.backend_tokenizer.padding)
    assert all(loaded)  # as transformers loads such a tokenizer
    before = cache_file(files, fresh, 64, None)  # what validate_data looks for
    assert (fresh.backend_tokenizer.truncation, fresh.backend_tokenizer.padding) == loaded  # the key changes nothing
    plain = AutoTokenizer.from_pretrained(str(src), pad_token=fresh.pad_token)  # (the padding section's pad token)
    assert before == cache_file(files, plain, 64, None)  # the same tokenizer without the two sections: the same key
    ds = load_dataset(data, fresh, 64)  # encoding turns truncation and padding off
    assert ds.stats.cache_status == "written" and Path(ds.stats.cache_path) == before
    assert cache_file(files, fresh, 64, None) == before
    warm = load_dataset(data, AutoTokenizer.from_pretrained(str(tmp_path / "tok")), 64)
    assert warm.stats.cache_status == "hit"


def test_the_tokenizer_pool_stays_within_a_containers_cpu_quota(tmp_path, monkeypatch):
    """A container's CPU limit (cgroup v2 cpu.max, v1 cfs quota / period) bounds the tokenizing processes as the CPU
    affinity does: 64 processes on a 64-core host limited to 2.5 CPUs would share 2.5 CPUs' time (and memory)."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    v2, v1 = tmp_path / "cpu.max", tmp_path / "v1"
    monkeypatch.setattr(encode_module, "CGROUP_CPU_MAX", v2)
    monkeypatch.setattr(encode_module, "CGROUP_V1_CPU", v1)
    assert encode_module.cpu_quota() is None and encode_module.usable_cores() == 64  # no cgroup files: the affinity
    v2.write_text("250000 100000\n")
    assert encode_module.cpu_quota() == 2.5 and encode_module.usable_cores() == 3
    v2.write_text("max 100000\n")
    assert encode_module.usable_cores() == 64
    v2.unlink()
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert encode_module.cpu_quota() == 0.5 and encode_module.usable_cores() == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert encode_module.usable_cores() == 64


def test_records_given_checked_are_encoded_without_the_files_bytes(tokenizer_dir, tmp_path, monkeypatch):
    """The trainer hands load_dataset the files it read and the records it checked: the caller's reference to them
    (the call's own argument) kept every file's bytes alive while the records were encoded (the file's size, 628 MB
    for a 628 MB pretrain file, on the node's builder). Its list is emptied, the bytes freed before encoding."""
    from transformers import AutoTokenizer

    from data.encode import valid_records

    data = data_file(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    files = read_files(data)
    raws = [raw for _, raw in files]  # (bytes take no weak reference: counted)
    validated = [files, valid_records(files, encode_module.DEFAULT_SETTINGS, tok)]
    del files
    real, seen = encode_module.encode_records, []

    def encode(*args, **kw):  # the references to each file's bytes but `raws`, the loop's and getrefcount's own
        seen.append([sys.getrefcount(raw) - 3 for raw in raws])
        return real(*args, **kw)

    monkeypatch.setattr(encode_module, "encode_records", encode)
    ds = load_dataset(data, tok, 64, validated=validated, use_cache=False)
    assert seen == [[0] * len(raws)] and validated == []
    assert ds.input_ids.tolist() == load_dataset(data, tok, 64, use_cache=False).input_ids.tolist()
