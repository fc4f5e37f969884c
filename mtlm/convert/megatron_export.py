"""mtlm -> Megatron-LM's checkpoint layout (version 3.0, `release/mp_rank_*`), so a model trained here can go
back to Megatron-LM (`--load DIR --finetune`, or as a release checkpoint).

    python -m mtlm.convert to-megatron checkpoints/gpt2_345m megatron/gpt2_345m --tensor 4

Version 3.0 per-rank qkv rows are [head][q, k, v][head_dim], mtlm's own order, so each rank's file holds
exactly the slice an mtlm rank at that degree holds. The vocabulary is padded to a multiple of
make_vocab_size_divisible_by x tensor with zero rows, as Megatron-LM pads it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from mtlm.config import BERT_TARGET, model_option
from mtlm.convert.common import pad_vocab
from mtlm.convert.megatron import LAYER_NAMES, NAMES
from mtlm.convert.megatron_files import TRACKER
from mtlm.convert.megatron_tokenizer import MEGATRON_TOKENIZERS, export_tokenizer
from mtlm.convert.writer import read_checkpoint
from mtlm.errors import CheckpointError
from mtlm.parallel.layers import pad_vocab_size

# mtlm name -> (nested dicts under `model`, key in the innermost one), as Megatron-LM's
# state_dict_for_save_checkpoint nests them: embeddings one dict per module, the encoder and heads flat.
_EMBEDDING = ("language_model", "embedding")
WHERE = {
    "wte.weight": ((*_EMBEDDING, "word_embeddings"), "weight"),
    "wpe.weight": ((*_EMBEDDING, "position_embeddings"), "weight"),
    "tte.weight": ((*_EMBEDDING, "tokentype_embeddings"), "weight"),
    "ln_f.weight": (("language_model", "encoder"), "final_layernorm.weight"),
    "ln_f.bias": (("language_model", "encoder"), "final_layernorm.bias"),
    "pooler.weight": (("language_model", "pooler"), "dense.weight"),
    "pooler.bias": (("language_model", "pooler"), "dense.bias"),
    "lm_head.dense.weight": (("lm_head",), "dense.weight"), "lm_head.dense.bias": (("lm_head",), "dense.bias"),
    "lm_head.ln.weight": (("lm_head",), "layernorm.weight"), "lm_head.ln.bias": (("lm_head",), "layernorm.bias"),
    "lm_head.bias": (("lm_head",), "bias"),
    "sop_head.weight": (("binary_head",), "weight"), "sop_head.bias": (("binary_head",), "bias"),
}


def megatron_place(name: str) -> tuple[tuple[str, ...], str]:
    """Where mtlm's parameter `name` goes in a version 3.0 file's `model` dict."""
    if name.startswith("blocks."):  # the encoder's flat `layers.N.<2.x name>` (the name map's written names)
        return ("language_model", "encoder"), NAMES.theirs(name).removeprefix("encoder.")
    if name not in WHERE:
        raise CheckpointError(f"parameter {name} has no place in a Megatron-LM GPT-2 / BERT checkpoint")
    return WHERE[name]


# Megatron-LM's module order, which its files keep (torch.save keeps dict order) and which readers rely on:
# transformers' Megatron-BERT converter stops at the encoder's first key that is not `layers.N.*`.
_BEFORE_LAYERS = ("wte.weight", "wpe.weight", "tte.weight")
_AFTER_LAYERS = ("ln_f.weight", "ln_f.bias", "pooler.weight", "pooler.bias", "lm_head.bias",
                 "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.ln.weight", "lm_head.ln.bias",
                 "sop_head.weight", "sop_head.bias")
_IN_LAYER = tuple(LAYER_NAMES)  # input LN, qkv, attention output, post-attention LN, h->4h, 4h->h


def megatron_order(name: str) -> tuple:
    """Sort key: embeddings, then layer by layer (weight before bias), then final LN, pooler, heads."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return (1, int(m[1]), _IN_LAYER.index(m[2]), m[3] == "bias")
    if name in _BEFORE_LAYERS:
        return (0, _BEFORE_LAYERS.index(name))
    return (2, _AFTER_LAYERS.index(name))


def megatron_args(model: dict, tensor: int, padded: int, tokenizer: dict | None) -> argparse.Namespace:
    """The args Megatron-LM's loader compares with its own (check_checkpoint_args) and reads back."""
    tokenizer = tokenizer or {}
    extra = {"bert_binary_head": True, "num_tokentypes": 2} if model.get("_target_") == BERT_TARGET else {}
    return argparse.Namespace(
        num_layers=model["num_layers"], hidden_size=model["hidden_size"],
        num_attention_heads=model["num_attention_heads"], ffn_hidden_size=4 * model["hidden_size"],
        kv_channels=model["hidden_size"] // model["num_attention_heads"],
        max_position_embeddings=model["max_position_embeddings"], seq_length=model["seq_length"],
        make_vocab_size_divisible_by=model["make_vocab_size_divisible_by"], padded_vocab_size=padded,
        vocab_size=model["vocab_size"], tensor_model_parallel_size=tensor, pipeline_model_parallel_size=1,
        tokenizer_type=MEGATRON_TOKENIZERS.get((tokenizer.get("type"), tokenizer.get("lowercase"))),
        layernorm_epsilon=model["layernorm_eps"], hidden_dropout=model["dropout"],
        attention_dropout=model["dropout"], init_method_std=model["init_std"],
        # The fused bias-GeLU kernel is the tanh approximation; exact GeLU needs it off (and no openai_gelu).
        bias_gelu_fusion=model_option(model, "activation") == "gelu_tanh", openai_gelu=False, **extra,
    )


def to_megatron(checkpoint: str | Path, out_dir: str | Path, tensor: int = 1) -> Path:
    """Write an mtlm GPT-2 or BERT checkpoint as a Megatron-LM checkpoint (version 3.0, `release`)."""
    meta, full = read_checkpoint(checkpoint)
    model = meta["model"]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: not empty; to-megatron writes into a new or empty folder")
    if model["num_attention_heads"] % tensor:
        raise CheckpointError(f"--tensor {tensor} does not divide the model's {model['num_attention_heads']} heads")
    if model_option(model, "layernorm_order") != "pre" or model_option(model, "position_embedding") != "learned":
        raise CheckpointError(f"{checkpoint}: a post-LN or ALiBi model has no Megatron-LM 3.0 equivalent")
    padded = pad_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], tensor)
    pad_vocab(full, padded)
    args = megatron_args(model, tensor, padded, meta.get("tokenizer"))
    vars(args).update(export_tokenizer(meta.get("tokenizer"), out, str(checkpoint)))  # files beside, named in args
    places = {name: megatron_place(name) for name in full}
    places = {name: places[name] for name in sorted(places, key=megatron_order)}
    for rank in range(tensor):
        state: dict[str, Any] = {}
        for name in places:  # Megatron-LM's order: the nested dicts are created and filled in it
            value = full[name]
            dim = meta["tensors"][f"model.{name}"]["partition_dim"]
            local = value if dim is None else value.chunk(tensor, dim)[rank]
            path, key = places[name]
            node = state
            for part in path:
                node = node.setdefault(part, {})
            node[key] = local.clone()  # a view would save the whole tensor's storage
        file = out / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        file.parent.mkdir(parents=True)
        torch.save({"model": state, "checkpoint_version": 3.0, "iteration": meta["step"], "args": args}, file)
    (out / TRACKER).write_text("release\n", encoding="utf-8")
    return out
