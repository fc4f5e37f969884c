"""The transformer layer both families share (GPT-2 and BERT), built from the tensor-parallel layers.

What differs between the families is an explicit choice here, not a copy of the layer:

- `causal`: GPT attends to earlier positions only; BERT attends both ways, with a padding mask (`key_padding`,
  True where a key is a real token).
- `model.layernorm_order`: `pre` (x + f(LN(x)), the paper's rearrangement that lets BERT scale, §4.3 / Fig. 7b)
  or `post` (LN(x + f(x)), the original BERT and transformer, Fig. 7a).
- `model.activation`: `gelu` (exact, erf: BERT, as Megatron-LM's default and transformers' MegatronBert) or
  `gelu_tanh` (GPT-2's approximation).
- `model.position_embedding=alibi` (BLOOM, mtlm/model/alibi.py): a per-head bias on the scores that also holds
  the causal mask, instead of position embeddings.
- `kv_cache` (generation, mtlm/model/kv_cache.py): attend over this layer's cached keys/values plus the new ones.

At tensor degree t each rank holds 1/t of the attention heads and of the MLP's columns/rows; layer norms and the
residual stream are replicated (§3: cheaper to duplicate than to communicate). A layer does 2 all-reduces
forward (g after attention and after the MLP) and 2 backward (f before them).

With sequence parallelism (`state.sequence`, Korthikanti et al. 2022 §4.2.2, Fig. 5) the residual stream, the
layer norms and the dropouts hold 1/t of the sequence instead: f becomes an all-gather and g a reduce-scatter
(mtlm/parallel/sequence_*.py), the same bytes, and the non-GEMM activations shrink by t.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlm.config import model_option
from mtlm.model.alibi import alibi_causal_bias, local_slopes
from mtlm.model.kv_cache import LayerKV, cached_attention
from mtlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_sharded_,
    pad_vocab_size,
)
from mtlm.parallel.random import tensor_region_rng
from mtlm.parallel.sequence_grads import mark_sequence_parallel
from mtlm.parallel.state import ParallelState

ACTIVATIONS = ("gelu", "gelu_tanh")
LAYERNORM_ORDERS = ("pre", "post")


def replicated(module: nn.Module) -> nn.Module:
    """Mark every parameter of `module` as held whole by each tensor rank (partition_dim None)."""
    for p in module.parameters():
        p.partition_dim = None
    return module


def stream_dropout(drop: nn.Dropout, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Dropout on the residual stream. Replicated (default RNG, same masks on the tensor group, §3), or with
    sequence parallelism each rank's own chunk of the sequence: the tensor-region stream, so the chunks do not
    share masks (Korthikanti et al. §4.2.2)."""
    if not state.sequence or not drop.training or drop.p == 0:
        return drop(x)
    with tensor_region_rng(state.device):
        return drop(x)


def stream_module(module: nn.Module, state: ParallelState) -> nn.Module:
    """A replicated module on the residual stream (a layer norm): with sequence parallelism it sees 1/t of the
    sequence, so its gradients are summed over the tensor group (mtlm/parallel/sequence_grads.py)."""
    replicated(module)
    return mark_sequence_parallel(module) if state.sequence else module


