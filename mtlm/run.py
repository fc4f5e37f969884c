"""Entry point behind train.py: validate, prepare data once, check the checkpoint to resume from, launch the
ranks (again, after a rank dies, when trainer.max_restarts allows), train on each.

It sits beside the entry points (docs/architecture.md): it runs the check-everything function (mtlm/checks.py)
and asks the planner for its precision warning, both above mtlm.train."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from mtlm.checkpoint.format import METADATA
from mtlm.checks import validate
from mtlm.data.build import build_data, prepare_data
from mtlm.errors import CheckpointError, ConfigError, DataError, error_kind
from mtlm.parallel import preempt
from mtlm.parallel.denormals import flush_denormals, flush_warning
from mtlm.parallel.launch import RankEnv, backend_for, launch, rank_device, threads_per_rank
from mtlm.parallel.state import Grid, ParallelState
from mtlm.parallel.watchdog import Heartbeat, RankHung, check_master, hosts_own_store
from mtlm.plan.planner import precision_warning
from mtlm.rank_env import detect_rank_env, env_world_size, is_rank_zero
from mtlm.train.checkpoint import check_before_launch, latest_checkpoint
from mtlm.train.loop import train
from mtlm.train.outcome import error_line, final_line, record_failure
from mtlm.train.writer_lock import WriterLock


def _worker(env: RankEnv, cfg_dict: dict, out_dir: str | None) -> None:
    preempt.install()  # a spawned rank: record SIGTERM / SIGUSR1, stop after the step (parallel/preempt.py)
    cfg = OmegaConf.create(cfg_dict)
    torch.set_num_threads(threads_per_rank(env.local_world_size, cfg.trainer.num_threads))
    if line := flush_warning():
        print(f"rank {env.rank}: {line}", file=sys.stderr, flush=True)
    device = rank_device(cfg.trainer.device, env.local_rank, env.local_world_size)
    backend = backend_for(cfg.parallel.backend, device)
    p = cfg.parallel
    state = ParallelState.initialize(p.tensor, p.data, env.rank, env.world_size, device, backend, p.timeout_s,
                                     pipeline=p.pipeline, sequence=p.sequence)
    beat = Heartbeat(env.rank, env.world_size, p.timeout_s) if env.world_size > 1 else None
    try:
        train(cfg, state, out_dir if state.is_main else None, cfg_dict)
    except Exception as err:  # a collective timed out: name the rank that stopped, if one did
        if beat is not None and (line := beat.diagnose(err)):
            raise RankHung(line) from None
        raise
    finally:
        if beat is not None:
            beat.stop()
    # Only after success: a failed rank with peers keeps its group open until its process exits, after
    # torch.multiprocessing has written its error, so the launcher's root cause (the first error written,
    # launch._root_cause) is this rank's and not a peer's "connection closed".
    state.destroy()


def run(cfg: DictConfig, out_dir: str | None) -> None:
    """Validate everything, then train. Bad input exits with status 2 and one line, before any spawn.

    The launching process (rank 0 under torchrun / SLURM) holds checkpoint.dir's writer lock from before it
    looks into the folder until the run ends (train/writer_lock.py)."""
    flush_denormals()  # before any torch op starts the thread pool: its threads inherit the mode (issue 26)
    held: list[WriterLock] = []
    try:
        _run(cfg, out_dir, held)
    finally:
        for lock in held:
            lock.release()


def _run(cfg: DictConfig, out_dir: str | None, held: list[WriterLock]) -> None:
    try:
        validate(cfg, env_world_size())
        if (env := detect_rank_env(os.environ)) is not None and not hosts_own_store(env.rank, os.environ):
            # Several nodes: the master must not be loopback and its store must answer, in a bounded time.
            check_master(env.master_addr, env.master_port, env.world_size > env.local_world_size,
                         min(float(cfg.parallel.timeout_s), 60.0))
        prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size, cfg.trainer.seed)
        ck = cfg.get("checkpoint")
        if ck is not None and ck.save and is_rank_zero():
            # Before check_before_launch reads (and may reorganise) the folder.
            held.append(WriterLock(ck.dir, out_dir).acquire())
        data = functools.cache(lambda: build_data(cfg.data, cfg.model.seq_length, cfg.trainer.seed))
        resume = check_before_launch(cfg, lambda: cfg.model.vocab_size or data().tokenizer.vocab_size,
                                     lambda: data().tokenizer)
    except (ConfigError, DataError, CheckpointError) as err:
        kind = error_kind(err)
        record_failure(out_dir, f"{kind} error: {err}")  # a multirun / torchrun job: Hydra made the dir already
        print(f"{kind} error: {err}", file=sys.stderr)
        sys.exit(2)
    if is_rank_zero() and (line := precision_warning(cfg)):
        print(line, file=sys.stderr, flush=True)  # e.g. bf16 on a CPU without native bf16 (issue 11)
    cfg_dict: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # picklable for spawned ranks
    cfg_dict["checkpoint"]["resume"] = resume  # resolved once here, so every rank and restart agrees
    previous = preempt.install()  # ranks in this process (one rank, torchrun, SLURM) stop cleanly on a signal
    try:
        launch(_worker, Grid.of(cfg.parallel).world, (cfg_dict, out_dir), cfg.trainer.max_restarts,
               _restarter(cfg_dict, out_dir), device=cfg.trainer.device)
        sig = _stopped_by(out_dir)
    except (CheckpointError, RankHung, mp.ProcessRaisedException) as err:
        # A checkpoint that passed the checks above but fails to read inside a rank: still one line.
        line = str(err).strip().splitlines()[-1]
        if isinstance(err, RankHung) or "RankHung: " in line:  # a stopped / lost rank, named (watchdog.py)
            record_failure(out_dir, f"error: {line.split('RankHung: ', 1)[-1]}")
            print(f"error: {line.split('RankHung: ', 1)[-1]}", file=sys.stderr, flush=True)
            sys.exit(1)
        if not isinstance(err, CheckpointError) and "CheckpointError: " not in line:
            record_failure(out_dir, error_line(err))
            raise
        record_failure(out_dir, f"checkpoint error: {line.split('CheckpointError: ', 1)[-1]}")
        print(f"checkpoint error: {line.split('CheckpointError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except BaseException as err:  # summary.json says why, whichever rank failed and however early
        record_failure(out_dir, error_line(err))
        raise
    finally:
        preempt.restore(previous)
        preempt.reset()
    if out_dir is not None:  # the last line: where the run went (Hydra's dir), its numbers, its checkpoint
        print(final_line(out_dir, cfg_dict["checkpoint"]), flush=True)
    if sig:  # stopped early by a signal, checkpoint saved: not a success, and maybe a SLURM requeue
        if is_rank_zero() and (line := preempt.requeue_slurm_job(sig)):
            print(line, file=sys.stderr, flush=True)
        sys.exit(preempt.exit_status(sig))


def _stopped_by(out_dir: str | None) -> int:
    """The stop signal that ended the run before its last step, or 0: known in this process when the ranks
    ran here, else from rank 0's summary.json (ranks we spawned)."""
    if preempt.stopped_step() is not None:
        return preempt.received()
    try:
        name = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8")).get("stopped_by")
    except (TypeError, OSError, ValueError):
        return 0
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else 0


def _checkpoint_id(directory: str) -> tuple[str, int] | None:
    latest = latest_checkpoint(directory)
    return None if latest is None else (str(latest), (latest / METADATA).stat().st_mtime_ns)


def _restarter(cfg_dict: dict, out_dir: str | None):
    """trainer.max_restarts: after a rank dies, resume from the newest checkpoint this run saved, or, when it
    saved none yet, from where the first attempt started (not from an older run's checkpoint in the dir)."""
    ck = cfg_dict["checkpoint"]
    before, first = _checkpoint_id(ck["dir"]), ck["resume"]

    def on_restart(attempt: int, err: Exception) -> tuple:
        now = _checkpoint_id(ck["dir"])
        target = now[0] if now is not None and now != before else first
        reason = str(err).strip().splitlines()[-1]
        print(f"rank failure ({reason}); restart {attempt}/{cfg_dict['trainer']['max_restarts']} from "
              f"{target if target != 'none' else 'the beginning'}", file=sys.stderr, flush=True)
        return ({**cfg_dict, "checkpoint": {**ck, "resume": target}}, out_dir)

    return on_restart
