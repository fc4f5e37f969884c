"""The pieces every format's adapter shares, so each is written once:

- NameMap: a format's parameter names <-> mtlm's (per layer and whole-model), both ways;
- model_section: an mtlm checkpoint's model section, its defaults taken from the typed ModelConfig;
- reorder_qkv: the fused qkv rows between any two orders of their (which of q/k/v, head, head_dim) axes;
- join_ranks: tensor-parallel ranks' slices -> whole tensors, along each parameter's split dim;
- pad_vocab / cut_vocab: the embedding's padding rows on the way out / in;
- write_hf_folder: a Hugging Face folder (model.safetensors + config.json).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mtlm.checkpoint.format import PADDED_VOCAB, CheckpointError
from mtlm.config import MODEL_DEFAULTS
from mtlm.files import respect_umask

# The model-section keys every importer writes, in the order metadata.json holds them; those after the shape
# fall back to ModelConfig's defaults (mtlm/config.py), the one place they are stated.
_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings", "vocab_size")
_DEFAULTED = ("make_vocab_size_divisible_by", "dropout", "init_std", "layernorm_eps")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class NameMap:
    """mtlm's parameter names <-> a format's. Per-layer ones, `blocks.N.<suffix>` <-> `layers[0].format(N)` +
    `layer[suffix]`; the rest one to one (`top`). Read only: the other layer prefixes in `layers`, and the
    format's other spellings in `read_layer` / `read_top` (another layer spec's names, another generation's)."""
    layers: tuple[str, ...]  # the format's per-layer prefixes, `{}` for the layer number; the first is written
    layer: dict[str, str]  # mtlm per-layer suffix -> the format's
    top: dict[str, str]  # mtlm name -> the format's
    read_layer: dict[str, str] = field(default_factory=dict)  # the format's other suffixes -> mtlm's
    read_top: dict[str, str] = field(default_factory=dict)  # the format's other names -> mtlm's

    def theirs(self, name: str) -> str:
        """The format's name of mtlm parameter `name` (KeyError: the format has no place for it)."""
        m = _BLOCK.fullmatch(name)
        return f"{self.layers[0].format(m[1])}{self.layer[m[2]]}" if m else self.top[name]

    def ours(self, name: str) -> str | None:
        """mtlm's name of the format's parameter `name`, or None: mtlm has no place for it."""
        for prefix in self.layers:
            head, tail = prefix.split("{}")
            m = re.fullmatch(rf"{re.escape(head)}(\d+){re.escape(tail)}(.+)", name)
            if m:
                ours = {v: k for k, v in self.layer.items()}.get(m[2]) or self.read_layer.get(m[2])
                return f"blocks.{m[1]}.{ours}" if ours else None
        return {v: k for k, v in self.top.items()}.get(name) or self.read_top.get(name)


def model_section(target: str | None, name: str, options: dict[str, Any] | None = None, **keys: Any) -> dict:
    """An mtlm model section: `_target_` (left out when None: a GPT, as older checkpoints say it), `name`, the
    shape keys (all required), the defaulted keys (ModelConfig's value when not given), then `options`
    (activation, layernorm_order, ...) in their order."""
    missing = [k for k in _SHAPE if k not in keys]
    unknown = sorted(set(keys) - set(_SHAPE) - set(_DEFAULTED))
    if missing or unknown:
        raise TypeError(f"model_section: missing {missing}, unknown {unknown}")
    head = {"_target_": target} if target is not None else {}
    return {**head, "name": name, **{k: keys[k] for k in _SHAPE},
            **{k: keys[k] if keys.get(k) is not None else MODEL_DEFAULTS[k] for k in _DEFAULTED}, **(options or {})}


def reorder_qkv(rows: torch.Tensor, heads: int, src: str, dst: str) -> torch.Tensor:
    """Fused qkv rows (a weight's or a bias's) from order `src` to order `dst`, each a string of the axes
    `3` (q, k, v), `h` (head) and `d` (head_dim), slowest first. mtlm's is "h3d": a tensor-parallel rank's
    rows are whole heads. Transformers' GPT-2 and Megatron's version-0 files hold "3hd", version 1.0 "hd3"."""
    size = {"3": 3, "h": heads, "d": rows.shape[0] // (3 * heads)}
    rest = rows.shape[1:]
    split = rows.reshape(*(size[a] for a in src), *rest)
    return split.permute(*(src.index(a) for a in dst), *range(3, 3 + len(rest))).reshape(rows.shape)


def join_ranks(ranks: list[dict[str, torch.Tensor]], dim: Callable[[str], int | None], label: str,
               replicated: str = "first") -> dict[str, torch.Tensor]:
    """Whole tensors from tensor-parallel ranks' state dicts (same names): split ones concatenated along
    `dim(name)`; replicated ones (dim None) rank 0's, or with replicated="mean" the ranks' mean in fp32 (runs
    whose replicated copies drifted apart, e.g. bigscience's BLOOM)."""
    out = {}
    for name, first in ranks[0].items():
        parts = [r.get(name) for r in ranks]
        if any(p is None for p in parts):
            raise CheckpointError(f"{label}: tensor rank {parts.index(None)} has no {name}")
        d = dim(name)
        if len(parts) == 1:
            out[name] = first
        elif d is not None:
            out[name] = torch.cat(parts, d)
        elif replicated == "mean":
            out[name] = torch.stack([p.float() for p in parts]).mean(0).to(first.dtype)
        else:
            out[name] = first
    return out


def pad_vocab(full: dict[str, torch.Tensor], rows: int) -> None:
    """Zero rows appended to the vocabulary-sized tensors, up to `rows` (the padded size a format stores)."""
    for name in PADDED_VOCAB:
        if name in full:
            v = full[name]
            full[name] = torch.cat([v, v.new_zeros(rows - v.shape[0], *v.shape[1:])])


def cut_vocab(full: dict[str, torch.Tensor], vocab: int) -> None:
    """The vocabulary-sized tensors cut to the real vocabulary (mtlm checkpoints store no padding rows)."""
    for name in PADDED_VOCAB:
        if name in full:
            full[name] = full[name][:vocab]


def write_hf_folder(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A transformers folder: `tensors` as model.safetensors, `config` as config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    respect_umask(out / "model.safetensors")  # safetensors creates it 0600; exports are meant to be shared
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
