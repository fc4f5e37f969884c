"""GPT-2, built from the tensor-parallel layers of mtlm.parallel.

Pre-LN blocks, learned absolute positions, GeLU (tanh), 4h MLP, tied input/output embeddings, biases on all
linear layers, layer norm eps 1e-5 (paper, GPT-2 architecture details). At tensor degree t each rank holds
1/t of the attention heads, of the MLP columns/rows and of the vocabulary; layer norms, position embeddings
and the residual stream are replicated (§3: cheaper to duplicate than to communicate).

No launching, no logging: the model only needs a ParallelState.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlm.model.alibi import alibi_causal_bias, local_slopes
from mtlm.model.kv_cache import KVCache, LayerKV, cached_attention
from mtlm.parallel.checkpoint import checkpoint_block
from mtlm.parallel.cross_entropy import mask_padded_logits_, vocab_parallel_cross_entropy
from mtlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_sharded_,
    pad_vocab_size,
)
from mtlm.parallel.mappings import copy_to_tensor_region
from mtlm.parallel.random import tensor_region_rng
from mtlm.parallel.state import ParallelState


def num_parameters(num_layers: int, hidden: int, padded_vocab: int, max_positions: int) -> int:
    """Exact parameter count (the paper's ~12*L*h^2 + (V+s)*h, plus biases and layer norms).

    Per layer: qkv 3h^2+3h, attention out h^2+h, MLP 4h^2+4h and 4h^2+h, two layer norms 4h.
    """
    per_layer = 12 * hidden * hidden + 13 * hidden
    return num_layers * per_layer + (padded_vocab + max_positions) * hidden + 2 * hidden


def _replicated(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.partition_dim = None
    return module


class Attention(nn.Module):
    def __init__(self, cfg: Any, state: ParallelState, device=None, dtype=None) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        self.local_heads = heads // state.tensor  # §3: each rank owns whole heads
        self.head_dim = h // heads
        self.dropout = cfg.dropout
        self.device = state.device
        self.impl = getattr(cfg, "attention", "auto")
        # BLOOM (model.position_embedding=alibi): this rank's heads' ALiBi slopes, a bias on the scores instead
        # of position embeddings.
        alibi = getattr(cfg, "position_embedding", "learned") == "alibi"
        self.slopes = local_slopes(heads, state.tensor, state.tp_rank) if alibi else None
        # Output rows are grouped by head ([head][q,k,v][head_dim]), so a rank's contiguous slice holds whole
        # heads, and a checkpoint shard for another tensor degree is again a contiguous slice.
        self.qkv = ColumnParallelLinear(h, 3 * h, state, device=device, dtype=dtype)
        self.proj = RowParallelLinear(h, h, state, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, kv_cache: LayerKV | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, s, head_dim]
        p = self.dropout if self.training else 0.0
        attend = unfused_attention if _use_unfused(self.impl, x.device) else F.scaled_dot_product_attention
        mask: dict = {"is_causal": True}
        if self.slopes is not None:  # ALiBi: its bias holds the positions and the causal mask
            if kv_cache is not None:
                k, v = kv_cache.append(k, v)
                kv_cache = None
            mask = {"attn_mask": alibi_causal_bias(self.slopes, s, q.dtype, q.device, keys=k.shape[2])}
        if kv_cache is not None:  # generation: this layer's earlier keys/values + these (mtlm/model/kv_cache.py)
            y = cached_attention(q, *kv_cache.append(k, v))
        elif p > 0:
            # Attention dropout is inside the parallel region: masks must differ per tensor rank.
            with tensor_region_rng(self.device):
                y = attend(q, k, v, dropout_p=p, **mask)
        else:
            y = attend(q, k, v, **mask)
        return self.proj(y.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


def _use_unfused(impl: str, device: torch.device) -> bool:
    if impl == "auto":  # see ModelConfig.attention
        return device.type == "cpu" and torch.is_autocast_enabled("cpu")
    return impl == "unfused"


_CAUSAL_BIAS: dict[tuple, torch.Tensor] = {}


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                      is_causal: bool = True, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) v as Megatron-LM computes it: one batched GEMM writes the scaled
    scores in the compute dtype with the causal mask added by the GEMM itself (baddbmm's beta term), the
    softmax accumulates in fp32, its output is in the compute dtype for the second GEMM.

    `attn_mask` [heads, s, t]: an additive bias that replaces the causal mask and must include it (ALiBi)."""
    assert is_causal or attn_mask is not None, "GPT attention is causal: by is_causal or by attn_mask"
    b, n, s, d = q.shape
    t = k.shape[2]
    if attn_mask is not None:
        bias = attn_mask.expand(b, n, s, t).reshape(b * n, s, t)
    else:
        key = (s, q.device, q.dtype)
        if key not in _CAUSAL_BIAS:  # 0 on and below the diagonal, -inf above: added to the scores by baddbmm
            _CAUSAL_BIAS[key] = torch.full((s, s), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
        bias = _CAUSAL_BIAS[key].expand(b * n, s, s)
    scores = torch.baddbmm(bias, q.reshape(b * n, s, d), k.reshape(b * n, t, d).transpose(1, 2),
                           alpha=1.0 / math.sqrt(d))
    # torch's softmax kernels accumulate bf16/fp16 in fp32 and round once on output: the same bits as an fp32
    # softmax followed by a cast, without the fp32 [b*n, s, s] temporary and the two casts. The dtype is
    # explicit because CUDA autocast runs a softmax without one in fp32 (CPU autocast does not): an fp32
    # probability tensor would be saved for backward and cast twice.
    probs = scores.softmax(-1, dtype=scores.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(b * n, t, d)).view(b, n, s, d)


class MLP(nn.Module):
    def __init__(self, cfg: Any, state: ParallelState, device=None, dtype=None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.fc = ColumnParallelLinear(h, 4 * h, state, device=device, dtype=dtype)
        self.proj = RowParallelLinear(4 * h, h, state, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # §3: GeLU on each rank's own column slice, no synchronisation needed before the row-parallel GEMM.
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Any, state: ParallelState, device=None, dtype=None) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layernorm_eps
        self.ln1 = _replicated(nn.LayerNorm(h, eps=eps, device=device, dtype=dtype))
        self.attn = Attention(cfg, state, device, dtype)
        self.ln2 = _replicated(nn.LayerNorm(h, eps=eps, device=device, dtype=dtype))
        self.mlp = MLP(cfg, state, device, dtype)
        # Residual dropout acts on the replicated stream: default RNG, identical across the tensor group.
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: LayerKV | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), kv_cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    family = "gpt"  # mtlm/model/build.py: its objective is next-token LM (train/objective.py)

    def __init__(self, cfg: Any, vocab_size: int, state: ParallelState, device=None, dtype=None,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg, self.state = cfg, state
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, state.tensor)
        self.activation_checkpointing = activation_checkpointing
        h = cfg.hidden_size
        self.wte = VocabParallelEmbedding(self.padded_vocab_size, h, state, device=device, dtype=dtype)
        # Learned positions (GPT-2), or none: ALiBi in the attention (BLOOM, model.position_embedding=alibi).
        self.wpe = _replicated(nn.Embedding(cfg.max_position_embeddings, h, device=device, dtype=dtype)) \
            if getattr(cfg, "position_embedding", "learned") == "learned" else None
        # BLOOM's layer norm on the word embeddings (model.embedding_layernorm).
        self.ln_emb = _replicated(nn.LayerNorm(h, eps=cfg.layernorm_eps, device=device, dtype=dtype)) \
            if getattr(cfg, "embedding_layernorm", False) else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, state, device, dtype) for _ in range(cfg.num_layers))
        self.ln_f = _replicated(nn.LayerNorm(h, eps=cfg.layernorm_eps, device=device, dtype=dtype))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """§4: N(0, 0.02); the two layers feeding each residual add scaled by 1/sqrt(2N); biases 0, LN 1."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.num_layers)
        t, r = self.state.tensor, self.state.tp_rank
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith(("ln_f", "ln_emb")):
                p.fill_(1.0)
            elif name == "wte.weight":
                init_sharded_(p, name, seed, std, r, t, full_rows=self.vocab_size)
            else:
                s = residual_std if name.endswith("proj.weight") else std
                init_sharded_(p, name, seed, s, r, t)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits of this rank's vocabulary slice [b, s, padded_vocab/t] (padded entries are -inf), or,
        given targets, the per-token loss [b, s] from the fused vocab-parallel cross-entropy.

        `kv_cache` (generation): `ids` are the positions after the cached ones, and their keys/values join it."""
        x = self.wte(ids)
        if self.wpe is not None:
            start = kv_cache.length if kv_cache is not None else 0
            x = x + self.wpe(torch.arange(start, start + ids.shape[1], device=ids.device))
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if kv_cache is not None:
                x = block(x, kv_cache.layers[i])
                continue
            x = checkpoint_block(block, x, self.state.device) if self.activation_checkpointing and \
                self.training else block(x)
        x = self.ln_f(x)
        # Tied output layer: the embedding's vocabulary shard, so the logits come out split by vocabulary.
        logits = F.linear(copy_to_tensor_region(x, self.state.tp_group), self.wte.weight)
        mask_padded_logits_(logits, self.wte.vocab_start, self.vocab_size)
        if targets is None:
            return logits
        # The logits are this forward's own temporary: backward may turn them into their gradient in place.
        return vocab_parallel_cross_entropy(logits, targets, self.wte.vocab_start, self.state.tp_group,
                                            inplace_backward=True)

    def num_parameters(self) -> int:
        """Whole-model count (all tensor ranks together), padded vocabulary included."""
        c = self.cfg
        positions = c.max_position_embeddings if self.wpe is not None else 0
        extra = 2 * c.hidden_size if self.ln_emb is not None else 0  # the embedding layer norm
        return num_parameters(c.num_layers, c.hidden_size, self.padded_vocab_size, positions) + extra
