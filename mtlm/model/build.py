"""Which model a config builds: `model._target_` (set by each preset in conf/model/) names the class, and
hydra.utils.instantiate builds it, so train.py, load_model and the converters never name a family.

Every model class takes (model config, vocab_size, ParallelState, device=, dtype=, activation_checkpointing=)
and has a `family` ("gpt", "bert"): the training objective and data that go with it (mtlm/train/objective.py).
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, instantiate
from torch import nn

from mtlm.config import ATTENTION_IMPLS, GPT_TARGET
from mtlm.errors import ConfigError
from mtlm.model.alibi import validate_position_options
from mtlm.model.transformer import ACTIVATIONS, LAYERNORM_ORDERS
from mtlm.parallel.state import ParallelState


def model_target(cfg: Any) -> str:
    return getattr(cfg, "_target_", None) or GPT_TARGET


def model_class(cfg: Any) -> type[nn.Module]:
    return get_class(model_target(cfg))


def build_model(cfg: Any, vocab_size: int, state: ParallelState, **kwargs: Any) -> nn.Module:
    """The model `cfg._target_` names, for this rank (kwargs: device, dtype, activation_checkpointing)."""
    make = instantiate({"_target_": model_target(cfg), "_partial_": True})
    return make(cfg, vocab_size, state, **kwargs)


def check_parallel_axes(m: Any, p: Any) -> None:
    """The axes a model class supports beyond tensor x data: each class says so (`sequence_parallel`,
    `pipeline_parallel`); a family that cannot do one yet is refused with one line, not run wrongly."""
    cls = model_class(m)
    if p.get("sequence", False) and not getattr(cls, "sequence_parallel", False):
        raise ConfigError("parallel.sequence", f"{model_target(m)} does not support sequence parallelism yet "
                          "(GPT, BLOOM and BERT do); set parallel.sequence=false")
    if p.get("pipeline", 1) > 1 and not getattr(cls, "pipeline_parallel", False):
        raise ConfigError("parallel.pipeline", f"{model_target(m)} cannot be split into pipeline stages yet "
                          "(GPT and BLOOM can); set parallel.pipeline=1")


def validate_model_config(m: Any) -> None:
    """model.* checks the shared schema cannot express (called by mtlm.config.validate)."""
    try:
        cls = model_class(m)
    except Exception as err:  # hydra wraps import errors in several types; one line is all the user needs
        raise ConfigError("model._target_", f"cannot import {model_target(m)!r} ({type(err).__name__})") from None
    if getattr(cls, "family", None) not in ("gpt", "bert"):
        raise ConfigError("model._target_", f"{model_target(m)} is not an mtlm model class (no known `family`)")
    if m.activation not in ACTIVATIONS:
        raise ConfigError("model.activation", f"must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}")
    if m.layernorm_order not in LAYERNORM_ORDERS:
        raise ConfigError("model.layernorm_order", f"must be pre or post, got {m.layernorm_order!r}")
    validate_position_options(m, cls.family)
    if cls.family == "bert" and m.seq_length < 5:
        raise ConfigError("model.seq_length", f"BERT samples ([CLS] A [SEP] B [SEP]) need >= 5, got {m.seq_length}")


def check_model_values(m: Any) -> None:
    """model.* ranges and shapes the schema's types cannot express (called by mtlm.checks.validate)."""
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError("model.seq_length", f"{m.seq_length} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    if m.attention not in ATTENTION_IMPLS:
        raise ConfigError("model.attention", f"must be one of {', '.join(ATTENTION_IMPLS)}, got {m.attention!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.vocab_size is not None and m.vocab_size <= 0:
        raise ConfigError("model.vocab_size", f"must be > 0 or null, got {m.vocab_size}")
