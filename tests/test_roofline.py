"""Issue 26: a step against its own kernels (mtlm/bench/roofline.py) and the bench's broken-comparator check.
Structure and accounting only, on a tiny shape; never speed (the cores are shared)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtlm.bench import speed
from mtlm.bench.plain import plain_step
from mtlm.bench.roofline import FAMILIES, broken_line, gemm_check
from mtlm.bench.speed import Shape, bench_speed, format_speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2
TINY_ARGS = ["--hidden", "32", "--layers", str(LAYERS), "--heads", "4", "--seq", "16", "--batch", "2",
             "--vocab", "400"]
TINY = Shape(hidden=32, layers=LAYERS, heads=4, seq=16, batch=2, vocab=400)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_roofline_lists_every_kernel_call_and_its_parts_sum_to_the_step(cache_dir, tmp_path) -> None:
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, "-m", "mtlm.bench", "--roofline", *TINY_ARGS, "--threads", "1",
                           "--reps", "3", "--warmup", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MTLM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step / kernels" in proc.stdout and "by family" in proc.stdout
    (r,) = json.loads(out.read_text())
    calls = r["calls"]
    gemms = [c for c in calls if c["family"] == "gemm"]
    attention = [c for c in calls if c["family"] == "attention"]
    # Forward: qkv, attention out, MLP in, MLP out per layer, and the logits; backward: two GEMMs for each
    # (the input's gradient and the weight's); the bias gradients are sums, not GEMMs.
    assert len(gemms) == 3 * (4 * LAYERS + 1), [c["op"] for c in gemms]
    assert len(attention) == 2 * LAYERS  # the fused kernel's forward and backward per layer
    assert all(c["shapes"] and c["in_step_s"] > 0 and c["alone_s"] > 0 for c in calls), calls
    assert {c["op"] for c in gemms} <= {"aten::mm", "aten::addmm"}
    logits = [c for c in gemms if [32, 512] in c["shapes"] or [512, 32] in c["shapes"]]
    assert len(logits) == 3  # tied output layer [b*s, h] x [h, padded vocab 512], and its two backward GEMMs
    fam = r["families"]
    assert list(fam) == list(FAMILIES)
    assert sum(fam.values()) == pytest.approx(r["profiled_step_s"], rel=1e-9)
    assert fam["gemm"] == pytest.approx(sum(c["in_step_s"] for c in gemms), rel=1e-9)
    assert fam["attention"] == pytest.approx(sum(c["in_step_s"] for c in attention), rel=1e-9)
    # No op's time counted twice: the ops' times fit in the step (untracked is what is left, not negative).
    assert fam["untracked"] >= 0, fam
    assert fam["optimizer"] > 0 and fam["norms"] > 0 and fam["element-wise"] > 0
    assert r["kernels_alone_s"] == pytest.approx(sum(c["alone_s"] for c in calls), rel=1e-9)
    assert r["step_over_kernels"] == pytest.approx(r["step_s"] / r["kernels_alone_s"], rel=1e-9)
    rest = r["profiled_step_s"] - fam["gemm"] - fam["attention"]
    assert r["rest_share"] == pytest.approx(rest / r["profiled_step_s"], rel=1e-9)


class _SlowGemms(TorchDispatchMode):
    """An injected slow GEMM: every aten.mm inside the step takes 20 ms longer (a stand-in for the denormal
    cliff, which this project's AMD CPU does not have)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            time.sleep(0.02)
        return func(*args, **(kwargs or {}))


def _slowed(step):
    def slow_step():
        with _SlowGemms():
            return step()
    return slow_step


def test_gemm_check_flags_a_comparator_whose_gemms_are_slow_in_its_step() -> None:
    dev = torch.device("cpu")
    slow = gemm_check(_slowed(plain_step(TINY, torch.float32, dev)), dev)
    assert slow["calls"] == 3 * (4 * LAYERS + 1)
    assert slow["ratio"] > 10, slow  # 18 mm calls x 20 ms against microseconds alone
    line = broken_line("plain", slow)
    assert line is not None and line.startswith("plain: its GEMMs ran") and "denormal inputs?" in line
    # The check measures, not assumes: a healthy comparator is close to its kernels. (Median over 3 profiled
    # steps per call against the median of 3 alone; a tiny shape on shared cores can still wobble, so the
    # bound is the check's own 2x threshold with room, far below the injected case.)
    healthy = gemm_check(plain_step(TINY, torch.float32, dev), dev)
    assert healthy["ratio"] < 4 and broken_line("plain", {**healthy, "ratio": 1.5}) is None, healthy
    assert math.isfinite(healthy["alone_s"]) and healthy["alone_s"] > 0


def test_bench_reports_a_broken_comparator_instead_of_a_speed_up(cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(speed, "plain_step", lambda *a: _slowed(plain_step(*a)))
    r = bench_speed(TINY, "fp32", threads=1, reps=2, warmup=1, hf=False)
    assert set(r["broken"]) == {"plain"}, r["broken"]
    assert r["gemm_checks"]["plain"]["ratio"] > 10 and r["gemm_checks"]["mtlm"]["calls"] == 3 * (4 * LAYERS + 1)
    text = format_speed(r)
    assert "BROKEN plain: its GEMMs ran" in text
    assert "(ratios with plain compare against a broken comparator: not a speed-up)" in text
