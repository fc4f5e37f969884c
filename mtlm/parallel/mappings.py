"""The conjugate operators f and g of §3 (Fig. 3), and a gather for whole-vocabulary logits.

f: identity in forward, all-reduce in backward. Placed where a replicated activation enters a parallel
   region: every rank's gradient w.r.t. that activation is only a partial sum.
g: all-reduce in forward, identity in backward. Placed where partial results leave a parallel region.

A transformer layer has two of each (attention and MLP), so 2 all-reduces forward and 2 backward.
All call `torch.distributed.all_reduce` directly (tests intercept it there to count the traffic).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToTensorRegion(torch.autograd.Function):
    """f (§3, Fig. 3a)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorRegion(torch.autograd.Function):
    """g (§3, Fig. 3b)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        # x is a fresh GEMM output that no autograd node saved, so reducing it in place is safe.
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather the last dimension (e.g. vocab shards of the logits); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = grad.shape[-1] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * size:(rank + 1) * size].contiguous(), None


def copy_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _GatherLastDim.apply(x, group)
