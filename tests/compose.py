"""Compose the real config tree in-process, for tests that drive a Trainer without train.py.

    cfg = compose_config("precision=fp16", "trainer.max_steps=5")

Tests that build data must point MTLM_CACHE_DIR at a temporary folder first (the `cache_dir` fixtures).
"""

from __future__ import annotations

import os

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtlm.checks import validate
from mtlm.config import register_configs
from mtlm.parallel.state import Grid

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
# A model small enough that a Trainer step takes milliseconds, and a vocabulary quick to train.
SMALL_MODEL = ("model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=16",
               "model.max_position_embeddings=16", "data.vocab_size=512")


def compose_config(*overrides: str) -> DictConfig:
    """The config train.py would see for these overrides (W&B off), validated."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    validate(cfg, world_size=Grid.of(cfg.parallel).world)
    return cfg
