"""`python -m mtlm.bench` runs and reports what it should, on a tiny shape. Structure only, never speed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mtlm.bench.pipeline import bench_pipeline, format_pipeline
from mtlm.bench.speed import Shape, bench_speed, biggest_gemm
from mtlm.bench.tp_scaling import bench_tp_scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Shape(hidden=32, layers=2, heads=4, seq=16, batch=2, vocab=400)  # padded to 512
TINY_ARGS = ["--hidden", "32", "--layers", "2", "--heads", "4", "--seq", "16", "--batch", "2", "--vocab", "400"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_plain_gpt_is_gpt2_sized_and_learns() -> None:
    """The yardstick model has GPT-2's parameter count for its shape and its step lowers the loss."""
    import torch

    from mtlm.bench.plain import PlainGPT, plain_step
    from mtlm.model.gpt import num_parameters

    model = PlainGPT(512, 16, 32, 2, 4)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(2, 32, 512, 16)
    step = plain_step(Shape(hidden=32, layers=2, heads=4, seq=16, batch=2, vocab=500), torch.float32,
                      torch.device("cpu"))  # vocab padded to 512
    losses = [step() for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_biggest_gemm_is_the_logits_or_the_mlp() -> None:
    assert biggest_gemm(Shape()) == (8 * 256, 512, 8192)  # h x v beats the MLP's h x 4h
    assert biggest_gemm(Shape(hidden=4096, vocab=8192)) == (8 * 256, 4096, 16384)  # 4h > v: the MLP


def test_speed_reports_both_sides_the_gemm_and_the_ratio(cache_dir) -> None:
    r = bench_speed(TINY, "fp32", threads=1, reps=2, warmup=1)
    for side in ("mtlm", "transformers", "plain"):
        assert set(r[side]) >= {"step_s", "tokens_per_s", "tflops", "page_faults"}
        assert all(v > 0 for k, v in r[side].items() if k != "page_faults") and r[side]["page_faults"] >= 0
        assert r[side]["tokens_per_s"] == pytest.approx(TINY.batch * TINY.seq / r[side]["step_s"])
    assert 0 < r["gemm"]["tflops"] <= r["gemm"]["tflops_best"] and r["peak_source"] == "best gemm just measured"
    assert r["ratio"] == pytest.approx(r["transformers"]["step_s"] / r["mtlm"]["step_s"])
    assert r["ratio_vs_plain"] == pytest.approx(r["plain"]["step_s"] / r["mtlm"]["step_s"])
    assert r["ratio_plain_vs_transformers"] == pytest.approx(r["transformers"]["step_s"] / r["plain"]["step_s"])
    assert r["mfu"] == pytest.approx(r["mtlm"]["tflops"] / r["gemm"]["tflops_best"])
    assert r["optimizer_fused"] is True  # conf/optimizer/adamw.yaml


def test_cli_prints_tokens_ratio_and_mfu(cache_dir, tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mtlm.bench", *TINY_ARGS, "--threads", "1", "--reps", "1",
                           "--warmup", "1", "--precision", "bf16", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MTLM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"mtlm .* tokens/s", proc.stdout) and re.search(r"transformers .* tokens/s", proc.stdout)
    ratio = re.search(r"ratio mtlm/transformers: ([0-9.]+)x", proc.stdout)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"ratio mtlm/plain: [0-9.]+x tokens/s; plain/transformers: [0-9.]+x", proc.stdout)
    assert re.search(r"MFU: [0-9.]+% of", proc.stdout)
    (result,) = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["ratio"] > 0


def test_preset_vocabulary_sizes_the_model_not_the_tokenizer() -> None:
    """Issue 17 (1): --model gives the model GPT-2's 50257 rows; the tokenizer keeps conf/data's size (the
    built-in corpus cannot train 50257 pieces), capped at the model's vocabulary; an explicit one wins."""
    from omegaconf import OmegaConf

    from mtlm.bench.speed import compose_config
    from mtlm.config import CONF_DIR

    default = OmegaConf.load(os.path.join(CONF_DIR, "data", "builtin.yaml")).vocab_size
    preset = Shape(hidden=32, layers=2, heads=4, seq=16, batch=2, vocab=50257)
    cfg = compose_config(preset, "fp32")
    assert (cfg.model.vocab_size, cfg.data.vocab_size) == (50257, default) and default < 50257
    assert (compose_config(TINY, "fp32").model.vocab_size, compose_config(TINY, "fp32").data.vocab_size) == (400, 400)
    assert compose_config(preset, "fp32", overrides=["data.vocab_size=300"]).data.vocab_size == 300


