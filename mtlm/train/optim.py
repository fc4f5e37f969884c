"""Optimizer parameter groups and the tensor-parallel-aware gradient clipping."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtlm.errors import ConfigError
from mtlm.parallel.state import ParallelState


def build_optimizer(model: nn.Module, factory: Callable[..., torch.optim.Optimizer],
                    weight_decay: float, shard_group: dist.ProcessGroup | None = None) -> torch.optim.Optimizer:
    """Weight decay on matrices (linear weights, embeddings), none on biases and layer-norm gains.

    `factory` is `hydra.utils.instantiate(cfg.optimizer)`, a partial holding lr, betas, eps, ...

    `shard_group` (the data-parallel group, or None): shard the optimizer state over it with torch's
    ZeroRedundancyOptimizer (ZeRO stage 1, Rajbhandari et al. 2020). Each data rank owns whole parameters,
    keeps Adam's moments only for those, updates them, and broadcasts them to its data peers after the step;
    gradients stay all-reduced by DDP, so the update equals the unsharded one. Tensor ranks are untouched:
    each tensor rank's shards form their own ZeRO group with the same shards on the other data ranks.
    Checkpointing: `state_dict()` of a ZeRO optimizer needs `consolidate_state_dict(to=rank)` on every rank
    of the group first, or save each rank's `.optim.state_dict()` as its own shard.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if shard_group is None:
        return factory(params=groups)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(factory, functools.partial):
        raise TypeError(f"optimizer sharding needs the optimizer as a functools.partial, got {factory!r}")
    # Parameters are partitioned greedily by size (largest first, to the least-loaded rank), across groups.
    return ZeroRedundancyOptimizer(groups, optimizer_class=factory.func, process_group=shard_group,
                                   **factory.keywords)


# The optimizers conf/optimizer/ offers, and the keys of OptimizerConfig each one takes.
OPTIMIZER_KEYS = {"torch.optim.AdamW": ("betas", "eps", "fused"), "torch.optim.SGD": ("momentum", "nesterov"),
                  "torch.optim.Adafactor": ("beta2_decay", "d")}
SPECIFIC_KEYS = {k for keys in OPTIMIZER_KEYS.values() for k in keys}


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """The optimizer node as instantiate() arguments, its null keys left out (each class's own default)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in node.items() if v is not None}


def optimizer_factory(cfg: Any) -> Callable[..., torch.optim.Optimizer]:
    """`cfg.optimizer` as a functools.partial of its class (lr, weight decay and the class's own keys)."""
    from hydra.utils import instantiate

    return instantiate(optimizer_kwargs(cfg), _convert_="all")


def check_optimizer_config(o: Any) -> None:
    """optimizer.* keys another optimizer takes, set for this one (a silently ignored setting otherwise)."""
    takes = OPTIMIZER_KEYS.get(o._target_)
    if takes is None:
        return  # another class named by the user: instantiate() reports what it does not take
    for key in sorted(SPECIFIC_KEYS - set(takes)):
        if o.get(key) is not None:
            raise ConfigError(f"optimizer.{key}", f"{o._target_} does not take it (it takes {', '.join(takes)}); "
                              f"remove it or pick another optimizer (conf/optimizer/)")
    if o.get("momentum") is not None and o.momentum < 0:
        raise ConfigError("optimizer.momentum", f"must be >= 0, got {o.momentum}")
    if o.get("nesterov") and not o.get("momentum"):
        raise ConfigError("optimizer.nesterov", "needs optimizer.momentum > 0")


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter], state: ParallelState) -> torch.Tensor:
    """The gradient norm of the whole (unsharded) model.

    Sharded parameters (partition_dim set) hold different slices on each tensor rank: their squares are
    summed over the tensor group. Replicated ones hold identical copies: counted once, not t times.
    Gradients are already averaged over data ranks by DDP, so no data-parallel reduction is needed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [p.grad for p in params if p.grad is not None and getattr(p, "partition_dim", None) is not None]
    sharded_ids = {id(g) for g in sharded}
    replicated = [g for g in grads if id(g) not in sharded_ids]
    dev = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros(2, device=dev, dtype=torch.float32)
    if sharded:
        sq[0] = torch.stack(torch._foreach_norm(sharded, 2.0)).float().pow(2).sum()
    if replicated:
        sq[1] = torch.stack(torch._foreach_norm(replicated, 2.0)).float().pow(2).sum()
    if state.tp_group is not None:
        shard_sq = sq[0:1].clone()
        dist.all_reduce(shard_sq, group=state.tp_group)
        sq[0] = shard_sq[0]
    if state.pp_group is not None:  # every stage's parameters (the tied embedding's copy left out by the caller)
        dist.all_reduce(sq, group=state.pp_group)
    return sq.sum().sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, state: ParallelState,
                    counted: list[nn.Parameter] | None = None) -> float:
    """Scale gradients so the global norm is at most max_norm (0 disables); returns the norm before.
    `counted`: the parameters whose gradients make up the norm, when not all of `params` (a pipeline's
    second copy of the tied embedding)."""
    norm = global_grad_norm(params if counted is None else counted, state)
    value = norm.item()
    if max_norm > 0 and math.isfinite(value) and value > max_norm:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], max_norm / (value + 1e-6))
    return value


def check_optimizer_values(o: Any) -> None:
    """optimizer.* values, then the keys this optimizer takes (called by mtlm.checks.validate)."""
    if o.lr <= 0:
        raise ConfigError("optimizer.lr", f"must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.betas is not None and (len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas)):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    check_optimizer_config(o)
