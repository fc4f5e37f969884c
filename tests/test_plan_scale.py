"""python -m mtlm.plan at scale (issue 23): the 2019 code's gradient all-reduce after backward, pinned to a hand
computation; the pipeline and sequence-parallel terms (mtlm/plan/pipeline.py) against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlm.checks import compose_error
from mtlm.config import register_configs
from mtlm.plan.__main__ import validate_plan
from mtlm.plan.planner import make_plan

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PAPER_8_3B_512 = ["model=gpt2_8.3b", "parallel.tensor=8", "parallel.data=64", "precision=fp16",
                  "trainer.activation_checkpointing=true", "trainer.micro_batch_size=8",
                  "trainer.global_batch_size=512", "model.seq_length=1024", "model.vocab_size=51200",
                  "cluster=dgx2h_v100"]


def plan_config(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="plan", overrides=["logger=none", *overrides])
    validate_plan(cfg)
    return cfg


def test_after_backward_allreduce_is_fp16_and_fully_exposed() -> None:
    """The 2019 code: one fp16 buffer of the rank's 1,043,549,184 gradients (2 bytes each), all-reduced over 64
    data ranks after backward. Across nodes each of the 8 data-parallel groups on a DGX-2H gets 100/8 = 12.5
    GB/s of its network (< 120 GB/s NVLink): 2 x 63/64 x 2,087,098,368 bytes / 12.5e9 + (8.4 + 2 x 63 x 6.6) us,
    all of it on the step, none hidden behind backward."""
    after = make_plan(plan_config(*PAPER_8_3B_512, "cluster.grad_allreduce=after_backward"))
    over = make_plan(plan_config(*PAPER_8_3B_512, "cluster.grad_allreduce=overlapped"))
    sent = 2 * 63 / 64 * 2 * 1_043_549_184
    assert after["grad_allreduce"] == "after_backward" and after["data_parallel_bytes_per_step"] == sent
    expected = sent / 12.5e9 + (8.4 + 2 * 63 * 6.6) * 1e-6
    assert after["step_time_parts_s"]["data_parallel_exposed"] == pytest.approx(expected, rel=1e-12)
    assert after["data_parallel_allreduce_s"] == pytest.approx(expected, rel=1e-12)
    # mtlm's DDP sends the fp32 gradients (twice the bytes) but hides most of them behind the backward.
    assert over["data_parallel_bytes_per_step"] == 2 * sent
    assert over["step_time_parts_s"]["data_parallel_exposed"] < 0.5 * over["data_parallel_allreduce_s"]
    assert over["step_time_parts_s"]["compute"] == after["step_time_parts_s"]["compute"]


def test_grad_allreduce_bad_value_is_one_line() -> None:
    err = compose_error(CONF, [*PAPER_8_3B_512, "cluster.grad_allreduce=sometimes"], "plan", validate_plan)
    assert err.startswith("config error: cluster.grad_allreduce:") and "after_backward" in err and "\n" not in err
