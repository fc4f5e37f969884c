"""python -m mtlm.bench [--precision fp32 bf16] [--tp-scaling] ...: see mtlm/bench/speed.py, tp_scaling.py, pipeline.py.

    python -m mtlm.bench                      # default CPU shape, fp32 then bf16, all cores for both sides
    python -m mtlm.bench --tp-scaling         # wide shape, tensor 2 (2 ranks x 1 thread) against tensor 1
    python -m mtlm.bench --pipeline-scaling   # pipeline 2 (1F1B, interleaved v=2) vs 1: bubble vs (P-1)/(v m)
    python -m mtlm.bench --hidden 64 --layers 2 --heads 4 --seq 32 --batch 2 --vocab 512 --reps 2 --warmup 1
    python -m mtlm.bench --model gpt2_345m --precision bf16   # a preset's shape (on a GPU), vocab 50257
    python -m mtlm.bench --roofline           # mtlm's step against its own GEMM + attention kernels (fp32)

Extra `key=value` arguments are Hydra overrides for the mtlm side of the speed mode (e.g. optimizer.fused=false).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mtlm.bench.pipeline import MICRO_BATCHES, SMALL, bench_pipeline, format_pipeline
from mtlm.bench.roofline import format_roofline, roofline
from mtlm.bench.speed import Shape, bench_speed, compose_config, format_speed, mtlm_step
from mtlm.bench.tp_scaling import WIDE, bench_tp_scaling, format_tp_scaling
from mtlm.config import CONF_DIR
from mtlm.parallel.denormals import flush_denormals
from mtlm.parallel.launch import threads_per_rank
from mtlm.parallel.state import ParallelState


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtlm.bench", description=__doc__.split("\n")[0])
    p.add_argument("--tp-scaling", action="store_true", help="tensor-parallel strong scaling (CPU, gloo)")
    p.add_argument("--pipeline-scaling", action="store_true", help="the pipeline bubble at pipeline 2 (1F1B and "
                   "interleaved, v=2) against pipeline 1, next to (P-1)/(v m) (CPU, gloo; mtlm/bench/pipeline.py)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=list(MICRO_BATCHES),
                   help="micro-batch counts m for --pipeline-scaling")
    p.add_argument("--roofline", action="store_true", help="every GEMM and attention call of one mtlm step, in "
                   "the step and alone, and the rest by op family (CPU; mtlm/bench/roofline.py)")
    p.add_argument("--no-gemm-check", action="store_true", help="skip timing each comparator's GEMMs alone")
    p.add_argument("--tensor", type=int, default=2, help="tensor degree for --tp-scaling")
    p.add_argument("--model", default=None, help="take the shape of conf/model/NAME.yaml (model vocabulary 50257, "
                   "GPT-2's; the tokenizer stays conf/data's; micro batch 8); the shape flags below still override it")
    for name, help_ in (("hidden", "hidden size"), ("layers", "transformer layers"), ("heads", "attention heads"),
                        ("seq", "sequence length"), ("batch", "micro batch (sequences)"), ("vocab", "vocabulary")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{help_} (default: the mode's shape)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16"),
                   help="default: fp32 bf16 (speed), fp32 (--tp-scaling)")
    p.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default 7; 5 for --tp-scaling, --pipeline-scaling)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 2; 1 for --tp-scaling, --pipeline-scaling)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--compile", action="store_true", help="trainer.compile=true for the mtlm side")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (no ratio)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain single-file GPT (mtlm/bench/plain.py)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the mtlm side, key=value")
    return p


def main(argv: list[str] | None = None) -> None:
    flush_denormals()  # first: every comparator runs in this process's threads, all flushing (issue 26)
    parser = _parser()
    args = parser.parse_args(argv)
    base = WIDE if args.tp_scaling else SMALL if args.pipeline_scaling else Shape()
    if args.model is not None:
        base = _preset_shape(args.model, parser)
    dims = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "seq", "batch", "vocab")}
    shape = Shape(**{**asdict(base), **{k: v for k, v in dims.items() if v is not None}, "dropout": args.dropout})
    results = []
    if args.roofline:
        threads = threads_per_rank(1, args.threads)
        torch.set_num_threads(threads)
        for precision in args.precision or ["fp32"]:
            cfg = compose_config(shape, precision, device="cpu", overrides=args.overrides)
            r = roofline(mtlm_step(cfg, ParallelState(device=torch.device("cpu"))), torch.device("cpu"),
                         args.reps or 3, 2 if args.warmup is None else args.warmup)
            r.update(shape=asdict(shape), precision=precision, threads=threads)
            print(format_roofline(r, f"{precision}, {threads} threads, {asdict(shape)}"), flush=True)
            results.append(r)
    elif args.pipeline_scaling:
        if args.precision not in (None, ["fp32"]):
            parser.error("--pipeline-scaling times fp32 only; drop --precision")
        r = bench_pipeline(shape, tuple(args.micro_batches), reps=args.reps or 5,
                           warmup=1 if args.warmup is None else args.warmup)
        print(format_pipeline(r), flush=True)
        results.append(r)
    elif args.tp_scaling:
        for precision in args.precision or ["fp32"]:
            r = bench_tp_scaling(shape, args.tensor, precision, args.reps or 5,
                                 1 if args.warmup is None else args.warmup)
            print(format_tp_scaling(r), flush=True)
            results.append(r)
    else:
        threads = threads_per_rank(1, args.threads)  # all cores unless --threads
        for precision in args.precision or ["fp32", "bf16"]:
            r = bench_speed(shape, precision, threads, args.reps or 7, 2 if args.warmup is None else args.warmup,
                            args.device, args.compile,
                            hf=not args.no_hf, plain=not args.no_plain, overrides=args.overrides,
                            check_gemms=not args.no_gemm_check)
            print(format_speed(r), flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _preset_shape(name: str, parser: argparse.ArgumentParser) -> Shape:
    from omegaconf import OmegaConf

    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        parser.error(f"--model {name}: no {path}; choose one of {', '.join(names)}")
    m = OmegaConf.load(path)
    return Shape(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads, seq=m.seq_length,
                 batch=8, vocab=50257)


if __name__ == "__main__":
    main(sys.argv[1:])
