"""This machine, measured once and cached (like the GEMM probe of mtlm/metrics/flops.py): what `cpu_local`
leaves null. Cores and RAM are read; the GEMM rate per core and dtype comes from flops.py's probe; the gloo
all-reduce between two local processes is timed at two sizes (latency and bandwidth); the calibration point is
a short train.py run, made by the first plan that needs it (or again by `plan.calibrate=true`).

Cache: gemm_probe.json (flops.py) and plan_probe.json in $MTLM_CACHE_DIR or ~/.cache/mtlm, keyed by CPU
model and torch version. Delete the file to measure again (a busy machine measures low: the load average at
measuring time is kept next to each value).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtlm.metrics import flops
from mtlm.parallel.launch import launch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CACHE_FILE = "plan_probe.json"
# gloo all-reduce sizes: the small one is all latency, the large one mostly bandwidth.
SMALL_BYTES, LARGE_BYTES = 4 * 1024, 16 * 1024 * 1024


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ram_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def gemm_tflops_per_core(dtype: str) -> float:
    return flops.cpu_gemm_tflops_per_core(DTYPES[dtype])


def _key() -> str:
    return f"{flops._cpu_model_name()}|torch {torch.__version__}"


def _cache_path() -> Path:
    return flops._cache_dir(None) / CACHE_FILE


def _cached(name: str, measure: Any) -> dict:
    """cache[key][name], measured by `measure()` (-> dict) when absent; under flops.py's file lock."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with flops._file_lock(path.with_suffix(".lock")):
        cache = flops._read_json(path)
        entry = cache.get(_key(), {}).get(name)
        if isinstance(entry, dict):
            return entry
    value = measure()  # outside the lock: the calibration run itself probes the GEMM rate under that lock
    value.update(measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), loadavg_1m=os.getloadavg()[0])
    with flops._file_lock(path.with_suffix(".lock")):
        cache = flops._read_json(path)
        cache.setdefault(_key(), {})[name] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return value


def cached_only(name: str) -> dict | None:
    entry = flops._read_json(_cache_path()).get(_key(), {}).get(name)
    return entry if isinstance(entry, dict) else None


# ---- gloo all-reduce -------------------------------------------------------------------------------------


