"""FLOPs accounting: model/hardware FLOPs per iteration, throughput, MFU and the peak to divide by.

The formulas are Megatron-LM's (Narayanan et al. 2021, also used by the Megatron-LM code): a GPT layer does
`24*B*s*h^2 + 4*B*s^2*h` forward FLOPs, the logit GEMM `2*B*s*h*V`, and backward costs twice forward. Hence
`72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h))` for one iteration (forward + backward). Full activation recompute
reruns every layer's forward once more (but not the logit GEMM), giving the `96 ... V/(16*l*h)` variant.
B is the *global* batch in sequences, so dividing by (iteration time x all devices) gives per-device rates.

Peaks: a table of dense bf16/fp16 tensor-core numbers for GPUs, and for CPUs a one-off GEMM probe of this
machine (there is no honest table for CPUs), cached per CPU model / torch version / dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch


def model_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """FLOPs the model needs for one forward + backward over `batch` sequences (no recompute)."""
    b, s, L, h, v = batch, seq, layers, hidden, vocab  # the paper's symbols (L: `l` reads as `1`)
    return 72.0 * b * s * L * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * L * h))


def hardware_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                                 recompute: bool) -> float:
    """FLOPs the hardware actually executes: with full activation recompute one extra forward per layer."""
    if not recompute:
        return model_flops_per_iteration(batch, seq, layers, hidden, vocab)
    b, s, L, h, v = batch, seq, layers, hidden, vocab
    return 96.0 * b * s * L * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * L * h))


# BERT (issue 14). Masked-LM samples predict 15% of their positions (mtlm/data/bert.py), and mtlm's LM head runs
# on those positions only; Megatron-LM's runs on all of them and discards the rest.
BERT_MASKED_FRACTION = 0.15


def _bert_heads_flops(batch: int, seq: int, hidden: int, vocab: int, masked_fraction: float) -> float:
    """Forward + backward FLOPs of BERT's heads: the LM head on the masked positions (dense h -> h, then the
    logits against the embedding, 2h^2 + 2hV per position) and the pooler (2h^2) plus the binary head (4h) on
    the [CLS] position; backward costs twice forward. Layer norms, GeLU and the loss are not counted."""
    b, s, h, v = batch, seq, hidden, vocab
    return 3.0 * (2.0 * b * masked_fraction * s * (h * h + h * v) + 2.0 * b * (h * h + 2 * h))


def bert_model_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                                   masked_fraction: float = BERT_MASKED_FRACTION) -> float:
    """BERT's model FLOPs for one forward + backward over `batch` sequences. The layers are GPT's
    (`72*B*s*l*h^2*(1 + s/(6h))`: bidirectional attention computes all s^2 scores, which that formula counts
    for GPT too); the logit GEMM over every position is replaced by the LM head over the masked ones."""
    b, s, L, h = batch, seq, layers, hidden
    return 72.0 * b * s * L * h * h * (1.0 + s / (6.0 * h)) + _bert_heads_flops(b, s, h, vocab, masked_fraction)


def bert_hardware_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                                      recompute: bool, masked_fraction: float = BERT_MASKED_FRACTION) -> float:
    """BERT's executed FLOPs: with full activation recompute every layer's forward runs once more (96 for 72)."""
    if not recompute:
        return bert_model_flops_per_iteration(batch, seq, layers, hidden, vocab, masked_fraction)
    b, s, L, h = batch, seq, layers, hidden
    return 96.0 * b * s * L * h * h * (1.0 + s / (6.0 * h)) + _bert_heads_flops(b, s, h, vocab, masked_fraction)


def tflops_per_device(flops_per_iter: float, iter_time_s: float, devices: int) -> float:
    """Achieved TFLOP/s per device, with `flops_per_iter` counted over the whole global batch."""
    if iter_time_s <= 0 or devices <= 0:
        raise ValueError(f"need iter_time_s > 0 and devices > 0, got {iter_time_s}, {devices}")
    return flops_per_iter / (iter_time_s * devices) / 1e12


def aggregate_pflops(flops_per_iter: float, iter_time_s: float) -> float:
    """Achieved PFLOP/s summed over all devices (the paper's "15.1 PFLOP/s on 512 GPUs")."""
    if iter_time_s <= 0:
        raise ValueError(f"need iter_time_s > 0, got {iter_time_s}")
    return flops_per_iter / iter_time_s / 1e15


def mfu(tflops_per_device: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation as a fraction (0.3 = 30% of peak). NaN when the peak is unknown (NaN)."""
    if math.isnan(peak_tflops):
        return math.nan
    if peak_tflops <= 0:
        raise ValueError(f"need peak_tflops > 0, got {peak_tflops}")
    return tflops_per_device / peak_tflops


# --------------------------------------------------------------------------------------------------------
# Peaks

# Dense (no sparsity) bf16/fp16 tensor-core TFLOP/s per GPU, from NVIDIA's datasheets. The NVL cards (PCIe
# boards with an NVLink bridge, 350-600 W) are listed by NVIDIA at 1,671 TFLOP/s bf16 *with* 2:4 sparsity, i.e.
# 835.5 dense (H100 and H200 product pages; issue 17): ~15% below the SXM parts' 989.
PEAK_TFLOPS: dict[str, float] = {
    "V100": 125.0,
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.5,
    "H200": 989.0,
    "H200 NVL": 835.5,
}

# Substring of torch.cuda.get_device_name() -> PEAK_TFLOPS key, most specific first: "NVIDIA H100 PCIe" and
# "NVIDIA H100 NVL" must not fall through to the generic "H100", which is the SXM part ("NVIDIA H100 80GB HBM3").
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h100 pcie", "H100 PCIe"),
    ("h100 nvl", "H100 NVL"),
    ("h100", "H100 SXM"),
    ("h200 nvl", "H200 NVL"),
    ("h200", "H200"),
    ("a100", "A100"),
    ("v100", "V100"),
)


def is_mig_slice(name: str) -> bool:
    """A MIG instance ("NVIDIA A100-SXM4-40GB MIG 1g.5gb") owns only some of the card's SMs, so the whole
    card's peak would understate its MFU by up to 7x; its peak is reported as unknown instead."""
    return re.search(r"\bmig\b", name, re.IGNORECASE) is not None


def _table_key_for_device_name(name: str) -> str | None:
    if is_mig_slice(name):
        return None
    lowered = name.lower()
    for pattern, key in _NAME_PATTERNS:
        if pattern in lowered:
            return key
    return None


def peak_tflops_for_device_name(name: str) -> float | None:
    """Dense bf16/fp16 peak for a CUDA device name such as "NVIDIA A100-SXM4-80GB"; None if unknown."""
    key = _table_key_for_device_name(name)
    return None if key is None else PEAK_TFLOPS[key]


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("MTLM_CACHE_DIR") or "~/.cache/mtlm"
    return Path(cache_dir).expanduser()


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def _measure_gemm_tflops(dtype: torch.dtype, budget_s: float = 1.0, max_n: int = 2048) -> float:
    """Best single-GEMM rate of the *current* thread setting, in TFLOP/s.

    The size grows from 256 until one GEMM takes ~20 ms (1024-2048 for fp32/bf16 on a modern core), so a
    dtype the CPU only emulates (fp16 on most x86) does not turn a 1 s probe into a minute. Best-of rather
    than mean: we want the peak, and other processes on the machine only ever make a repetition slower.
    """
    n = 256
    gen = torch.Generator().manual_seed(0)
    while True:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up: first call pays for packing buffers / kernel selection
        t0 = time.perf_counter()
        torch.mm(a, b)
        if time.perf_counter() - t0 > 0.02 or n >= max_n:
            break
        n *= 2
    best = math.inf
    start = time.perf_counter()
    reps = 0
    while reps < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best / 1e12


def cpu_gemm_tflops_per_core(dtype: torch.dtype = torch.float32,
                             cache_dir: str | os.PathLike | None = None) -> float:
    """This machine's single-core GEMM rate for `dtype` (TFLOP/s), measured once and cached as JSON.

    Cached under `cache_dir` (default: $MTLM_CACHE_DIR, else ~/.cache/mtlm) in gemm_probe.json, keyed by CPU
    model, torch version and dtype. A file lock makes concurrent ranks on one machine measure one at a time
    (each then finds the cache filled): measuring simultaneously would share cores and cache a low value.
    """
    directory = _cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gemm_probe.json"
    key = f"{_cpu_model_name()}|torch {torch.__version__}|{str(dtype).removeprefix('torch.')}"

    with _file_lock(directory / "gemm_probe.lock"):
        cache = _read_json(path)
        entry = cache.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("tflops_per_core"), (int, float)) \
                and entry["tflops_per_core"] > 0:
            return float(entry["tflops_per_core"])
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            value = _measure_gemm_tflops(dtype)
        finally:
            torch.set_num_threads(previous_threads)
        # The load average is kept to explain a low value: a busy machine gives one (delete the file to redo).
        cache[key] = {"tflops_per_core": value, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: re-measure rather than fail a training run over a cache
    return data if isinstance(data, dict) else {}


class _file_lock:
    """Exclusive advisory lock on `path` (no-op where fcntl is missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _file_lock:
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def peak_tflops(device: torch.device, threads: int = 1,
                dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Per-device peak TFLOP/s for MFU, and where it came from ("table:H100 SXM", "cpu-probe:2 threads").

    CUDA: the dense bf16/fp16 table, whatever `dtype` is (the paper's convention; an fp32/TF32 run is thus
    measured against the half-precision peak). Unknown GPUs and MIG slices give NaN, so MFU reads as unknown
    rather than a guess.
    CPU: the probed per-core rate for `dtype` times the threads this rank uses.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = _table_key_for_device_name(name)
        if key is None:
            return math.nan, f"unknown:{name}"
        return PEAK_TFLOPS[key], f"table:{key}"
    if device.type == "cpu":
        threads = max(1, int(threads))
        per_core = cpu_gemm_tflops_per_core(dtype)
        return per_core * threads, f"cpu-probe:{threads} thread{'s' if threads > 1 else ''}"
    return math.nan, f"unknown:{device.type}"
