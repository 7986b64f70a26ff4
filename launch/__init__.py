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


# DeepSpeed's real_accelerator.get_accelerator, which its import runs, checked the way it checks them (0.19.8): the
# values it accepts (SUPPORTED_ACCELERATOR_LIST, in its order), the vendor package each of these imports, and xpu
# (torch.xpu.is_available()) and mps (torch.mps.current_allocated_memory()) on torch; anything else is a ValueError
DS_ACCELERATORS = ("cuda", "cpu", "xpu", "npu", "mps", "hpu", "mlu", "sdaa", "supa", "klxpu")
DS_ACCELERATOR_NEEDS = {"hpu": "habana_frameworks", "npu": "torch_npu", "mlu": "torch_mlu", "sdaa": "torch_sdaa",
                        "supa": "torch_supa", "klxpu": "torch_xmlir"}


def ds_accelerator_problem() -> str | None:
    """Why DeepSpeed's import fails on this machine with DS_ACCELERATOR (a value it does not accept, a vendor package
    or torch device support missing here), else None. Checked before anything imports DeepSpeed, which builds the
    accelerator on import and fails there with a traceback; torch is imported only for xpu and mps."""
    import importlib.util
    import os

    if (name := os.environ.get("DS_ACCELERATOR")) is None:
        return None
    unset = "(unset DS_ACCELERATOR to let DeepSpeed detect this machine's device)"
    if name not in DS_ACCELERATORS:
        return (f"DS_ACCELERATOR={name!r}: not an accelerator DeepSpeed knows; it accepts "
                f"{', '.join(DS_ACCELERATORS)} {unset}")
    package = DS_ACCELERATOR_NEEDS.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"DS_ACCELERATOR={name}: DeepSpeed's {name.upper()} accelerator needs {package}, which is not "
                f"installed here {unset}")
    if name == "xpu":
        import torch

        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            return (f"DS_ACCELERATOR=xpu: DeepSpeed's XPU accelerator needs torch with XPU support, and "
                    f"torch.xpu.is_available() is false here {unset}")
    if name == "mps":
        try:
            import torch.mps

            torch.mps.current_allocated_memory()  # DeepSpeed's own proxy for an MPS backend
        except (RuntimeError, ImportError):
            return (f"DS_ACCELERATOR=mps: DeepSpeed's MPS accelerator needs torch's MPS backend (Apple silicon), which "
                    f"torch here does not have {unset}")
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


def parse_spec(spec: str, where: str = ENV) -> tuple[str, str]:
    """"DEVICE:BACKEND" -> (device, backend); a one-line AcceleratorError naming `where` (the environment variable, or
    the option the value came from) otherwise."""
    device, sep, backend = spec.partition(":")
    if not sep or not device or not backend or ":" in backend:
        shown = f"{where}={spec!r}" if where == ENV else f"{where} {spec!r}"
        raise AcceleratorError(f"{shown}: expected DEVICE:BACKEND, e.g. neuron:neuron or cpu:gloo")
    return device, backend


def check_device(device_type: str, backend: str, where: str = ENV, present: bool = True) -> None:
    """A one-line AcceleratorError naming `where` unless torch here knows `device_type` (after importing the module
    that registers the device, REGISTERS), it is a training device (not meta), torch has the process-group `backend`,
    and (`present`) this machine has such a device: `device_missing`."""
    import importlib

    import torch

    if device_type in REGISTERS:
        try:
            importlib.import_module(REGISTERS[device_type])
        except ImportError:
            raise AcceleratorError(f"{where}: the {device_type!r} device needs {REGISTERS[device_type]}, which is not "
                                   "installed here") from None
    try:
        torch.device(device_type)
    except RuntimeError:
        raise AcceleratorError(f"{where}: torch knows no device type {device_type!r}") from None
    if device_type == "meta":
        raise AcceleratorError(f"{where}: 'meta' is not a training device (its tensors hold no data); name the device "
                               "to train on, e.g. neuron:neuron or cpu:gloo")
    if not torch.distributed.is_backend_available(backend):
        raise AcceleratorError(f"{where}: torch has no process-group backend {backend!r} here (is the package that "
                               "registers it installed?)")
    if present and (missing := device_missing(device_type)):
        raise AcceleratorError(f"{where}: {missing}")


def device_missing(device_type: str) -> str | None:
    """Why this machine has no usable `device_type` device (a type torch knows), else None; asked the way
    TorchDeviceAccelerator drives the device: its device module's is_available() (else device_count()), else whether
    it is torch's current accelerator. Nothing is allocated (a launcher must not take a device its ranks need)."""
    import torch

    if device_type == "cpu":
        return None
    try:
        mod = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        mod = None
    for name in ("is_available", "device_count"):
        if callable(fn := getattr(mod, name, None)):
            try:
                if fn():
                    return None
                said = "is false" if name == "is_available" else "is 0"
            except Exception as e:  # noqa: BLE001 - a device runtime that cannot start here: the device is not usable
                from pipeft import one_line

                said = f"failed: {one_line(e, 160, named=True)}"
            return f"no {device_type!r} device here (torch.{device_type}.{name}() {said})"
    current = torch.accelerator.current_accelerator()
    if current is not None and current.type == device_type:
        return None
    return (f"no {device_type!r} device here (torch has no torch.{device_type} module and its current accelerator is "
            f"{current.type if current is not None else 'none'}; is the package that registers the device installed?)")
