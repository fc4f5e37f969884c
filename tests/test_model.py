"""GPT-2 model: parameter counts of the paper's presets (meta device and analytic), vocab padding, loss at
initialisation, the GPT-2 architecture details, and the degree-independent initialisation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtlm.config import register_configs
from mtlm.model.gpt import GPT, num_parameters
from mtlm.parallel import ParallelState, pad_vocab_size
from mtlm.parallel.random import seed_streams
from tests.test_config import CONF


def _preset(name: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        return compose(config_name="config", overrides=[f"model={name}"]).model


@pytest.mark.parametrize("preset,paper", [("gpt2_345m", 355e6), ("gpt2_1.2b", 1.2e9), ("gpt2_2.5b", 2.5e9),
                                          ("gpt2_4.2b", 4.2e9), ("gpt2_8.3b", 8.3e9)])
def test_preset_parameter_counts_match_paper(preset: str, paper: float) -> None:
    """Paper vocabulary 51,200 and sequence 1024; built on the meta device, so no memory is allocated."""
    m = _preset(preset)
    model = GPT(m, 51200, ParallelState(), device="meta")
    counted = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert counted == num_parameters(m.num_layers, m.hidden_size, 51200, m.max_position_embeddings)
    assert abs(counted - paper) / paper < 0.02, f"{preset}: {counted:,} vs paper {paper:,.0f}"


def test_parameter_count_formula_by_hand() -> None:
    # 345M: 24 layers x (12 h^2 + 13 h) + (V + s) h + 2h, h = 1024, V = 51200, s = 1024
    assert num_parameters(24, 1024, 51200, 1024) == 24 * (12 * 1024**2 + 13 * 1024) + 52224 * 1024 + 2048
    assert num_parameters(24, 1024, 51200, 1024) == 355_788_800


def test_vocab_padding_as_the_paper() -> None:
    assert pad_vocab_size(50257, 128, 1) == 50304  # GPT-2's vocabulary at TP=1
    assert pad_vocab_size(50257, 128, 8) == 51200  # ... and 8-way, the paper's 51,200
    assert pad_vocab_size(4096, 128, 2) == 4096
    assert pad_vocab_size(300, 128, 4) == 512


def _tiny(**kw) -> SimpleNamespace:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
                make_vocab_size_divisible_by=128, dropout=0.0, init_std=0.02, layernorm_eps=1e-5)
    return SimpleNamespace(**{**base, **kw})


def test_loss_at_init_is_log_vocab_and_padding_gets_no_mass() -> None:
    torch.manual_seed(0)
    seed_streams(0, 0, torch.device("cpu"))
    model = GPT(_tiny(), 1000, ParallelState())
    model.init_weights(seed=0)
    ids = torch.randint(0, 1000, (4, 32))
    targets = torch.randint(0, 1000, (4, 32))
    loss = model(ids, targets).mean().item()
    assert abs(loss - math.log(1000)) < 0.05
    logits = model(ids)
    assert logits.shape == (4, 32, 1024)
    assert torch.isinf(logits[..., 1000:]).all() and torch.isfinite(logits[..., :1000]).all()
    assert torch.softmax(logits, -1)[..., 1000:].sum() == 0
    # The fused loss equals PyTorch's cross-entropy over the real vocabulary.
    ref = torch.nn.functional.cross_entropy(logits[..., :1000].reshape(-1, 1000), targets.reshape(-1))
    assert model(ids, targets).mean().item() == pytest.approx(ref.item(), rel=1e-6)


def test_architecture_details() -> None:
    model = GPT(_tiny(), 1000, ParallelState())
    model.init_weights(seed=1)
    block = model.blocks[0]
    assert block.ln1.eps == 1e-5 and model.ln_f.eps == 1e-5
    assert block.attn.qkv.bias is not None and block.mlp.fc.weight.shape == (256, 64)  # biases, 4h MLP
    # §4 init: N(0, 0.02), residual-output layers scaled by 1/sqrt(2N); biases zero, layer norms one.
    assert model.wte.weight[:1000].std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.15)
    assert model.wte.weight[1000:].abs().sum() == 0 and block.attn.qkv.bias.abs().sum() == 0
    assert torch.equal(block.ln1.weight, torch.ones(64))
    # Tied embeddings: the output layer is the input embedding (one tensor, one gradient).
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
