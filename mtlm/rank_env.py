"""What a launcher told this process: torchrun's or SLURM's rank and world size, and whether it is rank 0.

Imports no torch (and nothing of mtlm), so train.py can ask "am I rank 0" before anything heavy is loaded;
mtlm/parallel/launch.py joins or spawns the ranks from what this module reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RankEnv:
    kind: str  # "local" (we spawn), "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_rank_env(environ: Mapping[str, str]) -> RankEnv | None:
    """The ranks an outside launcher started, or None when this process should spawn its own."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        return RankEnv("torchrun", int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", 0)),
                       int(environ.get("LOCAL_WORLD_SIZE", world)), environ.get("MASTER_ADDR"),
                       int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None)
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "localhost")
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return RankEnv("slurm", int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                       int(environ.get("SLURM_LOCALID", 0)),
                       int(environ.get("SLURM_NTASKS_PER_NODE", environ["SLURM_NTASKS"]).split("(")[0]),
                       environ.get("MASTER_ADDR", first_slurm_host(nodelist)),
                       int(environ.get("MASTER_PORT", 20000 + job_id % 20000)))
    return None


def env_world_size() -> int | None:
    """The world size a launcher (torchrun, SLURM) set up for us, or None when we launch ranks ourselves."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


def is_rank_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of a torchrun / SLURM job, or a process that starts its own ranks (no RANK or SLURM_PROCID set).
    Only rank 0 writes a run's outputs and prints its warnings."""
    return environ.get("RANK", environ.get("SLURM_PROCID", "0")) == "0"
