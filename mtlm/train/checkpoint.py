"""Checkpoints that survive crashes, resume exactly and reshard: every rank writes its own shards, rank 0
commits them with one atomic rename.

checkpoint.dir (default `checkpoints/<model.name>-<shape digest>`, relative to where train.py is started):

    latest                     {"step": 20, "dir": "step_00000020"}, replaced by an atomic rename
    step_00000010/ ...         older checkpoints, the newest `checkpoint.keep` are kept
    step_00000020/
        metadata.json          step, data position (global samples), layout, model shape, lr / scheduler /
                               loss-scaler state, the resolved config, and the index of every tensor slice
        rank00000.safetensors  one file per rank: its model and optimizer slices (data rank 0 only, or with
        rank00001.safetensors  ZeRO the data rank that owns them) and its own RNG streams
    .tmp-step_00000030/        a save in progress: invisible until renamed, removed by the next save

A save: every rank writes and fsyncs its file into .tmp-step_N; rank 0 gathers the index, writes and fsyncs
metadata.json, renames the folder to step_N, then moves `latest` (write latest.tmp, fsync, rename, fsync the
folder). A crash at any moment leaves `latest` naming a complete checkpoint. A folder holds one run's
timeline (train/timeline.py moves another aside before launch): after a commit, of the checkpoints up to the one just
saved the newest `keep` stay.

Resume is bit-exact on CPU in fp32 with the same layout and thread count: parameters, Adam moments and
step counts, lr and scheduler position, loss scale, both RNG streams of every rank (restored last, after
the data and model are built) and the global sample position. Another layout re-seeds the RNG streams from
(seed, step), since per-rank random streams have no meaning at another degree.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtlm.checkpoint.format import (
    FORMAT,
    METADATA,
    VERSION,
    CheckpointError,
    RankShard,
    ShardReader,
    check_shard_headers,
    commit,
    find_checkpoint,
    latest_checkpoint,
    merge_index,
    param_slice,
    rank_file,
    read_metadata,
    step_dirs,
    write_json,
)
from mtlm.config import GPT_TARGET, model_option
from mtlm.data.text_tokenizer import check_same_tokenizer
from mtlm.errors import ConfigError
from mtlm.model.spec import model_target
from mtlm.parallel import random as rng
from mtlm.parallel.state import ParallelState
from mtlm.train.optim_state import read_state, state_slice
from mtlm.train.timeline import claim_folder

MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")

__all__ = ["CheckpointError", "latest_checkpoint", "restore_checkpoint", "save_checkpoint"]


def _crash_point(point: str, step: int) -> None:
    """Test hook: MTLM_CKPT_CRASH_AT=shards|metadata|before_pointer|after_pointer[:STEP] kills this process."""
    where, _, at = os.environ.get("MTLM_CKPT_CRASH_AT", "").partition(":")
    if where == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def resume_target(ckpt_cfg: Any) -> Path | None:
    """What checkpoint.resume asks for: None (start fresh) or a checkpoint folder."""
    if ckpt_cfg is None or ckpt_cfg.resume == "none":
        return None
    if ckpt_cfg.resume == "auto":
        return latest_checkpoint(ckpt_cfg.dir)
    return find_checkpoint(ckpt_cfg.resume)


def check_compatible(meta: dict, model_cfg: Any, vocab_size: int | None, where: Path) -> None:
    """Same model shape as the run, or one line naming the checkpoint and the first mismatch."""
    # The family and layer-norm order change parameter names; checkpoints before issue 14 are GPT, pre-LN.
    saved = {"_target_": GPT_TARGET, "layernorm_order": "pre", **meta["model"]}
    wanted = {"_target_": model_target(model_cfg), "layernorm_order": model_option(model_cfg, "layernorm_order"),
              **{k: getattr(model_cfg, k) for k in MODEL_KEYS}}
    if vocab_size is not None:
        wanted["vocab_size"] = vocab_size
    for key, value in wanted.items():
        if saved.get(key) != value:
            raise CheckpointError(f"{where / METADATA}: model mismatch: the checkpoint has model.{key}="
                                  f"{saved.get(key)}, this run has {value}")


def check_before_launch(cfg: Any, vocab_size: Callable[[], int | None],
                        tokenizer: Callable[[], Any] | None = None) -> str:
    """In the launching process, before any rank starts: resolve checkpoint.resume and check the checkpoint
    fully (metadata, every file present and whole, every slice in its file's header, the model shape, the
    tokenizer's identity when `tokenizer` gives the run's), so a bad checkpoint is one line here instead of a
    traceback from a spawned rank (or a silent wrong run). Returns "none" or a path."""
    ck = getattr(cfg, "checkpoint", None)
    target = resume_target(ck)
    if target is not None:
        meta = read_metadata(target)
        check_shard_headers(target, meta)
        check_compatible(meta, cfg.model, vocab_size(), target)
        tok = tokenizer() if tokenizer is not None and meta.get("tokenizer") else None
        if tok is not None:  # None: token files without a data.tokenizer, nothing to compare
            allow = bool(getattr(getattr(cfg.data, "tokenizer", None), "allow_mismatch", False))
            note = check_same_tokenizer(meta["tokenizer"], tok, str(target), allow)
            if note:
                print(note, file=sys.stderr, flush=True)
    claim_folder(ck, target)  # another timeline in checkpoint.dir: moved aside (deleted on checkpoint.overwrite)
    return "none" if target is None else str(target.resolve())


# ---- saving ----------------------------------------------------------------------------------------------


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: ZeRO's per-rank optimizer over the parameters this rank owns."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _is_sharded(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and _local_optimizer(optimizer) is not optimizer


def _rng_into(shard: RankShard, device: torch.device) -> None:
    tensor_stream = rng.get_tensor_stream(device)
    if tensor_stream is None:
        return  # the streams were never seeded (a bare model, e.g. in conversion tools): nothing to resume
    shard.tensors.update({"rng.default": rng.get_states(device)["default"], "rng.tensor": tensor_stream,
                          "rng.cpu": torch.get_rng_state()})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    shard.tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    shard.metadata["rng.numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    shard.metadata["rng.python"] = json.dumps(random.getstate())


def _rank_shard(state: ParallelState, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                vocab: int) -> RankShard:
    """This rank's share. Data ranks hold identical copies, so only data rank 0 writes the model (and the
    optimizer state, unless ZeRO spread it over the data ranks); replicated tensors come from tensor rank 0."""
    shard = RankShard(rank_file(state.rank))
    local = _local_optimizer(optimizer) if optimizer is not None else None
    write_optim = local is not None and (state.dp_rank == 0 or _is_sharded(optimizer))
    for name, p in model.named_parameters():
        if getattr(p, "pipeline_copy", False):  # the last stage's tied embedding: the first stage writes it
            continue
        sl = param_slice(name, p.shape, getattr(p, "partition_dim", None), state.tensor, state.tp_rank, vocab)
        if state.dp_rank == 0 and (sl.dim is not None or state.tp_rank == 0):
            shard.add(f"model.{name}", p, sl)
        for key, value in (local.state.get(p, {}) if write_optim else {}).items():
            if not torch.is_tensor(value):
                continue
            value_sl = state_slice(tuple(value.shape), tuple(p.shape), sl, state.tp_rank, state.tensor)
            if value_sl.dim is not None or state.tp_rank == 0:
                shard.add(f"optim.{name}.{key}", value, value_sl)
    _rng_into(shard, state.device)
    return shard


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            pass  # e.g. a scheduler's lambdas: code, rebuilt from the config
    return out


def _model_config(model: torch.nn.Module) -> dict:
    """The model section of the config (DictConfig in training, any attribute object in tests)."""
    from omegaconf import DictConfig, OmegaConf

    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return _jsonable(dict(vars(cfg))) if cfg is not None else {}


def _gather(obj: Any, state: ParallelState) -> list[Any]:
    if state.world_size == 1:
        return [obj]
    out = [None] * state.world_size if state.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1:
        dist.barrier()


def save_checkpoint(root: str | os.PathLike, step: int, consumed_samples: int, state: ParallelState,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    precision: Any = None, config: dict | None = None, keep: int = 2,
                    extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the committed folder root/step_NNNNNNNN.

    `extra`: more JSON for metadata.json (train.py records the tokenizer there)."""
    root = Path(root)
    name = f"step_{step:08d}"
    staging = root / f".tmp-{name}"
    if state.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a save of this step that crashed earlier
        staging.mkdir()
    _barrier(state)
    vocab = model.vocab_size
    shard = _rank_shard(state, model, optimizer, vocab)
    size = shard.write(staging)
    _crash_point("shards", step)
    parts = _gather((shard.file, size, shard.index), state)
    if state.is_main:
        files, tensors = merge_index(parts)
        groups = optimizer.param_groups if optimizer is not None else []
        meta = {
            "format": FORMAT, "version": VERSION, "step": step, "consumed_samples": consumed_samples,
            "layout": {"tensor": state.tensor, "data": state.data, "pipeline": state.pipeline,
                       "world_size": state.world_size,
                       "shard_optimizer": _is_sharded(optimizer), "device": state.device.type},
            "model": {**_model_config(model), "vocab_size": vocab},
            "optimizer": {"state": optimizer is not None,
                          "param_groups": [_jsonable({k: v for k, v in g.items() if k != "params"}) for g in groups]},
            "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
            "precision": precision.state_dict() if precision is not None else None,
            "rng": {"files": [rank_file(r) for r in range(state.world_size)]},
            "files": files, "tensors": tensors, "config": config, "torch": torch.__version__, **(extra or {}),
        }
        write_json(staging / METADATA, meta)
        _crash_point("metadata", step)
        commit(root, staging, name, step, _crash_point)
        _rotate(root, step, keep)
    _barrier(state)
    return root / name


