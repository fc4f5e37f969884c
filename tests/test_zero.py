"""Optimizer-state sharding (trainer.shard_optimizer, ZeRO stage 1 over the data group): at (tensor, data) =
(2, 2) ten steps give the same parameters as unsharded Adam, the learning-rate schedule drives the sharded
optimizer, and each rank holds about half of the optimizer state, counted in bytes."""

from __future__ import annotations

import pytest
import torch

from mtlm.metrics.memory import optimizer_state_bytes
from mtlm.parallel import ParallelState
from mtlm.train.loop import Trainer
from tests.compose import SMALL_MODEL, compose_config
from tests.distributed import run_ranks

pytestmark = pytest.mark.multiprocess
OVERRIDES = (*SMALL_MODEL, "parallel.tensor=2", "parallel.data=2", "trainer.global_batch_size=4",
             "trainer.micro_batch_size=1", "trainer.max_steps=10", "scheduler.warmup_steps=2")


def _train(state: ParallelState, shard: bool) -> tuple[Trainer, list[float], list[torch.Tensor]]:
    trainer = Trainer(compose_config(*OVERRIDES, f"trainer.shard_optimizer={shard}"), state, None, {})
    initial = [p.detach().clone() for p in trainer.params]
    lrs = [trainer.train_step()["lr"] for _ in range(10)]
    return trainer, lrs, initial


def _both(state: ParallelState) -> dict:
    out = {}
    for shard in (False, True):
        trainer, lrs, initial = _train(state, shard)
        out[shard] = {"params": [p.detach().clone() for p in trainer.params], "lrs": lrs, "initial": initial,
                      "zero": type(trainer.optimizer).__name__ == "ZeroRedundancyOptimizer",
                      "state_bytes": optimizer_state_bytes(trainer.optimizer),
                      "memory": trainer.memory_summary()}
    return out


def test_sharded_optimizer_matches_unsharded_with_half_the_state(small_data_cache: str) -> None:
    results = run_ranks(_both, 4, tensor=2)
    for rank, res in enumerate(results):
        plain, sharded = res[False], res[True]
        assert sharded["zero"] and not plain["zero"]
        assert sharded["lrs"] == plain["lrs"] and len(set(plain["lrs"])) > 5  # warmup + cosine, both runs
        for i, (a, b) in enumerate(zip(sharded["params"], plain["params"], strict=True)):
            rel = ((a - b).norm() / b.norm()).item()
            assert rel <= 1e-6, f"rank {rank} param {i}: relative difference {rel:.2e}"
        ratio = sharded["state_bytes"] / plain["state_bytes"]
        assert 0.4 < ratio < 0.6, f"rank {rank}: sharded state is {ratio:.2f} of unsharded"
        assert sharded["memory"]["memory_optimizer_bytes"] == sharded["state_bytes"]
        assert len(sharded["memory"]["peak_memory_bytes_per_device"]) == 4
        # Training moved every parameter: the equality above is not of untouched initial weights.
        assert not any(torch.equal(a, b) for a, b in zip(sharded["params"], sharded["initial"], strict=True))
    # Each parameter's Adam state lives on exactly one data rank: the two shards add up to the whole.
    for a, b in ((0, 2), (1, 3)):
        assert results[a][True]["state_bytes"] + results[b][True]["state_bytes"] == results[a][False]["state_bytes"]
