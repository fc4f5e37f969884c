"""ALiBi attention (BLOOM): torch's SDPA with the additive bias as its mask against Megatron-style unfused
attention (one baddbmm adds the bias, softmax, bmm), forward + backward, in fp32 and under bf16 autocast.

    python -m mtlm.bench.alibi                                  # b=4, 8 heads, s=512, head dim 64, 1 thread
    python -m mtlm.bench.alibi --seq 1024 --threads 2 --reps 9

It decides what `model.attention=auto` should run for an ALiBi model here (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtlm.model.alibi import alibi_causal_bias, alibi_slopes
from mtlm.model.transformer import unfused_attention
from mtlm.parallel.denormals import flush_denormals


def step_time(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, reps: int,
              autocast: bool) -> float:
    """Median seconds of one forward + backward."""
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            # In the model q, k, v come out of the (autocast) qkv GEMM: bf16 under autocast.
            low = [t.to(torch.bfloat16) if autocast else t for t in (q, k, v)]
            y = attend(*low, attn_mask=bias.to(low[0].dtype))
        y.float().sum().backward()
        if i:  # the first is warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    flush_denormals()  # both attentions compared in flushing threads (mtlm/parallel/denormals.py)
    p = argparse.ArgumentParser(prog="python -m mtlm.bench.alibi", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    bias = alibi_causal_bias(torch.tensor(alibi_slopes(args.heads)), args.seq, torch.float32)
    print(f"ALiBi attention fwd+bwd, b={args.batch} heads={args.heads} s={args.seq} d={args.head_dim}, "
          f"{args.threads} thread(s), median of {args.reps}")
    for precision, autocast in (("fp32", False), ("bf16", True)):
        sdpa = step_time(F.scaled_dot_product_attention, q, k, v, bias, args.reps, autocast)
        unfused = step_time(unfused_attention, q, k, v, bias, args.reps, autocast)
        print(f"  {precision}: sdpa {sdpa * 1e3:7.1f} ms   unfused {unfused * 1e3:7.1f} ms   "
              f"sdpa/unfused {sdpa / unfused:.2f}")


if __name__ == "__main__":
    main()
