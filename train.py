"""Train a GPT-2 with tensor x data parallelism. `python train.py --help` lists the config groups.

    python train.py                                   # gpt2_tiny on the built-in corpus, CPU, a few minutes
    python train.py parallel.tensor=2 parallel.data=2 # spawns 4 ranks here (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 8 train.py model=gpt2_1.2b parallel.tensor=8 hydra.run.dir=outputs/x
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtlm.config import register_configs
from mtlm.rank_env import is_rank_zero

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from mtlm.run import run

    hydra_cfg = HydraConfig.get()
    run(cfg, hydra_cfg.runtime.output_dir if hydra_cfg.output_subdir is not None else None)


def _quiet_non_main_rank() -> None:
    """Under torchrun / SLURM every rank runs this script. Only rank 0 may write Hydra's outputs: the others
    get no output dir, no .hydra/ and no log file, so they never race rank 0 (hydra#2070)."""
    if not is_rank_zero() and not any(a in ("-m", "--multirun") for a in sys.argv):
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null",
                     "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _check_overrides() -> None:
    """Bad keys, types and presets: one line and exit 2, instead of Hydra's multi-line report. A multirun is
    checked job by job (as the basic sweeper expands it) before Hydra makes a sweep dir."""
    args = [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):  # --help, --cfg ...: leave to Hydra
        return
    from mtlm.checks import compose_error  # deferred: torch loads only once the overrides parse
    from mtlm.config_checks import sweep_jobs

    jobs = sweep_jobs(args) if len(args) < len(sys.argv) - 1 else [args]
    for job in jobs:
        # The tree beside this script, the one @hydra.main composes (mtlm.config.CONF_DIR is the same folder
        # seen from the package, as the other apps use it).
        error = compose_error(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"), job)
        if error:
            print(error, file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    _check_overrides()
    _quiet_non_main_rank()
    main()
