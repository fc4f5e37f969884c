"""Small checkpoints in Megatron-LM's exact legacy layouts, written from a transformers GPT-2's weights.

This is the tests' own rendering of the layout facts (../shared/reference/released-models.md), written
independently of mtlm.convert.megatron so that a mistake there cannot cancel out here:

- per tensor rank: vocabulary rows of the word embeddings, output rows of qkv and h->4h, input columns of the
  attention output and 4h->h; position embeddings, layer norms and the row-parallel biases whole;
- qkv rows of one rank by checkpoint_version: 0 [3][np][hn], 1.0 [np][hn][3], 2.0 / 3.0 [np][3][hn];
- names: `transformer` + `attention` (1.x) or `encoder` + `self_attention` (2.x); embeddings nested.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

VOCAB, HIDDEN, HEADS, LAYERS, POSITIONS = 300, 64, 4, 2, 32


def random_gpt2(seed: int = 0, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS,
                vocab: int = VOCAB, positions: int = POSITIONS):
    """A GPT2LMHeadModel with large random weights, biases and layer-norm gains, so every layout slip shows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.2, layer_norm_epsilon=1e-5, bos_token_id=vocab - 1,
                        eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _qkv_rows(w: torch.Tensor, heads: int, rank: int, tensor: int, version: float) -> torch.Tensor:
    """GPT-2's [q|k|v][head][d] rows -> this rank's heads, in `version`'s row order."""
    np_ = heads // tensor
    rows = w.reshape(3, heads, w.shape[0] // (3 * heads), *w.shape[1:])[:, rank * np_:(rank + 1) * np_]
    if version == 0:
        pass  # [3, np, hn]
    elif version == 1.0:
        rows = rows.movedim(0, 2)  # [np, hn, 3]
    else:
        rows = rows.movedim(0, 1)  # [np, 3, hn]
    return rows.reshape(-1, *w.shape[1:])


def rank_state(hf_sd: dict[str, torch.Tensor], heads: int, rank: int, tensor: int, version: float,
               new_names: bool, padded_vocab: int) -> dict:
    """`model` of tensor rank `rank`'s file."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    hidden = sd["wte.weight"].shape[1]
    gen = torch.Generator().manual_seed(99)  # Megatron's padding rows are trained like any other: not zero
    wte = torch.cat([sd["wte.weight"], torch.randn(padded_vocab - sd["wte.weight"].shape[0], hidden,
                                                    generator=gen)])

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tensor, 0)[rank].clone()

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tensor, 1)[rank].clone()

    stack, attn = ("encoder", "self_attention") if new_names else ("transformer", "attention")
    layers: dict[str, torch.Tensor] = {}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    for i in range(n_layers):
        h, m = f"h.{i}.", f"layers.{i}."
        layers[m + "input_layernorm.weight"] = sd[h + "ln_1.weight"].clone()
        layers[m + "input_layernorm.bias"] = sd[h + "ln_1.bias"].clone()
        layers[m + f"{attn}.query_key_value.weight"] = _qkv_rows(sd[h + "attn.c_attn.weight"].t(), heads, rank,
                                                                 tensor, version).clone()
        layers[m + f"{attn}.query_key_value.bias"] = _qkv_rows(sd[h + "attn.c_attn.bias"], heads, rank, tensor,
                                                               version).clone()
        layers[m + f"{attn}.dense.weight"] = cols(sd[h + "attn.c_proj.weight"].t())
        layers[m + f"{attn}.dense.bias"] = sd[h + "attn.c_proj.bias"].clone()
        layers[m + "post_attention_layernorm.weight"] = sd[h + "ln_2.weight"].clone()
        layers[m + "post_attention_layernorm.bias"] = sd[h + "ln_2.bias"].clone()
        layers[m + "mlp.dense_h_to_4h.weight"] = rows(sd[h + "mlp.c_fc.weight"].t())
        layers[m + "mlp.dense_h_to_4h.bias"] = rows(sd[h + "mlp.c_fc.bias"])
        layers[m + "mlp.dense_4h_to_h.weight"] = cols(sd[h + "mlp.c_proj.weight"].t())
        layers[m + "mlp.dense_4h_to_h.bias"] = sd[h + "mlp.c_proj.bias"].clone()
    layers["final_layernorm.weight"] = sd["ln_f.weight"].clone()
    layers["final_layernorm.bias"] = sd["ln_f.bias"].clone()
    embedding = {"word_embeddings": {"weight": rows(wte)},
                 "position_embeddings": {"weight": sd["wpe.weight"].clone()}}
    return {"language_model": {"embedding": embedding, stack: layers}}


def megatron_args(layers: int, hidden: int, heads: int, positions: int, padded_vocab: int, tensor: int,
                  version: float) -> argparse.Namespace:
    size = {"tensor_model_parallel_size": tensor} if version >= 2.0 else {"model_parallel_size": tensor}
    return argparse.Namespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                              max_position_embeddings=positions, seq_length=positions, padded_vocab_size=padded_vocab,
                              make_vocab_size_divisible_by=128, layernorm_epsilon=1e-5, hidden_dropout=0.1,
                              init_method_std=0.02, params_dtype=torch.float16, fp16=True, **size)


def write_megatron(root: Path, hf_model, version: float, tensor: int, new_names: bool, with_args: bool,
                   zipped: bool = False, legacy_pickle: bool = False, iteration: int | None = None,
                   extra: dict | None = None) -> Path:
    """Write the checkpoint folder (tracker + release/ or iter_*/ + mp_rank_*); returns it, or its zip."""
    cfg = hf_model.config
    padded = -(-cfg.vocab_size // (128 * tensor)) * 128 * tensor
    hf_sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    folder = "release" if iteration is None else f"iter_{iteration:07d}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    for rank in range(tensor):
        ckpt = {"model": rank_state(hf_sd, cfg.n_head, rank, tensor, version, new_names, padded),
                "iteration": iteration or 0, **(extra or {})}
        if version:
            ckpt["checkpoint_version"] = version
        if with_args:
            ckpt["args"] = megatron_args(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, padded, tensor,
                                         version)
        path = root / folder / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_pickle)
    if not zipped:
        return root
    archive = root.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(root).as_posix())
    return archive


def rng_states() -> dict:
    """What Megatron saves next to the weights in a full (non-release) checkpoint."""
    return {"random_rng_state": __import__("random").getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {"model-parallel-rng":
                                                                              torch.get_rng_state()}}


def pickle_bytes(obj: object, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def random_megatron_bert(seed: int = 0, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS,
                         vocab: int = VOCAB, positions: int = POSITIONS, act: str = "gelu_new"):
    """A transformers MegatronBertForPreTraining with large random weights (eps 1e-5, Megatron's)."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(seed)
    config = MegatronBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * hidden, hidden_act=act,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                max_position_embeddings=positions, type_vocab_size=2, initializer_range=0.2,
                                layer_norm_eps=1e-5)
    model = MegatronBertForPreTraining(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln." in name or "LayerNorm" in name or name.endswith(".ln.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def bert_rank_state(hf_sd: dict[str, torch.Tensor], heads: int, rank: int, tensor: int, version: float,
                    new_names: bool, padded_vocab: int, binary_head: bool = True) -> dict:
    """`model` of tensor rank `rank`'s file of a Megatron-BERT, from MegatronBertForPreTraining's weights."""
    sd = {k.removeprefix("bert."): v for k, v in hf_sd.items()}
    gpt_like = {"transformer.wte.weight": sd["embeddings.word_embeddings.weight"],
                "transformer.wpe.weight": sd["embeddings.position_embeddings.weight"],
                "transformer.ln_f.weight": sd["encoder.ln.weight"], "transformer.ln_f.bias": sd["encoder.ln.bias"]}
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        e, h = f"encoder.layer.{i}.", f"transformer.h.{i}."
        qkv = [sd[f"{e}attention.self.{x}.weight"] for x in ("query", "key", "value")]
        gpt_like[h + "attn.c_attn.weight"] = torch.cat(qkv).t()  # GPT-2's Conv1D layout: [in, out]
        gpt_like[h + "attn.c_attn.bias"] = torch.cat([sd[f"{e}attention.self.{x}.bias"]
                                                      for x in ("query", "key", "value")])
        for ours, theirs in (("ln_1", "attention.ln"), ("ln_2", "ln")):
            gpt_like[f"{h}{ours}.weight"], gpt_like[f"{h}{ours}.bias"] = sd[f"{e}{theirs}.weight"], \
                sd[f"{e}{theirs}.bias"]
        for ours, theirs in (("attn.c_proj", "attention.output.dense"), ("mlp.c_fc", "intermediate.dense"),
                             ("mlp.c_proj", "output.dense")):
            gpt_like[f"{h}{ours}.weight"] = sd[f"{e}{theirs}.weight"].t()
            gpt_like[f"{h}{ours}.bias"] = sd[f"{e}{theirs}.bias"]
    state = rank_state(gpt_like, heads, rank, tensor, version, new_names, padded_vocab)
    lm = state["language_model"]
    lm["embedding"]["tokentype_embeddings"] = {"weight": sd["embeddings.token_type_embeddings.weight"].clone()}
    lm["pooler"] = {"dense.weight": sd["pooler.dense.weight"].clone(), "dense.bias": sd["pooler.dense.bias"].clone()}
    bias = torch.cat([sd["cls.predictions.bias"], torch.randn(padded_vocab - sd["cls.predictions.bias"].shape[0])])
    norm = "norm" if version >= 3.0 else "layernorm"  # newer Megatron-LM renamed it
    state["lm_head"] = {"bias": bias.chunk(tensor)[rank].clone(),
                        "dense.weight": sd["cls.predictions.transform.dense.weight"].clone(),
                        "dense.bias": sd["cls.predictions.transform.dense.bias"].clone(),
                        f"{norm}.weight": sd["cls.predictions.transform.LayerNorm.weight"].clone(),
                        f"{norm}.bias": sd["cls.predictions.transform.LayerNorm.bias"].clone()}
    if binary_head:
        state["binary_head"] = {"weight": sd["cls.seq_relationship.weight"].clone(),
                                "bias": sd["cls.seq_relationship.bias"].clone()}
    return state


def write_megatron_bert(root: Path, hf_model, version: float, tensor: int, with_args: bool,
                        binary_head: bool = True, extra_args: dict | None = None) -> Path:
    """A Megatron-BERT checkpoint folder (tracker + release/mp_rank_*) from a MegatronBertForPreTraining."""
    cfg = hf_model.config
    padded = -(-cfg.vocab_size // (128 * tensor)) * 128 * tensor
    hf_sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    root.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    for rank in range(tensor):
        ckpt = {"model": bert_rank_state(hf_sd, cfg.num_attention_heads, rank, tensor, version, version >= 2.0,
                                         padded, binary_head), "iteration": 0}
        if version:
            ckpt["checkpoint_version"] = version
        if with_args:
            ckpt["args"] = megatron_args(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                         cfg.max_position_embeddings, padded, tensor, version)
            vars(ckpt["args"]).update(extra_args or {})
        path = root / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save(ckpt, path)
    return root
