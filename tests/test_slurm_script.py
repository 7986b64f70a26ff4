"""launch/slurm.sbatch under a fake srun: what it runs, with which environment, and its VENV handling (README
"Several nodes"); written by a review, which found nothing else testing the script."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm.sbatch"


def run(tmp_path, args, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/bin/bash\necho "ARGS $*"\necho "PY $(command -v python)"\n'
                               'echo "ENV $DS_ACCELERATOR $OMP_NUM_THREADS $SRUN_CPUS_PER_TASK"\n')
    (fake / "srun").chmod(0o755)
    base = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(ROOT), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True)


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_execs_srun_with_the_config_and_the_venv(tmp_path):
    venv = Path(sys.executable).parent.parent
    r = run(tmp_path, ["cfg dir/c.json"], VENV=str(venv), SLURM_CPUS_PER_TASK="4")
    assert r.returncode == 0, r.stderr
    assert "ARGS --kill-on-bad-exit=1 python train_ds.py --config cfg dir/c.json" in r.stdout
    py = next(line[3:] for line in r.stdout.splitlines() if line.startswith("PY "))
    assert Path(py).parent.resolve() == (venv / "bin").resolve()
    assert "ENV cuda 4 4" in r.stdout


def test_empty_venv_uses_the_python_on_path(tmp_path):
    r = run(tmp_path, ["c.json"], VENV="")
    assert r.returncode == 0 and "ENV cuda 8 8" in r.stdout


@pytest.mark.parametrize("args, env, rc, said", [
    ([], {}, 1, "usage: sbatch launch/slurm.sbatch CONFIG.json"),
    (["c.json"], {"VENV": "/nonexistent"}, 2, "no virtual environment at /nonexistent"),
])
def test_errors_are_one_line(tmp_path, args, env, rc, said):
    r = run(tmp_path, args, **env)
    assert r.returncode == rc and said in r.stderr and len(r.stderr.strip().splitlines()) == 1
