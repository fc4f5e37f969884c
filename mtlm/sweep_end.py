"""The last console line of a multirun: where its jobs went and how they ended.

conf/config.yaml registers `SweepEndCallback` under hydra.callbacks, so every sweep ends with it. Hydra calls
the end callbacks in reverse order of registration, so this line comes after an experiment's own callbacks
(the scaling report). Hydra stops a sweep at its first failed job without calling any; that job's error is
then the last thing printed, and its summary.json holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mtlm.report import load_jobs


def sweep_line(sweep_dir: str | os.PathLike) -> str:
    """`sweep dir: ... | 4 jobs ok, 0 failed | lowest val_loss 3.2101 (job 2) | per job: ...`."""
    root = Path(sweep_dir)
    jobs = load_jobs(root) if root.is_dir() else []
    ok = [j for j in jobs if j.summary.get("status") == "ok"]
    failed = [j.name for j in jobs if j.summary.get("status") != "ok"]
    rel = os.path.relpath(root)
    parts = [f"sweep dir: {rel if not rel.startswith('..') else root.resolve()}",
             f"{len(ok)} job{'s' if len(ok) != 1 else ''} ok, {len(failed)} failed" +
             (f" ({', '.join(failed)})" if failed else "")]
    scored = [j for j in ok if isinstance(j.summary.get("val_loss"), int | float)]
    if scored:
        best = min(scored, key=lambda j: j.summary["val_loss"])
        parts.append(f"lowest val_loss {best.summary['val_loss']:.4f} (job {best.name})")
    kept = "summary.json, metrics.jsonl" + (", checkpoints/" if any((root / j.name / "checkpoints").is_dir()
                                                                    for j in jobs) else "")
    parts.append(f"per job: <sweep dir>/<job>/{{{kept}}}")
    if (root / "scaling.md").is_file():
        parts.append("report: scaling.md")
    return " | ".join(parts)


class SweepEndCallback(Callback):
    """hydra.callbacks entry (conf/config.yaml): prints `sweep_line` when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        print(sweep_line(str(config.hydra.sweep.dir)), flush=True)
