"""Two nodes on one machine (issue 21): network namespaces with their own hostnames and addresses
(mtlm/parallel/netns.py); torchrun across them trains bit for bit as one node does, over gloo on the veth
pairs. Everything made is removed afterwards, and the fixture checks that. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
               str(ROOT / "train.py"), *RUN, f"checkpoint.dir={tmp_path / 'ck2'}", f"hydra.run.dir={tmp_path / 'two'}"]
        procs.append(subprocess.Popen(netns.command(node.name, cmd), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    want, got = losses(one_node_run / "run"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 7)) and got == want
    assert_identical(one_node_run / "ck" / "step_00000006", tmp_path / "ck2" / "step_00000006")
