"""No silent hangs (issue 21): a loopback or unreachable master is one line within a bound, and a rank stopped
by SIGSTOP is found by parallel.timeout_s and named (rank, host, pid) in the run's last line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlm.errors import ConfigError
from mtlm.parallel.watchdog import check_master, hosts_own_store, wait_for_store
from tests.test_resume import TINY

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nothing listens there


def test_loopback_master_is_one_line_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_master("localhost", _closed_port(), nodes_spanned=True, bound_s=30)
    assert time.monotonic() - start < 2  # found by resolving, not by waiting for the store
    line = str(info.value)
    assert "\n" not in line and line.startswith("MASTER_ADDR: localhost resolves to ")
    assert re.search(r"resolves to (127\.\d+\.\d+\.\d+|::1), a loopback address, on ", line)
    assert "/etc/hosts" in line
    check_master("localhost", _closed_port(), nodes_spanned=False, bound_s=30)  # one node: loopback is right


def test_unreachable_store_gives_up_within_the_bound() -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not answer .* within 1\.5 s") as info:
        wait_for_store("127.0.0.1", _closed_port(), 1.5)
    assert 1.5 <= time.monotonic() - start < 4
    assert "MASTER_PORT" in str(info.value) and "\n" not in str(info.value)
    with socket.socket() as server:  # a store that answers: no wait
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        wait_for_store("127.0.0.1", server.getsockname()[1], 10)
        assert time.monotonic() - start < 2


def test_rank_zero_waits_for_a_store_only_when_the_agent_hosts_it() -> None:
    """Rank 0 starts the store itself (SLURM, torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): waiting for it
    first would wait for itself until the bound (the lost-node test in tests/test_nodes.py hit that)."""
    assert hosts_own_store(0, {}) and hosts_own_store(0, {"TORCHELASTIC_USE_AGENT_STORE": "False"})
    assert not hosts_own_store(0, {"TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert not hosts_own_store(1, {}) and not hosts_own_store(1, {"TORCHELASTIC_USE_AGENT_STORE": "False"})


def _env(tmp_path: Path, **extra: str) -> dict:
    return dict(os.environ, MTLM_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
def test_train_py_on_a_second_node_with_loopback_master(tmp_path: Path) -> None:
    """A rank of a 2-node torchrun job whose MASTER_ADDR resolves to loopback: one line, exit 2, before it joins
    (so in seconds, not the store timeout)."""
    env = _env(tmp_path, RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="localhost",
               MASTER_PORT=str(_closed_port()))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "parallel.tensor=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: MASTER_ADDR: localhost resolves to ")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigstopped_rank_is_named(tmp_path: Path) -> None:
    """Rank 1 stops itself (SIGSTOP) after step 3; rank 0's next collective times out after parallel.timeout_s
    = 4 s, the heartbeats show rank 1 standing still, and the run ends (exit 1) with one line naming rank 1, its
    host and pid; the stopped process is killed, not left behind."""
    env = _env(tmp_path, MTLM_FAIL_AT_STEP="1:3", MTLM_FAIL_SIGNAL="STOP")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "parallel.tensor=2", "parallel.timeout_s=4",
                           "trainer.max_steps=8", "checkpoint.save=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    took = time.monotonic() - start
    pid = int(re.search(r"rank 1 \(pid (\d+)\) stops itself after step 3", proc.stdout).group(1))
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert line.startswith(f"error: rank 1 (host {socket.gethostname()}, pid {pid}) stopped making progress")
    assert "parallel.timeout_s=4 s" in line
    assert not os.path.exists(f"/proc/{pid}"), "the stopped rank was left behind"
    assert took < 60, f"took {took:.0f} s"
