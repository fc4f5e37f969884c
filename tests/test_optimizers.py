"""SGD (momentum) and Adafactor next to AdamW: the config tree instantiates them, their state survives a
checkpoint bit for bit, ZeRO-1 shards it, and Adafactor's factored state reshards across tensor degrees
(mtlm/train/optim_state.py): read back at degree 1, a degree-2 run's state equals the dense run's."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from mtlm.checkpoint.format import ShardReader, read_metadata
from mtlm.parallel import ParallelState
from mtlm.parallel.random import seed_streams
from mtlm.train.checkpoint import latest_checkpoint, load_weights, restore_checkpoint, save_checkpoint
from mtlm.train.optim import build_optimizer, optimizer_factory
from tests.distributed import run_ranks
from tests.test_checkpoint import VOCAB, _cfg, _full, _ids

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "weight_decay": 0.01, "momentum": 0.9,
       "nesterov": False, "betas": None, "eps": None, "fused": None, "beta2_decay": None, "d": None}
ADAFACTOR = {"_target_": "torch.optim.Adafactor", "_partial_": True, "lr": 1e-2, "weight_decay": 0.01,
             "beta2_decay": -0.8, "d": 1.0, "momentum": None, "nesterov": None}
OPTIMIZERS = {"sgd": SGD, "adafactor": ADAFACTOR}


def _build(state: ParallelState, opt_cfg: dict, seed: int = 1, zero: bool = False):
    from mtlm.model.gpt import GPT

    seed_streams(seed, state.tp_rank, state.device)
    model = GPT(_cfg(), VOCAB, state)
    model.init_weights(seed)
    opt = build_optimizer(model, optimizer_factory(opt_cfg), opt_cfg["weight_decay"],
                          shard_group=state.dp_group if zero else None)
    return model, opt


def _step(model, opt, batch: int) -> None:
    model(_ids(10 + batch), _ids(20 + batch)).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_conf_optimizer_files_instantiate_torch_classes() -> None:
    from tests.compose import compose_config

    for name, cls in (("sgd", torch.optim.SGD), ("adafactor", torch.optim.Adafactor), ("adamw", torch.optim.AdamW)):
        cfg = compose_config(f"optimizer={name}")
        factory = optimizer_factory(cfg.optimizer)
        assert isinstance(factory, functools.partial) and factory.func is cls
        assert None not in factory.keywords.values()  # null keys stay out: each class's own default


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_save_resume_is_exact(tmp_path: Path, name: str) -> None:
    torch.set_num_threads(1)
    state = ParallelState()
    model, opt = _build(state, OPTIMIZERS[name])
    for b in range(2):
        _step(model, opt, b)
    save_checkpoint(tmp_path / "ck", 2, 16, state, model, opt)
    for b in range(2, 4):
        _step(model, opt, b)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, opt2 = _build(state, OPTIMIZERS[name], seed=7)  # another init: the load must overwrite it all
    meta = restore_checkpoint(tmp_path / "ck", state, model2, opt2)
    load_weights(ShardReader(latest_checkpoint(tmp_path / "ck"), meta), state, model2)
    keys = {k for st in opt2.state.values() for k in st}
    assert keys == ({"momentum_buffer"} if name == "sgd" else {"step", "row_var", "col_var", "variance"})
    for b in range(2, 4):
        _step(model2, opt2, b)
    for n, p in model2.named_parameters():
        assert torch.equal(p, ref[n]), n


def _adafactor_state(state: ParallelState, root: str | None) -> dict:
    """One Adafactor step (and a save when root is set); each parameter's state gathered to the whole model's
    shape: the factor kept along the partition dim concatenated, the reduced one averaged over the ranks."""
    model, opt = _build(state, ADAFACTOR)
    _step(model, opt, 0)
    if root is not None:
        save_checkpoint(root, 1, 2, state, model, opt)
    return _gathered(state, model, opt)


def _gathered(state: ParallelState, model, opt) -> dict:
    out = {}
    for name, p in model.named_parameters():
        d = getattr(p, "partition_dim", None)
        for key, v in opt.state[p].items():
            if key == "step":
                continue
            if d is not None and v.shape[d] == 1 and p.shape[d] > 1:
                out[f"{name}.{key}"] = _full(v, d, state).mean(dim=d, keepdim=True) if state.tensor > 1 else v
            else:
                out[f"{name}.{key}"] = _full(v, d, state)
    return out


def _load_adafactor(state: ParallelState, root: str) -> dict:
    model, opt = _build(state, ADAFACTOR, seed=5)
    restore_checkpoint(root, state, model, opt)
    own = opt.state[dict(model.named_parameters())["blocks.0.attn.qkv.weight"]]["col_var"].clone()
    return {**_gathered(state, model, opt), "rank_col_var": own}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=what)


@pytest.mark.multiprocess
def test_adafactor_reshards_to_the_dense_state(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    saved = run_ranks(_adafactor_state, 2, root)[0]
    meta = read_metadata(latest_checkpoint(root))
    # qkv is column-parallel (dim 0): its row statistic is split like it, its column statistic is per rank.
    assert meta["tensors"]["optim.blocks.0.attn.qkv.weight.row_var"]["shape"] == [192, 1]
    assert meta["tensors"]["optim.blocks.0.attn.qkv.weight.col_var"]["shape"] == [2, 64]
    assert meta["tensors"]["optim.blocks.0.mlp.proj.weight.row_var"]["shape"] == [64, 2]  # row-parallel (dim 1)

    again = run_ranks(_load_adafactor, 2, root)  # same degree: every rank gets its own values back
    for k, v in saved.items():
        assert torch.equal(again[0][k], v), k

    torch.set_num_threads(1)
    dense = _adafactor_state(ParallelState(), None)  # the same step at tensor degree 1
    one = _load_adafactor(ParallelState(), root)
    for k, v in dense.items():
        if k.startswith("wte.weight.") and k.endswith("col_var"):
            continue  # averaged over each degree's padded vocabulary (384 vs 512 rows): not the dense value
        _close(one[k], v, k)
    # The negative control: a rank's own column statistic (its half of the rows) is not the dense one.
    dense_col = dense["blocks.0.attn.qkv.weight.col_var"]
    for res in again:
        assert not torch.allclose(res["rank_col_var"], dense_col, rtol=1e-2)


def _zero_step(state: ParallelState, root: str) -> dict:
    out = {}
    for name, cfg in OPTIMIZERS.items():
        model, opt = _build(state, cfg, zero=True)
        _step(model, opt, 0)  # same batch on both data ranks: identical gradients without DDP
        save_checkpoint(f"{root}/{name}", 1, 2, state, model, opt)
        out[name] = {f"{n}.{k}": v.clone() for n, p in model.named_parameters() if p in opt.optim.state
                     for k, v in opt.optim.state[p].items() if k != "step"}
    return out


@pytest.mark.multiprocess
def test_zero_sharded_state_reloads_unsharded(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    owned = run_ranks(_zero_step, 2, root, tensor=1)  # tensor 1 x data 2: the state split over data ranks
    torch.set_num_threads(1)
    for name, cfg in OPTIMIZERS.items():
        a, b = owned[0][name], owned[1][name]
        assert a and b and not a.keys() & b.keys(), name
        model, opt = _build(ParallelState(), cfg, seed=5)
        restore_checkpoint(f"{root}/{name}", ParallelState(), model, opt)
        params = dict(model.named_parameters())
        for key, v in {**a, **b}.items():
            pname, k = key.rsplit(".", 1)
            assert torch.equal(opt.state[params[pname]][k], v), f"{name}: {key}"
