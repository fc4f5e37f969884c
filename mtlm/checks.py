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

from mtlm.config import ATTENTION_IMPLS, register_configs
from mtlm.config_checks import check as check_keys_and_modes
from mtlm.config_checks import check_not_in_train, null_section_message, unknown_key_message
from mtlm.data import validate_data_config
from mtlm.data.text_tokenizer import legacy_override_message
from mtlm.errors import ConfigError, DataError
from mtlm.model.build import check_parallel_axes, validate_model_config
from mtlm.parallel.state import Grid
from mtlm.rank_env import env_world_size
from mtlm.train.optim import check_optimizer_config


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
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % p.tensor:
        raise ConfigError("parallel.tensor", f"{p.tensor} does not divide model.num_attention_heads="
                          f"{m.num_attention_heads} (each rank owns whole heads, §3)")
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError("model.seq_length", f"{m.seq_length} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    if m.attention not in ATTENTION_IMPLS:
        raise ConfigError("model.attention", f"must be one of {', '.join(ATTENTION_IMPLS)}, got {m.attention!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.vocab_size is not None and m.vocab_size <= 0:
        raise ConfigError("model.vocab_size", f"must be > 0 or null, got {m.vocab_size}")
    if t.global_batch_size % (t.micro_batch_size * p.data):
        raise ConfigError("trainer.global_batch_size", f"{t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size x parallel.data = {t.micro_batch_size} x {p.data}")
    if t.grad_clip < 0:
        raise ConfigError("trainer.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.device", f"must be auto, cpu or cuda, got {t.device!r}")
    if t.num_threads is not None and t.num_threads <= 0:
        raise ConfigError("trainer.num_threads", f"must be > 0 or null, got {t.num_threads}")
    if t.max_restarts < 0:
        raise ConfigError("trainer.max_restarts", f"must be >= 0, got {t.max_restarts}")
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError("parallel.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    if p.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", f"must be > 0, got {p.timeout_s}")
    validate_model_config(m)
    check_parallel_axes(m, p)
    _validate_optim(cfg)
    _validate_precision(cfg)
    _validate_checkpoint(cfg)
    if cfg.logger.name not in ("wandb", "none"):
        raise ConfigError("logger.name", f"must be wandb or none, got {cfg.logger.name!r}")
    _validate_layout(cfg, world_size)

    try:
        validate_data_config(cfg.data, model_vocab_size=cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError(str(err).split(":", 1)[0], str(err).split(":", 1)[-1].strip()) from None


def _validate_optim(cfg: Any) -> None:
    o, s = cfg.optimizer, cfg.scheduler
    if o.lr <= 0:
        raise ConfigError("optimizer.lr", f"must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.betas is not None and (len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas)):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    check_optimizer_config(o)
    if s.decay not in ("cosine", "linear", "constant"):
        raise ConfigError("scheduler.decay", f"must be cosine, linear or constant, got {s.decay!r}")
    if s.warmup_steps < 0:
        raise ConfigError("scheduler.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    if s.decay_steps is not None and s.decay_steps <= 0:
        raise ConfigError("scheduler.decay_steps", f"must be > 0 or null, got {s.decay_steps}")
    if not 0.0 <= s.min_lr <= o.lr:
        raise ConfigError("scheduler.min_lr", f"must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")


def _validate_precision(cfg: Any) -> None:
    pr = cfg.precision
    if pr.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError("precision.dtype", f"must be fp32, bf16 or fp16, got {pr.dtype!r}")
    if pr.initial_scale <= 0 or pr.min_scale <= 0 or pr.min_scale > pr.initial_scale:
        raise ConfigError("precision.initial_scale", "need 0 < precision.min_scale <= precision.initial_scale")
    if pr.growth_interval <= 0:
        raise ConfigError("precision.growth_interval", f"must be > 0, got {pr.growth_interval}")


def _validate_checkpoint(cfg: Any) -> None:
    c = cfg.checkpoint
    if not c.dir:
        raise ConfigError("checkpoint.dir", "must be a non-empty path")
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: save only at the end), got {c.interval}")
    if c.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {c.keep}")
    if not c.resume:
        raise ConfigError("checkpoint.resume", "must be none, auto or a checkpoint path")


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
