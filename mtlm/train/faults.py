"""Fault injection for tests of crash handling (a rank dying mid-run). Off unless the env var is set.

MTLM_FAIL_AT_STEP="RANK:STEP" makes that rank raise right after finishing STEP. With MTLM_FAIL_ONCE_FILE set,
the failure fires only while that file does not exist (and creates it), so a restarted run goes through.
MTLM_FAIL_SIGNAL=KILL makes the rank die by SIGKILL instead (no exception, no cleanup: like an OOM kill);
MTLM_FAIL_SIGNAL=STOP stops it by SIGSTOP (a frozen rank: its peers wait in their next collective).

MTLM_HOLD_AT_STEP="STEP:FILE" makes rank 0 wait after STEP until FILE exists (at most 120 s), writing
FILE.reached first: a test then acts (starts a second run, sends a signal) while the run is surely mid-way.
"""

from __future__ import annotations

import os
import signal
import time


class InjectedFailure(RuntimeError):
    pass


def maybe_fail(rank: int, step: int) -> None:
    spec = os.environ.get("MTLM_FAIL_AT_STEP")
    if not spec:
        return
    fail_rank, fail_step = (int(x) for x in spec.split(":"))
    if (rank, step) != (fail_rank, fail_step):
        return
    once = os.environ.get("MTLM_FAIL_ONCE_FILE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    if os.environ.get("MTLM_FAIL_SIGNAL") == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MTLM_FAIL_SIGNAL") == "STOP":
        print(f"rank {rank} (pid {os.getpid()}) stops itself after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise InjectedFailure(f"injected failure on rank {rank} after step {step} (MTLM_FAIL_AT_STEP)")


def maybe_hold(rank: int, step: int) -> None:
    spec = os.environ.get("MTLM_HOLD_AT_STEP")
    if not spec or rank != 0:
        return
    at, _, path = spec.partition(":")
    if int(at) != step:
        return
    open(path + ".reached", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
