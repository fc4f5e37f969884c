"""Run a function on N gloo ranks of this machine and collect each rank's return value.

    results = run_ranks(fn, 2, arg)   # fn(state: ParallelState, *args) -> picklable, one entry per rank

Each rank gets one compute thread and a short collective timeout, and the whole call has a deadline, so a
hang fails the test in seconds instead of blocking CI.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from mtlm.parallel.launch import free_port
from mtlm.parallel.state import ParallelState


def _entry(rank: int, fn: Callable, world: int, tensor: int, port: int, out: str, args: tuple,
           pipeline: int = 1, sequence: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state = ParallelState.initialize(tensor, world // (tensor * pipeline), rank, world, torch.device("cpu"), "gloo",
                                     20.0, pipeline=pipeline, sequence=sequence)
    try:
        result = fn(state, *args)
        torch.save({"ok": result}, os.path.join(out, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out, f"{rank}.pt"))
        raise
    finally:
        state.destroy()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, tensor: int | None = None, pipeline: int = 1,
              sequence: bool = False, timeout: float = 120.0) -> list[Any]:
    """fn runs on `world` ranks laid out as tensor x data x pipeline, data = world // (tensor x pipeline)
    (default: all tensor-parallel)."""
    tensor = world // pipeline if tensor is None else tensor
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(fn, world, tensor, free_port(), out, args, pipeline, sequence),
                                 nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return [res["ok"] for res in results]
