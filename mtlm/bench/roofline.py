"""A step against its own kernels (issue 26): every GEMM and attention call of one step, timed in the step and
alone, and the rest of the step by op family.

One step runs under torch.profiler (shapes, strides, dtypes recorded). A GEMM or attention call is the
outermost event of that kind: its time in the step is the event's total (anything under it, a dispatch hook
or a nested kernel, is part of the call); every other event counts its self time in its family; what no op
covers (Python between ops, the profiler's own bookkeeping) is "untracked". So the families and the untracked
time add up to the profiled step exactly.

"Alone" replays each call with random inputs of the same shapes, strides and dtypes (and the same scalar
arguments) through the same aten op, in this process, with this process's threads: the rate the kernel reaches
when nothing else is going on. A comparator whose GEMMs take more than twice their alone time in its step is
broken, not slow (issue 26: denormal inputs on an Intel CPU made plain GPT's output-layer GEMMs 35x slower).
CPU only: on CUDA the profiler's CPU times are launch times, not kernel times (not done).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

GEMMS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"})
FAMILIES = ("gemm", "attention", "element-wise", "norms", "optimizer", "copies", "collectives", "autograd",
            "untracked")
BROKEN_RATIO = 2.0  # GEMMs this many times slower in the step than alone: the comparator is broken
_COPIES = frozenset({"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::cat",
                     "aten::stack", "aten::index_select", "aten::index", "aten::gather", "aten::scatter_add_",
                     "aten::embedding_dense_backward", "aten::index_add_", "aten::_unsafe_view"})
_DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16,
           "double": torch.float64, "long int": torch.int64, "int": torch.int32, "bool": torch.bool}


def is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def family(name: str) -> str:
    """The op family of a profiler event by its name (a kernel call's own family for GEMM and attention)."""
    if name in GEMMS:
        return "gemm"
    if is_attention(name):
        return "attention"
    if name.startswith("Optimizer."):
        return "optimizer"  # torch.optim's own annotation around step() / zero_grad()
    if not name.startswith("aten::") and not name.startswith("c10d::"):
        return "autograd"  # autograd nodes and the engine's wrappers around them
    if any(w in name for w in ("allreduce", "all_reduce", "broadcast", "all_gather", "allgather", "reduce_scatter",
                               "barrier", "c10d::")):
        return "collectives"
    if any(w in name for w in ("layer_norm", "rms_norm", "group_norm", "batch_norm")):
        return "norms"
    if "adam" in name or "_foreach_" in name or "sgd" in name:
        return "optimizer"  # the fused/foreach optimizers and the gradient clipping's foreach norm and scale
    if name in _COPIES:
        return "copies"
    return "element-wise"  # and every other aten op (reductions, loss, embedding, fills)


def _kernel(e: Any) -> bool:
    return e.name in GEMMS or is_attention(e.name)


def _inside_kernel(e: Any) -> bool:
    parent = e.cpu_parent
    while parent is not None:
        if _kernel(parent):
            return True
        parent = parent.cpu_parent
    return False


def profile_step(step: Callable[[], Any]) -> tuple[float, list[Any]]:
    """(wall seconds, profiler events) of one call of `step`. The first profiled step of a process pays one-off
    costs in its first calls of some ops: callers throw one away."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    return wall, list(prof.events())


def account(wall: float, events: list[Any], ops: dict[str, float] | None = None
            ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(seconds per family, adding up to `wall`; the GEMM and attention calls in step order). `ops`, when
    given, gets the seconds of every other op by name (where the rest of the step goes)."""
    seconds = dict.fromkeys(FAMILIES, 0.0)
    calls = []
    for e in sorted(events, key=lambda e: e.time_range.start):
        if _inside_kernel(e):
            continue  # counted in the kernel call that contains it
        if _kernel(e):
            t = e.cpu_time_total / 1e6
            calls.append({"op": e.name, "family": family(e.name), "shapes": e.input_shapes,
                          "strides": getattr(e, "structured_input_strides", None) or [], "dtypes": e.input_dtypes,
                          "scalars": e.concrete_inputs, "in_step_s": t})
        else:
            t = e.self_cpu_time_total / 1e6
            if ops is not None:
                ops[e.name] = ops.get(e.name, 0.0) + t
        seconds[family(e.name)] += t
    seconds["untracked"] = wall - sum(seconds.values())
    return seconds, calls


def _tensor(shape: list[int], strides: list[int] | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if strides and len(strides) == len(shape):
        storage = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if n > 0)
        base = torch.randn(storage, device=device).to(dtype) if dtype.is_floating_point else \
            torch.zeros(storage, device=device, dtype=dtype)
        return base.as_strided(shape, strides)
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.zeros(shape, device=device, dtype=dtype)


def _replay(call: dict[str, Any], device: torch.device) -> Callable[[], Any]:
    """The call's aten op on fresh random inputs of its shapes, strides and dtypes, scalars as recorded."""
    op = getattr(torch.ops.aten, call["op"].split("::", 1)[1]).default
    kwargs = {}  # every argument by name: an optional one left out must not shift the ones after it
    strides = call["strides"] or [None] * len(call["shapes"])
    for i, arg in enumerate(op._schema.arguments):
        if i >= len(call["shapes"]):
            break
        dtype = _DTYPES.get(call["dtypes"][i])
        shape = call["shapes"][i]
        if dtype is not None and (shape or "Tensor" in str(arg.type)):
            value: Any = _tensor(shape, strides[i] if i < len(strides) else None, dtype, device)
        else:
            value = call["scalars"][i] if call["scalars"] and i < len(call["scalars"]) else None
        if value is None and arg.has_default_value():
            continue
        kwargs[arg.name] = value
    return lambda: op(**kwargs)


def _key(call: dict[str, Any]) -> str:
    return repr((call["op"], call["shapes"], call["strides"], call["dtypes"], call["scalars"]))


def time_alone(calls: list[dict[str, Any]], device: torch.device, reps: int = 3) -> None:
    """Sets each call's alone_s: the median of `reps` replays after one warm-up (NaN if it cannot replay)."""
    cache: dict[str, float] = {}
    for call in calls:
        key = _key(call)
        if key not in cache:
            try:
                fn = _replay(call, device)
                fn()
            except (RuntimeError, TypeError, ValueError, IndexError):
                cache[key] = math.nan
            else:
                times = []
                for _ in range(reps):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - start)
                cache[key] = statistics.median(times)
        call["alone_s"] = cache[key]


