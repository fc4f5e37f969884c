"""Mixed precision (§4): the dynamic loss-scale rule, the fp16 scaler's unscale and overflow check, every rank
of a (tensor, data) = (2, 2) job skipping together when one rank's gradient overflows, and bf16 / fp16
training tracking fp32 on gpt2_tiny."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtlm.parallel import ParallelState
from mtlm.train.loop import Trainer
from mtlm.train.precision import DynamicLossScaler, Precision, build_precision, next_loss_scale
from tests.compose import SMALL_MODEL, compose_config
from tests.distributed import run_ranks


def test_loss_scale_rule() -> None:
    # Overflow: halve, restart the clean count; never below min_scale.
    assert next_loss_scale(1024.0, 5, True, 10, 1.0) == (512.0, 0)
    assert next_loss_scale(1.5, 0, True, 10, 1.0) == (1.0, 0)
    # Clean steps count up; the interval-th clean step in a row doubles the scale and restarts the count.
    assert next_loss_scale(512.0, 0, False, 3, 1.0) == (512.0, 1)
    assert next_loss_scale(512.0, 2, False, 3, 1.0) == (1024.0, 0)
    scale, clean, history = 8.0, 0, []
    for found_inf in [False, True, False, False, False, True, True]:
        scale, clean = next_loss_scale(scale, clean, found_inf, growth_interval=3, min_scale=1.0)
        history.append(scale)
    assert history == [8.0, 4.0, 4.0, 4.0, 8.0, 4.0, 2.0]


def test_fp16_scaler_unscales_and_detects_overflow() -> None:
    cfg = SimpleNamespace(dtype="fp16", initial_scale=1024.0, growth_interval=2, min_scale=1.0)
    scaler = build_precision(cfg, torch.device("cpu"))
    assert isinstance(scaler, DynamicLossScaler)
    assert type(build_precision(SimpleNamespace(dtype="bf16"), torch.device("cpu"))) is Precision
    assert scaler.scale_loss(torch.tensor(2.0)).item() == 2048.0
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([2.0, 4.0, 8.0]) * 1024, None
    assert not scaler.unscale_and_check([p, q], [])
    assert torch.equal(p.grad, torch.tensor([2.0, 4.0, 8.0]))  # exact: 1/1024 is a power of two
    scaler.update(False)
    for bad in (float("inf"), float("nan")):
        p.grad = torch.tensor([1.0, bad, 1.0])
        assert scaler.unscale_and_check([p], [])
    scaler.update(True)
    assert scaler.metrics() == {"loss_scale": 512.0, "overflow": 1.0, "skipped_steps": 1}
    restored = DynamicLossScaler(cfg, torch.device("cpu"))
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.clean_steps, restored.skipped_steps) == (512.0, 0, 1)


def _overflow_run(state: ParallelState) -> list[dict]:
    cfg = compose_config(*SMALL_MODEL, "parallel.tensor=2", "parallel.data=2", "precision=fp16",
                         "precision.initial_scale=1024", "precision.growth_interval=2", "model.dropout=0.0",
                         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=4")
    trainer = Trainer(cfg, state, None, {})
    unscale = trainer.precision.unscale_and_check

    def poisoned(params, groups):
        # After DDP's all-reduce, so only rank 3 (tensor rank 1 of data rank 1) sees it; its tensor peer
        # rank 2 and the other data replica never get this gradient through any reduction of the step.
        if trainer.step == 1 and state.rank == 3:
            trainer.model.blocks[0].mlp.fc.weight.grad.view(-1)[0] = float("inf")
        return unscale(params, groups)

    trainer.precision.unscale_and_check = poisoned
    rows = []
    for _ in range(4):
        before = [p.detach().clone() for p in trainer.params]
        m = trainer.train_step()
        unchanged = all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))
        rows.append({"unchanged": unchanged, **{k: m[k] for k in ("loss_scale", "overflow", "skipped_steps")}})
    rows.append({"params": [p.detach().clone() for p in trainer.params]})
    return rows


@pytest.mark.multiprocess
def test_overflow_on_one_rank_skips_the_step_everywhere(small_data_cache: str) -> None:
    results = run_ranks(_overflow_run, 4, tensor=2)
    for rank, rows in enumerate(results):
        steps = rows[:4]
        assert [r["unchanged"] for r in steps] == [False, True, False, False], f"rank {rank}"
        assert [r["overflow"] for r in steps] == [0.0, 1.0, 0.0, 0.0], f"rank {rank}"
        assert [r["skipped_steps"] for r in steps] == [0, 1, 1, 1], f"rank {rank}"
        # 1024 -> halved on the overflow -> grows back after growth_interval = 2 clean steps.
        assert [r["loss_scale"] for r in steps] == [1024.0, 512.0, 512.0, 1024.0], f"rank {rank}"
    # The data replicas of each tensor rank are still identical copies.
    for a, b in ((0, 2), (1, 3)):
        for pa, pb in zip(results[a][4]["params"], results[b][4]["params"], strict=True):
            assert torch.equal(pa, pb)


@pytest.mark.slow
def test_bf16_and_fp16_losses_track_fp32(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """50 steps of gpt2_tiny: the mean |loss - fp32 loss| over steps 10-50 is under 0.1 nats.

    One sequence of 64 tokens per step (the preset: 16 of 128): this CPU has no fp16 arithmetic, so torch
    runs some fp16 GEMM layouts on a scalar fallback, up to 100x slower than fp32. The three runs see the
    same batches, so their difference is precision alone.
    """
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path))
    losses, metrics = {}, {}
    for dtype in ("fp32", "bf16", "fp16"):
        cfg = compose_config("model=gpt2_tiny", f"precision={dtype}", "trainer.max_steps=50",
                             "trainer.global_batch_size=1", "trainer.micro_batch_size=1", "model.seq_length=64")
        trainer = Trainer(cfg, ParallelState(), None, {})
        rows = [trainer.train_step() for _ in range(50)]
        losses[dtype], metrics[dtype] = [r["loss"] for r in rows], rows[-1]
    fp32 = losses["fp32"]
    assert sum(fp32[45:]) / 5 < sum(fp32[:5]) / 5 - 0.5  # it trained: the comparison is not of flat curves
    for dtype in ("bf16", "fp16"):
        diff = [abs(a - b) for a, b in zip(losses[dtype][10:], fp32[10:], strict=True)]
        assert sum(diff) / len(diff) < 0.1, f"{dtype}: mean |loss - fp32| = {sum(diff) / len(diff):.4f}"
        assert losses[dtype] != fp32  # low precision really ran
    assert metrics["fp16"]["loss_scale"] > 0 and "loss_scale" not in metrics["bf16"]
