"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to a minimum (§4)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from mtlm.errors import ConfigError


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int, decay: str) -> float:
    """The learning rate of update number `step + 1` (step counts the updates already taken).

    Warmup ramps linearly to max_lr over `warmup_steps` updates; decay then runs from the end of warmup to
    `decay_steps` (counted from the start, as Megatron-LM's lr_decay_iters) and stays at min_lr after it.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return max_lr
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if decay == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        coeff = 1.0 - progress
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return min_lr + (max_lr - min_lr) * coeff


def warmup_decay_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, decay: str = "cosine",
                           warmup_steps: int = 0, decay_steps: int | None = None,
                           min_lr: float = 0.0) -> LambdaLR:
    """Built by hydra.utils.instantiate(cfg.scheduler) (a partial) and called with the optimizer."""
    max_lr = optimizer.param_groups[0]["lr"]
    total = decay_steps if decay_steps is not None else max_steps
    return LambdaLR(optimizer, lambda s: lr_at(s, max_lr, min_lr, warmup_steps, total, decay) / max_lr)


def check_scheduler_config(s: Any, lr: float) -> None:
    """scheduler.* values; `lr`: optimizer.lr, the top of the schedule (called by mtlm.checks.validate)."""
    if s.decay not in ("cosine", "linear", "constant"):
        raise ConfigError("scheduler.decay", f"must be cosine, linear or constant, got {s.decay!r}")
    if s.warmup_steps < 0:
        raise ConfigError("scheduler.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    if s.decay_steps is not None and s.decay_steps <= 0:
        raise ConfigError("scheduler.decay_steps", f"must be > 0 or null, got {s.decay_steps}")
    if not 0.0 <= s.min_lr <= lr:
        raise ConfigError("scheduler.min_lr", f"must be in [0, optimizer.lr={lr}], got {s.min_lr}")
