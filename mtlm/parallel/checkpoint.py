"""Activation checkpointing of a transformer layer (§4: checkpoint after every layer), replaying both RNGs.

torch.utils.checkpoint restores PyTorch's default generator for the recompute, which covers the replicated
(residual) dropout. The tensor-region stream (attention dropout) lives outside PyTorch's view, so the
recompute swaps in the state it had when the layer first ran, and swaps the current state back afterwards:
the recomputed masks equal the first pass, and the stream continues as if nothing was recomputed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtlm.parallel import random as rng


def checkpoint_block(block: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    start = rng.get_tensor_stream(device)
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1 or start is None:
            return block(inp)
        current = rng.get_tensor_stream(device)
        rng.set_tensor_stream(device, start)
        try:
            return block(inp)
        finally:
            rng.set_tensor_stream(device, current)

    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)
