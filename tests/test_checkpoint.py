"""Checkpoints in-process and on gloo ranks: resharding across tensor degrees (model and Adam state, padded
vocabulary), ZeRO-sharded optimizer state read back at another data degree, the `latest` pointer and
rotation, and a one-line error naming the file for each kind of bad checkpoint."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mtlm.checkpoint.format import CheckpointError, ShardReader, check_shard_headers, read_metadata
from mtlm.model.gpt import GPT
from mtlm.parallel import ParallelState, gather_last_dim
from mtlm.parallel.random import seed_streams
from mtlm.train.checkpoint import (
    check_before_launch,
    latest_checkpoint,
    load_weights,
    restore_checkpoint,
    save_checkpoint,
)
from mtlm.train.optim import build_optimizer
from tests.distributed import run_ranks

VOCAB = 300  # padded to 384 at t=1 and 512 at t=2 / t=4: the stored rows must not depend on the degree
B, S = 2, 16
WATCHED = ("wte.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.proj.weight", "blocks.1.ln2.weight")


def _cfg(**kw) -> SimpleNamespace:
    base = dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=S,
                max_position_embeddings=S, make_vocab_size_divisible_by=128, dropout=0.0, init_std=0.02,
                layernorm_eps=1e-5)
    return SimpleNamespace(**{**base, **kw})


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _build(state: ParallelState, seed: int, zero: bool = False, **cfg) -> tuple[GPT, torch.optim.Optimizer]:
    seed_streams(seed, state.tp_rank, state.device)
    model = GPT(_cfg(**cfg), VOCAB, state)
    model.init_weights(seed)
    opt = build_optimizer(model, functools.partial(torch.optim.AdamW, lr=1e-2), 0.01,
                          shard_group=state.dp_group if zero else None)
    return model, opt


def _train_step(model: GPT, opt: torch.optim.Optimizer) -> None:
    model(_ids(1), _ids(2)).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _full(t: torch.Tensor, dim: int | None, state: ParallelState) -> torch.Tensor:
    if dim is None or state.tp_group is None:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(state.tensor)]
    dist.all_gather(parts, t.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def _snapshot(state: ParallelState, model: GPT, opt: torch.optim.Optimizer) -> dict:
    params = dict(model.named_parameters())
    logits = gather_last_dim(model(_ids(3)), state.tp_group)[..., :VOCAB]
    moments = {n: _full(opt.state[params[n]]["exp_avg"], params[n].partition_dim, state)[:VOCAB] for n in WATCHED}
    steps = {float(opt.state[p]["step"]) for p in params.values()}
    return {"logits": logits, "exp_avg": moments, "steps": steps, "padded": model.padded_vocab_size}


def _train_and_save(state: ParallelState, root: str) -> dict:
    model, opt = _build(state, seed=1)
    _train_step(model, opt)
    save_checkpoint(root, 1, 8, state, model, opt)
    return _snapshot(state, model, opt)


def _load(state: ParallelState, root: str) -> dict:
    model, opt = _build(state, seed=99)  # another init: the load must overwrite every value
    meta = restore_checkpoint(root, state, model, opt)
    reader = ShardReader(latest_checkpoint(root), meta)
    load_weights(reader, state, model)
    return {**_snapshot(state, model, opt), "opened": sorted(reader._files)}


def _assert_same(got: dict, ref: dict) -> None:
    scale = ref["logits"].abs().max()
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5 * scale)
    for name, m in ref["exp_avg"].items():
        assert m.abs().sum() > 0, f"{name}: no optimizer state to compare"
        assert torch.equal(got["exp_avg"][name], m), name
    assert got["steps"] == ref["steps"] == {1.0}


@pytest.mark.multiprocess
def test_reshard_tensor_2_to_1_and_4(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    saved = run_ranks(_train_and_save, 2, root)
    ref = saved[0]
    assert ref["padded"] == 512
    meta = read_metadata(latest_checkpoint(root))
    wte = meta["tensors"]["model.wte.weight"]
    assert wte["shape"] == [VOCAB, 64] and [(s["start"], s["stop"]) for s in wte["shards"]] == [(0, 256), (256, 300)]
    assert meta["tensors"]["optim.blocks.0.mlp.proj.weight.exp_avg"]["partition_dim"] == 1

    torch.set_num_threads(1)
    one = _load(ParallelState(), root)
    assert one["padded"] == 384
    _assert_same(one, ref)

    four = run_ranks(_load, 4, root)
    for res in four:
        _assert_same(res, ref)
    # Rank 0 of 4 holds the first quarter of each sharded tensor, all inside rank 0 of 2's file: it never
    # opens the other file. Rank 3's vocabulary rows are all padding (384..511 > 300).
    assert four[0]["opened"] == ["rank00000.safetensors"]
    assert "rank00001.safetensors" in four[2]["opened"]


def _zero_save(state: ParallelState, root: str) -> dict:
    model, opt = _build(state, seed=1, zero=True)
    _train_step(model, opt)  # same batch on both data ranks: identical gradients without DDP
    save_checkpoint(root, 1, 8, state, model, opt)
    return {n: opt.optim.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in opt.optim.state}


@pytest.mark.multiprocess
def test_zero_optimizer_state_reloads_at_another_data_degree(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    owned = run_ranks(_zero_save, 2, root, tensor=1)  # tensor 1 x data 2, Adam state split over data ranks
    assert owned[0] and owned[1] and not owned[0].keys() & owned[1].keys()
    meta = read_metadata(latest_checkpoint(root))
    assert meta["layout"]["shard_optimizer"] is True
    writers = {s["file"] for n, e in meta["tensors"].items() if n.startswith("optim.") for s in e["shards"]}
    assert writers == {"rank00000.safetensors", "rank00001.safetensors"}

    torch.set_num_threads(1)
    model, opt = _build(ParallelState(), seed=5)  # data 1, a plain AdamW
    restore_checkpoint(root, ParallelState(), model, opt)
    params = dict(model.named_parameters())
    for name, m in {**owned[0], **owned[1]}.items():
        assert torch.equal(opt.state[params[name]]["exp_avg"], m), name
    assert len(opt.state) == len(params)


# ---- in one process: pointer, rotation, timeline, bad checkpoints --------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model, opt = _build(ParallelState(), seed=1)
    _train_step(model, opt)
    save_checkpoint(tmp_path / "ck", 1, 8, ParallelState(), model, opt)
    return tmp_path / "ck"


def test_latest_pointer_rotation_and_timeline(tmp_path: Path) -> None:
    model, opt = _build(ParallelState(), seed=1)
    root = tmp_path / "ck"
    for step in (2, 4, 6, 8):
        save_checkpoint(root, step, 8 * step, ParallelState(), model, opt, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert json.loads((root / "latest").read_text()) == {"step": 8, "dir": "step_00000008"}
    # Saving below the newest (another timeline, which train.py refuses before launch unless
    # checkpoint.overwrite=true deletes it first) deletes nothing newer: only the rotation below the step.
    save_checkpoint(root, 4, 32, ParallelState(), model, opt, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006", "step_00000008"]
    assert latest_checkpoint(root).name == "step_00000004"
    for stale in ("step_00000006", "step_00000008"):
        shutil.rmtree(root / stale)
    # Saving a step that exists replaces it; a stale half-written save of another step is cleaned up.
    (root / ".tmp-step_00000009").mkdir()
    save_checkpoint(root, 4, 32, ParallelState(), model, opt, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    assert read_metadata(root / "step_00000004")["consumed_samples"] == 32


def _one_line_error(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_model_shape_mismatch_is_one_line(saved: Path) -> None:
    cfg = SimpleNamespace(model=_cfg(hidden_size=128), checkpoint=SimpleNamespace(resume=str(saved), dir=str(saved),
                                                                                save=True))
    msg = _one_line_error(check_before_launch, cfg, lambda: VOCAB)
    assert "step_00000001/metadata.json" in msg and "model.hidden_size=64, this run has 128" in msg
    cfg.model = _cfg()
    assert check_before_launch(cfg, lambda: VOCAB) == str((saved / "step_00000001").resolve())
    msg = _one_line_error(check_before_launch, cfg, lambda: 512)
    assert "model.vocab_size=300, this run has 512" in msg
    # Inside a rank (no parent check, e.g. a direct API call), the tensor shapes catch it.
    model, opt = _build(ParallelState(), seed=1, num_layers=2, hidden_size=32)
    msg = _one_line_error(restore_checkpoint, saved, ParallelState(), model, opt)
    assert "metadata.json" in msg and "model.wte.weight has shape (300, 64)" in msg and "(300, 32)" in msg


def test_truncated_shard_is_one_line(saved: Path) -> None:
    shard = saved / "step_00000001" / "rank00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(read_metadata, saved / "step_00000001")
    assert str(shard) in msg and "truncated" in msg and str(len(data)) in msg


def test_missing_shard_is_one_line(saved: Path) -> None:
    (saved / "step_00000001" / "rank00000.safetensors").unlink()
    msg = _one_line_error(read_metadata, saved / "step_00000001")
    assert "rank00000.safetensors: missing shard file" in msg


def test_corrupted_metadata_is_one_line(saved: Path) -> None:
    meta = saved / "step_00000001" / "metadata.json"
    meta.write_text(meta.read_text()[:100])
    msg = _one_line_error(read_metadata, saved / "step_00000001")
    assert str(meta) in msg and "corrupted JSON" in msg


def test_damaged_header_is_caught_before_launch(saved: Path) -> None:
    shard = saved / "step_00000001" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage in the JSON header, same size: only the header check can see it
    shard.write_bytes(bytes(data))
    meta = read_metadata(saved / "step_00000001")
    msg = _one_line_error(check_shard_headers, saved / "step_00000001", meta)
    assert str(shard) in msg
