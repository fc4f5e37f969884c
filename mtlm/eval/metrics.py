"""The zero-shot protocol's formulas (paper Table 3), as small pure functions.

Targets are indexed by position in the token stream: target j is token j, predicted from tokens < j, so a
stream of T tokens has T - 1 targets (1 .. T-1); the first token is only ever context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOG_PPL = 20.0  # the protocol clamps the exponent, so a diverged model reports e^20, not inf


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) go through the model; it scores targets [first_scored, end)."""

    start: int
    end: int
    first_scored: int


def window_spans(num_tokens: int, seq_length: int, stride: int) -> list[Window]:
    """Overlapping windows of up to seq_length + 1 tokens, starting every `stride` tokens (Megatron-LM's
    `--overlapping-eval`): the first window scores all its targets, each later one only the targets no window
    scored yet (its last `stride`), so every target gets as much context as the stride allows and is scored
    exactly once. The last window is moved back to end on the last token, so all windows have the same length
    (they batch), and it scores only what is left."""
    if num_tokens < 2:
        return []
    if not 0 < stride <= seq_length:
        raise ValueError(f"stride must be in [1, seq_length={seq_length}], got {stride}")
    end = min(seq_length + 1, num_tokens)
    spans = [Window(0, end, 1)]
    start = 0
    while end < num_tokens:
        start = min(start + stride, num_tokens - seq_length - 1)
        new_end = start + seq_length + 1
        spans.append(Window(start, new_end, end))
        end = new_end
    return spans


def perplexities(loss_sum: float, num_targets: int, num_original_tokens: int) -> dict[str, float]:
    """Token perplexity exp(loss_sum / targets) and the paper's adjusted perplexity exp(loss_sum / (To - 1)):
    the same summed loss over the model's T - 1 targets, normalised by WikiText's own word count To instead,
    so models with different tokenizers are compared per word (exponents clamped at 20, as the protocol)."""
    loss = loss_sum / num_targets
    token_ratio = num_targets / (num_original_tokens - 1)
    return {"loss": loss, "ppl": math.exp(min(MAX_LOG_PPL, loss)),
            "adjusted_ppl": math.exp(min(MAX_LOG_PPL, loss * token_ratio)), "token_ratio": token_ratio}


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA's passage -> (context, last word): the word after the last space (the text is stripped)."""
    text = text.strip()
    cut = text.rfind(" ")
    if cut < 0:
        raise ValueError("a LAMBADA passage needs a context and a last word separated by a space")
    return text[:cut], text[cut + 1:]


def lambada_example(tokenize, text: str, strict: bool) -> tuple[list[int], list[int]]:
    """(context ids, label ids). Strict (what the paper reports): the label is the whole last word,
    tokenize(" " + word), possibly several tokens, after tokenize(context). Non-strict: the passage tokenized
    whole, the label its last token only."""
    if strict:
        context, word = split_last_word(text)
        return tokenize(context), tokenize(" " + word)
    ids = tokenize(text.strip())
    return ids[:-1], ids[-1:]
