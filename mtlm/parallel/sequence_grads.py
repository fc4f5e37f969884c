"""Sum the gradients of the replicated parameters that act inside the sequence-parallel region.

Korthikanti et al. 2022, §4.2.2: with sequence parallelism the layer norms (and the row-parallel biases added
after the reduce-scatter) see only this rank's 1/t of the sequence, so each rank's gradient of these
replicated parameters is a partial sum over positions. Summing it over the tensor group gives every rank the
whole-sequence gradient, so the replicas stay identical (Megatron-LM does this when it finalises gradients).
The layers mark such parameters `sequence_parallel = True`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def mark_sequence_parallel(module: nn.Module) -> nn.Module:
    """Mark every parameter of `module` as replicated and used on 1/t of the sequence."""
    for p in module.parameters():
        p.sequence_parallel = True
    return module


@torch.no_grad()
def sum_sequence_parallel_grads_(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) the gradients of the marked parameters over the tensor group, as one flat buffer."""
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if group is None or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
