"""The rank grid: which ranks form a tensor-parallel group and which a data-parallel group.

Paper Fig. 8: tensor-parallel groups are *contiguous* ranks (inside one server, where the links are fast);
data-parallel groups take the same position across tensor groups. 8 ranks at tensor=2, data=4:
tensor groups [0,1] [2,3] [4,5] [6,7]; data groups [0,2,4,6] [1,3,5,7].
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def tensor_group_ranks(world_size: int, tensor: int) -> list[list[int]]:
    return [list(range(start, start + tensor)) for start in range(0, world_size, tensor)]


def data_group_ranks(world_size: int, tensor: int) -> list[list[int]]:
    return [list(range(offset, world_size, tensor)) for offset in range(tensor)]


@dataclass
class ParallelState:
    """Where this process sits in the grid. Groups are None when their degree is 1 (no communication)."""

    rank: int = 0
    world_size: int = 1
    tensor: int = 1
    data: int = 1
    device: torch.device = torch.device("cpu")
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(cls, tensor: int, data: int, rank: int, world_size: int, device: torch.device,
                   backend: str, timeout_s: float) -> ParallelState:
        """Join the default process group (env:// rendezvous) and build the grid. Single-rank: no dist."""
        if world_size != tensor * data:
            raise ValueError(f"world size {world_size} != tensor {tensor} x data {data}")
        if world_size == 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        state = cls(rank=rank, world_size=world_size, tensor=tensor, data=data, device=device)
        state.tp_group, state.dp_group = _create_groups(rank, world_size, tensor, timedelta(seconds=timeout_s))
        return state

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _create_groups(rank: int, world_size: int, tensor: int,
                   timeout: timedelta) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """This rank's tensor and data groups; None for a degree of 1, which never communicates.

    `new_group` is collective over the whole world: every rank creates every group, in the same order, even
    the ones it is not in. Only groups of more than one rank are created (the test depends on the degrees
    alone, so all ranks agree): with a bound CUDA device NCCL splits a communicator eagerly for each group,
    and at tensor 1, data 64 that would be 64 world-wide splits for groups of one rank. The groups carry
    nearly all the traffic, so they get `parallel.timeout_s` too (without it: the backend's default)."""
    data = world_size // tensor
    tp_group = dp_group = None
    if tensor > 1:
        for ranks in tensor_group_ranks(world_size, tensor):
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group = group
    if data > 1:
        for ranks in data_group_ranks(world_size, tensor):
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group = group
    return tp_group, dp_group
