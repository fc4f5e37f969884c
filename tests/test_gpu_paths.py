"""Issue 17: the decisions of the CUDA / NCCL paths that a CPU can reach, with the GPU mocked away.

- which CUDA device a rank takes from what its task sees (SLURM GPU binding or not);
- a single-rank job on a GPU runs in a fresh process (a multirun's jobs share no device memory or peak);
- the tensor / data groups: created with parallel.timeout_s, and only those of more than one rank.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mtlm.parallel import launch as launch_mod
from mtlm.parallel.launch import RankEnv, cuda_index, detect_rank_env, launch, rank_device
from mtlm.parallel.state import ParallelState


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda with `n` visible devices; returns the list set_device was called with."""
    chosen: list[int] = []

    def with_count(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(index))
        return chosen

    return with_count


SLURM_TASK_3_OF_4 = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
                     "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7"}


def test_slurm_task_bound_to_one_gpu_takes_cuda_0(fake_gpus) -> None:
    """--gpus-per-task=1 / --gpu-bind: local id 3, but the task sees one device, which is cuda:0."""
    env = detect_rank_env(SLURM_TASK_3_OF_4)
    chosen = fake_gpus(1)
    assert rank_device("auto", env.local_rank, env.local_world_size) == torch.device("cuda", 0)
    assert chosen == [0]


@pytest.mark.parametrize("visible", [4, 8])
def test_task_seeing_the_whole_node_takes_its_local_rank(fake_gpus, visible: int) -> None:
    """--gpus-per-node / --gres without binding, torchrun, our own spawn: cuda:<local rank>."""
    env = detect_rank_env(SLURM_TASK_3_OF_4)
    chosen = fake_gpus(visible)
    assert rank_device("cuda", env.local_rank, env.local_world_size) == torch.device("cuda", 3)
    assert chosen == [3]


