"""Issue 25: a failed `mtlm.evaluate` / `mtlm.generate` left an empty outputs/<date>/<time>_... folder, and
`mtlm.generate` did not say where it wrote generations.jsonl."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlm.eval import app
from tests.eval_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=180)


@pytest.mark.slow
def test_failed_runs_leave_no_folder_and_generate_says_where_it_wrote(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    work = tmp_path / "work"
    (work / "outputs" / "earlier").mkdir(parents=True)  # an earlier run's folder: stays
    (work / "outputs" / "earlier" / "eval.json").write_text("{}")
    r = _run("mtlm.evaluate", work, "task=wikitext", "data.path=missing.raw", f"checkpoint.dir={ckpt}", "logger=none")
    assert r.returncode == 2 and r.stderr.strip().startswith("data error: data.path: file not found")
    assert sorted(p.name for p in (work / "outputs").iterdir()) == ["earlier"]  # its new date folder went too
    r = _run("mtlm.generate", work, f"checkpoint.dir={ckpt}", "prompt=", "generate.max_new_tokens=2")
    assert r.returncode == 2 and sorted(p.name for p in (work / "outputs").iterdir()) == ["earlier"]

    r = _run("mtlm.generate", work, f"checkpoint.dir={ckpt}", "prompt=The quick", "generate.max_new_tokens=2")
    assert r.returncode == 0, r.stderr
    written = [line for line in r.stdout.splitlines() if line.startswith("wrote ")]
    assert len(written) == 1 and written[0].endswith("generations.jsonl") and Path(written[0][6:]).is_file()


def test_only_an_unused_folder_made_by_this_run_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "day" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("x: 1\n")
    (run / "evaluate.log").write_text("")
    (run / "notes.txt").write_text("mine")  # something else in it: left alone
    app.remove_unused_run_dir(str(run))
    assert (run / "notes.txt").is_file()
    (run / "notes.txt").unlink()
    monkeypatch.setattr(app, "STARTED", time.time() + 60)  # the folder predates this run: left alone
    app.remove_unused_run_dir(str(run))
    assert run.is_dir()
    monkeypatch.setattr(app, "STARTED", time.time() - 60)
    app.remove_unused_run_dir(str(run))
    assert not (tmp_path / "outputs").exists()  # the run folder and the ones made for it, up to the launch dir
