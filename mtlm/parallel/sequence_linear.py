"""The column-parallel GEMM of the sequence-parallel region: all-gather the input, multiply, and keep only this
rank's 1/t of the input for backward.

Korthikanti et al. 2022, §4.2.2: with sequence parallelism the input of the qkv and the MLP's first GEMM
arrives split along the sequence and is all-gathered for the GEMM (Fig. 5's `g`). Saving the gathered input
for the weight gradient would keep the whole [b, s, h] tensor per rank and undo half of the saving; instead
the layer saves its own chunk and all-gathers it again in backward, where the reduce-scatter of the input's
gradient follows (the paper: "we store the sequence-parallel part and all-gather it again in backward").
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtlm.parallel.sequence_gather import all_gather_sequence, reduce_scatter_sequence


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return torch.nn.functional.linear(all_gather_sequence(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        full = all_gather_sequence(x, ctx.group)  # the gathered input, again (not kept from forward)
        grad_input = reduce_scatter_sequence(grad.matmul(weight.to(grad.dtype)), ctx.group)
        g2, f2 = grad.reshape(-1, grad.shape[-1]), full.reshape(-1, full.shape[-1])
        grad_weight = g2.t().matmul(f2.to(g2.dtype))
        grad_bias = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_input, grad_weight.to(weight.dtype), grad_bias, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  group: dist.ProcessGroup) -> torch.Tensor:
    """linear(all_gather_sequence(x), weight, bias), saving only x (this rank's chunk) for backward."""
    return _GatherLinear.apply(x, weight, bias, group)
