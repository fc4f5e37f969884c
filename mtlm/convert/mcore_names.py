"""Megatron-Core's GPT parameter names <-> mtlm's, for both of its layer specs and its checkpoint keys.

A megatron-core GPTModel (`megatron.core.models.gpt.GPTModel`) names its parameters by module:

    embedding.word_embeddings.weight  embedding.position_embeddings.weight
    decoder.layers.N.input_layernorm.*            (local spec; Transformer Engine fuses it into the next
    decoder.layers.N.self_attention.linear_qkv.*   linear: linear_qkv.layer_norm_weight / _bias)
    decoder.layers.N.self_attention.linear_proj.*
    decoder.layers.N.pre_mlp_layernorm.*          (TE: mlp.linear_fc1.layer_norm_weight / _bias)
    decoder.layers.N.mlp.linear_fc1.*  decoder.layers.N.mlp.linear_fc2.*
    decoder.final_layernorm.*  output_layer.weight (absent when tied to the word embeddings)

Its distributed (`torch_dist`) checkpoints use the Transformer Engine names for the layer norms whatever the
spec, and stack the layers: `decoder.layers.self_attention.linear_qkv.weight` is [num_layers, 3h, h].
The qkv rows are [head][q, k, v][head_dim] (one query group per head without GQA): mtlm's own order, so
tensors are copied, never permuted. Megatron's linear weights are [out, in], as torch's.
"""

from __future__ import annotations

from mtlm.convert.common import NameMap

# mtlm block parameter -> (local-spec name, TE-spec / torch_dist name), under decoder.layers.N.
LAYER = {
    "ln1.weight": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "ln1.bias": ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    "attn.qkv.weight": ("self_attention.linear_qkv.weight",) * 2,
    "attn.qkv.bias": ("self_attention.linear_qkv.bias",) * 2,
    "attn.proj.weight": ("self_attention.linear_proj.weight",) * 2,
    "attn.proj.bias": ("self_attention.linear_proj.bias",) * 2,
    "ln2.weight": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "ln2.bias": ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    "mlp.fc.weight": ("mlp.linear_fc1.weight",) * 2,
    "mlp.fc.bias": ("mlp.linear_fc1.bias",) * 2,
    "mlp.proj.weight": ("mlp.linear_fc2.weight",) * 2,
    "mlp.proj.bias": ("mlp.linear_fc2.bias",) * 2,
}
GLOBAL = {
    "wte.weight": "embedding.word_embeddings.weight",
    "wpe.weight": "embedding.position_embeddings.weight",
    "ln_f.weight": "decoder.final_layernorm.weight",
    "ln_f.bias": "decoder.final_layernorm.bias",
}
# megatron-core's BertModel (pre-LN; its layers under `encoder.` instead of `decoder.`) -> mtlm's BERT.
BERT_GLOBAL = {
    "embedding.word_embeddings.weight": "wte.weight", "embedding.position_embeddings.weight": "wpe.weight",
    "embedding.tokentype_embeddings.weight": "tte.weight",
    "encoder.final_layernorm.weight": "ln_f.weight", "encoder.final_layernorm.bias": "ln_f.bias",
    "pooler.dense.weight": "pooler.weight", "pooler.dense.bias": "pooler.bias",
    "lm_head.dense.weight": "lm_head.dense.weight", "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.ln.weight", "lm_head.layer_norm.bias": "lm_head.ln.bias",
    "output_layer.bias": "lm_head.bias", "binary_head.weight": "sop_head.weight", "binary_head.bias": "sop_head.bias",
}
OUTPUT_LAYER = "output_layer.weight"
_PREFIXES = ("decoder.layers.{}.", "encoder.layers.{}.")  # GPTModel's decoder, BertModel's encoder
# The local spec's names (the module tree's), reading the TE names and BertModel's too; and the TE names.
LOCAL = NameMap(_PREFIXES, {k: v[0] for k, v in LAYER.items()}, GLOBAL,
                read_layer={v[1]: k for k, v in LAYER.items()}, read_top=BERT_GLOBAL)
TE = NameMap(_PREFIXES, {k: v[1] for k, v in LAYER.items()}, GLOBAL)


def mcore_name(name: str, te: bool = False) -> str:
    """megatron-core's name of mtlm parameter `name` (local spec, or TE names with te=True)."""
    return (TE if te else LOCAL).theirs(name)


def mtlm_name(name: str) -> str | None:
    """mtlm's name of a megatron-core GPT or BERT parameter (either spec), or None for one mtlm has no place
    for."""
    return LOCAL.ours(name)


def to_mcore_state(full: dict, te: bool = False) -> dict:
    """mtlm's whole tensors -> a megatron-core GPTModel state dict (tied output: no output_layer)."""
    return {mcore_name(n, te): t for n, t in full.items()}
