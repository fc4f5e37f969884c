"""GPT-2 (and BLOOM), built on the shared transformer layer (mtlm/model/transformer.py): causal blocks.

Pre-LN blocks, learned absolute positions, GeLU (tanh), 4h MLP, tied input/output embeddings, biases on all
linear layers, layer norm eps 1e-5 (paper, GPT-2 architecture details). The layer's other choices are model
keys: model.activation, model.layernorm_order (post: LN after each residual add, the embeddings normalised
instead of a final norm), model.position_embedding=alibi and model.embedding_layernorm (BLOOM).
At tensor degree t each rank holds 1/t of the attention heads, of the MLP columns/rows and of the
vocabulary; layer norms, position embeddings and the residual stream are replicated (§3: cheaper to
duplicate than to communicate).

No launching, no logging: the model only needs a ParallelState.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlm.config import model_option
from mtlm.model.kv_cache import KVCache
from mtlm.model.transformer import (  # noqa: F401  (Attention, MLP, unfused_attention, _use_unfused: re-exported)
    MLP,
    Attention,
    Block,
    VocabParallelLM,
    _use_unfused,
    layer_parameters,
    replicated,
    stream_dropout,
    stream_module,
    unfused_attention,
)
from mtlm.parallel.checkpoint import checkpoint_block
from mtlm.parallel.cross_entropy import mask_padded_logits_, vocab_parallel_cross_entropy
from mtlm.parallel.mappings import copy_to_tensor_region
from mtlm.parallel.sequence_linear import gather_linear
from mtlm.parallel.sequence_split import split_to_sequence_region
from mtlm.parallel.state import ParallelState


def num_parameters(num_layers: int, hidden: int, padded_vocab: int, max_positions: int) -> int:
    """Exact parameter count (the paper's ~12*L*h^2 + (V+s)*h, plus biases and layer norms).

    Per layer: qkv 3h^2+3h, attention out h^2+h, MLP 4h^2+4h and 4h^2+h, two layer norms 4h.
    """
    return num_layers * layer_parameters(hidden) + (padded_vocab + max_positions) * hidden + 2 * hidden


class GPT(VocabParallelLM):
    family = "gpt"  # its spec (mtlm/model/spec.py): objective, stages, recompute, sequence parallelism

    def __init__(self, cfg: Any, vocab_size: int, state: ParallelState, device=None, dtype=None,
                 activation_checkpointing: bool = False) -> None:
        super().__init__(cfg, vocab_size, state, device, dtype, activation_checkpointing)
        h = cfg.hidden_size
        # Learned positions (GPT-2), or none: ALiBi in the attention (BLOOM, model.position_embedding=alibi).
        self.wpe = replicated(nn.Embedding(cfg.max_position_embeddings, h, device=device, dtype=dtype)) \
            if model_option(cfg, "position_embedding") == "learned" else None
        # A layer norm on the embeddings: BLOOM's (model.embedding_layernorm), or post-LN's (the blocks end in
        # a layer norm, so there is no final one: original BERT's and the original transformer's arrangement).
        pre_ln = model_option(cfg, "layernorm_order") == "pre"
        norm = lambda: stream_module(nn.LayerNorm(h, eps=cfg.layernorm_eps, device=device, dtype=dtype), state)
        self.ln_emb = norm() if model_option(cfg, "embedding_layernorm") or not pre_ln else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, state, True, device, dtype) for _ in range(cfg.num_layers))
        self.ln_f = norm() if pre_ln else None
        self.has_parts = (self.wpe is not None, self.ln_emb is not None, self.ln_f is not None)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits of this rank's vocabulary slice [b, s, padded_vocab/t] (padded entries are -inf), or,
        given targets, the per-token loss [b, s] from the fused vocab-parallel cross-entropy.

        `kv_cache` (generation): `ids` are the positions after the cached ones, and their keys/values join it."""
        sp = self.state.sequence and kv_cache is None
        x = self.embed(ids, kv_cache.length if kv_cache is not None else 0, sp)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_cache.layers[i]) if kv_cache is not None else self.run_block(block, x)
        logits = self.head(x, sp)
        if targets is None:
            return logits
        # The logits are this forward's own temporary: backward may turn them into their gradient in place.
        return vocab_parallel_cross_entropy(logits, targets, self.wte.vocab_start, self.state.tp_group,
                                            inplace_backward=True)

    # The three parts a forward is made of; a pipeline stage (mtlm/model/stages.py) runs some of them.
    def embed(self, ids: torch.Tensor, start: int = 0, sequence_parallel: bool = False) -> torch.Tensor:
        """Token (+ position) embeddings, then the embedding norm and dropout: the residual stream's start."""
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + ids.shape[1], device=ids.device))
        if sequence_parallel:  # from here to the head each rank holds 1/t of the sequence (§4.2.2)
            x = split_to_sequence_region(x, self.state.tp_group)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        return stream_dropout(self.drop, x, self.state)

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One layer, recomputed in backward under activation checkpointing (§4)."""
        if self.activation_checkpointing and self.training:
            return checkpoint_block(block, x, self.state.device)
        return block(x)

    def head(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """Final norm and the tied output layer: the embedding's vocabulary shard, so the logits come out split
        by vocabulary (this rank's [b, s, padded_vocab/t], padded entries -inf)."""
        if self.ln_f is not None:
            x = self.ln_f(x)
        if sequence_parallel:  # all-gather the sequence for the GEMM, keeping this rank's chunk for backward
            logits = gather_linear(x, self.wte.weight, None, self.state.tp_group)
        else:
            logits = F.linear(copy_to_tensor_region(x, self.state.tp_group), self.wte.weight)
        mask_padded_logits_(logits, self.wte.vocab_start, self.vocab_size)
        return logits

    def num_parameters(self) -> int:
        """Whole-model count (all tensor ranks together), padded vocabulary included."""
        c = self.cfg
        learned, ln_emb, ln_f = self.has_parts  # from the config: a pipeline stage holds only some of them
        positions = c.max_position_embeddings if learned else 0
        # num_parameters() counts the final layer norm; BLOOM adds one on the embeddings, post-LN moves it there.
        extra = 2 * c.hidden_size * (ln_emb - (not ln_f))
        return num_parameters(c.num_layers, c.hidden_size, self.padded_vocab_size, positions) + extra