def gemm_check(step: Callable[[], Any], device: torch.device, reps: int = 3) -> dict[str, Any]:
    """A comparator's GEMMs in its step against the same GEMMs alone: {in_step_s, alone_s, ratio, calls}.

    Each call's time in the step is its median over `reps` profiled steps, so one call that lost the core to
    another process (a few ms on a loaded machine) does not read as a broken comparator; a cause that hits
    every step (denormal inputs) stays."""
    profile_step(step)  # thrown away: warm, and the profiler's own first-time costs
    per_step = []
    for _ in range(reps):
        wall, events = profile_step(step)
        per_step.append([c for c in account(wall, events)[1] if c["family"] == "gemm"])
    gemms = per_step[0]
    if any(len(calls) != len(gemms) for calls in per_step):
        raise RuntimeError("the step ran a different number of GEMMs each time: cannot compare them")
    for i, call in enumerate(gemms):
        call["in_step_s"] = statistics.median(calls[i]["in_step_s"] for calls in per_step)
    time_alone(gemms, device, reps)
    in_step = sum(c["in_step_s"] for c in gemms)
    alone = sum(c["alone_s"] for c in gemms)
    ratio = in_step / alone if alone > 0 else math.nan
    return {"in_step_s": in_step, "alone_s": alone, "ratio": ratio, "calls": len(gemms)}


def broken_line(name: str, check: dict[str, Any]) -> str | None:
    """The bench's line for a comparator whose GEMMs ran more than BROKEN_RATIO x slower than alone."""
    if not check["ratio"] > BROKEN_RATIO:
        return None
    return (f"{name}: its GEMMs ran {check['ratio']:.1f}x slower than alone ({check['in_step_s']:.4f} s in the step, "
            f"{check['alone_s']:.4f} s alone): denormal inputs? broken comparator, not a speed-up of the others")


def roofline(step: Callable[[], Any], device: torch.device, reps: int = 3, warmup: int = 1) -> dict[str, Any]:
    """One step's kernels and families (see the module doc), from the profiled step of median length among
    `reps`; step_s is the unprofiled median of `reps` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    profile_step(step)  # thrown away (see profile_step)
    profiled = sorted((profile_step(step) for _ in range(reps)), key=lambda p: p[0])
    wall, events = profiled[len(profiled) // 2]  # the median step: its every number comes from that one step
    ops: dict[str, float] = {}
    seconds, calls = account(wall, events, ops)
    time_alone(calls, device, reps)
    kernels_alone = sum(c["alone_s"] for c in calls)
    step_s = statistics.median(times)
    rest = wall - seconds["gemm"] - seconds["attention"]
    return {"step_s": step_s, "profiled_step_s": wall, "families": seconds, "calls": calls,
            "kernels_alone_s": kernels_alone, "step_over_kernels": step_s / kernels_alone,
            "rest_share": rest / wall, "top_other_ops": sorted(ops.items(), key=lambda kv: -kv[1])[:10]}


def _shape_text(call: dict[str, Any]) -> str:
    return " ".join("x".join(map(str, s)) for s in call["shapes"] if s)


def format_roofline(r: dict[str, Any], title: str = "") -> str:
    wall = r["profiled_step_s"]
    lines = [f"roofline {title}".rstrip() + f": step {r['step_s']:.4f} s (median, unprofiled), "
             f"{wall:.4f} s profiled; its GEMM + attention kernels alone {r['kernels_alone_s']:.4f} s: "
             f"step / kernels {r['step_over_kernels']:.3f}x; non-GEMM non-attention {100 * r['rest_share']:.1f}%",
             f"  {'#':>3} {'op':52s} {'shapes':44s} {'in step s':>10} {'alone s':>10} {'ratio':>6}"]
    for i, c in enumerate(r["calls"]):
        ratio = c["in_step_s"] / c["alone_s"] if c["alone_s"] > 0 else math.nan
        lines.append(f"  {i:3d} {c['op'][:52]:52s} {_shape_text(c)[:44]:44s} {c['in_step_s']:10.5f} "
                     f"{c['alone_s']:10.5f} {ratio:6.2f}")
    lines.append("  by family (profiled step):")
    for name, t in r["families"].items():
        lines.append(f"    {name:13s} {t:9.4f} s {100 * t / wall:6.1f}%")
    lines.append(f"    {'sum':13s} {sum(r['families'].values()):9.4f} s (= the profiled step)")
    lines.append("  the rest's biggest ops (self time):")
    lines.extend(f"    {name[:60]:60s} {t:9.4f} s {100 * t / wall:6.1f}%  {family(name)}"
                 for name, t in r["top_other_ops"])
    return "\n".join(lines)
