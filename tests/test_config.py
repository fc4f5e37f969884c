"""Config tree: presets compose, typed schema rejects bad keys, semantic checks name the key, and train.py
turns each bad config into one line and exit status 2 before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from mtlm.checks import validate
from mtlm.config import ConfigError, register_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid() -> None:
    cfg = _compose()
    validate(cfg)
    assert cfg.model.name == "gpt2_tiny"
    assert cfg.logger.name == "wandb" and cfg.precision.dtype == "fp32"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer._partial_


@pytest.mark.parametrize("preset,shape", [("gpt2_345m", (24, 1024, 16)), ("gpt2_1.2b", (40, 1536, 16)),
                                          ("gpt2_2.5b", (54, 1920, 20)), ("gpt2_4.2b", (64, 2304, 24)),
                                          ("gpt2_8.3b", (72, 3072, 32))])
def test_paper_presets(preset: str, shape: tuple[int, int, int]) -> None:
    m = _compose(f"model={preset}").model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == shape
    assert m.seq_length == 1024 and m.max_position_embeddings == 1024


@pytest.mark.parametrize("overrides,key", [
    (["parallel.tensor=3"], "parallel.tensor"),                 # tensor degree does not divide heads
    (["model.num_attention_heads=3"], "model.hidden_size"),     # heads do not divide hidden
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
    (["trainer.global_batch_size=24", "trainer.micro_batch_size=16"], "trainer.global_batch_size"),
    (["parallel.data=2", "trainer.global_batch_size=16", "trainer.micro_batch_size=16"],
     "trainer.global_batch_size"),
    (["model.seq_length=256"], "model.seq_length"),             # above max positions (128)
    (["optimizer.lr=-0.1"], "optimizer.lr"),
    (["data.paths=[/does/not/exist.txt]"], "data.paths"),
    (["scheduler.decay=exp"], "scheduler.decay"),
    (["precision.dtype=fp8"], "precision.dtype"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.attention=flash"], "model.attention"),
    (["parallel.sequence=true"], "parallel.sequence"),         # needs tensor > 1
    (["parallel.sequence=true", "parallel.tensor=2", "model.seq_length=63"], "parallel.sequence"),
    (["parallel.schedule=zb"], "parallel.schedule"),
    (["parallel.virtual_stages=2"], "parallel.virtual_stages"),  # only the interleaved schedule has chunks
    (["parallel.pipeline=0"], "parallel.pipeline"),
])
def test_semantic_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_compose(*overrides))
    assert info.value.key == key
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_world_size_must_match_layout() -> None:
    with pytest.raises(ConfigError, match="launcher started 3 ranks"):
        validate(_compose("parallel.tensor=2"), world_size=3)


@pytest.mark.parametrize("override,needle", [
    ("parallel.tensor=3", "parallel.tensor"),
    ("model.num_attention_heads=3", "model.hidden_size"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.global_batch_size=20", "trainer.global_batch_size"),
    ("model.seq_length=4096", "model.seq_length"),
    ("model=gpt2_huge", "model/gpt2_huge"),
    ("trainer.max_steps=ten", "trainer.max_steps"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("optimizer.lr=-1e-3", "optimizer.lr"),
    ("data.paths=[/no/such/file.txt]", "/no/such/file.txt"),
    ("trainer.max_stepz=3", "max_stepz"),
])
def test_train_py_rejects_bad_config_in_one_line(override: str, needle: str, tmp_path) -> None:
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), override,
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may start (no output dir) for a bad config"
