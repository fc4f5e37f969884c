"""transformers' GPT-2 (GPT2LMHeadModel) <-> mtlm's GPT: the adapter `python -m mtlm.convert to-hf | from-hf`
picks for a GPT with learned positions / a `gpt2` folder (the table is in mtlm/convert/hf.py).

The two GPT-2s are the same network (pre-LN, learned positions, tanh GeLU, tied embeddings, eps 1e-5); the
tensors differ in layout only:
- HF's linear layers are Conv1D, weight [in, out]: the transpose of mtlm's (and torch.nn.Linear's) [out, in].
- HF's c_attn packs [q | k | v], each [heads][head_dim] ("3hd"); mtlm groups the fused rows by head,
  [head][q, k, v][head_dim] ("h3d"), so a tensor-parallel rank's rows are whole heads.
- HF's vocabulary is unpadded; mtlm checkpoints store only the real rows too (padding depends on the degree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlm.api import model_config
from mtlm.checkpoint.format import METADATA, CheckpointError, find_checkpoint
from mtlm.config import GPT_TARGET
from mtlm.convert.common import NameMap, model_section, reorder_qkv, write_hf_folder
from mtlm.convert.writer import read_checkpoint, read_hf_safetensors, tokenizer_metadata, write_checkpoint

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# mtlm's names <-> GPT2LMHeadModel's (without its `transformer.`); every tensor has the same layout but these.
_LAYERS = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2", "mlp.fc": "mlp.c_fc",
           "mlp.proj": "mlp.c_proj"}
NAMES = NameMap(("h.{}.",), {f"{k}.{w}": f"{v}.{w}" for k, v in _LAYERS.items() for w in ("weight", "bias")},
                {n: n for n in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")})
_CONV1D = (".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc.weight", ".mlp.proj.weight")  # HF: [in, out]


def mtlm_to_hf(tensors: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """mtlm parameter names/layouts (unpadded vocab) -> GPT2LMHeadModel's state-dict names/layouts."""
    out = {}
    for name, t in tensors.items():
        if ".attn.qkv." in name:
            t = reorder_qkv(t, heads, "h3d", "3hd")
        out[f"transformer.{NAMES.theirs(name)}"] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
    return out


def hf_to_mtlm(tensors: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """The inverse of mtlm_to_hf. Accepts names with or without the `transformer.` prefix; the tied
    lm_head.weight is not needed."""
    out = {}
    for key, t in tensors.items():
        name = NAMES.ours(key.removeprefix("transformer."))
        if name is None:
            continue
        t = t.t() if name.endswith(_CONV1D) else t
        out[name] = (reorder_qkv(t, heads, "3hd", "h3d") if ".attn.qkv." in name else t).contiguous()
    return out


def writes(model: dict) -> bool:
    """An mtlm model section this adapter exports: a GPT with learned positions."""
    return model.get("_target_", GPT_TARGET) == GPT_TARGET and model.get("position_embedding") != "alibi"


def to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers GPT2LMHeadModel folder (config.json, model.safetensors) from an mtlm checkpoint."""
    step_dir = find_checkpoint(checkpoint)
    meta, full = read_checkpoint(step_dir)
    m = model_config(meta)
    if m.layernorm_order != "pre":
        raise CheckpointError(f"{step_dir / METADATA}: model.layernorm_order={m.layernorm_order}, model.activation="
                              f"{m.activation}: transformers' GPT-2 / BLOOM are pre-LN (BLOOM: tanh GeLU only)")
    hf = mtlm_to_hf(full, m.num_attention_heads)
    eos = (meta.get("tokenizer") or {}).get("eos_id")
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
        "n_positions": m.max_position_embeddings, "n_ctx": m.max_position_embeddings, "n_embd": m.hidden_size,
        "n_layer": m.num_layers, "n_head": m.num_attention_heads, "n_inner": None,
        "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": m.layernorm_eps,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "initializer_range": m.init_std, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "torch_dtype": "float32", "mtlm": {"checkpoint": str(step_dir), "step": meta["step"]},
        # mtlm's tokenizer (sentencepiece, not converted) ends each document with eos; GPT-2 uses it as bos too.
        "bos_token_id": eos, "eos_token_id": eos,
    }
    return write_hf_folder(out_dir, hf, config)




def reads(config: dict) -> bool:
    return config.get("model_type") == "gpt2"


def _check(config: dict, config_path: Path) -> None:
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        raise CheckpointError(f"{config_path}: activation_function {config['activation_function']!r}; mtlm's "
                              f"GPT-2 uses the tanh GeLU ({' or '.join(TANH_GELUS)})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]) or config.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError(f"{config_path}: n_inner / scale_attn_by_inverse_layer_idx differ from GPT-2's")


def from_hf(hf_dir: Path, config: dict, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None) -> Path:
    """Import a GPT2LMHeadModel folder (its config.json read as `config`) as an mtlm checkpoint at `tensor`."""
    _check(config, hf_dir / "config.json")
    # `.attn.bias` / `.attn.masked_bias`: GPT-2 attention-mask buffers some files hold; not weights.
    hf = read_hf_safetensors(hf_dir, skip=(".attn.bias", ".attn.masked_bias"))
    layers, heads, h = config["n_layer"], config["n_head"], config["n_embd"]
    vocab, positions = config["vocab_size"], config["n_positions"]
    if heads % tensor:
        raise CheckpointError(f"--tensor {tensor} does not divide the model's {heads} attention heads")
    full = hf_to_mtlm(hf, heads)
    # No _target_: a GPT (these checkpoints were written before the key existed, and read the same).
    model = model_section(None, Path(hf_dir).name, num_layers=layers, hidden_size=h, num_attention_heads=heads,
                          seq_length=positions, max_position_embeddings=positions, vocab_size=vocab,
                          dropout=config.get("resid_pdrop"), init_std=config.get("initializer_range"),
                          layernorm_eps=config.get("layer_norm_epsilon"))
    return write_checkpoint(out_dir, model, full, tensor, {"huggingface": str(Path(hf_dir).resolve())},
                            tokenizer_metadata(tokenizer, vocab, str(hf_dir)))
