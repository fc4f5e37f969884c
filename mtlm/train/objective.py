"""What a model family trains on: its samples, the loss of a micro-batch, validation metrics and FLOPs.

The loop (mtlm/train/loop.py) is the same for every family; it asks `objective_for(cfg.model)` (the objective
its family's spec names, mtlm/model/spec.py) for these
pieces. Losses are normalised over the *global* batch, so any data degree and micro-batch split gives the same
step: each rank divides its sums by its share of the global denominator, micro-batch losses add up, and DDP
averages over data ranks.

- GPT (`CausalLM`): next-token loss, the token mean over the global batch.
- BERT (`MaskedLM`, paper §4.3): masked-LM loss (mean over the global batch's masked positions) + sentence-order
  loss (mean over its sequences); both are logged, with the sentence-order accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtlm.data import DataBundle, build_data
from mtlm.data.bert import build_bert_data
from mtlm.metrics import flops
from mtlm.model.spec import spec_for
from mtlm.parallel.state import ParallelState


def _all_reduce_sum(values: torch.Tensor, state: ParallelState) -> torch.Tensor:
    if state.dp_group is not None:
        dist.all_reduce(values, group=state.dp_group)
    return values


class CausalLM:
    """GPT: predict token i+1 from tokens <= i. A sample is seq_length + 1 tokens of the stream."""

    def build_data(self, data_cfg: Any, seq_length: int, seed: int) -> DataBundle:
        return build_data(data_cfg, seq_length, seed)

    def normaliser(self, rank_batch: torch.Tensor, seq_length: int, state: ParallelState) -> int:
        return rank_batch.shape[0] * seq_length  # this rank's share of the global batch's tokens

    def micro_batches(self, rank_batch: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        return rank_batch.split(size)

    def loss(self, forward, micro: torch.Tensor, norm: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        batch = micro.to(device, non_blocking=True)
        return forward(batch[:, :-1], batch[:, 1:]).sum() / norm, {}

    def eval_parts(self, model, batch: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        batch = batch.to(device, non_blocking=True)
        return {"val_loss": model(batch[:, :-1], batch[:, 1:]).float().mean()}

    def eval_metrics(self, totals: dict[str, torch.Tensor], iters: int, state: ParallelState) -> dict[str, float]:
        value = totals["val_loss"] / iters
        return {"val_loss": (_all_reduce_sum(value, state) / state.data).item()}

    def flops(self, m: Any, batch: int, padded_vocab: int, recompute: bool) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) per iteration."""
        return (flops.model_flops_per_iteration(batch, m.seq_length, m.num_layers, m.hidden_size, padded_vocab),
                flops.hardware_flops_per_iteration(batch, m.seq_length, m.num_layers, m.hidden_size, padded_vocab,
                                                   recompute=recompute))


class MaskedLM:
    """BERT: masked-LM + sentence-order prediction on [CLS] A [SEP] B [SEP] samples (mtlm/data/bert.py)."""

    KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels")

    def build_data(self, data_cfg: Any, seq_length: int, seed: int) -> DataBundle:
        return build_bert_data(data_cfg, seq_length, seed)

    def normaliser(self, rank_batch: dict, seq_length: int, state: ParallelState) -> tuple[float, float]:
        """This rank's share (1/data) of the global batch's masked positions and of its sequences. The masked
        count differs between ranks, so it is summed over the data group first (one scalar all-reduce)."""
        masked = _all_reduce_sum((rank_batch["labels"] >= 0).sum().to(state.device, torch.float64), state)
        sequences = rank_batch["labels"].shape[0] * state.data
        return max(masked.item(), 1.0) / state.data, sequences / state.data

    def micro_batches(self, rank_batch: dict, size: int) -> list[dict]:
        n = rank_batch["labels"].shape[0]
        return [{k: v[i:i + size] for k, v in rank_batch.items()} for i in range(0, n, size)]

    def _forward(self, forward, micro: dict, device: torch.device):
        b = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
        mlm, sop_logits = forward(*(b[k] for k in self.KEYS))
        sop = F.cross_entropy(sop_logits.float(), b["sop_labels"], reduction="none")
        correct = (sop_logits.argmax(-1) == b["sop_labels"]).sum()
        return mlm.float().sum(), mlm.numel(), sop.sum(), correct, sop.numel()

    def loss(self, forward, micro: dict, norm: tuple[float, float], device: torch.device) -> tuple[torch.Tensor, dict]:
        mlm_sum, _, sop_sum, correct, _ = self._forward(forward, micro, device)
        masked, sequences = norm
        mlm, sop = mlm_sum / masked, sop_sum / sequences
        return mlm + sop, {"mlm_loss": mlm.detach(), "sop_loss": sop.detach(), "sop_acc": correct / sequences}

    def eval_parts(self, model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        mlm_sum, masked, sop_sum, correct, n = self._forward(model, batch, device)
        return {"mlm": mlm_sum.double(), "masked": torch.tensor(masked, dtype=torch.float64, device=device),
                "sop": sop_sum.double(), "correct": correct.double(),
                "n": torch.tensor(n, dtype=torch.float64, device=device)}

    def eval_metrics(self, totals: dict[str, torch.Tensor], iters: int, state: ParallelState) -> dict[str, float]:
        keys = ("mlm", "masked", "sop", "correct", "n")
        mlm, masked, sop, correct, n = _all_reduce_sum(torch.stack([totals[k] for k in keys]), state).tolist()
        out = {"val_mlm_loss": mlm / max(masked, 1.0), "val_sop_loss": sop / n, "val_sop_acc": correct / n}
        return {"val_loss": out["val_mlm_loss"] + out["val_sop_loss"], **out}

    def flops(self, m: Any, batch: int, padded_vocab: int, recompute: bool) -> tuple[float, float]:
        args = (batch, m.seq_length, m.num_layers, m.hidden_size, padded_vocab)
        return (flops.bert_model_flops_per_iteration(*args),
                flops.bert_hardware_flops_per_iteration(*args, recompute=recompute))


OBJECTIVES = {cls.__name__: cls for cls in (CausalLM, MaskedLM)}  # by the name a ModelSpec gives


def objective_for(model_cfg: Any) -> CausalLM | MaskedLM:
    """The objective that the spec of `model._target_`'s family names (mtlm/model/spec.py)."""
    return OBJECTIVES[spec_for(model_cfg).objective]()
