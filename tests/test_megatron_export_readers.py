"""`to-megatron` files read by the rules of transformers' own Megatron converters give mtlm's logits.

transformers' `convert_megatron_bert_checkpoint.py` and `convert_megatron_gpt2_checkpoint.py` (4.x; no longer
shipped in the installed wheel) walk the encoder dict of `mp_rank_00/model_optim_rng.pt` in file order:
- Megatron-BERT's walk stops at the first key that is not `layers.N.*`, so a file whose `final_layernorm`
  comes first yields no layers at all; it also needs each layer's qkv weight before its qkv bias;
- Megatron-GPT2's walk skips non-layer keys but asserts the last layer key seen is layer num_layers - 1;
- both take the shape from the saved args (vocabulary = padded_vocab_size), un-permute qkv from the
  version >= 2.0 order [heads][3][head_dim], and GPT-2's takes its GeLU from bias_gelu_fusion / openai_gelu.
The readers below restate those rules (written for this test, not copied) and load transformers' models.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mtlm import load_model
from mtlm.convert.megatron import from_megatron
from mtlm.convert.megatron_export import to_megatron
from mtlm.convert.pickles import safe_load
from tests.megatron_layouts import (
    HEADS,
    POSITIONS,
    VOCAB,
    random_gpt2,
    random_megatron_bert,
    write_megatron,
    write_megatron_bert,
)
from tests.test_convert_megatron import _tok

LAYER_KEY = re.compile(r"layers\.(\d+)\.([a-z0-9_.]+)\.([a-z0-9_]+)$")


def _qkv_to_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Version >= 2.0 rows [heads][3][head_dim] -> [3][heads][head_dim] (q rows, then k, then v)."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _release_file(root: Path) -> dict:
    return safe_load(root / "release" / "mp_rank_00" / "model_optim_rng.pt")


def read_like_hf_bert(ckpt: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Megatron-BERT converter's reading rules: shape from args, layers until the first non-layer key."""
    args, model, heads = ckpt["args"], ckpt["model"], ckpt["args"].num_attention_heads
    lm, out = model["language_model"], {}
    emb = lm["embedding"]
    out["bert.embeddings.word_embeddings.weight"] = emb["word_embeddings"]["weight"][:args.padded_vocab_size]
    out["bert.embeddings.position_embeddings.weight"] = emb["position_embeddings"]["weight"]
    out["bert.embeddings.token_type_embeddings.weight"] = emb["tokentype_embeddings"]["weight"]
    renames = {"self_attention.dense": "attention.output.dense", "mlp.dense_h_to_4h": "intermediate.dense",
               "mlp.dense_4h_to_h": "output.dense"}
    pending_qkv = None
    for key, value in lm["encoder"].items():
        m = LAYER_KEY.match(key)
        if m is None:
            break  # the converter's rule: the layers are over
        prefix, op, kind = f"bert.encoder.layer.{m[1]}", m[2], m[3]
        if op.endswith("layernorm"):
            out[f"{prefix}.{'attention.ln' if op.startswith('input') else 'ln'}.{kind}"] = value
        elif op == "self_attention.query_key_value" and kind == "weight":
            assert pending_qkv is None, "two qkv weights without a bias between them"
            pending_qkv = _qkv_to_split(value, heads)
        elif op == "self_attention.query_key_value":
            assert pending_qkv is not None, "qkv bias before its weight"
            for i, part in enumerate(("query", "key", "value")):
                rows = slice(i * args.hidden_size, (i + 1) * args.hidden_size)
                out[f"{prefix}.attention.self.{part}.weight"] = pending_qkv[rows]
                out[f"{prefix}.attention.self.{part}.bias"] = _qkv_to_split(value, heads)[rows]
            pending_qkv = None
        else:
            out[f"{prefix}.{renames[op]}.{kind}"] = value
    for kind in ("weight", "bias"):
        out[f"bert.encoder.ln.{kind}"] = lm["encoder"][f"final_layernorm.{kind}"]
        out[f"bert.pooler.dense.{kind}"] = lm["pooler"][f"dense.{kind}"]
        out[f"cls.predictions.transform.dense.{kind}"] = model["lm_head"][f"dense.{kind}"]
        out[f"cls.predictions.transform.LayerNorm.{kind}"] = model["lm_head"][f"layernorm.{kind}"]
        out[f"cls.seq_relationship.{kind}"] = model["binary_head"][kind]
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.bias"] = model["lm_head"]["bias"]
    shape = {"vocab_size": args.padded_vocab_size, "max_position_embeddings": args.max_position_embeddings,
             "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers, "num_attention_heads": heads,
             "intermediate_size": args.ffn_hidden_size}
    return shape, out


