"""Stop signals: a run told to stop (SIGTERM, or SLURM's warning signal SIGUSR1) finishes its step on every
rank, saves a checkpoint and exits, instead of dying mid-step and losing everything since its last save.

- A rank's handler only records the signal. After each step the ranks agree (one all-reduce of one integer,
  MAX over the world), so they all stop after the same step even when the signal reached them at different
  moments, or reached only some of them.
- The local launcher (we spawned the ranks) forwards the signal to its ranks; torchrun's agent does that
  itself (SIGTERM, then SIGKILL after 30 s); SLURM signals every task of the step.
- SIGUSR1 is the warning SLURM sends when asked (`--signal=USR1@120`: 120 s before the time limit or a
  preemption). Under SLURM, rank 0 then asks SLURM to requeue the job (`scontrol requeue $SLURM_JOB_ID`); the
  requeued job resumes with `checkpoint.resume=auto`. On SIGTERM (scancel, the time limit itself, SLURM's own
  preempt-requeue, `scontrol requeue`) a run saves and exits but asks for nothing: whoever sent it decides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # the first stop signal this process got (a list: set from a signal handler)
_stopped: list[int] = []  # the step a trainer in this process stopped after, on a signal


def received() -> int:
    """The stop signal this process received (its number), or 0."""
    return _received[0] if _received else 0


def _record(signum: int, frame: object) -> None:
    if not _received:
        _received.append(signum)


def install(forward_to: Callable[[], Iterable[int]] | None = None) -> dict[int, object]:
    """Record stop signals in this process (and send them on to the pids `forward_to()` names). Returns the
    previous handlers, for `restore`. Main thread only, as any signal handler."""

    def handler(signum: int, frame: object) -> None:
        _record(signum, frame)
        for pid in forward_to() if forward_to is not None else ():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    if threading.current_thread() is not threading.main_thread():
        return {}  # Python runs signal handlers in the main thread only; a run in another thread keeps the defaults
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def reset() -> None:
    """Forget a received signal (a Hydra multirun runs several jobs in one process)."""
    _received.clear()
    _stopped.clear()


def mark_stopped(step: int) -> None:
    """The trainer in this process stopped after `step`, before its last step, on a stop signal."""
    _stopped.append(step)


def stopped_step() -> int | None:
    return _stopped[-1] if _stopped else None


def agree(world_size: int, device: torch.device) -> int:
    """Collective over the whole world: the stop signal any rank received, or 0."""
    if world_size == 1:
        return received()
    flag = torch.tensor([received()], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def exit_status(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: not 0, since the run did not
    finish, and what schedulers and wrappers expect of a job that was told to stop."""
    return 128 + signum


def requeue_slurm_job(signum: int, environ: dict[str, str] | None = None) -> str | None:
    """After SLURM's warning signal (SIGUSR1) under SLURM: `scontrol requeue $SLURM_JOB_ID`. Returns a line to
    print, or None when there is nothing to do (another signal, not under SLURM)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if signum != signal.SIGUSR1 or not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err}): resubmit it with checkpoint.resume=auto"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (f"could not requeue SLURM job {job} ({why[-1] if why else f'exit {done.returncode}'}): resubmit "
                "it with checkpoint.resume=auto (sbatch --requeue allows requeueing)")
    return f"requeued SLURM job {job}: it resumes from this checkpoint with checkpoint.resume=auto"
