"""BLOOM (bigscience) <-> mtlm: Hugging Face's BloomForCausalLM folders, both ways.

    python -m mtlm.convert from-hf bloom-560m checkpoints/bloom_560m --tensor 2 --tokenizer-file \
        bloom-560m/tokenizer.json
    python -m mtlm.convert to-hf checkpoints/bloom_560m hf/bloom_560m

BLOOM is mtlm's GPT with `model.position_embedding=alibi` (no position embeddings) and
`model.embedding_layernorm=true` (a layer norm on the word embeddings); the rest is GPT-2's block (pre-LN,
tanh GeLU, tied output layer). The tensors need no reordering at all: BLOOM's fused qkv rows are grouped by
head, [head][q, k, v][head_dim], exactly mtlm's, and its linear layers are torch Linears [out, in].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlm.checkpoint.format import METADATA, find_checkpoint
from mtlm.config import GPT_TARGET, model_option
from mtlm.convert import common
from mtlm.convert.common import write_hf_folder
from mtlm.convert.writer import read_checkpoint, read_hf_safetensors, tokenizer_metadata, write_checkpoint
from mtlm.errors import CheckpointError

# mtlm's per-layer module -> BLOOM's (Hugging Face and Megatron-DeepSpeed use the same layer names).
LAYER_NAMES = {"ln1": "input_layernorm", "attn.qkv": "self_attention.query_key_value",
               "attn.proj": "self_attention.dense", "ln2": "post_attention_layernorm",
               "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
TOP_NAMES = {"wte.weight": "word_embeddings.weight", "ln_emb.weight": "word_embeddings_layernorm.weight",
             "ln_emb.bias": "word_embeddings_layernorm.bias", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
# Their names without transformers' `transformer.` (BloomModel's own, and Megatron-DeepSpeed's per-layer files).
NAMES = common.NameMap(("h.{}.",), {f"{k}.{w}": f"{v}.{w}" for k, v in LAYER_NAMES.items() for w in ("weight", "bias")},
                       TOP_NAMES)


def is_bloom(config: dict) -> bool:
    return config.get("model_type") == "bloom" or "BloomForCausalLM" in (config.get("architectures") or [])


def is_bloom_model(model: dict) -> bool:
    """An mtlm checkpoint's model section describes a BLOOM-shaped GPT."""
    return model.get("position_embedding") == "alibi"


def mtlm_name(hf_name: str) -> str | None:
    """A BloomForCausalLM / BloomModel parameter name -> mtlm's, or None if it is not one."""
    return NAMES.ours(hf_name.removeprefix("transformer."))


def hf_name(name: str) -> str:
    """mtlm's name -> BloomForCausalLM's state-dict name."""
    return f"transformer.{NAMES.theirs(name)}"


def model_section(name: str, layers: int, hidden: int, heads: int, vocab: int, eps: float = 1e-5,
                  dropout: float = 0.0, init_std: float = 0.02, seq_length: int = 2048) -> dict:
    """The mtlm model section of a BLOOM (conf/model/bloom_*.yaml hold the same keys)."""
    return common.model_section(GPT_TARGET, name, {"activation": "gelu_tanh", "position_embedding": "alibi",
                                                   "embedding_layernorm": True},
                                num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                seq_length=seq_length, max_position_embeddings=seq_length, vocab_size=vocab,
                                dropout=dropout, init_std=init_std, layernorm_eps=eps)


def _hf_to_mtlm(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        ours = mtlm_name(name)
        if ours is not None:
            out[ours] = value
        elif name == "lm_head.weight":  # tied: the same tensor as the word embeddings, when saved at all
            wte = tensors.get("transformer.word_embeddings.weight", tensors.get("word_embeddings.weight"))
            if wte is None or not torch.equal(value, wte):
                raise CheckpointError(f"{where}: lm_head.weight differs from the word embeddings: an untied "
                                      "output layer, which mtlm's GPT does not have")
        else:
            raise CheckpointError(f"{where}: unexpected tensor {name}: not part of a BLOOM model")
    return out


def from_hf_bloom(hf_dir: Path, config: dict, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None) -> Path:
    """Import a BloomForCausalLM folder (its config.json read as `config`) as an mtlm checkpoint at `tensor`."""
    where = hf_dir / "config.json"
    if config.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError(f"{where}: apply_residual_connection_post_layernorm=true: the residual starts "
                              "after the layer norm there, which mtlm's pre-LN GPT does not do")
    hidden = config.get("hidden_size") or config.get("n_embed")
    layers = config.get("n_layer") or config.get("num_hidden_layers")
    heads = config.get("n_head") or config.get("num_attention_heads")
    if not (hidden and layers and heads):
        raise CheckpointError(f"{where}: no hidden_size / n_layer / n_head: not a BLOOM config")
    model = model_section(hf_dir.name, layers, hidden, heads, config["vocab_size"],
                          config.get("layer_norm_epsilon", 1e-5), config.get("hidden_dropout", 0.0),
                          config.get("initializer_range", 0.02))
    full = _hf_to_mtlm(read_hf_safetensors(hf_dir), hf_dir)
    extra = tokenizer_metadata(tokenizer, full["wte.weight"].shape[0], str(hf_dir))
    return write_checkpoint(out_dir, model, full, tensor, {"huggingface": str(hf_dir.resolve())}, extra)


def to_hf_bloom(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers BloomForCausalLM folder (config.json, model.safetensors) from an mtlm checkpoint."""
    step_dir = find_checkpoint(checkpoint)
    meta, full = read_checkpoint(step_dir)
    m = meta["model"]
    order, act = model_option(m, "layernorm_order"), model_option(m, "activation")
    if order != "pre" or act != "gelu_tanh":
        raise CheckpointError(f"{step_dir / METADATA}: model.layernorm_order={order}, "
                              f"model.activation={act}: transformers' GPT-2 / BLOOM are pre-LN (BLOOM: tanh GeLU "
                              "only)")
    tok = meta.get("tokenizer") or {}
    config = {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": m["vocab_size"],
        "hidden_size": m["hidden_size"], "n_layer": m["num_layers"], "n_head": m["num_attention_heads"],
        "layer_norm_epsilon": m["layernorm_eps"], "initializer_range": m["init_std"],
        "hidden_dropout": m["dropout"], "attention_dropout": m["dropout"],
        "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1, "slow_but_exact": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": tok.get("eos_id", 2), "pad_token_id": 3,
        "mtlm": {"checkpoint": str(step_dir.resolve()), "step": meta["step"]},
    }
    return write_hf_folder(out_dir, {hf_name(n): v for n, v in full.items()}, config)
