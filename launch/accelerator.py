"""A DeepSpeed accelerator for any torch device type, named by its device type and process-group backend.

DeepSpeed 0.19.8 ships accelerators for cuda, cpu, hpu, xpu, npu, mps, mlu, sdaa, supa, klxpu, and none for
AWS Neuron. TorchNeuron registers Trainium as a native torch device (`neuron`, PrivateUse1) with the process-group
backend `neuron`; `TorchDeviceAccelerator("neuron", "neuron")` is what DeepSpeed then uses through
`set_accelerator`. Every device operation goes through torch's own APIs for that device type: the device module
(`torch.get_device_module(type)`), else `torch.accelerator` when that type is the current accelerator, else the
host (the device has no RNG or memory counters of its own: the torch host generator, the process's RSS).
`TorchDeviceAccelerator("cpu", "gloo")` runs the same code on this machine's CPU, which is how the tests drive it.

What this class does not provide: DeepSpeed's compiled ops (fused Adam/Lamb, the CPU shared-memory allreduce).
Use `"torch_adam": true` for Adam/AdamW (the Trainium shim checks it) or a client optimizer (Lion).

Processes pick it up from the environment: PIPEFT_ACCELERATOR=DEVICE:BACKEND (e.g. neuron:neuron), read by
`install_from_env()` before anything asks DeepSpeed for its accelerator (train_ds.py, demo.py).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from deepspeed.accelerator.abstract_accelerator import DeepSpeedAccelerator

from launch import ENV, check_device, parse_spec


def _host_peak_rss() -> int:
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _host_rss())  # ru_maxrss: KiB on Linux


def _host_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _StateGenerator:
    """A generator's get_state / set_state over an accelerator's get_rng_state / set_rng_state."""

    def __init__(self, acc: TorchDeviceAccelerator):
        self._acc = acc

    def get_state(self) -> torch.Tensor:
        return self._acc.get_rng_state()

    def set_state(self, state: torch.Tensor) -> None:
        self._acc.set_rng_state(state)


class TorchDeviceAccelerator(DeepSpeedAccelerator):
    """DeepSpeed's accelerator interface over torch device type `device_type` and backend `backend`."""

    _torch_pins_host_memory = False  # no page-locked host memory: copies are plain host tensors

    def __init__(self, device_type: str, backend: str):
        super().__init__()
        check_device(device_type, backend)
        self._name, self._communication_backend_name = device_type, backend
        self._compile_backend = "inductor"
        try:
            self._mod = torch.get_device_module(device_type)
        except (RuntimeError, AttributeError):
            self._mod = None
        current = torch.accelerator.current_accelerator()
        self._acc = torch.accelerator if current is not None and current.type == device_type else None
        self._index = int(os.environ.get("LOCAL_RANK", "0"))
        self._dtype_ok: dict[torch.dtype, bool] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self._communication_backend_name!r})"

    def _fn(self, name: str, acc_name: str | None = None):
        """The device's own function `name` (device module, else torch.accelerator's `acc_name`), or None."""
        fn = getattr(self._mod, name, None)
        if fn is None and self._acc is not None:
            fn = getattr(self._acc, acc_name or name, None)
        return fn

    # --------------------------------------------------------------------------------------------- device

    def is_synchronized_device(self):
        return self._name == "cpu"  # host execution completes before a call returns; devices run asynchronously

    def use_host_timers(self):
        return self.is_synchronized_device()

    def resolves_data_dependency(self):
        return self.is_synchronized_device()

    def handles_memory_backpressure(self):
        return self.is_synchronized_device()

    def device_name(self, device_index=None):
        return self._name if device_index is None else f"{self._name}:{device_index}"

    def device(self, device_index=None):
        return torch.device(self._name, self._index if device_index is None else device_index)

    def set_device(self, device_index):
        self._index = int(device_index)
        fn = self._fn("set_device", "set_device_index")
        if fn is not None:
            fn(self._index)

    def current_device(self):
        fn = self._fn("current_device", "current_device_index")
        idx = fn() if fn is not None else None
        return idx if isinstance(idx, int) else self._index

    def current_device_name(self):
        return f"{self._name}:{self.current_device()}"

    def device_count(self):
        fn = self._fn("device_count")
        return fn() if fn is not None else 1

    def synchronize(self, device_index=None):
        fn = self._fn("synchronize")
        return fn() if fn is not None else None

    def is_available(self):
        fn = self._fn("is_available")
        return bool(fn()) if fn is not None else True

    # --------------------------------------------------------------------------------------------- RNG

    def random(self):
        return torch.random

    def get_rng_state(self, device_index=None):
        fn = self._fn("get_rng_state")
        return fn() if fn is not None else torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None):
        fn = self._fn("set_rng_state")
        return fn(new_state) if fn is not None else torch.set_rng_state(new_state)

    def manual_seed(self, seed):
        fn = self._fn("manual_seed")
        return fn(seed) if fn is not None else torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        fn = self._fn("manual_seed_all")
        return fn(seed) if fn is not None else torch.manual_seed(seed)

    def initial_seed(self):
        fn = self._fn("initial_seed")
        return fn() if fn is not None else torch.initial_seed()

    def default_generator(self, device_index):
        """The device's generator: what DeepSpeed's activation checkpointing restores get_rng_state()'s state into
        before a recompute (`default_generator(i).set_state`). A device module with its own RNG state but no
        `default_generators` gets one over that state (the host's generator would take the device's state: a
        size error, or dropout recomputed with other random numbers)."""
        gens = getattr(self._mod, "default_generators", None)
        if gens:
            return gens[device_index]
        return _StateGenerator(self) if self._fn("set_rng_state") is not None else torch.default_generator

    # --------------------------------------------------------------------------------------------- streams

    @property
    def Stream(self):
        return None if self.is_synchronized_device() else getattr(self._mod, "Stream", None)

    def stream(self, stream):
        fn = self._fn("stream")
        return fn(stream) if fn is not None and stream is not None else contextlib.nullcontext()

    def current_stream(self, device_index=None):
        fn = self._fn("current_stream")
        return fn() if fn is not None and not self.is_synchronized_device() else None

    def default_stream(self, device_index=None):
        fn = self._fn("default_stream")
        return fn() if fn is not None else None

    @property
    def Event(self):
        return None if self.is_synchronized_device() else getattr(self._mod, "Event", None)

    # --------------------------------------------------------------------------------------------- memory

    def _memory(self, name: str, host):
        fn = self._fn(name)
        return fn(self.current_device()) if fn is not None else host()

    def empty_cache(self):
        fn = self._fn("empty_cache")
        return fn() if fn is not None else None

    def memory_allocated(self, device_index=None):
        return self._memory("memory_allocated", _host_rss)

    def max_memory_allocated(self, device_index=None):
        return self._memory("max_memory_allocated", _host_peak_rss)

    def reset_max_memory_allocated(self, device_index=None):
        return self.reset_peak_memory_stats(device_index)

    def memory_cached(self, device_index=None):
        return self.memory_reserved(device_index)

    def max_memory_cached(self, device_index=None):
        return self.max_memory_reserved(device_index)

    def reset_max_memory_cached(self, device_index=None):
        return self.reset_peak_memory_stats(device_index)

    def memory_stats(self, device_index=None):
        return self._memory("memory_stats", lambda: {"allocated_bytes.all.current": _host_rss(),
                                                     "allocated_bytes.all.peak": _host_peak_rss()})

    def reset_peak_memory_stats(self, device_index=None):
        fn = self._fn("reset_peak_memory_stats")
        return fn(self.current_device()) if fn is not None else None  # the host's peak RSS cannot be reset

    def memory_reserved(self, device_index=None):
        return self._memory("memory_reserved", _host_rss)

    def max_memory_reserved(self, device_index=None):
        return self._memory("max_memory_reserved", _host_peak_rss)

    def _memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device, or of the host."""
        fn = self._fn("mem_get_info", "get_memory_info")
        if fn is not None:
            return tuple(fn(self.current_device()))
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    def total_memory(self, device_index=None):
        return self._memory_info()[1]

    def available_memory(self, device_index=None):
        return self._memory_info()[0]

    # --------------------------------------------------------------------------------------------- dtypes

    def _computes(self, dtype: torch.dtype) -> bool:
        """Whether a small matmul in `dtype` runs on the device (checked once)."""
        if dtype not in self._dtype_ok:
            try:
                x = torch.ones(4, 4, dtype=dtype, device=self.device())
                self._dtype_ok[dtype] = bool(torch.isfinite((x @ x).float().cpu()).all())
            except (RuntimeError, TypeError, NotImplementedError):
                self._dtype_ok[dtype] = False
        return self._dtype_ok[dtype]

    def is_bf16_supported(self):
        return self._computes(torch.bfloat16)

    def is_fp16_supported(self):
        return self._computes(torch.float16)

    def is_fp64_supported(self):
        return self._computes(torch.float64)

    def supported_dtypes(self):
        return [torch.float] + [d for d in (torch.bfloat16, torch.float16) if self._computes(d)]

    # --------------------------------------------------------------------------------------------- misc

    def range_push(self, msg, domain=None, category=None):
        return None

    def range_pop(self, domain=None):
        return None

    def lazy_call(self, callback):
        return callback()

    def communication_backend_name(self):
        return self._communication_backend_name

    def is_triton_supported(self):
        return False

    def create_graph(self):
        return None

    def capture_to_graph(self, graph, pool=None, stream=None):
        return contextlib.nullcontext()

    def replay_graph(self, graph):
        return None

    def _tensor(self, dtype):
        return functools.partial(torch.tensor, dtype=dtype, device=self._name)

    BFloat16Tensor = property(lambda self: self._tensor(torch.bfloat16))
    ByteTensor = property(lambda self: self._tensor(torch.uint8))
    DoubleTensor = property(lambda self: self._tensor(torch.double))
    FloatTensor = property(lambda self: self._tensor(torch.float))
    HalfTensor = property(lambda self: self._tensor(torch.half))
    IntTensor = property(lambda self: self._tensor(torch.int))
    LongTensor = property(lambda self: self._tensor(torch.long))

    def _torch_pin_memory(self, tensor):
        return tensor

    def _torch_empty_pinned(self, tensor, shape):
        return tensor.new_empty(shape)

    def _torch_is_pinned(self, tensor):
        return False

    def on_accelerator(self, tensor):
        return tensor.device.type == self._name

    # DeepSpeed's compiled ops are built for its own accelerators only: none here
    def op_builder_dir(self):
        return "deepspeed.ops.op_builder"

    def create_op_builder(self, class_name):
        return None

    def get_op_builder(self, class_name):
        return None

    def build_extension(self):
        from torch.utils.cpp_extension import BuildExtension

        return BuildExtension

    def export_envs(self):
        # what DeepSpeed's multi-node runner would forward, were this its accelerator; it is not (the runner's process
        # never installs it): on other nodes PIPEFT_ACCELERATOR comes from .deepspeed_env (README) or torchrun's env
        return [ENV]

    def visible_devices_envs(self):
        return []

    def set_visible_devices_envs(self, current_env, local_accelerator_ids):
        return None

    def get_compile_backend(self):
        return self._compile_backend

    def set_compile_backend(self, backend):
        self._compile_backend = backend


def install_from_env() -> TorchDeviceAccelerator | None:
    """Make DeepSpeed use TorchDeviceAccelerator when PIPEFT_ACCELERATOR is set (call before DeepSpeed starts
    its process group or engine); returns it, or None when the variable is unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    from deepspeed.accelerator import real_accelerator, set_accelerator

    device, backend = parse_spec(spec)
    current = real_accelerator.ds_accelerator
    if isinstance(current, TorchDeviceAccelerator) and (current._name, current._communication_backend_name) == \
            (device, backend):
        return current
    acc = TorchDeviceAccelerator(device, backend)
    set_accelerator(acc)
    return acc
