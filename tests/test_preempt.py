"""Stop signals (issue 21): SIGTERM to train.py's launcher or to torchrun, and SLURM's SIGUSR1 warning, make
every rank finish its step, save and exit with 128 + the signal; resuming ends bit-equal to an uninterrupted
run. The SLURM requeue call is tested against a stand-in `scontrol` on PATH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlm.checkpoint.format import latest_checkpoint, read_metadata
from mtlm.parallel import preempt
from tests.test_nodes import RUN
from tests.test_resume import assert_identical, losses

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path, **extra: str) -> dict:
    return dict(os.environ, MTLM_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", **extra)


def _cmd(cwd: Path, name: str, *overrides: str, torchrun: bool = False) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    return [*head, str(ROOT / "train.py"), *RUN, *overrides,
            f"hydra.run.dir={cwd / name}"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher,sig", [("local", signal.SIGUSR1), ("torchrun", signal.SIGTERM)])
def test_stop_signal_saves_and_resume_is_bit_equal(tmp_path: Path, one_node_run: Path, launcher: str,
                                                   sig: signal.Signals) -> None:
    """Rank 0 holds after step 3; the signal goes to the launcher (train.py, or torchrun's agent), which passes
    it on; both ranks finish the step, step 3 is saved, the run exits 128 + signal. checkpoint.resume=auto
    then runs to step 6 and ends with the uninterrupted run's loss, weights and Adam state, bit for bit."""
    ck, hold = tmp_path / "ck", tmp_path / "go"
    torchrun = launcher == "torchrun"
    proc = subprocess.Popen(_cmd(tmp_path, "stopped", f"checkpoint.dir={ck}", torchrun=torchrun), cwd=tmp_path,
                            env=_env(one_node_run / "cache", MTLM_HOLD_AT_STEP=f"3:{hold}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(Path(f"{hold}.reached"), proc)
        proc.send_signal(sig)
        time.sleep(1.0)  # the launcher passes it on; rank 0 sees it while it holds
        hold.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if not torchrun:  # torchrun's agent reports the signal its own way (it exits non-zero too)
        assert proc.returncode == 128 + sig, err[-3000:]
    else:
        assert proc.returncode != 0
    assert f"{sig.name}: every rank finished step 3, checkpoint saved; stopping" in out, out[-2000:] + err[-2000:]
    assert read_metadata(latest_checkpoint(ck))["step"] == 3
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["stopped_by"] == sig.name

    done = subprocess.run(_cmd(tmp_path, "resumed", f"checkpoint.dir={ck}", "checkpoint.resume=auto"),
                          cwd=tmp_path, env=_env(one_node_run / "cache"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 3" in done.stdout
    want, got = losses(one_node_run / "run"), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6] and got == {s: want[s] for s in (4, 5, 6)}
    assert_identical(one_node_run / "ck" / "step_00000006", ck / "step_00000006")


def test_requeue_only_on_slurm_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 under SLURM calls `scontrol requeue $SLURM_JOB_ID` (a stand-in scontrol records its argv);
    SIGTERM, or no SLURM job, calls nothing; a refusal is one line saying how to resume."""
    log = tmp_path / "argv"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n[ \"$2\" != 13 ] || {{ echo 'Job is not requeueable' >&2; "
                    "exit 1; }\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert preempt.requeue_slurm_job(signal.SIGUSR1, {"SLURM_JOB_ID": "42"}) == \
        "requeued SLURM job 42: it resumes from this checkpoint with checkpoint.resume=auto"
    assert preempt.requeue_slurm_job(signal.SIGTERM, {"SLURM_JOB_ID": "42"}) is None
    assert preempt.requeue_slurm_job(signal.SIGUSR1, {}) is None
    line = preempt.requeue_slurm_job(signal.SIGUSR1, {"SLURM_JOB_ID": "13"})
    assert line.startswith("could not requeue SLURM job 13 (Job is not requeueable)") and "\n" not in line
    assert log.read_text().splitlines() == ["requeue 42", "requeue 13"]
    assert preempt.exit_status(signal.SIGTERM) == 143 and preempt.exit_status(signal.SIGUSR1) == 138


def test_install_outside_the_main_thread_keeps_the_defaults() -> None:
    """signal.signal raises outside the main thread: a run started from another thread keeps the defaults."""
    import threading

    got: list = []
    worker = threading.Thread(target=lambda: got.append(preempt.install()))
    worker.start()
    worker.join(timeout=30)
    assert got == [{}] and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
