"""Weak-scaling report of a sweep: scaling.csv, scaling.md, scaling.png and a W&B "report" run.

    python -m mtlm.report multirun/weak_scaling_cpu/2026-11-25_18-00-00 [--baseline 0] [--no-wandb]

A sweep dir holds one subdir per job (Hydra's 0/, 1/, ...), each with the summary.json train.py wrote. Weak-
scaling efficiency is the paper's (§5.1): a job's per-device TFLOP/s over the 1-device baseline's, so 100%
means adding devices (and a proportionally larger model) lost nothing per device. The baseline is the job
with devices == 1, or one named with --baseline (a job subdir of this sweep, or any run dir / summary.json,
e.g. the 1-GPU job of a weak_scaling_tp sweep for a weak_scaling_tp_dp sweep). With neither, the job with the
fewest devices is the baseline, and scaling.md says so. Failed jobs are listed, not counted.

The experiments register `ScalingReportCallback` under hydra.callbacks, so a multirun writes the report when
its last job ends. Hydra stops a sweep at its first failed job without calling the callback; then run the
command above on what finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mtlm.config import sweep_group_name as sweep_group_name  # re-exported: report.sweep_group_name
from mtlm.metrics.sinks import wandb_mode
from mtlm.plan.compare import (
    PLAN_FILE,
    PREDICTED_FIELDS,
    add_predictions,
    all_predicted,
    calibration_baseline,
    markdown_extra,
    predicted_summary,
    read_plan,
    title_note,
)

# scaling.csv columns: (column, summary.json key). Every number is copied from the job's summary unchanged.
CSV_FIELDS: tuple[tuple[str, str], ...] = (
    ("job", "job"), ("model", "model"), ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_layers", "num_layers"), ("num_params", "num_params"),
    ("tensor", "tensor"), ("data", "data"), ("pipeline", "pipeline"), ("virtual_stages", "virtual_stages"),
    ("schedule", "schedule"), ("sequence_parallel", "sequence_parallel"),
    ("devices", "devices"), ("threads_per_rank", "threads_per_rank"),
    ("precision", "precision"), ("global_batch_size", "global_batch_size"), ("seq_length", "seq_length"),
    ("step_time_s", "step_time_s"), ("tokens_per_s", "tokens_per_s"), ("tflops_per_device", "tflops_per_device"),
    ("hardware_tflops_per_device", "hardware_tflops_per_device"), ("pflops", "pflops"), ("mfu", "mfu"),
    ("scaling_efficiency", "scaling_efficiency"), ("load_avg_1m", "load_avg_1m"),
)


@dataclass
class Job:
    name: str  # the job's subdir in the sweep ("0", "1", ...) or the path of an outside baseline
    summary: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # <job>/plan/plan.json from python -m mtlm.plan (mtlm/plan/compare.py)

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok" and bool(self.summary.get("tflops_per_device"))

    @property
    def devices(self) -> int:
        return int(self.summary.get("devices") or self.summary.get("world_size") or 0)


def _job_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def read_summary(path: Path) -> dict[str, Any]:
    """A run dir's (or a summary.json file's) summary; a job that died before writing one reads as failed."""
    file = path if path.suffix == ".json" else path / "summary.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return {"status": "failed", "error": "no summary.json (the job did not finish)"}
    except ValueError as err:
        return {"status": "failed", "error": f"unreadable summary.json: {err}"}
    return data if isinstance(data, dict) else {"status": "failed", "error": "summary.json is not an object"}


def load_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job subdir of a sweep (one with summary.json or Hydra's .hydra/), in job-number order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep dir {root}")

    dirs = [d for d in root.iterdir() if d.is_dir() and ((d / "summary.json").exists() or (d / ".hydra").is_dir()
                                                         or (d / PLAN_FILE).is_file())]
    jobs = []
    for d in sorted(dirs, key=_job_order):
        plan = read_plan(d)  # a job of plans only reads as predicted; with a summary.json, as measured + predicted
        measured = (d / "summary.json").exists() or (d / ".hydra").is_dir() or plan is None
        jobs.append(Job(d.name, read_summary(d) if measured else predicted_summary(plan), plan))
    return jobs


def pick_baseline(jobs: list[Job], baseline: str | None = None, sweep_dir: str | Path | None = None) -> tuple[Job, str]:
    """The job efficiency is measured against, and a sentence saying which and why."""
    ok = [j for j in jobs if j.ok]
    if baseline is not None:
        named = next((j for j in jobs if j.name == str(baseline)), None)
        if named is None:
            path = Path(baseline)
            if not path.exists() and sweep_dir is not None and (Path(sweep_dir) / baseline).exists():
                path = Path(sweep_dir) / baseline
            if not path.exists():
                raise ValueError(f"baseline {baseline!r} is neither a job of this sweep nor a run dir / summary.json")
            named = Job(str(path), read_summary(path))
        if not named.ok:
            raise ValueError(f"baseline {baseline!r} did not finish ok: {named.summary.get('error', 'no throughput')}")
        return named, f"the baseline named on request ({_describe(named)})"
    if not ok:
        raise ValueError("no job finished ok: nothing to report")
    single = [j for j in ok if j.devices == 1]
    if single:
        return single[0], f"the sweep's 1-device job ({_describe(single[0])})"

    if all_predicted(jobs) and (cal := calibration_baseline(jobs)) is not None:
        return Job("calibration", cal), f"the cluster's calibration point ({cal['source']})"
    smallest = min(ok, key=lambda j: j.devices)
    return smallest, (f"no 1-device job in this sweep, so the smallest job ({_describe(smallest)}); pass a 1-device "
                      f"run with --baseline for the paper's definition")


def _describe(job: Job) -> str:
    s = job.summary
    return f"job {job.name}: {s.get('model')}, {job.devices} device{'s' if job.devices != 1 else ''}, " \
           f"{s['tflops_per_device']:.4g} TFLOP/s per device"


def weak_scaling_efficiency(tflops_per_device: float, baseline_tflops_per_device: float) -> float:
    """§5.1: per-device throughput of the scaled run over that of the baseline (1.0 = perfect weak scaling)."""
    if baseline_tflops_per_device <= 0:
        raise ValueError(f"baseline throughput must be > 0, got {baseline_tflops_per_device}")
    return tflops_per_device / baseline_tflops_per_device


def scaling_rows(jobs: list[Job], baseline: Job) -> list[dict[str, Any]]:
    """One row per ok job, fewest devices first: the summary's numbers plus scaling_efficiency."""
    base = baseline.summary["tflops_per_device"]
    rows = []
    for job in sorted((j for j in jobs if j.ok), key=lambda j: j.devices):
        row = {key: job.summary.get(key) for _, key in CSV_FIELDS}
        row.update(job=job.name, devices=job.devices,
                   scaling_efficiency=weak_scaling_efficiency(job.summary["tflops_per_device"], base))
        rows.append(row)
    return rows


