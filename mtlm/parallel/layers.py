"""Tensor-parallel layers (§3). At tensor degree 1 they are plain Linear / Embedding and never communicate.

Every parameter carries `partition_dim`: the dimension split across the tensor group, or None when each rank
holds a full replica. Initialisation, gradient clipping and checkpoint resharding all read it.

Weights are initialised independently of the tensor degree: each full weight is drawn from a generator
seeded by (seed, parameter name), and each rank keeps its slice. Same seed, same full model at t = 1, 2, 4, 8.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from mtlm.parallel.mappings import copy_to_tensor_region, reduce_from_tensor_region
from mtlm.parallel.sequence_linear import gather_linear
from mtlm.parallel.sequence_scatter import reduce_scatter_to_sequence_region
from mtlm.parallel.state import ParallelState


def _param(shape: tuple[int, ...], partition_dim: int | None, device, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    p.partition_dim = partition_dim
    return p


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor: int) -> int:
    """§3 / Megatron-LM: pad so each rank's vocabulary slice is a multiple of `divisible_by`."""
    multiple = divisible_by * tensor
    return ((vocab_size + multiple - 1) // multiple) * multiple


@torch.no_grad()
def init_sharded_(param: torch.Tensor, name: str, seed: int, std: float, tp_rank: int, tensor: int,
                  full_rows: int | None = None) -> None:
    """Draw the full weight from N(0, std) with a (seed, name) generator, then keep this rank's slice.

    `full_rows` draws only that many leading rows and zero-fills the rest (the padded vocabulary rows), so
    padding that depends on the tensor degree does not shift the random numbers of the real rows.
    """
    if param.device.type == "meta":
        return
    dim = getattr(param, "partition_dim", None)
    full_shape = list(param.shape)
    if dim is not None:
        full_shape[dim] *= tensor
    gen = torch.Generator(device=param.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    full = torch.zeros(full_shape, device=param.device, dtype=torch.float32)
    drawn = full if full_rows is None else full[:full_rows]
    drawn.normal_(0.0, std, generator=gen)
    if dim is not None:
        full = full.chunk(tensor, dim=dim)[tp_rank]
    param.copy_(full)


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns (output features): each rank computes its own slice of Y (§3).

    The input is replicated, so f sits in front: identity forward, all-reduce of dL/dX backward. With
    `sequence_parallel` the input holds 1/t of the sequence and f is an all-gather (Korthikanti et al. §4.2.2).
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, bias: bool = True,
                 device=None, dtype=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        if out_features % state.tensor:
            raise ValueError(f"out_features {out_features} not divisible by tensor degree {state.tensor}")
        self.group = state.tp_group
        self.sequence_parallel = sequence_parallel and self.group is not None
        self.weight = _param((out_features // state.tensor, in_features), 0, device, dtype)
        self.bias = _param((out_features // state.tensor,), 0, device, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # all-gather along the sequence, keeping only this rank's chunk for backward
            return gather_linear(x, self.weight, self.bias, self.group)
        return F.linear(copy_to_tensor_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = X B with B split by rows (input features); X arrives already split, partial Ys are summed by g.

    The bias is replicated and added after the all-reduce, so it is counted once. With `sequence_parallel`
    the all-reduce is a reduce-scatter along the sequence (Korthikanti et al. §4.2.2): the bias then sees this
    rank's 1/t of the sequence, so its gradient is summed over the tensor group (parallel/sequence_grads.py).
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, bias: bool = True,
                 device=None, dtype=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        if in_features % state.tensor:
            raise ValueError(f"in_features {in_features} not divisible by tensor degree {state.tensor}")
        self.group = state.tp_group
        self.weight = _param((out_features, in_features // state.tensor), 1, device, dtype)
        self.bias = _param((out_features,), None, device, dtype) if bias else None
        self.leave = reduce_from_tensor_region
        if sequence_parallel and self.group is not None:
            self.leave = reduce_scatter_to_sequence_region
            if self.bias is not None:
                self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:  # tensor degree 1: the bias rides in the GEMM (one addmm, no extra pass)
            return F.linear(x, self.weight, self.bias)
        y = self.leave(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary (§3): ids outside this rank's slice look up zeros, g sums."""

    def __init__(self, padded_vocab_size: int, embedding_dim: int, state: ParallelState,
                 device=None, dtype=None) -> None:
        super().__init__()
        if padded_vocab_size % state.tensor:
            raise ValueError(f"padded vocab {padded_vocab_size} not divisible by tensor degree {state.tensor}")
        self.group = state.tp_group
        per_rank = padded_vocab_size // state.tensor
        self.vocab_start = state.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _param((per_rank, embedding_dim), 0, device, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(out, self.group)
