"""Megatron-BERT (paper §4.3), built from the shared transformer layer (mtlm/model/transformer.py).

Word (vocab-parallel) + position + token-type embeddings, then dropout (no embedding layer norm in pre-LN
order); bidirectional blocks with a padding mask; a final layer norm. Two heads:

- masked LM: dense h -> h, GeLU, layer norm, then logits against the tied vocab-parallel word embedding plus
  a vocab-parallel bias, so the logits come out split by vocabulary and the loss is the fused vocab-parallel
  cross-entropy (§3), over the masked positions only;
- sentence order: the pooler (dense + tanh on the [CLS] position) and a binary classifier.

`model.layernorm_order=post` is original BERT (post-LN blocks, a layer norm on the embeddings, no final one):
the paper's Fig. 7 ablation, where the post-LN BERT stops improving as it grows. Both heads and the pooler are
small and replicated on every tensor rank (their inputs are the replicated stream).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlm.config import model_option
from mtlm.model.transformer import (
    Block,
    VocabParallelLM,
    activation_fn,
    layer_parameters,
    replicated,
    stream_dropout,
    stream_norms,
)
from mtlm.parallel.checkpoint import checkpoint_block
from mtlm.parallel.cross_entropy import mask_padded_logits_, vocab_parallel_cross_entropy
from mtlm.parallel.mappings import copy_to_tensor_region
from mtlm.parallel.sequence_gather import gather_to_replicated
from mtlm.parallel.sequence_split import split_to_sequence_region
from mtlm.parallel.state import ParallelState

NUM_TOKEN_TYPES = 2  # segment A and segment B


def num_parameters(num_layers: int, hidden: int, padded_vocab: int, max_positions: int) -> int:
    """Exact count: the layers, the three embeddings, one stream norm, the LM head (dense h^2+h, norm 2h, vocab
    bias V), the pooler (h^2+h) and the binary head (2h+2). 336M preset: 336,297,858 (the released model's)."""
    h = hidden
    embeddings = (padded_vocab + max_positions + NUM_TOKEN_TYPES) * h
    heads = (h * h + h + 2 * h + padded_vocab) + (h * h + h) + (2 * h + 2)
    return num_layers * layer_parameters(h) + embeddings + 2 * h + heads


class LMHead(nn.Module):
    """dense -> GeLU -> layer norm; the output layer is the word embedding (tied) plus `bias`, this rank's slice
    of the padded vocabulary (partition_dim 0, like the embedding's rows)."""

    def __init__(self, cfg: Any, local_vocab: int, device=None, dtype=None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.dense = replicated(nn.Linear(h, h, device=device, dtype=dtype))
        self.act = activation_fn(model_option(cfg, "activation"))
        self.ln = replicated(nn.LayerNorm(h, eps=cfg.layernorm_eps, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local_vocab, device=device, dtype=dtype))
        self.bias.partition_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.act(self.dense(x)))


class BERT(VocabParallelLM):
    family = "bert"  # its spec (mtlm/model/spec.py): objective, stages, recompute, sequence parallelism

    def __init__(self, cfg: Any, vocab_size: int, state: ParallelState, device=None, dtype=None,
                 activation_checkpointing: bool = False) -> None:
        super().__init__(cfg, vocab_size, state, device, dtype, activation_checkpointing)
        h = cfg.hidden_size
        self.wpe = replicated(nn.Embedding(cfg.max_position_embeddings, h, device=device, dtype=dtype))
        self.tte = replicated(nn.Embedding(NUM_TOKEN_TYPES, h, device=device, dtype=dtype))
        self.ln_emb, self.ln_f = stream_norms(cfg, state, device, dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, state, False, device, dtype) for _ in range(cfg.num_layers))
        self.lm_head = LMHead(cfg, self.padded_vocab_size // state.tensor, device, dtype)
        self.pooler = replicated(nn.Linear(h, h, device=device, dtype=dtype))
        self.sop_head = replicated(nn.Linear(h, 2, device=device, dtype=dtype))

    def encode(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states [b, s, h] (replicated on every tensor rank)."""
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        # All-real batches skip the mask, so SDPA may take its unmasked (flash) kernel.
        keep = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device)) + self.tte(types)
        sp = self.state.sequence  # the stream holds 1/t of the sequence from here to the heads (§4.2.2)
        if sp:
            x = split_to_sequence_region(x, self.state.tp_group)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        x = stream_dropout(self.drop, x, self.state)
        for block in self.blocks:  # the padding mask covers the whole sequence: attention sees all of it
            if self.activation_checkpointing and self.training:
                x = checkpoint_block(lambda y, b=block: b(y, keep), x, self.state.device)
            else:
                x = block(x, keep)
        x = x if self.ln_f is None else self.ln_f(x)
        return gather_to_replicated(x, self.state.tp_group) if sp else x

    def mlm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the LM head's logits [..., padded_vocab/t] (padding: -inf)."""
        y = copy_to_tensor_region(self.lm_head(x), self.state.tp_group)  # f: logits split by vocabulary
        logits = F.linear(y, self.wte.weight, self.lm_head.bias)
        return mask_padded_logits_(logits, self.wte.vocab_start, self.vocab_size)

    def sop_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.sop_head(torch.tanh(self.pooler(x[:, 0])))

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlm_logits [b, s, padded_vocab/t], sop_logits [b, 2]); given `labels` (-1: not predicted), the
        masked-LM loss of each predicted position [n] instead of the logits: the LM head then runs on those
        positions only, and the loss is the fused vocab-parallel cross-entropy."""
        x = self.encode(ids, token_type_ids, attention_mask)
        sop = self.sop_logits(x)
        if labels is None:
            return self.mlm_logits(x), sop
        picked = labels >= 0
        logits = self.mlm_logits(x[picked])
        # The logits are this forward's own temporary: backward may turn them into their gradient in place.
        losses = vocab_parallel_cross_entropy(logits, labels[picked], self.wte.vocab_start, self.state.tp_group,
                                              inplace_backward=True)
        return losses, sop

    def num_parameters(self) -> int:
        """Whole-model count (all tensor ranks together), padded vocabulary included."""
        c = self.cfg
        return num_parameters(c.num_layers, c.hidden_size, self.padded_vocab_size, c.max_position_embeddings)
