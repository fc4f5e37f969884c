"""The key/value cache of autoregressive generation (mtlm.generate).

Without it, each new token reruns the model over the whole sequence. With it, each attention layer keeps the
keys and values of the positions it has already seen (this rank's heads only, [b, local_heads, t, head_dim]),
so a step feeds only the new token and attends over the cached past plus itself: the same numbers, one
position's work per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerKV:
    """One attention layer's cached keys and values."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; returns all of them (past + new)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Every layer's LayerKV. `length`: positions cached so far (the next token's position)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the s newest positions (q [b, n, s, d]) over all t cached ones (k, v [b, n, t, d]):
    new position i (absolute t - s + i) sees keys 0 .. t - s + i."""
    s, t = q.shape[2], k.shape[2]
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if s == 1:
        return F.scaled_dot_product_attention(q, k, v)  # the newest position sees everything
    visible = torch.ones(s, t, dtype=torch.bool, device=q.device).tril_(t - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
