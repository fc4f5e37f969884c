"""Memory per device (issue 5): measured byte counts next to the analytic prediction.

    python -m mtlm.bench.memory [--json out.json] [key=value ...]

For gpt2_tiny and a wider CPU model, with activation checkpointing off and on and optimizer sharding off and
on, it runs one real `Trainer.train_step()` on 2 data-parallel gloo ranks and prints what each device holds,
counted exactly from the tensors (mtlm/metrics/memory.py): parameters, gradients, optimizer state,
activations saved for backward, and, with checkpointing, the working set of the one layer being recomputed
(measured by running one layer without checkpointing). "per device" is the larger of the two ranks.

The prediction is the formula of memory.py for the same shapes in fp32. A second table evaluates the same
formulas at the paper's settings (fp16 with fp32 master weights, batch 8, sequence 1024, §5.1's weak-scaling
models) to show why the paper checkpoints activations. Extra `key=value` arguments are Hydra overrides
applied to every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mtlm.checks import validate
from mtlm.config import CONF_DIR, register_configs
from mtlm.data.build import build_data, prepare_data
from mtlm.metrics.memory import (
    SavedActivations,
    activation_bytes,
    activation_bytes_per_layer,
    model_state_bytes,
    parameters_per_device,
    storage_bytes,
)
from mtlm.parallel.launch import RankEnv, launch
from mtlm.parallel.layers import pad_vocab_size
from mtlm.parallel.state import Grid, ParallelState
from mtlm.train.loop import Trainer

DATA = 2  # data-parallel ranks: sharding needs some, and both sides of the comparison use the same layout
MICRO_BATCH = 8  # sequences per rank per micro-batch
MODELS = {
    "gpt2_tiny": ["model=gpt2_tiny"],
    "wide": ["model=gpt2_tiny", "model.name=cpu_wide", "model.num_layers=8", "model.hidden_size=512",
             "model.num_attention_heads=8", "model.seq_length=256", "model.max_position_embeddings=256",
             "model.dropout=0.1"],
}
PAPER = [("gpt2_1.2b", 1), ("gpt2_2.5b", 2), ("gpt2_4.2b", 4), ("gpt2_8.3b", 8)]  # §5.1 weak scaling, batch 8
MIB, GB = 2**20, 1e9


def compose_config(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="bench_memory"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    validate(cfg, world_size=Grid.of(cfg.parallel).world)
    return cfg


def _run_config(model: str, checkpointing: bool, shard: bool, extra: list[str]) -> Any:
    return compose_config([*MODELS[model], f"parallel.data={DATA}", f"trainer.micro_batch_size={MICRO_BATCH}",
                           f"trainer.global_batch_size={MICRO_BATCH * DATA}", "trainer.max_steps=1",
                           f"trainer.activation_checkpointing={checkpointing}", f"trainer.shard_optimizer={shard}",
                           *extra])


def _recompute_working_set(trainer: Any) -> int:
    """Activations one layer saves when run without checkpointing, less its input (the checkpoint holds
    that already): what the recompute of one layer adds during backward."""
    m, block = trainer.cfg.model, trainer.model.blocks[0]
    x = torch.randn(MICRO_BATCH, m.seq_length, m.hidden_size, requires_grad=True)
    with SavedActivations(exclude=trainer.params) as act:
        block(x)
    return act.bytes - storage_bytes([x])


def _rank(env: RankEnv, runs: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    state = ParallelState.initialize(1, DATA, env.rank, env.world_size, torch.device("cpu"), "gloo", 1800.0)
    rows = []
    try:
        for run in runs:
            cfg = OmegaConf.create(run["cfg"])
            trainer = Trainer(cfg, state, None, {})
            trainer.train_step()
            report = trainer.memory_summary()
            parts = {k[len("memory_"):-len("_bytes")]: v for k, v in report.items() if k.startswith("memory_")}
            parts["recompute"] = _recompute_working_set(trainer) if cfg.trainer.activation_checkpointing else 0
            rows.append({**{k: run[k] for k in ("model", "checkpointing", "shard")}, **parts})
            del trainer
            gc.collect()
    finally:
        state.destroy()
    with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
        json.dump(rows, f)


def predict(cfg: Any, padded_vocab: int, checkpointing: bool, shard: bool, data: int, tensor: int = 1,
            bytes_per_value: int = 4, fp16_params: bool = False) -> dict[str, int]:
    """The analytic bytes per device for a composed config (mtlm/metrics/memory.py)."""
    m, b = cfg.model, cfg.trainer.micro_batch_size
    n = parameters_per_device(m.num_layers, m.hidden_size, padded_vocab, m.max_position_embeddings, tensor)
    state = model_state_bytes(n, 12 * m.num_layers + 4, data, shard, fp16_params)
    dims = (m.seq_length, b, m.hidden_size, m.num_attention_heads)
    act = activation_bytes(m.num_layers, *dims, padded_vocab, tensor, bytes_per_value, m.dropout > 0,
                           checkpointing)
    layer = activation_bytes_per_layer(*dims, tensor, bytes_per_value, m.dropout > 0)
    recompute = layer - bytes_per_value * m.seq_length * b * m.hidden_size if checkpointing else 0
    return {**state, "activations": act, "recompute": recompute}


def bench_memory(extra: list[str]) -> list[dict]:
    runs = []
    for model in MODELS:
        for checkpointing in (False, True):
            for shard in (False, True):
                cfg = _run_config(model, checkpointing, shard, extra)
                prepare_data(cfg.data, cfg.model.seq_length)
                vocab = cfg.model.vocab_size or build_data(cfg.data, cfg.model.seq_length, 0).tokenizer.vocab_size
                padded = pad_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1)
                runs.append({"model": model, "checkpointing": checkpointing, "shard": shard,
                             "cfg": OmegaConf.to_container(cfg, resolve=True),
                             "predicted": predict(cfg, padded, checkpointing, shard, DATA)})
    with tempfile.TemporaryDirectory() as out:
        launch(_rank, DATA, ([{k: v for k, v in r.items() if k != "predicted"} for r in runs], out))
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(DATA)]
    results = []
    for i, run in enumerate(runs):
        ranks = [rows[i] for rows in per_rank]
        keys = ("params", "grads", "optimizer", "activations", "recompute")
        totals = [sum(r[k] for k in keys) for r in ranks]
        device = ranks[totals.index(max(totals))]
        results.append({"model": run["model"], "checkpointing": run["checkpointing"], "shard": run["shard"],
                        "measured": {k: device[k] for k in keys}, "measured_total": max(totals),
                        "optimizer_per_rank": [r["optimizer"] for r in ranks],
                        "predicted": run["predicted"], "predicted_total": sum(run["predicted"].values())})
    return results


SEQUENCE_TENSOR = 2  # --sequence: tensor-parallel ranks, with and without sequence parallelism


def _sequence_rank(env: RankEnv, runs: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    state = ParallelState.initialize(SEQUENCE_TENSOR, 1, env.rank, env.world_size, torch.device("cpu"), "gloo",
                                     1800.0)
    rows = []
    try:
        for run in runs:
            state.sequence = run["sequence"]  # the same groups; only where the stream is split changes
            trainer = Trainer(OmegaConf.create(run["cfg"]), state, None, {})
            trainer.train_step()
            rows.append(trainer.memory["activations"])
            del trainer
            gc.collect()
    finally:
        state.destroy()
    with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
        json.dump(rows, f)


def bench_sequence(extra: list[str]) -> list[dict]:
    """Activation bytes per rank of one training step at tensor 2, sequence parallelism off and on, with the
    prediction of memory.py (Korthikanti et al. 2022 §4.2.2: the non-GEMM activations shrink by t)."""
    runs = []
    for checkpointing in (False, True):
        for sequence in (False, True):
            cfg = compose_config([*MODELS["wide"], f"parallel.tensor={SEQUENCE_TENSOR}",
                                  f"parallel.sequence={sequence}", f"trainer.micro_batch_size={MICRO_BATCH}",
                                  f"trainer.global_batch_size={MICRO_BATCH}", "trainer.max_steps=1",
                                  f"trainer.activation_checkpointing={checkpointing}", *extra])
            prepare_data(cfg.data, cfg.model.seq_length)
            vocab = cfg.model.vocab_size or build_data(cfg.data, cfg.model.seq_length, 0).tokenizer.vocab_size
            m = cfg.model
            padded = pad_vocab_size(vocab, m.make_vocab_size_divisible_by, SEQUENCE_TENSOR)
            predicted = activation_bytes(m.num_layers, m.seq_length, MICRO_BATCH, m.hidden_size,
                                         m.num_attention_heads, padded, SEQUENCE_TENSOR, 4, m.dropout > 0,
                                         checkpointing, sequence)
            runs.append({"checkpointing": checkpointing, "sequence": sequence, "predicted": predicted,
                         "cfg": OmegaConf.to_container(cfg, resolve=True)})
    with tempfile.TemporaryDirectory() as out:
        launch(_sequence_rank, SEQUENCE_TENSOR, ([{k: r[k] for k in ("cfg", "sequence")} for r in runs], out))
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(SEQUENCE_TENSOR)]
    return [{"checkpointing": r["checkpointing"], "sequence": r["sequence"], "predicted": r["predicted"],
             "measured": max(rows[i] for rows in per_rank)} for i, r in enumerate(runs)]


def format_sequence(rows: list[dict]) -> str:
    lines = ["| checkpointing | sequence parallel | activations per rank, MiB, measured (predicted) |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {'on' if r['checkpointing'] else 'off'} | {'on' if r['sequence'] else 'off'} "
                     f"| {r['measured'] / MIB:.2f} ({r['predicted'] / MIB:.2f}) |")
    return "\n".join(lines)


def paper_predictions() -> list[dict]:
    """§5.1's weak-scaling models at their tensor degree, batch 8, seq 1024, fp16 + fp32 masters."""
    rows = []
    for preset, tensor in PAPER:
        cfg = _paper_config(preset)
        padded = pad_vocab_size(50257, cfg.model.make_vocab_size_divisible_by, tensor)
        row = {"model": preset, "tensor": tensor}
        for checkpointing in (False, True):
            p = predict(cfg, padded, checkpointing, False, 1, tensor, 2, fp16_params=True)
            row["state"] = p["params"] + p["grads"] + p["optimizer"]
            row["act_ckpt" if checkpointing else "act"] = p["activations"] + p["recompute"]
        rows.append(row)
    return rows


