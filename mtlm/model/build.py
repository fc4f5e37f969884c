"""Which model a config builds: `model._target_` (set by each preset in conf/model/) names the class, and
hydra.utils.instantiate builds it, so train.py, load_model and the converters never name a family.

Every model class takes (model config, vocab_size, ParallelState, device=, dtype=, activation_checkpointing=)
and has a `family` ("gpt", "bert"), whose spec (mtlm/model/spec.py) says everything else about it.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from torch import nn

from mtlm.config import ATTENTION_IMPLS
from mtlm.errors import ConfigError
from mtlm.model.alibi import validate_position_options
from mtlm.model.spec import SPECS, model_class, model_target, spec_for
from mtlm.model.transformer import ACTIVATIONS, LAYERNORM_ORDERS
from mtlm.parallel.state import ParallelState


def build_model(cfg: Any, vocab_size: int, state: ParallelState, **kwargs: Any) -> nn.Module:
    """The model `cfg._target_` names, for this rank (kwargs: device, dtype, activation_checkpointing)."""
    make = instantiate({"_target_": model_target(cfg), "_partial_": True})
    return make(cfg, vocab_size, state, **kwargs)


def check_parallel_axes(m: Any, p: Any) -> None:
    """The axes a model family supports beyond tensor x data: its spec says so; a family that cannot do one yet
    is refused with one line, not run wrongly."""
    spec = spec_for(m)
    if p.get("sequence", False) and not spec.sequence_parallel:
        raise ConfigError("parallel.sequence", f"{model_target(m)} does not support sequence parallelism yet "
                          "(GPT, BLOOM and BERT do); set parallel.sequence=false")
    if p.get("pipeline", 1) > 1 and spec.split_stages is None:
        raise ConfigError("parallel.pipeline", f"{model_target(m)} {spec.not_pipelined}; set parallel.pipeline=1")


def validate_model_config(m: Any) -> None:
    """model.* checks the shared schema cannot express (called by mtlm.config.validate)."""
    try:
        cls = model_class(m)
    except Exception as err:  # hydra wraps import errors in several types; one line is all the user needs
        raise ConfigError("model._target_", f"cannot import {model_target(m)!r} ({type(err).__name__})") from None
    if getattr(cls, "family", None) not in SPECS:
        raise ConfigError("model._target_", f"{model_target(m)} is not an mtlm model class (no known `family`)")
    if m.activation not in ACTIVATIONS:
        raise ConfigError("model.activation", f"must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}")
    if m.layernorm_order not in LAYERNORM_ORDERS:
        raise ConfigError("model.layernorm_order", f"must be pre or post, got {m.layernorm_order!r}")
    family = spec_for(m).family
    validate_position_options(m, family)
    if family == "bert" and m.seq_length < 5:
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
