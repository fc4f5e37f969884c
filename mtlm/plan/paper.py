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
# SC'21 Table 1 (../shared/reference/scale-out.md): scale file -> (GPUs, TFLOP/s per GPU, PFLOP/s), Eq. 3 FLOPs.
SC21 = {"sc21_1.7b": (32, 137, 4.4), "sc21_3.6b": (64, 138, 8.8), "sc21_7.5b": (128, 142, 18.2),
        "sc21_18.4b": (256, 135, 34.6), "sc21_39.1b": (512, 138, 70.8), "sc21_76.1b": (1024, 140, 143.8),
        "sc21_145.6b": (1536, 148, 227.1), "sc21_310.1b": (1920, 155, 297.4), "sc21_529.6b": (2520, 163, 410.2),
        "sc21_1008b": (3072, 163, 502.0)}
SC21_CALIBRATION = "sc21_1.7b"  # conf/cluster/selene_a100.yaml's one throughput input
IN_REFERENCE = {("weak_scaling_tp", "paper_8.3b_t8"), ("weak_scaling_tp_dp", "paper_8.3b_t8")}


def _plan(*overrides: str, cluster: str = "dgx2h_v100") -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="paper"):
        cfg = compose(config_name="plan", overrides=["logger=none", f"cluster={cluster}", *overrides])
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


def eq3_tflops(plan: dict[str, Any]) -> float:
    """The plan's per-GPU rate in SC'21's units: its Eq. 3 FLOPs (the recompute counted) over the step."""
    return plan["hardware_flops_per_step"] / (plan["step_time_s"] * plan["devices"] * 1e12)


def sc21_rows() -> list[str]:
    lines = ["| model | tensor x pipeline x data | GPUs | batch | paper TFLOP/s per GPU | predicted | "
             "difference | paper PFLOP/s | predicted | "
             "predicted step (s): compute + tensor-parallel + bubble + p2p + data-parallel |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for scale, (gpus, tflops, pflops) in SC21.items():
        p = _plan("+experiment=sc21_table1", f"scale={scale}", cluster="selene_a100")
        assert p["devices"] == gpus, (scale, p["devices"])
        rate, parts = eq3_tflops(p), p["step_time_parts_s"]
        agg = p["hardware_flops_per_step"] / p["step_time_s"] / 1e15
        mark = " (calibration)" if scale == SC21_CALIBRATION else ""
        steps = " + ".join(f"{parts[k]:.2f}" for k in ("compute", "tensor_parallel", "pipeline_bubble",
                                                         "pipeline_p2p", "data_parallel_exposed"))
        lines.append(f"| {p['model']}{mark} | {p['tensor']} x {p['pipeline']} x {p['data']} | {gpus} | "
                     f"{p['global_batch_size']} | {tflops} | {rate:.1f} | {100 * (rate / tflops - 1):+.1f}% | "
                     f"{pflops} | {agg:.1f} | {steps} |")
    return lines


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    print("\n".join(["Weak scaling (§5.1, Table 1 configs; efficiency against the 1.2B on 1 GPU at 39 TFLOP/s):",
                     "", *weak_rows(), "",
                     "Fig. 5's data-parallel bars under both gradient all-reduce schedules (efficiency, points off):",
                     "", *grad_allreduce_rows(), "",
                     "Strong scaling (Appendix D: the 1.2B model, batch 8, more GPUs):", "",
                     *strong_rows(), "", "SC'21 Table 1 on selene_a100 (calibrated on row 1 only; Eq. 3 FLOPs):",
                     "", *sc21_rows()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