def failed_jobs(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if not j.ok]


def write_csv(rows: list[dict[str, Any]], path: Path, fields: tuple[tuple[str, str], ...] = CSV_FIELDS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([column for column, _ in fields])
        for row in rows:  # str(float) round-trips exactly, so the CSV reads back equal to summary.json
            writer.writerow(["" if row.get(key) is None else row[key] for _, key in fields])


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pipeline(row: dict[str, Any]) -> str:
    """`2` (1f1b), `2 gpipe`, `2x2 interleaved_1f1b`; `1` for runs without a pipeline or before it existed."""
    p = row.get("pipeline") or 1
    if p == 1:
        return "1"
    v = row.get("virtual_stages") or 1
    schedule = row.get("schedule") or "1f1b"
    return f"{p}x{v} {schedule}" if v > 1 else (f"{p}" if schedule == "1f1b" else f"{p} {schedule}")


def markdown_table(rows: list[dict[str, Any]], failed: list[Job], baseline_note: str, title: str) -> str:
    """Table 1 of the paper, measured: shape, layout, per-device and aggregate throughput, efficiency."""
    lines = [f"# Weak scaling: {title}", "",
             f"Baseline: {baseline_note}.",
             "Efficiency = a job's TFLOP/s per device / the baseline's (Megatron-LM §5.1). Model FLOPs "
             "(no recompute) per iteration: 72·B·s·l·h²·(1 + s/6h + V/12lh).", "",
             "| job | model | hidden | heads | layers | params | tensor | data | pipeline | devices "
             "| TFLOP/s per device | aggregate PFLOP/s | efficiency | MFU |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['job']} | {r['model']} | {_num(r['hidden_size'], 'd')} | "
                     f"{_num(r['num_attention_heads'], 'd')} | {_num(r['num_layers'], 'd')} | "
                     f"{_count(r['num_params'])} | {r['tensor']}{'+SP' if r.get('sequence_parallel') else ''} | "
                     f"{r['data']} | {_pipeline(r)} | {r['devices']} | "
                     f"{r['tflops_per_device']:.4g} | {r['pflops']:.4g} | {100 * r['scaling_efficiency']:.1f}% "
                     f"| {mfu} |")
    loads = [f"job {r['job']}: {r['load_avg_1m']:.2f}" for r in rows if r.get("load_avg_1m") is not None]
    if loads:  # a CPU job sharing its cores with other work runs slow, a multi-rank one much more so
        lines += ["", "Machine load (1-minute average, at the end of each job, its own ranks included): "
                  + ", ".join(loads) + "."]
    if failed:
        lines += ["", "Failed jobs (not in the table):"]
        lines += [f"- job {j.name}: {j.summary.get('status')}: {j.summary.get('error', '')}".rstrip(": ")
                  for j in failed]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str, baseline_tflops_per_device: float,
         label: str = "measured") -> None:
    """Efficiency and aggregate PFLOP/s against devices, with the ideal (the baseline's rate on every device),
    and the predicted line when the rows carry plans (mtlm/plan/compare.py)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe inside a Hydra job or CI
    import matplotlib.pyplot as plt

    devices = [r["devices"] for r in rows]
    fig, (eff_ax, pf_ax) = plt.subplots(1, 2, figsize=(10, 4))
    eff_ax.plot(devices, [100 * r["scaling_efficiency"] for r in rows], "o-", label=label)
    predicted = [r for r in rows if "predicted_scaling_efficiency" in r]
    if predicted:
        eff_ax.plot([r["devices"] for r in predicted], [100 * r["predicted_scaling_efficiency"] for r in predicted],
                    "s:", label="predicted")
        pf_ax_rows = [(r["devices"], r["predicted_tflops_per_device"] * r["devices"] / 1e3) for r in predicted]
    eff_ax.axhline(100, color="gray", ls="--", label="ideal")
    top = max([110.0] + [110 * r["scaling_efficiency"] for r in rows])  # noise can put a job above 100%
    eff_ax.set(xlabel="devices", ylabel="weak-scaling efficiency (%)", ylim=(0, top))
    pf_ax.plot(devices, [r["pflops"] for r in rows], "o-", label=label)
    if predicted:
        pf_ax.plot(*zip(*pf_ax_rows, strict=True), "s:", label="predicted")
    pf_ax.plot(devices, [baseline_tflops_per_device * d / 1e3 for d in devices], "--", color="gray", label="ideal")
    pf_ax.set(xlabel="devices", ylabel="aggregate PFLOP/s")
    for ax in (eff_ax, pf_ax):
        if devices and max(devices) / min(devices) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(devices, [str(d) for d in devices])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Weak scaling: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# What the last W&B report run of a sweep was, so that making the report again replaces it (not a second
# run of the same name in the group): its offline folder, or its online path (entity/project/id).
WANDB_RECORD = "scaling_wandb.json"


def _replace_earlier_report(sweep_dir: Path) -> str | None:
    """Delete the report run an earlier report of this sweep recorded; returns what it deleted, or None."""
    try:
        earlier = json.loads((sweep_dir / WANDB_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = Path(earlier.get("offline_dir") or "")
    if earlier.get("offline_dir") and folder.is_dir() and sweep_dir.resolve() in folder.resolve().parents:
        shutil.rmtree(folder)  # an offline run we wrote into this sweep dir: `wandb sync` would upload both
        return str(folder)
    if earlier.get("path"):
        import wandb

        try:  # an uploaded run: W&B's API deletes it (needs the network and the run's project access)
            wandb.Api().run(earlier["path"]).delete()
            return f"W&B run {earlier['path']}"
        except Exception as err:  # the new report is still written; say what is left to do
            print(f"warning: could not delete the earlier report run {earlier['path']} ({type(err).__name__}: "
                  f"{err}); delete it in the W&B UI", file=sys.stderr, flush=True)
    return None


def log_to_wandb(rows: list[dict[str, Any]], sweep_dir: Path, group: str, baseline_note: str,
                 project: str = "mtlm", mode: str | None = None) -> str:
    """One more run in the sweep's group (job_type "report"): the table, and efficiency vs devices. It
    replaces the report run an earlier call made for this sweep dir."""
    import wandb

    replaced = _replace_earlier_report(sweep_dir)
    settings = wandb.Settings(console="off", disable_git=True, x_disable_stats=True, silent=True,
                              reinit="finish_previous")
    run = wandb.init(project=project, group=group, job_type="report", name=f"report {group}", dir=str(sweep_dir),
                     mode=wandb_mode(mode), settings=settings,
                     config={"sweep_dir": str(sweep_dir), "baseline": baseline_note})
    try:
        run.define_metric("devices")
        run.define_metric("scaling/*", step_metric="devices")  # the chart's x axis is devices, not step
        for r in rows:
            run.log({"devices": r["devices"], "scaling/efficiency": r["scaling_efficiency"],
                     "scaling/pflops": r["pflops"], "scaling/tflops_per_device": r["tflops_per_device"]})
        columns = [column for column, _ in CSV_FIELDS]
        table = wandb.Table(columns=columns, data=[[r[key] for _, key in CSV_FIELDS] for r in rows])
        png = sweep_dir / "scaling.png"
        run.log({"scaling_table": table, **({"scaling_plot": wandb.Image(str(png))} if png.exists() else {})})
        largest = rows[-1]
        run.summary.update({"devices_max": largest["devices"], "scaling_efficiency_at_max": largest[
            "scaling_efficiency"], "pflops_at_max": largest["pflops"]})
        run_dir = run.dir
        offline = run.settings.mode in ("offline", "dryrun")
        record = {"offline_dir": str(Path(run_dir).parent) if offline else None,
                  "path": None if offline or run.settings.mode == "disabled" else run.path}
    finally:
        run.finish()
        wandb.teardown()  # as in metrics/sinks.py: returns once the offline .wandb file is flushed
    (sweep_dir / WANDB_RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")
    where = record["offline_dir"] or record["path"] or "disabled"
    return f"{where}" + (f" (replaces {replaced})" if replaced else "")


@dataclass
class Report:
    rows: list[dict[str, Any]]
    failed: list[Job]
    baseline: Job
    markdown: str
    wandb_run: str | None = None  # the W&B report run written (its offline folder or online path), if any

    def written(self, sweep_dir: str | Path) -> str:
        """The line saying what was written where (the callback and the CLI both end with it)."""
        files = ", ".join(["scaling.csv", "scaling.md"] + (["scaling.png"] if self.rows else []))
        return f"written: {sweep_dir}/{{{files}}}" + (f"; W&B report run: {self.wandb_run}" if self.wandb_run else "")


def write_report(sweep_dir: str | Path, baseline: str | None = None, use_wandb: bool = True,
                 project: str = "mtlm", mode: str | None = None, group: str | None = None) -> Report:
    """Read the sweep's jobs and write scaling.csv / scaling.md / scaling.png (and the W&B run) into it."""
    root = Path(sweep_dir)
    jobs = load_jobs(root)
    base, note = pick_baseline(jobs, baseline, root)
    rows = scaling_rows(jobs, base)
    failed = failed_jobs(jobs)
    title = sweep_group_name(root)

    both = add_predictions(rows, jobs, base.summary["tflops_per_device"])  # plans next to measured jobs
    shown = title + (f" ({label})" if (label := title_note(jobs)) else "")  # a sweep of plans only says so
    write_csv(rows, root / "scaling.csv", CSV_FIELDS + (PREDICTED_FIELDS if both else ()))
    markdown = markdown_table(rows, failed, note, shown) + ("\n".join(markdown_extra(rows)) + "\n" if both else "")
    (root / "scaling.md").write_text(markdown, encoding="utf-8")
    note = f"{note}; {label}" if label else note  # the W&B report run's config says it too
    if rows:
        plot(rows, root / "scaling.png", shown, base.summary["tflops_per_device"], "predicted" if label else "measured")
    wandb_run = None
    if use_wandb and rows:
        groups = {j.summary.get("wandb_group") for j in jobs if j.ok} - {None}
        wandb_run = log_to_wandb(rows, root, group or (groups.pop() if len(groups) == 1 else title), note, project,
                                 mode)
    return Report(rows, failed, base, markdown, wandb_run)


