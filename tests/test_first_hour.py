"""A new user's first hour (issue 16): nothing lost, nothing silently ignored.

- A quick override run of another shape never lands in the first run's checkpoint folder, and a second fresh
  run of the first shape stops before it starts instead of deleting anything: every checkpoint stays loadable.
- A key outside the typed schema is rejected in every form (`+key`, `++key`, an experiment file, a sweep) with
  one line naming the closest valid key.
- logger.mode is validated up front, a blank WANDB_MODE counts as unset, and a failed run's summary.json says why.
- A run ends with one line naming its run dir, its numbers and its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlm import load_model
from mtlm.checkpoint.format import latest_checkpoint, read_metadata
from mtlm.checks import compose_error, validate
from mtlm.config import ConfigError, shape_digest
from mtlm.config_checks import closest_key
from mtlm.train.timeline import claim_folder
from tests.compose import CONF, SMALL_MODEL, compose_config

ROOT = Path(__file__).resolve().parents[1]
# The "default shape" of the sequence below, shrunk so that a run takes seconds.
FIRST = ["model.num_layers=2", "model.hidden_size=64", "model.seq_length=32", "model.max_position_embeddings=32",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.vocab_size=512", "logger=none",
         "trainer.eval_interval=1000", "trainer.log_interval=2", "trainer.num_threads=1"]


def train_py(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = dict(os.environ, MTLM_CACHE_DIR=str(cwd / "cache"), OMP_NUM_THREADS="1", **(env or {}))
    run_env.pop("WANDB_DIR", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return lines[0]


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_override_run_and_second_fresh_run_lose_no_checkpoint(tmp_path: Path) -> None:
    """The issue's sequence: a run of the default shape, a quick override of another shape, then the first
    command again. The override lands in its own folder; the second fresh run moves the first run's
    checkpoints aside (one note naming where) instead of deleting them. Every checkpoint loads, byte for byte
    as saved, and each run's last line names its run dir and checkpoint."""
    last = _ok(train_py(tmp_path, *FIRST, "trainer.max_steps=4"))
    first = tmp_path / re.search(r"checkpoint: (\S+)/step_00000004$", last).group(1)
    run_dir = re.match(r"run dir: (\S+) \|", last).group(1)
    assert (tmp_path / run_dir / "summary.json").is_file() and " | train_loss " in last and " | val_loss " in last
    assert first.parent.name == "checkpoints" and first.name.startswith("gpt2_tiny-")
    saved = _files(first / "step_00000004")

    last = _ok(train_py(tmp_path, *FIRST, "model.num_layers=1", "trainer.max_steps=2"))
    other = tmp_path / re.search(r"checkpoint: (\S+)/step_00000002$", last).group(1)
    assert other != first and other.parent == first.parent  # another shape, another folder

    proc = train_py(tmp_path, *FIRST, "trainer.max_steps=2")
    assert _ok(proc).endswith(f"checkpoint: {first.relative_to(tmp_path)}/step_00000002")
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "step_00000004" in notes[0], proc.stderr
    aside = tmp_path / re.search(r" into (\S+): ", notes[0]).group(1)
    assert aside.parent == first / "earlier" and _files(aside / "step_00000004") == saved
    assert sorted(p.name for p in first.iterdir()) == ["earlier", "latest", "step_00000002"]
    for folder, layers, steps in ((aside, 2, 4), (other, 1, 2), (first, 2, 2)):
        model = load_model(folder)  # each folder's latest: the moved one has its own pointer
        meta = read_metadata(latest_checkpoint(folder))
        assert (meta["step"], meta["model"]["num_layers"]) == (steps, layers)
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 512)


