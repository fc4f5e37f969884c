"""ALiBi (Press et al., 2022, "Train Short, Test Long"), BLOOM's position information: no position embeddings;
each head adds `slope x (key position - query position)` to its attention scores, so attention decays
linearly with distance at a rate that differs per head.

Under tensor parallelism a rank holds a contiguous chunk of the heads (§3), so it keeps the same chunk of the
slopes: `local_slopes`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtlm.config import model_option
from mtlm.errors import ConfigError


def alibi_slopes(num_heads: int) -> list[float]:
    """The slope of every head (the ALiBi paper's geometric sequence, as BLOOM uses it).

    c = the largest power of two <= n: slopes (2^(-8/c))^k for k = 1..c; heads beyond c take the odd powers
    (2^(-4/c))^k, k = 1, 3, 5, ..., i.e. the slopes a model with 2c heads would have had in between."""
    c = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * k / c) for k in range(1, c + 1)]
    slopes += [2.0 ** (-4.0 * k / c) for k in range(1, 2 * (num_heads - c), 2)]
    return slopes


def local_slopes(num_heads: int, tensor: int, tp_rank: int) -> torch.Tensor:
    """The slopes of the heads this tensor rank holds (its contiguous chunk of num_heads / tensor)."""
    per_rank = num_heads // tensor
    return torch.tensor(alibi_slopes(num_heads)[tp_rank * per_rank:(tp_rank + 1) * per_rank])


_CACHE: dict[tuple, torch.Tensor] = {}


def alibi_causal_bias(slopes: torch.Tensor, queries: int, dtype: torch.dtype, device=None,
                      keys: int | None = None) -> torch.Tensor:
    """[heads, queries, keys] additive attention bias: slope x (key - query position) where the key is at or
    before the query, -inf after it (causal). The queries are the last `queries` of `keys` positions (keys
    defaults to queries; more with a KV cache in generation).

    BLOOM's own code adds slope x key position instead; softmax is shift invariant per row, so the
    probabilities are the same, but the relative form keeps the large values on the far-away keys whose
    probability is tiny anyway, where rounding (in bf16 especially) does not matter."""
    keys = queries if keys is None else keys
    cache_key = (tuple(slopes.tolist()), queries, keys, dtype, str(device))
    if cache_key not in _CACHE:  # every layer of a forward asks for the same bias
        if len(_CACHE) >= 8:
            _CACHE.clear()
        _CACHE[cache_key] = _bias(slopes, queries, keys, dtype, device)
    return _CACHE[cache_key]


def _bias(slopes: torch.Tensor, queries: int, keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    k = torch.arange(keys, device=device, dtype=torch.float32)
    q = k[keys - queries:]
    distance = k[None, :] - q[:, None]  # <= 0 where attended
    bias = slopes.to(device=device, dtype=torch.float32)[:, None, None] * distance
    return bias.masked_fill_(distance > 0, float("-inf")).to(dtype)


POSITION_EMBEDDINGS = ("learned", "alibi")


def validate_position_options(m: Any, family: str) -> None:
    """model.position_embedding / model.embedding_layernorm (mtlm.config.validate, via model/build.py)."""
    kind = model_option(m, "position_embedding")
    if kind not in POSITION_EMBEDDINGS:
        raise ConfigError("model.position_embedding", f"must be learned or alibi, got {kind!r}")
    if family != "gpt":
        for key, default in (("position_embedding", "learned"), ("embedding_layernorm", False)):
            if getattr(m, key, default) != default:
                raise ConfigError(f"model.{key}", f"only the GPT family reads it (BLOOM's option); this model is "
                                  f"{family}")