def test_task_seeing_some_gpus_is_an_error_not_a_guess(fake_gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    chosen = fake_gpus(2)
    with pytest.raises(RuntimeError, match=r"local rank 1 of 4 on this node sees 2 CUDA devices "
                                           r"\(CUDA_VISIBLE_DEVICES=2,3\): bind exactly one GPU per task"):
        rank_device("auto", 1, 4)  # 2 of the node's GPUs for 4 ranks: which is whose is unknowable
    with pytest.raises(RuntimeError, match="local rank 3 sees 2 CUDA devices"):
        rank_device("auto", 3)  # callers without the local world size still never index past the end
    assert chosen == []


def test_cpu_device_touches_no_gpu(fake_gpus) -> None:
    chosen = fake_gpus(4)
    assert rank_device("cpu", 2, 4) == torch.device("cpu")
    fake_gpus(0)
    assert rank_device("auto", 2, 4) == torch.device("cpu")
    assert chosen == []


def test_cuda_index_rules() -> None:
    assert [cuda_index(r, 1, 8) for r in range(8)] == [0] * 8
    assert [cuda_index(r, 8, 8) for r in range(8)] == list(range(8))
    assert cuda_index(1, 4, 2) == 1 and cuda_index(1, 2) == 1
    for local_rank, visible, local_world in ((2, 2, 4), (0, 2, 4), (0, 0, 1)):
        with pytest.raises(RuntimeError):
            cuda_index(local_rank, visible, local_world)


def _write_pid(env: RankEnv, path: str) -> None:
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {env.rank} {env.world_size}")


@pytest.mark.multiprocess
def test_single_rank_on_a_gpu_runs_in_a_fresh_process(fake_gpus, tmp_path) -> None:
    """A multirun calls launch once per job from the Hydra process: on a GPU each single-rank job gets its
    own process, so it starts with none of the earlier jobs' device memory and with its own peak."""
    fake_gpus(1)
    assert launch_mod.uses_cuda("cuda") and launch_mod.uses_cuda("auto") and not launch_mod.uses_cuda("cpu")
    path = tmp_path / "pid"
    launch(_write_pid, 1, (str(path),), device="auto")
    pid, rank, world = map(int, path.read_text().split())
    assert pid != os.getpid() and (rank, world) == (0, 1)


def test_single_rank_on_cpu_stays_in_this_process(fake_gpus, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_spawn(*args, **kwargs):
        raise AssertionError("spawned a process for a CPU job")

    monkeypatch.setattr(launch_mod, "_spawn_and_join", no_spawn)
    path = tmp_path / "pid"
    for visible, device in ((0, "auto"), (2, "cpu")):
        fake_gpus(visible)
        launch(_write_pid, 1, (str(path),), device=device)
        assert int(path.read_text().split()[0]) == os.getpid()


class _Group:
    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks


def _groups_created(monkeypatch: pytest.MonkeyPatch, tensor: int, data: int, rank: int,
                    timeout_s: float = 600.0) -> tuple[list[tuple[list[int], timedelta | None]], ParallelState]:
    calls: list[tuple[list[int], timedelta | None]] = []

    def new_group(ranks=None, timeout=None, **kwargs):
        calls.append((list(ranks), timeout))
        return _Group(list(ranks))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", new_group)
    state = ParallelState.initialize(tensor, data, rank, tensor * data, torch.device("cpu"), "nccl", timeout_s)
    return calls, state


def test_groups_get_the_timeout_and_only_groups_that_communicate_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, state = _groups_created(monkeypatch, 2, 4, rank=5, timeout_s=90.0)
    assert calls == [([0, 1], timedelta(seconds=90)), ([2, 3], timedelta(seconds=90)),
                     ([4, 5], timedelta(seconds=90)), ([6, 7], timedelta(seconds=90)),
                     ([0, 2, 4, 6], timedelta(seconds=90)), ([1, 3, 5, 7], timedelta(seconds=90))]
    assert state.tp_group.ranks == [4, 5] and state.dp_group.ranks == [1, 3, 5, 7]

    calls, state = _groups_created(monkeypatch, 1, 64, rank=17)  # tensor 1: no one-rank tensor groups
    assert calls == [(list(range(64)), timedelta(seconds=600))]
    assert state.tp_group is None and state.dp_group.ranks == list(range(64))

    calls, state = _groups_created(monkeypatch, 8, 1, rank=3)  # data 1: no one-rank data groups
    assert calls == [(list(range(8)), timedelta(seconds=600))]
    assert state.tp_group.ranks == list(range(8)) and state.dp_group is None


@pytest.mark.parametrize("tensor, data", [(2, 4), (1, 4), (4, 1)])
def test_every_rank_creates_the_same_groups_in_the_same_order(monkeypatch: pytest.MonkeyPatch, tensor: int,
                                                              data: int) -> None:
    """new_group is collective over the world: a rank skipping a group another creates would hang."""
    per_rank = [_groups_created(monkeypatch, tensor, data, rank)[0] for rank in range(tensor * data)]
    assert all(calls == per_rank[0] for calls in per_rank) and per_rank[0]
    assert all(len(ranks) > 1 for ranks, _ in per_rank[0])


def test_run_summary_has_no_mfu_without_a_known_peak(small_data_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MIG slice (or a GPU not in the table) has a NaN peak: summary.json says null, not NaN or a guess."""
    import math

    from mtlm.train import loop
    from tests.compose import SMALL_MODEL, compose_config

    monkeypatch.setenv("MTLM_CACHE_DIR", small_data_cache)
    trainer = loop.Trainer(compose_config(*SMALL_MODEL), ParallelState(), None, {})
    mig = "unknown:NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    monkeypatch.setattr(loop, "peak_tflops", lambda *args, **kwargs: (math.nan, mig))
    summary = trainer._summary({"loss": 5.0}, {}, timed_steps=2, timed_s=1.0)
    assert summary["mfu"] is None and summary["peak_tflops_per_device"] is None and summary["peak_source"] == mig
    assert summary["tflops_per_device"] > 0
