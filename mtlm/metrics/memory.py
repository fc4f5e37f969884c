"""Memory per device: exact byte counts from the tensors, and the analytic prediction to compare them with.

On GPUs the CUDA allocator's peak is the honest number. On CPU, process RSS mixes in the Python heap,
allocator caches and libraries, so the model's footprint is counted exactly instead, as four parts:

- parameters, gradients, optimizer state: summed over the tensors themselves;
- activations: what autograd saves for backward, seen through `torch.autograd.graph.saved_tensors_hooks`
  during one forward. Each storage counts once (q, k and v are views of one qkv output), parameters are
  left out (a linear layer saves its weight, which is already counted), and with activation checkpointing
  the inputs the checkpoint keeps for its recompute are added (autograd never sees them being saved).

Their sum is the footprint when backward starts, the peak of a training step up to transient buffers (the
recompute of one layer under checkpointing, GEMM workspaces, DDP's gradient buckets).

The prediction (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
§4, whose count for the paper's 16-bit setting is 34·s·b·h + 5·a·s²·b bytes per layer) is written here for
any bytes-per-value, with or without dropout, at tensor degree t (no sequence parallelism, as in the paper).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the storage under t, or None for tensors without one (meta, fake)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the tensors, each underlying storage counted once (views share their base's)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None and st[1] > 0:
            seen[st[0]] = st[1]
    return sum(seen.values())


def parameter_bytes(params: Iterable[torch.Tensor]) -> int:
    return storage_bytes(params)


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    return storage_bytes(p.grad for p in params if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (Adam: exp_avg, exp_avg_sq and a step counter per parameter).

    A ZeroRedundancyOptimizer keeps this rank's shard in its local optimizer `.optim`; that is what this
    rank holds, so that is what is counted.
    """
    local = getattr(optimizer, "optim", optimizer)
    return storage_bytes(v for per_param in local.state.values() for v in per_param.values()
                         if isinstance(v, torch.Tensor))


class SavedActivations:
    """Bytes autograd saves for backward while the body runs (one forward pass), per unique storage.

        with SavedActivations(exclude=model.parameters(), checkpointed=model.blocks) as act:
            loss = model(x, y)
        act.bytes

    `checkpointed`: modules run under activation checkpointing. Their internals are saved by the
    checkpoint's own (inner) hooks, which keep nothing, so they are invisible here; what the checkpoint
    does keep is each module's input, counted from a forward pre-hook. Opt-in by construction: nothing is
    hooked outside the `with` block, so ordinary steps pay nothing.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), checkpointed: Iterable[nn.Module] = ()) -> None:
        self._exclude = {st[0] for st in map(_storage, exclude) if st is not None}
        self._modules = list(checkpointed)
        self._seen: dict[int, int] = {}
        self._handles: list[Any] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _add(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is not None and st[0] not in self._exclude:
            self._seen[st[0]] = st[1]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                self._add(a)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedActivations:
        self._handles = [m.register_forward_pre_hook(self._pre_hook) for m in self._modules]
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------------------------------------
# The analytic prediction.


def parameters_per_device(num_layers: int, hidden: int, padded_vocab: int, max_positions: int,
                          tensor: int = 1) -> int:
    """Parameters one tensor rank holds (mtlm's GPT-2; §3's split).

    Per layer: the column-parallel qkv (3h^2 + 3h) and MLP-in (4h^2 + 4h) GEMMs and the row-parallel
    weights (h^2, 4h^2) are split t ways; the row-parallel biases (2h) and the two layer norms (4h) are
    replicated. The vocabulary embedding is split by rows; positions and the final layer norm are replicated.
    """
    h, t = hidden, tensor
    per_layer = (12 * h * h + 7 * h) // t + 6 * h
    return num_layers * per_layer + padded_vocab // t * h + max_positions * h + 2 * h


def model_state_bytes(params: int, param_tensors: int = 0, data: int = 1, shard_optimizer: bool = False,
                      fp16_params: bool = False) -> dict[str, int]:
    """Bytes per device for parameters, gradients and Adam state.

    mtlm (fp16_params=False): fp32 parameters (they are the master weights) and fp32 gradients, 4 + 4 bytes;
    Adam's two fp32 moments 8 bytes, plus torch's 4-byte step counter per parameter tensor.
    The paper's setting (fp16_params=True): fp16 parameters and gradients, 2 + 2 bytes; fp32 master weights
    and the two moments, 12 bytes. Both are 16 bytes per parameter. Sharding the optimizer state over d data
    ranks (ZeRO stage 1) divides the optimizer part by d.
    """
    d = data if shard_optimizer else 1
    if fp16_params:
        return {"params": 2 * params, "grads": 2 * params, "optimizer": 12 * params // d}
    return {"params": 4 * params, "grads": 4 * params, "optimizer": (8 * params + 4 * param_tensors) // d}


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tensor: int = 1,
                               bytes_per_value: int = 2, dropout: bool = True, recompute: bool = False,
                               sequence: bool = False) -> int:
    """Activations one transformer layer keeps for backward, per tensor rank (Korthikanti et al. 2022, §4.1).

    Values of e bytes: each layer norm's input (2 sbh), the inputs of the qkv and MLP-in GEMMs (2 sbh),
    replicated on every tensor rank; Q, K, V and the attention output (4 sbh), the GeLU input and the MLP-out
    GEMM input (8 sbh), and the softmax output (a s^2 b), split t ways. Dropout adds a 1-byte mask for the
    attention probabilities (a s^2 b) plus their dropped-out copy (e a s^2 b), and a 1-byte mask after
    attention and after the MLP (2 sbh). With e = 2, dropout and t = 1: 34 sbh + 5 a s^2 b. With
    checkpointing each layer keeps only its input, e sbh; the recompute then holds one layer's full set.
    With sequence parallelism (§4.2.2) the replicated part is split t ways too: 34 sbh / t + 5 a s^2 b / t.
    """
    e, sbh, as2b = bytes_per_value, seq * batch * hidden, heads * seq * seq * batch
    if recompute:
        return e * sbh // (tensor if sequence else 1)
    replicated = 4 * e * sbh + (2 * sbh if dropout else 0)
    split = 12 * e * sbh + (e + ((e + 1) if dropout else 0)) * as2b
    return (replicated + split) // tensor if sequence else replicated + split // tensor


def activation_bytes(num_layers: int, seq: int, batch: int, hidden: int, heads: int, padded_vocab: int,
                     tensor: int = 1, bytes_per_value: int = 2, dropout: bool = True,
                     recompute: bool = False, sequence: bool = False) -> int:
    """The whole model's activations per tensor rank: the layers plus the ends (our derivation).

    Ends: the embedding-dropout mask (sbh bytes), the final layer norm's input and the output GEMM's input
    (2 e sbh), and the fused cross-entropy's fp32 softmax over this rank's vocabulary slice (4 s b V/t).
    """
    e, sbh = bytes_per_value, seq * batch * hidden
    stream = ((sbh if dropout else 0) + 2 * e * sbh) // (tensor if sequence else 1)  # split with sequence par.
    ends = stream + 4 * seq * batch * padded_vocab // tensor
    layer = activation_bytes_per_layer(seq, batch, hidden, heads, tensor, e, dropout, recompute, sequence)
    return num_layers * layer + ends
