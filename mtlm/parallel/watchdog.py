"""No silent hangs (issue 21): check the master before joining a group that spans nodes, and name the rank
that stopped making progress when a collective times out.

- Before joining: with several nodes, MASTER_ADDR must not resolve to a loopback address (a hostname that
  /etc/hosts maps to 127.0.1.1, common in containers, sends every node to itself) and its store must answer
  within a bounded time; otherwise one line naming the address, what it resolved to and how to fix it, instead
  of a wait for the whole store timeout and a timeout from inside torch.
- While training: each rank's heartbeat thread bumps a counter in the rendezvous store. When a collective times
  out (parallel.timeout_s), the rank that saw it reads every rank's counter twice: a rank whose counter stands
  still is stopped (SIGSTOP), frozen or gone with its node, and the run ends with one line naming it and its host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch.distributed as dist

from mtlm.errors import ConfigError

BEAT_S = 0.5  # heartbeat period; a rank is stuck when its counter does not move in 4 periods


class RankHung(RuntimeError):
    """A collective timed out and a peer rank is found stuck; `str(err)` is the one line to show."""


def loopback_of(addr: str, port: int, resolve: Callable = socket.getaddrinfo) -> str | None:
    """The loopback address `addr` resolves to, or None (ConfigError when it does not resolve at all)."""
    try:
        found = [info[4][0] for info in resolve(addr, port, type=socket.SOCK_STREAM)]
    except socket.gaierror as err:
        raise ConfigError("MASTER_ADDR", f"{addr} does not resolve on {socket.gethostname()} ({err.strerror}): "
                          "set MASTER_ADDR to the master node's address as the other nodes see it") from None
    loop = [a for a in found if ipaddress.ip_address(a.split("%")[0]).is_loopback]
    return loop[0] if loop else None


def wait_for_store(addr: str, port: int, bound_s: float) -> None:
    """Connect to the rendezvous store, retrying (its host may start later) until `bound_s` has passed."""
    deadline = time.monotonic() + bound_s
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((addr, port), timeout=min(left, 5.0)):
                return
        except OSError as err:
            last = err
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    why = last.strerror or type(last).__name__ if last is not None else "no answer"
    raise ConfigError("MASTER_ADDR", f"the store at {addr}:{port} did not answer {socket.gethostname()} within "
                      f"{bound_s:g} s ({why}): check that rank 0's node runs, that MASTER_ADDR / MASTER_PORT are "
                      "the same on every node and that the port is open between the nodes")


def hosts_own_store(rank: int, environ: Mapping[str, str]) -> bool:
    """Whether this rank starts the rendezvous store itself, so must not wait for it before joining: rank 0
    does (env:// init) under SLURM, a hand-set RANK / WORLD_SIZE, and torchrun when its agent does not share its
    own store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which a lost node needs: docs/clusters.md); only under a
    sharing agent (TORCHELASTIC_USE_AGENT_STORE=True) is rank 0's store already up."""
    return rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def check_master(addr: str | None, port: int | None, nodes_spanned: bool, bound_s: float) -> None:
    """Before a rank of a multi-node job joins: the master is not loopback, and its store answers in time."""
    if not nodes_spanned or addr is None or port is None:
        return
    if (loop := loopback_of(addr, port)) is not None:
        raise ConfigError("MASTER_ADDR", f"{addr} resolves to {loop}, a loopback address, on "
                          f"{socket.gethostname()}, but this job spans several nodes: each node would wait for "
                          "a master on itself. Set MASTER_ADDR to the master node's IP address, or map its name "
                          "to that address in /etc/hosts or DNS (not to 127.x)")
    wait_for_store(addr, port, bound_s)


def _looks_like_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or "timed out" in text or "timeout" in text


class Heartbeat:
    """A daemon thread that bumps this rank's counter in the rendezvous store every BEAT_S seconds, through a
    client of its own (a store client is not shared between threads)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=min(timeout_s, 10.0)))
        self.store.set(f"mtlm/who/{rank}", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mtlm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(f"mtlm/beat/{self.rank}", 1)
            except Exception:  # the store went away (its host ended): nothing left to report to
                return

    def stop(self) -> None:
        self._stop.set()

    def _counters(self, store: dist.TCPStore) -> list[int]:
        return [store.add(f"mtlm/beat/{r}", 0) for r in range(self.world_size)]

    def diagnose(self, err: BaseException) -> str | None:
        """After `err` on this rank: one line naming the stuck ranks, or None when it was no timeout or every
        rank still beats (then the original error says more)."""
        if self.world_size == 1 or not _looks_like_timeout(err):
            return None
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=5))
            before = self._counters(store)
            time.sleep(4 * BEAT_S)
            after = self._counters(store)
        except Exception:
            return (f"a collective timed out after parallel.timeout_s={self.timeout_s:g} s and the rendezvous store "
                    f"at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} does not answer either: the rank "
                    "that hosts it (rank 0, or torchrun's agent) is stopped, hung or lost with its node")
        stuck = [r for r in range(self.world_size) if after[r] == before[r] and r != self.rank]
        if not stuck:
            return None
        names = []
        for r in stuck:
            try:
                who = json.loads(store.get(f"mtlm/who/{r}"))
                names.append(f"rank {r} (host {who['host']}, pid {who['pid']})")
            except Exception:
                names.append(f"rank {r}")
        return (f"{', '.join(names)} stopped making progress: a collective timed out after parallel.timeout_s="
                f"{self.timeout_s:g} s and its heartbeat stands still (stopped by SIGSTOP, frozen, or its node "
                "lost); the run ends here: start it again with checkpoint.resume=auto")