def _gloo_worker(env: Any, out_file: str, reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    try:
        times = {}
        for nbytes in (SMALL_BYTES, LARGE_BYTES):
            x = torch.ones(nbytes // 4)
            dist.all_reduce(x)  # connection set-up
            best = float("inf")
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                best = min(best, time.perf_counter() - t0)
            times[nbytes] = best
        if env.rank == 0:
            Path(out_file).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def measure_gloo(reps: int = 20) -> dict:
    """Latency per ring step (us) and bandwidth (GB/s) of gloo between two local processes, from the best of
    `reps` all-reduces at two sizes: t = 2 steps x latency + bytes sent / bandwidth (perf.py's ring model)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gloo.json")
        launch(_gloo_worker, 2, (out, reps))
        times = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    sent_small, sent_large = SMALL_BYTES, LARGE_BYTES  # 2(n-1)/n = 1 at n = 2
    bw = (sent_large - sent_small) / max(times[LARGE_BYTES] - times[SMALL_BYTES], 1e-9)
    latency = max(0.0, times[SMALL_BYTES] - sent_small / bw) / 2
    return {"bw_gbps": bw / 1e9, "step_latency_us": latency * 1e6,
            "allreduce_s": {str(k): v for k, v in times.items()}}


def gloo_allreduce() -> dict:
    return _cached("gloo_allreduce", measure_gloo)


# ---- attention dropout ---------------------------------------------------------------------------------

DROPOUT_PROBE_SHAPE = (8, 8, 256, 32)  # batch, heads, seq, head dim: weak_scaling_cpu's attention


def measure_attention_dropout(reps: int = 5) -> dict:
    """ns per attention score that dropout adds to one SDPA forward (one thread, fp32, inputs needing grad as
    in training): the best of `reps` forwards with dropout 0.1 minus the best without."""
    import torch.nn.functional as F

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v = (torch.randn(*DROPOUT_PROBE_SHAPE, requires_grad=True) for _ in range(3))
        best = {}
        for p in (0.0, 0.1):
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, dropout_p=p)
                times.append(time.perf_counter() - t0)
            best[p] = min(times[1:])
    finally:
        torch.set_num_threads(previous)
    b, h, s, _ = DROPOUT_PROBE_SHAPE
    return {"ns_per_score": max(0.0, best[0.1] - best[0.0]) / (b * h * s * s) * 1e9,
            "forward_s": {"0.0": best[0.0], "0.1": best[0.1]}}


def attention_dropout_ns_per_score() -> float:
    return _cached("attention_dropout", measure_attention_dropout)["ns_per_score"]


# ---- the calibration run ---------------------------------------------------------------------------------


def calibration_ranks(cal: Any) -> int:
    return int(cal.ranks) if cal.ranks else cores()


def calibration_overrides(cal: Any, steps: int) -> list[str]:
    """train.py overrides that run the calibration point's shape on `calibration_ranks` ranks at once."""
    ranks = calibration_ranks(cal)
    return [f"model.num_layers={cal.num_layers}", f"model.hidden_size={cal.hidden_size}",
            f"model.num_attention_heads={cal.num_attention_heads}", f"model.seq_length={cal.seq_length}",
            f"model.max_position_embeddings={cal.seq_length}", f"model.vocab_size={cal.vocab_size}",
            f"model.dropout={cal.dropout}", f"trainer.micro_batch_size={cal.batch}",
            f"trainer.global_batch_size={cal.batch * ranks}",
            f"trainer.activation_checkpointing={str(cal.recompute).lower()}", f"precision={cal.precision}",
            f"trainer.num_threads={cal.threads}", "trainer.device=cpu", "parallel.tensor=1", f"parallel.data={ranks}",
            f"trainer.max_steps={steps}", "trainer.timing_warmup_steps=3", "trainer.eval_interval=100000",
            "trainer.eval_iters=1", f"trainer.log_interval={steps}", "logger=none", "checkpoint.save=false",
            "model.name=plan_calibration"]


def _wait(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    """Wait for `proc`, showing one progress line on stderr (rewritten in place on a terminal, once a
    minute otherwise, so a log gets a few lines and not one per second)."""
    start, shown = time.monotonic(), 0.0
    tty = sys.stderr.isatty()
    while True:
        try:
            out, err = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - start
            if tty:
                print(f"\r{what}: {elapsed:.0f} s", end="", file=sys.stderr, flush=True)
            elif elapsed - shown >= 60:
                shown = elapsed
                print(f"{what}: {elapsed:.0f} s", file=sys.stderr, flush=True)
    print(f"{chr(13) if tty else ''}{what}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return out, err


def measure_calibration(cal: Any, steps: int) -> dict:
    """Run train.py on the calibration shape for `steps` steps; its summary's model TFLOP/s per device."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(root / "train.py"), *calibration_overrides(cal, steps), f"hydra.run.dir={tmp}",
               f"checkpoint.dir={tmp}/ck"]
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = _wait(proc, f"calibrating ({steps} train.py steps on {calibration_ranks(cal)} rank(s))")
        summary_path = Path(tmp) / "summary.json"
        if proc.returncode != 0 or not summary_path.is_file():
            tail = (err or out).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the calibration run failed: {tail[0]}")
        summary = json.loads(summary_path.read_text())
    return {"tflops_per_device": summary["tflops_per_device"], "step_time_s": summary.get("step_time_s"),
            "steps": steps, "command": "train.py " + " ".join(calibration_overrides(cal, steps))}


def calibration_key(cal: Any) -> str:
    return (f"calibration|l{cal.num_layers}h{cal.hidden_size}a{cal.num_attention_heads}s{cal.seq_length}"
            f"v{cal.vocab_size}b{cal.batch}d{cal.dropout}|{cal.precision}|rc{int(cal.recompute)}|th{cal.threads}"
            f"|r{calibration_ranks(cal)}")


def calibration(cal: Any, measure: bool, steps: int) -> dict | None:
    """The cached measured calibration point; measured now when `measure` (plan.calibrate=true)."""
    if measure:
        path = _cache_path()
        with flops._file_lock(path.with_suffix(".lock")):  # re-measure on request: drop the old value
            cache = flops._read_json(path)
            if cache.get(_key(), {}).pop(calibration_key(cal), None) is not None:
                path.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
        return _cached(calibration_key(cal), lambda: measure_calibration(cal, steps))
    return cached_only(calibration_key(cal))
