"""Process-group set-up and teardown shared by train_ds.py and the launcher-started test workers."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def single_process_env() -> None:
    """`python train_ds.py ...` without a launcher runs as one process (a 1-stage pipeline): set what
    `deepspeed --num_gpus 1` would, instead of letting DeepSpeed fall back to MPI discovery."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def shm_buffer(rank: int) -> Path:
    """DeepSpeed's CPU shared-memory allreduce buffer for `rank` of this launch (ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def shutdown_distributed() -> None:
    """Destroy the process group and remove this rank's shared-memory buffer: DeepSpeed 0.19.8 creates a
    66 MB /dev/shm segment per CPU rank and never unlinks it, so every run would leak them."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    dist.destroy_process_group()
    shm_buffer(rank).unlink(missing_ok=True)


def device_line() -> str:
    """One summary line: the device DeepSpeed's accelerator drives, through which class, its backend and memory."""
    from deepspeed.accelerator import get_accelerator

    from training.monitor import fmt_bytes

    acc = get_accelerator()
    kind = "host memory" if acc.device_name() == "cpu" else "memory per device"
    return (f"device: {acc.device_name()} via {type(acc).__name__} (process group {acc.communication_backend_name()}); "
            f"{kind} {fmt_bytes(acc.total_memory())}, {fmt_bytes(acc.available_memory())} free at start")
