"""Compute precision: fp32, bf16 (autocast over fp32 master weights), fp16 (autocast + dynamic loss scale).

Parameters, gradients and optimizer state stay fp32 in every mode: they are the "master weights" of §4, and
autocast runs the GEMMs in the low-precision dtype on fp16/bf16 copies of the weights (made per forward).
This is the same arithmetic as the paper's fp16 parameters with fp32 master copies (16 bytes per parameter
with Adam either way), with one copy of the weights to keep in sync instead of two.

fp16 has a narrow exponent range (max 65504, smallest normal 6e-5), so small gradients underflow to zero.
§4 trains with *dynamic loss scaling*: multiply the loss by a large scale S, so the backward pass runs on
S-times larger values; divide the gradients by S before the optimizer step. If any gradient on any rank
overflowed (inf/nan), skip the step on every rank and halve S; after `growth_interval` clean steps in a row,
double S. bf16 has fp32's exponent range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from mtlm.errors import ConfigError
from mtlm.parallel.state import ParallelState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKOFF_FACTOR = 0.5  # on overflow (Megatron-LM and torch.amp.GradScaler use the same factors)
GROWTH_FACTOR = 2.0  # after growth_interval clean steps


class Precision:
    """fp32 and bf16: no loss scaling. Subclassed for fp16."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        self.name = cfg.dtype
        self.dtype = DTYPES[cfg.dtype]
        self.device = device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_and_check(self, params: list[torch.nn.Parameter], groups: list) -> bool:
        """Undo the loss scale on the gradients; True when a gradient overflowed (step must be skipped)."""
        return False

    def update(self, found_inf: bool) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


def next_loss_scale(scale: float, clean_steps: int, found_inf: bool, growth_interval: int,
                    min_scale: float) -> tuple[float, int]:
    """The dynamic loss-scale rule: (scale, clean steps in a row) after one step.

    Overflow: halve (not below min_scale) and restart the count. Otherwise count the clean step, and double
    the scale once growth_interval of them have passed in a row.
    """
    if found_inf:
        return max(scale * BACKOFF_FACTOR, min_scale), 0
    clean_steps += 1
    if clean_steps >= growth_interval:
        return scale * GROWTH_FACTOR, 0
    return scale, clean_steps


class DynamicLossScaler(Precision):
    """fp16 autocast with dynamic loss scaling; the skip decision is agreed by every rank of the job.

    Agreement matters twice over: tensor ranks hold different shards of one model, so a step applied on some
    ranks and skipped on others would leave a model whose shards come from different steps; and data ranks
    (DDP, ZeRO) must stay identical copies. Gradients are all-reduced over the data group only and sharded
    weight gradients not at all, so an overflow seen by one rank is invisible to its tensor peers: the flag
    is all-reduced (max) over the whole world.

    torch.amp.GradScaler would unscale our fp32 gradients, but its inf flag is per process; the scaling
    itself is three lines, so the whole rule lives here where it can be read and tested.
    """

    def __init__(self, cfg: Any, device: torch.device, state: ParallelState | None = None) -> None:
        super().__init__(cfg, device)
        self.state = state
        self.scale = float(cfg.initial_scale)
        self.growth_interval = int(cfg.growth_interval)
        self.min_scale = float(cfg.min_scale)
        self.clean_steps = 0
        self.skipped_steps = 0
        self.overflow = False

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_and_check(self, params: list[torch.nn.Parameter], groups: list) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = torch.zeros(1, device=self.device)
        if grads:
            inv_scale = torch.full((1,), 1.0 / self.scale, device=self.device)
            # One fused pass: multiply by 1/S and set found_inf if anything is inf or nan (GradScaler's kernel).
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        if self.state is not None and self.state.world_size > 1 and dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # default group = every tensor and data rank
        return bool(found_inf.item() > 0)

    def update(self, found_inf: bool) -> None:
        self.overflow = found_inf
        self.skipped_steps += int(found_inf)
        self.scale, self.clean_steps = next_loss_scale(self.scale, self.clean_steps, found_inf,
                                                       self.growth_interval, self.min_scale)

    def metrics(self) -> dict[str, float]:
        # loss_scale: the scale the next step will use. overflow: this step overflowed (and was skipped).
        return {"loss_scale": self.scale, "overflow": float(self.overflow), "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def build_precision(cfg: Any, device: torch.device, state: ParallelState | None = None) -> Precision:
    """`state`: the rank grid, so fp16 can agree on skipping a step over all ranks (None: one process)."""
    if cfg.dtype == "fp16":
        return DynamicLossScaler(cfg, device, state)
    return Precision(cfg, device)


def check_precision_config(pr: Any) -> None:
    """precision.* values (called by mtlm.checks.validate)."""
    if pr.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError("precision.dtype", f"must be fp32, bf16 or fp16, got {pr.dtype!r}")
    if pr.initial_scale <= 0 or pr.min_scale <= 0 or pr.min_scale > pr.initial_scale:
        raise ConfigError("precision.initial_scale", "need 0 < precision.min_scale <= precision.initial_scale")
    if pr.growth_interval <= 0:
        raise ConfigError("precision.growth_interval", f"must be > 0, got {pr.growth_interval}")
