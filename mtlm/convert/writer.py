"""Write whole (unsharded, unpadded) tensors as an mtlm checkpoint at any tensor degree.

Every importer ends here: it maps a foreign format's tensors to mtlm's parameter names and layouts, then
this writes the shards `tensor` training ranks would have written (each rank's slice along the parameter's
`partition_dim`, the vocabulary cut to its real size), the metadata that `train.py checkpoint.resume=...`,
`load_model` and the evaluation tools read, and commits the folder as `latest -> step_00000000`. The Hugging
Face importers read their folder's tensors here too (read_hf_safetensors).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mtlm.api import model_config
from mtlm.checkpoint.format import (
    FORMAT,
    METADATA,
    PADDED_VOCAB,
    VERSION,
    CheckpointError,
    RankShard,
    ShardReader,
    commit,
    find_checkpoint,
    merge_index,
    param_slice,
    rank_file,
    read_metadata,
    write_json,
)
from mtlm.data.hf_tokenizers import check_vocab, tokenizer_entry
from mtlm.errors import DataError
from mtlm.model.build import build_model
from mtlm.parallel.state import ParallelState

ModelBuilder = Callable[[Any, int, ParallelState], nn.Module]


def build_on_meta(cfg: Any, vocab_size: int, state: ParallelState) -> nn.Module:
    """The model a checkpoint's model section describes (its `_target_`), on the meta device (shapes only)."""
    return build_model(cfg, vocab_size, state, device="meta")


def partition_dims(model: dict, rows: int) -> dict[str, int | None]:
    """Each parameter's tensor-parallel split dim (None: replicated) in the model a model section describes,
    with `rows` vocabulary rows: how a format's per-rank slices join."""
    shapes = build_on_meta(model_config({"model": model}), rows, ParallelState())
    return {n: getattr(p, "partition_dim", None) for n, p in shapes.named_parameters()}


def check_names(full: dict[str, torch.Tensor], model: nn.Module, origin: str) -> None:
    """The converted tensors are exactly the model's parameters, each with its shape (unpadded vocab)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    extra = sorted(set(full) - set(params))
    if missing or extra:
        raise CheckpointError(f"{origin}: converted tensors do not match the model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for name, p in params.items():
        want = list(p.shape)
        if getattr(p, "partition_dim", None) == 0 and name in PADDED_VOCAB:
            want[0] = full[name].shape[0]  # the vocabulary is checked by the caller (real size, not padded)
        if list(full[name].shape) != want:
            raise CheckpointError(f"{origin}: {name} has shape {list(full[name].shape)}, the model needs {want}")


def write_checkpoint(out_dir: str | Path, model: dict, full: dict[str, torch.Tensor], tensor: int,
                     source: dict, extra: dict | None = None, build: ModelBuilder = build_on_meta) -> Path:
    """Write `full` (mtlm names, whole tensors, real vocabulary) as an mtlm checkpoint at degree `tensor`.

    `model` is the checkpoint's model section (it must include vocab_size); `source` says where the weights
    came from; `extra` adds top-level metadata (e.g. the tokenizer). Returns the checkpoint folder."""
    vocab = model["vocab_size"]
    cfg = model_config({"model": model})
    if cfg.num_attention_heads % tensor:
        raise CheckpointError(f"--tensor {tensor} does not divide the model's {cfg.num_attention_heads} "
                              "attention heads")
    check_names(full, build(cfg, vocab, ParallelState()), next(iter(source.values()), "source"))
    root = Path(out_dir)
    staging = root / ".tmp-step_00000000"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts = []
    for rank in range(tensor):  # each tensor rank's file, as `tensor` training ranks would have written it
        shapes = build(cfg, vocab, ParallelState(rank=rank, world_size=tensor, tensor=tensor))
        shard = RankShard(rank_file(rank))
        for name, p in shapes.named_parameters():
            sl = param_slice(name, p.shape, getattr(p, "partition_dim", None), tensor, rank, vocab)
            value = full[name] if sl.dim is None else full[name].narrow(sl.dim, sl.start, sl.stop - sl.start)
            if sl.dim is None and rank > 0:
                continue  # replicated: tensor rank 0 writes it, as in training
            shard.add(f"model.{name}", value.contiguous(), sl)
        parts.append((shard.file, shard.write(staging), shard.index))
    files, tensors = merge_index(parts)
    write_json(staging / METADATA, {
        "format": FORMAT, "version": VERSION, "step": 0, "consumed_samples": 0,
        "layout": {"tensor": tensor, "data": 1, "world_size": tensor, "shard_optimizer": False, "device": "cpu"},
        "model": model, "optimizer": {"state": False, "param_groups": []}, "scheduler": None, "precision": None,
        "rng": {"files": []}, "files": files, "tensors": tensors, "config": {"model": model},
        "source": source, "torch": torch.__version__, **(extra or {}),
    })
    commit(root, staging, "step_00000000", 0)
    return root


def tokenizer_metadata(tokenizer: Any, rows: int, where: str, divisible: int | None = None,
                       saved_tensor: int = 1) -> dict | None:
    """{"tokenizer": entry} for metadata.json after checking the tokenizer fits the embedding's `rows`
    (mtlm.data.hf_tokenizers.check_vocab: padded the saved way when `divisible` is given, else at least its
    size); None without a tokenizer."""
    if tokenizer is None:
        return None

    try:
        check_vocab(tokenizer, rows, divisible, saved_tensor, where)
    except DataError as err:
        raise CheckpointError(str(err)) from None
    return {"tokenizer": tokenizer_entry(tokenizer)}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, whole model tensors by mtlm name) of an mtlm checkpoint folder or step folder."""
    step_dir = find_checkpoint(path)
    meta = read_metadata(step_dir)
    reader = ShardReader(step_dir, meta)
    names = [n for n in meta["tensors"] if n.startswith("model.")]
    return meta, {n.removeprefix("model."): reader.read_full(n) for n in names}


def read_hf_safetensors(hf_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors file(s) (sharded or not), but those whose name ends
    in one of `skip`. Never unpickles."""
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not (hf_dir / file).exists():
            raise CheckpointError(f"{hf_dir / file}: missing (mtlm reads safetensors only, never pickles)")
        with safe_open(str(hf_dir / file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if not k.endswith(skip)})
    return tensors
