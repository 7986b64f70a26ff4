"""Where and how training runs: DeepSpeed's accelerator for any torch device (accelerator.py), the one module
of CUDA-only features (cuda_only.py), and thin launch shims for Gaudi (gaudi.py) and Trainium (trainium.py)."""


class AcceleratorError(ValueError):
    """A device setting that cannot be used (PIPEFT_ACCELERATOR, a shim's arguments): one line."""


ENV = "PIPEFT_ACCELERATOR"  # DEVICE:BACKEND for launch.accelerator.TorchDeviceAccelerator, read by install_from_env
# the module that registers a device type with torch, imported before the device is used
REGISTERS = {"neuron": "torch_neuronx"}


def parse_spec(spec: str) -> tuple[str, str]:
    """"DEVICE:BACKEND" -> (device, backend); a one-line AcceleratorError otherwise."""
    device, sep, backend = spec.partition(":")
    if not sep or not device or not backend or ":" in backend:
        raise AcceleratorError(f"{ENV}={spec!r}: expected DEVICE:BACKEND, e.g. neuron:neuron or cpu:gloo")
    return device, backend
