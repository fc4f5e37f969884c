"""Keep this rank's chunk of the sequence in forward, all-gather the gradient in backward.

Korthikanti et al. 2022, §4.2.2: the sequence-parallel region starts after the embeddings. The word embedding
is vocab-parallel and ends in an all-reduce (every rank then holds the whole [b, s, h] sum, position
embeddings added), so entering the region needs no communication: each rank keeps positions
[r*s/t, (r+1)*s/t). Backward, every rank needs the gradient of the whole sequence for the replicated
embedding parameters, so the chunks' gradients are all-gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtlm.parallel.sequence_gather import all_gather_sequence


class _SplitToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        t, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(t, dim=1)[r].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_sequence(grad, ctx.group), None


def split_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter the sequence-parallel region from replicated activations (no communication forward)."""
    return x if group is None else _SplitToSequenceRegion.apply(x, group)
