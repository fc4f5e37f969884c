"""Tiny checkpoints for the evaluation / generation / lm-eval tests: a sentencepiece tokenizer trained on a
few lines and a randomly initialised 2-layer GPT, saved as an mtlm checkpoint that records the tokenizer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from mtlm.data.tokenizer import train_tokenizer
from mtlm.model.gpt import GPT
from mtlm.parallel.state import ParallelState
from mtlm.train.checkpoint import save_checkpoint

TEXT = """The quick brown fox jumps over the lazy dog. Return the value of the variable, or None.
A tensor-parallel layer splits its weight by columns (first GEMM) or by rows (second GEMM).
Valkyria Chronicles III is a tactical role-playing game; it sold 1,000 copies in 2011 (rated 3.5).
"""


def tiny_config(**overrides) -> SimpleNamespace:
    # init_std 0.2 (not 0.02): peaked, distinct predictions, so argmax and greedy checks are not ties.
    cfg = dict(name="tiny", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
               max_position_embeddings=64, make_vocab_size_divisible_by=128, dropout=0.0, init_std=0.2,
               layernorm_eps=1e-5, attention="auto")
    return SimpleNamespace(**{**cfg, **overrides})


def make_checkpoint(root: Path, vocab_size: int = 340, seed: int = 1) -> Path:
    """root/ckpt (latest: step 7) with root/tok.model recorded as its tokenizer (identity included)."""
    tok = train_tokenizer([TEXT * 3], str(root / "tok.model"), vocab_size)
    state = ParallelState()
    torch.manual_seed(seed)
    model = GPT(tiny_config(), tok.vocab_size, state)
    model.init_weights(seed)
    save_checkpoint(root / "ckpt", 7, 0, state, model,
                    extra={"tokenizer": tok.entry()})
    return root / "ckpt"
