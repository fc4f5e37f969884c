"""Each model family's one spec (mtlm/model/spec.py): every preset finds its family's spec, every spec names an
objective that exists, and what the spec says is what the rest uses (stages, recompute, refusals)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from mtlm.config import BERT_TARGET, CONF_DIR, GPT_TARGET
from mtlm.errors import ConfigError
from mtlm.model.build import build_model, check_parallel_axes
from mtlm.model.spec import SPECS, spec_for
from mtlm.parallel.state import ParallelState
from mtlm.train.objective import OBJECTIVES, CausalLM, MaskedLM, objective_for

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_its_familys_spec(preset: str) -> None:
    spec = spec_for(OmegaConf.load(Path(CONF_DIR) / "model" / f"{preset}.yaml"))
    assert spec.family == ("bert" if preset.startswith("bert") else "gpt")  # BLOOM is a GPT with ALiBi
    assert spec.causal_lm == (spec.family == "gpt")


def test_a_config_without_target_is_a_gpt() -> None:
    assert spec_for(SimpleNamespace()) is SPECS["gpt"]


def test_every_spec_names_an_objective_and_says_whether_it_pipelines() -> None:
    for spec in SPECS.values():
        assert spec.objective in OBJECTIVES
        assert (spec.split_stages is None) == bool(spec.not_pipelined)
    assert isinstance(objective_for(SimpleNamespace(_target_=GPT_TARGET)), CausalLM)
    assert isinstance(objective_for(SimpleNamespace(_target_=BERT_TARGET)), MaskedLM)


def _tiny(target: str) -> SimpleNamespace:
    return SimpleNamespace(_target_=target, name="t", num_layers=2, hidden_size=32, num_attention_heads=4,
                           seq_length=16, max_position_embeddings=16, make_vocab_size_divisible_by=128,
                           dropout=0.0, init_std=0.02, layernorm_eps=1e-5, activation="gelu",
                           layernorm_order="pre", attention="auto")


@pytest.mark.parametrize("target", [GPT_TARGET, BERT_TARGET])
def test_recompute_names_the_transformer_layers(target: str) -> None:
    cfg = _tiny(target)
    model = build_model(cfg, 300, ParallelState(), device="meta")
    assert spec_for(cfg).recompute(model) is model.blocks and len(model.blocks) == 2


def test_gpt_splits_into_stages_under_whole_model_names() -> None:
    cfg = _tiny(GPT_TARGET)
    model = build_model(cfg, 300, ParallelState(), device="meta")
    stages = spec_for(cfg).split_stages(model, [1], 2)  # the last of two stages: layer 1, final norm, head
    assert len(stages) == 1 and list(model.blocks.keys()) == ["1"] and model.wpe is None


def test_a_family_that_cannot_pipeline_is_refused_with_its_specs_line() -> None:
    with pytest.raises(ConfigError, match="cannot be split into pipeline stages yet"):
        check_parallel_axes(_tiny(BERT_TARGET), OmegaConf.create({"pipeline": 2}))
