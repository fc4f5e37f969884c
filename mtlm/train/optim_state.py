"""Where a parameter's optimizer state sits in the checkpoint's logical tensors, for any optimizer.

Adam's moments and SGD's momentum have their parameter's shape, so they are split like it. Adafactor
(torch.optim.Adafactor) keeps a matrix's second moment factored: a row statistic [.., m, 1] (the mean over
columns of each row) and a column statistic [.., 1, n] (the mean over rows of each column). Under tensor
parallelism a rank holds a slice of the matrix along its partition dim d:
- the factor that keeps dim d (size m or n there) holds exactly its rows of the whole model's statistic: it is
  split like the parameter;
- the factor reduced over dim d (size 1 there) is a statistic of this rank's slice only (torch's class does not
  communicate), different on each tensor rank. It is stored with one entry per saved tensor rank along d,
  logical size = the saved degree. Read back at the same degree each rank gets its own; at a degree that
  merges k saved ranks, their mean, which is exactly the statistic of the merged slice (the k slices have
  equal sizes and the exponential average is linear); at a degree that splits a saved rank, that rank's value
  (an estimate: the finer statistic was never computed).
Anything else (step counts) is replicated.
"""

from __future__ import annotations

import torch

from mtlm.checkpoint.format import ShardReader, Slice


def _is_partial(value_shape: tuple[int, ...], param_shape: tuple[int, ...], dim: int) -> bool:
    return len(value_shape) == len(param_shape) and value_shape[dim] == 1 and param_shape[dim] > 1 \
        and any(v == p for i, (v, p) in enumerate(zip(value_shape, param_shape, strict=True)) if i != dim)


def state_slice(value_shape: tuple[int, ...], param_shape: tuple[int, ...], sl: Slice, tp_rank: int,
                tensor: int) -> Slice:
    """The slice of its logical tensor that a rank's state value `value_shape` is (the parameter's is `sl`)."""
    value_shape, param_shape = tuple(value_shape), tuple(param_shape)
    if value_shape == param_shape:
        return sl
    d = sl.dim
    if d is None or len(value_shape) != len(param_shape):
        return Slice(value_shape)
    if value_shape[d] == param_shape[d]:  # keeps the partition dim: split like the parameter
        return Slice(value_shape[:d] + (sl.shape[d],) + value_shape[d + 1:], d, sl.start, sl.stop, sl.local)
    if _is_partial(value_shape, param_shape, d):  # this rank's own statistic: entry tp_rank of `tensor`
        return Slice(value_shape[:d] + (tensor,) + value_shape[d + 1:], d, tp_rank, tp_rank + 1, 1)
    return Slice(value_shape)


def read_state(reader: ShardReader, name: str, sl: Slice, tp_rank: int, tensor: int) -> torch.Tensor:
    """This rank's state value `name` (optim.<param>.<key>) for the parameter slice `sl`, at degree `tensor`."""
    entry = reader.entry(name)
    d, shape = entry["partition_dim"], tuple(entry["shape"])
    if d is None:
        return reader.read(name, Slice(shape))
    if shape[d] == sl.shape[d]:
        return reader.read(name, Slice(shape, d, sl.start, sl.stop, sl.local))
    saved = shape[d]  # one entry per saved tensor rank
    full = reader.read_full(name)
    if saved == tensor:
        return full.narrow(d, tp_rank, 1).clone()
    if saved % tensor == 0:
        k = saved // tensor
        return full.narrow(d, tp_rank * k, k).mean(dim=d, keepdim=True)
    if tensor % saved == 0:
        return full.narrow(d, tp_rank * saved // tensor, 1).clone()
    return full.mean(dim=d, keepdim=True)
