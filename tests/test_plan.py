"""python -m mtlm.plan: sizing and communication volumes pinned to hand-computed values, the paper's
published numbers reproduced from the one calibration point (§5.1), one-line bad input, and the report made
from plans (alone, and next to measured jobs)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlm.checks import compose_error
from mtlm.config import register_configs
from mtlm.plan import perf, sizing
from mtlm.plan.__main__ import validate_plan
from mtlm.plan.planner import make_plan, slow_precision_line

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
PAPER_8_3B = ["model=gpt2_8.3b", "parallel.tensor=8", "precision=fp16", "trainer.activation_checkpointing=true",
              "trainer.micro_batch_size=8", "model.seq_length=1024", "model.vocab_size=51200", "cluster=dgx2h_v100"]


def plan_config(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="plan", overrides=["logger=none", *overrides])
    validate_plan(cfg)
    return cfg


# ---- formulas, pinned by hand ----------------------------------------------------------------------------


def test_ring_allreduce() -> None:
    assert perf.ring_allreduce_bytes_per_device(800, 8) == 1400  # 2 x 7/8 x 800
    assert perf.ring_allreduce_time(1e9, 1, 100, 5) == 0.0
    # 2 x 3/4 x 1 GB at 100 GB/s = 15 ms; 6 steps x 5 us + 10 us = 40 us
    assert perf.ring_allreduce_time(1e9, 4, 100.0, 5.0, 10.0) == pytest.approx(0.015 + 40e-6, rel=1e-12)


def test_exposed_data_parallel_time() -> None:
    # The link keeps up (1 s of all-reduce in a 2 s backward): only the last bucket (1/10 of it) shows.
    assert perf.exposed_data_parallel_time(100.0, 10.0, 1.0, 2.0) == pytest.approx(0.1)
    # It does not: 3 s of all-reduce, 2 s of backward of which 9/10 overlap -> 3 - 1.8 = 1.2 s shows.
    assert perf.exposed_data_parallel_time(100.0, 10.0, 3.0, 2.0) == pytest.approx(1.2)


def test_attention_dropout_term() -> None:
    # weak_scaling_cpu's t2 on one of two ranks: 6 layers x batch 8 x 10/2 heads x 256^2 scores per forward.
    scores = perf.attention_scores(6, 8, 10 // 2, 256)
    assert scores == 15_728_640
    assert perf.attention_dropout_time(scores, 20.0, 1) == pytest.approx(0.3145728)
    assert perf.attention_dropout_time(scores, 20.0, 2) == pytest.approx(2 * 0.3145728)  # the recompute


def test_attention_dropout_drawn_again_by_the_recompute() -> None:
    """dgx2h_v100 with a made-up 10 ns per score: the term is b·(a/t)·s²·l per forward, twice with recompute,
    and absent without dropout (so the paper's numbers, at 0 ns, are untouched)."""
    base = [*PAPER_8_3B[:1], "parallel.tensor=8", "model.seq_length=1024", "model.vocab_size=51200",
            "cluster=dgx2h_v100", "cluster.attention_dropout_ns_per_score=10.0", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=8"]
    one = make_plan(plan_config(*base, "model.dropout=0.1"))
    two = make_plan(plan_config(*base, "model.dropout=0.1", "trainer.activation_checkpointing=true"))
    none = make_plan(plan_config(*base, "model.dropout=0.0"))
    want = 72 * 8 * (32 // 8) * 1024**2 * 10e-9
    assert one["attention_dropout_s"] == pytest.approx(want)
    assert two["attention_dropout_s"] == pytest.approx(2 * want)
    assert none["attention_dropout_s"] == 0.0


def test_optimizer_state_bytes() -> None:
    shapes = [(4, 3), (3,)]
    assert sizing.optimizer_state_bytes("adam", shapes) == 8 * 15 + 4 * 2  # two moments, a step per tensor
    assert sizing.optimizer_state_bytes("sgd", shapes, momentum=0.9) == 4 * 15
    assert sizing.optimizer_state_bytes("sgd", shapes, momentum=0.0) == 0
    assert sizing.optimizer_state_bytes("adafactor", shapes) == 4 * (4 + 3) + 4 + 4 * 3 + 4  # row + col; full


@pytest.mark.parametrize("order", ["pre", "post"])
def test_analytic_count_follows_bloom_choices(order: str) -> None:
    """ALiBi has no position table and BLOOM adds an embedding layer norm: the analytic count must agree with
    the meta-device model for them too (at tensor 2, so the split is exercised)."""
    cfg = plan_config("model=bloom_560m", "model.num_layers=2", "model.hidden_size=64",
                      "model.num_attention_heads=4", "model.vocab_size=1000", "parallel.tensor=2",
                      f"model.layernorm_order={order}")
    rank = sizing.size_rank(cfg.model, 1000, 2)
    assert sizing.analytic_params_per_rank(cfg.model, rank.padded_vocab_size, 2) == rank.params_per_rank


def test_sizing_and_volumes_of_the_paper_8_3b() -> None:
    """8.3B (Table 1) at tensor 8 x data 64: per layer (12h^2 + 7h)/8 + 6h = 14,176,896 parameters on a rank;
    x 72 layers + 51,200/8 x 3,072 (vocabulary) + 1,024 x 3,072 (positions) + 2 x 3,072 (final LN)."""
    plan = make_plan(plan_config(*PAPER_8_3B, "parallel.data=64", "trainer.global_batch_size=512"))
    assert plan["params_per_rank"] == 1_043_549_184 == plan["params_per_rank_analytic"]
    assert plan["params_total"] == 72 * (12 * 3072**2 + 13 * 3072) + (51_200 + 1_024) * 3_072 + 2 * 3_072
    # One micro-batch (b·s·h = 8 x 1024 x 3072 = 25,165,824 values): 144 layer g's in fp16 forward, 144 again in
    # the recompute, 144 layer f's in fp32 backward, the embedding's g and the output layer's f in fp32, and the
    # loss's 3 x 8 x 1024 fp32 values: 29,192,454,144 bytes, of which a ring sends 2 x 7/8 from each device.
    assert plan["tensor_parallel_allreduces_per_step"] == 148 + 144 + 145
    assert plan["tensor_parallel_bytes_per_step"] == 51_086_794_752
    # fp32 gradients of the rank (4 x 1,043,549,184 bytes) over 64 data ranks: 2 x 63/64 of them per device.
    assert plan["data_parallel_bytes_per_step"] == 8_217_949_824
    assert plan["memory_parts_gb"]["params"] * 2**30 == 4 * 1_043_549_184
    assert plan["fits"] and plan["memory_per_device_gb"] < 32


# ---- the paper's numbers from its one calibration point -----------------------------------------------------


def test_paper_weak_scaling_reproduced() -> None:
    base = make_plan(plan_config("+experiment=weak_scaling_tp", "cluster=dgx2h_v100"))
    assert base["tflops_per_device"] == pytest.approx(39.0)  # the calibration point itself
    tp8 = make_plan(plan_config("+experiment=weak_scaling_tp", "scale=paper_8.3b_t8", "cluster=dgx2h_v100"))
    dp = make_plan(plan_config("+experiment=weak_scaling_tp_dp", "scale=paper_8.3b_t8", "cluster=dgx2h_v100"))
    assert abs(100 * tp8["tflops_per_device"] / 39.0 - 77) <= 5  # §5.1: 77% at 8-way
    assert abs(100 * dp["tflops_per_device"] / 39.0 - 74) <= 5  # §5.1: 74% on 512 GPUs
    assert dp["devices"] == 512 and abs(dp["pflops"] / 15.1 - 1) <= 0.10  # §5.1: 15.1 PFLOP/s
    assert tp8["step_time_parts_s"]["tensor_parallel"] > 0 and dp["step_time_parts_s"]["data_parallel_exposed"] > 0


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_one_line() -> None:
    err = compose_error(CONF, ["cluster=dgx_nope"], "plan", validate_plan)
    assert err.startswith("config error:") and "dgx2h_v100" in err and "\n" not in err
    err = compose_error(CONF, [*PAPER_8_3B, "parallel.data=128", "trainer.global_batch_size=1024"], "plan",
                        validate_plan)
    assert "1024 devices" in err and "has 512" in err and "\n" not in err
    assert compose_error(CONF, ["trainer.max_steps=0"], "plan", validate_plan) == compose_error(
        CONF, ["trainer.max_steps=0"])  # what train.py rejects, plan rejects the same way
    # train.py reads no cluster: adding one there is an error, not a silently ignored setting
    assert compose_error(CONF, ["+cluster=dgx2h_v100"]).startswith("config error: cluster: is python -m mtlm.plan's")


def test_a_config_that_does_not_fit_says_by_how_much() -> None:
    plan = make_plan(plan_config(*PAPER_8_3B[:1], "parallel.tensor=1", "trainer.micro_batch_size=1",
                                 "trainer.global_batch_size=8", "cluster=dgx2h_v100", "model.vocab_size=51200"))
    assert not plan["fits"]
    margin = plan["memory_margin_gb"]
    assert margin == pytest.approx(32 - plan["memory_per_device_gb"]) and margin < -90


def test_slow_precision_line() -> None:
    line = slow_precision_line("bf16", {"fp32": 0.12, "bf16": 0.001})
    assert "bf16" in line and "1 GFLOP/s" in line and "120 for fp32" in line and "\n" not in line
    assert slow_precision_line("bf16", {"fp32": 0.12, "bf16": 0.2}) is None
    assert slow_precision_line("fp32", {"fp32": 0.12}) is None


# ---- the CLI and the report ----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "mtlm.plan", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_plan_sweep_report_matches_single_plans(tmp_path: Path) -> None:
    """The issue's command runs in seconds; a plan multirun's report rows equal the single plans; and next to
    measured jobs the report shows both, with the error."""
    done = _run([*PAPER_8_3B[:-2], "cluster=dgx2h_v100", "parallel.data=64", "trainer.global_batch_size=512",
                 f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert done.returncode == 0, done.stderr
    one = json.loads((tmp_path / "one" / "plan.json").read_text())
    assert one["params_per_rank"] == one["params_per_rank_analytic"] and one["fits"]
    assert "PFLOP/s" in done.stdout

    sweep = tmp_path / "sweep"
    multi = _run(["-m", "+experiment=weak_scaling_tp", "scale=paper_1.2b_t1,paper_8.3b_t8", "cluster=dgx2h_v100",
                  "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert multi.returncode == 0, multi.stderr
    rows = list(__import__("csv").DictReader((sweep / "scaling.csv").open()))
    plans = [json.loads((sweep / j / "plan" / "plan.json").read_text()) for j in ("0", "1")]
    for row, plan in zip(rows, plans, strict=True):
        assert float(row["tflops_per_device"]) == plan["tflops_per_device"]
        assert float(row["tokens_per_s"]) == plan["tokens_per_s"]
    assert "PREDICTED" in (sweep / "scaling.md").read_text()

    # A measured job next to its plan: job 1 "ran" at 80% of the predicted rate.
    from mtlm.report import write_report

    for job, plan in zip(("0", "1"), plans, strict=True):
        measured = {"status": "ok", "model": plan["model"], "devices": plan["devices"], "tensor": plan["tensor"],
                    "data": 1, "tokens_per_s": plan["tokens_per_s"] * (0.8 if job == "1" else 1.0),
                    "tflops_per_device": plan["tflops_per_device"] * (0.8 if job == "1" else 1.0), "pflops": 0.1}
        (sweep / job / "summary.json").write_text(json.dumps(measured))
    report = write_report(sweep, use_wandb=False)
    assert report.rows[1]["prediction_error"] == pytest.approx(0.25)  # predicted / measured - 1
    assert "PREDICTED" not in report.markdown and "tokens/s predicted" in report.markdown
    header = (sweep / "scaling.csv").read_text().splitlines()[0]
    assert "predicted_tokens_per_s" in header and "prediction_error" in header
    assert math.isclose(report.rows[1]["predicted_scaling_efficiency"], plans[1]["tflops_per_device"] / 39.0)


def test_cpu_local_from_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu_local's nulls come from this machine's probe (faked here: 2 cores, gloo at 1 GB/s and 100 us per
    ring step); without a measured calibration point the plan measures one (issue 25: it used to stop)."""
    from mtlm.config import ConfigError
    from mtlm.plan import probe

    monkeypatch.setattr(probe, "cores", lambda: 2)
    monkeypatch.setattr(probe, "ram_gb", lambda: 16.0)
    monkeypatch.setattr(probe, "gemm_tflops_per_core", lambda dt: {"fp32": 0.1, "bf16": 0.001, "fp16": 0.001}[dt])
    monkeypatch.setattr(probe, "gloo_allreduce", lambda: {"bw_gbps": 1.0, "step_latency_us": 100.0})
    asked = []  # (measure?) per call: none cached, so the plan asks again with measure=True

    def calibration(cal, measure, steps):
        asked.append(measure)
        return {"tflops_per_device": 0.05, "command": "x"} if measure else None

    monkeypatch.setattr(probe, "calibration", calibration)
    plan = make_plan(plan_config("+experiment=weak_scaling_cpu", "scale=cpu_t2"))
    assert asked == [False, True] and plan["calibration"]["tflops_per_device"] == 0.05
    assert plan["devices"] == 2 and plan["threads_per_device"] == 1 and plan["peak_tflops_per_device"] == 0.1
    # t = 2, b·s·h = 8 x 256 x 320 fp32 values: per layer 2 forward + 2 backward all-reduces of 2,621,440 bytes,
    # the ends 2 more, the loss 3 of 8 x 256 x 4 bytes; a ring of 2 sends each once, in 2 steps of 100 us.
    bsh = 8 * 256 * 320 * 4
    volume = (4 * 6 + 2) * bsh + 3 * 8 * 256 * 4
    assert plan["tensor_parallel_bytes_per_step"] == volume
    assert plan["step_time_parts_s"]["tensor_parallel"] == pytest.approx(volume / 1e9 + (4 * 6 + 2 + 3) * 200e-6)
    with pytest.raises(ConfigError, match="has 2"):
        make_plan(plan_config("+experiment=weak_scaling_cpu", "scale=cpu_t4"))


def test_docs_8_3b_command_prints_the_numbers_the_docs_quote(tmp_path: Path) -> None:
    """Issue 25: docs/planner.md's first command, run as written (no model.vocab_size, no data), planned the
    built-in corpus's 4,096-token vocabulary (8.17B parameters, 14.69 PFLOP/s). A paper preset without data is
    planned with GPT-2's 50,257 tokens padded to 51,200 at 8-way; the page's numbers are what it prints."""
    page = (ROOT / "docs" / "planner.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", page, re.S).group(1)
    command = block.replace("\\\n", " ").splitlines()[0]
    assert "model=gpt2_8.3b" in command and "vocab_size" not in command
    overrides = command.split("-m mtlm.plan", 1)[1].split()
    plan = make_plan(plan_config(*overrides))
    assert plan["vocab_size"] == 50257 and plan["padded_vocab_size"] == 51200
    quoted = re.search(r"\*\*([\d,]+) parameters, ([\d.]+) PFLOP/s\*\*", page)
    assert quoted, "the page quotes the command's parameters and PFLOP/s"
    assert plan["params_total"] == int(quoted.group(1).replace(",", ""))
    assert f"{plan['pflops']:.3g}" == quoted.group(2)
    # The paper table's 512-GPU row (the weak_scaling_tp_dp experiment, model.vocab_size=51200) agrees.
    row = re.search(r"^\| weak_scaling_tp_dp \| gpt2_8\.3b \| 8 x 64 \|.*\| \*\*([\d.]+)\*\* \(paper", page, re.M)
    assert row and row.group(1) == quoted.group(2)
    # With data given, the vocabulary is the data's: data.vocab_size for the tokenizer mtlm trains on it.
    (tmp_path / "corpus.txt").write_text("some text\n", encoding="utf-8")
    mine = make_plan(plan_config(*overrides, f"data.paths=[{tmp_path / 'corpus.txt'}]", "data.vocab_size=8192"))
    assert mine["vocab_size"] == 8192


@pytest.mark.slow
def test_cpu_local_calibrates_itself_on_first_use(tmp_path: Path) -> None:
    """Issue 25: `python -m mtlm.plan ... cluster=cpu_local` on a machine without a calibration point stopped
    with "run `python -m mtlm.plan plan.calibrate=true` once". Now it measures the point (the real train.py
    run, on a tiny calibration shape so CI stays fast), says so in one line, shows progress, and caches it."""
    tiny = ["cluster.calibration.num_layers=1", "cluster.calibration.hidden_size=32",
            "cluster.calibration.num_attention_heads=2", "cluster.calibration.seq_length=32",
            "cluster.calibration.batch=2", "cluster.calibration.ranks=1", "plan.calibration_steps=5"]
    env = {**os.environ, "MTLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def plan(name: str) -> tuple[subprocess.CompletedProcess, dict]:
        r = subprocess.run([sys.executable, "-m", "mtlm.plan", "+experiment=weak_scaling_cpu", "scale=cpu_t1",
                            "cluster=cpu_local", *tiny, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r, json.loads((tmp_path / name / "plan.json").read_text())

    first, made = plan("first")
    notes = [line for line in first.stderr.splitlines()
             if line.startswith("note: cluster cpu_local has no calibration")]
    assert len(notes) == 1 and "measuring it now" in notes[0]
    assert re.search(r"^calibrating \(5 train\.py steps on 1 rank\(s\)\): done in \d+ s$", first.stderr, re.M)
    cal = made["calibration"]
    assert cal["source"].startswith("measured here: train.py model.num_layers=1 model.hidden_size=32")
    assert cal["tflops_per_device"] > 0 and math.isfinite(made["step_time_s"])
    cache = json.loads((tmp_path / "cache" / "plan_probe.json").read_text())
    cached = [v for entry in cache.values() for k, v in entry.items() if k.startswith("calibration|l1h32a2s32")]
    assert len(cached) == 1 and cached[0]["tflops_per_device"] == cal["tflops_per_device"]

    second, again = plan("second")  # cached: no notice, no run, the same point
    assert "calibrat" not in second.stderr and again["calibration"] == cal
