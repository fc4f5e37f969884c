"""Megatron-LM's legacy checkpoints (the NGC 345M releases and every Megatron-LM 1.x/2.x save) <-> mtlm.

    python -m mtlm.convert from-megatron megatron_lm_345m_v0.0.zip checkpoints/gpt2_345m --tensor 2
    python -m mtlm.convert to-megatron checkpoints/gpt2_345m megatron/gpt2_345m --tensor 4

A legacy checkpoint is one pickle per tensor rank (files: mtlm.convert.megatron_files; loading without
running code: mtlm.convert.pickles) holding `model` (the state dict, nested as `language_model.embedding` /
`language_model.transformer` or, from 2.x, `.encoder`), maybe `args`, and `checkpoint_version`:

- Each rank holds a contiguous slice of every split tensor: vocabulary rows of the embedding, output rows of
  the column-parallel GEMMs (qkv, h->4h), input columns of the row-parallel ones (attention out, 4h->h). That
  is also how mtlm splits them, so joining the ranks is a concatenation along the parameter's partition dim.
- The fused qkv rows of one rank are ordered by `checkpoint_version` (qkv_to_mtlm); mtlm's order is 2.0's.
- The embedding holds padded_vocab rows (a multiple of 128 x the saved tensor degree): mtlm keeps the real
  vocabulary (from the tokenizer files, `args.vocab_size`, or else all rows) and pads again for its degree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from mtlm.config import BERT_TARGET, CONF_DIR, GPT_TARGET, model_option
from mtlm.convert import common
from mtlm.convert.common import NameMap, reorder_qkv
from mtlm.convert.megatron_files import rank_files
from mtlm.convert.megatron_tokenizer import import_tokenizer
from mtlm.convert.pickles import safe_load
from mtlm.convert.writer import partition_dims, tokenizer_metadata, write_checkpoint
from mtlm.errors import CheckpointError
from mtlm.parallel.layers import pad_vocab_size

# mtlm's per-layer module name -> (Megatron 1.x name, Megatron 2.x name). 2.x renamed attention only.
LAYER_NAMES = {
    "ln1": ("input_layernorm", "input_layernorm"),
    "attn.qkv": ("attention.query_key_value", "self_attention.query_key_value"),
    "attn.proj": ("attention.dense", "self_attention.dense"),
    "ln2": ("post_attention_layernorm", "post_attention_layernorm"),
    "mlp.fc": ("mlp.dense_h_to_4h", "mlp.dense_h_to_4h"),
    "mlp.proj": ("mlp.dense_4h_to_h", "mlp.dense_4h_to_h"),
}
_WB = ("weight", "bias")
_WRITTEN_TOP = {  # mtlm's name -> Megatron-LM 2.x / 3.0's (after `language_model.`; the heads beside it)
    "wte.weight": "embedding.word_embeddings.weight", "wpe.weight": "embedding.position_embeddings.weight",
    "tte.weight": "embedding.tokentype_embeddings.weight",  # Megatron-BERT's from here on
    **{f"ln_f.{w}": f"encoder.final_layernorm.{w}" for w in _WB}, **{f"pooler.{w}": f"pooler.dense.{w}" for w in _WB},
    **{f"lm_head.dense.{w}": f"lm_head.dense.{w}" for w in _WB},
    **{f"lm_head.ln.{w}": f"lm_head.layernorm.{w}" for w in _WB}, "lm_head.bias": "lm_head.bias",
    **{f"sop_head.{w}": f"binary_head.{w}" for w in _WB},
}
_OLDER_TOP = {  # what 2019 and 1.x files call them: no `embedding.`, `transformer.`, lm_head's `norm`
    "word_embeddings.weight": "wte.weight", "position_embeddings.weight": "wpe.weight",
    "tokentype_embeddings.weight": "tte.weight", **{f"transformer.final_layernorm.{w}": f"ln_f.{w}" for w in _WB},
    **{f"lm_head.norm.{w}": f"lm_head.ln.{w}" for w in _WB},
}
# Megatron GPT-2 / BERT names of every generation (after `language_model.`) <-> mtlm's.
NAMES = NameMap(("encoder.layers.{}.", "transformer.layers.{}."),
                {f"{k}.{w}": f"{v[1]}.{w}" for k, v in LAYER_NAMES.items() for w in _WB}, _WRITTEN_TOP,
                read_layer={f"{v[0]}.{w}": f"{k}.{w}" for k, v in LAYER_NAMES.items() for w in _WB},
                read_top=_OLDER_TOP)
VERSIONS = (0, 1.0, 2.0, 3.0)
QKV_ORDERS = {0: "3hd", 1.0: "hd3"}  # the fused qkv rows' order by checkpoint_version (common.reorder_qkv)


def flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested state dicts (Megatron nests embedding / transformer / word_embeddings) -> dotted names."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif torch.is_tensor(tree):
        out[prefix[:-1]] = tree
    return out


def mtlm_name(name: str) -> str | None:
    """A Megatron GPT-2 or BERT parameter name (any generation) -> mtlm's, or None if it is not one."""
    return NAMES.ours(re.sub(r"^(?:module\.)*(?:language_model\.)?", "", name))