def _paper_config(preset: str) -> Any:
    """The preset's shapes without validating the layout (this machine has no 8 GPUs)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="bench_memory"):
        return compose(config_name="config", overrides=[f"model={preset}", "trainer.micro_batch_size=8",
                                                        "model.dropout=0.1"])


def format_results(results: list[dict]) -> str:
    """One row per run; each cell is measured (predicted), MiB."""
    lines = ["| model | checkpointing | ZeRO | params | grads | optimizer, rank 0 / 1 | activations | recompute "
             "| total per device | total bytes |", "|" + "---|" * 10]
    for r in results:
        m, p = r["measured"], r["predicted"]

        def cell(key: str, m=m, p=p) -> str:
            return f"{m[key] / MIB:.2f} ({p[key] / MIB:.2f})"

        opt = " / ".join(f"{b / MIB:.2f}" for b in r["optimizer_per_rank"]) + f" ({p['optimizer'] / MIB:.2f})"
        lines.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {'on' if r['shard'] else 'off'} "
                     f"| {cell('params')} | {cell('grads')} | {opt} | {cell('activations')} | {cell('recompute')} "
                     f"| **{r['measured_total'] / MIB:.2f}** ({r['predicted_total'] / MIB:.2f}) "
                     f"| {r['measured_total']:,} |")
    return "\n".join(lines)


def format_paper(rows: list[dict]) -> str:
    lines = ["| model | tensor | model state | activations | activations, checkpointed | total | total, "
             "checkpointed |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tensor']} | {r['state'] / GB:.1f} | {r['act'] / GB:.1f} "
                     f"| {r['act_ckpt'] / GB:.1f} | {(r['state'] + r['act']) / GB:.1f} "
                     f"| {(r['state'] + r['act_ckpt']) / GB:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mtlm.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--paper-only", action="store_true", help="only the analytic table at the paper's settings")
    p.add_argument("--sequence", action="store_true",
                   help="only activation bytes at tensor 2 with and without sequence parallelism")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, key=value")
    args = p.parse_args(argv)
    if args.sequence:
        rows = bench_sequence(args.overrides)
        print(f"The wide model at tensor {SEQUENCE_TENSOR}, micro batch {MICRO_BATCH}, fp32, one step:\n")
        print(format_sequence(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sequence": rows}, f, indent=2)
        return
    results = [] if args.paper_only else bench_memory(args.overrides)
    if results:
        print(f"MiB per device, measured (predicted); data={DATA} ranks, micro batch {MICRO_BATCH}, fp32:\n")
        print(format_results(results), flush=True)
    paper = paper_predictions()
    print("\nPredicted at the paper's settings (GB per GPU; fp16 + fp32 masters, batch 8, seq 1024):\n")
    print(format_paper(paper))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "paper": paper}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
