import os
import sys

# One compute thread per test process: multi-process tests start several ranks on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def small_data_cache(tmp_path_factory: pytest.TempPathFactory):
    """One data cache per module for tests/compose.py's SMALL_MODEL, built once up front (spawned ranks
    inherit MTLM_CACHE_DIR)."""
    from mtlm.data import build_data
    from tests.compose import SMALL_MODEL, compose_config

    path = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLM_CACHE_DIR", path)
        cfg = compose_config(*SMALL_MODEL)
        build_data(cfg.data, cfg.model.seq_length, cfg.trainer.seed)
        yield path


@pytest.fixture(scope="session")
def one_node_run(tmp_path_factory: pytest.TempPathFactory):
    """Issue 21's reference for the stop-signal and multi-node tests: tests/test_nodes.py's RUN with its two
    data-parallel ranks spawned on this machine. Its folder holds run/ (metrics.jsonl, summary.json), ck/ (the
    checkpoint of its last step) and cache/ (the data cache)."""
    import subprocess
    from pathlib import Path

    from tests.test_nodes import ROOT, RUN

    cwd = tmp_path_factory.mktemp("one_node")
    env = dict(os.environ, MTLM_CACHE_DIR=str(cwd / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *RUN, f"checkpoint.dir={cwd / 'ck'}",
                           f"hydra.run.dir={cwd / 'run'}"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(cwd)
