"""Every tensor-parallel layer equals its dense reference, in output and in every gradient (gloo, 2 and 4
ranks). The dense reference runs on each rank from the same seeded full tensors; each rank compares its
slice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlm.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from mtlm.parallel.cross_entropy import mask_padded_logits_
from tests.distributed import run_ranks

pytestmark = pytest.mark.multiprocess
B, S, IN, OUT, V = 2, 3, 8, 12, 24


def _full(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _chunk(x: torch.Tensor, state: ParallelState, dim: int) -> torch.Tensor:
    return x.chunk(state.tensor, dim=dim)[state.tp_rank].clone()


def _column(state: ParallelState) -> dict:
    w, b, x, g = _full(OUT, IN, seed=1), _full(OUT, seed=2), _full(B, S, IN, seed=3), _full(B, S, OUT, seed=4)
    layer = ColumnParallelLinear(IN, OUT, state, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_chunk(w, state, 0))
        layer.bias.copy_(_chunk(b, state, 0))
    xp = x.clone().requires_grad_()
    y = layer(xp)
    (y * _chunk(g, state, -1)).sum().backward()

    wd, bd, xd = w.clone().requires_grad_(), b.clone().requires_grad_(), x.clone().requires_grad_()
    yd = F.linear(xd, wd, bd)
    (yd * g).sum().backward()
    return {"y": (y, _chunk(yd, state, -1)), "dx": (xp.grad, xd.grad),
            "dw": (layer.weight.grad, _chunk(wd.grad, state, 0)), "db": (layer.bias.grad, _chunk(bd.grad, state, 0))}


def _row(state: ParallelState) -> dict:
    w, b, x, g = _full(OUT, IN, seed=1), _full(OUT, seed=2), _full(B, S, IN, seed=3), _full(B, S, OUT, seed=4)
    layer = RowParallelLinear(IN, OUT, state, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_chunk(w, state, 1))
        layer.bias.copy_(b)
    xp = _chunk(x, state, -1).requires_grad_()  # the input arrives split (output of a column layer)
    y = layer(xp)
    (y * g).sum().backward()

    wd, bd, xd = w.clone().requires_grad_(), b.clone().requires_grad_(), x.clone().requires_grad_()
    yd = F.linear(xd, wd, bd)
    (yd * g).sum().backward()
    return {"y": (y, yd), "dx": (xp.grad, _chunk(xd.grad, state, -1)),
            "dw": (layer.weight.grad, _chunk(wd.grad, state, 1)), "db": (layer.bias.grad, bd.grad)}


def _embedding(state: ParallelState) -> dict:
    w, g = _full(V, IN, seed=5), _full(B, S, IN, seed=6)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(7))
    layer = VocabParallelEmbedding(V, IN, state, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_chunk(w, state, 0))
    y = layer(ids)
    (y * g).sum().backward()
    wd = w.clone().requires_grad_()
    yd = F.embedding(ids, wd)
    (yd * g).sum().backward()
    return {"y": (y, yd), "dw": (layer.weight.grad, _chunk(wd.grad, state, 0))}


def _cross_entropy(state: ParallelState, real_vocab: int) -> dict:
    """Loss from vocab shards equals F.cross_entropy over the real vocabulary; padded entries get nothing."""
    logits, g = _full(B, S, V, seed=8) * 3, _full(B, S, seed=9).abs()
    target = torch.randint(0, real_vocab, (B, S), generator=torch.Generator().manual_seed(10))
    start = state.tp_rank * V // state.tensor
    local = _chunk(logits, state, -1).requires_grad_()
    masked = mask_padded_logits_(local.clone(), start, real_vocab)
    loss = vocab_parallel_cross_entropy(masked, target, start, state.tp_group)
    (loss * g).sum().backward()

    ld = logits.clone().requires_grad_()
    ref = F.cross_entropy(ld[..., :real_vocab].reshape(-1, real_vocab), target.reshape(-1), reduction="none")
    (ref.view(B, S) * g).sum().backward()
    return {"loss": (loss, ref.view(B, S)), "dlogits": (local.grad, _chunk(ld.grad, state, -1))}


def _assert_pairs(results: list[dict]) -> None:
    for rank, pairs in enumerate(results):
        for name, (got, want) in pairs.items():
            assert got is not None, f"rank {rank}: {name} has no gradient"
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"rank {rank}: {name}")


def _all_layers(state: ParallelState) -> dict:
    # real_vocab=13 of 24 at 4 ranks: rank 2 holds a half-padded slice and rank 3 a fully padded one.
    out = {}
    for fn in (_column, _row, _embedding):
        out.update({f"{fn.__name__[1:]}.{k}": v for k, v in fn(state).items()})
    for real_vocab in (V, 13):
        out.update({f"cross_entropy[{real_vocab}].{k}": v for k, v in _cross_entropy(state, real_vocab).items()})
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_match_dense(world: int) -> None:
    """Column / row linear, vocab embedding and the fused cross-entropy (with padded vocab) at 2 and 4 ranks."""
    _assert_pairs(run_ranks(_all_layers, world))


def test_layers_at_degree_one_are_dense() -> None:
    """Degree 1 (no process group): the same functions run with no communication at all."""
    _assert_pairs([_all_layers(ParallelState())])