def test_claim_folder_moves_aside_or_deletes_on_request(tmp_path: Path, capsys) -> None:
    class Ck:
        save, overwrite = True, False
        dir = str(tmp_path / "ck")

    def make(*steps: int) -> None:
        for step in steps:
            (tmp_path / "ck" / f"step_{step:08d}").mkdir(parents=True)

    def listing(path: Path) -> list[str]:
        return sorted(str(p.relative_to(path)) for p in path.rglob("*"))

    make(2, 4, 6)
    assert claim_folder(Ck, tmp_path / "ck" / "step_00000006") is None  # resumed from the newest: its own past
    aside = claim_folder(Ck, tmp_path / "ck" / "step_00000004")  # from an earlier step: 6 is another timeline
    assert listing(tmp_path / "ck") == ["earlier", f"earlier/{aside.name}", f"earlier/{aside.name}/latest",
                                        f"earlier/{aside.name}/step_00000006", "step_00000002", "step_00000004"]
    assert json.loads((aside / "latest").read_text()) == {"step": 6, "dir": "step_00000006"}
    again = claim_folder(Ck, None)  # a fresh run: everything goes aside, into a folder of its own
    assert again != aside and listing(again) == ["latest", "step_00000002", "step_00000004"]
    make(8)
    Ck.overwrite = True  # asked for: the other timeline is deleted, not moved
    assert claim_folder(Ck, None) is None and not (tmp_path / "ck" / "step_00000008").exists()
    assert len(listing(tmp_path / "ck" / "earlier")) == 7, "what was moved aside stays"
    err = capsys.readouterr().err
    assert "note: deleted another run's checkpoints from" in err and "step_00000008" in err


def test_default_checkpoint_dir_carries_the_shape() -> None:
    base = compose_config()
    assert base.checkpoint.dir == f"checkpoints/gpt2_tiny-{shape_digest(base.model, base.data)}"
    same = {compose_config("model.dropout=0.0", "model.seq_length=64").checkpoint.dir}  # resumable changes
    shapes = {compose_config(o).checkpoint.dir for o in ("model.num_layers=2", "model.hidden_size=128",
                                                        "data.vocab_size=8192", "model.vocab_size=1000")}
    assert same == {base.checkpoint.dir} and len(shapes) == 4 and base.checkpoint.dir not in shapes
    # README's examples name the default run's folder: they must be the folder a default run writes.
    assert f"{base.checkpoint.dir}/" in (ROOT / "README.md").read_text()


def _experiment_dir(tmp_path: Path) -> str:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_step: 10\n")
    return f"hydra.searchpath=[file://{tmp_path}]"


@pytest.mark.parametrize("form", ["+", "++", "experiment"])
def test_unknown_key_in_any_form_is_one_line_with_the_closest_key(form: str, tmp_path: Path) -> None:
    overrides = [f"{form}trainer.max_step=10"] if form != "experiment" else \
        ["+experiment=typo", _experiment_dir(tmp_path)]
    line = compose_error(CONF, ["logger=none", *overrides])
    assert line.startswith("config error: trainer.max_step: not a config key") and "\n" not in line
    assert line.endswith("did you mean trainer.max_steps?")
    if form != "experiment":  # what validate() says inside a sweep job or under torchrun
        with pytest.raises(ConfigError, match="did you mean trainer.max_steps") as info:
            compose_config(*overrides)
        assert info.value.key == "trainer.max_step"
    assert closest_key("trainer.lr") == "optimizer.lr" and closest_key("model.hiden_size") == "model.hidden_size"


@pytest.mark.parametrize("app", ["train", "plan"])
def test_key_inside_a_plan_group_is_one_line(app: str) -> None:
    # train.py's cluster / plan are null (OmegaConf asserts, naming no key); mtlm.plan validates a copy without
    # them, so it checks their keys itself.
    from mtlm.plan.__main__ import validate_plan

    line = compose_error(CONF, ["logger=none", "+cluster.foo=1"], *(("plan", validate_plan) if app == "plan" else ()))
    assert line.startswith("config error: cluster.foo: ") and "\n" not in line
    assert line.endswith("did you mean cluster.nodes?" if app == "plan" else "with the same overrides")


