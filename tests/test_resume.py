"""End to end with train.py: resuming is bit-exact (dropout on), a SIGKILL at any point of a save leaves a
loadable latest checkpoint, a rank that dies is restarted from the latest checkpoint and the run ends with
the uninterrupted run's loss and weights, and a bad checkpoint stops train.py with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import ShardReader, latest_checkpoint, read_metadata

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.seq_length=32", "model.max_position_embeddings=32",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.vocab_size=512", "logger=none",
        "model.dropout=0.1", "trainer.log_interval=1", "trainer.eval_interval=1000", "trainer.seed=7"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train(cwd: Path, cache: Path, name: str, *overrides: str, env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    run_env = dict(os.environ, MTLM_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={cwd / name}"]
    proc = subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every logical tensor of a checkpoint (model and Adam state), whole."""
    meta = read_metadata(step_dir)
    reader = ShardReader(step_dir, meta)
    return {name: reader.read_full(name) for name in meta["tensors"]}


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and any(k.endswith("exp_avg_sq") for k in ta)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{name} differs between {a} and {b}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, cache: Path):
    """Uninterrupted 20-step runs, checkpointing every 10 steps, one per (tensor, data) layout."""
    done: dict[tuple[int, int], Path] = {}

    def get(tensor: int, data: int) -> Path:
        if (tensor, data) not in done:
            cwd = tmp_path_factory.mktemp(f"straight_t{tensor}d{data}")
            train(cwd, cache, "run", f"parallel.tensor={tensor}", f"parallel.data={data}", "trainer.max_steps=20",
                  "checkpoint.interval=10", f"checkpoint.dir={cwd / 'ck'}")
            done[(tensor, data)] = cwd
        return done[(tensor, data)]

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("tensor,data", [(2, 1), (1, 2)])
def test_resume_is_bit_exact(tmp_path: Path, cache: Path, straight, tensor: int, data: int) -> None:
    """20 steps straight vs 10 steps + resume 10: same per-step losses and same final weights and Adam
    state, bit for bit, with dropout on (both RNG streams of every rank are restored)."""
    ref = straight(tensor, data)
    assert sorted(p.name for p in (ref / "ck").iterdir()) == ["latest", "step_00000010", "step_00000020"]
    proc = train(tmp_path, cache, "resumed", f"parallel.tensor={tensor}", f"parallel.data={data}",
                 "trainer.max_steps=20", f"checkpoint.dir={tmp_path / 'ck'}",
                 f"checkpoint.resume={ref / 'ck' / 'step_00000010'}")
    assert "at step 10" in proc.stdout
    want, got = losses(ref / "run"), losses(tmp_path / "resumed")
    assert sorted(got) == list(range(11, 21))
    assert got == {s: want[s] for s in range(11, 21)}
    assert_identical(ref / "ck" / "step_00000020", tmp_path / "ck" / "step_00000020")


@pytest.mark.multiprocess
def test_rank_killed_mid_run_restarts_from_latest(tmp_path: Path, cache: Path, straight) -> None:
    """Rank 1 dies by SIGKILL after step 13 (first attempt only); trainer.max_restarts=1 relaunches both
    ranks from step 10's checkpoint and the run ends exactly where the uninterrupted one did."""
    ref = straight(2, 1)
    env = {"MTLM_FAIL_AT_STEP": "1:13", "MTLM_FAIL_SIGNAL": "KILL", "MTLM_FAIL_ONCE_FILE": str(tmp_path / "once")}
    proc = train(tmp_path, cache, "run", "parallel.tensor=2", "trainer.max_steps=20", "checkpoint.interval=10",
                 f"checkpoint.dir={tmp_path / 'ck'}", "trainer.max_restarts=1", env=env)
    assert (tmp_path / "once").exists(), "the failure never fired"
    assert "SIGKILL" in proc.stderr and "restart 1/1 from" in proc.stderr and "step_00000010" in proc.stderr
    got = losses(tmp_path / "run")  # the restarted attempt appends; steps 11..13 appear twice, equal
    assert got[20] == losses(ref / "run")[20]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "ok"
    assert_identical(ref / "ck" / "step_00000020", tmp_path / "ck" / "step_00000020")


@pytest.mark.parametrize("point,latest", [("shards", 2), ("metadata", 2), ("before_pointer", 4),
                                          ("after_pointer", 4)])
def test_sigkill_during_save_leaves_latest_loadable(tmp_path: Path, cache: Path, point: str, latest: int) -> None:
    """Killed while saving step 4 (the second save): `latest` is step 2 until the pointer moves, then 4
    (before_pointer: step_4 is complete but unnamed; the pointer still says 2). Either way it loads."""
    ck = tmp_path / "ck"
    proc = train(tmp_path, cache, "run", "trainer.max_steps=6", "checkpoint.interval=2", f"checkpoint.dir={ck}",
                 env={"MTLM_CKPT_CRASH_AT": f"{point}:4"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    pointed = json.loads((ck / "latest").read_text())["step"]
    assert pointed == (4 if point == "after_pointer" else 2)
    assert read_metadata(latest_checkpoint(ck))["step"] == pointed
    model = load_model(ck)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 512)
    if point == "shards":  # the next run resumes from step 2 and cleans up the half-written save
        train(tmp_path, cache, "resumed", "trainer.max_steps=6", "checkpoint.interval=2", f"checkpoint.dir={ck}",
              "checkpoint.resume=auto")
        assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000004", "step_00000006"]
        assert sorted(losses(tmp_path / "resumed")) == [3, 4, 5, 6]


def test_bad_checkpoint_stops_train_py_with_one_line(tmp_path: Path, cache: Path) -> None:
    ck = tmp_path / "ck"
    train(tmp_path, cache, "run", "trainer.max_steps=2", f"checkpoint.dir={ck}")
    proc = train(tmp_path, cache, "bigger", "trainer.max_steps=4", "model.hidden_size=128",
                 f"checkpoint.dir={ck}", "checkpoint.resume=auto", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("checkpoint error: ") and "metadata.json: model mismatch" in lines[0]
    assert "model.hidden_size=64, this run has 128" in lines[0]
    (ck / "step_00000002" / "rank00000.safetensors").unlink()
    proc = train(tmp_path, cache, "missing", "trainer.max_steps=4", f"checkpoint.dir={ck}", "checkpoint.resume=auto",
                 check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"checkpoint error: {ck / 'step_00000002' / 'rank00000.safetensors'}: missing shard file (listed in "
        f"{ck / 'step_00000002' / 'metadata.json'})"]
