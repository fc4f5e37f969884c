"""The yardstick issue 7 names: a plain single-file GPT-2 with SDPA, as a careful researcher would write it.

No tensor-parallel layers, no config, no fused loss: nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention,
tied embeddings, F.cross_entropy over fp32 logits, torch AdamW (fused) and clipping at 1.0. Timed beside mtlm
and transformers, it shows what mtlm's abstractions cost (mtlm / plain) and how far a bare model gets
(plain / transformers) on the same machine in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mtlm.bench.speed import Shape


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc, self.fc_out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(h, dim=-1))
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + F.dropout(self.out(y.transpose(1, 2).reshape(b, s, h)), p)
        return x + F.dropout(self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh")), p)


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, hidden: int, layers: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def plain_step(shape: Shape, dtype: torch.dtype, device: torch.device) -> Callable[[], float]:
    """One optimizer step of PlainGPT (vocabulary padded as mtlm pads it) on a fixed random batch; autocast
    for bf16/fp16."""
    s = shape
    torch.manual_seed(0)
    model = PlainGPT(s.padded_vocab(), s.seq, s.hidden, s.layers, s.heads, s.dropout).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq + 1), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step
