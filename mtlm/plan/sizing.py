"""Exact sizing: one tensor rank of the real model built on the meta device, and the bytes each device holds.

The meta device gives every tensor its shape and dtype without allocating memory, so the 8.3B model's rank
is "built" in a fraction of a second; its parameter count is what train.py's rank holds, whatever the model
family (GPT, BERT), and is cross-checked against the analytic count of mtlm/metrics/memory.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtlm.config import model_option
from mtlm.metrics import memory
from mtlm.model.build import build_model
from mtlm.parallel.state import ParallelState
from mtlm.plan import pipeline


def meta_rank_model(model_cfg: Any, vocab_size: int, tensor: int, recompute: bool = False) -> nn.Module:
    """Tensor rank 0 of `tensor` (rank 0 holds the largest vocabulary slice: padding sits at the end)."""
    state = ParallelState(rank=0, world_size=tensor, tensor=tensor, data=1, device=torch.device("meta"))
    return build_model(model_cfg, vocab_size, state, device=torch.device("meta"),
                       activation_checkpointing=recompute)


@dataclass
class RankSizing:
    params_per_rank: int
    params_total: int  # all tensor ranks together, replicated tensors once (padded vocabulary included)
    padded_vocab_size: int
    param_shapes: list[tuple[int, ...]]
    # Parameters of the rank by top-level module (GPT: blocks, wte, wpe, ln_emb, ln_f): what a pipeline stage holds.
    param_groups: dict[str, int] = field(default_factory=dict)


_SIZED: dict[tuple[str, int, int], RankSizing] = {}  # the layout search plans one model at many layouts


def size_rank(model_cfg: Any, vocab_size: int, tensor: int) -> RankSizing:
    key = (OmegaConf.to_yaml(model_cfg) if isinstance(model_cfg, DictConfig) else repr(model_cfg), vocab_size, tensor)
    if key not in _SIZED:
        _SIZED[key] = _size_rank(model_cfg, vocab_size, tensor)
    return _SIZED[key]


def _size_rank(model_cfg: Any, vocab_size: int, tensor: int) -> RankSizing:
    model = meta_rank_model(model_cfg, vocab_size, tensor)
    params = list(model.parameters())
    per_rank = sum(p.numel() for p in params)
    total = sum(p.numel() * (tensor if getattr(p, "partition_dim", None) is not None else 1) for p in params)
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + p.numel()
    return RankSizing(per_rank, total, model.padded_vocab_size, [tuple(p.shape) for p in params], groups)


def analytic_params_per_rank(model_cfg: Any, padded_vocab: int, tensor: int) -> int:
    """GPT-2's count from mtlm/metrics/memory.py (§3's split), to cross-check the meta-device count; with
    BLOOM's choices (mtlm/model/gpt.py): no position table under ALiBi, and a second replicated layer norm
    when an embedding norm comes on top of pre-LN's final one (post-LN swaps the final norm for it)."""
    h = model_cfg.hidden_size
    alibi = model_option(model_cfg, "position_embedding") == "alibi"
    pre_ln = model_option(model_cfg, "layernorm_order") == "pre"
    extra_norm = bool(model_option(model_cfg, "embedding_layernorm")) and pre_ln
    return memory.parameters_per_device(model_cfg.num_layers, h, padded_vocab,
                                        0 if alibi else model_cfg.max_position_embeddings, tensor) + 2 * h * extra_norm


# ---- optimizer state ------------------------------------------------------------------------------------

# fp32 state values, as mtlm keeps them (the master weights are fp32 in every precision).
STATE_BYTES = 4


def optimizer_kind(target: str) -> str:
    name = target.rsplit(".", 1)[-1].lower()
    if name in ("adam", "adamw"):
        return "adam"
    if name in ("sgd", "adafactor"):
        return name
    raise ValueError(f"the planner does not know the state of optimizer {target!r}")


