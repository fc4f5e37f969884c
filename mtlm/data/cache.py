"""The on-disk cache: where it lives, how entries are keyed, and atomic writes.

Layout: <cache root>/<key>/ holding tokenizer.model (only when trained here), train.npy, val.npy and
meta.json. meta.json is written last, so its presence means the entry is complete. Every file is written
to a temporary name in the same directory and moved into place with os.replace, so concurrent writers
(several launches at once) never expose a half-written file; they just write identical files twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

# Bump when the tokenizer settings or token file layout change, so old entries are not reused.
FORMAT_VERSION = 2  # 2: the tokenizer reserves [CLS] [SEP] [MASK] (issue 14)
DEFAULT_CACHE_DIR = "~/.cache/mtlm"


def cache_root(cache_dir: str | None) -> str:
    """The cache root: $MTLM_CACHE_DIR if set (tests, clusters with shared scratch), else data.cache_dir."""
    root = os.environ.get("MTLM_CACHE_DIR") or cache_dir or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(root))


def cache_key(fields: dict) -> str:
    """A short stable hash of everything that determines the cached files."""
    blob = json.dumps({"version": FORMAT_VERSION, **fields}, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tmp_in(path: str) -> tuple[int, str]:
    """A new temporary file next to `path` (same filesystem, so os.replace is atomic)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others
    return fd, tmp


def atomic_write_bytes(path: str, data: bytes) -> None:
    fd, tmp = tmp_in(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    fd, tmp = tmp_in(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def content_hash(kind: str, files: Sequence[str], settings: str = "") -> str:
    """A tokenizer's identity: sha256 over its type, the settings that change its output (WordPiece's
    lower-casing) and the bytes of each file, in order. Copies of the same files hash the same wherever they
    lie; another tokenizer of the same size does not (issue 25: a same-size sentencepiece model was accepted
    and evaluate reported perplexity 17,095 instead of 140)."""
    h = hashlib.sha256(f"{kind}\0{settings}\0".encode())
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
