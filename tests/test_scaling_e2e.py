"""`python train.py -m +experiment=weak_scaling_cpu`, shrunk on the command line: the experiment sweeps tensor
degree 1 and 2 by itself, the callback writes scaling.csv/.md/.png equal to the jobs' summary.json, W&B holds
one run per job plus a report run in the sweep's group, and the reported TFLOP/s per device agrees with the
step times this test reads off metrics.jsonl's wall clock."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlm.metrics.flops import hardware_flops_per_iteration, model_flops_per_iteration
from mtlm.report import sweep_group_name
from tests.wandb_reader import iter_records, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, SEQ = 10, 2, 64
# One layer at seq 64 keeps a step near 0.1-0.2 s on one core: long enough that logging between steps is
# noise next to it, short enough that the whole sweep (two jobs, one of them 2 ranks) takes ~30 s.
SHRINK = [f"model.seq_length={SEQ}", f"model.max_position_embeddings={SEQ}", "model.num_layers=1",
          "data.vocab_size=1024", f"trainer.max_steps={STEPS}", "trainer.log_interval=1",
          f"trainer.timing_warmup_steps={WARMUP}", "trainer.eval_iters=1", "trainer.activation_checkpointing=true"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("weak_scaling_cpu")
    env = dict(os.environ, MTLM_CACHE_DIR=str(tmp / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_DIR", None)
    sweep_dir = tmp / "weak_scaling_cpu" / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=weak_scaling_cpu", *SHRINK,
           f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "scaling report failed" not in proc.stderr, proc.stderr[-3000:]
    (tmp / "stdout.txt").write_text(proc.stdout)
    return sweep_dir


def summaries(sweep: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(sweep.iterdir())
            if (d / "summary.json").exists()}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sweep_report_matches_summaries(sweep: Path) -> None:
    jobs = summaries(sweep)
    assert list(jobs) == ["0", "1"]
    assert [(s["tensor"], s["devices"], s["threads_per_rank"], s["status"]) for s in jobs.values()] == [
        (1, 1, 1, "ok"), (2, 2, 1, "ok")]  # one compute thread per device, whatever the tensor degree
    assert [(s["hidden_size"], s["num_attention_heads"]) for s in jobs.values()] == [(256, 8), (320, 10)]
    base = jobs["0"]["tflops_per_device"]
    with open(sweep / "scaling.csv", newline="") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"0", "1"}
    for name, s in jobs.items():
        row = rows[name]
        for key in ("tflops_per_device", "pflops", "mfu", "step_time_s", "hardware_tflops_per_device"):
            assert float(row[key]) == s[key], key
        assert int(row["devices"]) == s["devices"] and int(row["num_params"]) == s["num_params"]
        assert float(row["scaling_efficiency"]) == pytest.approx(s["tflops_per_device"] / base, rel=1e-12)
        assert s["pflops"] == pytest.approx(s["tflops_per_device"] * s["devices"] / 1e3, rel=1e-12)
    md = (sweep / "scaling.md").read_text()
    for name, s in jobs.items():
        efficiency = 100 * s["tflops_per_device"] / base
        assert f"| {name} | {s['model']} | {s['hidden_size']} | {s['num_attention_heads']} | 1 |" in md
        assert f"| {s['tflops_per_device']:.4g} | {s['pflops']:.4g} | {efficiency:.1f}% |" in md
    assert (sweep / "scaling.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reported_tflops_match_wall_clock(sweep: Path) -> None:
    """TFLOP/s per device = FLOPs / (step time x devices), with FLOPs from the formula and the step time from
    metrics.jsonl's wall clock (one row per step), not from the loop's own timer."""
    for name, s in summaries(sweep).items():
        vocab, hidden = s["padded_vocab_size"], s["hidden_size"]
        flops = model_flops_per_iteration(8, SEQ, 1, hidden, vocab)
        assert flops == 72 * 8 * SEQ * hidden**2 + 12 * 8 * SEQ**2 * hidden + 6 * 8 * SEQ * hidden * vocab
        assert s["flops_per_step"] == pytest.approx(flops, rel=1e-12)
        # Activation checkpointing is on: the hardware also reruns each layer's forward.
        hardware = hardware_flops_per_iteration(8, SEQ, 1, hidden, vocab, recompute=True)
        assert s["hardware_flops_per_step"] == pytest.approx(hardware, rel=1e-12)
        assert s["hardware_tflops_per_device"] == pytest.approx(s["tflops_per_device"] * hardware / flops)

        rows = [json.loads(line) for line in (sweep / name / "metrics.jsonl").read_text().splitlines()]
        wall = {r["step"]: r["wall_time"] for r in rows if "loss" in r}
        assert sorted(wall) == list(range(1, STEPS + 1))
        # Step k's interval ends at its log line. Steps after warm-up, but not the last: its interval also
        # holds the end-of-run evaluation, which the loop rightly leaves out of its timing.
        steps = range(WARMUP + 1, STEPS)
        step_time = sum(wall[k] - wall[k - 1] for k in steps) / len(steps)
        expected = flops / (step_time * s["devices"]) / 1e12
        assert s["tflops_per_device"] == pytest.approx(expected, rel=0.15), (name, s["step_time_s"], step_time)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_wandb_job_runs_and_report_run(sweep: Path) -> None:
    group = sweep_group_name(sweep)
    assert group == "weak_scaling_cpu/sweep"
    jobs = summaries(sweep)
    for name, s in jobs.items():
        run = read_offline_run(sweep / name)
        assert run["run"]["group"] == group and run["exit_code"] == 0
        assert run["run"]["name"] == f"{s['model']}_t{s['tensor']}d1"
        assert run["config"]["parallel"]["tensor"] == s["tensor"] and run["config"]["model"]["hidden_size"] == \
            s["hidden_size"]
        for key in ("pflops", "tflops_per_device", "mfu", "devices", "hardware_tflops_per_device"):
            assert run["summary"][key] == pytest.approx(s[key]), key
        logged = [h for h in run["history"] if "tflops_per_device" in h]
        assert len(logged) == STEPS

    report_dir = next((sweep / "wandb").glob("offline-run-*"))
    run = read_offline_run(report_dir)
    assert (run["run"]["group"], run["run"]["job_type"], run["exit_code"]) == (group, "report", 0)
    points = [h for h in run["history"] if "scaling/efficiency" in h]
    assert [p["devices"] for p in points] == [1, 2]
    for p, s in zip(points, jobs.values(), strict=True):
        assert p["scaling/efficiency"] == pytest.approx(s["tflops_per_device"] / jobs["0"]["tflops_per_device"])
        assert p["scaling/pflops"] == pytest.approx(s["pflops"])
    # The chart: scaling/* plotted against devices, not against the step counter.
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in iter_records(report_dir)
               if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("scaling/*") == "devices"
    table_ref = next(h["scaling_table"] for h in run["history"] if "scaling_table" in h)
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == 2
    table = json.loads((report_dir / "files" / table_ref["path"]).read_text())
    eff = table["columns"].index("scaling_efficiency")
    assert [row[eff] for row in table["data"]] == pytest.approx([p["scaling/efficiency"] for p in points])
    assert run["summary"]["scaling_efficiency_at_max"] == pytest.approx(points[-1]["scaling/efficiency"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sweep_last_line_and_report_made_again_replaces_its_wandb_run(sweep: Path, capsys) -> None:
    """Each job ends with its run dir, the sweep with its sweep dir (after the report); `python -m mtlm.report`
    made again replaces the W&B report run instead of adding a second one to the group, and says so."""
    from mtlm import report

    out = (sweep.parent.parent / "stdout.txt").read_text().strip().splitlines()
    assert out[-1].startswith("sweep dir: weak_scaling_cpu/sweep | 2 jobs ok, 0 failed | lowest val_loss "), out[-3:]
    assert sum(line.startswith("run dir: ") for line in out) == 2
    before = sorted((sweep / "wandb").glob("offline-run-*"))
    assert len(before) == 1 and f"W&B report run: {before[0]}" in out[-2]
    assert report.main([str(sweep)]) == 0
    after = sorted((sweep / "wandb").glob("offline-run-*"))
    assert len(after) == 1 and after != before
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"written: {sweep}/{{scaling.csv, scaling.md, scaling.png}}; W&B report run: {after[0]} (replaces {before[0]})")
