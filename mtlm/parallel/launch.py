"""Starting the ranks: spawn them here, or join the ones torchrun / SLURM started.

- `python train.py parallel.tensor=2 parallel.data=2`: one Hydra job spawns tensor x data ranks on this
  machine (torch.multiprocessing), so there is one output dir and one W&B run however many ranks there are.
- `torchrun --nproc-per-node N train.py ...`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* are set; join them.
- SLURM (srun, or hydra-submitit-launcher with tasks_per_node=N): SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID; the master is the first host of the job's node list.

A failure on any spawned rank stops the others (torch.multiprocessing terminates them) and its traceback is
shown, so a crash never turns into a hang.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.multiprocessing as mp

from mtlm.errors import ConfigError
from mtlm.parallel import preempt
from mtlm.parallel.denormals import flush_denormals

# What torchrun / SLURM told this process lives in the torch-free mtlm/rank_env.py; its names are re-exported.
from mtlm.rank_env import RankEnv as RankEnv
from mtlm.rank_env import detect_rank_env as detect_rank_env
from mtlm.rank_env import env_world_size as env_world_size
from mtlm.rank_env import first_slurm_host as first_slurm_host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(local_world_size: int, requested: int | None) -> int:
    """Each rank gets its share of the cores, so N ranks on N cores do not oversubscribe."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size)


