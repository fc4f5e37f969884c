"""Activation checkpointing (§4: recompute each layer in backward) changes nothing but memory: at tensor
degree 2 with dropout 0.1, every gradient equals the one without checkpointing, which needs the recompute to
replay both RNG streams (the replicated one for residual dropout, the tensor-region one for attention
dropout). Two negative controls show that each replay is needed, so the comparison is not vacuous."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import mtlm.parallel.checkpoint as ckpt_module
from mtlm.model.gpt import GPT
from mtlm.parallel import ParallelState
from mtlm.parallel.random import get_states, seed_streams
from tests.distributed import run_ranks

pytestmark = pytest.mark.multiprocess
VOCAB, B, S = 300, 2, 16


def _cfg(attention: str) -> SimpleNamespace:
    return SimpleNamespace(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=S,
                           max_position_embeddings=S, make_vocab_size_divisible_by=128, dropout=0.1,
                           init_std=0.02, layernorm_eps=1e-5, attention=attention)


def _step(state: ParallelState, checkpointing: bool, attention: str) -> dict:
    seed_streams(5, state.tp_rank, state.device)
    model = GPT(_cfg(attention), VOCAB, state, activation_checkpointing=checkpointing)
    model.init_weights(seed=5)
    model.train()
    gen = torch.Generator().manual_seed(9)
    ids, targets = torch.randint(0, VOCAB, (B, S), generator=gen), torch.randint(0, VOCAB, (B, S), generator=gen)
    loss = model(ids, targets).mean()
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "rng_after": get_states(state.device)}


def _no_default_replay(fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, **{**kwargs, "preserve_rng_state": False})


def _runs(state: ParallelState, attention: str) -> dict:
    out = {"off": _step(state, False, attention), "on": _step(state, True, attention)}
    # Negative controls: break one replay at a time.
    with _patched(ckpt_module, "checkpoint", _no_default_replay):
        out["no_default_replay"] = _step(state, True, attention)
    with _patched(ckpt_module.rng, "set_tensor_stream", lambda device, s: None):
        out["no_tensor_replay"] = _step(state, True, attention)
    return out


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


@pytest.mark.parametrize("attention", ["sdpa", "unfused"])
def test_checkpointed_gradients_equal_plain_at_tensor_degree_2(attention: str) -> None:
    results = run_ranks(_runs, 2, attention, tensor=2)
    for rank, res in enumerate(results):
        off, on = res["off"], res["on"]
        assert on["grads"].keys() == off["grads"].keys() and len(off["grads"]) == 4 + 12 * 2
        for name, g in off["grads"].items():
            assert g.norm() > 0, f"{name}: zero reference gradient"
            rel = ((on["grads"][name] - g).norm() / g.norm()).item()
            assert rel <= 1e-6, f"rank {rank} {name}: relative difference {rel:.2e}"
        torch.testing.assert_close(on["loss"], off["loss"], rtol=0, atol=0)
        # Both streams continue exactly as without recompute (the replay hands the current state back).
        for stream in ("default", "tensor"):
            assert torch.equal(on["rng_after"][stream], off["rng_after"][stream]), f"rank {rank}: {stream}"
        # Without either replay the recomputed dropout masks differ and the gradients are visibly wrong.
        assert _max_rel_diff(res["no_default_replay"]["grads"], off["grads"]) > 1e-2
        assert _max_rel_diff(res["no_tensor_replay"]["grads"], off["grads"]) > 1e-2
