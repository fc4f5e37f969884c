"""One writer per checkpoint folder (issue 21): the lock itself, and two train.py runs started into one folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlm.checkpoint.format import latest_checkpoint, read_metadata
from mtlm.errors import CheckpointError
from mtlm.train.writer_lock import LOCK_NAME, WriterLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.seq_length=32", "model.max_position_embeddings=32",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.vocab_size=512", "logger=none",
        "trainer.log_interval=1", "trainer.eval_interval=1000", "trainer.eval_iters=1", "trainer.num_threads=1"]


def test_second_holder_gets_one_line_naming_the_first(tmp_path: Path) -> None:
    first = WriterLock(tmp_path / "ck", tmp_path / "run_a").acquire()
    with pytest.raises(CheckpointError) as info:
        WriterLock(tmp_path / "ck", tmp_path / "run_b").acquire()  # flock: a second open conflicts, same process too
    line = str(info.value)
    assert "\n" not in line and str(tmp_path / "ck") in line
    assert f"host {socket.gethostname()}, pid {os.getpid()}, run dir {tmp_path / 'run_a'}" in line
    assert "checkpoint.dir" in line and "wait" in line
    first.release()
    assert not (tmp_path / "ck" / LOCK_NAME).exists()  # a clean end leaves the folder as it was
    with WriterLock(tmp_path / "ck"):  # free again
        assert json.loads((tmp_path / "ck" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A holder killed by SIGKILL leaves its file behind but no lock: the next run takes the folder."""
    code = ("import sys, time; from mtlm.train.writer_lock import WriterLock; "
            f"WriterLock({str(tmp_path / 'ck')!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"pid {proc.pid}"):
            WriterLock(tmp_path / "ck").acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (tmp_path / "ck" / LOCK_NAME).exists()
    WriterLock(tmp_path / "ck").acquire().release()


def _train(cwd: Path, cache: Path, name: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    run_env = dict(os.environ, MTLM_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={cwd / name}"]
    return subprocess.Popen(cmd, cwd=cwd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path: Path) -> None:
    """Run A (lr 1e-3) holds its step-3 position while run B (lr 2e-3) starts into the same folder: B stops
    before spawning with one line naming the folder and A (host, pid, run dir), exit 2; A then finishes and
    the folder holds only A's checkpoints (nothing moved aside, no staging leftovers)."""
    cache, ck, hold = tmp_path / "cache", tmp_path / "ck", tmp_path / "go"
    common = ["trainer.max_steps=6", "checkpoint.interval=3", f"checkpoint.dir={ck}"]
    a = _train(tmp_path, cache, "a", *common, "optimizer.lr=1e-3", env={"MTLM_HOLD_AT_STEP": f"3:{hold}"})
    try:
        _wait_for(Path(f"{hold}.reached"), a)
        b = _train(tmp_path, cache, "b", *common, "optimizer.lr=2e-3", "parallel.tensor=2")
        out, err = b.communicate(timeout=180)
        assert b.returncode == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("checkpoint error: ") and str(ck) in line
        assert f"host {socket.gethostname()}, pid {a.pid}, run dir {tmp_path / 'a'}" in line
        assert "saved checkpoint" not in out and not (tmp_path / "b" / "metrics.jsonl").exists()
        hold.touch()
        out, err = a.communicate(timeout=180)
    finally:
        a.kill()
    assert a.returncode == 0, err[-3000:]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000003", "step_00000006"]
    meta = read_metadata(latest_checkpoint(ck))
    assert meta["step"] == 6 and meta["config"]["optimizer"]["lr"] == 1e-3
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 6
