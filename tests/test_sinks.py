"""Metrics sinks: console line, metrics.jsonl / summary.json, and an offline W&B run read back from disk."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from mtlm.metrics import sinks
from mtlm.metrics.sinks import ConsoleSink, MetricsLogger, build_logger, wandb_mode

try:  # tests/ as a package (rootdir on sys.path) or pytest's default rootdir-less "prepend" import mode
    from tests.wandb_reader import find_wandb_file, read_offline_run
except ImportError:
    from wandb_reader import find_wandb_file, read_offline_run


def logger_cfg(name: str = "wandb", **overrides):
    """The shape of the `logger` config group (mtlm/config.py LoggerConfig)."""
    cfg = {"name": name, "project": "mtlm-test", "group": None, "run_name": None, "mode": None, "tags": []}
    return OmegaConf.create({**cfg, **overrides})


RUN_CONFIG = {
    "model": {"name": "gpt2_tiny", "num_layers": 2, "hidden_size": 64},
    "parallel": {"tensor": 2, "data": 1},
    "optimizer": {"lr": 6e-4, "betas": [0.9, 0.999]},
    "trainer": {"max_steps": 30},
}


@pytest.fixture(autouse=True)
def hermetic_wandb(tmp_path, monkeypatch):
    """No WANDB_MODE from the developer's shell, and W&B's own config/cache dirs inside tmp_path."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))


def train_rows(step: int) -> dict[str, float]:
    return {"train/loss": 5.0 - 0.1 * step, "train/lr": 1e-4 * step, "perf/tokens_per_s": 1000.0 + step}


def test_wandb_offline_run_round_trip(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = logger_cfg(group="sweep-a", run_name="t2d1", tags=["unit", "tp2"])
    logger = build_logger(cfg, RUN_CONFIG, str(out))
    for step in (10, 20, 30):
        logger.log(step, train_rows(step))
    # Same step as the last train row: W&B merges them into one row. NaN survives in W&B (not in the jsonl).
    logger.log(30, {"val/loss": 4.5, "train/grad_norm": math.nan})
    logger.summary({"final/val_loss": 4.5, "perf/mean_tokens_per_s": 1020.0})
    logger.close("ok")

    wandb_file = find_wandb_file(out)  # <out>/wandb/offline-run-*/run-*.wandb: offline, no account needed
    assert wandb_file.parent.name.startswith("offline-run-")
    run = read_offline_run(out)

    assert {k: run["config"][k] for k in RUN_CONFIG} == RUN_CONFIG
    assert run["run"]["project"] == "mtlm-test"
    assert (run["run"]["group"], run["run"]["name"], run["run"]["tags"]) == ("sweep-a", "t2d1", ["unit", "tp2"])

    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in run["history"]]
    assert [row["_step"] for row in run["history"]] == [10, 20, 30]
    assert rows[:2] == [train_rows(10), train_rows(20)]
    assert math.isnan(rows[2].pop("train/grad_norm"))
    assert rows[2] == {**train_rows(30), "val/loss": 4.5}

    summary = run["summary"]
    assert summary["final/val_loss"] == 4.5 and summary["perf/mean_tokens_per_s"] == 1020.0
    assert summary["status"] == "ok"
    assert summary["train/loss"] == pytest.approx(train_rows(30)["train/loss"])  # last value, kept by W&B
    assert run["exit_code"] == 0


def test_summary_wins_over_last_logged_step(tmp_path) -> None:
    """The loop logs tflops_per_device every step and its run average in the summary: W&B must show the average
    (the last row used to be written at finish, after the summary, and replace it) and add no empty row."""
    logger = build_logger(logger_cfg(), RUN_CONFIG, str(tmp_path / "run"))
    logger.log(1, {"tflops_per_device": 1.0})
    logger.log(2, {"tflops_per_device": 3.0})
    logger.summary({"tflops_per_device": 2.0})
    logger.summary({"status_note": "second update, nothing pending"})
    logger.close("ok")
    run = read_offline_run(tmp_path / "run")
    assert [(row["_step"], row["tflops_per_device"]) for row in run["history"]] == [(1, 1.0), (2, 3.0)]
    assert run["summary"]["tflops_per_device"] == 2.0


