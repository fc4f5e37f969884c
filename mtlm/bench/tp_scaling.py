"""Strong scaling of tensor parallelism on CPU: one step at tensor degree t (t ranks, one thread each, gloo)
against the same step at degree 1 on one thread. Efficiency = T1 / (t x Tt); 1.0 is perfect.

The two are timed alternately in the same processes: rank 0 also holds a degree-1 copy of the model and
runs its step on its one thread while the other ranks wait at a barrier, then all ranks run the degree-t
step. So both see the same machine load, and no process start-up or import time is counted.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from mtlm.bench.speed import Shape, compose_config, mtlm_step
from mtlm.parallel.launch import RankEnv, launch
from mtlm.parallel.state import ParallelState

WIDE = Shape(hidden=1024, layers=4, heads=16, seq=256, batch=8, vocab=8192)


def _rank(env: RankEnv, shape: dict, precision: str, tensor: int, reps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    state = ParallelState.initialize(tensor, 1, env.rank, env.world_size, torch.device("cpu"), "gloo", 1800.0)
    try:
        s = Shape(**shape)
        parallel = mtlm_step(compose_config(s, precision, tensor=tensor), state)
        single = mtlm_step(compose_config(s, precision, tensor=1), ParallelState()) if state.is_main else None
        t1: list[float] = []
        tt: list[float] = []
        cpu: dict[str, list[float]] = {"t1": [], "tt": []}  # rank 0's CPU seconds: far below wall = shared cores
        for _ in range(warmup + reps):
            dist.barrier()
            if single is not None:
                start, cpu_start = time.perf_counter(), time.process_time()
                single()
                t1.append(time.perf_counter() - start)
                cpu["t1"].append(time.process_time() - cpu_start)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            parallel()
            cpu["tt"].append(time.process_time() - cpu_start)
            # The step is as slow as its slowest rank.
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            tt.append(elapsed.item())
        if state.is_main:
            with open(out, "w") as f:
                json.dump({"t1": t1[warmup:], "tt": tt[warmup:], "t1_cpu": cpu["t1"][warmup:],
                           "tt_cpu": cpu["tt"][warmup:]}, f)
    finally:
        state.destroy()


def bench_tp_scaling(shape: Shape = WIDE, tensor: int = 2, precision: str = "fp32", reps: int = 5,
                     warmup: int = 1) -> dict[str, Any]:
    """Median step times at degree 1 and `tensor`, and the strong-scaling efficiency T1 / (t x Tt)."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        launch(_rank, tensor, (asdict(shape), precision, tensor, reps, warmup, out))
        with open(out) as f:
            times = json.load(f)
    t1, tt = statistics.median(times["t1"]), statistics.median(times["tt"])
    paired = [a / (tensor * b) for a, b in zip(times["t1"], times["tt"], strict=True)]
    flops = shape.flops_per_step()
    return {"shape": asdict(shape), "precision": precision, "tensor": tensor, "reps": reps,
            "warmup": warmup, "load_before": load_before, "load_after": os.getloadavg()[0],
            "t1_s": t1, "tt_s": tt, "t1_all": times["t1"], "tt_all": times["tt"],
            "t1_cpu_s": statistics.median(times["t1_cpu"]), "tt_cpu_s_rank0": statistics.median(times["tt_cpu"]),
            "t1_tflops": flops / t1 / 1e12, "tt_tflops_per_rank": flops / tt / tensor / 1e12,
            "efficiency": t1 / (tensor * tt), "efficiency_paired_min": min(paired),
            "efficiency_paired_max": max(paired)}


def format_tp_scaling(r: dict[str, Any]) -> str:
    s, t = r["shape"], r["tensor"]
    return "\n".join([
        f"tensor-parallel strong scaling: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, "
        f"seq {s['seq']}, batch {s['batch']}, vocab {s['vocab']} | {r['precision']}, one thread per rank, gloo",
        f"  median of {r['reps']} interleaved repetitions after {r['warmup']} warm-up; load average "
        f"{r['load_before']:.2f} -> {r['load_after']:.2f}",
        f"  tensor 1 (1 thread)            {r['t1_s']:8.3f} s/step  {r['t1_tflops']:.4f} TFLOP/s  "
        f"(CPU {r['t1_cpu_s']:.3f} s)",
        f"  tensor {t} ({t} ranks x 1 thread) {r['tt_s']:8.3f} s/step  {r['tt_tflops_per_rank']:.4f} TFLOP/s per rank  "
        f"(rank 0 CPU {r['tt_cpu_s_rank0']:.3f} s; it waits in collectives, so wall > CPU; much more: shared cores)",
        f"  strong-scaling efficiency T1 / ({t} x T{t}): {100 * r['efficiency']:.1f}% (per repetition "
        f"{100 * r['efficiency_paired_min']:.1f}..{100 * r['efficiency_paired_max']:.1f}%)",
    ])
