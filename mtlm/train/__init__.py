"""Entry point behind train.py: validate, prepare data once, launch the ranks, train on each."""

from __future__ import annotations

import sys
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtlm.config import ConfigError, env_world_size, validate
from mtlm.data import DataError, prepare_data
from mtlm.parallel.launch import RankEnv, launch, rank_device, threads_per_rank
from mtlm.parallel.state import ParallelState


def _worker(env: RankEnv, cfg_dict: dict, out_dir: str | None) -> None:
    from mtlm.train.loop import train

    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(threads_per_rank(env.local_world_size, cfg.trainer.num_threads))
    device = rank_device(cfg.trainer.device, env.local_rank)
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else \
        ("nccl" if device.type == "cuda" else "gloo")
    state = ParallelState.initialize(cfg.parallel.tensor, cfg.parallel.data, env.rank, env.world_size,
                                     device, backend, cfg.parallel.timeout_s)
    try:
        train(cfg, state, out_dir if state.is_main else None, cfg_dict)
    finally:
        state.destroy()


def run(cfg: DictConfig, out_dir: str | None) -> None:
    """Validate everything, then train. Bad input exits with status 2 and one line, before any spawn."""
    try:
        validate(cfg, env_world_size())
        prepare_data(cfg.data, cfg.model.seq_length)
    except (ConfigError, DataError) as err:
        print(f"{'config' if isinstance(err, ConfigError) else 'data'} error: {err}", file=sys.stderr)
        sys.exit(2)
    cfg_dict: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # picklable for spawned ranks
    launch(_worker, cfg.parallel.tensor * cfg.parallel.data, (cfg_dict, out_dir))
