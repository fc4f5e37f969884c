"""A checkpoint's GPT at any tensor degree, and the tokenizer that goes with it.

The model is rebuilt from the checkpoint's own model section and each rank reads only its slices
(mtlm.train.checkpoint.load_weights: resharding to the degree asked for happens on read). The tokenizer is the
one recorded in the checkpoint's metadata.json (mtlm/data/text_tokenizer.py: sentencepiece or GPT-2 BPE),
unless `data.tokenizer` names another one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mtlm.api import model_config
from mtlm.checkpoint.format import ShardReader, check_shard_headers, find_checkpoint, read_metadata
from mtlm.config import GPT_TARGET
from mtlm.data.text_tokenizer import (
    TextTokenizer,
    check_same_tokenizer,
    check_spec,
    tokenizer_from_entry,
    tokenizer_spec,
)
from mtlm.data.text_tokenizer import load_tokenizer as load_tokenizer_spec
from mtlm.errors import CheckpointError, DataError
from mtlm.model.build import build_model
from mtlm.model.gpt import GPT
from mtlm.model.spec import spec_for
from mtlm.parallel.state import ParallelState
from mtlm.train.checkpoint import load_weights
from mtlm.train.precision import DTYPES


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """(step folder, metadata), fully checked (every shard present, whole, holding its slices), and a GPT:
    one line naming the file otherwise. Cheap: JSON and safetensors headers only."""
    step_dir = find_checkpoint(path)
    meta = read_metadata(step_dir)
    check_shard_headers(step_dir, meta)
    target = meta["model"].get("_target_") or GPT_TARGET
    try:
        causal = spec_for(model_config(meta)).causal_lm
    except Exception:  # a class that no longer imports, or no mtlm family: not a model this can score either
        causal = False
    if not causal:
        raise CheckpointError(f"{step_dir}: holds a {target.rsplit('.', 1)[-1]} model; evaluation and "
                              "generation need a GPT (a causal language model)")
    return step_dir, meta


def load_gpt(step_dir: Path, meta: dict, state: ParallelState) -> GPT:
    """This rank's share of the checkpoint's causal LM (read_checkpoint checked its spec) at state.tensor, in
    eval mode (no dropout)."""
    gpt = build_model(model_config(meta), meta["model"]["vocab_size"], state, device=state.device)
    load_weights(ShardReader(step_dir, meta), state, gpt)
    return gpt.eval()


def _overridden(node: Any) -> bool:
    return node is not None and any(getattr(node, k, None) for k in ("type", "model", "vocab_file", "merge_file"))


# The hint for a checkpoint that records no tokenizer: every type data.tokenizer takes (text_tokenizer.py).
NO_TOKENIZER_HINT = ("give the one it was trained with: data.tokenizer.model=FILE.model (sentencepiece), "
                     "data.tokenizer.type=gpt2 data.tokenizer.vocab_file=vocab.json "
                     "data.tokenizer.merge_file=merges.txt (GPT-2 BPE), data.tokenizer.type=wordpiece "
                     "data.tokenizer.vocab_file=vocab.txt (BERT), or data.tokenizer.type=tokenizer.json "
                     "data.tokenizer.model=tokenizer.json (Hugging Face)")


def load_tokenizer(meta: dict, override: Any, step_dir: Path) -> TextTokenizer:
    """The checkpoint's tokenizer (its metadata entry, written at training or conversion time), or the one
    `data.tokenizer` names (type / model / vocab_file / merge_file, as train.py's), checked against the model:
    the same identity (content hash) as the one the checkpoint records unless data.tokenizer.allow_mismatch,
    its recorded vocabulary, and never more ids than the embedding has rows."""
    recorded = meta.get("tokenizer") or {}
    if _overridden(override):
        spec = tokenizer_spec({k: getattr(override, k, None) for k in ("type", "model", "vocab_file", "merge_file")})
        check_spec(spec)
        tok = load_tokenizer_spec(spec)
    elif not recorded.get("path"):
        raise DataError(f"data.tokenizer: {step_dir} records no tokenizer (a converted model?); {NO_TOKENIZER_HINT}")
    else:
        missing = [p for p in (recorded["path"], recorded.get("merge_file")) if p and not os.path.isfile(p)]
        if missing:
            raise DataError(f"data.tokenizer: the checkpoint's tokenizer file {missing[0]} is gone (recorded in "
                            f"{step_dir}/metadata.json); give it with data.tokenizer.*")
        tok = tokenizer_from_entry(recorded)
    allow = bool(getattr(override, "allow_mismatch", False))
    if not allow and recorded.get("type") and recorded["type"] != tok.kind:
        raise DataError(f"data.tokenizer.type: {step_dir} was trained with a {recorded['type']} tokenizer, "
                        f"not {tok.kind}; use that one (or leave data.tokenizer unset)")
    model_vocab = meta["model"]["vocab_size"]
    if not allow and recorded.get("vocab_size") is not None and tok.vocab_size != recorded["vocab_size"]:
        raise DataError(f"data.tokenizer: {tok.path} has {tok.vocab_size} tokens but {step_dir} was trained with a "
                        f"{recorded['vocab_size']}-token tokenizer; use that one")
    if tok.vocab_size > model_vocab:
        raise DataError(f"data.tokenizer: {tok.path} has {tok.vocab_size} tokens, more than the model's vocabulary "
                        f"({model_vocab}, {step_dir}); it is not this model's tokenizer")
    note = check_same_tokenizer(recorded, tok, str(step_dir), allow)
    if note:
        print(note, file=sys.stderr, flush=True)
    return tok


def autocast(dtype: str, device: torch.device):
    """The precision group's compute dtype as an autocast context (fp32: none)."""
    return contextlib.nullcontext() if dtype == "fp32" else torch.autocast(device.type, dtype=DTYPES[dtype])
