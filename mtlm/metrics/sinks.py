"""Where logged metrics go: a console line, metrics.jsonl + summary.json in the run dir, and W&B.

Only rank 0 builds a logger (the caller ensures that). Every sink gets the same calls:
    log(step, {"train/loss": 3.2, ...})   one row per call
    summary({...})                         end-of-run numbers (final loss, mean throughput, ...)
    close(status)                          "ok", or anything else for a failed run; safe to call twice
W&B is offline unless told otherwise (logger.mode, else $WANDB_MODE), so nothing needs an account or network.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mtlm.errors import ConfigError

# Console fields in print order: (accepted keys, first wins; formatter). Keys not listed here still go to
# metrics.jsonl and W&B, just not to the one-line console summary.
CONSOLE_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("train/loss", "loss"), lambda v: f"loss {v:.4f}"),
    (("val/loss", "val_loss"), lambda v: f"val {v:.4f}"),
    (("mlm_loss",), lambda v: f"mlm {v:.4f}"),  # BERT (train/objective.py): the two terms of its loss
    (("sop_acc",), lambda v: f"sop acc {v:.2f}"),
    (("val_mlm_loss",), lambda v: f"val mlm {v:.4f}"),
    (("val_sop_acc",), lambda v: f"val sop acc {v:.3f}"),
    (("train/lr", "lr"), lambda v: f"lr {v:.1e}"),
    (("train/grad_norm", "grad_norm"), lambda v: f"gnorm {v:.2f}"),
    (("train/loss_scale", "loss_scale"), lambda v: f"scale {v:g}"),
    (("perf/iter_time_s", "iter_time_s", "step_time_s"), lambda v: f"{v * 1e3:,.0f} ms/it"),
    (("perf/tokens_per_s", "tokens_per_s"), lambda v: f"{v:,.0f} tok/s"),
    (("perf/tflops_per_device", "tflops_per_device"), lambda v: f"{v:.3f} TFLOP/s/dev"),
    (("perf/mfu", "mfu"), lambda v: f"mfu {100 * v:.1f}%"),
)


def _plain(value: Any, json_safe: bool = True) -> Any:
    """Tensors / numpy scalars -> Python numbers. For JSON files NaN/inf -> None (strict JSON); W&B keeps NaN."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if json_safe and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain_dict(d: Mapping[str, Any], json_safe: bool = True) -> dict[str, Any]:
    return {str(k): (_plain_dict(v, json_safe) if isinstance(v, Mapping) else _plain(v, json_safe))
            for k, v in d.items()}


class Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...
    def summary(self, d: Mapping[str, Any]) -> None: ...
    def close(self, status: str) -> None: ...


class ConsoleSink:
    """One compact progress line per logged step, e.g. `step    20/200 | loss 5.1234 | lr 5.9e-04`."""

    def __init__(self, total_steps: int | None = None, stream: Any = None) -> None:
        self.total_steps = total_steps
        self.stream = stream  # None: sys.stdout at print time (so pytest's capsys sees it)

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        width = max(5, len(str(self.total_steps or "")))
        head = f"step {step:>{width}}" + (f"/{self.total_steps}" if self.total_steps else "")
        parts = [head]
        for keys, fmt in CONSOLE_FIELDS:
            value = next((metrics[k] for k in keys if k in metrics), None)
            if value is None:
                continue
            if hasattr(value, "item"):
                value = value.item()
            parts.append(fmt(value))  # NaN prints as "loss nan": a diverged run should be visible
        return " | ".join(parts)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        print(self.format(step, metrics), file=self.stream or sys.stdout, flush=True)

    def summary(self, d: Mapping[str, Any]) -> None:
        pass  # summary.json and W&B hold it; the training loop prints its own closing line

    def close(self, status: str) -> None:
        pass


