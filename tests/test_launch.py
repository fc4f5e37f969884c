"""Launch environments (torchrun, SLURM, local), the rank grid of Fig. 8, thread shares, and layout checks
that must fail before anything is spawned."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtlm.checks import validate
from mtlm.config import ConfigError
from mtlm.parallel.launch import detect_rank_env, first_slurm_host, threads_per_rank
from mtlm.parallel.state import Grid, data_group_ranks, tensor_group_ranks
from tests.test_config import _compose


def test_rank_grid_is_figure_8() -> None:
    # 16 ranks, TP=8: tensor groups [0..7], [8..15]; data groups [0,8], [1,9], ...
    assert tensor_group_ranks(16, 8) == [list(range(8)), list(range(8, 16))]
    assert data_group_ranks(16, 8) == [[i, i + 8] for i in range(8)]
    assert tensor_group_ranks(4, 2) == [[0, 1], [2, 3]] and data_group_ranks(4, 2) == [[0, 2], [1, 3]]


def test_grid_is_megatron_order_tensor_innermost() -> None:
    # 8 ranks at t=2, d=2, p=2, worked by hand: rank = tensor + 2 * data + 4 * pipeline.
    g = Grid(2, 2, 2)
    assert g.world == 8 and g.model_ranks == 4
    assert g.groups("tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g.groups("pipeline") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g.coords(6) == {"tensor": 0, "data": 1, "pipeline": 1}
    # Every rank is in exactly one group of each axis, at the position its coordinate says.
    for axis in ("tensor", "data", "pipeline"):
        seen = sorted(r for group in g.groups(axis) for r in group)
        assert seen == list(range(8))
        for group in g.groups(axis):
            assert [g.coords(r)[axis] for r in group] == list(range(getattr(g, axis)))
    assert Grid(1, 1, 4).groups("pipeline") == [[0, 1, 2, 3]]
    assert Grid(1, 2, 2).groups("data") == [[0, 1], [2, 3]] and Grid(1, 2, 2).groups("pipeline") == [[0, 2], [1, 3]]


def test_grid_checks_degrees_and_world() -> None:
    with pytest.raises(ValueError, match="^parallel.pipeline: must be >= 1, got 0$"):
        Grid(2, 1, 0).check()
    with pytest.raises(ValueError, match="launcher started 6 ranks but .* = 2 x 1 x 2 = 4"):
        Grid(2, 1, 2).check(6)
    Grid(2, 1, 2).check(4)


def test_no_outside_launcher() -> None:
    assert detect_rank_env({}) is None
    assert detect_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: we spawn


def test_torchrun_environment() -> None:
    env = detect_rank_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"})
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("torchrun", 3, 8, 1, 2)
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 29500)


def test_slurm_environment() -> None:
    env = detect_rank_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
                           "SLURM_JOB_ID": "123456"})
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 9, 16, 1, 8)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 123456 % 20000


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5],b2", "a3"), ("gpu[12,15-16]", "gpu12"),
                                            ("dgx-[001-064]", "dgx-001")])
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_threads_per_rank() -> None:
    assert threads_per_rank(1, 3) == 3
    cores = threads_per_rank(1, None)
    assert cores >= 1 and threads_per_rank(cores, None) == 1 and threads_per_rank(4 * cores, None) == 1


def test_more_ranks_than_gpus_fails_before_spawning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = _compose("parallel.tensor=2", "parallel.data=2")
    with pytest.raises(ConfigError, match="4 ranks .* need 4 GPUs .* 2 are visible"):
        validate(cfg)
    validate(_compose("parallel.tensor=2"))  # 2 ranks on 2 GPUs is fine


def test_nccl_needs_cuda() -> None:
    with pytest.raises(ConfigError) as info:
        validate(_compose("parallel.backend=nccl", "trainer.device=cpu"))
    assert info.value.key == "parallel.backend"


def test_slurm_launcher_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from tests.test_config import CONF

    with initialize_config_dir(version_base="1.3", config_dir=CONF, job_name="test"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert "SlurmLauncher" in launcher["_target_"]
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 8


def test_failure_report_names_the_rank_that_failed_first(tmp_path) -> None:
    """A dead rank makes its peers' collectives fail too; the report must show the first error, not the
    peer's 'connection closed' that torch happened to notice first."""
    import os
    import pickle
    from types import SimpleNamespace

    import torch.multiprocessing as mp

    from mtlm.parallel.launch import _root_cause

    files = [tmp_path / "0.err", tmp_path / "1.err"]
    files[1].write_bytes(pickle.dumps("InjectedFailure: rank 1 died"))
    files[0].write_bytes(pickle.dumps("DistBackendError: connection closed by peer"))
    os.utime(files[1], ns=(1_000, 1_000))
    os.utime(files[0], ns=(2_000, 2_000))
    ctx = SimpleNamespace(error_files=[str(f) for f in files],
                          processes=[SimpleNamespace(pid=10), SimpleNamespace(pid=11)])
    noticed = mp.ProcessRaisedException("peer error", 0, 10)
    root = _root_cause(ctx, noticed)
    assert root.error_index == 1 and "rank 1 died" in str(root)
    files[1].unlink()  # only the peer wrote an error: keep what torch reported
    assert _root_cause(ctx, noticed) is noticed
