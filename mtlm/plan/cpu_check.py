"""Predicted vs measured on this machine: docs/planner.md's CPU table.

    python -m mtlm.plan.cpu_check --out multirun/plan_check [--reps 2] [--table-only] [--set issue23]

Runs train.py on each layout (weak_scaling_cpu's tensor 1 and 2, and three more), then `python -m mtlm.plan`
with the same overrides into <run dir>/plan/, and prints tokens/s measured and predicted with the error and the
machine's load. Uses the cpu_local calibration point (the first plan on a machine measures it). A CPU
shared with other work measures slow and noisy: read the load column.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ["+experiment=weak_scaling_cpu", "logger=none"]
LAYOUTS: dict[str, list[str]] = {
    "t1 (weak_scaling_cpu job 0)": ["scale=cpu_t1"],
    "t2 (weak_scaling_cpu job 1)": ["scale=cpu_t2"],
    "t1, data 2": ["scale=cpu_t1", "parallel.data=2", "trainer.global_batch_size=16", "trainer.max_steps=20"],
    "t2, activation checkpointing": ["scale=cpu_t2", "trainer.activation_checkpointing=true", "trainer.max_steps=20"],
    "t1, micro-batch 4 (2 accumulated), sgd": ["scale=cpu_t1", "trainer.micro_batch_size=4", "optimizer=sgd",
                                               "trainer.max_steps=20"],
}

# Issue 23: shapes and layouts the calibration did not see (hidden 512, micro-batch 2-8, tensor 2, data 2,
# pipeline 2 with m = 2 and 8); at most 2 ranks each. Measure them on idle cores only (docs/planner.md).
LAYOUTS_ISSUE23: dict[str, list[str]] = {
    "h256, micro-batch 2 (4 accumulated)": ["scale=cpu_t1", "trainer.micro_batch_size=2", "trainer.max_steps=20"],
    "h256, tensor 2": ["scale=cpu_t1", "parallel.tensor=2", "trainer.max_steps=20"],
    "h512, micro-batch 8": ["scale=cpu_t1", "model.hidden_size=512", "trainer.max_steps=20"],
    "h512, tensor 2, micro-batch 4": ["scale=cpu_t1", "model.hidden_size=512", "parallel.tensor=2",
                                      "trainer.micro_batch_size=4", "trainer.max_steps=20"],
    "h512, data 2, micro-batch 4": ["scale=cpu_t1", "model.hidden_size=512", "parallel.data=2",
                                    "trainer.micro_batch_size=4", "trainer.max_steps=20"],
    "h256, pipeline 2, m 2": ["scale=cpu_t1", "parallel.pipeline=2", "trainer.micro_batch_size=4",
                              "trainer.max_steps=20"],
    "h256, pipeline 2, m 8": ["scale=cpu_t1", "parallel.pipeline=2", "trainer.micro_batch_size=1",
                              "trainer.max_steps=20"],
}
SETS = {"default": LAYOUTS, "issue23": LAYOUTS_ISSUE23}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(out: Path, reps: int, layouts: dict[str, list[str]]) -> None:
    for rep in range(1, reps + 1):
        for name, overrides in layouts.items():
            run_dir = out / f"rep{rep}" / _slug(name)
            args = [*BASE, *overrides]
            subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], check=True)
            subprocess.run([sys.executable, "-m", "mtlm.plan", *args, "cluster=cpu_local",
                            f"hydra.run.dir={run_dir / 'plan'}"], check=True, capture_output=True)


def table(out: Path) -> str:
    lines = ["| layout | repetition | load (1 min) | tokens/s measured | tokens/s predicted | error |",
             "|---|--:|--:|--:|--:|--:|"]
    for run_dir in sorted(out.glob("rep*/*")):
        summary, plan = run_dir / "summary.json", run_dir / "plan" / "plan.json"
        if not (summary.is_file() and plan.is_file()):
            continue
        s, p = json.loads(summary.read_text()), json.loads(plan.read_text())
        name = next((n for n in (*LAYOUTS, *LAYOUTS_ISSUE23) if _slug(n) == run_dir.name), run_dir.name)
        lines.append(f"| {name} | {run_dir.parent.name[3:]} | {s.get('load_avg_1m') or 0:.1f} | "
                     f"{s['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | "
                     f"{100 * (p['tokens_per_s'] / s['tokens_per_s'] - 1):+.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlm.plan.cpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="multirun/plan_check", help="where the runs go")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="only print the table of runs already there")
    parser.add_argument("--set", choices=sorted(SETS), default="default", help="which layouts (issue23: new shapes)")
    args = parser.parse_args(argv)
    if not args.table_only:
        run(Path(args.out), args.reps, SETS[args.set])
    print(table(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
