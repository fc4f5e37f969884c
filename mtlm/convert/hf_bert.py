"""Convert between mtlm BERT checkpoints and transformers' MegatronBertForPreTraining (`python -m mtlm.convert
to-hf | from-hf` come here for a BERT checkpoint / a `megatron-bert` config; mtlm/convert/hf.py dispatches).

The two are the same network (pre-LN blocks with a final layer norm, exact GeLU, no embedding layer norm, tied
word embeddings plus an LM bias, tanh pooler, binary head); the tensors differ in layout only:
- transformers keeps q, k and v as three [h, h] linears; mtlm fuses them with rows grouped by head,
  [head][q, k, v][head_dim], so a tensor-parallel rank's rows are whole heads.
- transformers' names: `bert.encoder.layer.{i}.attention.ln` (mtlm's ln1), `.ln` (ln2), `bert.encoder.ln`
  (ln_f), `cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.bias`, `cls.seq_relationship`.
- The vocabulary is unpadded on both sides here (mtlm checkpoints store the real rows only).
Its layer-norm eps defaults to 1e-12; the config written here sets mtlm's. Post-LN BERTs
(`model.layernorm_order=post`) have no transformers equivalent and are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mtlm.api import model_config
from mtlm.checkpoint.format import METADATA, CheckpointError, find_checkpoint
from mtlm.config import BERT_TARGET
from mtlm.convert.common import NameMap, model_section, reorder_qkv, write_hf_folder
from mtlm.convert.writer import read_checkpoint, read_hf_safetensors, tokenizer_metadata, write_checkpoint

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# mtlm name -> transformers name, per layer (same layout: torch Linear / LayerNorm on both sides); q, k and v
# are three linears there (mtlm_to_hf / hf_to_mtlm split and fuse them).
_LAYERS = {"ln1": "attention.ln", "attn.proj": "attention.output.dense", "ln2": "ln", "mlp.fc": "intermediate.dense",
           "mlp.proj": "output.dense"}
_TOP = {"wte": "bert.embeddings.word_embeddings", "wpe": "bert.embeddings.position_embeddings",
        "tte": "bert.embeddings.token_type_embeddings", "ln_f": "bert.encoder.ln", "pooler": "bert.pooler.dense",
        "lm_head.dense": "cls.predictions.transform.dense", "lm_head.ln": "cls.predictions.transform.LayerNorm",
        "sop_head": "cls.seq_relationship"}
_WB = ("weight", "bias")
NAMES = NameMap(("bert.encoder.layer.{}.",), {f"{k}.{w}": f"{v}.{w}" for k, v in _LAYERS.items() for w in _WB},
                {**{f"{k}.{w}": f"{v}.{w}" for k, v in _TOP.items() for w in _WB},
                 "lm_head.bias": "cls.predictions.bias"})
_QKV = ("query", "key", "value")
_QUERY = re.compile(r"bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)")


def mtlm_to_hf(t: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """mtlm BERT parameter names/layouts (unpadded vocab) -> MegatronBertForPreTraining's state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, value in t.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if m:  # transformers' three [q; k; v] stacked are "3hd"
            for part, rows in zip(_QKV, reorder_qkv(value, heads, "h3d", "3hd").chunk(3), strict=True):
                out[f"bert.encoder.layer.{m[1]}.attention.self.{part}.{m[2]}"] = rows.contiguous()
        else:
            out[NAMES.theirs(name)] = value.contiguous()
    return out


def hf_to_mtlm(t: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """The inverse of mtlm_to_hf (the tied decoder weight and its bias alias are not needed)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in t.items():
        m = _QUERY.fullmatch(key)
        if m:
            src = key.removesuffix(f"query.{m[2]}")
            qkv = torch.cat([t[f"{src}{part}.{m[2]}"] for part in _QKV])
            out[f"blocks.{m[1]}.attn.qkv.{m[2]}"] = reorder_qkv(qkv, heads, "3hd", "h3d").contiguous()
        elif (name := NAMES.ours(key)) is not None:
            out[name] = value.contiguous()
    return out


def reads(config: dict) -> bool:
    return config.get("model_type") == "megatron-bert"


def writes(model: dict) -> bool:
    return model.get("_target_") == BERT_TARGET


def to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a MegatronBertForPreTraining folder (config.json, model.safetensors) from an mtlm BERT checkpoint."""
    step_dir = find_checkpoint(checkpoint)
    meta, tensors = read_checkpoint(step_dir)
    m = model_config(meta)
    if m.layernorm_order != "pre":
        raise CheckpointError(f"{step_dir / METADATA}: model.layernorm_order={m.layernorm_order}: transformers' "
                              "MegatronBert is pre-LN only; a post-LN BERT does not convert")
    hf = mtlm_to_hf(tensors, m.num_attention_heads)
    tok = meta.get("tokenizer") or {}
    config = {
        "architectures": ["MegatronBertForPreTraining"], "model_type": "megatron-bert",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "intermediate_size": 4 * m.hidden_size,
        "hidden_act": HF_ACTIVATIONS[m.activation], "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": m.dropout, "max_position_embeddings": m.max_position_embeddings,
        "type_vocab_size": 2, "initializer_range": m.init_std, "layer_norm_eps": m.layernorm_eps,
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "torch_dtype": "float32",
        "pad_token_id": tok.get("pad_id", 0), "mtlm": {"checkpoint": str(step_dir), "step": meta["step"]},
    }
    return write_hf_folder(out_dir, hf, config)


def config_error(config: dict, config_path: Path) -> str | None:
    """Why a megatron-bert config cannot become an mtlm BERT (None: it can)."""
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS.values():
        return f"hidden_act {act!r}; mtlm's BERT uses gelu (exact) or gelu_new (tanh)"
    if config.get("intermediate_size", 4 * config["hidden_size"]) != 4 * config["hidden_size"]:
        return "intermediate_size is not 4 x hidden_size, which mtlm's MLP is"
    if config.get("type_vocab_size", 2) != 2 or config.get("position_embedding_type", "absolute") != "absolute":
        return "type_vocab_size must be 2 and position_embedding_type absolute"
    return None


def from_hf(hf_dir: Path, config: dict, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None) -> Path:
    """Import a MegatronBertForPreTraining folder (its config.json read as `config`) as an mtlm BERT checkpoint
    at `tensor` (`tokenizer`: its WordPiece, checked against the vocabulary and recorded)."""
    problem = config_error(config, hf_dir / "config.json")
    if problem:
        raise CheckpointError(f"{hf_dir / 'config.json'}: {problem}")
    layers, heads, h = config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]
    if heads % tensor:
        raise CheckpointError(f"--tensor {tensor} does not divide the model's {heads} attention heads")
    vocab, positions = config["vocab_size"], config["max_position_embeddings"]
    activation = {v: k for k, v in HF_ACTIVATIONS.items()}[config.get("hidden_act", "gelu")]
    model = model_section(BERT_TARGET, hf_dir.name, {"activation": activation, "layernorm_order": "pre"},
                          num_layers=layers, hidden_size=h, num_attention_heads=heads, seq_length=positions,
                          max_position_embeddings=positions, vocab_size=vocab,
                          dropout=config.get("hidden_dropout_prob"), init_std=config.get("initializer_range"),
                          layernorm_eps=config.get("layer_norm_eps", 1e-12))  # transformers' default eps
    hf = read_hf_safetensors(hf_dir)
    return write_checkpoint(out_dir, model, hf_to_mtlm(hf, heads), tensor,
                            {"huggingface": str(hf_dir.resolve())}, tokenizer_metadata(tokenizer, vocab, str(hf_dir)))
