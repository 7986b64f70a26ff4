"""`pip install .` (not editable): one top-level package in site-packages and console scripts that run from a
directory holding its own models/, data/, training/ and launch/ packages, `deepspeed $(which pipeft-train)` included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import free_port, ops_config, pythonpath

ROOT = Path(__file__).resolve().parents[1]
DECOY = "raise ImportError('the decoy {} package of the working directory was imported')\n"


def pip(*args: str) -> None:
    """Offline: nothing from an index, the build backend from this environment."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps", "--no-index"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.distributed
def test_wheel_console_scripts_ignore_packages_of_the_working_directory(tmp_path, tokenizer_dir, ops_model):
    ours = sorted(p.name for p in Path(sys.executable).parent.glob("pipeft-*"))  # the suite's venv: left as it is
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", ".cache", "samples")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *(p.name for p in ROOT.glob("*.py"))):
        shutil.copy2(ROOT / name, src / name)
    for name in ("pipeft", "models", "data", "training", "launch"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src))
    prefix = tmp_path / "prefix"
    # (--ignore-installed: pip otherwise uninstalls the suite's own editable install from its venv first, console
    # scripts and all; --no-deps then: the venv has them)
    pip("install", "--prefix", str(prefix), "--ignore-installed", "--no-deps", *map(str, (tmp_path / "dist").glob("*.whl")))
    assert sorted(p.name for p in Path(sys.executable).parent.glob("pipeft-*")) == ours
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert [p.name for p in site.iterdir() if not p.name.endswith(".dist-info")] == ["pipeft"]
    bin_dir = Path(sysconfig.get_path("scripts", vars={"base": str(prefix), "platbase": str(prefix)}))

    work = tmp_path / "work"  # the user's project, first on PYTHONPATH as the deepspeed launcher puts the cwd
    for pkg in ("models", "data", "training", "launch"):
        (work / pkg).mkdir(parents=True)
        (work / pkg / "__init__.py").write_text(DECOY.format(pkg))
    env = {**os.environ, "PYTHONPATH": pythonpath(work, site), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / name), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=180)

    out = script("pipeft-convert", "--help")
    assert out.returncode == 0 and "hg_to_pp" in out.stdout, out.stderr
    for name in ("pipeft-plan", "pipeft-tiny-tokenizer", "pipeft-gaudi", "pipeft-trainium"):  # the README's modules
        out = script(name, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {name} "), (name, out.stdout[:200], out.stderr)

    cfg = work / "cfg.json"
    cfg.write_text(json.dumps({"model_path": str(tokenizer_dir), "save_path": str(work / "out"),
                               "data_path": str(ROOT / "data" / "samples" / "instruct.json"), "max_seq_len": 128, "train_micro_batch_size_per_gpu": 1,
                               "data_cache_dir": str(work / "cache")}))
    out = script("pipeft-inspect", "--config", str(cfg), "--index", "0", "--json")
    assert out.returncode == 0, out.stderr
    sample = json.loads(out.stdout)
    assert len(sample["input_ids"]) == len(sample["labels"]) > 0

    # the training entry point: its whole import chain (training/, launch/, models/) and its one-line errors
    out = script("pipeft-train", "--config", str(work / "missing.json"))
    assert out.returncode == 2 and "missing.json" in out.stderr and "Traceback" not in out.stderr, out.stderr

    # `deepspeed $(which pipeft-train) --config C` from the user's directory: 2 stages, 2 steps, a checkpoint
    train_cfg = ops_config(work, ops_model, "train.json", max_steps=2, save_path=str(work / "run"))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(bin_dir / "pipeft-train"),
                           "--config", str(train_cfg)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and (work / "run" / "latest").read_text() == "global_step2"
    assert "(convert: pipeft-convert pp_to_hg --input-path" in proc.stdout + proc.stderr  # the installed command


def test_entry_points_of_the_source_tree_name_themselves(tmp_path):
    """An editable install (make venv) runs the `pipeft-*` entry points from the source tree: their usage and error
    lines name them (they named demo.py, `python -m training.plan`, ..., which do not run outside the repository), and
    the tiny tokenizer's bad --data is one line (was a traceback)."""
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{bad\n')
    calls = {"demo": ["--model-path", str(tmp_path / "missing"), "--prompt", "x"],
             "convert": ["pp_to_hg", "--input-path", str(tmp_path / "missing"), "--save-path", str(tmp_path / "x")],
             "plan": ["--model-config", str(tmp_path / "missing.json"), "--gpus", "1", "--gpu-memory", "40GB"],
             "inspect_data": ["--config", str(tmp_path / "missing.json"), "--index", "0"],
             "tiny_tokenizer": ["--save-path", str(tmp_path / "tok"), "--data", str(tmp_path / "bad.jsonl")]}
    code = ("import json, sys, pipeft\n"
            "for name, argv in json.loads(sys.argv[1]).items():\n"
            "    sys.argv = [name, *argv]\n"
            "    try:\n"
            "        rc = getattr(pipeft, name)()\n"
            "    except SystemExit as e:\n"
            "        rc = e.code\n"
            "    print(name, rc, file=sys.stderr, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line or line.split(" ")[0] in calls]
    assert errors == [
        f"pipeft-demo: error: {tmp_path / 'missing'}: no such directory", "demo 2",
        f"pipeft-convert pp_to_hg: error: {tmp_path / 'missing'}: no such directory", "convert 2",
        f"pipeft-plan: error: --model-config: cannot read {tmp_path / 'missing.json'} (No such file or directory)",
        "plan 2", f"pipeft-inspect: error: {tmp_path / 'missing.json'}: cannot read (No such file or directory)",
        "inspect_data 2",
        f"pipeft-tiny-tokenizer: error: --data: {tmp_path / 'bad.jsonl'}:2: malformed JSON: Expecting property name "
        "enclosed in double quotes (column 2)", "tiny_tokenizer 2"], proc.stderr


@pytest.mark.parametrize("argv, said", [
    (["--vocab-size", "-5"], "--vocab-size -5: a bpe tokenizer has at least 260 tokens (256 bytes + 4 special tokens)"),
    (["--kind", "llama3", "--vocab-size", "260"], "--vocab-size 260: a llama3 tokenizer has at least 261 tokens"),
    (["--kind", "sentencepiece", "--vocab-size", "50"], "--vocab-size 50: sentencepiece: Vocabulary size is smaller "
                                                        "than required_chars. 50 vs "),
    (["--data", "{tmp}"], "--data: {tmp}:0: directory has no data files (.json, .jsonl, .csv, .parquet, .arrow)"),
    (["--data", "{tmp}/sub"], "--data {tmp}/sub: no text in its records"),  # its .csv read, as data_path reads it
], ids=["negative", "below the bytes and specials", "below the characters", "no record file", "no text"])
def test_the_tiny_tokenizers_bad_arguments_are_one_line(tmp_path, capsys, argv, said):
    """They were an OverflowError, a sentencepiece RuntimeError, a 260-token tokenizer for 10 asked, and a tokenizer
    trained on the built-in text alone."""
    from data import tiny_tokenizer

    (tmp_path / "sub").mkdir()  # (the .json / .jsonl files alone were read, and a directory's subdirectories)
    (tmp_path / "sub" / "ids.json").write_text('[{"id": 1, "score": 0.5}]')
    (tmp_path / "sub" / "empty.csv").write_text("id,score\n")
    with pytest.raises(SystemExit) as e:
        tiny_tokenizer.main(["--save-path", str(tmp_path / "tok"), *[a.format(tmp=tmp_path) for a in argv]])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"python -m data.tiny_tokenizer: error: {said.format(tmp=tmp_path)}"), err
    assert not (tmp_path / "tok").exists()


def test_make_sets_the_venv_up_again_for_another_torch(tmp_path):
    """`make test TORCH=...` (README: another CUDA build) on a machine set up before: the stamp, newer than its inputs,
    made make skip the set-up without a word. The stamp records what the venv was set up with."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)

    def planned(*args: str) -> list[str]:
        env = {k: v for k, v in os.environ.items()  # not the make that runs the suite (`make test`)'s
               if k not in ("PIP_EXTRA_INDEX_URL", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        proc = subprocess.run(["make", "-n", "--no-print-directory", f"VENV={venv}", *args, "test"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    set_up = planned()
    assert any('pip install -q "torch==2.13.0"' in line for line in set_up)  # no stamp: set up
    (venv / ".installed").write_text("torch==2.13.0\n")  # as that set-up leaves it
    assert planned() == [f"DS_ACCELERATOR=cpu {venv}/bin/python -m pytest -q"]
    assert any('pip install -q "torch==2.13.0+cu128"' in line for line in planned("TORCH=torch==2.13.0+cu128"))
    indexed = planned("PIP_EXTRA_INDEX_URL=https://user:secret@x/simple")
    assert any('pip install -q "torch==2.13.0"' in line for line in indexed)  # another index: set up again
    stamp = next(line for line in indexed if line.startswith("printf"))  # the index recorded as a hash, not echoed
    assert "torch==2.13.0 index-" in stamp and "secret" not in stamp


def test_the_tiny_tokenizer_writes_its_dir_whole_or_not_at_all(tmp_path, capsys):
    """It wrote into --save-path in place: an unwritable one was a FileNotFoundError traceback, and --overwrite of a
    sentencepiece dir by a bpe one kept the old tokenizer.model, which `init` then copied into every model."""
    from data import tiny_tokenizer

    with pytest.raises(SystemExit) as e:
        tiny_tokenizer.main(["--save-path", "/proc/pipeft-tok"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("python -m data.tiny_tokenizer: error: --save-path /proc/pipeft-tok:"), err
    tok = tmp_path / "tok"
    tiny_tokenizer.main(["--save-path", str(tok), "--kind", "sentencepiece", "--vocab-size", "400"])
    assert (tok / "tokenizer.model").is_file()
    tiny_tokenizer.main(["--save-path", str(tok), "--overwrite"])
    assert sorted(f.name for f in tok.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["tok"]  # no temp dir left beside it
    (tok / "config.json").write_text("{}")  # a model's dir, not a tokenizer's: --overwrite would delete it whole
    with pytest.raises(SystemExit) as e:
        tiny_tokenizer.main(["--save-path", str(tok), "--overwrite"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--save-path {tok} holds config.json, not only a tokenizer's files: --overwrite replaces the dir whole and "
        "would delete them; give a tokenizer's own directory")
    assert (tok / "config.json").read_text() == "{}"


def test_the_tiny_tokenizer_reads_its_data_as_data_path_is_read(tmp_path):
    """A .csv (or .parquet, .arrow) beside the .jsonl: it was skipped without a word (only *.json* files were read)."""
    from data.tiny_tokenizer import _texts_from_records

    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n')
    (tmp_path / "b.csv").write_text("instruct,output\nsecond,third\n")
    assert sorted(_texts_from_records(tmp_path)) == ["first", "second", "third"]
    from data import tiny_tokenizer  # a glob too, as data_path takes it (it was "no such file or directory")

    assert tiny_tokenizer.main(["--save-path", str(tmp_path / "tok"), "--data", str(tmp_path / "*.csv")]) is None
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
