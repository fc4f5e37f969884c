"""Sequence parallelism (Korthikanti et al. 2022 §4.2.2): each primitive against its dense equivalent, and
the whole GPT trained at tensor 2 with parallel.sequence=true against tensor 1: the same losses over 10 steps
and the same weights after them (fp32), with activation checkpointing and with BLOOM's ALiBi + embedding LN."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtlm.errors import ConfigError
from mtlm.parallel import ParallelState
from mtlm.parallel.sequence_gather import gather_from_sequence_region
from mtlm.parallel.sequence_linear import gather_linear
from mtlm.parallel.sequence_scatter import reduce_scatter_to_sequence_region
from mtlm.parallel.sequence_split import split_to_sequence_region
from mtlm.train.loop import Trainer
from tests.compose import SMALL_MODEL, compose_config
from tests.distributed import run_ranks

pytestmark = pytest.mark.multiprocess
B, S, H = 2, 8, 3


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _primitives(state: ParallelState) -> dict:
    g, r, t = state.tp_group, state.tp_rank, state.tensor
    full = _rand(0, B, S, H)
    grads = [_rand(10 + k, B, S, H) for k in range(t)]  # rank k's upstream gradient of the whole sequence
    out = {}
    # gather: forward = the whole sequence from the chunks; backward = this rank's chunk of the summed grads.
    x = full.chunk(t, dim=1)[r].clone().requires_grad_()
    y = gather_from_sequence_region(x, g)
    y.backward(grads[r])
    out["gather"] = (y.detach(), x.grad, sum(grads).chunk(t, dim=1)[r])
    # reduce-scatter: forward = this rank's chunk of the sum of every rank's input; backward = all-gather.
    parts = [_rand(20 + k, B, S, H) for k in range(t)]
    x = parts[r].clone().requires_grad_()
    y = reduce_scatter_to_sequence_region(x, g)
    chunk_grads = [_rand(30 + k, B, S // t, H) for k in range(t)]
    y.backward(chunk_grads[r])
    out["scatter"] = (y.detach(), sum(parts).chunk(t, dim=1)[r], x.grad, torch.cat(chunk_grads, dim=1))
    # split: forward = this rank's chunk, no communication; backward = all-gather of the chunks' gradients.
    x = full.clone().requires_grad_()
    y = split_to_sequence_region(x, g)
    y.backward(chunk_grads[r])
    out["split"] = (y.detach(), full.chunk(t, dim=1)[r], x.grad, torch.cat(chunk_grads, dim=1))
    # gather + column-parallel GEMM that keeps only its chunk: the dense GEMM on the whole sequence.
    weights = [_rand(40 + k, 5, H) for k in range(t)]  # rank k's rows of the full [5t, H] weight
    w, bias = weights[r].clone().requires_grad_(), _rand(50 + r, 5).requires_grad_()
    x = full.chunk(t, dim=1)[r].clone().requires_grad_()
    y = gather_linear(x, w, bias, g)
    out_grads = [_rand(60 + k, B, S, 5) for k in range(t)]
    y.backward(out_grads[r])
    dense_x = full.clone().requires_grad_()
    sum(torch.nn.functional.linear(dense_x, weights[k]) * out_grads[k] for k in range(t)).sum().backward()
    want_w = out_grads[r].reshape(-1, 5).t() @ full.reshape(-1, H)
    out["linear"] = (y.detach(), torch.nn.functional.linear(full, weights[r], bias.detach()), x.grad,
                     dense_x.grad.chunk(t, dim=1)[r], w.grad, want_w, bias.grad, out_grads[r].sum((0, 1)))
    return out


def test_sequence_primitives_equal_their_dense_equivalents() -> None:
    for rank, res in enumerate(run_ranks(_primitives, 2, timeout=60)):
        y, x_grad, want_grad = res["gather"]
        torch.testing.assert_close(y, _rand(0, B, S, H), rtol=0, atol=0)
        torch.testing.assert_close(x_grad, want_grad, rtol=1e-12, atol=1e-12, msg=f"rank {rank} gather backward")
        y, want, x_grad, want_grad = res["scatter"]
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=f"rank {rank} reduce-scatter")
        torch.testing.assert_close(x_grad, want_grad, rtol=0, atol=0)
        y, want, x_grad, want_grad = res["split"]
        assert y.shape == (B, S // 2, H)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        torch.testing.assert_close(x_grad, want_grad, rtol=0, atol=0)
        got, want = res["linear"][0::2], res["linear"][1::2]
        for part, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"rank {rank} gather_linear {part}")


# Three variants, each trained 10 steps: plain GPT, with activation checkpointing, and BLOOM-style (ALiBi and an
# embedding layer norm, post-LN to put layer norms on the embeddings and after every residual add).
VARIANTS = {
    "gpt": (),
    "checkpointing": ("trainer.activation_checkpointing=true",),
    "alibi": ("model.position_embedding=alibi", "model.embedding_layernorm=true", "model.layernorm_order=post"),
}
BASE = (*SMALL_MODEL, "model.dropout=0.0", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "trainer.max_steps=10", "scheduler.warmup_steps=2", "optimizer=sgd", "optimizer.lr=0.5")


def _full_weights(model: torch.nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if getattr(p, "partition_dim", None) is not None and state.tp_group is not None:
            parts = [torch.empty_like(w) for _ in range(state.tensor)]
            dist.all_gather(parts, w.contiguous(), group=state.tp_group)
            w = torch.cat(parts, dim=p.partition_dim)
        out[name] = w[: model.vocab_size] if name == "wte.weight" else w.clone()
    return out


def _train(state: ParallelState, tensor_overrides: tuple[str, ...]) -> dict:
    out = {}
    for variant, extra in VARIANTS.items():
        trainer = Trainer(compose_config(*BASE, *extra, *tensor_overrides), state, None, {})
        shapes: list[tuple[int, ...]] = []
        hook = trainer.model.blocks[0].register_forward_hook(
            lambda m, args, y, seen=shapes: seen.append(tuple(args[0].shape)))
        losses = [trainer.train_step()["loss"] for _ in range(10)]
        hook.remove()
        out[variant] = {"losses": losses, "weights": _full_weights(trainer.model, state), "block_input": shapes[0]}
    return out


def test_gpt_with_sequence_parallelism_trains_like_one_process(small_data_cache: str) -> None:
    torch.set_num_threads(1)
    ref = _train(ParallelState(), ())
    results = run_ranks(_train, 2, ("parallel.tensor=2", "parallel.sequence=true"), sequence=True, timeout=240)
    for variant in VARIANTS:
        want = ref[variant]
        assert want["block_input"] == (2, 16, 32)
        assert len(set(want["losses"])) == 10  # the losses move: the comparison is not of a constant
        for rank, res in enumerate(results):
            got = res[variant]
            assert got["block_input"] == (2, 8, 32), f"{variant}: the residual stream is not split by sequence"
            for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
                assert abs(a - b) <= 1e-6 * abs(b), f"{variant} rank {rank} step {step}: loss {a} vs {b}"
            assert got["weights"].keys() == want["weights"].keys()
            for name, w in want["weights"].items():
                rel = ((got["weights"][name] - w).norm() / w.norm()).item()
                assert rel <= 1e-6, f"{variant} rank {rank} {name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("overrides,needle", [
    ((), "needs parallel.tensor > 1"),
    (("parallel.tensor=2", "model.seq_length=15", "model.max_position_embeddings=16"), "not divisible"),
])
def test_sequence_parallelism_is_refused_up_front(overrides: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        compose_config(*SMALL_MODEL, "parallel.sequence=true", *overrides)
    assert info.value.key == "parallel.sequence" and "\n" not in str(info.value)
