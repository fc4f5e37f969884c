"""Denormal floats flushed to zero in every thread that computes (issue 26).

A GEMM whose inputs hold denormals (|x| < 1.2e-38 in fp32, e.g. a log-softmax gradient far from the target)
runs up to ~160x slower on some x86 CPUs (Intel Xeon AVX-512 measured in issue 26; AMD EPYC showed no cliff).
Flushing them (FTZ: results that would be denormal become 0; DAZ: denormal inputs read as 0) costs nothing in
a model's accuracy: they are below fp32's normal range, and bf16/fp16 training never sees them.

The flush mode is a per-thread CPU register (MXCSR): `torch.set_flush_denormal(True)` sets it in the calling
thread only, and threads created later inherit it from their creator. Torch creates its intra-op pool on the
first parallel op, so the flush must come before that: first thing in every process that computes
(tests/test_denormals.py checks both halves of this claim on the installed torch).

MTLM_FLUSH_DENORMALS=0 keeps denormals (to measure the cliff, or to compare numerics).
"""

from __future__ import annotations

import os

import torch

# Elements per intra-op chunk in the probe: above ATen's grain size (32768), so every thread gets one chunk.
_CHUNK = 65536


def flush_wanted() -> bool:
    return os.environ.get("MTLM_FLUSH_DENORMALS", "1") != "0"


def flush_denormals() -> bool:
    """Flush denormals in this thread (and the threads it creates from now on), unless MTLM_FLUSH_DENORMALS=0.
    Call before the first parallel torch op of the process. Returns whether the flush is on."""
    return torch.set_flush_denormal(flush_wanted())


def threads_flushing(threads: int | None = None) -> list[bool]:
    """Whether each of `threads` intra-op threads (default: torch's count) flushes denormals.

    One element-wise op over `threads` chunks of _CHUNK elements, so OpenMP's static schedule gives each thread
    one chunk: a chunk with a denormal input left non-zero (no DAZ) or a denormal product (no FTZ) names a
    thread that computes with denormals. It uses the pool at the given size (setting the size first)."""
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = _CHUNK * threads
        daz = torch.full((n,), 1e-39).mul_(1.0)  # a denormal input read as 0 only under DAZ
        ftz = torch.full((n,), 1e-30).mul_(1e-10)  # a normal product below the range: 0 only under FTZ
        flushed = (daz == 0) & (ftz == 0)
        return [bool(chunk.all()) for chunk in flushed.split(_CHUNK)]
    finally:
        torch.set_num_threads(previous)


def flush_warning(threads: int | None = None) -> str | None:
    """One line when the flush is wanted but some compute thread does not flush (its pool was made before
    flush_denormals ran), else None."""
    if not flush_wanted():
        return None
    state = threads_flushing(threads)
    if all(state):
        return None
    return (f"warning: {state.count(False)} of {len(state)} compute threads keep denormal floats (torch's thread "
            "pool started before mtlm.parallel.denormals.flush_denormals ran): GEMMs with denormal inputs may "
            "run many times slower on this CPU")