def _spawned_entry(local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    flush_denormals()  # first, before torch starts this rank's thread pool (parallel/denormals.py)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(RankEnv("local", local_rank, world, local_rank, world, "127.0.0.1", port), *args)


def uses_cuda(device: str) -> bool:
    """Whether a rank with trainer.device `device` (auto | cpu | cuda) runs on a GPU."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), max_restarts: int = 0,
           on_restart: Callable[[int, Exception], tuple] | None = None, device: str = "auto") -> None:
    """Run fn(rank_env, *args) on every rank: in this process, in spawned processes, or as an outside rank.

    `args` must be picklable (pass plain containers, not DictConfig) when ranks are spawned.

    A single rank runs in this process on CPU, but in a child process when `device` is a GPU: a Hydra
    multirun calls launch once per job from one process, and only a process's exit is sure to hand back all
    the device memory a job held (the caching allocator's blocks, CUDA tensors in module-level caches or
    reference cycles) and to start the allocator's peak statistics (peak_memory_bytes) from zero.

    `max_restarts` > 0 (ranks we spawn): when a rank dies (exception, signal, OOM kill), all ranks are
    started again, up to that many times, with the args `on_restart(attempt, error)` returns (train.py:
    resume from the latest checkpoint). Even a single rank then runs in a child process, so a hard death
    is survivable. Ranks of torchrun / SLURM are restarted by that launcher (`torchrun --max-restarts`).
    """
    flush_denormals()  # this process computes too when it is a rank (a no-op if the entry point did it already)
    env = detect_rank_env(os.environ)
    if env is not None:
        if env.master_addr is not None:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        fn(env, *args)
        return
    if world_size == 1 and max_restarts == 0 and not uses_cuda(device):
        fn(RankEnv("local", 0, 1, 0, 1), *args)
        return
    for attempt in range(max_restarts + 1):
        try:
            # "spawn", not "fork": the parent has already run torch / sentencepiece thread pools.
            _spawn_and_join(fn, world_size, args)
            return
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            if attempt == max_restarts or preempt.received():  # told to stop: no restart
                raise
            args = on_restart(attempt + 1, err) if on_restart is not None else args


def _spawn_and_join(fn: Callable[..., Any], world_size: int, args: tuple) -> None:
    ctx = mp.start_processes(_spawned_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                             join=False, start_method="spawn")
    # SIGTERM / SIGUSR1 to this process goes on to every rank, which finishes its step and saves (preempt.py).
    previous = preempt.install(lambda: [p.pid for p in ctx.processes if p.is_alive()])
    killed: list[int] = []
    try:
        while True:
            alive = [p.sentinel for p in ctx.processes if p.exitcode is None]
            ready = wait(alive, timeout=1.0) if alive else []
            for p in ctx.processes:
                if p.sentinel in ready:
                    p.join(timeout=5)  # its pipe closes a moment before it can be reaped: its exit code
            killed += _kill_stopped_after_failure(ctx.processes)
            if ctx.join(timeout=0):
                return
    except mp.ProcessRaisedException as err:
        raise _root_cause(ctx, err) from None
    except mp.ProcessExitedException as err:
        if err.error_index in killed:  # we killed it because it was stopped: report the rank that failed
            raise _root_cause(ctx, err) from None
        raise
    finally:
        preempt.restore(previous)


def _kill_stopped_after_failure(processes: list) -> list[int]:
    """Once a rank has failed, SIGKILL the ranks that are stopped (SIGSTOP, state T): torch's own clean-up
    would send them SIGTERM, which waits while they are stopped, and SIGKILL only 30 s later. Returns the
    indices of the ranks killed."""
    if not any(p.exitcode not in (None, 0) for p in processes):
        return []
    killed = []
    for i, p in enumerate(processes):
        try:
            with open(f"/proc/{p.pid}/stat", encoding="ascii") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("T", "t") and p.exitcode is None:
            p.kill()
            p.join(timeout=10)
            killed.append(i)
    return killed


def _root_cause(ctx: mp.ProcessContext, err: Exception) -> Exception:
    """When one rank dies, its peers fail too (a collective with a dead peer), and torch reports whichever
    exit it noticed first. Report the rank whose error was written first: the one that started it."""
    written = [(os.stat(path).st_mtime_ns, i) for i, path in enumerate(ctx.error_files) if os.access(path, os.R_OK)]
    if not written:
        return err
    first = min(written)[1]
    if first == err.error_index:
        return err
    with open(ctx.error_files[first], "rb") as fh:
        trace = pickle.load(fh)  # written by torch.multiprocessing in our own child process
    msg = f"\n\n-- Process {first:d} terminated with the following error:\n{trace}"
    return mp.ProcessRaisedException(msg, first, ctx.processes[first].pid)


def cuda_index(local_rank: int, visible: int, local_world_size: int | None = None) -> int:
    """Which of the CUDA devices this process sees is its own.

    - It sees exactly one: the launcher bound a GPU to this task (SLURM `--gpus-per-task=1`, `--gpu-bind`,
      cgroup-constrained devices, a per-rank CUDA_VISIBLE_DEVICES): that one, `cuda:0`, whatever its local
      rank is.
    - It sees at least one per local rank (torchrun, our own spawn, SLURM `--gpus-per-node` / `--gres` without
      binding): the local rank's.
    - Otherwise (some GPUs, fewer than the node's ranks) the binding is ambiguous: an error, not a guess."""
    if visible == 1:
        return 0
    if local_rank < visible and (local_world_size is None or visible >= local_world_size):
        return local_rank
    ranks = f" of {local_world_size} on this node" if local_world_size is not None else ""
    raise RuntimeError(
        f"local rank {local_rank}{ranks} sees {visible} CUDA devices (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): bind exactly one GPU per task "
        "(SLURM --gpus-per-task=1) or make every GPU of the node visible to every rank")


def rank_device(cfg_device: str, local_rank: int, local_world_size: int | None = None) -> torch.device:
    if not uses_cuda(cfg_device):
        return torch.device("cpu")
    index = cuda_index(local_rank, torch.cuda.device_count(), local_world_size)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(backend: str, device: torch.device) -> str:
    """parallel.backend: `auto` is NCCL for ranks on CUDA devices and gloo otherwise; gloo and nccl as given."""
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend_config(p: Any) -> None:
    """parallel.backend and parallel.timeout_s (called by mtlm.checks.validate)."""
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError("parallel.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    if p.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", f"must be > 0, got {p.timeout_s}")
