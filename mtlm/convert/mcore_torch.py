"""Megatron-LM's per-rank `--ckpt-format torch` files with Megatron-Core names, joined into whole tensors.

    iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt         one file per tensor rank
    iter_NNNNNNN/mp_rank_TT_PPP/model_optim_rng.pt     with pipeline stages: tensor rank TT, stage PPP

Each file's `model` is its GPTModel's state dict: layers numbered from 0 within the stage (the stage's first
layer is layer PPP x num_layers / pipeline of the whole model), tensors sliced as megatron-core's tensor-parallel
layers hold them: column-parallel (linear_qkv, linear_fc1, the word embeddings and the output layer) by rows,
row-parallel (linear_proj, linear_fc2) by columns, the rest whole on every rank. linear_qkv's rows of a rank are
its heads' [q, k, v] blocks, so stacking the ranks' rows gives the whole model's [head][q, k, v] order.
Files are read with the legacy importer's allow-list (mtlm/convert/pickles.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mtlm.checkpoint.format import CheckpointError
from mtlm.convert.common import join_ranks
from mtlm.convert.pickles import safe_load

RANK_FILE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
_ROWS = re.compile(r".*(linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|word_embeddings\.weight|"
                   r"output_layer\.weight)$")
_COLUMNS = re.compile(r".*(linear_proj|linear_fc2)\.weight$")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def is_torch_format(folder: Path) -> bool:
    return any(RANK_FILE.match(p.name) for p in folder.glob("mp_rank_*") if p.is_dir())


def split_dim(name: str) -> int | None:
    """The dimension megatron-core's tensor-parallel layers split `name` along (None: whole on every rank)."""
    if _ROWS.fullmatch(name):
        return 0
    if _COLUMNS.fullmatch(name):
        return 1
    return None


def read_mcore_torch(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(whole tensors by megatron-core name, global layer numbers; the first file's non-model entries)."""
    files: dict[tuple[int, int], Path] = {}
    for d in folder.glob("mp_rank_*"):
        m = RANK_FILE.match(d.name)
        if m and (d / "model_optim_rng.pt").is_file():
            files[(int(m[1]), int(m[2] or 0))] = d / "model_optim_rng.pt"
    tensor = 1 + max(t for t, _ in files)
    pipeline = 1 + max(p for _, p in files)
    if len(files) != tensor * pipeline:
        raise CheckpointError(f"{folder}: {len(files)} mp_rank_* files, expected {tensor} tensor x {pipeline} "
                              "pipeline ranks: some are missing")
    first = safe_load(files[(0, 0)])
    args = first.get("args")
    layers = getattr(args, "num_layers", None)
    if pipeline > 1 and (layers is None or layers % pipeline or
                         getattr(args, "decoder_first_pipeline_num_layers", None) or
                         getattr(args, "num_layers_per_virtual_pipeline_stage", None)):
        raise CheckpointError(f"{folder}: pipeline stages of uneven or virtual layers: mtlm joins evenly split "
                              "stages only")
    whole: dict[str, torch.Tensor] = {}
    for stage in range(pipeline):
        ranks = [first["model"] if (t, stage) == (0, 0) else safe_load(files[(t, stage)])["model"]
                 for t in range(tensor)]
        ranks = [{n: v for n, v in r.items() if isinstance(v, torch.Tensor) and not n.endswith("_extra_state")}
                 for r in ranks]
        for name, joined in join_ranks(ranks, split_dim, str(folder)).items():
            m = _LAYER.fullmatch(name)
            if m and pipeline > 1:
                name = f"decoder.layers.{stage * (layers // pipeline) + int(m[1])}.{m[2]}"
            if name in whole and not torch.equal(whole[name], joined):  # e.g. a tied output layer on two stages
                raise CheckpointError(f"{folder}: {name} differs between pipeline stages")
            whole[name] = joined
    common: dict[str, Any] = {k: v for k, v in first.items() if k != "model"}
    return whole, common
