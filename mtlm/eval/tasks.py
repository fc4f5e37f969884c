"""The two zero-shot tasks of the paper's Table 3: reading their files, and turning model scores into the
reported numbers. Reading happens once, in the launching process (bad input is one line before any rank
starts); scoring runs on every tensor rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from mtlm.errors import DataError
from mtlm.eval.detokenize import original_token_count, wikitext_detokenize
from mtlm.eval.metrics import lambada_example, perplexities, split_last_word
from mtlm.eval.scoring import score_continuations, score_stream
from mtlm.model.gpt import GPT


def read_text(path: str, key: str = "data.path") -> str:
    """A UTF-8 text file, or a one-line DataError naming it."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{key}: file not found: {os.path.abspath(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{key}: {os.path.abspath(path)} is not UTF-8 text (byte {err.start}); convert it to "
                        "UTF-8") from None


def read_lambada(path: str, text_key: str = "text") -> list[str]:
    """The passages of a LAMBADA jsonl file (one JSON object per line, the passage under `text_key`)."""
    passages = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"data.path: {path} line {n} is not JSON (LAMBADA is jsonl: one object per line)") \
                from None
        text = obj.get(text_key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"data.path: {path} line {n} has no {text_key!r} text field (data.text_key names it)")
        try:
            split_last_word(text)
        except ValueError:
            raise DataError(f"data.path: {path} line {n}: a passage needs a context and a last word") from None
        passages.append(text)
    if not passages:
        raise DataError(f"data.path: {path} holds no passages")
    return passages


def prepare(task: str, path: str, text_key: str, encode: Callable[[str], list[int]]) -> dict[str, Any]:
    """Read and tokenize a task's file into what the ranks score (plain lists: they travel to spawned ranks)."""
    if task == "wikitext":
        raw = read_text(path)
        ids = encode(wikitext_detokenize(raw))
        if len(ids) < 2:
            raise DataError(f"data.path: {path} is too short to score (under two tokens)")
        return {"ids": ids, "num_original_tokens": original_token_count(raw)}
    passages = read_lambada(path, text_key)
    return {"strict": [lambada_example(encode, p, strict=True) for p in passages],
            "last_token": [lambada_example(encode, p, strict=False) for p in passages]}


def evaluate_wikitext(model: GPT, ids: Sequence[int], num_original_tokens: int, seq_length: int, stride: int,
                      batch_size: int, autocast=contextlib.nullcontext) -> dict[str, float]:
    loss_sum, scored = score_stream(model, ids, seq_length, stride, batch_size, autocast)
    result = perplexities(loss_sum, scored, num_original_tokens)
    return {**result, "num_tokens": scored, "num_original_tokens": num_original_tokens}


def evaluate_lambada(model: GPT, strict: Sequence, last_token: Sequence, seq_length: int, batch_size: int,
                     autocast=contextlib.nullcontext) -> dict[str, float]:
    """Strict accuracy (the whole last word is the argmax at every position, teacher forced: the paper's
    number), the last-token accuracy, and the last word's perplexity (exp of its mean negative log-likelihood
    per passage)."""
    whole = score_continuations(model, strict, seq_length, batch_size, autocast)
    last = score_continuations(model, last_token, seq_length, batch_size, autocast)
    n = len(whole)
    return {"accuracy_strict": sum(s.greedy for s in whole) / n, "accuracy": sum(s.greedy for s in last) / n,
            "num_examples": n, "last_word_ppl": math.exp(-sum(s.logprob for s in whole) / n)}
