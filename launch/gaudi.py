"""Start train_ds.py on Intel Gaudi (HPU) with DeepSpeed's launcher, the way optimum-habana's gaudi_spawn.py does.

  python -m launch.gaudi [--world_size N | --hostfile H] [--master_port P] [--dry-run] train_ds.py --config CFG

One node: `deepspeed --num_nodes 1 --num_gpus N --no_local_rank ...`; several: `deepspeed --hostfile H
--master_addr FIRST_HOST --no_local_rank ...` (DistributedRunner's two DeepSpeed forms). The environment:
DS_ACCELERATOR=hpu (DeepSpeed's HPU accelerator: device hpu, backend hccl), PT_HPU_LAZY_MODE=0 (eager mode, the
default of current Gaudi software; lazy mode needs htcore.mark_step() calls this trainer does not make) and
PT_ENABLE_INT64_SUPPORT=1 (the stages exchange int64 position and segment ids). With a hostfile the variables
also go to a DeepSpeed environment file (DS_ENV_FILE, after the lines of the user's ~/.deepspeed_env and
./.deepspeed_env, which it replaces), since DeepSpeed's multi-node launcher forwards only a few prefixes to the
other nodes. Before anything starts: the topology against the process count, fp16 against the
device (first-generation Gaudi has none), lazy mode refused; each a one-line error. The caller's own
DS_ACCELERATOR (e.g. hpu exported on a host without habana_frameworks) is not used by these checks: --dry-run
prints the command anywhere, and a real launch needs habana_frameworks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from launch import AcceleratorError
from launch.shim import Launch, add_script_args, check_topology, config_path, main_of, read_config
from pipeft import module_command

ENV = {"DS_ACCELERATOR": "hpu", "PT_HPU_LAZY_MODE": "0", "PT_ENABLE_INT64_SUPPORT": "1"}
ENV_FILE = ".pipeft_gaudi_env"  # written in the working directory for multi-node runs, named by DS_ENV_FILE


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=module_command("launch.gaudi"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world_size", type=int, default=None, help="HPUs on this node (default 1; with --hostfile: "
                    "must equal the hostfile's slots)")
    ap.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (`host slots=N` per line) for several nodes")
    add_script_args(ap)
    return ap


def read_hostfile(path: Path) -> dict[str, int]:
    """{host: slots} in file order, as DeepSpeed reads a hostfile; a one-line error on a bad line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise AcceleratorError(f"--hostfile {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AcceleratorError(f"--hostfile {path}: not valid UTF-8 (byte offset {e.start})") from None
    hosts: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"(\S+)\s+slots=(\d+)", line)  # DeepSpeed's _parse_hostfile: later fields are its own
        if match is None or int(match[2]) < 1:
            raise AcceleratorError(f"--hostfile {path}:{n}: expected `HOST slots=N` (N >= 1), got {line!r}")
        if match[1] in hosts:
            raise AcceleratorError(f"--hostfile {path}:{n}: host {match[1]!r} is listed twice")
        hosts[match[1]] = int(match[2])
    if not hosts:
        raise AcceleratorError(f"--hostfile {path}: lists no host")
    return hosts


PROBE = "import habana_frameworks.torch.utils.experimental as h; print(bool(h._is_fp16_supported()))"


def fp16_supported() -> bool | None:
    """Whether this host's Gaudi computes fp16 (Habana's own probe, the one DeepSpeed's HPU accelerator uses), asked
    in a child process, as DeepSpeed's tests ask it: the shim then execs the launcher, which must not inherit a device
    the probe opened. None where the Gaudi software (habana_frameworks) is not installed or the probe fails."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("habana_frameworks") is None:
        return None
    try:
        said = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"True": True, "False": False}.get(said[-1] if said else "")


def build(args: argparse.Namespace, fp16: bool | None = None, probe: bool = True) -> Launch:
    """The Launch for these arguments. `fp16` is this host's answer (`fp16_supported()` when `probe`)."""
    if probe:
        fp16 = fp16_supported()
    if args.world_size is not None and args.world_size < 1:
        raise AcceleratorError(f"--world_size must be >= 1, got {args.world_size}")
    if os.environ.get("PT_HPU_LAZY_MODE", "0") not in ("", "0"):
        raise AcceleratorError(f"PT_HPU_LAZY_MODE={os.environ['PT_HPU_LAZY_MODE']}: lazy mode needs "
                               "htcore.mark_step() calls this trainer does not make; unset it (eager mode)")
    env, files, notes = dict(ENV), {}, []
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    if args.hostfile is not None:
        hosts = read_hostfile(Path(args.hostfile))
        world = sum(hosts.values())
        if args.world_size is not None and args.world_size != world:
            raise AcceleratorError(f"--world_size {args.world_size} does not match --hostfile {args.hostfile}: "
                                   f"{world} slots on {len(hosts)} host(s)")
        how = f"{world} slots in --hostfile {args.hostfile}"
        master = next(iter(hosts))
        cmd = [deepspeed, "--hostfile", args.hostfile, "--master_addr", master, "--no_local_rank"]
        env_file = str(Path.cwd() / ENV_FILE)
        # DS_ENV_FILE replaces the .deepspeed_env files DeepSpeed reads (~ then .): their lines come first
        name = os.environ.get("DS_ENV_FILE") or ".deepspeed_env"  # DeepSpeed's name for it, the user's own included
        mine = [f for f in (Path.home() / name, Path(name)) if f.is_file() and f.resolve() != Path(env_file).resolve()]
        kept = [line for f in mine for line in f.read_text().splitlines() if "=" in line]
        files[env_file] = "".join(f"{line}\n" for line in kept) + "".join(f"{k}={v}\n" for k, v in ENV.items())
        env["DS_ENV_FILE"] = env_file
        notes.append(f"{len(hosts)} nodes, {world} HPUs; master {master}; the HPU variables reach every node "
                     f"through {env_file} (DS_ENV_FILE)"
                     + (f", with the lines of {' and '.join(map(str, mine))}" if mine else ""))
    else:
        world = args.world_size or 1
        how = f"--world_size {world}"
        cmd = [deepspeed, "--num_nodes", "1", "--num_gpus", str(world), "--no_local_rank"]
        notes.append(f"one node, {world} HPU(s)")
    cmd += ["--master_port", str(args.master_port), args.script, *args.script_args]
    path = config_path(args.script_args)
    raw = read_config(path)
    check_topology(raw, path, world, how)
    from training.optim import half_precisions  # the trainer's reading of the config's precision

    if "fp16" in half_precisions(raw):
        if fp16 is False:
            raise AcceleratorError(f"{path}: fp16 is not supported by this Gaudi (first-generation Gaudi has no fp16; "
                                   "habana_frameworks' _is_fp16_supported() is false): use bf16")
        if fp16 is None:
            notes.append("fp16: not checked here (no habana_frameworks); the run refuses it on a Gaudi without fp16")
    if fp16 is None and not args.dry_run:
        raise AcceleratorError("habana_frameworks is not installed: this is not a Gaudi host with Intel Gaudi "
                               "software (--dry-run prints the command anyway)")
    return Launch(cmd, env, files, notes)


main = main_of(module_command("launch.gaudi"), parser, build, sets_ds_accelerator=True)  # ENV: DS_ACCELERATOR=hpu

if __name__ == "__main__":
    sys.exit(main())
