"""python -m mtlm.plan [any train.py overrides] cluster=NAME [plan.calibrate=true]

A Hydra app over train.py's config tree (conf/plan.yaml = conf/config.yaml + a `cluster` + `plan`): the same
overrides, the same validation and one-line errors, and `-m` sweeps (the experiments' scaling report is then
made from the predictions). Prints a table and writes plan.json into the output dir. docs/planner.md.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtlm.checks import compose_error, validate
from mtlm.config import CONF_DIR, register_configs
from mtlm.config_checks import check_known_keys, sweep_jobs
from mtlm.errors import ConfigError
from mtlm.parallel.state import Grid
from mtlm.plan import probe  # module, not names: tests stand in for its probes
from mtlm.plan.planner import GRAD_ALLREDUCE, check_layout, make_plan

register_configs()


def validate_plan(cfg: Any, world_size: int | None = None) -> None:
    """train.py's validate() on the planned config, as if a launcher had started its tensor x data ranks on
    the cluster (this machine's GPUs do not matter), then the cluster's own checks."""
    check_known_keys(cfg)  # here, as validate() below sees a copy without cluster / plan (+cluster.foo=1)
    if cfg.cluster is None:
        raise ConfigError("cluster", "pick one: cluster=dgx2h_v100 | dgx_a100 | dgx_h100 | selene_a100 | cpu_local")
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(copy, False)
    copy.cluster, copy.plan = None, None  # train.py's validate() refuses them: they are this app's
    if cfg.cluster.device != "cpu":
        copy.trainer.device = "auto"  # planning a GPU cluster from a CPU machine is the point
    validate(copy, Grid.of(cfg.parallel).world)
    c = cfg.cluster
    if c.nodes < 1:
        raise ConfigError("cluster.nodes", f"must be >= 1, got {c.nodes}")
    if c.get("grad_allreduce", "overlapped") not in GRAD_ALLREDUCE:
        raise ConfigError("cluster.grad_allreduce", f"must be one of {' | '.join(GRAD_ALLREDUCE)}, got "
                          f"{c.grad_allreduce!r}")
    if c.device == "cpu" and cfg.trainer.device == "cuda":
        raise ConfigError("trainer.device", f"cluster {c.name} has CPU devices only")
    per_node = c.devices_per_node or probe.cores()
    check_layout(cfg, {"name": c.name, "devices": per_node * c.nodes, "nodes": c.nodes,
                       "devices_per_node": per_node, "device_memory_gb": c.device_memory_gb or probe.ram_gb()})


def table(plan: dict[str, Any]) -> str:
    gb, parts, cal = plan["memory_parts_gb"], plan["step_time_parts_s"], plan["calibration"]
    fit = "fits" if plan["fits"] else f"DOES NOT FIT by {-plan['memory_margin_gb']:.2f} GB"
    rows = [
        ("config", f"{plan['model']} ({plan['family']}), tensor {plan['tensor']} x data {plan['data']} x pipeline "
                   f"{plan.get('pipeline', 1)} = "
                   f"{plan['devices']} devices, {plan['precision']}, recompute {plan['recompute']}, "
                   f"{plan['optimizer'].rsplit('.', 1)[-1]}{' (ZeRO-1)' if plan['shard_optimizer'] else ''}"),
        ("cluster", f"{plan['cluster']} ({plan['device']})"),
        ("parameters", f"{plan['params_total']:,} total, {plan['params_per_rank']:,} per tensor rank"
                       + (f", {plan['params_per_device']:,} on the largest pipeline stage" if plan['pipeline'] > 1
                          else "")),
        ("vocabulary", f"{plan['vocab_size']:,} ({plan.get('vocab_source', 'model.vocab_size')}), padded to "
                       f"{plan['padded_vocab_size']:,}"),
        ("memory / device", f"{plan['memory_per_device_gb']:.2f} GB of {plan['device_memory_gb']:.1f} ({fit}): "
                            f"params {gb['params']:.2f}, grads {gb['grads']:.2f}, optimizer {gb['optimizer']:.2f}, "
                            f"activations {gb['activations']:.2f}"),
        ("step time", f"{plan['step_time_s'] * 1e3:,.1f} ms: " + ", ".join(
            f"{k.replace('_', ' ')} {v * 1e3:,.1f}" for k, v in parts.items() if v or k == "compute")),
        ("throughput", f"{plan['tflops_per_device']:.4g} TFLOP/s per device, {plan['pflops']:.4g} PFLOP/s, "
                       f"{plan['tokens_per_s']:,.0f} tokens/s, MFU {100 * plan['mfu']:.1f}%"),
        ("vs calibration", f"{100 * plan['efficiency_vs_calibration']:.1f}% of {cal['tflops_per_device']:.4g} "
                           f"TFLOP/s per device (eta {plan['eta']:.3f}; {cal['source']})"),
    ]
    if plan.get("gemm_tflops_per_core"):
        rates = plan["gemm_tflops_per_core"]
        rows.append(("GEMM per core", ", ".join(f"{k} {v * 1e3:.3g} GFLOP/s" for k, v in rates.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n(predicted: python -m mtlm.plan)"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    try:
        validate_plan(cfg)
        plan = make_plan(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    out_dir = HydraConfig.get().runtime.output_dir
    with open(os.path.join(out_dir, "plan.json"), "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    print(table(plan), flush=True)
    print(f"wrote {os.path.join(out_dir, 'plan.json')}", flush=True)


def _check_overrides() -> None:
    """As train.py: bad keys, presets and values are one line (exit 2) before Hydra makes a dir; a multirun
    is checked job by job."""
    args = [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        return
    jobs = sweep_jobs(args) if len(args) < len(sys.argv) - 1 else [args]
    for job in jobs:
        error = compose_error(CONF_DIR, job, "plan", validate_plan)
        if error:
            print(error, file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    _check_overrides()
    main()