class JsonlSink:
    """metrics.jsonl (one object per log call, flushed per line) and summary.json (rewritten atomically)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary_path = self.dir / "summary.json"
        # Append: a restarted run (trainer.max_restarts) continues the same file instead of erasing it.
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # closed in close()
        self._summary: dict[str, Any] = {}

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        row = {"step": step, **_plain_dict(metrics), "wall_time": round(time.time(), 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crash loses at most the line being written

    def summary(self, d: Mapping[str, Any]) -> None:
        self._summary.update(_plain_dict(d))
        self._write_summary("running")

    def _write_summary(self, status: str) -> None:
        tmp = self.summary_path.with_name(f"{self.summary_path.name}.tmp")
        tmp.write_text(json.dumps({**self._summary, "status": status}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.summary_path)  # readers (sweep reports) never see half a file

    def close(self, status: str) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._write_summary(status)


def wandb_mode(cfg_mode: str | None) -> str:
    """The config wins, then $WANDB_MODE, then offline: W&B never needs an account or network by default.

    A blank $WANDB_MODE (set but empty) counts as unset, and is removed from the environment: wandb reads the
    variable itself and rejects an empty one with a traceback, whatever mode it is given."""
    env = os.environ.get("WANDB_MODE")
    if env is not None and not env.strip():
        del os.environ["WANDB_MODE"]
        env = None
    return cfg_mode or env or "offline"


class WandbSink:
    """A W&B run; offline runs land in <out_dir>/wandb/offline-run-*/ for a later `wandb sync`."""

    def __init__(self, cfg_logger: Any, run_config: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
        import wandb  # lazily: ~0.5 s, and logger=none runs should not pay it

        os.makedirs(out_dir, exist_ok=True)
        self.mode = wandb_mode(_get(cfg_logger, "mode", None))
        self._row_open = False  # a log() row W&B has not written yet (see summary())
        settings = wandb.Settings(
            console="off",  # no stdout/stderr wrapping: our console line is the log
            disable_git=True,
            x_disable_stats=True,  # no system-metrics sampler thread
            silent=True,
            # Hydra's basic launcher runs sweep jobs in one process: never silently reuse an earlier run.
            reinit="finish_previous",
        )
        self.run = wandb.init(
            project=_get(cfg_logger, "project", None) or "mtlm",
            group=_get(cfg_logger, "group", None),
            name=_get(cfg_logger, "run_name", None),
            tags=[str(t) for t in (_get(cfg_logger, "tags", None) or [])],
            config=dict(run_config),
            dir=str(out_dir),
            mode=self.mode,
            settings=settings,
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_plain_dict(metrics, json_safe=False), step=step)
            self._row_open = True

    def summary(self, d: Mapping[str, Any]) -> None:
        if self.run is not None:
            # Write the last step's row first: W&B keeps a row open for more log() calls at the same step and,
            # left open, writes it at finish, after this update, so the summary's run averages (tokens_per_s,
            # tflops_per_device) would read as the last step's values.
            if self._row_open:
                self.run.log({}, commit=True)
                self._row_open = False
            self.run.summary.update(_plain_dict(d, json_safe=False))

    def close(self, status: str) -> None:
        run, self.run = self.run, None  # first, so a second close (or one from a finally) is a no-op
        if run is None:
            return
        import wandb

        try:
            run.summary["status"] = status
        finally:
            run.finish(exit_code=0 if status == "ok" else 1)
            # finish() returns before wandb-core has flushed the .wandb file (0.31, seen on a loaded machine:
            # only the 7-byte header on disk). Tearing the service down waits for the flush (~20 ms), so the
            # run is complete on disk when close() returns: sweep reports and tests may read it right away.
            # The next init starts a fresh service. teardown() calls sys.exit() if the service died badly;
            # a broken W&B service must not end the training process, so that is only reported.
            try:
                wandb.teardown()
            except SystemExit as err:
                print(f"warning: wandb service exited with {err.code}", file=sys.stderr, flush=True)


class MetricsLogger:
    """Fans every call out to its sinks. Use as a context manager or call close() from a finally block."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def summary(self, d: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(d)

    def close(self, status: str = "ok") -> None:
        """Close every sink even if one fails, and never raise: this runs while an exception propagates."""
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as err:  # reported, not raised: would mask the real error
                print(f"warning: closing {type(sink).__name__} failed: {err!r}", file=sys.stderr, flush=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        self.close("ok" if exc_type is None else "failed")


def _get(cfg: Any, key: str, default: Any) -> Any:
    """Field of a dataclass, DictConfig or plain dict."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def build_logger(logger_cfg: Any, run_config: Mapping[str, Any], out_dir: str | os.PathLike,
                 total_steps: int | None = None) -> MetricsLogger:
    """Console + metrics.jsonl always; plus W&B when logger.name == "wandb".

    `run_config` should be a plain dict (OmegaConf.to_container(cfg, resolve=True)); a DictConfig is converted.
    `total_steps` (for "step 20/200") defaults to run_config["trainer"]["max_steps"] when present.
    """
    if not isinstance(run_config, dict):
        from omegaconf import OmegaConf

        run_config = OmegaConf.to_container(run_config, resolve=True)  # type: ignore[assignment]
    if total_steps is None:
        trainer = run_config.get("trainer")
        total_steps = trainer.get("max_steps") if isinstance(trainer, Mapping) else None
    name = _get(logger_cfg, "name", "none")
    if name not in ("wandb", "none"):
        raise ValueError(f"logger.name must be wandb or none, got {name!r}")
    sinks: list[Sink] = [ConsoleSink(total_steps), JsonlSink(out_dir)]
    if name == "wandb":
        try:
            sinks.append(WandbSink(logger_cfg, run_config, out_dir))
        except BaseException:
            sinks[1].close("failed")
            raise
    return MetricsLogger(sinks)


def check_logger_config(logger: Any) -> None:
    """logger.name (called by mtlm.checks.validate; logger.mode: mtlm/config_checks.py, before anything else)."""
    if logger.name not in ("wandb", "none"):
        raise ConfigError("logger.name", f"must be wandb or none, got {logger.name!r}")
