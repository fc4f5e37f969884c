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
