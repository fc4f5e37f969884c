"""How a run ends, as the launching process sees it: summary.json always says why a run failed, and the
console's last line says where everything went.

Rank 0's logger writes summary.json while it trains; but a run can fail before that logger exists (a bad
library setting, a failure building the data or the model) or on another rank, whose failure stops rank 0
before it writes anything. The launching process sees every failure, so it completes the file here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtlm.checkpoint.format import latest_checkpoint


def error_line(err: BaseException) -> str:
    """One line for summary.json. A spawned rank's failure arrives as its whole traceback: its last line is
    the rank's own `Type: message`."""
    import torch.multiprocessing as mp

    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if isinstance(err, mp.ProcessRaisedException) and lines:
        return lines[-1]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def record_failure(out_dir: str | os.PathLike | None, error: str) -> None:
    """summary.json of a failed run holds `status: failed` and `error`: the failure that ended the run, as the
    launcher saw it (when rank 1 dies, rank 0 may have written its own, secondary, error: a closed connection)."""
    if out_dir is None:
        return
    path = Path(out_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        summary = {}
    summary.update(status="failed", error=error)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _short(path: str | os.PathLike) -> str:
    """Relative to the current dir when inside it (what the user typed train.py from), else absolute."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(Path(path).resolve())


def final_line(out_dir: str | os.PathLike, checkpoint: dict[str, Any]) -> str:
    """`run dir: ... | steps ... | train_loss ... | val_loss ... | tok/s | checkpoint: ...`, the last line."""
    try:
        s = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        s = {}
    parts = [f"run dir: {_short(out_dir)}"]
    for key, fmt in (("steps", "steps {}"), ("train_loss", "train_loss {:.4f}"), ("val_loss", "val_loss {:.4f}"),
                     ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}")):
        if isinstance(s.get(key), int | float):
            parts.append(fmt.format(s[key]))
    latest = latest_checkpoint(checkpoint["dir"]) if checkpoint.get("save") else None
    parts.append(f"checkpoint: {_short(latest)}" if latest is not None else
                 "checkpoint: none (checkpoint.save=false)" if not checkpoint.get("save") else "checkpoint: none")
    return " | ".join(parts)
