"""The pipeline bubble on CPU, measured against the formula (p - 1) / (v m) of SC'21 §2.2 (issue 22).

    python -m mtlm.bench --pipeline-scaling              # SMALL below, m = 2, 4, 8 (needs 2 idle cores)
    python -m mtlm.bench --pipeline-scaling --micro-batches 2 4 --layers 4 --hidden 32 --reps 1 --warmup 0

For each micro-batch count m it times one optimizer step of the real training loop (Trainer.train_step: data,
forward and backward of the m micro-batches, tied-embedding and clipping reductions, optimizer step) at
pipeline 1 (one rank, one thread) and at pipeline P = 2 with the 1F1B schedule (v = 1) and the interleaved
1F1B schedule (v = 2 model chunks per rank), two gloo ranks of one thread each. The global batch is m micro
batches, so every layout does the same micro-batches and the same arithmetic.

How the bubble is derived. With the work split evenly over P stages, a step without idle time would take
t_ideal = t_1 / P (SC'21 §2.2: each rank does 1/P of every micro-batch's forward and backward). A pipelined
step takes t_P = t_ideal + t_idle, and the paper's bubble fraction is the idle time over the ideal time:

    measured bubble = t_idle / t_ideal = (t_P - t_1 / P) / (t_1 / P) = P t_P / t_1 - 1,

to be compared with (P - 1) / (v m) (§2.2.1 for v = 1, §2.2.2 for the interleaved schedule). Everything that
is not the schedule's idle time but still makes t_P exceed t_1 / P also lands in the measured number, so it is
an upper bound of the schedule's bubble: the point-to-point sends between stages (and their serialization
over gloo), the imbalance between stages (the last one also runs the output layer and the loss, which is why
SMALL has a small vocabulary and more layers than the default shape), the tied-embedding all-reduce and the
step's per-rank fixed costs (batch loading, the loss broadcast). The interleaved schedule sends v times as
many messages, so on CPU its gain shows best at small m.

The timing is interleaved as in tp_scaling.py: rank 0 also holds the pipeline-1 trainer and runs its step on
its one thread while rank 1 waits at a barrier, then both ranks run each pipelined step; a pipelined step is
as slow as its slower rank (max over ranks). No process start-up or import time is counted.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from mtlm.bench.speed import Shape, compose_config
from mtlm.parallel.launch import RankEnv, launch
from mtlm.parallel.pipeline import bubble_fraction
from mtlm.parallel.state import ParallelState
from mtlm.train.loop import Trainer

# Many thin layers and a small vocabulary: the stages are nearly equal (the head is on the last stage only).
SMALL = Shape(hidden=256, layers=8, heads=8, seq=128, batch=2, vocab=512)
MICRO_BATCHES = (2, 4, 8)
LAYOUTS = ((2, 1, "1f1b"), (2, 2, "interleaved_1f1b"))  # (pipeline, virtual stages, schedule)


def _config(shape: Shape, micro_batches: int, pipeline: int = 1, virtual: int = 1, schedule: str = "1f1b") -> Any:
    """compose_config's fp32 config at this layout, with a global batch of `micro_batches` micro-batches."""
    return compose_config(shape, "fp32", overrides=[f"trainer.global_batch_size={micro_batches * shape.batch}",
                                                     f"parallel.pipeline={pipeline}",
                                                     f"parallel.virtual_stages={virtual}",
                                                     f"parallel.schedule={schedule}"])


def _time(step, barrier: bool) -> float:
    if barrier:
        dist.barrier()
    start = time.perf_counter()
    step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if barrier:  # a pipelined step is as slow as its slowest rank
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _rank(env: RankEnv, shape: dict, micro: list[int], layouts: list, reps: int, warmup: int, timeout_s: float,
          out: str) -> None:
    torch.set_num_threads(1)
    pipeline = layouts[0][0]
    state = ParallelState.initialize(1, 1, env.rank, env.world_size, torch.device("cpu"), "gloo", timeout_s,
                                     pipeline=pipeline)
    s, times = Shape(**shape), {}
    try:
        for m in micro:
            single = Trainer(_config(s, m), ParallelState(), None, {}) if state.is_main else None
            piped = [Trainer(_config(s, m, p, v, name), state, None, {}) for p, v, name in layouts]
            t1, tp = [], [[] for _ in layouts]
            for _ in range(warmup + reps):
                dist.barrier()
                if single is not None:
                    t1.append(_time(single.train_step, barrier=False))
                for trainer, acc in zip(piped, tp, strict=True):
                    acc.append(_time(trainer.train_step, barrier=True))
            times[m] = {"t1": t1[warmup:], "tp": [acc[warmup:] for acc in tp]}
            del single, piped
            gc.collect()
        if state.is_main:
            with open(out, "w") as f:
                json.dump(times, f)
    finally:
        state.destroy()


def bench_pipeline(shape: Shape = SMALL, micro_batches: tuple[int, ...] = MICRO_BATCHES,
                   layouts: tuple[tuple[int, int, str], ...] = LAYOUTS, reps: int = 5, warmup: int = 1,
                   timeout_s: float = 1800.0) -> dict[str, Any]:
    """Median step time of each layout at each m, the measured bubble P t_P / t_1 - 1 and the formula."""
    pipelines = {p for p, _, _ in layouts}
    if len(pipelines) != 1:
        raise ValueError(f"layouts: one pipeline degree per run (the ranks share one grid), got {sorted(pipelines)}")
    pipeline = pipelines.pop()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        launch(_rank, pipeline, (asdict(shape), list(micro_batches), [list(x) for x in layouts], reps, warmup,
                                 timeout_s, out))
        with open(out) as f:
            times = {int(m): v for m, v in json.load(f).items()}
    rows = []
    for m in micro_batches:
        t1 = statistics.median(times[m]["t1"])
        rows.append({"pipeline": 1, "virtual": 1, "schedule": "-", "micro_batches": m, "step_s": t1,
                     "ideal_s": t1, "measured": None, "formula": bubble_fraction(1, 1, m)})
        for (p, v, name), tp_all in zip(layouts, times[m]["tp"], strict=True):
            tp = statistics.median(tp_all)
            rows.append({"pipeline": p, "virtual": v, "schedule": name, "micro_batches": m, "step_s": tp,
                         "ideal_s": t1 / p, "measured": p * tp / t1 - 1, "formula": bubble_fraction(p, v, m)})
    return {"shape": asdict(shape), "reps": reps, "warmup": warmup, "load_before": load_before,
            "load_after": os.getloadavg()[0], "rows": rows}


def format_pipeline(r: dict[str, Any]) -> str:
    """A markdown table, one row per (layout, m); the pipeline-1 row is each m's reference t_1."""
    s = r["shape"]
    lines = [f"pipeline bubble: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, seq {s['seq']}, "
             f"micro batch {s['batch']}, vocab {s['vocab']} | fp32, one thread per rank, gloo | median of "
             f"{r['reps']} interleaved repetitions after {r['warmup']} warm-up; load average "
             f"{r['load_before']:.2f} -> {r['load_after']:.2f}",
             "",
             "| P | v | schedule | m | step (s) | ideal t_1/P (s) | measured bubble P t_P/t_1 - 1 | (P-1)/(v m) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        measured = "(reference)" if row["measured"] is None else f"{row['measured']:.3f}"
        lines.append(f"| {row['pipeline']} | {row['virtual']} | {row['schedule']} | {row['micro_batches']} | "
                     f"{row['step_s']:.3f} | {row['ideal_s']:.3f} | {measured} | {row['formula']:.3f} |")
    return "\n".join(lines)
