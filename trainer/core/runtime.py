"""Process set-up of a training run: devices, precision, distributed groups, seeding.

:class:`Dist` reads the ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``),
picks the device, splits CPU threads between local ranks and owns the process group (gloo
on CPU, nccl on GPU). A plain ``python`` process is a world of one.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch

from trainer.core.config import TrainConfig


def resolve_precision(device: torch.device) -> str:
    """``bf16`` where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 /
    AMX through oneDNN), else ``fp32`` (emulated bf16 is slower than fp32)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def resolve_device(name: str) -> torch.device:
    """The one device rule of every recipe: ``auto`` is CUDA when available, else CPU;
    anything else (``cpu``, ``cuda``, ``cuda:N``, ``mps``) is taken as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None


class Dist:
    """Process group state (a single process when WORLD_SIZE is unset or 1)."""

    def __init__(self, *, rank: int, world_size: int, local_rank: int, device: torch.device, started: bool) -> None:
        self.rank, self.world_size, self.local_rank, self.device, self._started = rank, world_size, local_rank, device, started

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None and world > 1:
            device = torch.device(f"cuda:{local_rank}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        elif world > 1 and device.type == "cpu":
            # Local ranks share the cores: oversubscription makes every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        started = False
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            started = True
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device, started=started)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, net: torch.nn.Module, *, last: bool):
        """Skip the gradient all-reduce on accumulation micro-steps other than the last."""
        if self.world_size > 1 and not last:
            return net.no_sync()
        return contextlib.nullcontext()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def stop(self) -> None:
        if self._started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def param_digest(model: torch.nn.Module) -> str:
    """:func:`state_digest` of the model's ``state_dict()``."""
    return state_digest(model.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hex xxh3-64 over the tensors' names and raw bytes, in name order (bit-for-bit identity)."""
    import xxhash  # noqa: PLC0415

    h = xxhash.xxh3_64()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                 else t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