def test_close_from_exception_handler_twice(tmp_path) -> None:
    out = tmp_path / "run"
    logger = build_logger(logger_cfg(), RUN_CONFIG, out)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            logger.log(1, train_rows(1))
            raise RuntimeError("boom")
        finally:
            logger.close("failed")  # what the training loop does
    logger.close("failed")  # harmless
    logger.close("ok")  # still harmless: the first status sticks

    run = read_offline_run(out)
    assert run["exit_code"] == 1 and run["summary"]["status"] == "failed"
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_context_manager_marks_failure(tmp_path) -> None:
    with pytest.raises(ValueError), build_logger(logger_cfg("none"), RUN_CONFIG, tmp_path) as logger:
        logger.log(1, {"train/loss": 1.0})
        raise ValueError
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_wandb_mode_disabled_writes_no_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    logger = build_logger(logger_cfg(), RUN_CONFIG, out)
    logger.log(1, train_rows(1))
    logger.summary({"x": 1.0})
    logger.close("ok")
    assert not (out / "wandb").exists()
    assert (out / "metrics.jsonl").exists()  # the local sinks still work


def test_wandb_mode_precedence(monkeypatch) -> None:
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"  # logger.mode beats the environment


def test_two_runs_in_one_process(tmp_path) -> None:
    # Hydra's basic launcher runs sweep jobs in one process: each job must get its own, finished run.
    ids = []
    for job in range(2):
        logger = build_logger(logger_cfg(run_name=f"job{job}"), RUN_CONFIG, tmp_path / str(job))
        logger.log(1, {"train/loss": float(job)})
        logger.close("ok")
        run = read_offline_run(tmp_path / str(job))
        assert run["run"]["name"] == f"job{job}" and run["history"][0]["train/loss"] == job
        ids.append(run["run"]["id"])
    assert ids[0] != ids[1]


def test_jsonl_and_summary_json(tmp_path) -> None:
    logger = build_logger(logger_cfg("none"), RUN_CONFIG, tmp_path)
    logger.log(10, {"train/loss": torch.tensor(2.5), "train/grad_norm": math.nan})
    logger.log(20, {"train/loss": 2.25})
    logger.log(20, {"val/loss": 2.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # flushed per line: readable before close
    rows = [json.loads(line) for line in lines]
    assert rows[0]["step"] == 10 and rows[0]["train/loss"] == 2.5
    assert rows[0]["train/grad_norm"] is None  # NaN -> null keeps the file strict JSON
    assert [r["step"] for r in rows] == [10, 20, 20] and rows[2]["val/loss"] == 2.75
    assert all("wall_time" in r for r in rows)

    logger.summary({"final/train_loss": 2.25})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final/train_loss": 2.25, "status": "running"}
    logger.summary({"perf/mean_tokens_per_s": 99.0})
    logger.close("ok")
    logger.close("ok")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"final/train_loss": 2.25, "perf/mean_tokens_per_s": 99.0, "status": "ok"}
    assert not (tmp_path / "wandb").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_close_survives_a_failing_sink(tmp_path, capsys) -> None:
    class Broken:
        def log(self, step, metrics):
            pass

        def summary(self, d):
            pass

        def close(self, status):
            raise OSError("disk full")

    jsonl = sinks.JsonlSink(tmp_path)
    MetricsLogger([Broken(), jsonl]).close("failed")  # must not raise
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert "disk full" in capsys.readouterr().err


def test_console_line_format(capsys) -> None:
    sink = ConsoleSink(total_steps=200)
    sink.log(20, {"train/loss": 5.12341, "val/loss": 5.3, "train/lr": 5.9e-4, "train/grad_norm": 1.2345,
                  "perf/tokens_per_s": 12345.4, "perf/tflops_per_device": 0.01234, "other": 7})
    assert capsys.readouterr().out == (
        "step    20/200 | loss 5.1234 | val 5.3000 | lr 5.9e-04 | gnorm 1.23 | 12,345 tok/s"
        " | 0.012 TFLOP/s/dev\n")
    assert ConsoleSink().format(7, {"loss": float("nan")}) == "step     7 | loss nan"
    assert ConsoleSink(3).format(3, {"perf/mfu": 0.4567}) == "step     3/3 | mfu 45.7%"


def test_build_logger_total_steps_and_bad_name(tmp_path, capsys) -> None:
    logger = build_logger(logger_cfg("none"), RUN_CONFIG, tmp_path)  # total from trainer.max_steps
    logger.log(5, {"train/loss": 1.0})
    logger.close("ok")
    assert capsys.readouterr().out.startswith("step     5/30 | loss 1.0000")
    with pytest.raises(ValueError, match="logger.name"):
        build_logger(logger_cfg("tensorboard"), RUN_CONFIG, tmp_path)
