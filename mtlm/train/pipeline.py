"""One training step and one evaluation through a pipeline (parallel.pipeline > 1), for the loop.

torch.distributed.pipelining runs the forward and backward of the micro-batches (GPipe, 1F1B or interleaved
1F1B, SC'21 §2.2); this file feeds it this data rank's samples and finishes the step's gradients, the parts a
pipeline adds to the loop without one:
- the micro-batches: the rank batch of global / data samples, split by the schedule into
  global / (micro x data) micro-batches of trainer.micro_batch_size, the same ones the loop without a
  pipeline uses;
- the loss: the last stage's fused vocab-parallel cross-entropy, each micro-batch's token sum over the global
  batch's tokens (so the micro-batch gradients add up to the step's, as without a pipeline);
- data parallelism: gradients averaged over the data group after the schedule (not DDP, whose hooks would
  fire once per micro-batch inside the schedule): one flat all-reduce, as Megatron-LM's 2019 loop did;
- the tied word embedding: its gradient summed between the first stage (input) and the last (output layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtlm.model.spec import spec_for
from mtlm.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtlm.parallel.pipeline import build_schedule, stage_ids
from mtlm.parallel.state import ParallelState


def _all_reduce_flat_(grads: list[torch.Tensor], group: dist.ProcessGroup, scale: float = 1.0) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class PipelineRunner:
    def __init__(self, cfg: Any, model: nn.Module, state: ParallelState, precision: Any) -> None:
        p, t = cfg.parallel, cfg.trainer
        self.model, self.state, self.precision = model, state, precision
        self.num_stages = state.pipeline * p.virtual_stages
        ids = stage_ids(state.pp_rank, state.pipeline, p.virtual_stages)
        self.first, self.last = 0 in ids, self.num_stages - 1 in ids
        self.stages = spec_for(cfg.model).split_stages(model, ids, self.num_stages)  # validated: not None
        self.micro_batches = t.global_batch_size // (t.micro_batch_size * state.data)
        self._norm = 1.0  # this step's loss denominator (set per step) ...
        self._scale = True  # ... and whether the loss is scaled (training) or a plain token mean (evaluation)
        self._unscaled: list[torch.Tensor] = []
        self.schedule = build_schedule(p.schedule, self.stages, ids, self.num_stages, self.micro_batches,
                                       self._loss, state.device, state.pp_group)
        # The last pipeline rank of this rank's pipeline line: it holds the loss (for the log) and the head.
        self.last_rank = state.groups["pipeline"][-1] if state.pp_group is not None else state.rank

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gpt = self.model
        tokens = vocab_parallel_cross_entropy(logits, targets, gpt.wte.vocab_start, self.state.tp_group)
        if not self._scale:
            return tokens.float().mean()
        loss = tokens.sum() / self._norm
        self._unscaled.append(loss.detach().float())  # for the log; the schedule backpropagates the scaled one
        return self.precision.scale_loss(loss)

    def train_grads(self, rank_batch: torch.Tensor, norm: float) -> torch.Tensor:
        """Forward and backward of this rank's samples; returns the step's loss (on every rank of the line)."""
        self._norm, self._scale, self._unscaled = norm, True, []
        with self.precision.autocast():
            self._run(rank_batch.to(self.state.device), [], train=True)
        total = torch.zeros((), device=self.state.device)
        if self.last:
            # The last m calls: on its first step the schedule also calls the loss once to infer shapes.
            total = torch.stack(self._unscaled[-self.micro_batches:]).sum()
        self._reduce_grads()
        return self._from_last(total)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor, count: int) -> torch.Tensor:
        """Token-mean loss of each of the first `count` micro-batches in `batch`, summed (every rank)."""
        self._scale = False
        losses: list[torch.Tensor] = []
        with self.precision.autocast():
            self._run(batch.to(self.state.device), losses, train=False)
        total = torch.zeros((), device=self.state.device)
        if self.last:
            total = torch.stack([loss.float() for loss in losses[:count]]).sum()
        return self._from_last(total)

    def _run(self, batch: torch.Tensor, losses: list, train: bool) -> None:
        ids, targets = batch[:, :-1], batch[:, 1:]
        step = self.schedule.step if train else self.schedule.eval
        args = (ids,) if self.first else ()
        step(*args, target=targets if self.last else None, losses=losses)

    def _from_last(self, value: torch.Tensor) -> torch.Tensor:
        if self.state.pp_group is not None:
            dist.broadcast(value, src=self.last_rank, group=self.state.pp_group)
        return value

    def _reduce_grads(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.state.dp_group is not None:  # the data-parallel mean (DDP's, after the schedule)
            _all_reduce_flat_([p.grad for p in params], self.state.dp_group, 1.0 / self.state.data)
        if self.state.embed_group is not None and self.model.wte is not None:  # tied input / output embedding
            _all_reduce_flat_([self.model.wte.weight.grad], self.state.embed_group)

    def norm_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients count in the norm: the tied embedding once (on the first stage)."""
        skip = {id(self.model.wte.weight)} if self.last and not self.first and self.model.wte is not None else set()
        return [p for p in self.model.parameters() if id(p) not in skip]
