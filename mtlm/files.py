"""File modes. Some writers (safetensors' save_file, tempfile.mkstemp) create files 0600 whatever the umask;
checkpoints and exported models live on shared filesystems, so they get the mode a plain open() would give."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else by setting and restoring."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike) -> None:
    """Give a file the mode open() would have: 0666 less the umask (0644 under the usual 022)."""
    os.chmod(path, 0o666 & ~current_umask())
