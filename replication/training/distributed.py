"""Data-parallel training's process group for `training.loop`: joining it (torchrun's variables, or a
group the caller initialised), each rank's device and share of the batch, the DDP wrapper, and the
collectives the loop needs (buffers and values from rank 0). One process (the default) touches none of it.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from replication import runtime


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in data-parallel training: `rank` among `world_size` processes."""

    rank: int
    world_size: int


def launched_by_torchrun() -> bool:
    """Did torchrun start this process (`WORLD_SIZE` above 1, or `RANK` / `LOCAL_RANK` set)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ or "LOCAL_RANK" in os.environ


def join_process_group(requested: bool, device: str | torch.device | None) -> ProcessGroup | None:
    """The process group training runs in; None (single process, the default) unless torchrun started
    the process or `requested` (`TrainConfig.distributed`) asks for data parallelism.

    A group the caller initialised is used as it is. Otherwise one is initialised from torchrun's
    variables (env://) with backend "nccl" on CUDA, "gloo" on the CPU, and kept until the process
    exits: initialising a default group a second time on torchrun's store is not reliable.
    """
    if not (requested or launched_by_torchrun()):
        return None
    device = runtime.resolve_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(_local_rank())
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as error:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"cannot start data-parallel training ({reason}); launch with torchrun (it sets RANK, WORLD_SIZE, "
                f"MASTER_ADDR and MASTER_PORT), initialise torch.distributed before training, or train in one process "
                f"(TrainConfig.distributed = false and none of RANK, LOCAL_RANK, WORLD_SIZE > 1 set)."
            ) from None
        atexit.register(_leave_process_group)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """Under data parallelism each process computes on its own GPU, `cuda:<LOCAL_RANK>`; CPU stays CPU."""
    return torch.device("cuda", _local_rank()) if device.type == "cuda" else device


def per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(
            f"TrainConfig.batch_size={batch_size} is the global batch and must split evenly over {world_size} "
            f"processes; choose a multiple of {world_size} or another process count."
        )
    return batch_size // world_size


def parallel_identity(group: ProcessGroup | None) -> dict[str, int]:
    """The world size's part of a checkpoint or cache identity: nothing for one process, so single-process
    keys stay what they were; more processes split batches (and BatchNorm statistics) differently."""
    return {"world_size": group.world_size} if group is not None and group.world_size > 1 else {}


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """`model` wrapped for gradient averaging over ranks (rank 0's weights and buffers broadcast first)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(model: nn.Module) -> None:
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
