"""Finding the per-tensor-rank files of a legacy Megatron-LM checkpoint, in a folder or in a released zip.

    <root>/latest_checkpointed_iteration.txt            "release" or an iteration number
    <root>/release/mp_rank_00/model_optim_rng.pt        one folder per tensor rank
    <root>/iter_0001000/mp_rank_01/model_optim_rng.pt
    <root>/iter_0001000/mp_rank_01_000/model_optim_rng.pt   (with pipeline parallelism: tensor, pipeline rank)

SRC may be <root>, one iteration folder, one `.pt` file, or a zip holding any of these (NVIDIA's NGC zips:
`release/mp_rank_00/model_optim_rng.pt`). Nothing is extracted to disk: zip members are read into memory.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mtlm.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
ITERATION_DIR = re.compile(r"(release|iter_\d+)$")
PREFERRED = ("model_optim_rng.pt", "model_rng.pt")


@dataclass
class RankFile:
    """One tensor rank's file: a name for messages and a way to get its bytes (or path)."""

    name: str
    read: Callable[[], bytes | Path]


def _is_torch_zip(names: list[str]) -> bool:
    """A torch.save file in the zip format is itself a zip (`<name>/data.pkl`), not a checkpoint archive."""
    return any(n.endswith("/data.pkl") for n in names) and not any(RANK_DIR.match(PurePosixPath(n).parent.name)
                                                                    for n in names)


def _pick_file(folder: str, files: list[str], label: str) -> str:
    by_name = {PurePosixPath(f).name: f for f in files}
    for name in PREFERRED:
        if name in by_name:
            return by_name[name]
    if len(files) == 1:
        return files[0]
    raise CheckpointError(f"{label}: {folder} holds several .pt files ({', '.join(sorted(by_name))}) and none "
                          f"is {PREFERRED[0]}")


def _select(paths: list[str], read_text: Callable[[str], str | None], label: str) -> list[str]:
    """From every `.../mp_rank_*/X.pt` path, the tensor ranks' files of the iteration the tracker names."""
    groups: dict[str, dict[tuple[int, int], list[str]]] = {}
    for p in paths:
        pp = PurePosixPath(p)
        m = RANK_DIR.match(pp.parent.name)
        if m:
            groups.setdefault(str(pp.parent.parent), {}).setdefault((int(m[1]), int(m[2] or 0)), []).append(p)
    if not groups:
        raise CheckpointError(f"{label}: no mp_rank_*/model_optim_rng.pt found: not a Megatron-LM checkpoint")
    if len(groups) > 1:
        roots = {str(PurePosixPath(g).parent) for g in groups}
        trackers = {r: read_text(str(PurePosixPath(r) / TRACKER)) for r in roots}
        named = [str(PurePosixPath(r) / _iteration_dir(t.strip(), label)) for r, t in trackers.items() if t]
        chosen = [g for g in groups if g in named]
        if len(chosen) != 1:
            raise CheckpointError(f"{label}: several checkpoints ({', '.join(sorted(groups))}) and no {TRACKER} "
                                  f"naming one of them; pass the folder of the one to convert")
        group = groups[chosen[0]]
    else:
        group = next(iter(groups.values()))
    if any(pp > 0 for _, pp in group):
        raise CheckpointError(f"{label}: pipeline-parallel checkpoint (mp_rank_XX_001 and up): mtlm imports "
                              "tensor-parallel checkpoints only; merge the pipeline stages with Megatron-LM first")
    ranks = sorted(tp for tp, _ in group)
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{label}: tensor rank folder mp_rank_{missing[0]:02d} is missing")
    return [_pick_file(str(PurePosixPath(group[(tp, 0)][0]).parent), group[(tp, 0)], label) for tp in ranks]


def _iteration_dir(tracker: str, label: str) -> str:
    if tracker == "release":
        return "release"
    if tracker.isdigit():
        return f"iter_{int(tracker):07d}"
    raise CheckpointError(f"{label}: {TRACKER} says {tracker!r}, expected 'release' or an iteration number")


def rank_files(src: str | Path) -> list[RankFile]:
    """The files of each tensor rank, rank 0 first. Raises CheckpointError naming SRC when it is not one."""
    src = Path(src)
    label = str(src)
    if src.is_dir():
        paths = [p.relative_to(src).as_posix() for p in src.glob("**/mp_rank_*/*.pt")]
        if (src / TRACKER).is_file():  # a checkpoint root: follow its tracker, as Megatron-LM does
            tracker = (src / TRACKER).read_text(encoding="utf-8").strip()
            wanted = _iteration_dir(tracker, label)
            paths = [p for p in paths if p.startswith(wanted + "/")]
            if not paths:
                raise CheckpointError(f"{src / TRACKER}: names {tracker!r} but {src / wanted} has no "
                                      "mp_rank_*/*.pt files")

        def text(rel: str) -> str | None:
            f = src / rel
            return f.read_text(encoding="utf-8") if f.is_file() else None

        return [RankFile(str(src / p), lambda p=p: src / p) for p in _select(paths, text, label)]
    if not src.is_file():
        raise CheckpointError(f"{label}: no such file or folder")
    if not zipfile.is_zipfile(src):
        return [RankFile(label, lambda: src)]  # one .pt file (legacy torch format): a single tensor rank
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
    if _is_torch_zip(names):
        return [RankFile(label, lambda: src)]  # one .pt file in torch's zip format

    def member_text(rel: str) -> str | None:
        rel = rel.removeprefix("./")
        if rel not in names:
            return None
        with zipfile.ZipFile(src) as z:
            return z.read(rel).decode("utf-8")

    def member(rel: str) -> bytes:
        with zipfile.ZipFile(src) as z:
            return z.read(rel)

    pts = [n for n in names if n.endswith(".pt")]
    trackers = [n for n in names if PurePosixPath(n).name == TRACKER]
    if len(trackers) == 1:  # a released zip: follow its tracker, as Megatron-LM would
        root = str(PurePosixPath(trackers[0]).parent)
        wanted = str(PurePosixPath(root) / _iteration_dir((member_text(trackers[0]) or "").strip(), label))
        pts = [n for n in pts if str(PurePosixPath(n).parent.parent) == wanted] or pts
    return [RankFile(f"{label}:{n}", lambda n=n: member(n)) for n in _select(pts, member_text, label)]
