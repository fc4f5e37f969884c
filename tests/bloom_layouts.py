"""Small BLOOM checkpoints: a random transformers BloomForCausalLM, and its weights in Megatron-DeepSpeed's
exact layout (one file per pipeline layer and tensor rank), written here independently of mtlm.convert."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, HIDDEN, HEADS, LAYERS = 300, 48, 6, 2  # 6 heads: not a power of two (the extra ALiBi slopes are used)


def random_bloom(seed: int = 0, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS, vocab: int = VOCAB):
    """A BloomForCausalLM with large random weights, biases and layer-norm gains, so every layout slip shows."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=0.0,
                         attention_dropout=0.0, initializer_range=0.2, layer_norm_epsilon=1e-5)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_deepspeed(root: Path, hf_model, tensor: int, step: int = 1000, drift: float = 0.0) -> Path:
    """`root/latest` + `root/global_step{step}/layer_XX-model_YY-model_states.pt`; returns root.

    `drift`: replicated tensors differ across tensor ranks by +-drift (as in bigscience's training), so their
    mean is the original."""
    sd = {k.removeprefix("transformer."): v.detach() for k, v in hf_model.state_dict().items()}
    layers, heads = hf_model.config.n_layer, hf_model.config.n_head
    folder = root / f"global_step{step}"
    folder.mkdir(parents=True)
    (root / "latest").write_text(f"global_step{step}")
    split_rows = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
                  "word_embeddings.weight")
    split_cols = ("self_attention.dense.weight", "dense_4h_to_h.weight")

    def local(key: str, value: torch.Tensor, rank: int) -> torch.Tensor:
        if key.endswith(split_rows):
            return value.chunk(tensor, 0)[rank].clone()  # qkv rows [head][q,k,v][d]: whole heads per chunk
        if key.endswith(split_cols):
            return value.chunk(tensor, 1)[rank].clone()
        if tensor > 1 and drift:
            noise = drift * torch.randn(value.shape, generator=torch.Generator().manual_seed(hash(key) % 2**31))
            return (value + noise if rank == 0 else value - noise).clone()
        return value.clone()

    for rank in range(tensor):
        files = {1: {"word_embeddings.weight": sd["word_embeddings.weight"],
                     "word_embeddings.norm.weight": sd["word_embeddings_layernorm.weight"],
                     "word_embeddings.norm.bias": sd["word_embeddings_layernorm.bias"]},
                 layers + 4: {"weight": sd["ln_f.weight"], "bias": sd["ln_f.bias"]}}
        for i in range(layers):
            files[i + 3] = {k.removeprefix(f"h.{i}."): v for k, v in sd.items() if k.startswith(f"h.{i}.")}
        for index, state in files.items():
            torch.save({k: local(k, v, rank) for k, v in state.items()},
                       folder / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
    assert heads % tensor == 0
    return root
