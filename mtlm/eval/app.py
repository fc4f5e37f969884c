"""What the evaluate and generate apps share: the one-line override check, quiet non-main ranks under
torchrun / SLURM, one-line exits for bad input, and a rank's process setup (as train.py does them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mtlm.checkpoint.format import read_metadata
from mtlm.checks import compose_error
from mtlm.config import CONF_DIR
from mtlm.errors import CheckpointError, ConfigError, DataError, error_kind
from mtlm.eval.loading import load_gpt
from mtlm.parallel.denormals import flush_warning
from mtlm.parallel.launch import RankEnv, backend_for, rank_device, threads_per_rank
from mtlm.parallel.state import ParallelState
from mtlm.rank_env import is_rank_zero

BAD_INPUT = (ConfigError, DataError, CheckpointError)
# When this process started (before Hydra made the run's folder), less a second for coarse file timestamps.
STARTED = time.time() - 1.0
# What Hydra itself writes into a run folder: its configs and the job's log.
HYDRA_FILES = (".hydra", "evaluate.log", "generate.log")


def check_overrides(config_name: str, check: Callable[[Any, int | None], None], schema: Any) -> None:
    """Bad keys, types, values: one line and exit 2, before Hydra makes an output dir (as train.py). `schema`:
    the app's root dataclass, which a misspelled key's closest valid one comes from."""
    args = sys.argv[1:]
    if any(a.startswith("-") for a in args):  # --help, --cfg ...: Hydra's own
        return
    error = compose_error(CONF_DIR, args, config_name, check, schema)
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    if not is_rank_zero():  # under torchrun / SLURM only rank 0 writes Hydra's outputs (see train.py)
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]


def remove_unused_run_dir(out_dir: str | None) -> None:
    """A run that failed before writing anything leaves no folder behind (issue 25: outputs/... stayed, empty):
    `out_dir` is removed when it holds only Hydra's own files, all written by this process, and so are the
    folders above it that it leaves empty and that changed during this run (Hydra made them for it), up to the
    launch dir. A folder holding anything else is left alone."""
    if out_dir is None or not os.path.isdir(out_dir):
        return
    entries = os.listdir(out_dir)
    if any(e not in HYDRA_FILES or os.stat(os.path.join(out_dir, e)).st_mtime < STARTED for e in entries):
        return
    if os.stat(out_dir).st_mtime < STARTED:
        return
    folder, stop = os.path.abspath(out_dir), os.getcwd()
    while True:
        parent = os.path.dirname(folder)
        parent_changed = os.stat(parent).st_mtime >= STARTED
        shutil.rmtree(folder) if folder == os.path.abspath(out_dir) else os.rmdir(folder)
        if parent == stop or not parent.startswith(stop + os.sep) or os.listdir(parent) or not parent_changed:
            return
        folder = parent


def exit_bad_input(err: Exception, out_dir: str | None = None) -> None:
    """One line and exit status 2; the run's output folder, still empty, is removed."""
    kind = error_kind(err)
    remove_unused_run_dir(out_dir)
    print(f"{kind} error: {err}", file=sys.stderr)
    sys.exit(2)


def rank_state(env: RankEnv, tensor: int, device: str, num_threads: int | None, backend: str,
               timeout_s: float) -> ParallelState:
    """This rank's threads, device and place in the tensor group (data degree 1)."""
    torch.set_num_threads(threads_per_rank(env.local_world_size, num_threads))
    if line := flush_warning():
        print(f"rank {env.rank}: {line}", file=sys.stderr, flush=True)
    dev = rank_device(device, env.local_rank)
    return ParallelState.initialize(tensor, 1, env.rank, env.world_size, dev, backend_for(backend, dev), timeout_s)


@contextlib.contextmanager
def rank_model(env: RankEnv, cfg_dict: dict, section: str, step_dir: str) -> Iterator[tuple[Any, ParallelState, Any]]:
    """(config, parallel state, this rank's slices of the checkpoint's GPT) in a spawned rank; the process
    group is torn down on exit. `section`: the app's options (eval / generate), naming device and threads."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_dict)
    opts = cfg[section]
    state = rank_state(env, cfg.parallel.tensor, opts.device, opts.num_threads, cfg.parallel.backend,
                       cfg.parallel.timeout_s)
    try:
        yield cfg, state, load_gpt(step_dir, read_metadata(step_dir), state)
    finally:
        state.destroy()


def check_heads(model: dict[str, Any], tensor: int) -> None:
    """parallel.tensor must divide the checkpoint's heads: each rank owns whole heads (§3)."""
    if model["num_attention_heads"] % tensor:
        raise ConfigError("parallel.tensor", f"{tensor} does not divide the checkpoint's "
                          f"{model['num_attention_heads']} attention heads (each rank owns whole heads, §3)")
