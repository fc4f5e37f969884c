"""How fast is one training step: mtlm against transformers' GPT-2 and against the hardware (issue 7).

In one process and alternately, so that whatever else loads the machine slows all of them alike, it times:

- mtlm: `Trainer.train_step()` of the composed config, i.e. the real loop (batch, forward, fused
  vocab-parallel loss, backward, clipping, optimizer step, schedule), with the optimizer of conf/optimizer;
- transformers: GPT2LMHeadModel of the same shapes, dtype, dropout and thread count, SDPA attention, train
  mode, loss through its `labels` argument, torch.optim.AdamW with torch's defaults, clipping at 1.0;
- plain: a plain single-file GPT-2 with SDPA (mtlm/bench/plain.py), the yardstick issue 7 names: what
  mtlm's abstractions cost (mtlm / plain) and what a bare model gets (plain / transformers);
- gemm: one plain GEMM of the model's biggest shape, into a preallocated output: the rate this hardware
  reaches on the work that dominates a step. On CPU its best repetition is the peak MFU is measured
  against; on CUDA the datasheet peak (mtlm.metrics.flops.peak_tflops) is.

bf16 is autocast on both sides over fp32 weights, fp32 gradients and fp32 AdamW state (mtlm's
precision=bf16), and both compute the loss's softmax in fp32 (transformers upcasts its logits).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

try:
    import resource  # page-fault counts (Unix)
except ImportError:  # pragma: no cover
    resource = None

from mtlm.bench.plain import plain_step
from mtlm.bench.roofline import broken_line, gemm_check
from mtlm.checks import validate
from mtlm.config import CONF_DIR, register_configs
from mtlm.metrics.flops import _cpu_model_name, model_flops_per_iteration, peak_tflops
from mtlm.parallel.layers import pad_vocab_size
from mtlm.parallel.state import Grid, ParallelState
from mtlm.train.loop import Trainer
from mtlm.train.precision import DTYPES


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    seq: int = 256
    batch: int = 8
    vocab: int = 8192
    dropout: float = 0.0

    def padded_vocab(self, tensor: int = 1) -> int:
        return pad_vocab_size(self.vocab, 128, tensor)

    def flops_per_step(self) -> float:
        return model_flops_per_iteration(self.batch, self.seq, self.layers, self.hidden, self.padded_vocab())


def compose_config(shape: Shape, precision: str, tensor: int = 1, compile_model: bool = False,
                   device: str = "cpu", overrides: Sequence[str] = ()) -> Any:
    """The config train.py would compose for this shape (W&B off, no checkpoint resume), validated.

    `shape.vocab` is the model's vocabulary (the timed shape: 50257 for a preset, as GPT-2). The tokenizer is
    data's own (conf/data, unless `overrides` set data.vocab_size), only capped at the model's vocabulary so
    every token id has a row: a corpus as small as the built-in one cannot train 50257 BPE pieces, and the
    work per step does not depend on how many of the model's rows the tokens use."""
    from hydra import compose, initialize_config_dir

    s = shape
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="bench"):
        cfg = compose(config_name="config", overrides=[
            "logger=none", f"precision={precision}", f"trainer.device={device}", "checkpoint.resume=none",
            f"model.hidden_size={s.hidden}", f"model.num_layers={s.layers}",
            f"model.num_attention_heads={s.heads}", f"model.seq_length={s.seq}",
            f"model.max_position_embeddings={s.seq}", f"model.vocab_size={s.vocab}",
            f"model.dropout={s.dropout}",
            f"trainer.micro_batch_size={s.batch}", f"trainer.global_batch_size={s.batch}",
            f"trainer.compile={compile_model}", f"parallel.tensor={tensor}", *overrides])
    if "data.vocab_size" not in {o.split("=", 1)[0].lstrip("+~") for o in overrides}:
        cfg.data.vocab_size = min(cfg.data.vocab_size, s.vocab)
    validate(cfg, world_size=Grid.of(cfg.parallel).world)
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def mtlm_step(cfg: Any, state: ParallelState) -> Callable[[], Any]:
    """One optimizer step of the real training loop."""
    trainer = Trainer(cfg, state, None, {})
    return trainer.train_step


