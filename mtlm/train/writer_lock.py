"""One writer per checkpoint folder: a run holds an OS lock on `checkpoint.dir/.writer.lock` for its whole life.

Two runs writing into one folder break each other (one moves the other's timeline aside, replaces its staging
folder mid-save, and which run's checkpoints the folder ends with is a race: issue 21). The lock is
`flock(2)` on a file in the folder: the kernel drops it when the holding process dies, however it dies, so a
killed run never leaves a stale lock. The file also says who holds it (host, pid, run dir), for the one-line
refusal the second run prints before it spawns anything.

Where it holds: on a local filesystem, always. On NFS (v3 with lockd, v4) Linux turns flock into a POSIX lock
the server sees, so runs on different nodes exclude each other too. Lustre needs its `flock` mount option
(without it the call fails and we warn instead of pretending); other shared filesystems vary, and where the
call succeeds without the server knowing (local-only lock mounts) two nodes are not excluded.

Readers (load_model, evaluate, generate, conversion from a checkpoint) take no lock: a checkpoint becomes
visible only by an atomic rename of a complete folder (checkpoint/format.py `commit`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from mtlm.errors import CheckpointError

LOCK_NAME = ".writer.lock"


def _holder(path: Path) -> str:
    """'host H, pid P, run dir D' from the lock file, or what is known."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"host {info['host']}, pid {info['pid']}, run dir {info.get('run_dir') or 'none'}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


class WriterLock:
    """`with WriterLock(folder, run_dir):` holds the folder for the block; CheckpointError if another holds it."""

    def __init__(self, folder: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> None:
        self.folder, self.run_dir = Path(folder), run_dir
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(
                        f"{self.folder} is being written by another run ({_holder(self.path)}): give this run "
                        "another checkpoint.dir, wait for that run to end, or stop it (its lock goes with its "
                        "process)") from None
                # ENOLCK / ENOSYS / EINVAL: a filesystem without locks (Lustre without -o flock): say so, go on.
                print(f"warning: cannot lock {self.path} ({os.strerror(err.errno)}): nothing stops another run "
                      "from writing into this checkpoint.dir at the same time", file=sys.stderr, flush=True)
                return self
            # The holder before us may have unlinked the file between our open and our lock: lock the file
            # that is at the path now, or our lock guards nothing.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "run_dir": str(Path(self.run_dir).resolve()) if self.run_dir else None}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it re-checks the inode and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
