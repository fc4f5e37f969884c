"""One timeline per checkpoint folder, and nothing deleted that the user did not ask to delete.

A checkpoint folder holds the checkpoints of one run and of the runs that resumed it: its `latest` pointer and
the rotation of old checkpoints (checkpoint.keep) only make sense within one timeline. When a run would start
a second timeline in a folder (a fresh run, checkpoint.resume=none, into a folder that has checkpoints; or a
run resumed from elsewhere, or from an earlier step than the folder's newest), the other timeline's
checkpoints are moved aside before any rank starts, into `earlier/<date_time>/` in the same folder (with their
own `latest`, so that folder loads and resumes like any checkpoint folder), and a note says where. Only
`checkpoint.overwrite=true` deletes them instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mtlm.checkpoint.format import STEP_DIR, latest_checkpoint, step_dirs, write_json
from mtlm.rank_env import is_rank_zero


def other_timeline(root: Path, start: Path | None) -> list[Path]:
    """The step folders under `root` that are not the past of the checkpoint this run starts from: all of
    them for a fresh run or one resumed from another folder, the newer ones for one resumed from inside."""
    dirs = step_dirs(root)
    if start is None or not dirs or start.resolve().parent != root.resolve():
        return [p for _, p in dirs]
    m = STEP_DIR.match(start.name)
    first = int(m.group(1)) if m else -1
    return [p for s, p in dirs if s > first]


def aside_folder(root: Path, found: list[Path]) -> Path:
    """root/earlier/<date_time of the newest checkpoint moved>, unique."""
    newest = max(p.stat().st_mtime for p in found)
    base = root / "earlier" / time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(newest))
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    return dest


def claim_folder(ck: Any, start: Path | None) -> Path | None:
    """Before launch: move another timeline's checkpoints out of this run's way (or delete them on
    checkpoint.overwrite=true). `ck` is the checkpoint config section; `start` the checkpoint this run resumes
    from (None: a fresh run). Returns the folder they were moved to, if any."""
    if ck is None or not ck.save or not is_rank_zero():  # every rank runs the check; one moves
        return None
    root = Path(ck.dir)
    found = other_timeline(root, start)
    if not found:
        return None
    names = ", ".join(p.name for p in found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    why = "another run's checkpoints" if start is None else "checkpoints newer than the one this run resumes from"
    if getattr(ck, "overwrite", False):
        for path in found:
            shutil.rmtree(path)
        print(f"note: deleted {why} from {root}: {names} (checkpoint.overwrite=true)", file=sys.stderr, flush=True)
        dest = None
    else:
        dest = aside_folder(root, found)
        dest.mkdir(parents=True)
        for path in found:
            os.rename(path, dest / path.name)
        newest = found[-1].name
        write_json(dest / "latest", {"step": int(STEP_DIR.match(newest).group(1)), "dir": newest})
        print(f"note: moved {why} out of {root} into {dest}: {names} (load or resume them from there; "
              "checkpoint.resume=auto continues a folder's run, checkpoint.overwrite=true deletes instead of "
              "moving)", file=sys.stderr, flush=True)
    pointer = root / "latest"
    if pointer.is_file() and latest_checkpoint(root) is None:
        pointer.unlink()  # it named a checkpoint that moved; this run's first save writes a new one
    return dest