def qkv_to_mtlm(rows: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """One rank's fused qkv rows (weight or bias) of `heads` heads in `checkpoint_version`'s order -> mtlm's
    [head][q,k,v][d]. 0: [q,k,v][head][d] (all queries first); 1.0: [head][d][q,k,v]; 2.0 and 3.0: mtlm's."""
    return reorder_qkv(rows, heads, QKV_ORDERS.get(version, "h3d"), "h3d")


def _version(ckpt: dict, label: str) -> float:
    version = ckpt.get("checkpoint_version", 0)
    if version not in VERSIONS:
        raise CheckpointError(f"{label}: checkpoint_version {version!r}: mtlm reads versions 0, 1.0, 2.0, 3.0")
    return float(version)


def _check_args(args: Any, label: str) -> None:
    """Architecture switches of later Megatron-LM that mtlm's GPT-2 cannot represent: refuse, never ignore."""
    unsupported = {"apply_residual_connection_post_layernorm": True, "untie_embeddings_and_output_weights": True,
                   "swiglu": True, "group_query_attention": True, "add_bias_linear": False}
    for key, bad in unsupported.items():
        if getattr(args, key, not bad) == bad:
            raise CheckpointError(f"{label}: args.{key}={bad}: mtlm's GPT-2 cannot represent this model")
    for key, fine in {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm"}.items():
        if getattr(args, key, fine) != fine:
            raise CheckpointError(f"{label}: args.{key}={getattr(args, key)!r}: mtlm's GPT-2 needs {fine!r}")


def read_preset(name: str) -> dict:
    """conf/model/NAME.yaml as a dict (what a file without args cannot say: heads, sequence length, ...)."""
    from omegaconf import OmegaConf

    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        raise CheckpointError(f"--preset {name}: no {path}")
    return dict(OmegaConf.to_container(OmegaConf.load(path)))


def read_megatron(src: str | Path) -> tuple[list[dict[str, torch.Tensor]], Any, float, dict]:
    """(per-rank tensors by mtlm name in the file's own qkv order, args or None, version, info)."""
    ranks, args, version, info = [], None, None, {}
    for rf in rank_files(src):
        ckpt = safe_load(rf.read(), rf.name)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"{rf.name}: no 'model' state dict: not a Megatron-LM checkpoint")
        v = _version(ckpt, rf.name)
        if version is not None and v != version:
            raise CheckpointError(f"{rf.name}: checkpoint_version {v}, tensor rank 0 has {version}")
        version, args = v, ckpt.get("args", args)
        info = {"iteration": ckpt.get("iteration"), "checkpoint_version": v}
        tensors = {}
        for name, t in flatten(ckpt["model"]).items():
            ours = mtlm_name(name)
            if ours is None:
                raise CheckpointError(f"{rf.name}: unexpected tensor {name}: not part of a GPT-2 or BERT model "
                                      "mtlm can represent")
            tensors[ours] = t
        ranks.append(tensors)
    if args is not None:
        _check_args(args, str(src))
    return ranks, args, version, info


def join_ranks(ranks: list[dict[str, torch.Tensor]], version: float, heads: int,
               dims: dict[str, int | None], label: str) -> dict[str, torch.Tensor]:
    """Undo each rank's qkv order, then concatenate the ranks' slices along each parameter's partition dim."""
    t = len(ranks)
    if heads % t:
        raise CheckpointError(f"{label}: {t} tensor ranks do not divide {heads} attention heads")

    def mtlm_order(name: str, rows: torch.Tensor) -> torch.Tensor:
        if ".attn.qkv." not in name:
            return rows
        if rows.shape[0] % (3 * (heads // t)):
            raise CheckpointError(f"{label}: {name} has {rows.shape[0]} rows per rank, not 3 x "
                                  f"{heads // t} heads x head_dim (wrong --num-attention-heads?)")
        return qkv_to_mtlm(rows, version, heads // t)

    return common.join_ranks([{n: mtlm_order(n, p) for n, p in r.items()} for r in ranks], dims.get, label)


def _real_vocab(rows: int, saved_tensor: int, divisible: int, tokenizer: Any, args: Any, label: str) -> int:
    """The real vocabulary size: the tokenizer's, else args.vocab_size, else every row (said on stderr)."""
    if tokenizer is not None:  # its fit was checked by tokenizer_metadata
        return tokenizer.vocab_size
    size = getattr(args, "vocab_size", None)
    if size is None:
        print(f"note: {label}: the real vocabulary size is unknown (no tokenizer files given, no args.vocab_size): "
              f"keeping all {rows} embedding rows, padding included", file=sys.stderr)
        return rows
    if pad_vocab_size(size, divisible, saved_tensor) != rows:
        raise CheckpointError(f"{label}: args.vocab_size={size}, but the embedding has {rows} rows, which is not "
                              f"{size} padded to a multiple of {divisible} x {saved_tensor} tensor ranks")
    return size


def cut_to_real_vocab(full: dict[str, torch.Tensor], model: dict, tokenizer: Any, args: Any, saved_tensor: int,
                      label: str) -> dict | None:
    """Check the tokenizer against the padded embedding (model.vocab_size rows), then cut `full` and the model
    section to the real vocabulary (_real_vocab). Returns the tokenizer's metadata entry (None without one)."""
    rows, divisible = model["vocab_size"], model["make_vocab_size_divisible_by"]
    extra = tokenizer_metadata(tokenizer, rows, label, divisible, saved_tensor)
    model["vocab_size"] = _real_vocab(rows, saved_tensor, divisible, tokenizer, args, label)
    common.cut_vocab(full, model["vocab_size"])
    return extra


def _activation(args: Any) -> str:
    """Megatron-LM's GeLU: its fused bias-GeLU kernel (the default, and all 2019-2020 code) and --openai-gelu
    are the tanh approximation; only --no-bias-gelu-fusion without --openai-gelu runs the exact (erf) one."""
    if args is not None and getattr(args, "bias_gelu_fusion", True) is False and not getattr(args, "openai_gelu",
                                                                                           False):
        return "gelu"
    return "gelu_tanh"


def model_section(first: dict[str, torch.Tensor], saved_tensor: int, args: Any, spec: dict, heads: int,
                  name: str) -> dict:
    """The mtlm model section of a Megatron checkpoint: shapes from the tensors, the rest from args (else the
    preset, else Megatron's defaults: tanh GeLU). vocab_size is the embedding's rows; the caller cuts the
    padding."""
    bert = "tte.weight" in first or "lm_head.bias" in first
    positions = first["wpe.weight"].shape[0]
    dropout = getattr(args, "hidden_dropout", None) if args is not None else spec.get("dropout")
    options = {"activation": _activation(args) if args is not None else model_option(spec, "activation"),
               "layernorm_order": "pre"}
    return common.model_section(
        BERT_TARGET if bert else GPT_TARGET, name, options,
        num_layers=1 + max(int(n.split(".")[1]) for n in first if n.startswith("blocks.")),
        hidden_size=first["wte.weight"].shape[1], num_attention_heads=heads,
        seq_length=min(getattr(args, "seq_length", None) or spec.get("seq_length", positions), positions),
        max_position_embeddings=positions, vocab_size=first["wte.weight"].shape[0] * saved_tensor,
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", None) or spec.get(
            "make_vocab_size_divisible_by"),
        dropout=dropout, init_std=getattr(args, "init_method_std", None),
        layernorm_eps=getattr(args, "layernorm_epsilon", None))


def from_megatron(src: str | Path, out_dir: str | Path, tensor: int = 1, preset: str | None = None,
                  num_attention_heads: int | None = None, tokenizer: Any = None) -> Path:
    """Import a legacy Megatron-LM GPT-2 or BERT checkpoint as an mtlm checkpoint folder at `tensor`.

    Heads cannot be read off the tensors: they come from the file's args, else `num_attention_heads`, else
    the preset (a conf/model name). `tokenizer`: the tokenizer the model was trained with (mtlm.data); its
    size is checked against the embedding, and it is recorded in the checkpoint's metadata."""
    label = str(src)
    ranks, args, version, info = read_megatron(src)
    if tokenizer is None:  # none given: the one its args name (to-megatron writes it beside the files)
        tokenizer = import_tokenizer(args, src, label)
    first = ranks[0]
    for needed in ("wte.weight", "wpe.weight", "ln_f.weight"):
        if needed not in first:
            raise CheckpointError(f"{label}: no {needed.split('.')[0]} tensor: not a GPT-2 or BERT checkpoint")
    spec = read_preset(preset) if preset else {}
    heads = getattr(args, "num_attention_heads", None) or num_attention_heads or spec.get("num_attention_heads")
    if heads is None:
        raise CheckpointError(f"{label}: no args in the file, so the number of attention heads is unknown: pass "
                              "--num-attention-heads N or --preset NAME")
    model = model_section(first, len(ranks), args, spec, heads, preset or Path(out_dir).name)
    for key in ("num_attention_heads", "num_layers", "hidden_size"):
        value = num_attention_heads if key == "num_attention_heads" else model[key]
        for where, have in (("args", getattr(args, key, None)), (f"--preset {preset}", spec.get(key))):
            if have is not None and value is not None and have != value:
                raise CheckpointError(f"{label}: {where} says {key}={have}, the checkpoint has {value}")
    rows = model["vocab_size"]
    dims = partition_dims(model, rows)
    full = join_ranks(ranks, version, heads, dims, label)
    if "sop_head.weight" in dims and "sop_head.weight" not in full:
        # Trained without --bert-binary-head: mtlm's BERT has one; it starts at zero (logits 0: no opinion).
        print(f"note: {label}: no binary head (trained without sentence-order prediction); mtlm's starts at zero",
              file=sys.stderr)
        full["sop_head.weight"] = torch.zeros(2, model["hidden_size"])
        full["sop_head.bias"] = torch.zeros(2)
    extra = cut_to_real_vocab(full, model, tokenizer, args, len(ranks), label)
    source = {"megatron": str(Path(src).resolve()), "iteration": info["iteration"],
              "checkpoint_version": version, "tensor": len(ranks)}
    return write_checkpoint(out_dir, model, full, tensor, source, extra)
