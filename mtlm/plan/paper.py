"""The paper's scaling numbers next to the planner's predictions (docs/planner.md's first table).

    python -m mtlm.plan.paper              # markdown on stdout; seconds, nothing runs

Every prediction is `python -m mtlm.plan` on the experiment that reproduces the study (experiments/), cluster
dgx2h_v100, whose only throughput input is the paper's 39 TFLOP/s for the 1.2B model on one V100.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mtlm.config import CONF_DIR, register_configs
from mtlm.plan.__main__ import validate_plan
from mtlm.plan.planner import make_plan

# §5.1 (../shared/reference/megatron-paper.md): 77% at 8-way tensor parallel, 74% and 15.1 PFLOP/s on 512 GPUs.
# Fig. 5's other bars and Appendix D's strong-scaling speed-ups (the 1.2B model, batch fixed) are as read from the
# paper (arXiv 1909.08053v4) and are not in the shared reference file.
WEAK_TP = {"paper_1.2b_t1": 1.00, "paper_2.5b_t2": 0.95, "paper_4.2b_t4": 0.82, "paper_8.3b_t8": 0.77}
WEAK_TP_DP = {"paper_1.2b_t1": 0.96, "paper_2.5b_t2": 0.83, "paper_4.2b_t4": 0.79, "paper_8.3b_t8": 0.74}
STRONG = {1: 1.0, 2: 1.64, 4: 2.34, 8: 2.98}
PFLOPS_512 = 15.1
IN_REFERENCE = {("weak_scaling_tp", "paper_8.3b_t8"), ("weak_scaling_tp_dp", "paper_8.3b_t8")}


def _plan(*overrides: str) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="paper"):
        cfg = compose(config_name="plan", overrides=["logger=none", "cluster=dgx2h_v100", *overrides])
    validate_plan(cfg)
    return make_plan(cfg)


def weak_rows() -> list[str]:
    lines = ["| study | model | tensor x data | GPUs | paper efficiency | predicted | difference | predicted "
             "TFLOP/s per GPU | predicted PFLOP/s |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for experiment, paper in (("weak_scaling_tp", WEAK_TP), ("weak_scaling_tp_dp", WEAK_TP_DP)):
        for scale, eff in paper.items():
            p = _plan(f"+experiment={experiment}", f"scale={scale}")
            mark = "" if (experiment, scale) in IN_REFERENCE else " (Fig. 5)"
            lines.append(f"| {experiment} | {p['model']} | {p['tensor']} x {p['data']} | {p['devices']} | "
                         f"{100 * eff:.0f}%{mark} | {100 * p['efficiency_vs_calibration']:.1f}% | "
                         f"{100 * (p['efficiency_vs_calibration'] - eff):+.1f} points | {p['tflops_per_device']:.1f} | "
                         f"{p['pflops']:.3g}" + (f" (paper {PFLOPS_512})" if p["devices"] == 512 else "") + " |")
    return lines


def grad_allreduce_rows() -> list[str]:
    """Fig. 5's model+data-parallel bars under both gradient all-reduce schedules (cluster.grad_allreduce)."""
    lines = ["| model | tensor x data | paper | overlapped (mtlm's DDP, fp32) | after_backward (2019 code, fp16) | "
             "all-reduce, after_backward (ms) of a step (ms) |", "|---|--:|--:|--:|--:|--:|"]
    for scale, eff in WEAK_TP_DP.items():
        over, after = (_plan("+experiment=weak_scaling_tp_dp", f"scale={scale}", f"cluster.grad_allreduce={mode}")
                       for mode in ("overlapped", "after_backward"))
        cells = [f"{100 * q['efficiency_vs_calibration']:.1f}% ({100 * (q['efficiency_vs_calibration'] - eff):+.1f})"
                 for q in (over, after)]
        ms = f"{1e3 * after['data_parallel_allreduce_s']:.0f} of {1e3 * after['step_time_s']:.0f}"
        lines.append(f"| {after['model']} | {after['tensor']} x {after['data']} | {100 * eff:.0f}% | {cells[0]} | "
                     f"{cells[1]} | {ms} |")
    return lines


def strong_rows() -> list[str]:
    lines = ["| GPUs | paper speed-up (App. D) | predicted | predicted step (ms): compute + tensor-parallel |",
             "|--:|--:|--:|--:|"]
    base = None
    for t, speedup in STRONG.items():
        p = _plan("+experiment=weak_scaling_tp", "scale=paper_1.2b_t1", f"parallel.tensor={t}")
        base = base or p["step_time_s"]
        parts = p["step_time_parts_s"]
        lines.append(f"| {t} | {speedup:.2f} | {base / p['step_time_s']:.2f} | {1e3 * parts['compute']:.0f} + "
                     f"{1e3 * parts['tensor_parallel']:.0f} |")
    return lines


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    print("\n".join(["Weak scaling (§5.1, Table 1 configs; efficiency against the 1.2B on 1 GPU at 39 TFLOP/s):",
                     "", *weak_rows(), "",
                     "Fig. 5's data-parallel bars under both gradient all-reduce schedules (efficiency, points off):",
                     "", *grad_allreduce_rows(), "",
                     "Strong scaling (Appendix D: the 1.2B model, batch 8, more GPUs):", "",
                     *strong_rows()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