def optimizer_state_bytes(kind: str, shapes: list[tuple[int, ...]], momentum: float = 0.0) -> int:
    """Bytes of optimizer state for parameters of these shapes (one rank, before ZeRO sharding).

    Adam: exp_avg and exp_avg_sq (8 bytes per parameter) and a 4-byte step count per tensor. SGD: one momentum
    buffer (4 bytes per parameter) when momentum > 0, else nothing. Adafactor (torch.optim.Adafactor): for a
    matrix [.., m, n] the factored second moment, a row vector of m and a column vector of n values (Shazeer &
    Stern 2018), for a vector its full second moment; plus a step count per tensor. No first moment.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if kind == "adam":
            total += 2 * STATE_BYTES * n + STATE_BYTES
        elif kind == "sgd":
            total += STATE_BYTES * n if momentum > 0 else 0
        elif kind == "adafactor":
            if len(shape) >= 2:
                lead = math.prod(shape[:-2])
                total += STATE_BYTES * lead * (shape[-2] + shape[-1])
            else:
                total += STATE_BYTES * n
            total += STATE_BYTES
        else:
            raise ValueError(f"unknown optimizer kind {kind!r}")
    return total


def compute_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def memory_per_device(model_cfg: Any, sizing: RankSizing, optimizer_cfg: Any, micro_batch: int, tensor: int,
                      data: int, dtype: str, recompute: bool, shard_optimizer: bool) -> dict[str, int]:
    """Bytes per device, in the four parts train.py's summary.json reports (memory_*_bytes).

    Parameters and gradients are fp32 (mtlm keeps the master weights in the model; autocast makes the
    fp16/bf16 copies on the fly); the optimizer state is counted per optimizer from the rank's real shapes
    and divided over the data ranks under ZeRO-1; activations are Korthikanti et al.'s per-layer count plus
    the ends (mtlm/metrics/memory.py), at the compute dtype's width, for one micro-batch.
    """
    kind = optimizer_kind(optimizer_cfg._target_)
    state = optimizer_state_bytes(kind, sizing.param_shapes, float(getattr(optimizer_cfg, "momentum", 0) or 0))
    if shard_optimizer and data > 1:
        state = math.ceil(state / data)
    acts = memory.activation_bytes(model_cfg.num_layers, model_cfg.seq_length, micro_batch, model_cfg.hidden_size,
                                   model_cfg.num_attention_heads, sizing.padded_vocab_size, tensor,
                                   compute_bytes(dtype), model_cfg.dropout > 0, recompute)
    return {"params": STATE_BYTES * sizing.params_per_rank, "grads": STATE_BYTES * sizing.params_per_rank,
            "optimizer": state, "activations": acts}


def stage_memory_per_device(model_cfg: Any, sizing: RankSizing, optimizer_cfg: Any, micro_batch: int, tensor: int,
                            data: int, dtype: str, recompute: bool, shard_optimizer: bool, stages: int, virtual: int,
                            schedule: str, micro_batches: int, sequence: bool) -> dict[str, int]:
    """memory_per_device's four parts for the most loaded pipeline rank, with sequence parallelism.

    The first rank holds the embedding and the most micro-batches in flight (pipeline.in_flight_chunks), the
    last the final norm, its copy of the tied embedding and the head's activations (the fused cross-entropy's
    fp32 softmax over V/t; all m of them under GPipe, one otherwise); the larger total is returned. Optimizer
    state is the rank's exact count scaled to the stage's parameters. With sequence parallelism every
    activation of a layer, and the stream at the ends, is split t ways (Korthikanti et al. 2022 §4.2.2).
    At stages = 1 without sequence parallelism this equals memory_per_device (tested).
    """
    g, layers = sizing.param_groups, model_cfg.num_layers
    layer_params = g.get("blocks", 0) // layers
    word = g.get("wte", 0)
    first = sum(v for k, v in g.items() if k not in ("blocks", "wte", "ln_f"))
    kind = optimizer_kind(optimizer_cfg._target_)
    state_all = optimizer_state_bytes(kind, sizing.param_shapes, float(getattr(optimizer_cfg, "momentum", 0) or 0))
    e, dropout = compute_bytes(dtype), model_cfg.dropout > 0
    s, b, h = model_cfg.seq_length, micro_batch, model_cfg.hidden_size
    sbh, split = s * b * h, tensor if sequence else 1
    args = (s, b, h, model_cfg.num_attention_heads)
    per_layer = (pipeline.sequence_parallel_activation_bytes_per_layer(
        memory.activation_bytes_per_layer(*args, 1, e, dropout, recompute), tensor) if sequence
        else memory.activation_bytes_per_layer(*args, tensor, e, dropout, recompute))
    best: dict[str, int] = {}
    for stage in sorted({0, stages - 1}):
        params = pipeline.stage_params(layer_params, layers, stages, word, first, g.get("ln_f", 0), stage)
        chunks = pipeline.in_flight_chunks(schedule, stages, virtual, micro_batches, stage)
        acts = chunks * (layers // (stages * virtual)) * per_layer
        if stage == 0 and dropout:  # the embedding-dropout mask of each micro-batch in flight
            acts += -(-chunks // virtual) * sbh // split
        if stage == stages - 1:  # final norm and output GEMM inputs, the fp32 softmax over V/t
            heads = micro_batches if (schedule == "gpipe" and stages > 1) else 1
            acts += heads * (2 * e * sbh // split + 4 * s * b * sizing.padded_vocab_size // tensor)
        state = state_all * params // sizing.params_per_rank
        if shard_optimizer and data > 1:
            state = math.ceil(state / data)
        parts = {"params": STATE_BYTES * params, "grads": STATE_BYTES * params, "optimizer": state,
                 "activations": acts}
        if sum(parts.values()) > sum(best.values()):
            best = parts
    return best
