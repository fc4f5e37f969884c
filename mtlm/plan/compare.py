"""Plans in a sweep's report (mtlm/report.py): predicted rows, or predicted next to measured.

A plan job writes <sweep dir>/<job>/plan/plan.json (conf/plan.yaml's sweep subdir). A job dir holding only
a plan reads as a job whose numbers are predicted (the report says so); one holding train.py's summary.json
as well gets the predicted numbers in extra columns, with the error of the prediction
(predicted / measured - 1). A sweep of plans only, with no 1-device job, takes the cluster's calibration
point as its 1-device baseline (the paper's definition of weak-scaling efficiency: §5.1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLAN_FILE = Path("plan") / "plan.json"
# Extra scaling.csv columns when a sweep holds both (column, row key).
PREDICTED_FIELDS: tuple[tuple[str, str], ...] = (
    ("predicted_step_time_s", "predicted_step_time_s"), ("predicted_tokens_per_s", "predicted_tokens_per_s"),
    ("predicted_tflops_per_device", "predicted_tflops_per_device"),
    ("predicted_scaling_efficiency", "predicted_scaling_efficiency"), ("prediction_error", "prediction_error"),
)


def read_plan(job_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((job_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def predicted_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan in summary.json's terms, so the report's table reads it like a measured job."""
    return {
        "status": "ok", "predicted": True, "cluster": plan["cluster"], "model": plan["model"],
        "hidden_size": plan["hidden_size"], "num_attention_heads": plan["num_attention_heads"],
        "num_layers": plan["num_layers"], "num_params": plan["params_total"], "tensor": plan["tensor"],
        "data": plan["data"], "pipeline": plan.get("pipeline", 1), "virtual_stages": plan.get("virtual_stages", 1),
        "schedule": plan.get("schedule"), "sequence_parallel": plan.get("sequence_parallel", False),
        "devices": plan["devices"], "threads_per_rank": plan["threads_per_device"],
        "precision": plan["precision"], "global_batch_size": plan["global_batch_size"],
        "seq_length": plan["seq_length"], "step_time_s": plan["step_time_s"], "tokens_per_s": plan["tokens_per_s"],
        "tflops_per_device": plan["tflops_per_device"],
        "hardware_tflops_per_device": plan["tflops_per_device"] * plan["hardware_flops_per_step"]
        / plan["model_flops_per_step"],
        "pflops": plan["pflops"], "mfu": plan["mfu"], "calibration": plan["calibration"],
    }


def all_predicted(jobs: list[Any]) -> bool:
    ok = [j for j in jobs if j.ok]
    return bool(ok) and all(j.summary.get("predicted") for j in ok)


def calibration_baseline(jobs: list[Any]) -> dict[str, Any] | None:
    """The calibration point of a sweep of plans, as a 1-device summary (None when the plans disagree)."""
    points = {json.dumps(j.summary["calibration"], sort_keys=True) for j in jobs if j.ok}
    if len(points) != 1:
        return None
    cal = json.loads(points.pop())
    return {"status": "ok", "predicted": True, "model": "calibration point", "devices": 1,
            "tflops_per_device": cal["tflops_per_device"], "source": cal["source"]}


def add_predictions(rows: list[dict[str, Any]], jobs: list[Any], baseline_tflops: float) -> bool:
    """Predicted columns on the measured rows whose job dir also holds a plan; True if any row got them."""
    plans = {j.name: j.plan for j in jobs if getattr(j, "plan", None) and not j.summary.get("predicted")}
    for row in rows:
        plan = plans.get(row["job"])
        if plan is None:
            continue
        row.update(predicted_step_time_s=plan["step_time_s"], predicted_tokens_per_s=plan["tokens_per_s"],
                   predicted_tflops_per_device=plan["tflops_per_device"],
                   predicted_scaling_efficiency=plan["tflops_per_device"] / baseline_tflops,
                   prediction_error=plan["tokens_per_s"] / row["tokens_per_s"] - 1 if row.get("tokens_per_s")
                   else None)
    return bool(plans) and any("predicted_tokens_per_s" in r for r in rows)


def markdown_extra(rows: list[dict[str, Any]]) -> list[str]:
    """A second table: measured and predicted side by side, with the error of each prediction."""
    lines = ["", "Predicted (python -m mtlm.plan, in each job's plan/) next to measured:", "",
             "| job | devices | tokens/s measured | tokens/s predicted | error | efficiency measured "
             "| efficiency predicted |", "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "predicted_tokens_per_s" not in r:
            continue
        err = "-" if r["prediction_error"] is None else f"{100 * r['prediction_error']:+.1f}%"
        lines.append(f"| {r['job']} | {r['devices']} | {r['tokens_per_s']:,.0f} | {r['predicted_tokens_per_s']:,.0f} "
                     f"| {err} | {100 * r['scaling_efficiency']:.1f}% "
                     f"| {100 * r['predicted_scaling_efficiency']:.1f}% |")
    return lines


def title_note(jobs: list[Any]) -> str | None:
    """The label of a report made from predictions only."""
    if not all_predicted(jobs):
        return None
    clusters = sorted({j.summary.get("cluster") for j in jobs if j.ok})
    return f"PREDICTED by python -m mtlm.plan (cluster {', '.join(map(str, clusters))}), not measured"