def test_cli_runs_a_preset_at_a_tiny_shape_on_cpu(cache_dir, tmp_path) -> None:
    """The documented GPU command (docs/benchmarks.md), shrunk: it used to stop at a data error."""
    from mtlm.bench.speed import format_speed

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mtlm.bench", "--model", "gpt2_345m", "--layers", "2", "--hidden",
                           "32", "--heads", "4", "--seq", "16", "--batch", "2", "--precision", "bf16", "--device",
                           "cpu", "--threads", "1", "--reps", "1", "--warmup", "0", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MTLM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())
    assert result["shape"]["vocab"] == 50257 and result["gemm"]["shape_mkn"] == [32, 32, 50304]  # h x padded v
    assert result["ratio"] > 0 and result["mfu"] > 0
    # A device without a known peak (a MIG slice) prints no MFU rather than a wrong one.
    assert "MFU: not known" in format_speed({**result, "mfu": None, "peak_tflops": float("nan"),
                                             "peak_source": "unknown:NVIDIA A100-SXM4-40GB MIG 1g.5gb"})


@pytest.mark.multiprocess
def test_tp_scaling_reports_an_efficiency(cache_dir) -> None:
    r = bench_tp_scaling(TINY, tensor=2, reps=1, warmup=0)
    assert r["t1_s"] > 0 and r["tt_s"] > 0 and len(r["t1_all"]) == len(r["tt_all"]) == 1
    assert r["efficiency"] == pytest.approx(r["t1_s"] / (2 * r["tt_s"]))


@pytest.mark.multiprocess
def test_pipeline_scaling_table_has_every_layout_and_the_formula(cache_dir) -> None:
    shape = Shape(hidden=32, layers=4, heads=4, seq=16, batch=1, vocab=400)
    r = bench_pipeline(shape, micro_batches=(2, 4), reps=1, warmup=0, timeout_s=120)
    rows = r["rows"]
    assert [(x["pipeline"], x["virtual"], x["schedule"], x["micro_batches"]) for x in rows] == [
        (1, 1, "-", 2), (2, 1, "1f1b", 2), (2, 2, "interleaved_1f1b", 2),
        (1, 1, "-", 4), (2, 1, "1f1b", 4), (2, 2, "interleaved_1f1b", 4)]
    assert [x["formula"] for x in rows] == [0.0, 0.5, 0.25, 0.0, 0.25, 0.125]  # (P-1)/(v m)
    for m in (2, 4):
        ref, *piped = [x for x in rows if x["micro_batches"] == m]
        assert ref["measured"] is None and ref["step_s"] > 0
        for x in piped:  # the derivation, not the timing: P t_P / t_1 - 1 over the same reference
            assert x["ideal_s"] == pytest.approx(ref["step_s"] / 2)
            assert x["measured"] == pytest.approx(2 * x["step_s"] / ref["step_s"] - 1)
    body = [line for line in format_pipeline(r).splitlines() if re.match(r"\| [12] \|", line)]
    assert [line.rsplit("|", 2)[-2].strip() for line in body] == ["0.000", "0.500", "0.250", "0.000", "0.250",
                                                                  "0.125"]


def test_pipeline_scaling_refuses_two_pipeline_degrees_in_one_run() -> None:
    with pytest.raises(ValueError, match="one pipeline degree per run"):
        bench_pipeline(layouts=((2, 1, "1f1b"), (4, 1, "1f1b")))


@pytest.mark.slow
def test_compiled_step_matches_eager(cache_dir) -> None:
    """trainer.compile=true (inductor, compiled in place) trains the same model: the same losses."""
    from mtlm.bench.speed import compose_config
    from mtlm.parallel.state import ParallelState
    from mtlm.train.loop import Trainer

    losses = []
    for compiled in (False, True):
        trainer = Trainer(compose_config(TINY, "fp32", compile_model=compiled), ParallelState(), None, {})
        losses.append([trainer.train_step()["loss"] for _ in range(3)])
        # Compiled in place: parameter names (hence checkpoints) are the eager model's.
        assert not any("_orig_mod" in name for name in trainer.model.state_dict())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_interleaved_timing_counts_page_faults() -> None:
    """A call that writes 64 MB of fresh memory (glibc maps blocks that big anew each time) faults ~16k
    pages; a call that allocates nothing faults none."""
    import torch

    from mtlm.bench.speed import time_interleaved

    held = torch.zeros(1)
    times, faults = time_interleaved({"fresh": lambda: torch.ones(16 << 20), "none": lambda: held.add_(1)},
                                     reps=3, warmup=1, device=torch.device("cpu"))
    assert len(times["fresh"]) == len(times["none"]) == 3
    assert min(faults["fresh"]) > 8000, faults
    assert max(faults["none"]) < 100, faults


def test_model_flag_takes_a_presets_shape_and_rejects_unknown_names() -> None:
    from mtlm.bench.__main__ import _parser, _preset_shape

    assert _preset_shape("gpt2_345m", _parser()) == Shape(hidden=1024, layers=24, heads=16, seq=1024, batch=8,
                                                           vocab=50257)
    proc = subprocess.run([sys.executable, "-m", "mtlm.bench", "--model", "gpt2_999m"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--model gpt2_999m" in proc.stderr and "gpt2_345m" in proc.stderr
