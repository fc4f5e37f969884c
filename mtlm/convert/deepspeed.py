"""BLOOM checkpoints as Megatron-DeepSpeed saved them (bigscience's training runs) -> mtlm.

    python -m mtlm.convert from-deepspeed bloom-1b1-optimizer-states checkpoints/bloom_1b1 --preset bloom_1b1

DeepSpeed's pipeline engine saves one file per pipeline layer and tensor rank:

    <root>/latest                                          "global_step1000"
    <root>/global_step1000/layer_01-model_00-model_states.pt   word_embeddings.weight, word_embeddings.norm.*
    <root>/global_step1000/layer_03-model_00-model_states.pt   block 0 (BLOOM's layer names, no `h.{i}.`)
    ...                                                     layer_{L+2}: block L-1
    <root>/global_step1000/layer_{L+4}-model_00-model_states.pt   final layer norm: weight, bias

(layers 02 and L+3 hold no parameters). Each tensor rank (`model_{tp:02d}`) holds its slice along the
parameter's partition dim, with the fused qkv rows of its heads as [head][q, k, v][head_dim] (mtlm's
order), so the ranks join by concatenation. Layer norms and row-parallel biases are replicated but drifted
apart slightly across ranks in bigscience's training: they are averaged, as Hugging Face's converter does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mtlm.convert import bloom
from mtlm.convert.common import join_ranks
from mtlm.convert.megatron import read_preset
from mtlm.convert.pickles import safe_load
from mtlm.convert.writer import partition_dims, tokenizer_metadata, write_checkpoint
from mtlm.errors import CheckpointError

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
FIRST_LAYER = 3  # layer_03 is block 0
EMBEDDING_NAMES = {"word_embeddings.weight": "wte.weight", "word_embeddings.norm.weight": "ln_emb.weight",
                   "word_embeddings.norm.bias": "ln_emb.bias"}


def step_folder(src: Path) -> Path:
    """The global_step* folder SRC names: itself, or the one its `latest` file names."""
    if any(LAYER_FILE.match(p.name) for p in src.glob("layer_*-model_*-model_states.pt")):
        return src
    latest = src / "latest"
    if latest.is_file():
        folder = src / latest.read_text(encoding="utf-8").strip()
        if folder.is_dir():
            return folder
        raise CheckpointError(f"{latest}: names {folder.name}, which is not a folder there")
    steps = sorted(src.glob("global_step*"))
    if len(steps) == 1:
        return steps[0]
    raise CheckpointError(f"{src}: no layer_*-model_*-model_states.pt files, and no `latest` file naming a "
                          "global_step* folder: not a Megatron-DeepSpeed checkpoint")


def _layer_tensors(folder: Path) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Per tensor rank: mtlm name -> that rank's slice. Also the number of blocks."""
    files: dict[tuple[int, int], Path] = {}
    for p in folder.iterdir():
        m = LAYER_FILE.match(p.name)
        if m:
            files[(int(m[1]), int(m[2]))] = p
    ranks = sorted({tp for _, tp in files})
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{folder}: tensor rank files model_00 .. model_{max(ranks):02d} are not all there")
    layer_ids = sorted({i for i, _ in files})
    out: list[dict[str, torch.Tensor]] = [{} for _ in ranks]
    blocks = 0
    for tp in ranks:
        for i in layer_ids:
            path = files.get((i, tp))
            if path is None:
                raise CheckpointError(f"{folder}: layer_{i:02d}-model_{tp:02d}-model_states.pt is missing")
            state = safe_load(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: not a state dict")
            for key, value in state.items():
                name = _mtlm_name(key, i)
                if name is None:
                    raise CheckpointError(f"{path}: unexpected tensor {key}: not part of a BLOOM model")
                out[tp][name] = value
                if name.startswith("blocks."):
                    blocks = max(blocks, i - FIRST_LAYER + 1)
    return out, blocks


def _mtlm_name(key: str, layer: int) -> str | None:
    if key in EMBEDDING_NAMES:
        return EMBEDDING_NAMES[key]
    if key in ("weight", "bias"):  # the final layer norm's own file
        return f"ln_f.{key}"
    return bloom.mtlm_name(f"h.{layer - FIRST_LAYER}.{key}")


def from_deepspeed(src: str | Path, out_dir: str | Path, tensor: int = 1, preset: str | None = None,
                   num_attention_heads: int | None = None, tokenizer: Any = None) -> Path:
    """Import a Megatron-DeepSpeed BLOOM checkpoint as an mtlm checkpoint at tensor degree `tensor`.
    Heads cannot be read off the tensors: give `preset` (e.g. bloom_560m) or `num_attention_heads`."""
    folder = step_folder(Path(src))
    ranks, layers = _layer_tensors(folder)
    label = str(folder)
    if "wte.weight" not in ranks[0] or "ln_f.weight" not in ranks[0]:
        raise CheckpointError(f"{label}: no word embeddings or final layer norm among the layer files")
    hidden = ranks[0]["ln_f.weight"].shape[0]
    rows = ranks[0]["wte.weight"].shape[0] * len(ranks)
    spec = read_preset(preset) if preset else {}
    heads = num_attention_heads or spec.get("num_attention_heads")
    if heads is None:
        raise CheckpointError(f"{label}: the number of attention heads is not in the layer files: pass "
                              "--num-attention-heads N or --preset NAME (e.g. bloom_560m)")
    for key, value in (("num_layers", layers), ("hidden_size", hidden)):
        if spec.get(key) not in (None, value):
            raise CheckpointError(f"{label}: --preset {preset} says {key}={spec[key]}, the checkpoint has {value}")
    if heads % len(ranks):
        raise CheckpointError(f"{label}: {len(ranks)} tensor ranks do not divide {heads} attention heads")
    model = bloom.model_section(preset or Path(out_dir).name, layers, hidden, heads, rows,
                                spec.get("layernorm_eps", 1e-5), spec.get("dropout", 0.0),
                                spec.get("init_std", 0.02), spec.get("seq_length", 2048))
    dims = partition_dims(model, rows)
    full = join_ranks(ranks, dims.get, label, replicated="mean")  # drifted copies: averaged
    extra = tokenizer_metadata(tokenizer, rows, label)
    source = {"deepspeed": str(folder.resolve()), "tensor": len(ranks)}
    return write_checkpoint(out_dir, model, full, tensor, source, extra)
