"""Text generation with a GPT at any tensor degree: greedy or sampled, with or without the KV cache.

At tensor degree t every rank holds 1/t of the vocabulary's logits. The next token is chosen from the whole
vocabulary, so the shards are gathered; tensor rank 0 chooses and broadcasts its choice to the group, so every
rank feeds the same token to the next step however the sampling's random numbers or ties fall elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtlm.eval.scoring import full_vocab_logits
from mtlm.model.gpt import GPT
from mtlm.model.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [b, V] with everything outside the top-k and outside the nucleus (the smallest set of most
    likely tokens whose probability reaches top_p; the most likely token always stays) set to -inf."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = before >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [b] from whole-vocabulary logits [b, V]: the argmax at temperature 0, else a sample."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


def _same_on_tensor_group(model: GPT, token: torch.Tensor) -> torch.Tensor:
    """Tensor rank 0's token on every rank of its tensor group."""
    state = model.state
    if state.tp_group is not None:
        dist.broadcast(token, src=state.rank - state.tp_rank, group=state.tp_group)
    return token


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, seed: int = 0,
             eod_id: int | None = None, kv_cache: bool = True, autocast=contextlib.nullcontext) -> list[int]:
    """The new tokens after `prompt` (ids), stopping after `max_new_tokens`, before the end-of-document token
    (not returned), or when the model's positions run out."""
    device = model.state.device
    max_positions = model.cfg.max_position_embeddings
    if not 0 < len(prompt) < max_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens; it must have 1 to {max_positions - 1} "
                         f"(the model's context is {max_positions} positions)")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.as_tensor(list(prompt), dtype=torch.long, device=device)[None]
    cache = KVCache(len(model.blocks)) if kv_cache else None
    feed = tokens
    new: list[int] = []
    while len(new) < max_new_tokens and tokens.shape[1] < max_positions:
        with autocast():
            local = model(feed, kv_cache=cache)[:, -1]
        logits = full_vocab_logits(model, local).float().cpu()
        token = _same_on_tensor_group(model, choose_next(logits, sampling, generator).to(device))
        if eod_id is not None and int(token) == eod_id:
            break
        new.append(int(token))
        tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
        feed = token.view(1, 1) if cache is not None else tokens
    return new
