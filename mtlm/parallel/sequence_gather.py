"""All-gather along the sequence in forward, reduce-scatter in backward: the sequence-parallel `g`.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.2.2 and Fig. 5:
with sequence parallelism the layer norm and dropout before a tensor-parallel GEMM hold 1/t of the sequence
on each rank; the GEMM needs the whole sequence, so the `f` of Megatron's §3 (identity forward, all-reduce
backward) becomes an all-gather forward and, conjugately, a reduce-scatter of the input gradient backward.
An all-gather plus a reduce-scatter move the same bytes as the all-reduce they replace (§4.2.2).

Tensors are [batch, seq, ...]; rank r of the tensor group holds positions [r*s/t, (r+1)*s/t).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-buffer collectives (the old names warn); torch 2.4-2.12 has only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s/t, ...] on each rank -> [b, s, ...], the ranks' chunks in rank order."""
    t = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((t * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # ranks' chunks stacked
    _ALL_GATHER(out, x, group=group)
    return out.view(t, *x.shape).movedim(0, 1).reshape(x.shape[0], t * x.shape[1], *x.shape[2:])


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s, ...] partial sums on each rank -> this rank's [b, s/t, ...] chunk of their sum."""
    t = dist.get_world_size(group)
    b, s = x.shape[0], x.shape[1]
    chunks = x.reshape(b, t, s // t, *x.shape[2:]).movedim(1, 0).contiguous()  # [t, b, s/t, ...]
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    _REDUCE_SCATTER(out, chunks.view(t * b, *chunks.shape[2:]), group=group)
    return out


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_sequence(grad, ctx.group), None


class _GatherToReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(t, dim=1)[r].contiguous(), None


def gather_from_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region from the sequence-parallel one (Fig. 5's `g`)."""
    return x if group is None else _GatherFromSequenceRegion.apply(x, group)


def gather_to_replicated(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave the sequence-parallel region into replicated computation (BERT's heads, each rank computing the
    same thing): all-gather forward; backward, every rank already holds the same whole gradient, so each keeps
    its own chunk (a reduce-scatter would count it t times)."""
    return x if group is None else _GatherToReplicated.apply(x, group)
