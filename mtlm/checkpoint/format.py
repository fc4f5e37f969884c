"""The on-disk checkpoint format: an index of logical tensors in JSON, their slices in per-rank safetensors.

A *logical* tensor is the whole, unpadded tensor a single process would hold: `model.<param name>`, or
`optim.<param name>.<state key>` (Adam's exp_avg / exp_avg_sq are sharded like their parameter, its step
count is replicated). Every parameter carries `partition_dim` (mtlm.parallel.layers): a tensor-parallel rank
holds one contiguous range along it, so a checkpoint saved at one tensor degree is read at another by taking
different ranges (the fused qkv rows are grouped by head, so any range of whole heads is contiguous).

The embedding's vocabulary is padded to a multiple of 128 x tensor degree, a size that depends on the degree,
so only the real rows are stored and a reader fills its padded rows with zeros (they are zero in training
too: their logits are -inf, so they never get a gradient, and weight decay keeps zero at zero).

    metadata.json["tensors"]["model.wte.weight"] = {"shape": [300, 64], "dtype": "float32", "partition_dim": 0,
        "shards": [{"file": "rank00000.safetensors", "start": 0, "stop": 256},
                   {"file": "rank00001.safetensors", "start": 256, "stop": 300}]}

Reading never unpickles anything: tensors come from safetensors, everything else is JSON. A reader opens each
file lazily and reads only the byte ranges of the slices it needs (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtlm.errors import CheckpointError as CheckpointError  # re-exported: the format's own error
from mtlm.files import respect_umask

FORMAT = "mtlm-checkpoint"
VERSION = 1
METADATA = "metadata.json"
STEP_DIR = re.compile(r"step_(\d+)$")
PADDED_VOCAB = ("wte.weight", "lm_head.bias")  # parameters whose partition dim is the padded vocabulary


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class Slice:
    """Where a rank's local tensor sits in its logical tensor."""

    shape: tuple[int, ...]  # the logical (whole, unpadded) shape
    dim: int | None = None  # partition dim; None: replicated, the rank holds all of it
    start: int = 0  # this rank's range [start, stop) along dim, clipped to the logical size
    stop: int = 0
    local: int = 0  # the local extent along dim, padding included (>= stop - start)

    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        return self.shape[:self.dim] + (self.local,) + self.shape[self.dim + 1:]


def param_slice(name: str, local_shape: torch.Size | tuple[int, ...], partition_dim: int | None, tensor: int,
                tp_rank: int, vocab_size: int) -> Slice:
    """The slice of parameter `name` held by tensor rank `tp_rank` of `tensor` (vocab padding cut off)."""
    shape = tuple(local_shape)
    if partition_dim is None:
        return Slice(shape)
    n = shape[partition_dim]
    full = vocab_size if name in PADDED_VOCAB else n * tensor
    start = min(tp_rank * n, full)
    stop = min(start + n, full)
    return Slice(shape[:partition_dim] + (full,) + shape[partition_dim + 1:], partition_dim, start, stop, n)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk: a rename is only durable after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write, fsync, then rename into place: readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class RankShard:
    """The slices one rank writes: one safetensors file plus the index entries that describe it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: dict[str, dict] = {}
        self.metadata: dict[str, str] = {}  # safetensors' own str -> str header (the RNG's non-tensor parts)

    def add(self, name: str, local: torch.Tensor, sl: Slice) -> None:
        part = local.detach()
        if sl.dim is not None:
            if sl.stop <= sl.start:
                return  # this rank's whole range is vocabulary padding
            part = part.narrow(sl.dim, 0, sl.stop - sl.start)
        self.tensors[name] = part.cpu().contiguous()
        self.index[name] = {"shape": list(sl.shape), "dtype": _dtype_name(part.dtype), "partition_dim": sl.dim,
                            "start": sl.start, "stop": sl.stop if sl.dim is not None else 0}

    def write(self, directory: Path) -> int:
        """Write and fsync the file; returns its size in bytes (recorded, so truncation is detected)."""
        path = directory / self.file
        save_file(self.tensors, str(path), metadata=self.metadata or None)
        respect_umask(path)  # safetensors creates it 0600; checkpoints are shared
        fsync_path(path)
        return path.stat().st_size


def merge_index(parts: list[tuple[str, int, dict]]) -> tuple[dict, dict]:
    """Every rank's (file, size, index) -> (metadata["files"], metadata["tensors"])."""
    files: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    for file, size, index in parts:
        files[file] = {"bytes": size}
        for name, e in index.items():
            entry = tensors.setdefault(name, {"shape": e["shape"], "dtype": e["dtype"],
                                              "partition_dim": e["partition_dim"], "shards": []})
            entry["shards"].append({"file": file, "start": e["start"], "stop": e["stop"]})
    for entry in tensors.values():
        entry["shards"].sort(key=lambda s: s["start"])
    return files, tensors


def read_metadata(directory: str | os.PathLike) -> dict:
    """Parse and sanity-check a checkpoint's metadata.json, and that every listed file is there, whole.

    Cheap (JSON and stat calls only). Raises CheckpointError naming the file at fault.
    """
    directory = Path(directory)
    path = directory / METADATA
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so {directory} is not a complete mtlm checkpoint")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupted JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mtlm checkpoint (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')}, this mtlm reads {VERSION}")
    for key in ("step", "consumed_samples", "model", "layout", "files", "tensors"):
        if key not in meta:
            raise CheckpointError(f"{path}: corrupted: no {key!r} entry")
    for file, info in meta["files"].items():
        fp = directory / file
        if not fp.is_file():
            raise CheckpointError(f"{fp}: missing shard file (listed in {path})")
        size = fp.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{fp}: truncated or overwritten: {size} bytes on disk, {path} records "
                                  f"{info.get('bytes')}")
    for name, entry in meta["tensors"].items():
        for shard in entry.get("shards", []):
            if shard.get("file") not in meta["files"]:
                raise CheckpointError(f"{path}: corrupted: {name} points to unlisted file {shard.get('file')!r}")
    return meta


