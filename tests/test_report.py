"""The sweep report (mtlm/report.py) on hand-made sweep dirs, and the W&B sweep YAMLs composed against conf/.

The fake sweeps use the paper's own numbers (§5.1): the 1.2B baseline at 39 TFLOP/s on one GPU and the 8.3B
at 8-way tensor parallelism at 77% of it, so the expected efficiencies are the paper's.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import yaml

from mtlm import report
from mtlm.checks import validate

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # job: (model, hidden, heads, layers, params, tensor, TFLOP/s per device)
    "0": ("gpt2_1.2b", 1536, 16, 40, 1_200_000_000, 1, 39.0),
    "1": ("gpt2_2.5b", 1920, 20, 54, 2_500_000_000, 2, 36.0),
    "2": ("gpt2_4.2b", 2304, 24, 64, 4_200_000_000, 4, 33.0),
    "3": ("gpt2_8.3b", 3072, 32, 72, 8_300_000_000, 8, 0.77 * 39.0),
}


def summary(model: str, hidden: int, heads: int, layers: int, params: int, tensor: int, tflops: float,
            data: int = 1) -> dict:
    devices = tensor * data
    return {"status": "ok", "model": model, "hidden_size": hidden, "num_attention_heads": heads,
            "num_layers": layers, "num_params": params, "tensor": tensor, "data": data, "devices": devices,
            "world_size": devices, "threads_per_rank": 1, "precision": "fp16", "global_batch_size": 8,
            "seq_length": 1024, "step_time_s": 1.0, "tokens_per_s": 8192.0, "tflops_per_device": tflops,
            "hardware_tflops_per_device": tflops * 4 / 3, "pflops": tflops * devices / 1e3, "mfu": tflops / 125,
            "load_avg_1m": 0.25 * devices}


def make_sweep(root: Path, jobs: dict[str, dict | None]) -> Path:
    """Job subdirs like Hydra's; None: a job that started (.hydra/) but never wrote summary.json."""
    for name, content in jobs.items():
        (root / name / ".hydra").mkdir(parents=True)
        if content is not None:
            (root / name / "summary.json").write_text(json.dumps(content))
    (root / ".submitit").mkdir()  # not a job: no summary.json, no .hydra/
    return root


@pytest.fixture
def paper_sweep(tmp_path: Path) -> Path:
    jobs = {name: summary(*values) for name, values in PAPER.items()}
    jobs["4"] = {"status": "failed", "error": "RuntimeError: CUDA out of memory", "steps": 3}
    jobs["5"] = None
    return make_sweep(tmp_path / "sweep", jobs)


def test_efficiency_is_per_device_ratio() -> None:
    assert report.weak_scaling_efficiency(0.77 * 39.0, 39.0) == pytest.approx(0.77)
    assert report.weak_scaling_efficiency(39.0, 39.0) == 1.0
    # 8.3B on 512 GPUs: 15.1 PFLOP/s is 29.49 TFLOP/s per GPU, 76% of the 39 TFLOP/s baseline (§5.1).
    assert round(report.weak_scaling_efficiency(15.1e3 / 512, 39.0), 2) == 0.76
    with pytest.raises(ValueError):
        report.weak_scaling_efficiency(1.0, 0.0)


