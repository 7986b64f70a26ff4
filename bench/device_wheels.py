"""What bench/gpu_checks.py needs that a GPU machine's image may lack, as one file a machine that cannot install
can carry (`make device-wheels`): deepspeed, bitsandbytes, lion-pytorch and their small dependencies, peft, and
transformers with everything it needs, each at the version in this venv (so the references are the suite's), as
Python 3.12 x86-64 wheels; numpy (every torch image has it) and hf-xet (downloads only) are left out.

    python bench/device_wheels.py .whl      # -> .whl/wheels.tar.xz
    # there: mkdir /tmp/w && tar xJf .whl/wheels.tar.xz -C /tmp/w &&
    #        pip install --no-index --no-deps --target /tmp/site /tmp/w/*.whl && export PYTHONPATH=/tmp/site

The wheels are rewritten uncompressed before xz packs them (pip installs a stored zip as any wheel): bitsandbytes'
CUDA libraries alone are 42 MB deflated, and xz over the raw files brings the whole set under the 64 MiB a device
call may carry.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                          "manylinux2014_x86_64", "any") for a in ("--platform", p)]]
# deepspeed's and peft's dependencies but torch (which the image has) and ninja (JIT builds of ops: none run there)
NO_DEPS = ["bitsandbytes", "lion-pytorch", "peft", "accelerate", "hjson", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "msgpack", "einops", "psutil", "py-cpuinfo"]


def closure(name: str) -> list[str]:
    """`name` and what it needs, recursively, as installed in this venv (extras and other platforms' markers aside;
    numpy and hf-xet left out, see the module docstring)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [name]
    while todo:
        n = canonicalize_name(todo.pop())
        if n in seen or n in ("numpy", "hf-xet"):
            continue
        seen.add(n)
        for line in requires(n) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(req.name)
    return sorted(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        got, raw = Path(tmp) / "got", Path(tmp) / "raw"
        raw.mkdir()
        subprocess.run([*pip, "wheel", "--no-deps", f"deepspeed=={version('deepspeed')}", "-w", got], check=True)
        subprocess.run([*pip, "download", "--no-deps", *PLATFORM, "-d", got,
                        *(f"{n}=={version(n)}" for n in NO_DEPS)], check=True)
        subprocess.run([*pip, "download", "--no-deps", *PLATFORM, "-d", got,
                        *(f"{n}=={version(n)}" for n in closure("transformers"))], check=True)
        wheels = sorted(got.glob("*.whl"))
        for w in wheels:
            with zipfile.ZipFile(w) as src, zipfile.ZipFile(raw / w.name, "w", zipfile.ZIP_STORED) as dst:
                for item in src.infolist():
                    dst.writestr(item, src.read(item), compress_type=zipfile.ZIP_STORED)
        target = out / "wheels.tar.xz"
        part = target.with_name(f".{target.name}.tmp")
        with tarfile.open(part, "w:xz") as tar:
            for w in sorted(raw.iterdir()):
                tar.add(w, arcname=w.name)
        part.replace(target)
    print(f"{target}: {len(wheels)} wheels, {target.stat().st_size / 2**20:.0f} MiB "
          f"({', '.join(w.name.split('-')[0] + ' ' + w.name.split('-')[1] for w in wheels)})")


if __name__ == "__main__":
    main()
