"""mtlm's GPT gives megatron-core's GPTModel's logits and per-token loss, with the same weights, on a CPU.

megatron-core (the library Megatron-LM and NeMo are built on; a test dependency) runs here with its local,
non-Transformer-Engine layer spec at tensor degree 1, its CUDA-only helpers replaced inside the test
(tests/mcore_cpu.py). Covered: learned absolute positions, both GeLUs the presets use (tanh: GPT-2; exact:
BERT's and `model.activation=gelu`), two layer-norm epsilons, and the output layer tied (mtlm's only kind) or
untied in megatron-core holding the same matrix. The vocabulary is a multiple of 128, so neither side pads:
megatron-core leaves padded rows in the softmax while mtlm masks them to -inf (docs/converting.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtlm.convert.mcore_names import OUTPUT_LAYER, to_mcore_state
from mtlm.model.gpt import GPT
from mtlm.parallel.state import ParallelState
from tests.mcore_cpu import mcore_gpt, mcore_world  # skips the module when megatron-core is absent

LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS = 2, 64, 4, 384, 32


def random_mtlm_gpt(activation: str, eps: float, seed: int = 0) -> GPT:
    """An mtlm GPT with large random weights, biases and layer-norm gains, so every mapping slip shows."""
    cfg = SimpleNamespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=POSITIONS,
                          max_position_embeddings=POSITIONS, make_vocab_size_divisible_by=128, dropout=0.0,
                          init_std=0.02, layernorm_eps=eps, activation=activation, attention="sdpa")
    model = GPT(cfg, VOCAB, ParallelState()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1) * 0.2)
    return model


@pytest.mark.parametrize("activation,eps,tied", [("gelu_tanh", 1e-5, True), ("gelu", 1e-5, False),
                                                 ("gelu_tanh", 1e-12, False)])
def test_gpt_matches_megatron_core(monkeypatch, activation: str, eps: float, tied: bool) -> None:
    ours = random_mtlm_gpt(activation, eps)
    full = {n: p.detach() for n, p in ours.named_parameters()}
    ids = torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, dims=1)
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS, eps, activation, tied)
        state = to_mcore_state(full)
        if not tied:
            state[OUTPUT_LAYER] = full["wte.weight"].clone()
        missing, unexpected = theirs.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        positions = torch.arange(POSITIONS).expand(2, -1)
        with torch.no_grad():
            their_logits = theirs(ids, positions, None)
            their_loss = theirs(ids, positions, None, labels=targets)
    with torch.no_grad():
        logits, loss = ours(ids), ours(ids, targets)
    assert their_logits.std() > 1.0 and their_loss.mean() > 1.0  # large enough that a slip cannot hide
    scale = their_logits.abs().max().item()
    torch.testing.assert_close(logits, their_logits, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-5)


def test_another_gelu_is_not_equal(monkeypatch) -> None:
    """The comparison can fail: the tanh GeLU against megatron-core's exact one differs beyond the tolerance."""
    ours = random_mtlm_gpt("gelu_tanh", 1e-5)
    ids = torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(1))
    with mcore_world(monkeypatch):
        theirs = mcore_gpt(LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS, 1e-5, "gelu", True)
        theirs.load_state_dict(to_mcore_state({n: p.detach() for n, p in ours.named_parameters()}), strict=False)
        with torch.no_grad():
            their_logits = theirs(ids, torch.arange(POSITIONS).expand(2, -1), None)
    with torch.no_grad():
        gap = (ours(ids) - their_logits).abs().max().item()
    assert gap > 5 * 1e-5 * their_logits.abs().max().item()  # 5x the tolerance above
