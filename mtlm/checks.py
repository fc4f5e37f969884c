"""The check-everything function: validate() runs every config group's semantic checks before anything heavy
(a spawn, a tensor), and compose_error() composes a config as an app will and reports any complaint as one line.

It sits above every group whose checks it runs (model, data, train) and below the tools and entry points that
call it (docs/architecture.md): the schemas in mtlm/config.py import nothing of mtlm, so each group's own
checks live with the code that reads the keys and are called from here.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mtlm.config import register_configs
from mtlm.config_checks import check as check_keys_and_modes
from mtlm.config_checks import check_not_in_train, null_section_message, unknown_key_message
from mtlm.data import validate_data_config
from mtlm.data.text_tokenizer import legacy_override_message
from mtlm.errors import ConfigError, DataError
from mtlm.metrics.sinks import check_logger_config
from mtlm.model.build import check_model_values, check_parallel_axes, validate_model_config
from mtlm.parallel.launch import check_backend_config
from mtlm.parallel.state import Grid
from mtlm.rank_env import env_world_size
from mtlm.train.checkpoint import check_checkpoint_config
from mtlm.train.loop import check_trainer_config
from mtlm.train.optim import check_optimizer_values
from mtlm.train.precision import check_precision_config
from mtlm.train.schedule import check_scheduler_config


def _positive(cfg: Any, key: str) -> None:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def validate(cfg: Any, world_size: int | None = None) -> None:
    """Check everything a type cannot. `world_size` is the number of ranks a launcher provides, if any."""
    check_keys_and_modes(cfg)  # keys the schema lacks (added with +/++), logger.mode
    check_not_in_train(cfg)  # cluster / plan: python -m mtlm.plan's groups (it validates a copy without them)
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    for key in ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
                "model.max_position_embeddings", "parallel.tensor", "parallel.data", "parallel.pipeline",
                "parallel.virtual_stages", "trainer.max_steps",
                "trainer.micro_batch_size", "trainer.global_batch_size", "trainer.log_interval",
                "trainer.eval_interval", "trainer.eval_iters", "model.make_vocab_size_divisible_by"):
        _positive(cfg, key)
    check_model_values(m)  # each group's checks live with the code that reads its keys
    if m.num_attention_heads % p.tensor:
        raise ConfigError("parallel.tensor", f"{p.tensor} does not divide model.num_attention_heads="
                          f"{m.num_attention_heads} (each rank owns whole heads, §3)")
    check_trainer_config(t, p.data)
    check_backend_config(p)
    validate_model_config(m)
    check_parallel_axes(m, p)
    check_optimizer_values(cfg.optimizer)
    check_scheduler_config(cfg.scheduler, cfg.optimizer.lr)
    check_precision_config(cfg.precision)
    check_checkpoint_config(cfg.checkpoint)
    check_logger_config(cfg.logger)
    _validate_layout(cfg, world_size)

    try:
        validate_data_config(cfg.data, model_vocab_size=cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError(str(err).split(":", 1)[0], str(err).split(":", 1)[-1].strip()) from None


def _validate_layout(cfg: Any, world_size: int | None) -> None:
    """The rank layout: world = tensor x data x pipeline, and on GPUs no more local ranks than devices."""
    p = cfg.parallel
    grid = Grid.of(p)
    needed = grid.world
    try:
        grid.check(world_size)
    except ValueError as err:
        key, message = str(err).split(": ", 1)
        raise ConfigError(key, message) from None
    _validate_new_axes(cfg)

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda requested but no CUDA device is visible")
    if _uses_cuda(cfg) and world_size is None and needed > torch.cuda.device_count():
        raise ConfigError("parallel.tensor", f"{needed} ranks (tensor x data x pipeline) need {needed} GPUs on this "
                          f"machine but {torch.cuda.device_count()} are visible")
    if p.backend == "nccl" and not _uses_cuda(cfg):
        raise ConfigError("parallel.backend", "nccl needs CUDA devices; use gloo (or auto) on CPU")


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def _validate_new_axes(cfg: Any) -> None:
    """Sequence and pipeline parallelism: what each needs, before any rank is spawned."""
    m, p = cfg.model, cfg.parallel
    if p.get("sequence", False):
        if p.tensor < 2:
            raise ConfigError("parallel.sequence", "needs parallel.tensor > 1 (it splits the tensor-parallel "
                              "region's sequence over the tensor group)")
        if m.seq_length % p.tensor:
            raise ConfigError("parallel.sequence", f"model.seq_length={m.seq_length} is not divisible by "
                              f"parallel.tensor={p.tensor} (each rank holds 1/tensor of the sequence)")
    schedule = p.get("schedule", "1f1b")
    if schedule not in PIPELINE_SCHEDULES:
        raise ConfigError("parallel.schedule", f"must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
    pipeline, virtual = p.get("pipeline", 1), p.get("virtual_stages", 1)
    if virtual > 1 and schedule != "interleaved_1f1b":
        raise ConfigError("parallel.virtual_stages", f"{virtual} needs parallel.schedule=interleaved_1f1b")
    if pipeline == 1:
        if virtual > 1:
            raise ConfigError("parallel.virtual_stages", f"{virtual} needs parallel.pipeline > 1")
        return
    stages = pipeline * virtual
    if m.num_layers % stages:
        raise ConfigError("parallel.pipeline", f"model.num_layers={m.num_layers} does not split evenly over "
                          f"parallel.pipeline x parallel.virtual_stages = {pipeline} x {virtual} = {stages} stages")
    t = cfg.trainer
    micro = t.global_batch_size // (t.micro_batch_size * p.data)
    if schedule == "interleaved_1f1b" and micro % pipeline:
        raise ConfigError("parallel.schedule", f"interleaved_1f1b needs the micro-batches per step, "
                          f"global / (micro x data) = {micro}, to be a multiple of parallel.pipeline={pipeline}")
    for key, why in (("compile", "torch.compile of pipeline stages is not supported yet"),
                     ("shard_optimizer", "ZeRO with a pipeline is not tested yet")):
        if t.get(key):
            raise ConfigError(f"trainer.{key}", f"{why}; set trainer.{key}=false with parallel.pipeline > 1")


def _uses_cuda(cfg: Any) -> bool:
    if cfg.trainer.device == "cpu":
        return False
    return torch.cuda.is_available()


def compose_error(config_dir: str, overrides: list[str], config_name: str = "config", check: Any = None,
                  schema: Any = None) -> str | None:
    """Compose and validate the config the way train.py will; any complaint as one line (None if fine).
    `config_name` / `check` / `schema`: another app's root config, validate function and root dataclass
    (mtlm.evaluate, mtlm.generate, mtlm.plan).

    Hydra reports a bad override or unknown preset over several lines; users get this single line instead,
    before Hydra makes an output dir or anything is launched.
    """
    register_configs()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir, job_name="check"):
            cfg = compose(config_name=config_name, overrides=overrides)
        (check or validate)(cfg, env_world_size())
    except ConfigError as err:
        return f"config error: {err}"
    except AssertionError:
        # OmegaConf.update asserts, naming no key, when an override sets a key inside a null node.
        line = null_section_message(overrides, config_name, schema)
        if line is None:
            raise
        return f"config error: {line}"
    except (HydraException, OmegaConfBaseException) as err:
        if (line := unknown_key_message(err, schema)) is not None:
            return f"config error: {line}"
        if (line := legacy_override_message(overrides)) is not None:
            return f"config error: {line}"
        return "config error: " + _hydra_lines(err)
    return None


def _hydra_lines(err: BaseException) -> str:
    """Hydra's report (and its cause) folded to one line, without its search path and type noise."""
    parts = [str(err)] + ([str(err.__cause__)] if err.__cause__ else [])
    lines = [ln.strip() for part in parts for ln in part.splitlines() if ln.strip()]
    if any(ln.startswith("Config search path") for ln in lines):
        lines = lines[: next(i for i, ln in enumerate(lines) if ln.startswith("Config search path"))]
    if any(ln.startswith("Available options") for ln in lines):
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        lines = lines[:i] + [lines[i].rstrip(":").replace("Available", "available") + ": " + ", ".join(lines[i + 1:])]
    lines = [ln for ln in lines if not ln.startswith(("reference_type", "object_type", "Set the env"))]
    return "; ".join(lines)