def _rotate(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Newer ones belong to another timeline: never deleted
    here (train.py moves it aside before launch, or deletes it on checkpoint.overwrite=true)."""
    dirs = step_dirs(root)
    stale = [p for s, p in dirs if s <= step][:-keep]
    leftovers = [p for p in root.iterdir() if p.name.startswith((".tmp-step_", ".trash-step_"))]
    for path in stale + leftovers:
        shutil.rmtree(path, ignore_errors=True)


# ---- restoring -------------------------------------------------------------------------------------------


def _restore_optimizer(reader: ShardReader, meta: dict, state: ParallelState, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    local = _local_optimizer(optimizer)
    owned = {id(p) for g in local.param_groups for p in g["params"]}
    flags = {id(p): g for g in local.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in owned:
            continue  # ZeRO: another data rank owns this parameter's state
        sl = param_slice(name, p.shape, getattr(p, "partition_dim", None), state.tensor, state.tp_rank,
                         model.vocab_size)
        st = {}
        for key in reader.state_keys(name):
            value = read_state(reader, f"optim.{name}.{key}", sl, state.tp_rank, state.tensor)
            # As torch's own load_state_dict: Adam's step count stays on the CPU unless capturable / fused.
            on_device = key != "step" or flags[id(p)].get("capturable") or flags[id(p)].get("fused")
            st[key] = value.to(p.device) if on_device else value
        if st:
            local.state[p] = st
    saved = meta["optimizer"]["param_groups"]
    for groups in {id(optimizer): optimizer.param_groups, id(local): local.param_groups}.values():
        if len(groups) == len(saved):
            for g, s in zip(groups, saved, strict=True):
                g.update({k: s[k] for k in ("lr", "initial_lr") if k in s})


def _restore_rng(reader: ShardReader, meta: dict, state: ParallelState, seed: int) -> bool:
    """This rank's streams when the layout is the saved one (True); else fresh streams from (seed, step)."""
    layout = meta["layout"]
    same = (layout["tensor"], layout["data"], layout.get("pipeline", 1), layout.get("device")) == \
        (state.tensor, state.data, state.pipeline, state.device.type)
    file = rank_file(state.rank)
    f = reader.open(file) if same and file in meta.get("rng", {}).get("files", []) else None
    if f is None or "rng.tensor" not in f.keys():  # another layout, or saved without seeded streams
        rng.seed_streams(seed + meta["step"], state.tp_rank, state.device)
        return False
    torch.set_rng_state(f.get_tensor("rng.cpu"))
    rng.set_states(state.device, {"default": f.get_tensor("rng.default"), "tensor": f.get_tensor("rng.tensor")})
    extra = f.metadata() or {}
    kind, pos, has_gauss, cached = json.loads(extra["rng.numpy"])
    np.random.set_state((kind, f.get_tensor("rng.numpy").numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(extra["rng.python"])
    random.setstate((version, tuple(internal), gauss))
    return True


@torch.no_grad()
def load_weights(reader: ShardReader, state: ParallelState, model: torch.nn.Module) -> None:
    """Copy this rank's slice of every parameter in (a rank reads only the byte ranges it holds)."""
    for name, p in model.named_parameters():
        sl = param_slice(name, p.shape, getattr(p, "partition_dim", None), state.tensor, state.tp_rank,
                         model.vocab_size)
        p.copy_(reader.read(f"model.{name}", sl, p.dtype))


def restore_checkpoint(path: str | os.PathLike, state: ParallelState, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                       precision: Any = None, seed: int = 0) -> dict:
    """Load a checkpoint saved at any tensor / data degree into this rank; returns its metadata.

    Each rank reads only the slices it holds. Call after the data, model and optimizer exist: the RNG
    streams are restored here, last.
    """
    path = find_checkpoint(path)
    meta = read_metadata(path)
    reader = ShardReader(path, meta)
    load_weights(reader, state, model)
    if optimizer is not None and meta["optimizer"]["state"]:
        _restore_optimizer(reader, meta, state, model, optimizer)
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    if precision is not None and meta.get("precision"):
        precision.load_state_dict(meta["precision"])
    meta["rng_restored"] = _restore_rng(reader, meta, state, seed)
    return meta


# ---- the training loop's hooks ---------------------------------------------------------------------------


def should_save(cfg: Any, step: int) -> bool:
    ck = getattr(cfg, "checkpoint", None)
    if ck is None or not ck.save:
        return False
    return step == cfg.trainer.max_steps or (ck.interval > 0 and step % ck.interval == 0)


def save_trainer(trainer: Any) -> Path:
    from omegaconf import OmegaConf

    ck = trainer.cfg.checkpoint
    config = OmegaConf.to_container(trainer.cfg, resolve=True) if trainer.state.is_main else None
    tok = trainer.data.tokenizer  # None: token files trained without a data.tokenizer
    tokenizer = None if tok is None else tok.entry() if hasattr(tok, "entry") else \
        {"path": getattr(tok, "path", None), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    path = save_checkpoint(ck.dir, trainer.step, trainer.consumed_samples, trainer.state, trainer.model,
                           trainer.optimizer, trainer.scheduler, trainer.precision, config, ck.keep,
                           {"tokenizer": tokenizer})
    if trainer.state.is_main:
        print(f"saved checkpoint {path}", flush=True)
    return path


def restore_trainer(trainer: Any) -> None:
    """Trainer.__init__'s last act: continue from checkpoint.resume, if it names one."""
    target = resume_target(getattr(trainer.cfg, "checkpoint", None))
    if target is None:
        return
    meta = restore_checkpoint(target, trainer.state, trainer.model, trainer.optimizer, trainer.scheduler,
                              trainer.precision, seed=trainer.cfg.trainer.seed)
    trainer.step, trainer.consumed_samples = int(meta["step"]), int(meta["consumed_samples"])
    if trainer.state.is_main:
        how = "" if meta["rng_restored"] else f" (saved at tensor={meta['layout']['tensor']} " \
              f"data={meta['layout']['data']}: RNG streams re-seeded)"
        print(f"resumed from {target} at step {trainer.step}{how}", flush=True)


def check_checkpoint_config(c: Any) -> None:
    """checkpoint.* values (called by mtlm.checks.validate; the checkpoint to resume is checked before launch)."""
    if not c.dir:
        raise ConfigError("checkpoint.dir", "must be a non-empty path")
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: save only at the end), got {c.interval}")
    if c.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {c.keep}")
    if not c.resume:
        raise ConfigError("checkpoint.resume", "must be none, auto or a checkpoint path")