def hf_step(shape: Shape, precision: str, device: torch.device) -> Callable[[], Any]:
    """One optimizer step of transformers' GPT-2 with the same shapes (vocab padded as mtlm pads it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = shape
    config = GPT2Config(vocab_size=s.padded_vocab(), n_positions=s.seq, n_embd=s.hidden, n_layer=s.layers,
                        n_head=s.heads, resid_pdrop=s.dropout, embd_pdrop=s.dropout, attn_pdrop=s.dropout,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device).train()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers picked attention {model.config._attn_implementation!r}, not sdpa")
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        with _autocast(device, precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync, as mtlm's step has (it returns the loss as a float)

    return step


def biggest_gemm(shape: Shape) -> tuple[int, int, int]:
    """(m, k, n) of the forward GEMM with the most FLOPs: qkv, attention out, MLP in/out, or the logits."""
    h, v = shape.hidden, shape.padded_vocab()
    k, n = max([(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h), (h, v)], key=lambda kn: kn[0] * kn[1])
    return shape.batch * shape.seq, k, n


def gemm_step(shape: Shape, precision: str, device: torch.device) -> tuple[Callable[[], Any], float]:
    """x @ W^T (F.linear's layout) of the biggest shape into a preallocated output; returns (fn, flops)."""
    m, k, n = biggest_gemm(shape)
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[precision]
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    return (lambda: torch.mm(x, w.t(), out=out)), 2.0 * m * k * n


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device,
                     inner: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each function, taken in turn (the order rotates every repetition), and the
    page faults per call (first touches of memory the allocator got fresh from the kernel: on CPU each one
    costs microseconds of system time, and they explain most of the run-to-run spread of a step)."""
    inner = inner or {}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            n = inner.get(name, 1)
            _sync(device)
            faults_before, start = _minor_faults(), time.perf_counter()
            for _ in range(n):
                fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) / n)
            faults[name].append((_minor_faults() - faults_before) / n)
    return times, faults


def _summary(seconds: list[float], tokens: int, flops: float, faults: list[float]) -> dict[str, float]:
    med = statistics.median(seconds)
    return {"step_s": med, "step_s_min": min(seconds), "step_s_max": max(seconds), "tokens_per_s": tokens / med,
            "tflops": flops / med / 1e12, "page_faults": statistics.median(faults)}


def bench_speed(shape: Shape, precision: str, threads: int, reps: int = 7, warmup: int = 2,
                device: str = "cpu", compile_model: bool = False, hf: bool = True, plain: bool = True,
                overrides: Sequence[str] = (), check_gemms: bool = True) -> dict[str, Any]:
    """Time mtlm, transformers and the GEMM alternately; medians, ratio and MFU as a dict.

    `check_gemms` (CPU): each comparator's GEMMs in its step against the same GEMMs alone (bench/roofline.py);
    one more than 2x off is named in result["broken"], and its ratio is not a speed-up of the others."""
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.set_num_threads(threads)
    cfg = compose_config(shape, precision, compile_model=compile_model, device=dev.type, overrides=overrides)
    fns = {"mtlm": mtlm_step(cfg, ParallelState(device=dev))}
    if compile_model:  # what compiling buys: the same step without it
        fns["mtlm_eager"] = mtlm_step(compose_config(shape, precision, device=dev.type, overrides=overrides),
                                      ParallelState(device=dev))
    if hf:
        fns["transformers"] = hf_step(shape, precision, dev)
    if plain:
        fns["plain"] = plain_step(shape, DTYPES[precision], dev)
    gemm, gemm_flops = gemm_step(shape, precision, dev)
    fns["gemm"] = gemm
    inner = {"gemm": max(1, round(0.25 * shape.flops_per_step() / gemm_flops))}  # ~1/4 of a step's FLOPs
    load_before = os.getloadavg()[0]
    times, faults = time_interleaved(fns, reps, warmup, dev, inner)
    tokens, flops = shape.batch * shape.seq, shape.flops_per_step()
    result: dict[str, Any] = {
        "shape": asdict(shape), "precision": precision, "threads": threads, "device": _device_name(dev),
        "compile": compile_model, "reps": reps, "warmup": warmup, "optimizer_fused": cfg.optimizer.fused,
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "mtlm": _summary(times["mtlm"], tokens, flops, faults["mtlm"]),
        "gemm": {"shape_mkn": list(biggest_gemm(shape)), "tflops": gemm_flops / statistics.median(times["gemm"]) / 1e12,
                 "tflops_best": gemm_flops / min(times["gemm"]) / 1e12},
    }
    if compile_model:
        result["mtlm_eager"] = _summary(times["mtlm_eager"], tokens, flops, faults["mtlm_eager"])
        result["compile_speedup"] = result["mtlm_eager"]["step_s"] / result["mtlm"]["step_s"]
    if hf:
        result["transformers"] = _summary(times["transformers"], tokens, flops, faults["transformers"])
        result["ratio"] = result["transformers"]["step_s"] / result["mtlm"]["step_s"]
        paired = [h / m for m, h in zip(times["mtlm"], times["transformers"], strict=True)]
        result["ratio_paired_min"], result["ratio_paired_max"] = min(paired), max(paired)
    if plain:
        result["plain"] = _summary(times["plain"], tokens, flops, faults["plain"])
        result["ratio_vs_plain"] = result["plain"]["step_s"] / result["mtlm"]["step_s"]
        if hf:
            result["ratio_plain_vs_transformers"] = result["transformers"]["step_s"] / result["plain"]["step_s"]
    result["broken"], result["gemm_checks"] = {}, {}
    if check_gemms and dev.type == "cpu":  # on CUDA the profiler's CPU times are launches (not done)
        for name in ("mtlm", "mtlm_eager", "transformers", "plain"):
            if name in fns:
                result["gemm_checks"][name] = gemm_check(fns[name], dev)
                if line := broken_line(name, result["gemm_checks"][name]):
                    result["broken"][name] = line
    if dev.type == "cuda":
        result["peak_tflops"], result["peak_source"] = peak_tflops(dev, threads, DTYPES[precision])
    else:
        # The best repetition, not the median: the hardware's rate, which other processes only ever lower.
        result["peak_tflops"], result["peak_source"] = result["gemm"]["tflops_best"], "best gemm just measured"
    # An unknown peak (a GPU not in the table, a MIG slice) is NaN: no MFU rather than a wrong one.
    known = math.isfinite(result["peak_tflops"])
    result["mfu"] = result["mtlm"]["tflops"] / result["peak_tflops"] if known else None
    return result


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)

    return f"{_cpu_model_name()} ({os.cpu_count()} cores)"


def format_speed(r: dict[str, Any]) -> str:
    s = r["shape"]
    lines = [f"step speed: hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, seq {s['seq']}, "
             f"batch {s['batch']}, vocab {s['vocab']}, dropout {s['dropout']} | {r['precision']}, "
             f"{r['threads']} threads, {r['device']}, compile={r['compile']}, optimizer fused={r['optimizer_fused']}",
             f"  median of {r['reps']} interleaved repetitions after {r['warmup']} warm-up; load average "
             f"{r['load_before']:.2f} -> {r['load_after']:.2f}"]
    for name in ("mtlm", "mtlm_eager", "transformers", "plain"):
        if name in r:
            v = r[name]
            lines.append(f"  {name:13s} {v['step_s']:8.4f} s/step ({v['step_s_min']:.4f}..{v['step_s_max']:.4f})  "
                         f"{v['tokens_per_s']:10.1f} tokens/s  {v['tflops']:.4f} TFLOP/s  "
                         f"{v['page_faults']:8.0f} page faults/step")
            if name in r.get("gemm_checks", {}):
                c = r["gemm_checks"][name]
                lines.append(f"  {'':13s} its {c['calls']} GEMMs: {c['in_step_s']:.4f} s in the step, "
                             f"{c['alone_s']:.4f} s alone ({c['ratio']:.2f}x)")
    m, k, n = r["gemm"]["shape_mkn"]
    lines.append(f"  gemm [{m}x{k}]x[{k}x{n}]  {r['gemm']['tflops']:.4f} TFLOP/s median, "
                 f"{r['gemm']['tflops_best']:.4f} best")
    if "compile_speedup" in r:
        lines.append(f"  torch.compile speedup (mtlm eager / compiled step time): {r['compile_speedup']:.3f}x")
    broken = r.get("broken", {})
    lines.extend(f"  BROKEN {line}" for line in broken.values())
    if broken:
        lines.append(f"  (ratios with {', '.join(broken)} compare against a broken comparator: not a speed-up)")
    if "ratio" in r:
        lines.append(f"  ratio mtlm/transformers: {r['ratio']:.3f}x tokens/s (per repetition "
                     f"{r['ratio_paired_min']:.3f}..{r['ratio_paired_max']:.3f})")
    if "ratio_vs_plain" in r:
        line = f"  ratio mtlm/plain: {r['ratio_vs_plain']:.3f}x tokens/s"
        if "ratio_plain_vs_transformers" in r:
            line += f"; plain/transformers: {r['ratio_plain_vs_transformers']:.3f}x"
        lines.append(line)
    if r["mfu"] is None:
        lines.append(f"  MFU: not known, no peak for this device ({r['peak_source']})")
    else:
        lines.append(f"  MFU: {100 * r['mfu']:.1f}% of {r['peak_tflops']:.4f} TFLOP/s ({r['peak_source']})")
    return "\n".join(lines)