def activation_fn(name: str):
    """`gelu` (exact) or `gelu_tanh`, as a function of one tensor."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def _use_unfused(impl: str, device: torch.device) -> bool:
    if impl == "auto":  # see ModelConfig.attention
        return device.type == "cpu" and torch.is_autocast_enabled("cpu")
    return impl == "unfused"


_CAUSAL_BIAS: dict[tuple, torch.Tensor] = {}


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                      is_causal: bool = True, attn_mask: torch.Tensor | None = None,
                      key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as Megatron-LM computes it: one batched GEMM writes the scaled
    scores in the compute dtype with the mask added by the GEMM itself (baddbmm's beta term), the softmax
    accumulates in fp32, its output is in the compute dtype for the second GEMM.

    The mask: causal (`is_causal`), or `attn_mask` [heads, s, t], an additive bias that replaces the causal mask
    and must include it (ALiBi), or none (bidirectional); `key_padding` [b, t] (True: a real token) masks
    padded keys on top."""
    b, n, s, d = q.shape
    t = k.shape[2]
    qf, kt = q.reshape(b * n, s, d), k.reshape(b * n, t, d).transpose(1, 2)
    if attn_mask is not None:
        bias = attn_mask.expand(b, n, s, t).reshape(b * n, s, t)
    elif is_causal:
        key = (s, q.device, q.dtype)
        if key not in _CAUSAL_BIAS:  # 0 on and below the diagonal, -inf above: added to the scores by baddbmm
            _CAUSAL_BIAS[key] = torch.full((s, s), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
        bias = _CAUSAL_BIAS[key].expand(b * n, s, s)
    else:
        bias = None
    scores = torch.bmm(qf, kt).mul_(1.0 / math.sqrt(d)) if bias is None else \
        torch.baddbmm(bias, qf, kt, alpha=1.0 / math.sqrt(d))
    if key_padding is not None:
        pad = torch.zeros(b, 1, 1, t, device=q.device, dtype=scores.dtype).masked_fill_(
            ~key_padding.view(b, 1, 1, t), float("-inf"))
        scores = scores.view(b, n, s, t).add_(pad).view(b * n, s, t)
    # torch's softmax kernels accumulate bf16/fp16 in fp32 and round once on output: the same bits as an fp32
    # softmax followed by a cast, without the fp32 [b*n, s, s] temporary and the two casts. The dtype is
    # explicit because CUDA autocast runs a softmax without one in fp32 (CPU autocast does not): an fp32
    # probability tensor would be saved for backward and cast twice.
    probs = scores.softmax(-1, dtype=scores.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(b * n, t, d)).view(b, n, s, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, is_causal: bool = False,
          attn_mask: torch.Tensor | None = None, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    if key_padding is not None:  # bool: True attends
        assert attn_mask is None, "a padding mask together with an additive bias is not needed by any model"
        attn_mask = key_padding[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class Attention(nn.Module):
    def __init__(self, cfg: Any, state: ParallelState, causal: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        self.local_heads = heads // state.tensor  # §3: each rank owns whole heads
        self.head_dim = h // heads
        self.dropout = cfg.dropout
        self.causal = causal
        self.device = state.device
        self.impl = model_option(cfg, "attention")
        # BLOOM (model.position_embedding=alibi): this rank's heads' ALiBi slopes, a bias on the scores instead
        # of position embeddings.
        alibi = model_option(cfg, "position_embedding") == "alibi"
        self.slopes = local_slopes(heads, state.tensor, state.tp_rank) if alibi else None
        # Output rows are grouped by head ([head][q,k,v][head_dim]), so a rank's contiguous slice holds whole
        # heads, and a checkpoint shard for another tensor degree is again a contiguous slice.
        sp = state.sequence
        self.qkv = ColumnParallelLinear(h, 3 * h, state, device=device, dtype=dtype, sequence_parallel=sp)
        self.proj = RowParallelLinear(h, h, state, device=device, dtype=dtype, sequence_parallel=sp)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None,
                kv_cache: LayerKV | None = None) -> torch.Tensor:
        qkv = self.qkv(x)  # the whole sequence, also when x holds 1/t of it (sequence parallelism)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, s, head_dim]
        p = self.dropout if self.training else 0.0
        # ALiBi under `auto` takes SDPA: with the bias as its mask it is as fast as the unfused path in fp32 and
        # 7-8x faster under bf16 autocast on the 2-core AVX2 CPU measured (python -m mtlm.bench.alibi).
        unfused = self.impl == "unfused" if self.slopes is not None else _use_unfused(self.impl, x.device)
        attend = unfused_attention if unfused else _sdpa
        mask: dict = {"is_causal": self.causal}
        if key_padding is not None:
            mask["key_padding"] = key_padding
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


class MLP(nn.Module):
    def __init__(self, cfg: Any, state: ParallelState, device=None, dtype=None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.act = activation_fn(model_option(cfg, "activation"))
        self.fc = ColumnParallelLinear(h, 4 * h, state, device=device, dtype=dtype, sequence_parallel=state.sequence)
        self.proj = RowParallelLinear(4 * h, h, state, device=device, dtype=dtype, sequence_parallel=state.sequence)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # §3: GeLU on each rank's own column slice, no synchronisation needed before the row-parallel GEMM.
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """One transformer layer: attention and MLP sublayers, each with a layer norm, dropout and a residual add.

    pre-LN: x + drop(f(LN(x))); post-LN: LN(x + drop(f(x))). ln1 belongs to the attention sublayer and ln2 to
    the MLP in both orders, so parameter names do not depend on the order."""

    def __init__(self, cfg: Any, state: ParallelState, causal: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layernorm_eps
        self.pre_ln = model_option(cfg, "layernorm_order") == "pre"
        self.state = state
        self.ln1 = stream_module(nn.LayerNorm(h, eps=eps, device=device, dtype=dtype), state)
        self.attn = Attention(cfg, state, causal, device, dtype)
        self.ln2 = stream_module(nn.LayerNorm(h, eps=eps, device=device, dtype=dtype), state)
        self.mlp = MLP(cfg, state, device, dtype)
        # Residual dropout acts on the replicated stream: default RNG, identical across the tensor group
        # (with sequence parallelism: each rank's chunk, stream_dropout).
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None,
                kv_cache: LayerKV | None = None) -> torch.Tensor:
        drop = lambda y: stream_dropout(self.drop, y, self.state)  # noqa: E731
        if self.pre_ln:
            x = x + drop(self.attn(self.ln1(x), key_padding, kv_cache))
            return x + drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + drop(self.attn(x, key_padding, kv_cache)))
        return self.ln2(x + drop(self.mlp(x)))


def stream_norms(cfg: Any, state: ParallelState, device=None,
                 dtype=None) -> tuple[nn.LayerNorm | None, nn.LayerNorm | None]:
    """(embedding norm, final norm) of the residual stream. Pre-LN blocks leave the stream unnormalised, so the
    stack ends in a final layer norm; post-LN blocks end in one already, and the embeddings are normalised
    instead (original BERT's embedding LayerNorm)."""
    norm = stream_module(nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, device=device, dtype=dtype), state)
    return (None, norm) if model_option(cfg, "layernorm_order") == "pre" else (norm, None)


def layer_parameters(hidden: int) -> int:
    """Parameters of one layer: qkv 3h^2+3h, attention out h^2+h, MLP 4h^2+4h and 4h^2+h, two norms 4h."""
    return 12 * hidden * hidden + 13 * hidden


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float, num_layers: int, state: ParallelState,
                  vocab_size: int, vocab_params: tuple[str, ...] = ("wte.weight",)) -> None:
    """§4 initialisation: weights N(0, std), the two layers feeding each residual add (`*proj.weight`) scaled by
    1/sqrt(2N); biases 0; layer norms 1. Each full weight is drawn from a (seed, name) generator whatever the
    tensor degree; `vocab_params` are split over the padded vocabulary, whose padding rows stay 0."""
    residual_std = std / math.sqrt(2 * num_layers)
    t, r = state.tensor, state.tp_rank
    norms = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
             for n, _ in mod.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if name.endswith("bias"):
            p.zero_()
        elif name in norms:
            p.fill_(1.0)
        elif name in vocab_params:
            init_sharded_(p, name, seed, std, r, t, full_rows=vocab_size)
        else:
            init_sharded_(p, name, seed, residual_std if name.endswith("proj.weight") else std, r, t)


class VocabParallelLM(nn.Module):
    """What GPT and BERT share: the config and parallel state, the vocabulary padded to a multiple of
    make_vocab_size_divisible_by x tensor (§3), its vocab-parallel word embedding `wte`, and §4's init."""

    def __init__(self, cfg: Any, vocab_size: int, state: ParallelState, device=None, dtype=None,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg, self.state = cfg, state
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, state.tensor)
        self.activation_checkpointing = activation_checkpointing
        self.wte = VocabParallelEmbedding(self.padded_vocab_size, cfg.hidden_size, state, device=device, dtype=dtype)

    def init_weights(self, seed: int) -> None:
        """§4: N(0, 0.02); the two layers feeding each residual add scaled by 1/sqrt(2N); biases 0, LN 1."""
        init_weights_(self, seed, self.cfg.init_std, self.cfg.num_layers, self.state, self.vocab_size)
