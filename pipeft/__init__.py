"""The installed entry points: `pipeft-train`, `pipeft-convert`, `pipeft-demo`, `pipeft-inspect`, `pipeft-plan`,
`pipeft-tiny-tokenizer`, `pipeft-gaudi`, `pipeft-trainium`.

The project's code imports its packages by their own names (`from models.llama import ...`), as the repository's
top-level layout runs them (`python train_ds.py`, `python -m data.inspect`). A wheel does not put those generic
names into site-packages: it ships them under this package, in `pipeft/root/` (models/, data/, training/, launch/
and the scripts train_ds.py, convert_model.py, demo.py). An entry point puts that directory first on `sys.path`
(before the working directory and PYTHONPATH, which the `deepspeed` launcher sets to the working directory) and
runs the script's `main`. In the source tree (an editable install) the root is the repository itself.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
INSTALLED = (_HERE / "root" / "models").is_dir()  # a wheel install, not the source tree
ENTRY_POINT = False  # set by the entry points (`_main`): run as `pipeft-*`, in an editable install too
ROOT = _HERE / "root" if INSTALLED else _HERE.parent
SCRIPTS = {"train_ds.py": "pipeft-train", "convert_model.py": "pipeft-convert", "demo.py": "pipeft-demo"}
MODULES = {"data.inspect": "pipeft-inspect", "training.plan": "pipeft-plan", "data.tiny_tokenizer": "pipeft-tiny-tokenizer",
           "launch.gaudi": "pipeft-gaudi", "launch.trainium": "pipeft-trainium"}


def _as_entry_point() -> bool:
    """Whether messages name the `pipeft-*` commands: a wheel install, or an entry point run from the source tree."""
    return INSTALLED or ENTRY_POINT


def prog(script: str) -> str:
    """A script's name in its usage and error lines, as the user ran it: `pipeft-demo` run as that (or in a wheel
    install), `demo.py` in the source tree."""
    return SCRIPTS[script] if _as_entry_point() else script


def command(script: str) -> str:
    """How the user runs one of the project's scripts in messages: `pipeft-convert` in a wheel install,
    `python convert_model.py` in the source tree."""
    return SCRIPTS[script] if _as_entry_point() else f"python {script}"


def module_command(module: str) -> str:
    """How the user runs one of the project's modules: `pipeft-plan` in a wheel install, `python -m training.plan`
    in the source tree."""
    return MODULES[module] if _as_entry_point() else f"python -m {module}"


def one_line(e: BaseException | str, limit: int | None = 300, named: bool = False) -> str:
    """A library's error message inside one of the project's one-line errors: its runs of whitespace (newlines
    included) as one space, cut at `limit` characters; `named`: after the exception's type ("OSError: ...")."""
    said = " ".join(str(e).split())[:limit]
    return f"{type(e).__name__}: {said}" if named else said


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
              "TIB": 2**40}


def parse_size(text: str, option: str, examples: str, bare: bool = False) -> int:
    """Bytes in a size such as 40GB (decimal) or 80GiB (binary), any case; with `bare`, a whole number of bytes too.
    ValueError naming `option` (`examples`: the sizes it shows) for anything else, or for less than 1 byte."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Z]*)\s*", text.upper())
    number, unit = m.groups() if m else ("", "")
    if m and (unit in SIZE_UNITS or (bare and not unit and number.isdigit())):
        scale = SIZE_UNITS[unit or "B"]
        if (size := int(number) * scale if number.isdigit() else int(float(number) * scale)) >= 1:  # whole: exact
            return size
        raise ValueError(f"{option} {text!r}: must be at least 1 byte")
    hint = ("" if not m else " (a whole number of bytes, or a unit)" if bare and not unit else
            " (a unit is needed)" if not unit else
            f" ({unit[0]}B or {unit[0]}iB?)" if unit in (unit[0], unit[0] + "I") and unit[0] in "KMGT" else "")
    raise ValueError(f"{option} {text!r}: not a size such as {examples}{hint}")


class DuplicateKey(ValueError):
    """A JSON object (a record, a config) names one key twice."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's `object_pairs_hook`: the object's dict, DuplicateKey for a repeated key (json keeps the last value of a
    repeated key without a word)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"key {twice!r} appears twice in one object: only one of its values would be kept")
    return obj


def use_root() -> Path:
    """Put the project's import root first on sys.path (once) and return it."""
    root = str(ROOT)
    if not sys.path or sys.path[0] != root:
        sys.path.insert(0, root)
    return ROOT


def _interrupted_while_starting(prog: str):
    """A SIGINT handler for a command's imports: one line (local rank 0: every process of a launch got the terminal's
    Ctrl-C), then the default action (SIGINT's exit, 130 in a shell). A handler, not an `except`: a library that
    catches what it takes for its own KeyboardInterrupt while it imports would turn it into a traceback, or lose it."""

    def handler(signum, frame) -> None:  # noqa: ARG001
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{prog}: interrupted while starting: nothing was done", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    return handler


_restore: list = []  # the SIGINT handler before quiet_start's


def quiet_start(prog: str, name: str) -> None:
    """A command run as a script (`name`, its module's __name__, is "__main__"): a Ctrl-C while its libraries import
    (seconds: torch, DeepSpeed, transformers) is one line and SIGINT's exit, not a traceback through the import
    machinery. The script calls `started()` once its imports are done: it handles Ctrl-C itself from there."""
    if name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not an ignored one)
        _restore.append(signal.signal(signal.SIGINT, _interrupted_while_starting(prog)))


def started() -> None:
    """The end of quiet_start's window: Python's own Ctrl-C handling again."""
    if _restore:
        signal.signal(signal.SIGINT, _restore.pop())


def _main(module: str, function: str = "main") -> int:
    global ENTRY_POINT
    ENTRY_POINT = True  # before the module's import: its PROG names the entry point
    use_root()
    quiet_start(SCRIPTS.get(f"{module}.py") or MODULES[module], "__main__")  # (as the scripts run themselves)
    imported = importlib.import_module(module)
    started()
    code = getattr(imported, function)()
    return int(code or 0)


def train() -> int:
    """`pipeft-train --config C`, also `deepspeed [...] $(which pipeft-train) --config C` (train_ds.py)."""
    return _main("train_ds", "cli")


def convert() -> int:
    """`pipeft-convert hg_to_pp | pp_to_hg | init ...` (convert_model.py)."""
    return _main("convert_model")


def demo() -> int:
    """`pipeft-demo --model-path DIR ...` (demo.py)."""
    return _main("demo")


def inspect_data() -> int:
    """`pipeft-inspect --config C (--index N | --stats)` (data/inspect.py)."""
    return _main("data.inspect")


def plan() -> int:
    """`pipeft-plan --model-path DIR --gpus N --gpu-memory 40GB ...` (training/plan.py)."""
    return _main("training.plan")


def tiny_tokenizer() -> int:
    """`pipeft-tiny-tokenizer --save-path DIR [--kind ...]` (data/tiny_tokenizer.py)."""
    return _main("data.tiny_tokenizer")


def gaudi() -> int:
    """`pipeft-gaudi [--world_size N] $(which pipeft-train) --config C` (launch/gaudi.py)."""
    return _main("launch.gaudi")


def trainium() -> int:
    """`pipeft-trainium [--nproc_per_node N] $(which pipeft-train) --config C` (launch/trainium.py)."""
    return _main("launch.trainium")