def test_report_files_match_summaries(paper_sweep: Path) -> None:
    result = report.write_report(paper_sweep, use_wandb=False)
    assert result.baseline.name == "0"
    assert [j.name for j in result.failed] == ["4", "5"]

    with open(paper_sweep / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]  # failed jobs excluded
    for row in rows:
        s = json.loads((paper_sweep / row["job"] / "summary.json").read_text())
        for key in ("tflops_per_device", "pflops", "mfu", "step_time_s", "hardware_tflops_per_device", "load_avg_1m"):
            assert float(row[key]) == s[key]  # copied exactly
        for key in ("devices", "tensor", "data", "hidden_size", "num_layers", "num_params"):
            assert int(row[key]) == s[key]
        assert float(row["scaling_efficiency"]) == pytest.approx(s["tflops_per_device"] / 39.0, rel=1e-12)
    assert float(rows[-1]["scaling_efficiency"]) == pytest.approx(0.77)

    md = (paper_sweep / "scaling.md").read_text()
    assert "| 3 | gpt2_8.3b | 3072 | 32 | 72 | 8.3B | 8 | 1 | 1 | 8 | 30.03 | 0.2402 | 77.0% | 24.0% |" in md
    assert "| 0 | gpt2_1.2b | 1536 | 16 | 40 | 1.2B | 1 | 1 | 1 | 1 | 39 | 0.039 | 100.0% | 31.2% |" in md
    assert "job 4: failed: RuntimeError: CUDA out of memory" in md
    assert "job 5: failed: no summary.json" in md
    assert "the sweep's 1-device job (job 0" in md
    assert "(1-minute average, at the end of each job, its own ranks included): job 0: 0.25, job 1: 0.50," in md
    assert (paper_sweep / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_by_name_path_or_fallback(paper_sweep: Path, tmp_path: Path) -> None:
    jobs = report.load_jobs(paper_sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3", "4", "5"]  # .submitit is not a job
    job, note = report.pick_baseline(jobs, "1")
    assert job.name == "1" and "named on request" in note
    # A run dir outside the sweep (e.g. the 1-GPU job of weak_scaling_tp for a weak_scaling_tp_dp sweep).
    outside = tmp_path / "tp_sweep" / "0"
    outside.mkdir(parents=True)
    (outside / "summary.json").write_text(json.dumps(summary(*PAPER["0"])))
    tp_dp = make_sweep(tmp_path / "tp_dp", {str(i): summary(m, h, a, L, p, t, tf * 0.96, data=64)
                                            for i, (m, h, a, L, p, t, tf) in enumerate(PAPER.values())})
    rows = report.write_report(tp_dp, baseline=str(outside), use_wandb=False).rows
    assert [r["devices"] for r in rows] == [64, 128, 256, 512]
    assert rows[0]["scaling_efficiency"] == pytest.approx(0.96)
    assert rows[-1]["scaling_efficiency"] == pytest.approx(0.77 * 0.96)
    # No 1-device job and no baseline named: the smallest job, and the report says so.
    result = report.write_report(tp_dp, use_wandb=False)
    assert result.baseline.name == "0" and result.rows[0]["scaling_efficiency"] == 1.0
    assert "no 1-device job in this sweep" in result.markdown
    with pytest.raises(ValueError, match="did not finish ok"):
        report.pick_baseline(jobs, "4")
    with pytest.raises(ValueError, match="neither a job"):
        report.pick_baseline(jobs, "nope")


def test_cli(paper_sweep: Path, tmp_path: Path, capsys) -> None:
    assert report.main([str(paper_sweep), "--no-wandb", "--baseline", "0"]) == 0
    assert "77.0%" in capsys.readouterr().out
    failed_only = make_sweep(tmp_path / "bad", {"0": {"status": "failed", "error": "boom"}})
    assert report.main([str(failed_only), "--no-wandb"]) == 2
    assert "no job finished ok" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--no-wandb"]) == 2


def test_sweep_group_name(tmp_path: Path) -> None:
    assert report.sweep_group_name(tmp_path / "weak_scaling_cpu" / "2026-11-25_18-00-00") == \
        "weak_scaling_cpu/2026-11-25_18-00-00"


# ---- sweep definitions -------------------------------------------------------------------------------------

WANDB_SWEEPS = sorted((ROOT / "sweeps" / "wandb").glob("*.yaml"))


def test_wandb_sweeps_exist() -> None:
    assert {p.stem for p in WANDB_SWEEPS} >= {"weak_scaling_cpu", "weak_scaling_tp", "parallel_layouts_cpu"}


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_composes(path: Path) -> None:
    """Every grid point of a W&B sweep is a valid train.py command: the agent's key=value args compose."""
    from hydra import compose, initialize_config_dir

    from mtlm.config import register_configs

    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["method"] == "grid"
    command = spec["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and "${args_no_hyphens}" in command
    assert "logger.mode=online" in command  # else the run stays offline (our default) and never reports back
    fixed = [arg for arg in command if not arg.startswith("${")]
    # The metric the sweep ranks by is a summary.json key written by the training loop.
    assert f'"{spec["metric"]["name"]}"' in (ROOT / "mtlm" / "train" / "loop.py").read_text()
    names = list(spec["parameters"])
    grids = [p["values"] if "values" in p else [p["value"]] for p in spec["parameters"].values()]
    points = list(itertools.product(*grids))
    assert len(points) >= 2
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="sweep"):
        for point in points:
            overrides = [*fixed, *(f"{k}={v}" for k, v in zip(names, point, strict=True))]
            cfg = compose(config_name="config", overrides=overrides)  # rejects unknown keys and options
            validate(cfg, world_size=cfg.parallel.tensor * cfg.parallel.data)
            for key, value in zip(names, point, strict=True):
                if "." in key:  # a config key (not a group choice): the value landed where named
                    section, name = key.split(".")
                    assert cfg[section][name] == value


EXPERIMENTS = ["weak_scaling_cpu", "weak_scaling_tp", "weak_scaling_tp_dp", "gpt2_paper"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweeps_compose(name: str) -> None:
    """Each experiment sweeps its own scale option; every point composes, validates and has the paper's shape."""
    from hydra import compose, initialize_config_dir

    from mtlm.config import register_configs
    from mtlm.metrics.flops import model_flops_per_iteration

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="experiment"):
        base = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        assert base.hydra.callbacks.scaling_report._target_ == "mtlm.report.ScalingReportCallback"
        assert str(base.hydra.sweep.dir).startswith(f"multirun/{name}/")
        scales = base.hydra.sweeper.params.scale.split(",")
        cfgs = [compose(config_name="config", overrides=[f"+experiment={name}", f"scale={s}"]) for s in scales]
    for cfg in cfgs:
        validate(cfg, world_size=cfg.parallel.tensor * cfg.parallel.data)
    tensors = [c.parallel.tensor for c in cfgs]
    assert tensors == sorted(tensors) and tensors[0] == 1 and len(set(tensors)) == len(tensors)
    if name.startswith("weak_scaling"):
        # Weak scaling: head dim fixed, hidden and heads grow with the tensor degree, and each device's share of
        # the FLOPs stays close (Table 1: within 20% from 1.2B/1 GPU to 8.3B/8 GPUs).
        assert len({c.model.hidden_size // c.model.num_attention_heads for c in cfgs}) == 1
        assert len({c.parallel.data for c in cfgs}) == 1
        per_device = [model_flops_per_iteration(c.trainer.global_batch_size, c.model.seq_length, c.model.num_layers,
                                                c.model.hidden_size, c.model.vocab_size or c.data.vocab_size)
                      / (c.parallel.tensor * c.parallel.data) for c in cfgs]
        assert max(per_device) / min(per_device) < (1.05 if name.endswith("cpu") else 1.25)
    if name == "weak_scaling_cpu":
        assert all(c.trainer.num_threads == 1 and c.trainer.device == "cpu" for c in cfgs)  # one core per device
    if name == "gpt2_paper":  # Table 2 and §4
        assert [(c.model.num_layers, c.model.hidden_size, c.model.num_attention_heads) for c in cfgs] == [
            (24, 1024, 16), (54, 1920, 20), (72, 3072, 24)]
        c = cfgs[0]
        assert (c.optimizer.lr, c.scheduler.warmup_steps, c.scheduler.min_lr, c.scheduler.decay) == \
            (1.5e-4, 3000, 1e-5, "cosine")
        assert (c.trainer.max_steps, c.trainer.global_batch_size, c.model.dropout) == (300000, 512, 0.1)
        assert c.trainer.activation_checkpointing and c.precision.dtype == "fp16"
        assert [c.parallel.tensor * c.parallel.data for c in cfgs] == [64, 128, 512]


def test_documented_slurm_commands_compose() -> None:
    """docs/scaling.md's SLURM commands for the paper's studies: the launcher's tasks match each job's ranks."""
    from hydra import compose, initialize_config_dir

    from mtlm.config import register_configs

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    page = (ROOT / "docs" / "scaling.md").read_text()
    pairs = {"weak_scaling_tp_dp": "paper_1.2b_t1:8 paper_2.5b_t2:16 paper_4.2b_t4:32 paper_8.3b_t8:64",
             "gpt2_paper": "paper_355m_t1:8 paper_2.5b_t2:16 paper_8.3b_h24_t8:64"}
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="slurm"):
        for experiment, spec in pairs.items():
            assert spec in page
            for pair in spec.split():
                scale, nodes = pair.split(":")
                cfg = compose(config_name="config", return_hydra_config=True, overrides=[
                    f"+experiment={experiment}", f"scale={scale}", "hydra/launcher=slurm",
                    f"hydra.launcher.nodes={nodes}", "hydra.launcher.tasks_per_node=8",
                    "hydra.sweep.dir=multirun/x", f"hydra.sweep.subdir={scale}",
                    "hydra.callbacks.scaling_report.baseline=multirun/weak_scaling_tp/x/0"])
                # One SLURM task per rank: nodes x tasks per node must be tensor x data (mtlm/parallel/launch.py).
                assert int(nodes) * 8 == cfg.parallel.tensor * cfg.parallel.data
                assert cfg.hydra.callbacks.scaling_report.baseline == "multirun/weak_scaling_tp/x/0"
        # Tensor parallel only: one task per job on one 8-GPU node; the job spawns up to 8 ranks itself.
        assert "hydra.launcher.tasks_per_node=1 hydra.launcher.gpus_per_node=8 hydra.launcher.cpus_per_task=80" in page
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "+experiment=weak_scaling_tp", "scale=paper_8.3b_t8", "hydra/launcher=slurm", "hydra.launcher.nodes=1",
            "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=8", "hydra.launcher.cpus_per_task=80"])
        assert cfg.parallel.tensor * cfg.parallel.data <= cfg.hydra.launcher.gpus_per_node


def test_report_names_the_pipeline_and_sequence_axes() -> None:
    # Summaries from before issue 22 have no pipeline keys: one stage.
    assert report._pipeline({}) == "1"
    assert report._pipeline({"pipeline": 2, "virtual_stages": 1, "schedule": "1f1b"}) == "2"
    assert report._pipeline({"pipeline": 4, "virtual_stages": 1, "schedule": "gpipe"}) == "4 gpipe"
    assert report._pipeline({"pipeline": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b"}) == \
        "2x2 interleaved_1f1b"
    fields = [column for column, _ in report.CSV_FIELDS]
    assert {"pipeline", "virtual_stages", "schedule", "sequence_parallel"} <= set(fields)


def test_pipeline_experiment_composes() -> None:
    """+experiment=pipeline_cpu sweeps the pipeline degree at a fixed model; every point validates."""
    from hydra import compose, initialize_config_dir

    from mtlm.config import register_configs
    from mtlm.parallel.state import Grid

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="experiment"):
        base = compose(config_name="config", overrides=["+experiment=pipeline_cpu"], return_hydra_config=True)
        assert base.hydra.callbacks.scaling_report._target_ == "mtlm.report.ScalingReportCallback"
        degrees = [int(p) for p in str(base.hydra.sweeper.params["parallel.pipeline"]).split(",")]
        cfgs = [compose(config_name="config", overrides=["+experiment=pipeline_cpu", f"parallel.pipeline={p}"])
                for p in degrees]
    assert degrees[0] == 1 and len(degrees) > 1
    for p, cfg in zip(degrees, cfgs, strict=True):
        validate(cfg, world_size=Grid.of(cfg.parallel).world)
        assert cfg.parallel.pipeline == p and cfg.model.num_layers == cfgs[0].model.num_layers  # a fixed model
