"""Read an offline W&B run (the `.wandb` file) back into config / history / summary, for tests.

wandb 0.31 dropped its Python reader and writes no wandb-summary.json offline; everything is in
`<dir>/wandb/offline-run-*/run-*.wandb`, written by the Go core. Layout (checked against runs it wrote):
  - a 7-byte header: b":W&B", uint16 0xBEE1, uint8 version (0), little-endian;
  - LevelDB log framing in 32 KiB blocks counted from the start of the file (the header sits in block 0):
    each chunk is crc32 (uint32, zlib/IEEE over the type byte + payload), length (uint16), type (uint8:
    1 full, 2 first, 3 middle, 4 last), payload; fewer than 7 bytes left in a block are zero padding;
  - each reassembled payload is a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_wandb_file(path: str | Path) -> Path:
    """The one run-*.wandb file for a .wandb path, an offline-run dir, or a dir holding wandb/offline-run-*."""
    path = Path(path)
    if path.is_file():
        return path
    for pattern in ("run-*.wandb", "offline-run-*/run-*.wandb", "wandb/offline-run-*/run-*.wandb"):
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{len(found)} runs under {path}: pass one of {[str(f) for f in found]}")
    raise FileNotFoundError(f"no run-*.wandb under {path}")


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """Reassembled record payloads; stops quietly at a truncated tail (a run killed mid-write)."""
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"not a W&B datastore: header {data[:7]!r}")
    pos, pending = HEADER.size, None
    while True:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # trailer padding: chunks never straddle a block boundary
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        payload = data[start:start + length]
        if kind == 0 and length == 0:  # zero fill (preallocated / padded block): skip to the next block
            pos += left_in_block
            continue
        if len(payload) < length:
            return
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"crc mismatch in chunk at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            yield pending + payload
            pending = None
        else:
            raise ValueError(f"unexpected chunk type {kind} at byte {pos}")


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    for payload in iter_payloads(find_wandb_file(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _key_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _remove(d: dict, keys: list[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k, {})
    d.pop(keys[-1], None)


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value")  # newer cores may send typed values instead of JSON
    if which is None or which == "none":
        return None
    return json.loads(getattr(item, which)) if which == "json" else getattr(item, which)


def _apply(d: dict, record: Any) -> None:
    """A ConfigRecord or SummaryRecord: updates then removes, in order."""
    for item in record.update:
        _set(d, _key_path(item), json.loads(item.value_json))
    for item in record.remove:
        _remove(d, _key_path(item))


def read_offline_run(run_dir_or_wandb_file: str | Path) -> dict[str, Any]:
    """{"config", "history" (one dict per history row), "summary", "run" (id/project/...), "exit_code"}."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "run": {}, "exit_code": None}
    for record in iter_records(run_dir_or_wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {"id": run.run_id, "project": run.project, "group": run.run_group,
                          "job_type": run.job_type, "name": run.display_name, "tags": list(run.tags)}
            _apply(out["config"], run.config)
            _apply(out["summary"], run.summary)
        elif kind == "config":
            _apply(out["config"], record.config)
        elif kind == "summary":
            _apply(out["summary"], record.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _key_path(item), _history_value(item))
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
