"""Pipeline parallelism (Narayanan et al., SC'21 §2.2) through torch.distributed.pipelining: which stages a
pipeline rank holds, which layers a stage holds, and the schedule. The schedules are torch's own (GPipe, 1F1B,
interleaved 1F1B); this file only chooses and configures one.

Stages are numbered 0 .. P*V-1 along the model. With V virtual stages per rank (the interleaved schedule,
§2.2.2) pipeline rank r holds stages r, r+P, r+2P, ...: each rank holds V non-adjacent chunks, so a
micro-batch visits every rank V times and the bubble shrinks from (P-1)/m to (P-1)/(V m).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def stage_ids(pp_rank: int, pipeline: int, virtual: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, in model order (looped placement, SC'21 §2.2.2)."""
    return [pp_rank + k * pipeline for k in range(virtual)]


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The layers of `stage` when num_layers split evenly over num_stages (validated to divide)."""
    per = num_layers // num_stages
    return range(stage * per, (stage + 1) * per)


def bubble_fraction(pipeline: int, virtual: int, micro_batches: int) -> float:
    """SC'21 §2.2: the idle time of a step as a fraction of its ideal time, (p - 1) / (v m)."""
    return (pipeline - 1) / (virtual * micro_batches)


def build_schedule(name: str, modules: list[nn.Module], ids: list[int], num_stages: int, micro_batches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   group: dist.ProcessGroup | None):
    """torch's schedule `name` over this rank's stage modules. `scale_grads=False`: loss_fn already divides by
    the global batch's token count, so gradients add up over micro-batches as in the loop without a pipeline."""
    stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(modules, ids, strict=True)]
    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
