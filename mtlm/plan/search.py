"""python -m mtlm.plan.search [train.py overrides] cluster=NAME devices=N [top=K]: the best layouts for N devices.

Enumerates tensor x pipeline x data = N (tensor inside a node, dividing the heads; pipeline dividing the
layers), micro-batch, activation recomputation, sequence parallelism and the interleaved schedule's chunks for
the configured model and global batch, plans each (mtlm.plan's model, so the same numbers as `python -m
mtlm.plan`), drops those that do not fit the device memory, and prints the fastest K with their memory and
step-time breakdown. The top layouts are run through train.py's validation before they are printed.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtlm.checks import compose_error
from mtlm.config import CONF_DIR, register_configs
from mtlm.errors import ConfigError
from mtlm.plan.__main__ import validate_plan
from mtlm.plan.planner import make_plan

MICRO_BATCHES = (1, 2, 4, 8)
VIRTUAL = (1, 2, 4)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(devices: int, per_node: int, heads: int, layers: int, seq: int, batch: int) -> Iterator[dict[str, Any]]:
    """Every layout train.py accepts for this shape on `devices` devices (the rules of mtlm/checks.py):
    t | heads and t <= devices per node (§3: a tensor group inside a server), P | layers, d = N/(t·P) | batch,
    b·d | batch; interleaving (V > 1) needs (P·V) | layers and m a multiple of P; sequence parallelism t > 1
    and t | seq."""
    for t in divisors(devices):
        if t > per_node or heads % t:
            continue
        for p in divisors(devices // t):
            if layers % p:
                continue
            d = devices // (t * p)
            for b in MICRO_BATCHES:
                if batch % (b * d):
                    continue
                m = batch // (b * d)
                for v in VIRTUAL if p > 1 else (1,):
                    if layers % (p * v) or (v > 1 and m % p):
                        continue
                    for recompute in (True, False):
                        for sp in (False, True) if t > 1 and seq % t == 0 else (False,):
                            yield {"tensor": t, "pipeline": p, "data": d, "micro_batch_size": b, "virtual_stages": v,
                                   "recompute": recompute, "sequence": sp}


def layout_config(cfg: DictConfig, lay: dict[str, Any]) -> DictConfig:
    out = copy.deepcopy(cfg)
    out.parallel.tensor, out.parallel.pipeline, out.parallel.data = lay["tensor"], lay["pipeline"], lay["data"]
    out.parallel.virtual_stages, out.parallel.sequence = lay["virtual_stages"], lay["sequence"]
    out.parallel.schedule = "interleaved_1f1b" if lay["virtual_stages"] > 1 else "1f1b"
    out.trainer.micro_batch_size, out.trainer.activation_checkpointing = lay["micro_batch_size"], lay["recompute"]
    out.trainer.shard_optimizer = False  # not with a pipeline (mtlm/checks.py); a layout option left out here
    return out


def search(cfg: DictConfig, devices: int, top: int = 5) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(the `top` fastest valid layouts that fit, counts: enumerated / fit / validated)."""
    per_node = cfg.cluster.devices_per_node
    if per_node is None or devices > per_node * cfg.cluster.nodes:
        raise ConfigError("devices", f"{devices} devices, but cluster {cfg.cluster.name} has "
                          f"{cfg.cluster.nodes} node(s) x {per_node}")
    m = cfg.model
    plans = []
    counts = {"layouts": 0, "fit": 0, "validated": 0}
    for lay in layouts(devices, per_node, m.num_attention_heads, m.num_layers, m.seq_length,
                       cfg.trainer.global_batch_size):
        counts["layouts"] += 1
        plan = make_plan(layout_config(cfg, lay))
        if plan["fits"]:
            plans.append((plan, lay))
    counts["fit"] = len(plans)
    plans.sort(key=lambda pl: -pl[0]["tokens_per_s"])
    best = []
    for plan, lay in plans:  # train.py's own validation, for the ones printed
        try:
            validate_plan(layout_config(cfg, lay))
        except ConfigError:
            continue
        counts["validated"] += 1
        best.append(plan)
        if len(best) == top:
            break
    return best, counts


def row(plan: dict[str, Any]) -> str:
    parts, mem = plan["step_time_parts_s"], plan["memory_parts_gb"]
    v = f"x{plan['virtual_stages']}" if plan["virtual_stages"] > 1 else ""
    step = ", ".join(f"{k.replace('_', ' ')} {v_:.3g}" for k, v_ in parts.items() if v_)
    return (f"| {plan['tensor']} x {plan['pipeline']}{v} x {plan['data']} | {plan['micro_batch_size']} | "
            f"{plan['micro_batches']} | {'yes' if plan['recompute'] else 'no'} | "
            f"{'yes' if plan['sequence_parallel'] else 'no'} | {plan['tokens_per_s']:,.0f} | "
            f"{plan['tflops_per_device']:.1f} | {plan['step_time_s']:.3g}: {step} | "
            f"{plan['memory_per_device_gb']:.1f} (params {mem['params']:.1f}, optimizer {mem['optimizer']:.1f}, "
            f"activations {mem['activations']:.1f}) |")


def main(argv: list[str]) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(("devices=", "top="))}
    overrides = [a for a in argv if not a.startswith(("devices=", "top="))]
    if "devices" not in opts:
        print("config error: devices: say how many, e.g. devices=512", file=sys.stderr)
        return 2
    register_configs()
    err = compose_error(CONF_DIR, ["logger=none", *overrides], "plan", validate_plan)
    if err:
        print(err, file=sys.stderr)
        return 2
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="search"):
        cfg = compose(config_name="plan", overrides=["logger=none", *overrides])
    OmegaConf.set_struct(cfg, False)
    start = time.perf_counter()
    try:
        best, counts = search(cfg, int(opts["devices"]), int(opts.get("top", 5)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    print(f"{cfg.model.name} on {opts['devices']} x {cfg.cluster.device} ({cfg.cluster.name}), global batch "
          f"{cfg.trainer.global_batch_size}, seq {cfg.model.seq_length}: {counts['layouts']} layouts, "
          f"{counts['fit']} fit, searched in {took:.1f} s (PREDICTED by mtlm.plan's model)\n")
    print("| tensor x pipeline x data | micro-batch | m | recompute | seq. parallel | tokens/s | TFLOP/s per "
          "device | step (s): parts | memory per device (GB) |\n|---|--:|--:|---|---|--:|--:|---|---|")
    print("\n".join(row(p) for p in best) if best else "(no layout fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
