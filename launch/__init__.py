"""Where and how training runs: DeepSpeed's accelerator for any torch device (accelerator.py), the one module
of CUDA-only features (cuda_only.py), and thin launch shims for Gaudi (gaudi.py) and Trainium (trainium.py)."""


class AcceleratorError(ValueError):
    """A device setting that cannot be used (PIPEFT_ACCELERATOR, a shim's arguments): one line."""
