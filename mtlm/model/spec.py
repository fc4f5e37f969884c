"""Each model family's one spec, in one table: the rest of mtlm asks it, never the class or its name.

A family is what `model._target_`'s class declares in its `family` attribute ("gpt" for GPT and BLOOM, which
is a GPT with ALiBi; "bert"). Its spec says (torchtitan's per-model spec is the idea, not the code):
- how to build it: `model._target_` names the class (build_model, mtlm/model/build.py);
- its objective: the name of its training objective in mtlm/train/objective.py (a layer above: the model
  layer names it, the train layer implements it), and whether it is a causal LM (evaluate / generate);
- how it splits into pipeline stages (SC'21 §2.2), or the one line saying it cannot be yet;
- which modules activation checkpointing recomputes (§4 of Korthikanti et al.: the transformer layers): the
  model recomputes them itself (run_block), and the loop counts the inputs it keeps (metrics/memory.py);
- whether it supports sequence parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_class
from torch import nn

from mtlm.config import GPT_TARGET
from mtlm.model.stages import split_into_stages


@dataclass(frozen=True)
class ModelSpec:
    family: str
    objective: str  # the class name of its objective in mtlm/train/objective.py (OBJECTIVES)
    causal_lm: bool  # evaluation and generation (mtlm/eval) need one
    sequence_parallel: bool
    # (model, this rank's stage ids, number of stages) -> stage modules; None: it cannot be pipelined yet ...
    split_stages: Callable[[nn.Module, list[int], int], list[nn.Module]] | None
    not_pipelined: str  # ... and the one line that says so
    recompute: Callable[[nn.Module], nn.Module]  # the modules activation checkpointing recomputes


def _blocks(model: nn.Module) -> nn.Module:
    return model.blocks


SPECS: dict[str, ModelSpec] = {
    "gpt": ModelSpec("gpt", "CausalLM", causal_lm=True, sequence_parallel=True, split_stages=split_into_stages,
                     not_pipelined="", recompute=_blocks),
    "bert": ModelSpec("bert", "MaskedLM", causal_lm=False, sequence_parallel=True, split_stages=None,
                      not_pipelined="cannot be split into pipeline stages yet (GPT and BLOOM can)", recompute=_blocks),
}


def model_target(cfg: Any) -> str:
    return getattr(cfg, "_target_", None) or GPT_TARGET


def model_class(cfg: Any) -> type[nn.Module]:
    return get_class(model_target(cfg))


def spec_for(cfg: Any) -> ModelSpec:
    """The spec of the family `cfg._target_`'s class declares (validated by mtlm.checks before any run)."""
    return SPECS[model_class(cfg).family]
