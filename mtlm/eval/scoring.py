"""Scoring token streams and continuations with a GPT at any tensor degree (every rank calls these with the
same inputs and gets the same numbers back).

- Per-token losses come from the model's own fused vocab-parallel cross-entropy (§3): no rank ever holds the
  whole b x s x v logits for them.
- Argmax checks (LAMBADA, lm-eval's is_greedy) and log-probabilities of continuations need the whole
  vocabulary, so those gather the vocabulary shards of only the positions they read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtlm.eval.metrics import window_spans
from mtlm.model.gpt import GPT
from mtlm.parallel.mappings import gather_last_dim


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def score_stream(model: GPT, ids: Sequence[int], seq_length: int, stride: int, batch_size: int = 8,
                 autocast=contextlib.nullcontext) -> tuple[float, int]:
    """(sum of the losses of targets 1 .. T-1, T-1), each target scored once with overlapping windows
    (mtlm.eval.metrics.window_spans). The sum is accumulated in float64."""
    tokens = torch.as_tensor(list(ids), dtype=torch.long)
    spans = window_spans(len(tokens), seq_length, stride)
    total = torch.zeros((), dtype=torch.float64)
    scored = 0
    device = model.state.device
    for group in _batches(spans, batch_size):
        batch = torch.stack([tokens[w.start:w.end] for w in group]).to(device)  # all windows have one length
        with autocast():
            losses = model(batch[:, :-1], batch[:, 1:])  # losses[:, i] is target start + 1 + i
        for row, w in zip(losses, group, strict=True):
            part = row[w.first_scored - w.start - 1:]
            total += part.double().sum().cpu()
            scored += part.numel()
    return total.item(), scored


@dataclass
class ContinuationScore:
    logprob: float  # sum of log p(continuation token | everything before it)
    greedy: bool  # every continuation token was the argmax (teacher forced)
    num_tokens: int


def full_vocab_logits(model: GPT, local_logits: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary shard [..., V/t] -> the whole real vocabulary [..., V] (an all-gather)."""
    return gather_last_dim(local_logits.contiguous(), model.state.tp_group)[..., :model.vocab_size]


@torch.no_grad()
def score_continuations(model: GPT, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                        batch_size: int = 8, autocast=contextlib.nullcontext) -> list[ContinuationScore]:
    """For each (context ids, continuation ids): log p(continuation | context) and whether greedy decoding
    would have produced it, teacher-forced. Context is cut from the left to fit `max_length` inputs.

    Passages of a batch are right-padded: causal attention never lets a position see the padding after it."""
    out: list[ContinuationScore] = []
    device = model.state.device
    for group in _batches(list(pairs), batch_size):
        seqs, conts = [], []
        for ctx, cont in group:
            if not cont:
                raise ValueError("an empty continuation has nothing to score")
            full = (list(ctx) + list(cont))[-(max_length + 1):]
            if len(full) < 2 or len(cont) >= len(full):
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit {max_length} positions "
                                 "after at least one context token")
            seqs.append(full)
            conts.append(list(cont))
        width = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :len(s) - 1] = torch.as_tensor(s[:-1])
        with autocast():
            local = model(x.to(device))
        for i, (s, cont) in enumerate(zip(seqs, conts, strict=True)):
            first = len(s) - 1 - len(cont)  # input position predicting the first continuation token
            logits = full_vocab_logits(model, local[i, first:len(s) - 1]).float()
            target = torch.as_tensor(cont, device=logits.device)
            logp = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logits.argmax(-1) == target).all())
            out.append(ContinuationScore(float(logp.double().sum()), greedy, len(cont)))
    return out
