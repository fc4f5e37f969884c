"""The unfused (Megatron-LM style) attention equals SDPA's; `model.attention` picks it as documented; a whole
GPT with it at tensor degree 2 equals degree 1, and its attention dropout draws from the tensor-region stream."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mtlm.model.gpt import GPT, _use_unfused, unfused_attention
from mtlm.parallel import ParallelState, gather_last_dim
from mtlm.parallel.random import get_states, seed_streams
from tests.distributed import run_ranks


@pytest.mark.parametrize("shape", [(2, 4, 16, 8), (1, 2, 33, 16), (3, 1, 1, 4)])
def test_unfused_attention_equals_sdpa_float64(shape: tuple[int, int, int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    g = torch.randn(*shape, dtype=torch.float64, generator=gen)
    outs = []
    for attend in (F.scaled_dot_product_attention, unfused_attention):
        y = attend(q, k, v, is_causal=True)
        q.grad = k.grad = v.grad = None
        y.backward(g)
        outs.append([y.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for name, ref, got in zip(("out", "dq", "dk", "dv"), *outs, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=name)
    # Causal: the first query sees only the first key, so its output is exactly v's first row.
    torch.testing.assert_close(outs[1][0][..., 0, :], v.detach()[..., 0, :], rtol=0, atol=1e-15)


def test_unfused_attention_in_bf16_stays_close_to_fp32() -> None:
    """Scores in bf16 (as Megatron-LM's baddbmm), softmax in fp32: close to the fp32 result, bf16-close."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = unfused_attention(*(t.bfloat16() for t in (q, k, v)))
    assert got.dtype == torch.bfloat16
    err = (got.float() - exact).abs()
    assert err.mean() < 2e-2 and err.max() < 0.1, (err.mean(), err.max())
    # The softmax runs on the bf16 scores but accumulates in fp32: the same bits as an fp32 softmax + cast.
    qb, kb, vb = (t.bfloat16().reshape(8, 64, 32) for t in (q, k, v))
    scores = torch.baddbmm(torch.full((64, 64), float("-inf"), dtype=torch.bfloat16).triu_(1).expand(8, 64, 64),
                           qb, kb.transpose(1, 2), alpha=32 ** -0.5)
    reference = torch.bmm(scores.float().softmax(-1).bfloat16(), vb).view(2, 4, 64, 32)
    assert torch.equal(got, reference)


class _CudaSoftmaxPolicy(TorchFunctionMode):
    """CUDA autocast's rule for softmax, which CPU autocast lacks: without an explicit dtype it runs in fp32.
    Records the dtype of every softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.out_dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.softmax, torch.softmax, F.softmax):
            if len(args) < 3 and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
            out = func(*args, **kwargs)
            self.out_dtypes.append(out.dtype)
            return out
        return func(*args, **kwargs)


@pytest.mark.parametrize("module", ["gpt", "transformer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unfused_attention_keeps_the_compute_dtype_under_cuda_autocast_rules(dtype: torch.dtype,
                                                                             module: str) -> None:
    """Issue 17 (4): the probabilities stay in the compute dtype even where autocast would make them fp32."""
    attend = importlib.import_module(f"mtlm.model.{module}").unfused_attention
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=gen, dtype=dtype) for _ in range(3))
    with torch.autocast("cpu", dtype=dtype), _CudaSoftmaxPolicy() as policy:
        y = attend(q, k, v)
    assert policy.out_dtypes == [dtype] and y.dtype == dtype
    with _CudaSoftmaxPolicy() as policy:  # fp32 stays fp32
        attend(*(t.float() for t in (q, k, v)))
    assert policy.out_dtypes == [torch.float32]


def test_attention_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not _use_unfused("auto", cpu)  # fp32: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _use_unfused("auto", cpu)  # reduced precision on CPU: unfused
        assert not _use_unfused("auto", cuda)  # GPUs keep the flash kernels
        assert not _use_unfused("sdpa", cpu)
    assert _use_unfused("unfused", cpu) and _use_unfused("unfused", cuda)


def _cfg(attention: str, dropout: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                           max_position_embeddings=16, make_vocab_size_divisible_by=128, dropout=dropout,
                           init_std=0.02, layernorm_eps=1e-5, attention=attention)


def _model_outputs(state: ParallelState, attention: str, dropout: float) -> dict:
    torch.set_num_threads(1)
    seed_streams(5, state.tp_rank, state.device)
    model = GPT(_cfg(attention, dropout), 300, state)
    model.init_weights(seed=5)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    model.eval()
    logits = gather_last_dim(model(ids), state.tp_group)[..., :300].detach()
    model.train()
    before = get_states(state.device)
    loss = model(ids, targets).mean()
    after = get_states(state.device)
    loss.backward()
    qkv = model.blocks[0].attn.qkv.weight.grad
    return {"logits": logits, "loss": loss.detach(), "ln_f": model.ln_f.weight.grad.clone(),
            "qkv_rows": qkv.shape[0], "tensor_stream_moved": not torch.equal(before["tensor"], after["tensor"]),
            "default_after": after["default"], "tensor_after": after["tensor"]}


@pytest.mark.multiprocess
def test_unfused_gpt_at_tensor_degree_two_equals_sdpa_at_one() -> None:
    ref = _model_outputs(ParallelState(), "sdpa", 0.0)
    for res in run_ranks(_model_outputs, 2, "unfused", 0.0):
        torch.testing.assert_close(res["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["ln_f"], ref["ln_f"], rtol=1e-4, atol=1e-6)
        assert res["qkv_rows"] * 2 == ref["qkv_rows"]  # each rank really holds half the heads


@pytest.mark.multiprocess
def test_unfused_attention_dropout_draws_from_the_tensor_region_stream() -> None:
    """Attention dropout sits inside the parallel region (§3): each rank's heads get masks from its own
    stream, while the replicated (default) stream stays identical across the tensor group."""
    clean = run_ranks(_model_outputs, 2, "unfused", 0.0)
    dropped = run_ranks(_model_outputs, 2, "unfused", 0.1)
    assert not clean[0]["tensor_stream_moved"]  # no dropout: nothing drawn from the tensor stream
    assert dropped[0]["tensor_stream_moved"] and dropped[1]["tensor_stream_moved"]
    assert not torch.equal(dropped[0]["tensor_after"], dropped[1]["tensor_after"])
    assert torch.equal(dropped[0]["default_after"], dropped[1]["default_after"])
    assert torch.equal(dropped[0]["loss"], dropped[1]["loss"])  # the loss is combined over the group
    assert not torch.allclose(dropped[0]["loss"], clean[0]["loss"])  # and dropout did act
