"""Start train_ds.py on AWS Trainium (Trn2/Trn3) with TorchNeuron, launched by torchrun.

  python -m launch.trainium [--nproc_per_node N] [--nnodes M --node_rank R --master_addr A] [--master_port P]
                            [--dry-run] train_ds.py --config CFG

TorchNeuron is native PyTorch: device `neuron`, process-group backend `neuron`, registered by `import
torch_neuronx`. DeepSpeed has no Neuron accelerator, so the ranks install launch.accelerator's
TorchDeviceAccelerator("neuron", "neuron") through DeepSpeed's set_accelerator: the shim sets
PIPEFT_ACCELERATOR=neuron:neuron and train_ds.py reads it. Several nodes: run the same command on each node with
its --node_rank. Checked before anything starts: the topology against nproc_per_node x nnodes, the multi-node
arguments, and an optimizer that needs DeepSpeed's compiled ops (fused Adam/Lamb), which have no Neuron build:
Adam/AdamW need "torch_adam": true. --accelerator DEVICE:BACKEND runs the same path on another device (the
tests use cpu:gloo); a device or backend torch lacks here, or a device this machine lacks (--dry-run: a note; the
command is for a host with one), is refused before torchrun starts. It passes torchrun --shutdown-timeout 900 (or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT's value, if set): torchrun SIGKILLs its workers 30 s after passing a SIGTERM on, which
would cut the checkpoint they then write; the option, unlike the variable, fails loudly on a torch before 2.12 (which
has neither and always waits 30 s). Trn1 (torch-xla) is not served by this path: see README.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from launch import ENV, REGISTERS, AcceleratorError, check_device, device_missing, parse_spec
from launch.shim import Launch, add_script_args, check_topology, config_path, main_of, read_config
from pipeft import module_command

COMPILED_OPTIMIZERS = ("lamb",)  # DeepSpeed CUDA kernels only (the 1-bit ones the trainer refuses anywhere)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=module_command("launch.trainium"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc_per_node", type=int, default=1, help="processes (logical NeuronCores) per node")
    ap.add_argument("--nnodes", type=int, default=1, help="number of nodes (run the command on each)")
    ap.add_argument("--node_rank", type=int, default=None, help="this node's rank (needed with --nnodes > 1)")
    ap.add_argument("--master_addr", default=None, help="node 0's address (needed with --nnodes > 1)")
    ap.add_argument("--accelerator", default="neuron:neuron", help="DEVICE:BACKEND (default neuron:neuron)")
    add_script_args(ap)
    return ap


def check_optimizer(raw: dict, path, here: bool) -> None:
    """The trainer's optimizer checks (training.optim.check_optimizer, as its start-up says them; what the type needs
    installed only `here`, not with --dry-run, which prints the command for another host), then what has no Neuron
    build."""
    from training.optim import check_optimizer as trainer_check

    if "optimizer" in raw:
        try:
            trainer_check(raw["optimizer"], installed=here)
        except ValueError as e:
            raise AcceleratorError(f"{path}: {e}") from None
    opt = raw.get("optimizer") if isinstance(raw.get("optimizer"), dict) else {}
    kind = str(opt.get("type", "")).lower()
    params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
    if kind in ("adam", "adamw") and not params.get("torch_adam", False):
        raise AcceleratorError(f"{path}: optimizer {opt.get('type')} needs \"torch_adam\": true in optimizer.params "
                               "here: DeepSpeed's fused Adam is a compiled op with no Neuron build")
    if kind in COMPILED_OPTIMIZERS:
        raise AcceleratorError(f"{path}: optimizer {opt.get('type')} is a DeepSpeed compiled op with no Neuron build; "
                               "use AdamW with \"torch_adam\": true, or Lion")


# torchrun SIGKILLs its workers 30 s (its default) after passing a SIGTERM on: a checkpoint being written then is lost
SHUTDOWN_ENV, SHUTDOWN_S = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 900


def build(args: argparse.Namespace) -> Launch:
    device, backend = parse_spec(args.accelerator, "--accelerator")
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise AcceleratorError(f"--nproc_per_node and --nnodes must be >= 1, got {args.nproc_per_node} and {args.nnodes}")
    # torch's agent SIGKILLs the ranks this long after passing SIGTERM on (the variable is ignored before 2.12)
    wait = os.environ.get(SHUTDOWN_ENV) or str(SHUTDOWN_S)
    try:  # as torchrun reads it (type=int); its own argparse error came after this launcher's lines
        wait = str(int(wait))
    except ValueError:
        raise AcceleratorError(f"{SHUTDOWN_ENV}={wait!r}: must be whole seconds (torchrun's --shutdown-timeout, "
                               f"{SHUTDOWN_S} when unset)") from None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node),
           "--nnodes", str(args.nnodes), "--shutdown-timeout", wait]
    if args.nnodes > 1:
        if args.master_addr is None or args.node_rank is None:
            raise AcceleratorError(f"--nnodes {args.nnodes} needs --master_addr (node 0's address) and --node_rank "
                                   "(this node's, 0..nnodes-1)")
        if not 0 <= args.node_rank < args.nnodes:
            raise AcceleratorError(f"--node_rank {args.node_rank} is outside 0..{args.nnodes - 1}")
        cmd += ["--node_rank", str(args.node_rank), "--master_addr", args.master_addr]
    elif args.node_rank not in (None, 0) or args.master_addr is not None:  # a forgotten --nnodes: each node alone
        given = " ".join(f"--{k} {v}" for k, v in (("node_rank", args.node_rank), ("master_addr", args.master_addr))
                         if v is not None)
        raise AcceleratorError(f"{given} without --nnodes: this launch would be one node on its own; pass --nnodes "
                               "(the number of nodes) too")
    cmd += ["--master_port", str(args.master_port), args.script, *args.script_args]
    world = args.nproc_per_node * args.nnodes
    path = config_path(args.script_args)
    raw = read_config(path)
    check_topology(raw, path, world, f"--nproc_per_node {args.nproc_per_node} x --nnodes {args.nnodes}")
    check_optimizer(raw, path, here=not args.dry_run)
    notes = [f"{args.nnodes} node(s) x {args.nproc_per_node} process(es) on {device} (process group {backend}) through "
             "launch.accelerator.TorchDeviceAccelerator"]
    need = REGISTERS.get(device)
    if need and importlib.util.find_spec(need) is None:
        if not args.dry_run:
            raise AcceleratorError(f"{need} (TorchNeuron) is not installed: this is not a Trainium host with the "
                                   "Neuron stack (--dry-run prints the command anyway)")
        notes.append(f"{need} is not installed here: the command is for a Trn2/Trn3 host")
    else:  # what every rank's TorchDeviceAccelerator would refuse, refused before torchrun starts
        check_device(device, backend, "--accelerator", present=not args.dry_run)
        if args.dry_run and device_missing(device):
            notes.append(f"no {device!r} device here: the command is for a host with one")
    if not args.dry_run and (args.nnodes == 1 or args.node_rank == 0):  # torchrun's agent serves the store here
        from training.distributed import port_taken

        if port_taken(args.master_port):
            raise AcceleratorError(f"--master_port {args.master_port} is already in use on this machine (another "
                                   "run?): pass a free port")
    return Launch(cmd, {ENV: f"{device}:{backend}"}, notes=notes)


main = main_of(module_command("launch.trainium"), parser, build)

if __name__ == "__main__":
    sys.exit(main())