class ScalingReportCallback(Callback):
    """hydra.callbacks entry: writes the report into hydra.sweep.dir when a multirun ends."""

    def __init__(self, baseline: str | None = None, use_wandb: bool | None = None) -> None:
        self.baseline = baseline
        self.use_wandb = use_wandb  # None: when the sweep's logger is wandb

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        sweep_dir = Path(str(config.hydra.sweep.dir))
        logger = OmegaConf.select(config, "logger.name", default="none")
        use_wandb = self.use_wandb if self.use_wandb is not None else logger == "wandb"
        try:
            report = write_report(sweep_dir, self.baseline, use_wandb,
                                  project=OmegaConf.select(config, "logger.project", default="mtlm"),
                                  mode=OmegaConf.select(config, "logger.mode", default=None))
        except Exception as err:  # a report bug must not read as a failed sweep: the jobs' results are on disk
            print(f"scaling report failed: {type(err).__name__}: {err}; retry with "
                  f"`python -m mtlm.report {sweep_dir}`", file=sys.stderr, flush=True)
            return
        print(f"\n{report.markdown}\n{report.written(sweep_dir)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun dir whose subdirs are jobs with summary.json")
    parser.add_argument("--baseline", help="a job subdir of the sweep, or a run dir / summary.json elsewhere")
    parser.add_argument("--no-wandb", action="store_true", help="skip the W&B report run")
    parser.add_argument("--project", default="mtlm", help="W&B project (default: mtlm)")
    parser.add_argument("--group", help="W&B group (default: the jobs' group, else the sweep dir's last two parts)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.baseline, not args.no_wandb, args.project, group=args.group)
    except (FileNotFoundError, ValueError) as err:
        print(f"report error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(report.written(args.sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