@pytest.mark.parametrize(("app", "key", "meant"), [("evaluate", "eval.overlapp", "eval.overlap"),
                                                   ("generate", "generate.topk", "generate.top_k")])
def test_eval_apps_reject_an_added_unknown_key(app: str, key: str, meant: str) -> None:
    # `+key` gets past Hydra's struct check: the app's validate function must refuse it, before any other key.
    from mtlm.eval import config as eval_config

    eval_config.register_eval_configs()
    schema = {"evaluate": eval_config.EvaluateConfig, "generate": eval_config.GenerateConfig}[app]
    line = compose_error(CONF, [f"+{key}=1"], app, getattr(eval_config, f"validate_{app}"), schema)
    assert line == f"config error: {key}: not a config key (mtlm/eval/config.py types them all); did you mean {meant}?"


@pytest.mark.slow
@pytest.mark.parametrize("args", [["+trainer.max_step=10"], ["-m", "+trainer.max_step=10,20"]])
def test_train_py_rejects_added_unknown_key_before_anything_starts(args: list[str], tmp_path: Path) -> None:
    line = _one_line(train_py(tmp_path, *args, "logger=none"))
    assert line == ("config error: trainer.max_step: not a config key (mtlm/config.py types them all); "
                    "did you mean trainer.max_steps?")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output, sweep or checkpoint dir"


@pytest.mark.slow
def test_bad_logger_mode_is_one_line(tmp_path: Path) -> None:
    line = _one_line(train_py(tmp_path, "logger.mode=bogus"))
    assert line.startswith("config error: logger.mode: must be online, offline or disabled") and "'bogus'" in line


def test_wandb_mode_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    from mtlm.metrics.sinks import build_logger

    cfg = compose_config("logger=wandb")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match="WANDB_MODE='bogus' is not a W&B mode"):
        validate(cfg)
    monkeypatch.setenv("WANDB_MODE", "")  # set but blank: unset, so offline (wandb itself rejects "")
    validate(cfg)
    logger = build_logger(cfg.logger, {"trainer": {"max_steps": 1}}, tmp_path)
    logger.close("ok")
    assert "WANDB_MODE" not in os.environ
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1


def _run_in_process(tmp_path: Path, *overrides: str):
    from mtlm.run import run

    cfg = compose_config(*SMALL_MODEL, "trainer.max_steps=2", "trainer.num_threads=1", "trainer.eval_iters=1",
                         f"checkpoint.dir={tmp_path / 'ck'}", *overrides)
    threads = torch.get_num_threads()
    try:
        run(cfg, str(tmp_path / "run"))
    finally:
        torch.set_num_threads(threads)


def test_run_ends_with_where_it_went(tmp_path: Path, small_data_cache, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MTLM_CACHE_DIR", small_data_cache)
    monkeypatch.chdir(tmp_path)
    _run_in_process(tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert last.startswith(f"run dir: run | steps 2 | train_loss {summary['train_loss']:.4f} | val_loss "
                           f"{summary['val_loss']:.4f} | {summary['tokens_per_s']:,.0f} tok/s | ")
    assert last.endswith(" | checkpoint: ck/step_00000002")
    assert oct((tmp_path / "ck" / "step_00000002" / "rank00000.safetensors").stat().st_mode & 0o777) == \
        oct(0o666 & ~_umask()), "checkpoint files get the umask's mode (safetensors alone makes them 0600)"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_run_summary_has_the_error(tmp_path: Path, small_data_cache, monkeypatch) -> None:
    """A failure before rank 0's logger exists (here W&B failing to start) still leaves the error in
    summary.json: the launching process completes it."""
    from mtlm.metrics import sinks

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setenv("MTLM_CACHE_DIR", small_data_cache)
    monkeypatch.setattr(sinks.WandbSink, "__init__", broken)
    with pytest.raises(OSError):
        _run_in_process(tmp_path, "logger=wandb")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == {"status": "failed", "error": "OSError: no space left on device"}
