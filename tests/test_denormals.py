"""Issue 26: denormals flushed in every thread of every process that computes.

The flush mode is a per-thread register that new threads inherit: proven here on the installed torch, then
checked where it matters (a spawned rank's intra-op threads, a rank of an outside launcher), with a GEMM whose
inputs are denormal running at the rate of a normal one. Whether a CPU has the cliff at all depends on the
CPU (Intel AVX-512 Xeon: ~160x in issue 26; the AMD EPYC of this project's CI: none), so the rate test cannot
show the cliff everywhere; the thread probe shows the flush everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mtlm.parallel.denormals import threads_flushing
from mtlm.rank_env import RankEnv

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


PROBE = "import torch; from mtlm.parallel.denormals import threads_flushing; torch.set_num_threads(2); "


def test_flush_is_per_thread_and_threads_inherit_it() -> None:
    """Flush before the pool exists: both threads flush. Pool first, flush after: only the calling thread."""
    first = _python(PROBE + "torch.set_flush_denormal(True); print(threads_flushing(2))")
    assert first == "[True, True]"
    late = _python(PROBE + "threads_flushing(2); torch.set_flush_denormal(True); print(threads_flushing(2))")
    assert late == "[True, False]"  # thread 0 is the caller; the pool's worker kept denormals
    off = _python(PROBE + "print(threads_flushing(2))")
    assert off == "[False, False]"  # torch's default: the probe can fail


def test_late_flush_is_reported() -> None:
    line = _python(PROBE + "threads_flushing(2); torch.set_flush_denormal(True); "
                   "from mtlm.parallel.denormals import flush_warning; print(flush_warning(2))")
    assert line.startswith("warning: 1 of 2 compute threads keep denormal floats")


def _gemm_ratio(reps: int = 9) -> float:
    """Best time of a GEMM with denormal inputs / best time of the same GEMM with normal ones."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(512, 256, generator=gen)
    normal = torch.randn(256, 512, generator=gen)
    # Denormal bit patterns (exponent 0, mantissa != 0, either sign) written as integers: arithmetic would be
    # flushed to 0 in a flushing thread, and then the GEMM would see no denormals at all.
    bits = torch.randint(1, 1 << 23, (256, 512), generator=gen, dtype=torch.int32)
    denormal = (bits | (torch.randint(0, 2, (256, 512), generator=gen, dtype=torch.int32) << 31)).view(torch.float32)
    raw = denormal.view(torch.int32)  # checked on the bits: under DAZ a comparison reads a denormal as 0
    assert ((raw & 0x7F800000) == 0).all() and ((raw & 0x7FFFFF) != 0).all()
    times: dict[str, list[float]] = {"normal": [], "denormal": []}
    for _ in range(reps):  # interleaved, best of each: other processes on the cores only ever slow a rep down
        for name, x in (("normal", normal), ("denormal", denormal)):
            start = time.perf_counter()
            x @ b
            times[name].append(time.perf_counter() - start)
    return min(times["denormal"]) / min(times["normal"])


def _rank(env: RankEnv, out: str) -> None:
    torch.set_num_threads(2)
    flushing = threads_flushing(2)
    result = {"kind": env.kind, "rank": env.rank, "flushing": flushing, "ratio": _gemm_ratio()}
    Path(out, f"{env.kind}{env.rank}.json").write_text(json.dumps(result))


_LAUNCH = """
import sys
from mtlm.parallel.launch import launch
from tests.test_denormals import _rank
launch(_rank, int(sys.argv[2]), (sys.argv[1],), device="cpu")
"""


def _launch(out: Path, world: int, **env: str) -> None:
    """launch() in a fresh process (as train.py calls it), with a deadline so a hang fails the test."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, str(out), str(world)], cwd=ROOT, capture_output=True,
                          text=True, timeout=150, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_spawned_ranks_compute_with_denormals_flushed(tmp_path: Path) -> None:
    """launch() spawns two fresh ranks: every intra-op thread of each flushes, and a denormal-input GEMM runs
    at the normal rate (best of 9 interleaved, ratio < 2 in the same process)."""
    _launch(tmp_path, 2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"local{rank}.json").read_text())
        assert r["flushing"] == [True, True], r
        assert r["ratio"] < 2.0, r


def test_a_torchrun_rank_flushes_before_its_pool_starts(tmp_path: Path) -> None:
    """A rank of torchrun / SLURM (RANK and WORLD_SIZE set) runs fn in the launched process: launch() flushes
    before fn's first op, so its pool inherits the mode."""
    _launch(tmp_path, 1, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    r = json.loads((tmp_path / "torchrun0.json").read_text())
    assert r["flushing"] == [True, True] and r["ratio"] < 2.0, r


def test_without_the_flush_the_probe_and_the_rate_say_so(tmp_path: Path) -> None:
    """MTLM_FLUSH_DENORMALS=0: the rank's threads keep denormals (the probe is not blind). The GEMM ratio there
    is this CPU's cliff, printed, not asserted (no cliff on AMD EPYC, ~160x on Intel Xeon)."""
    _launch(tmp_path, 1, MTLM_FLUSH_DENORMALS="0")
    r = json.loads((tmp_path / "local0.json").read_text())
    assert r["flushing"] == [False, False], r
    print(f"denormal / normal GEMM time without the flush on this CPU: {r['ratio']:.2f}x")


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_quick_start_numerics_unchanged_by_the_flush(tmp_path: Path) -> None:
    """The quick start (gpt2_tiny, built-in corpus) for 8 steps with and without the flush: the same losses to
    1e-6 relative. Flushing only changes values below 1.2e-38; the largest place they could reach the loss is
    AdamW's second moment of a ~1e-20 gradient, whose update (~1e-12 x lr) is far below fp32's resolution of
    a weight, so the curves are expected to agree to the last bit and 1e-6 is a bound with margin."""
    curves = {}
    with tempfile.TemporaryDirectory() as cache:
        for flush in ("1", "0"):
            run_dir = tmp_path / f"flush{flush}"
            proc = subprocess.run(
                [sys.executable, str(ROOT / "train.py"), "trainer.max_steps=8", "trainer.log_interval=1",
                 "trainer.eval_interval=8", "logger=none", "checkpoint.save=false", f"hydra.run.dir={run_dir}"],
                cwd=tmp_path, capture_output=True, text=True, timeout=300,
                env={**os.environ, "MTLM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1", "MTLM_FLUSH_DENORMALS": flush})
            assert proc.returncode == 0, proc.stderr[-3000:]
            curves[flush] = _losses(run_dir)
    assert len(curves["1"]) == 8
    for a, b in zip(curves["1"], curves["0"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), curves
