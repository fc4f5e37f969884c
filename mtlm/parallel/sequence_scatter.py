"""Reduce-scatter along the sequence in forward, all-gather in backward: the sequence-parallel `g-bar`.

Korthikanti et al. 2022, §4.2.2 and Fig. 5: the row-parallel GEMM that ends an attention or MLP block leaves
partial sums of the whole sequence on each rank. Without sequence parallelism `g` all-reduces them (Megatron
§3); with it they are reduce-scattered, so each rank keeps the summed output of its 1/t of the sequence for
the dropout, residual add and next layer norm, and the backward all-gathers the gradient of those chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtlm.parallel.sequence_gather import all_gather_sequence, reduce_scatter_sequence


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_sequence(grad, ctx.group), None


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a tensor-parallel region into the sequence-parallel one (Fig. 5's `g-bar`)."""
    return x if group is None else _ReduceScatterToSequenceRegion.apply(x, group)
