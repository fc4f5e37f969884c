"""The rank grid: which ranks form a tensor-, a data- and a pipeline-parallel group.

Megatron's order, tensor innermost, then data, then pipeline: the N-D grid is `range(world)` reshaped to
[pipeline, data, tensor], and a group along one axis is a line of that array with the other coordinates fixed.
Paper Fig. 8: tensor-parallel groups are *contiguous* ranks (inside one server, where the links are fast);
data-parallel groups take the same position across tensor groups. 8 ranks at tensor=2, data=4:
tensor groups [0,1] [2,3] [4,5] [6,7]; data groups [0,2,4,6] [1,3,5,7]. Pipeline stages are the outermost
axis (SC'21 §3: point-to-point traffic is the cheapest to send between nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

AXES = ("tensor", "data", "pipeline")  # innermost first


@dataclass(frozen=True)
class Grid:
    """The degrees of parallelism and the rank order: the one place that knows world = tensor x data x pipeline."""

    tensor: int = 1
    data: int = 1
    pipeline: int = 1

    @classmethod
    def of(cls, parallel) -> Grid:
        """The grid a `parallel` config asks for (a config without `pipeline` has one stage)."""
        return cls(int(parallel.tensor), int(parallel.data), int(getattr(parallel, "pipeline", 1) or 1))

    @property
    def world(self) -> int:
        return self.tensor * self.data * self.pipeline

    @property
    def model_ranks(self) -> int:
        """Ranks that hold one copy of the model between them (tensor x pipeline)."""
        return self.tensor * self.pipeline

    def check(self, world_size: int | None = None) -> None:
        """ValueError("parallel.KEY: ...") for a degree < 1 or a launcher world that is not the grid's."""
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis}: must be >= 1, got {getattr(self, axis)}")
        if world_size is not None and world_size != self.world:
            raise ValueError(f"parallel.data: the launcher started {world_size} ranks but {self.describe()}")

    def describe(self) -> str:
        """`tensor x data x pipeline = 2 x 1 x 2 = 4` (for error lines)."""
        return (f"parallel.tensor x parallel.data x parallel.pipeline = {self.tensor} x {self.data} x "
                f"{self.pipeline} = {self.world}")

    def _array(self) -> torch.Tensor:
        return torch.arange(self.world).reshape(self.pipeline, self.data, self.tensor)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's position on each axis, e.g. {"tensor": 1, "data": 0, "pipeline": 1}."""
        return {"tensor": rank % self.tensor, "data": (rank // self.tensor) % self.data,
                "pipeline": rank // (self.tensor * self.data)}

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`: the lines of the [pipeline, data, tensor] array in that direction."""
        dim = 2 - AXES.index(axis)
        lines = self._array().movedim(dim, -1).reshape(-1, getattr(self, axis))
        return lines.tolist()


def tensor_group_ranks(world_size: int, tensor: int) -> list[list[int]]:
    return Grid(tensor, world_size // tensor).groups("tensor")


def data_group_ranks(world_size: int, tensor: int) -> list[list[int]]:
    return Grid(tensor, world_size // tensor).groups("data")


@dataclass
class ParallelState:
    """Where this process sits in the grid. Groups are None when their degree is 1 (no communication).

    `sequence`: sequence parallelism (Korthikanti et al. 2022 §4.2.2) in the tensor-parallel region; the
    residual stream between the tensor-parallel blocks holds 1/tensor of the sequence on each rank."""

    rank: int = 0
    world_size: int = 1
    tensor: int = 1
    data: int = 1
    device: torch.device = torch.device("cpu")
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pipeline: int = 1
    pp_group: dist.ProcessGroup | None = None
    sequence: bool = False
    # Pipeline > 1: the first and the last stage of this rank's pipeline line, which both hold the tied word
    # embedding (Megatron's embedding group); None elsewhere and at pipeline 1.
    embed_group: dist.ProcessGroup | None = None
    groups: dict[str, list[int]] = field(default_factory=dict)  # axis -> this rank's global ranks on it

    @property
    def grid(self) -> Grid:
        return Grid(self.tensor, self.data, self.pipeline)

    @property
    def tp_rank(self) -> int:
        return self.grid.coords(self.rank)["tensor"]

    @property
    def dp_rank(self) -> int:
        return self.grid.coords(self.rank)["data"]

    @property
    def pp_rank(self) -> int:
        return self.grid.coords(self.rank)["pipeline"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(cls, tensor: int, data: int, rank: int, world_size: int, device: torch.device,
                   backend: str, timeout_s: float, pipeline: int = 1, sequence: bool = False) -> ParallelState:
        """Join the default process group (env:// rendezvous) and build the grid. Single-rank: no dist."""
        grid = Grid(tensor, data, pipeline)
        grid.check(world_size)
        if world_size == 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        state = cls(rank=rank, world_size=world_size, tensor=tensor, data=data, pipeline=pipeline,
                    sequence=sequence and tensor > 1, device=device)
        made = _create_groups(rank, grid, timedelta(seconds=timeout_s))
        state.tp_group, state.dp_group, state.pp_group = (made.get(a, (None, []))[0] for a in AXES)
        state.groups = {a: ranks for a, (_, ranks) in made.items() if a in AXES}
        state.embed_group = made.get("embedding", (None, []))[0]
        return state

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _create_groups(rank: int, grid: Grid, timeout: timedelta) -> dict[str, tuple[dist.ProcessGroup, list[int]]]:
    """This rank's group (and its ranks) on each axis of degree > 1; a degree of 1 never communicates.

    `new_group` is collective over the whole world: every rank creates every group, in the same order, even
    the ones it is not in. Only groups of more than one rank are created (the test depends on the degrees
    alone, so all ranks agree): with a bound CUDA device NCCL splits a communicator eagerly for each group,
    and at tensor 1, data 64 that would be 64 world-wide splits for groups of one rank. The groups carry
    nearly all the traffic, so they get `parallel.timeout_s` too (without it: the backend's default)."""
    made = {}
    for axis in AXES:
        if getattr(grid, axis) == 1:
            continue
        for ranks in grid.groups(axis):
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                made[axis] = (group, ranks)
    if grid.pipeline > 1:  # the tied embedding's group: first and last stage of each pipeline line
        for line in grid.groups("pipeline"):
            ends = [line[0], line[-1]]
            group = dist.new_group(ends, timeout=timeout)
            if rank in ends:
                made["embedding"] = (group, ends)
    return made
