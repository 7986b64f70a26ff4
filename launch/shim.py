"""What the Gaudi and Trainium shims share: the command line, the config checks a launcher can make before any
process starts, and the launch itself (exec, so signals reach the launcher) or its --dry-run print."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launch import AcceleratorError, ds_accelerator_problem


@dataclass
class Launch:
    """A launcher command, the environment it adds, files it writes first, and notes for the reader."""

    cmd: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The --dry-run text: notes, the environment, files to be written, the command (runnable in bash)."""
        lines = [f"# {n}" for n in self.notes]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        for path, text in self.files.items():
            lines.append(f"cat > {shlex.quote(path)} <<'EOF'\n{text.rstrip()}\nEOF")
        lines.append(shlex.join(self.cmd))
        return "\n".join(lines)

    def execute(self) -> None:
        """Write the files, then replace this process by the launcher (never returns)."""
        for path, text in self.files.items():
            Path(path).write_text(text)
        os.execvpe(self.cmd[0], self.cmd, {**os.environ, **self.env})


def port(text: str) -> int:
    """argparse's type for --master_port: an integer that is a port (training.distributed.port_problem)."""
    from training.distributed import port_problem

    number = int(text)
    if problem := port_problem(number):
        raise argparse.ArgumentTypeError(problem)
    return number


def add_script_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print the environment and the command, start nothing")
    ap.add_argument("--master_port", type=port, default=29500, help="rendezvous port (default 29500)")
    ap.add_argument("script", help="the training script (train_ds.py)")
    ap.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments: --config CFG.json")


def config_path(script_args: list[str]) -> Path:
    """The --config the training script will take (its own parser reads `script_args`: the last --config, --conf);
    AcceleratorError for arguments it would refuse (a launcher option put after the script), before the launch."""
    from training.config_file import script_parser

    try:
        args, unknown = script_parser("train_ds.py", launcher=True).parse_known_args(script_args)
    except argparse.ArgumentError as e:
        raise AcceleratorError(f"the training script's arguments: {e}") from None
    if unknown:
        raise AcceleratorError(f"the training script's arguments {' '.join(unknown)} are not its own (train_ds.py takes "
                               "--config CFG.json; this launcher's options go before the script)")
    if not args.config:
        raise AcceleratorError("the training script needs --config CFG.json (the shim checks it before launching)")
    return Path(args.config)


def read_config(path: Path) -> dict:
    """The training config's JSON object, read as train_ds.py reads it (the one reader: training.config)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing DeepSpeed logs its accelerator guess to stdout
        from training.config import ConfigError, read_config_file

    try:
        return read_config_file(path)
    except ConfigError as e:
        raise AcceleratorError(str(e)) from None


def check_topology(raw: dict, path: Path, world_size: int, how: str) -> None:
    """model_topo against the number of processes the launch starts (`how` says where that number came from)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing DeepSpeed logs its accelerator guess to stdout
        from models.pipeline import ModelConfigError, parse_topology

    pt = (raw.get("model_topo") or {}).get("process_topology") if isinstance(raw.get("model_topo"), dict) else None
    dims = pt.get("dims") if isinstance(pt, dict) else None
    if isinstance(dims, list) and dims and all(isinstance(d, int) for d in dims) and math.prod(dims) != world_size:
        raise AcceleratorError(f"{path}: model_topo.process_topology.dims {dims} needs {math.prod(dims)} processes, "
                               f"this launch starts {world_size} ({how})")
    try:
        parse_topology(raw.get("model_topo"), world_size)
    except ModelConfigError as e:
        raise AcceleratorError(f"{path}: {e}") from None


def main_of(prog: str, parser: Callable[[], argparse.ArgumentParser], build: Callable[[argparse.Namespace], Launch],
            sets_ds_accelerator: bool = False) -> Callable[[list[str] | None], int]:
    """main(argv) of a shim: parse, `build` the Launch, then print it (--dry-run) or exec it. Errors: one line, exit 2.

    The caller's DS_ACCELERATOR, when DeepSpeed cannot use it here (`ds_accelerator_problem`), would fail the
    shim's own DeepSpeed import (its config checks) with a traceback. A shim whose launch sets DS_ACCELERATOR itself
    (`sets_ds_accelerator`: Gaudi's hpu) does not use the caller's value: it is left out of the shim's own checks,
    which do not depend on the device, so --dry-run prints the command on any host. Any other shim's ranks would
    inherit it and fail: refused in one line, before anything else."""

    def main(argv: list[str] | None = None) -> int:
        args = parser().parse_args(argv)
        hidden = None
        if problem := ds_accelerator_problem():
            if not sets_ds_accelerator:
                print(f"{prog}: error: {problem}", file=sys.stderr)
                return 2
            hidden = os.environ.pop("DS_ACCELERATOR")  # the launch's own env sets it (execute merges it back)
        try:
            return run(args)
        finally:
            if hidden is not None:  # for an in-process caller (execute does not return)
                os.environ["DS_ACCELERATOR"] = hidden

    def run(args: argparse.Namespace) -> int:
        try:
            launch = build(args)
        except AcceleratorError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        if args.dry_run:
            print(launch.render(), flush=True)
            return 0
        sys.stdout.flush()
        launch.execute()
        return 0  # not reached: execute replaces the process

    return main
