"""A local Slurm for tests (issue 21): munged, slurmctld and one slurmd per network-namespace node
(mtlm/parallel/netns.py), configured in a temporary folder, and all of it stopped and removed afterwards.

    with slurm_cluster(2) as cluster:
        subprocess.run(cluster.command(["srun", "-N", "2", "hostname"]), env=cluster.env, ...)

Client commands run on the first node (the controller's namespace): its address exists only there."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mtlm.parallel import netns

DAEMONS = ("munged", "slurmctld", "slurmd")


def why_not() -> str | None:
    """None when a local Slurm can run here, else the one-line reason to skip."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (network namespaces, daemons)"
    missing = [p for p in ("ip", "unshare", *DAEMONS, "srun", "sbatch", "scontrol", "sinfo") if shutil.which(p) is None]
    if missing:
        return f"a local Slurm needs {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)"
    return None


def slurm_version() -> str:
    return subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


@dataclass
class Cluster:
    root: Path
    nodes: list[netns.Node]
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        return netns.command(self.nodes[0].name, argv)

    def run(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.glob("*.log"))


def _conf(root: Path, nodes: list[netns.Node], cpus: int) -> str:
    head = nodes[0]
    lines = [
        "ClusterName=mtlmtest", f"SlurmctldHost={head.name}({head.addr})", "SlurmctldPort=6817", "SlurmdPort=6818",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root}/munge.sock",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin", "ReturnToService=2", "MpiDefault=none",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=10", "MinJobAge=300",
        "JobRequeue=1", "SchedulerParameters=nohold_on_prolog_fail",
        *(f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} State=UNKNOWN" for n in nodes),
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
    ]
    return "\n".join(lines) + "\n"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def ours_running(root: Path) -> list[str]:
    """Processes whose command line names our folder (daemons, job steps): none after the cluster ends."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(root) in cmd:
                    found.append(f"{d.name}: {cmd[:120]}")
    return found


@contextlib.contextmanager
def slurm_cluster(count: int = 2, cpus: int = 2) -> Iterator[Cluster]:
    prefix = f"mtlms{os.getpid() % 100000}"
    root = Path(tempfile.mkdtemp(prefix="mtlms", dir="/tmp"))  # short: the munge socket path has a 108-byte limit
    procs: list[subprocess.Popen] = []
    try:
        nodes = netns.up(count, prefix)
        (root / "state").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (root / "slurm.conf").write_text(_conf(root, nodes, cpus), encoding="utf-8")
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n", encoding="utf-8")
        env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        log = open(root / "daemons.log", "ab")  # noqa: SIM115 (closed with the cluster)
        procs.append(subprocess.Popen(["munged", "--foreground", "--force", f"--socket={root}/munge.sock",
                                       f"--key-file={key}", f"--pid-file={root}/munged.pid",
                                       f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"],
                                      stdout=log, stderr=log))
        deadline = time.monotonic() + 20
        while not (root / "munge.sock").exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, "munged did not start"
            time.sleep(0.1)
        procs.append(subprocess.Popen(netns.command(nodes[0].name, ["slurmctld", "-D", "-c", "-i", "-f",
                                                                    str(root / "slurm.conf")]),
                                      env=env, stdout=log, stderr=log))
        for node in nodes:
            # `ip netns exec` mounts a fresh /sys, without the cgroup mounts slurmd's cgroup plugin looks for:
            # mount them again, inside that command's own mount namespace only.
            cg = ("mount -t tmpfs cgroup /sys/fs/cgroup && for c in freezer cpuset memory devices; do "
                  "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done; exec \"$@\"")
            procs.append(subprocess.Popen(netns.command(node.name, ["sh", "-c", cg, "slurmd", "slurmd", "-D", "-N",
                                                                    node.name, "-f", str(root / "slurm.conf")]),
                                          env=env, stdout=log, stderr=log))
        cluster = Cluster(root, nodes, env, procs)
        deadline = time.monotonic() + 60
        while True:
            states = cluster.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=30).stdout.split()
            if len(states) == count and all(s == "idle" for s in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm not up (node states {states}):\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        _stop(procs)
        netns.down(prefix)
        shutil.rmtree(root, ignore_errors=True)
