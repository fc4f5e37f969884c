"""Nodes on one machine: Linux network namespaces, each with its own hostname and an address that exists only
inside the namespaces, joined by a bridge; for trying and testing the multi-node recipes (torchrun --nnodes,
srun -N) without a cluster. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2.

    sudo python -m mtlm.parallel.netns up 2          # namespaces mtlm-node1, mtlm-node2 (10.213.0.1, .2)
    sudo python -m mtlm.parallel.netns run mtlm-node2 -- hostname   # a command on a node: prints mtlm-node2
    sudo python -m mtlm.parallel.netns down          # removes the namespaces and their /etc/netns files

Layout: a hub namespace (PREFIX-hub) holds a bridge; each node namespace (PREFIX-nodeI) has `eth0`, one end of
a veth pair whose other end is on the bridge, with address SUBNET.I/24, and `lo`. Nothing is created in the
machine's own namespace, so no packet ever leaves the namespaces. `ip netns exec` bind-mounts
/etc/netns/NAME/hosts over /etc/hosts, which names every node; `run` also gives the command its own UTS
namespace with the node's hostname, so socket.gethostname() is the node's name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Node:
    name: str  # the namespace, also the node's hostname
    addr: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def ours(prefix: str) -> list[str]:
    """The namespaces a set with this prefix made (nodes and hub)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n == f"{prefix}-hub" or n.startswith(f"{prefix}-node")]


def up(count: int, prefix: str = "mtlm", subnet: str = "10.213.0") -> list[Node]:
    """Make `count` nodes (removing a set of the same prefix first). On a failure, removes what it made."""
    down(prefix)
    nodes = [Node(f"{prefix}-node{i}", f"{subnet}.{i}") for i in range(1, count + 1)]
    hub = f"{prefix}-hub"
    try:
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in nodes)
        for i, node in enumerate(nodes, start=1):
            _ip("netns", "add", node.name)
            _ip("-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", node.name)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", node.name, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.name, "link", "set", "eth0", "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
            (NETNS_ETC / node.name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / node.name / "hosts").write_text(hosts, encoding="utf-8")
    except BaseException:
        down(prefix)
        raise
    return nodes


def down(prefix: str = "mtlm") -> None:
    """Kill what runs in the set's namespaces, delete them and their /etc/netns files."""
    for name in ours(prefix):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
        for pid in (int(p) for p in pids.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             timeout=30).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    for path in NETNS_ETC.glob(f"{prefix}-node*") if NETNS_ETC.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)


def command(node: str, argv: list[str]) -> list[str]:
    """argv run on `node`: in its network namespace, with its /etc/hosts and its hostname."""
    return ["ip", "netns", "exec", node, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', node, *argv]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtlm.parallel.netns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="mtlm", help="namespace name prefix (default: mtlm)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="make N nodes").add_argument("count", type=int)
    sub.add_parser("down", help="remove the nodes")
    r = sub.add_parser("run", help="run a command on a node")
    r.add_argument("node")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "up":
        for node in up(args.count, args.prefix):
            print(f"{node.name} {node.addr}")
        return 0
    if args.cmd == "down":
        down(args.prefix)
        return 0
    rest = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return subprocess.run(command(args.node, rest)).returncode


if __name__ == "__main__":
    sys.exit(main())
