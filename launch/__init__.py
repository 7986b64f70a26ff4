"""Where and how training runs: DeepSpeed's accelerator for any torch device (accelerator.py), the one module
of CUDA-only features (cuda_only.py), and thin launch shims for Gaudi (gaudi.py) and Trainium (trainium.py)."""


class AcceleratorError(ValueError):
    """A device setting that cannot be used (PIPEFT_ACCELERATOR, a shim's arguments): one line."""


def deepspeed_logs_on_stderr():
    """The context to import DeepSpeed in for a command whose stdout is its product (demo.py's text, a --json
    object): DeepSpeed's logger writes to the sys.stdout of its import (its accelerator warning among others)."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


# DS_ACCELERATOR values whose DeepSpeed accelerator needs a vendor package: without it, importing DeepSpeed fails
DS_ACCELERATOR_NEEDS = {"hpu": "habana_frameworks", "npu": "torch_npu", "mlu": "torch_mlu"}


def ds_accelerator_problem() -> str | None:
    """Why DS_ACCELERATOR cannot work on this machine (its vendor package is missing), else None. Checked before
    anything imports DeepSpeed, which builds the accelerator on import and fails there with a traceback."""
    import importlib.util
    import os

    name = os.environ.get("DS_ACCELERATOR", "")
    package = DS_ACCELERATOR_NEEDS.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"DS_ACCELERATOR={name}: DeepSpeed's {name.upper()} accelerator needs {package}, which is not installed "
                "here (unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)")
    return None


def exit_if_ds_accelerator_unusable(prog: str) -> None:
    """An entry point's first check, before anything imports DeepSpeed: `ds_accelerator_problem` as one line, exit 2."""
    if problem := ds_accelerator_problem():
        import sys

        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)


ENV = "PIPEFT_ACCELERATOR"  # DEVICE:BACKEND for launch.accelerator.TorchDeviceAccelerator, read by install_from_env
# the module that registers a device type with torch, imported before the device is used
REGISTERS = {"neuron": "torch_neuronx"}


def parse_spec(spec: str) -> tuple[str, str]:
    """"DEVICE:BACKEND" -> (device, backend); a one-line AcceleratorError otherwise."""
    device, sep, backend = spec.partition(":")
    if not sep or not device or not backend or ":" in backend:
        raise AcceleratorError(f"{ENV}={spec!r}: expected DEVICE:BACKEND, e.g. neuron:neuron or cpu:gloo")
    return device, backend
