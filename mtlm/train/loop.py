"""The training loop of one rank: batch -> forward -> vocab-parallel loss -> backward -> clip -> step.

Batches: the global batch of step k is samples [k*G, (k+1)*G) of the dataset's endless, seeded stream; data
rank r reads the contiguous slice [k*G + r*G/d, k*G + (r+1)*G/d), in micro-batches. Every layout therefore
sees the same global batches in the same order, and the data position is one global sample count.

The loss of a step is the token mean over the whole global batch: each rank divides its token-loss sum by
its share of the global tokens, micro-batch losses add up, and DDP averages over data ranks.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel

from mtlm.errors import ConfigError
from mtlm.metrics.flops import peak_tflops
from mtlm.metrics.memory import SavedActivations, gradient_bytes, optimizer_state_bytes, parameter_bytes
from mtlm.metrics.sinks import MetricsLogger, build_logger
from mtlm.model.build import build_model
from mtlm.model.spec import spec_for
from mtlm.parallel import preempt
from mtlm.parallel.random import seed_streams
from mtlm.parallel.sequence_grads import sum_sequence_parallel_grads_
from mtlm.parallel.state import ParallelState
from mtlm.train import checkpoint as ckpt
from mtlm.train.faults import maybe_fail, maybe_hold
from mtlm.train.objective import objective_for
from mtlm.train.optim import build_optimizer, clip_grad_norm_, optimizer_factory
from mtlm.train.pipeline import PipelineRunner
from mtlm.train.precision import build_precision

# The model has no buffers, so DDP has none to keep in step. torch >= 2.13 names that `forward_sync_buffers`
# (and warns, once per rank, on the older `broadcast_buffers`); torch 2.4-2.12 knows only the older name.
_NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers": False}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_data(value: torch.Tensor, state: ParallelState) -> float:
    if state.dp_group is not None:
        dist.all_reduce(value, group=state.dp_group)
        value = value / state.data
    return value.item()


class Trainer:
    def __init__(self, cfg: Any, state: ParallelState, out_dir: str | None, run_config: dict) -> None:
        self.cfg, self.state = cfg, state
        t = cfg.trainer
        if bool(cfg.parallel.get("sequence", False)) != state.sequence:  # the grid is built from the same keys
            raise ValueError(f"parallel.sequence={cfg.parallel.sequence} but the rank grid has "
                             f"sequence={state.sequence}")
        self.micro_steps = t.global_batch_size // (t.micro_batch_size * state.data)
        self.rank_batch = t.global_batch_size // state.data
        self.tokens_per_step = t.global_batch_size * cfg.model.seq_length

        seed_streams(t.seed, state.tp_rank, state.device)
        # The model family's spec (mtlm/model/spec.py) decides the samples, the loss and the FLOPs (its
        # objective, train/objective.py), and which modules activation checkpointing recomputes.
        self.spec = spec_for(cfg.model)
        self.objective = objective_for(cfg.model)
        self.data = self.objective.build_data(cfg.data, cfg.model.seq_length, t.seed)
        vocab = cfg.model.vocab_size or self.data.tokenizer.vocab_size
        self.model = build_model(cfg.model, vocab, state, device=state.device,
                                 activation_checkpointing=t.activation_checkpointing)
        self.model.init_weights(t.seed)
        self.precision = build_precision(cfg.precision, state.device, state)
        # parallel.pipeline > 1: torch.distributed.pipelining runs the micro-batches (train/pipeline.py); the
        # model keeps only this rank's stages, under their whole-model names.
        self.pipeline = PipelineRunner(cfg, self.model, state, self.precision) if state.pipeline > 1 else None
        if t.compile:
            # In place (nn.Module.compile), so parameter names, hence checkpoints, stay the eager model's.
            # Opt-in: on CPU the first compile takes about a minute, and the step was no faster in fp32 and
            # 3-5% faster in bf16 (docs/benchmarks.md, issue 7).
            self.model.compile()
        self.params = list(self.model.parameters())
        self.ddp = None
        if state.dp_group is not None and self.pipeline is None:
            self.ddp = DistributedDataParallel(
                self.model, process_group=state.dp_group, **_NO_BUFFER_SYNC,
                device_ids=[state.device] if state.device.type == "cuda" else None)
        self.forward = self.ddp if self.ddp is not None else self.model
        # trainer.shard_optimizer: ZeRO stage 1, Adam state split over the data ranks (a no-op at data=1).
        self.optimizer = build_optimizer(self.model, optimizer_factory(cfg.optimizer),
                                         cfg.optimizer.weight_decay,
                                         shard_group=state.dp_group if t.shard_optimizer else None)
        self.scheduler = instantiate(cfg.scheduler)(optimizer=self.optimizer, max_steps=t.max_steps)
        # Model FLOPs, and what the hardware executes: activation checkpointing reruns each layer's forward
        # (MFU stays model FLOPs).
        self.flops_per_step, self.hardware_flops_per_step = self.objective.flops(
            cfg.model, t.global_batch_size, self.model.padded_vocab_size, recompute=t.activation_checkpointing)
        self.step = 0
        self.stopped_by: str | None = None  # the stop signal's name, when one ended the run early
        self.consumed_samples = 0  # the data position: a global sample count, so the data degree may change
        self.memory: dict[str, int] | None = None  # bytes per part, counted on this process's first step
        self.logger: MetricsLogger | None = None
        if state.is_main and out_dir is not None:
            self.logger = build_logger(cfg.logger, run_config, out_dir)
        ckpt.restore_trainer(self)  # last: after data, model and optimizer exist, so the RNG state is final

    # ---- data -------------------------------------------------------------------------------------------
    def _rank_slice(self, dataset, global_start: int, global_count: int):
        """This data rank's contiguous share of the global samples [global_start, +global_count)."""
        per_rank = global_count // self.state.data
        return dataset.get_batch(global_start + self.state.dp_rank * per_rank, per_rank)

    # ---- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        t = self.cfg.trainer
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        rank_batch = self._rank_slice(self.data.train, self.consumed_samples, t.global_batch_size)
        norm = self.objective.normaliser(rank_batch, self.cfg.model.seq_length, self.state)
        loss_sum = torch.zeros((), device=self.state.device)
        parts: dict[str, torch.Tensor] = {}  # the objective's loss terms and accuracies, for the log
        # Memory accounting hooks one forward of the first step only (metrics/memory.py), so no step pays.
        act = None if self.memory is not None or t.compile or self.pipeline is not None else SavedActivations(
            self.params, self.spec.recompute(self.model) if t.activation_checkpointing else ())
        if self.pipeline is not None:
            loss_sum = self.pipeline.train_grads(rank_batch, norm)
        micro_batches = () if self.pipeline is not None else \
            self.objective.micro_batches(rank_batch, t.micro_batch_size)
        for m, micro in enumerate(micro_batches):
            last = m == self.micro_steps - 1
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync:
                with self.precision.autocast(), act if act is not None and m == 0 else contextlib.nullcontext():
                    loss, terms = self.objective.loss(self.forward, micro, norm, self.state.device)
                self.precision.scale_loss(loss).backward()
            loss_sum += loss.detach().float()
            parts = {k: parts.get(k, 0) + v.float() for k, v in terms.items()}
        if self.state.sequence:  # layer norms saw 1/t of the sequence: sum their gradients (§4.2.2)
            sum_sequence_parallel_grads_(self.params, self.state.tp_group)
        if self.memory is None:  # (a pipeline's saved activations are not counted: no number rather than 0)
            self.memory = {"grads": gradient_bytes(self.params)}
            if self.pipeline is None:
                self.memory["activations"] = act.bytes if act is not None else 0
        skipped = self.precision.unscale_and_check(self.params, self.optimizer.param_groups)
        counted = self.pipeline.norm_params() if self.pipeline is not None else None
        grad_norm = clip_grad_norm_(self.params, t.grad_clip, self.state, counted) if not skipped else float("nan")
        if not skipped:
            self.optimizer.step()
        self.precision.update(skipped)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        return {"loss": _mean_over_data(loss_sum, self.state), "lr": lr, "grad_norm": grad_norm,
                **{k: _mean_over_data(v, self.state) for k, v in parts.items()}, **self.precision.metrics()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`val_loss` (and the objective's other validation metrics) over eval_iters fixed batches."""
        t = self.cfg.trainer
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        per_iter = t.micro_batch_size * self.state.data
        if self.pipeline is not None:  # the schedule takes n micro-batches a call: round up, count eval_iters
            n, total = self.pipeline.micro_batches, torch.zeros((), device=self.state.device)
            for start in range(0, t.eval_iters, n):
                batch = torch.cat([self._rank_slice(self.data.val, i * per_iter, per_iter)
                                   for i in range(start, start + n)])
                total += self.pipeline.eval_loss(batch, min(n, t.eval_iters - start))
            return self.objective.eval_metrics({"val_loss": total}, t.eval_iters, self.state)
        for i in range(t.eval_iters):
            batch = self._rank_slice(self.data.val, i * per_iter, per_iter)
            with self.precision.autocast():
                parts = self.objective.eval_parts(self.model, batch, self.state.device)
            totals = {k: totals.get(k, 0) + v for k, v in parts.items()}
        return self.objective.eval_metrics(totals, t.eval_iters, self.state)

    # ---- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        timed_steps, timed_s = 0, 0.0
        all_steps, all_s = 0, 0.0  # warm-up included: the timing of a run stopped (signal) before warm-up ended
        first = self.step  # > 0 when resumed: the warm-up steps count from here
        val = self.evaluate()
        if self.step == 0:  # a resumed run already logged its steps so far
            self._log(0, val)
        metrics: dict[str, float] = {}
        while self.step < t.max_steps:
            _sync(self.state.device)
            start = time.perf_counter()
            metrics = self.train_step()
            _sync(self.state.device)
            elapsed = time.perf_counter() - start
            all_steps, all_s = all_steps + 1, all_s + elapsed
            if self.step - first > t.timing_warmup_steps or t.max_steps - first <= t.timing_warmup_steps:
                timed_steps, timed_s = timed_steps + 1, timed_s + elapsed
            metrics["tokens_per_s"] = self.tokens_per_step / elapsed
            metrics["tflops_per_device"] = self.flops_per_step / elapsed / self.state.world_size / 1e12
            metrics["step_time_s"] = elapsed
            maybe_fail(self.state.rank, self.step)
            maybe_hold(self.state.rank, self.step)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}")
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                val = self.evaluate()
                metrics.update(val)
            if self.step % t.log_interval == 0 or self.step == t.max_steps or "val_loss" in metrics:
                self._log(self.step, metrics)
            if ckpt.should_save(self.cfg, self.step):
                ckpt.save_trainer(self)
            # A stop signal (SIGTERM, SLURM's SIGUSR1 warning) on any rank: all stop after this step, saved.
            if (sig := preempt.agree(self.state.world_size, self.state.device)) and self.step < t.max_steps:
                self._stop(sig)
                break
        summary = self._summary(metrics, val, timed_steps, timed_s) if timed_steps or not all_steps else \
            {**self._summary(metrics, val, all_steps, all_s), "timed_steps": 0}
        if self.stopped_by is not None:
            summary["stopped_by"] = self.stopped_by
        return summary

    def _stop(self, sig: int) -> None:
        self.stopped_by = signal.Signals(sig).name
        ck = self.cfg.get("checkpoint")
        if ck is not None and ck.save and not ckpt.should_save(self.cfg, self.step):
            ckpt.save_trainer(self)
        preempt.mark_stopped(self.step)
        if self.state.is_main:
            print(f"{self.stopped_by}: every rank finished step {self.step}"
                  f"{', checkpoint saved' if ck is not None and ck.save else ''}; stopping", flush=True)

    def _summary(self, metrics: dict, val: dict[str, float], timed_steps: int, timed_s: float) -> dict[str, Any]:
        c = self.cfg
        step_time = timed_s / max(timed_steps, 1)
        tflops = self.flops_per_step / step_time / self.state.world_size / 1e12
        threads = torch.get_num_threads()
        peak, peak_source = (None, "skipped") if not self.state.is_main else \
            peak_tflops(self.state.device, threads, torch.float32 if c.precision.dtype == "fp32" else
                        {"bf16": torch.bfloat16, "fp16": torch.float16}[c.precision.dtype])
        if peak is not None and math.isnan(peak):  # a GPU not in the table, or a MIG slice: no MFU, not a guess
            peak = None
        return {
            "model": c.model.name, "num_params": self.model.num_parameters(),
            "hidden_size": c.model.hidden_size, "num_attention_heads": c.model.num_attention_heads,
            "num_layers": c.model.num_layers, "wandb_group": c.logger.get("group"),
            "padded_vocab_size": self.model.padded_vocab_size, "vocab_size": self.model.vocab_size,
            "tensor": self.state.tensor, "data": self.state.data, "pipeline": self.state.pipeline,
            "virtual_stages": c.parallel.get("virtual_stages", 1), "schedule": c.parallel.get("schedule", "1f1b"),
            "sequence_parallel": self.state.sequence, "world_size": self.state.world_size,
            "devices": self.state.world_size, "device_type": self.state.device.type,
            "threads_per_rank": threads, "precision": c.precision.dtype,
            # The machine's 1-minute load at the end (our own ranks included): explains a slow run on shared cores.
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "hosts": self._hosts(),  # each rank's host, by rank: where a multi-node run's ranks ran
            "steps": self.step, "global_batch_size": c.trainer.global_batch_size,
            "seq_length": c.model.seq_length, "train_loss": metrics.get("loss"), **val,
            "timed_steps": timed_steps, "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time, "flops_per_step": self.flops_per_step,
            "tflops_per_device": tflops, "pflops": tflops * self.state.world_size / 1e3,
            "hardware_flops_per_step": self.hardware_flops_per_step,
            "hardware_tflops_per_device": tflops * self.hardware_flops_per_step / self.flops_per_step,
            "peak_tflops_per_device": peak, "peak_source": peak_source,
            "mfu": tflops / peak if peak else None,
            **self.memory_summary(), **self.precision.metrics(),
        }

    def _hosts(self) -> list[str]:
        """Every rank's hostname, by global rank (collective)."""
        hosts: list[Any] = [socket.gethostname()]
        if self.state.world_size > 1:
            hosts = [None] * self.state.world_size
            dist.all_gather_object(hosts, socket.gethostname())
        return hosts

    def memory_summary(self) -> dict[str, Any]:
        """Peak memory per device: the CUDA allocator's peak on GPUs; on CPU the exact count of parameters,
        gradients, optimizer state and saved activations (metrics/memory.py). Every rank must call this."""
        parts = {**(self.memory or {}), "params": parameter_bytes(self.params),
                 "optimizer": optimizer_state_bytes(self.optimizer)}
        cuda = self.state.device.type == "cuda"
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.state.device) if cuda else sum(parts.values())],
                            dtype=torch.int64, device=self.state.device)
        per_device = [peak]
        if self.state.world_size > 1:
            per_device = [torch.empty_like(peak) for _ in range(self.state.world_size)]
            dist.all_gather(per_device, peak)
        per_device_bytes = [int(p.item()) for p in per_device]
        return {"peak_memory_bytes": max(per_device_bytes), "peak_memory_bytes_per_device": per_device_bytes,
                "peak_memory_source": "cuda_allocator" if cuda else "tensor_count",
                **{f"memory_{k}_bytes": v for k, v in parts.items()}}

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics)