def check_shard_headers(directory: str | os.PathLike, meta: dict) -> None:
    """Open every shard file's header (no tensor data) and check it holds each indexed slice, shape included."""
    directory = Path(directory)
    expected: dict[str, dict[str, list[int]]] = {file: {} for file in meta["files"]}
    for name, entry in meta["tensors"].items():
        for shard in entry["shards"]:
            shape = list(entry["shape"])
            if entry["partition_dim"] is not None:
                shape[entry["partition_dim"]] = shard["stop"] - shard["start"]
            expected[shard["file"]][name] = shape
    for file, names in expected.items():
        path = directory / file
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for name, shape in names.items():
                    if name not in keys:
                        raise CheckpointError(f"{path}: has no tensor {name} (listed in {METADATA})")
                    if f.get_slice(name).get_shape() != shape:
                        raise CheckpointError(f"{path}: {name} has shape {f.get_slice(name).get_shape()}, "
                                              f"{METADATA} records {shape}")
        except SafetensorError as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


class ShardReader:
    """Assembles any rank's slice of a logical tensor from the shards that overlap it."""

    def __init__(self, directory: str | os.PathLike, meta: dict) -> None:
        self.dir = Path(directory)
        self.meta = meta
        self._files: dict[str, Any] = {}

    def open(self, file: str) -> Any:
        if file not in self._files:
            try:
                self._files[file] = safe_open(str(self.dir / file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{self.dir / file}: unreadable safetensors file ({err})") from None
        return self._files[file]

    def _get(self, file: str, name: str, dim: int | None = None, lo: int = 0, hi: int = 0) -> torch.Tensor:
        try:
            f = self.open(file)
            if dim is None:
                return f.get_tensor(name)
            return f.get_slice(name)[(slice(None),) * dim + (slice(lo, hi),)]
        except SafetensorError as err:
            raise CheckpointError(f"{self.dir / file}: cannot read {name} ({err})") from None

    def entry(self, name: str) -> dict:
        entry = self.meta["tensors"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.dir / METADATA}: no tensor {name} in this checkpoint")
        return entry

    def state_keys(self, param_name: str) -> list[str]:
        """The optimizer-state keys stored for a parameter (e.g. exp_avg, exp_avg_sq, step)."""
        prefix = f"optim.{param_name}."
        return [n[len(prefix):] for n in self.meta["tensors"] if n.startswith(prefix)]

    def read(self, name: str, sl: Slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's slice `sl` of logical tensor `name` (CPU), padded rows zero."""
        entry = self.entry(name)
        if tuple(entry["shape"]) != sl.shape or entry["partition_dim"] != sl.dim:
            raise CheckpointError(f"{self.dir / METADATA}: {name} has shape {tuple(entry['shape'])} split on dim "
                                  f"{entry['partition_dim']}, this model needs {sl.shape} split on dim {sl.dim}")
        dtype = dtype or getattr(torch, entry["dtype"])
        if sl.dim is None:
            return self._get(entry["shards"][0]["file"], name).to(dtype)
        out = torch.zeros(sl.local_shape(), dtype=dtype)
        covered = 0
        for shard in entry["shards"]:
            lo, hi = max(shard["start"], sl.start), min(shard["stop"], sl.stop)
            if lo < hi:
                part = self._get(shard["file"], name, sl.dim, lo - shard["start"], hi - shard["start"])
                out.narrow(sl.dim, lo - sl.start, hi - lo).copy_(part)
                covered += hi - lo
        if covered != sl.stop - sl.start:
            raise CheckpointError(f"{self.dir / METADATA}: the shards of {name} cover {covered} of rows "
                                  f"[{sl.start}, {sl.stop}) on dim {sl.dim}: a shard is missing")
        return out

    def read_full(self, name: str) -> torch.Tensor:
        """The whole logical tensor (conversion tools and load_model; training never calls this)."""
        entry = self.entry(name)
        shape, dim = tuple(entry["shape"]), entry["partition_dim"]
        if dim is None:
            return self.read(name, Slice(shape))
        return self.read(name, Slice(shape, dim, 0, shape[dim], shape[dim]))


# ---- a checkpoint folder: committed step folders and the `latest` pointer ---------------------------------


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_NNNNNNNN folder under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `root/latest` names, or None when the folder holds none."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{pointer}: corrupted pointer ({err!r})") from None
        if (root / name / METADATA).is_file():
            return root / name
    # No pointer yet, or its target is being replaced by a save of the same step (two renames, not one):
    # the newest complete checkpoint is the right answer in both cases.
    complete = [p for _, p in step_dirs(root) if (p / METADATA).is_file()]
    return complete[-1] if complete else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder itself, or the latest checkpoint of a checkpoint folder."""
    path = Path(path)
    if (path / METADATA).is_file() or STEP_DIR.match(path.name):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint there")
    return found


def commit(root: Path, staging: Path, name: str, step: int,
           crash_point: Callable[[str, int], None] = lambda point, step: None) -> None:
    """Make a complete staging folder the checkpoint root/name and point `latest` at it (atomic renames)."""
    final = root / name
    trash = None
    if final.exists():  # an earlier run's checkpoint of this step: moved aside, deleted once replaced
        trash = root / f".trash-{name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(staging, final)
    fsync_path(root)
    crash_point("before_pointer", step)
    write_json(root / "latest", {"step": step, "dir": name})
    crash_point("after_pointer", step)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
