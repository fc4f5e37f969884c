"""BERT at tensor degree 2 and 4 equals degree 1: both heads' logits, the masked-LM losses, the sentence-order
loss and every gradient (gloo ranks), for the pre-LN model and the post-LN (original BERT) one, with padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mtlm.model.bert import BERT
from mtlm.parallel import ParallelState, gather_last_dim
from mtlm.parallel.random import seed_streams
from mtlm.parallel.sequence_grads import sum_sequence_parallel_grads_
from tests.distributed import run_ranks
from tests.test_parallel_model import _full_grad

pytestmark = pytest.mark.multiprocess
VOCAB = 300  # padded to 384 at t=1 but 512 at t=2 and t=4: padding must not change the model
B, S = 2, 12


def _cfg(order: str) -> SimpleNamespace:
    return SimpleNamespace(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=S,
                           max_position_embeddings=S, make_vocab_size_divisible_by=128, dropout=0.0,
                           init_std=0.02, layernorm_eps=1e-5, activation="gelu", layernorm_order=order)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 9:] = 0
    labels = torch.randint(0, VOCAB, (B, S), generator=gen).masked_fill_(torch.rand(B, S, generator=gen) > 0.4, -1)
    return {"ids": ids, "types": (torch.arange(S) >= 5).long().expand(B, S), "mask": mask,
            "labels": labels.masked_fill_(mask == 0, -1), "sop": torch.tensor([0, 1])}


def _outputs(state: ParallelState) -> dict:
    out = {}
    for order in ("pre", "post"):
        seed_streams(7, state.tp_rank, state.device)
        model = BERT(_cfg(order), VOCAB, state)
        model.init_weights(seed=7)
        with torch.no_grad():  # non-zero biases and gains, so their gradients and layouts are exercised
            for name, p in model.named_parameters():
                if name.endswith("bias") or "ln" in name:
                    size = p.shape[0] * state.tensor if p.partition_dim == 0 else p.shape[0]
                    real = VOCAB if name == "lm_head.bias" else size  # the padded vocabulary stays zero
                    full = torch.zeros(size)
                    full[:real] = torch.randn(real, generator=torch.Generator().manual_seed(len(name)))
                    p.add_(0.1 * (full if p.partition_dim != 0 else full.chunk(state.tensor)[state.tp_rank]))
        b = _batch()
        mlm, sop = model(b["ids"], b["types"], b["mask"])
        losses, sop2 = model(b["ids"], b["types"], b["mask"], b["labels"])
        loss = losses.mean() + F.cross_entropy(sop2, b["sop"])
        loss.backward()
        sum_sequence_parallel_grads_(list(model.parameters()), state.tp_group)  # the trainer's step (no-op off)
        grads = {n: _full_grad(p, state) for n, p in model.named_parameters()}
        for name in ("wte.weight", "lm_head.bias"):
            grads[name] = grads[name][:VOCAB]  # padded rows are not part of the model
        out[order] = {"mlm": gather_last_dim(mlm, state.tp_group)[..., :VOCAB].detach(), "sop": sop.detach(),
                      "losses": losses.detach(), "loss": loss.detach(), "grads": grads}
    return out


@pytest.mark.parametrize("world,sequence", [(2, False), (4, False), (2, True)])
def test_bert_at_tensor_degree_equals_degree_one(world: int, sequence: bool) -> None:
    """sequence: with sequence parallelism (the padding mask, both layer-norm orders, the heads after the
    gather back to the whole sequence)."""
    torch.set_num_threads(1)
    ref = _outputs(ParallelState())
    for rank, res in enumerate(run_ranks(_outputs, world, sequence=sequence)):
        for order in ("pre", "post"):
            want, got = ref[order], res[order]
            torch.testing.assert_close(got["mlm"], want["mlm"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["sop"], want["sop"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-6)
            assert got["grads"].keys() == want["grads"].keys()
            for name, g in want["grads"].items():
                assert g.abs().sum() > 0, f"{order} {name}: reference gradient is zero, the comparison is empty"
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6,
                                           msg=f"rank {rank} {order}: {name}")
