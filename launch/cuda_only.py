"""The CUDA-only features, in one place. Everything else reaches the device through DeepSpeed's accelerator
(`deepspeed.accelerator.get_accelerator()`: placement, RNG, memory, process-group backend), so it runs the same
on CUDA, Gaudi (hpu), TorchNeuron (neuron, through launch.accelerator) and the CPU.

- flash_attention_2 (and "auto"'s varlen path for packed rows): the flash-attn package's CUDA kernels.
- flex_attention: torch's FlexAttention has no backward on the CPU in torch 2.13; on other devices it is
  not checked, so it is offered on CUDA only.
- Lion's `use_triton`: lion-pytorch's triton kernel (CUDA tensors, triton installed).
- the device's marketing name in bench/ output.
"""

from __future__ import annotations

import importlib.util

import torch

CUDA_ONLY = {
    "flash_attention_2": "flash-attn's CUDA kernels",
    "flex_attention": "torch FlexAttention's backward (none on the CPU; other devices unchecked), compiled with triton",
    "lion use_triton": "lion-pytorch's triton kernel",
}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def flash_attn_available() -> bool:
    return cuda_available() and importlib.util.find_spec("flash_attn") is not None


def flex_problem(device_type: str) -> str | None:
    """Why FlexAttention cannot train on `device_type` (words that follow "flex_attention"), None when it can."""
    if device_type != "cuda":  # torch 2.13: "FlexAttention does not support backward on CPU"
        return f"has no backward on {device_type} in this torch ({torch.__version__})"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"is not in this torch ({torch.__version__})"
    if importlib.util.find_spec("triton") is None:  # torch.compile's inductor writes its CUDA kernel in triton
        return "is compiled with triton on CUDA, and triton is not installed (pip install triton)"
    return None


def flex_available(device_type: str) -> bool:
    return flex_problem(device_type) is None


def triton_problem(params: list, device_type: str | None = None) -> str | None:
    """Why lion-pytorch's triton kernel cannot run on these params (tensors or group dicts), or None.
    `device_type`: where they will train (the trainer builds the optimizer before DeepSpeed moves the model to
    the accelerator); None: where they are now."""
    if device_type is not None and device_type != "cuda":
        return f"training runs on {device_type}, not on a CUDA device"
    if not cuda_available():
        return "CUDA is not available"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    tensors = [t for item in params for t in (
        ([item["params"]] if isinstance(item["params"], torch.Tensor) else item["params"]) if isinstance(item, dict)
        else [item])]
    if device_type is None and any(isinstance(t, torch.Tensor) and not t.is_cuda for t in tensors):
        return "the parameters are not on a CUDA device"
    return None


def device_label(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" for a CUDA device, else the device itself ("hpu:0", "cpu")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
