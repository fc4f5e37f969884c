"""The two random-number streams of §3.

Dropout *outside* a parallel region acts on replicated activations (embeddings, residual stream): its masks
must be identical on every rank of a tensor group, or the copies drift apart. That is PyTorch's default
generator, seeded the same on every rank of the group.

Dropout *inside* a parallel region (attention probabilities, where each rank owns different heads) must
differ per rank, or the heads of rank 0 and rank 1 would share masks. That is a second stream, seeded
seed + 2718 + tp_rank (Megatron-LM's code default), swapped in around the region with `tensor_region_rng()`.

PyTorch keeps RNG state globally per device, so this stream is global too (the one global in mtlm/parallel).
Activation checkpointing must replay both streams; `get_states` / `set_states` let it save and restore them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TENSOR_STREAM_OFFSET = 2718

_tensor_stream: dict[str, torch.Tensor] = {}  # device type -> saved generator state of the tensor stream


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def seed_streams(seed: int, tp_rank: int, device: torch.device) -> None:
    """Seed the default stream (same on the tensor group) and the tensor-region stream (distinct per rank)."""
    kind = device.type
    torch.manual_seed(seed + TENSOR_STREAM_OFFSET + tp_rank)  # seeds CPU and every CUDA device
    _tensor_stream.clear()
    _tensor_stream[kind] = _get_state(kind).clone()
    torch.manual_seed(seed)


@contextlib.contextmanager
def tensor_region_rng(device: torch.device) -> Iterator[None]:
    """Run the body on the tensor-region stream, then hand the default stream back untouched."""
    kind = device.type
    if kind not in _tensor_stream:
        raise RuntimeError("seed_streams() must run before tensor_region_rng()")
    default = _get_state(kind)
    _set_state(kind, _tensor_stream[kind])
    try:
        yield
    finally:
        _tensor_stream[kind] = _get_state(kind)
        _set_state(kind, default)


def get_states(device: torch.device) -> dict[str, torch.Tensor]:
    """Both streams, e.g. for a checkpoint or an activation-checkpoint replay."""
    kind = device.type
    return {"default": _get_state(kind).clone(), "tensor": _tensor_stream[kind].clone()}


def set_states(device: torch.device, states: dict[str, torch.Tensor]) -> None:
    kind = device.type
    _set_state(kind, states["default"])
    _tensor_stream[kind] = states["tensor"].clone()


def get_tensor_stream(device: torch.device) -> torch.Tensor | None:
    """The tensor-region stream's state (None before seeding)."""
    state = _tensor_stream.get(device.type)
    return None if state is None else state.clone()


def set_tensor_stream(device: torch.device, state: torch.Tensor) -> None:
    _tensor_stream[device.type] = state.clone()
