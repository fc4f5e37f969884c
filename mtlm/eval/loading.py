"""A checkpoint's GPT at any tensor degree, and the tokenizer that goes with it.

The model is rebuilt from the checkpoint's own model section and each rank reads only its slices
(mtlm.train.checkpoint.load_weights: resharding to the degree asked for happens on read). The tokenizer is the
one recorded in the checkpoint's metadata.json at training time, unless `data.tokenizer` names another one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from mtlm.api import model_config
from mtlm.data import DataError, Tokenizer
from mtlm.model.gpt import GPT
from mtlm.parallel.state import ParallelState
from mtlm.train.checkpoint import load_weights
from mtlm.train.reshard import CheckpointError, ShardReader, check_shard_headers, find_checkpoint, read_metadata

GPT_TARGET = "mtlm.model.gpt.GPT"


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """(step folder, metadata), fully checked (every shard present, whole, holding its slices), and a GPT:
    one line naming the file otherwise. Cheap: JSON and safetensors headers only."""
    step_dir = find_checkpoint(path)
    meta = read_metadata(step_dir)
    check_shard_headers(step_dir, meta)
    target = meta["model"].get("_target_") or GPT_TARGET
    if target != GPT_TARGET:
        raise CheckpointError(f"{step_dir}: holds a {target.rsplit('.', 1)[-1]} model; evaluation and "
                              "generation need a GPT (a causal language model)")
    return step_dir, meta


def load_gpt(step_dir: Path, meta: dict, state: ParallelState) -> GPT:
    """This rank's share of the checkpoint's GPT at state.tensor, in eval mode (no dropout)."""
    gpt = GPT(model_config(meta), meta["model"]["vocab_size"], state, device=state.device)
    load_weights(ShardReader(step_dir, meta), state, gpt)
    return gpt.eval()


def tokenizer_path(meta: dict, override: str | None, step_dir: Path) -> str:
    """The tokenizer to use: `override` (data.tokenizer), else the one the checkpoint was trained with."""
    if override:
        return os.path.abspath(os.path.expanduser(override))
    recorded = (meta.get("tokenizer") or {}).get("path")
    if not recorded:
        raise DataError(f"data.tokenizer: {step_dir} records no tokenizer (a converted model?); give the one it "
                        "was trained with: data.tokenizer=FILE")
    if not os.path.isfile(recorded):
        raise DataError(f"data.tokenizer: the checkpoint's tokenizer {recorded} is gone (recorded in "
                        f"{step_dir}/metadata.json); give it: data.tokenizer=FILE")
    return recorded


def load_tokenizer(meta: dict, override: str | None, step_dir: Path) -> Any:
    """The tokenizer, checked against the model: its vocabulary must be the model's (same size as the
    checkpoint's recorded tokenizer, and never more ids than the embedding has rows)."""
    path = tokenizer_path(meta, override, step_dir)
    tok = Tokenizer(path)
    model_vocab = meta["model"]["vocab_size"]
    recorded = (meta.get("tokenizer") or {}).get("vocab_size")
    if recorded is not None and tok.vocab_size != recorded:
        raise DataError(f"data.tokenizer: {path} has {tok.vocab_size} tokens but {step_dir} was trained with a "
                        f"{recorded}-token tokenizer; use that one")
    if tok.vocab_size > model_vocab:
        raise DataError(f"data.tokenizer: {path} has {tok.vocab_size} tokens, more than the model's vocabulary "
                        f"({model_vocab}, {step_dir}); it is not this model's tokenizer")
    return tok


def autocast(dtype: str, device: torch.device):
    """The precision group's compute dtype as an autocast context (fp32: none)."""
    from mtlm.train.precision import DTYPES

    return contextlib.nullcontext() if dtype == "fp32" else torch.autocast(device.type, dtype=DTYPES[dtype])
