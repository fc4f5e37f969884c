"""Two nodes on one machine (issue 21): network namespaces with their own hostnames and addresses
(mtlm/parallel/netns.py); torchrun across them trains bit for bit as one node does, over gloo on the veth
pairs, and a node lost mid-run and brought back ends the run as if nothing had happened. Everything made is
removed afterwards, and the fixture checks that. Needs root and iproute2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlm.parallel import netns
from tests.test_resume import TINY, assert_identical, losses

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "trainer.max_steps=6", "trainer.num_threads=1", "trainer.eval_iters=1", "parallel.data=2"]


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need root on Linux"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 (ip) and util-linux (unshare)"
    return None


@pytest.fixture
def nodes():
    if (why := _why_not()) is not None:
        pytest.skip(why)
    prefix = f"mtlmt{os.getpid() % 100000}"
    try:
        made = netns.up(2, prefix)
    except subprocess.CalledProcessError as err:
        netns.down(prefix)
        pytest.skip(f"cannot make network namespaces here: {err.stderr.strip()}")
    try:
        yield made
    finally:
        netns.down(prefix)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"
        assert not list(netns.NETNS_ETC.glob(f"{prefix}-*")), "files left in /etc/netns"


def test_nodes_have_their_own_names_and_addresses(nodes) -> None:
    first, second = nodes
    out = subprocess.run(netns.command(second.name, [sys.executable, "-c", (
        "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()), "
        f"socket.gethostbyname({first.name!r}))")]), capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [second.name, second.addr, first.addr], out.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_node_torchrun_equals_one_node(tmp_path: Path, nodes, one_node_run: Path) -> None:
    """data=2 with one rank per node (torchrun --nnodes 2, static rendezvous at node 1's hostname) against the
    same run's two ranks spawned on one machine: same per-step losses and same final weights and Adam state."""
    env = dict(os.environ, MTLM_CACHE_DIR=str(one_node_run / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for rank, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", nodes[0].name, "--master-port", "29400",
               "--log-dir", str(tmp_path / "torchelastic"),
               str(ROOT / "train.py"), *RUN, f"checkpoint.dir={tmp_path / 'ck2'}", f"hydra.run.dir={tmp_path / 'two'}"]
        procs.append(subprocess.Popen(netns.command(node.name, cmd), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    want, got = losses(one_node_run / "run"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 7)) and got == want
    assert_identical(one_node_run / "ck" / "step_00000006", tmp_path / "ck2" / "step_00000006")


def _wait_until(found, procs: list[subprocess.Popen], what: str, timeout: float = 180) -> None:
    """Poll `found()` until true; fail at once when a process that should live has ended."""
    deadline = time.monotonic() + timeout
    while not found():
        for p in procs:
            assert p.poll() is None, f"{p.args[3]}'s torchrun ended (status {p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)


def _kill_node(name: str) -> None:
    """What a node's power going off looks like to the others: every process in its namespace, SIGKILL."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
    for pid in (int(p) for p in pids.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lost_node_rejoins_and_run_ends_as_uninterrupted(tmp_path: Path, nodes, one_node_run: Path) -> None:
    """One torchrun per node with an elastic c10d rendezvous hosted by node 1's agent and --max-restarts 1.
    Rank 0 holds after step 4 (step 3's checkpoint is complete); every process of node 2, agent and worker, is
    killed; node 1's worker fails in its next collective and node 1's agent restarts the group, waiting in the
    rendezvous until node 2's torchrun is started again (as a scheduler brings a node back). Both workers resume
    from step 3 (checkpoint.resume=auto) and the run ends with status 0 and the uninterrupted run's per-step
    losses, weights and Adam state, bit for bit."""
    ck, hold, run = tmp_path / "ck", tmp_path / "go", tmp_path / "run"
    env = dict(os.environ, MTLM_CACHE_DIR=str(one_node_run / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               MTLM_HOLD_AT_STEP=f"4:{hold}", LOGLEVEL="INFO",  # INFO: the agents say when they restart
               # torch 2.13's agents share their rendezvous store with the workers, and the surviving rank-0 agent
               # keeps the address it published in the first round: a node's new agent then waits for it in the
               # next round's keys (never written) and both agents time out. Unshared, every round publishes anew.
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    # keep_alive 2 s x 3: the dead node's agent leaves the rendezvous after 6 s without a heartbeat (default 15)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes[0].name}:29400", "--rdzv-id", "lost-node",
           "--rdzv-conf", "keep_alive_interval=2,keep_alive_max_attempt=3", "--max-restarts", "1",
           "--log-dir", str(tmp_path / "torchelastic"),  # not a /tmp/torchelastic_* left behind
           str(ROOT / "train.py"), *RUN, "parallel.timeout_s=120", "checkpoint.interval=3", "checkpoint.resume=auto",
           f"checkpoint.dir={ck}", f"hydra.run.dir={run}"]
    logs: list[Path] = []

    def start(node: netns.Node) -> subprocess.Popen:
        logs.append(tmp_path / f"{node.name}.{len(logs)}.log")
        with logs[-1].open("w") as out:
            return subprocess.Popen(netns.command(node.name, cmd), cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)

    first, second = start(nodes[0]), start(nodes[1])
    procs = [first, second]
    try:
        _wait_until(Path(f"{hold}.reached").exists, procs, "rank 0 reached step 4")
        _kill_node(nodes[1].name)
        assert second.wait(timeout=30) == -signal.SIGKILL
        _wait_until(lambda: not subprocess.run(["ip", "netns", "pids", nodes[1].name], capture_output=True,
                                               text=True, timeout=30).stdout.strip(), [first], "node 2 emptied", 30)
        hold.touch()
        _wait_until(lambda: "will restart worker group" in logs[0].read_text(), [first], "node 1's agent restarted")
        procs.append(start(nodes[1]))  # node 2 comes back
        for p in (first, procs[2]):
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = {log.name: log.read_text() for log in logs}
    for p, log in zip((first, procs[2]), (logs[0], logs[2]), strict=True):
        assert p.returncode == 0, text[log.name][-4000:]
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in text[logs[0].name]
    resumed = [line for t in text.values() for line in t.splitlines() if line.startswith("resumed from")]
    assert resumed == [f"resumed from {ck / 'step_00000003'} at step 3"], resumed
    want = losses(one_node_run / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = [(r["step"], r["loss"]) for r in rows if "loss" in r]  # steps 1-4 of the first try, then 4-6
    assert {s for s, _ in got} == set(range(1, 7)) and all(loss == want[s] for s, loss in got), got
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and sorted(summary["hosts"]) == sorted(n.name for n in nodes)
    assert_identical(one_node_run / "ck" / "step_00000006", ck / "step_00000006")
