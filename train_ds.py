"""Pipeline-parallel fine-tuning.

  deepspeed [--num_gpus N | --hostfile hostfile] train_ds.py --config configs/X.json

On a machine without GPUs DeepSpeed's CPU accelerator is used (gloo); `--num_gpus N` then starts
N CPU processes. `python train_ds.py --config X.json` runs one process (a 1-stage pipeline). The config
holds DeepSpeed's keys beside the project's (see README).

A run continues from SAVE_PATH/latest when there is one ("resume": "auto"). SIGTERM or SIGINT to the
training processes saves a checkpoint at the next step boundary and exits 0.
Exit codes: 0 done (or preempted and saved), 1 training stopped (non-finite steps, a failed save), 2 bad config or data,
130 a Ctrl-C before the first step that the run's own handler did not take (while the records are checked).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeft import prog, quiet_start, started

PROG = prog("train_ds.py")
quiet_start(PROG, __name__)  # a Ctrl-C during the imports below: one line

from launch import AcceleratorError, exit_if_ds_accelerator_unusable  # noqa: E402

exit_if_ds_accelerator_unusable(PROG)  # before DeepSpeed's import builds it

from data.records import DataError  # noqa: E402
from models.hf_io import CheckpointError  # noqa: E402
from models.pipeline import ModelConfigError  # noqa: E402
from training.checkpoint import TrainingStopped  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402
from training.config_file import script_parser  # noqa: E402
from training.distributed import LAUNCH_VARS, LaunchError, launch_env, master_port_problem  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(PROG, __doc__)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # usage error (2) or --help (0): an exit code, as main's callers (a notebook) expect
        return e.code if isinstance(e.code, int) else 2
    # what launch_env adds (one process, srun) is taken away on return: a second main() in this process (tests, a
    # notebook) starts its own group instead of finding the first one's port
    added = [k for k in LAUNCH_VARS if k not in os.environ]
    try:
        return _main(args)
    finally:
        for k in added:
            os.environ.pop(k, None)


def _main(args: argparse.Namespace) -> int:
    try:
        launcher = launch_env()
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # One copy of each error per node: the errors every process raises alike (config, data, a failed save gathered
    # from all ranks) are printed by LOCAL_RANK 0 alone. An error a process finds about itself names it: its message
    # starts with "rank RANK: " (the trainer's device and join errors); only some ranks may raise those (under srun
    # --gpus-per-task only LOCAL_RANK >= 1 lacks its GPU), so every process prints its own.
    quiet = int(os.environ["LOCAL_RANK"]) != 0
    own = f"rank {int(os.environ['RANK'])}: "
    try:
        from launch.accelerator import install_from_env

        install_from_env()  # PIPEFT_ACCELERATOR (set by launch.trainium), before anything asks DeepSpeed
        cfg = load_config(args.config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        for note in cfg.notes if int(os.environ.get("RANK", "0")) == 0 else []:  # one line per run
            print(f"{PROG}: warning: {note}", file=sys.stderr)
        if problem := master_port_problem(launcher):
            raise ConfigError(problem)
        from training.trainer import run

        run(cfg)
    except (ConfigError, DataError, ModelConfigError, CheckpointError, TrainingStopped, AcceleratorError,
            LaunchError) as e:
        if not quiet or str(e).startswith(own):
            for line in str(e).splitlines():
                print(f"{PROG}: error: {line}", file=sys.stderr)
        return 1 if isinstance(e, TrainingStopped) else 2
    return 0


def cli() -> int:
    """The command: main(), and a Ctrl-C that reaches it as one line (main() raises it to a notebook's caller)."""
    try:
        return main()
    except KeyboardInterrupt:  # before the run's own handler (while the records are checked): no step has run
        print(f"{PROG}: interrupted before the first step: nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    started()
    sys.exit(cli())