def read_like_hf_gpt2(ckpt: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Megatron-GPT2 converter's reading rules: every layer key, the last one must be the last layer."""
    args, heads = ckpt["args"], ckpt["args"].num_attention_heads
    lm, out = ckpt["model"]["language_model"], {}
    wte = lm["embedding"]["word_embeddings"]["weight"][:args.padded_vocab_size]
    out["transformer.wte.weight"] = out["lm_head.weight"] = wte
    out["transformer.wpe.weight"] = lm["embedding"]["position_embeddings"]["weight"]
    renames = {"self_attention.dense": "attn.c_proj", "mlp.dense_h_to_4h": "mlp.c_fc",
               "mlp.dense_4h_to_h": "mlp.c_proj"}
    last = None
    for key, value in lm["encoder"].items():
        m = LAYER_KEY.match(key)
        if m is None:
            continue
        last, prefix, op, kind = int(m[1]), f"transformer.h.{m[1]}", m[2], m[3]
        if op.endswith("layernorm"):
            out[f"{prefix}.{'ln_1' if op.startswith('input') else 'ln_2'}.{kind}"] = value
        elif op == "self_attention.query_key_value":
            value = _qkv_to_split(value, heads)
            out[f"{prefix}.attn.c_attn.{kind}"] = value.t() if kind == "weight" else value  # Conv1D: [in, out]
        else:
            out[f"{prefix}.{renames[op]}.{kind}"] = value.t() if kind == "weight" else value
    assert last == args.num_layers - 1, f"the converter's check: last layer key seen is {last}"
    out["transformer.ln_f.weight"] = lm["encoder"]["final_layernorm.weight"]
    out["transformer.ln_f.bias"] = lm["encoder"]["final_layernorm.bias"]
    act = "gelu_fast" if args.bias_gelu_fusion else "gelu_new" if args.openai_gelu else "gelu"
    shape = {"vocab_size": args.padded_vocab_size, "n_positions": args.max_position_embeddings,
             "n_embd": args.hidden_size, "n_layer": args.num_layers, "n_head": heads,
             "n_inner": args.ffn_hidden_size, "activation_function": act}
    return shape, out


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every parameter of transformers' model comes from the file (buffers such as position_ids aside)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    assert not missing, f"not read from the export: {missing[:4]} ({len(missing)} in all)"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def test_bert_export_is_read_by_the_megatron_bert_converter_rules(tmp_path: Path) -> None:
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    src = write_megatron_bert(tmp_path / "meg", random_megatron_bert(act="gelu"), 3.0, 1, True, True,
                              {"bias_gelu_fusion": False})
    from_megatron(src, tmp_path / "ck", 1)
    ours = load_model(tmp_path / "ck")
    to_megatron(tmp_path / "ck", tmp_path / "out")
    ckpt = _release_file(tmp_path / "out")
    encoder = list(ckpt["model"]["language_model"]["encoder"])
    assert encoder[-2:] == ["final_layernorm.weight", "final_layernorm.bias"]
    assert list(ckpt["model"]) == ["language_model", "lm_head", "binary_head"]
    shape, state = read_like_hf_bert(ckpt)
    assert shape["num_hidden_layers"] == 2
    config = MegatronBertConfig(**shape, hidden_act="gelu", layer_norm_eps=ckpt["args"].layernorm_epsilon,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2)
    theirs = MegatronBertForPreTraining(config).eval()
    _load_strict(theirs, state)
    ids = torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))
    types = (torch.arange(POSITIONS) >= POSITIONS // 2).long().expand(2, -1)
    mask = torch.ones(2, POSITIONS, dtype=torch.long)
    with torch.no_grad():
        mlm, sop = ours(ids, types, mask)
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    assert out.prediction_logits.std() > 1.0
    scale = out.prediction_logits.abs().max().item()
    torch.testing.assert_close(out.prediction_logits[..., :VOCAB], mlm[..., :VOCAB], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out.seq_relationship_logits, sop, rtol=1e-5, atol=1e-5 * scale)


def test_gpt2_export_is_read_by_the_megatron_gpt2_converter_rules(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    src = write_megatron(tmp_path / "meg", random_gpt2(), 3.0, 2, True, False)
    from_megatron(src, tmp_path / "ck", 1, tokenizer=_tok(VOCAB), num_attention_heads=HEADS)
    ours = load_model(tmp_path / "ck")
    to_megatron(tmp_path / "ck", tmp_path / "out")  # the converters read one rank: tensor degree 1
    ckpt = _release_file(tmp_path / "out")
    layers = [k for k in ckpt["model"]["language_model"]["encoder"] if k.startswith("layers.")]
    assert layers == list(ckpt["model"]["language_model"]["encoder"])[:len(layers)]  # layers come first
    shape, state = read_like_hf_gpt2(ckpt)
    assert shape["activation_function"] == "gelu_fast"  # mtlm's tanh GeLU = Megatron's fused bias-GeLU
    theirs = GPT2LMHeadModel(GPT2Config(**shape, layer_norm_epsilon=ckpt["args"].layernorm_epsilon,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    _load_strict(theirs, state)
    ids = torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, logits = ours(ids)[..., :VOCAB], theirs(ids).logits[..., :VOCAB]
    assert logits.std() > 1.0
    torch.testing.assert_close(logits, mine, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
