"""Learning-rate schedule values at known steps, and the scheduler built the way Hydra builds it."""

from __future__ import annotations

import math

import pytest
import torch

from mtlm.train.schedule import lr_at, warmup_decay_scheduler


def test_warmup_then_cosine_by_hand() -> None:
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, decay="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.1)  # first update: 1/10 of the way up
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # decay starts after warmup
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # stays at min after decay_steps


def test_linear_and_constant() -> None:
    assert lr_at(35, 2.0, 0.0, 10, 60, "linear") == pytest.approx(1.0)
    assert lr_at(35, 2.0, 0.0, 10, 60, "constant") == pytest.approx(2.0)
    assert lr_at(0, 2.0, 0.0, 0, 60, "linear") == pytest.approx(2.0)


def test_paper_schedule_points() -> None:
    """§4: 1.5e-4, 3k warmup, cosine to 1e-5 over 300k iterations."""
    kw = dict(max_lr=1.5e-4, min_lr=1e-5, warmup_steps=3000, decay_steps=300_000, decay="cosine")
    assert lr_at(1499, **kw) == pytest.approx(0.75e-4)
    assert lr_at(151_500, **kw) == pytest.approx(1e-5 + 1.4e-4 * 0.5)
    assert lr_at(299_999, **kw) == pytest.approx(1e-5, rel=1e-6)


def test_scheduler_drives_optimizer() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_decay_scheduler(opt, max_steps=20, decay="linear", warmup_steps=4, min_lr=0.0)
    seen = []
    for _ in range(22):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[12] == pytest.approx(0.5) and seen[20] == pytest.approx(0.0)