def train(cfg: Any, state: ParallelState, out_dir: str | None, run_config: dict) -> dict[str, Any] | None:
    """Train on this rank; rank 0 writes metrics.jsonl / summary.json / W&B into out_dir."""
    trainer = None
    status = "failed"
    try:
        trainer = Trainer(cfg, state, out_dir, run_config)
        summary = trainer.fit()
        if trainer.logger is not None:
            trainer.logger.summary(summary)
        status = "ok"
        return summary
    except BaseException as err:
        if trainer is not None and trainer.logger is not None:
            trainer.logger.summary({"error": f"{type(err).__name__}: {err}", "steps": trainer.step})
        raise
    finally:
        if trainer is not None and trainer.logger is not None:
            trainer.logger.close(status)


def check_trainer_config(t: Any, data: int) -> None:
    """trainer.* values (called by mtlm.checks.validate); `data`: parallel.data, which splits each batch."""
    if t.global_batch_size % (t.micro_batch_size * data):
        raise ConfigError("trainer.global_batch_size", f"{t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size x parallel.data = {t.micro_batch_size} x {data}")
    if t.grad_clip < 0:
        raise ConfigError("trainer.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.device", f"must be auto, cpu or cuda, got {t.device!r}")
    if t.num_threads is not None and t.num_threads <= 0:
        raise ConfigError("trainer.num_threads", f"must be > 0 or null, got {t.num_threads}")
    if t.max_restarts < 0:
        raise ConfigError("trainer.max_restarts", f"must be >= 0, got {t.max_restarts}")
