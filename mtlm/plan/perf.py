"""The performance model: small formulas, every constant named (docs/planner.md gives each one's source).

    step time = compute + tensor-parallel all-reduces + the data-parallel all-reduce's exposed part

- compute: the FLOPs the hardware executes per device (activation recompute included) at an achievable
  fraction `eta` of the dense peak; `eta` comes from one calibration point and nothing else is fitted.
- tensor-parallel (§3): per micro-batch and layer 2 all-reduces of b·s·h forward (g after the row-parallel
  GEMMs, compute dtype), 2 backward (f in front of the column-parallel GEMMs: the layer norm's output is fp32
  under autocast, so its gradient is too), 2 more forward when the layer is recomputed; the ends add the
  vocab-parallel embedding's g (fp32) forward, the tied output layer's f (fp32) backward and the fused
  cross-entropy's 3 all-reduces of b·s fp32 values (max, sum of exps, target logit). They block the compute
  stream, so they add to the step.
- data-parallel: one ring all-reduce of the fp32 gradients per step, in DDP buckets that start as soon as
  their gradients are ready during the last micro-batch's backward; only what outlasts that backward shows.

Every all-reduce is a ring: 2(n-1) steps, each sending 1/n of the tensor, so each device sends
2(n-1)/n x the bytes, at the link's bandwidth, plus a fixed and a per-step latency (NCCL's own model).
"""

from __future__ import annotations

from dataclasses import dataclass


def ring_allreduce_bytes_per_device(nbytes: float, ranks: int) -> float:
    """Bytes each device sends (and receives) in a ring all-reduce of an `nbytes` tensor."""
    return 2.0 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def ring_allreduce_time(nbytes: float, ranks: int, bw_gbps: float, step_latency_us: float,
                        base_latency_us: float = 0.0) -> float:
    """Seconds for one ring all-reduce: base + 2(n-1) step latencies + bytes sent / bandwidth."""
    if ranks <= 1:
        return 0.0
    if bw_gbps <= 0:
        raise ValueError(f"need a bandwidth > 0 for an all-reduce over {ranks} ranks, got {bw_gbps}")
    latency = (base_latency_us + 2 * (ranks - 1) * step_latency_us) * 1e-6
    return latency + ring_allreduce_bytes_per_device(nbytes, ranks) / (bw_gbps * 1e9)


@dataclass(frozen=True)
class Collective:
    """`count` all-reduces of `values` elements of `bytes_per_value` bytes each, in one phase."""

    phase: str  # forward | recompute | backward
    what: str
    count: int
    values: int
    bytes_per_value: int

    @property
    def nbytes(self) -> int:
        return self.values * self.bytes_per_value


def tensor_parallel_collectives(layers: int, micro_batch: int, seq: int, hidden: int, compute_bytes: int,
                                recompute: bool, half_model: bool = False) -> list[Collective]:
    """The all-reduces one micro-batch does inside a tensor group (mtlm/model, mtlm/parallel/cross_entropy).
    `half_model`: Megatron-LM's fp16 code, whose model is in half precision, so its embedding output and the
    layer norm's output, and their all-reduces, are fp16 too (cluster.tensor_parallel_fp32: false)."""
    bsh, bs = micro_batch * seq * hidden, micro_batch * seq
    wide = compute_bytes if half_model else 4
    out = [Collective("forward", "layer g (attention out, MLP out)", 2 * layers, bsh, compute_bytes),
           Collective("forward", "embedding g", 1, bsh, wide),
           Collective("forward", "cross-entropy (max, sum exp, target)", 3, bs, 4)]
    if recompute:
        out.append(Collective("recompute", "layer g, rerun", 2 * layers, bsh, compute_bytes))
    out += [Collective("backward", "layer f (qkv in, MLP in; fp32 layer-norm output)", 2 * layers, bsh, wide),
            Collective("backward", "output layer f", 1, bsh, wide)]
    return out


def collectives_time(collectives: list[Collective], ranks: int, bw_gbps: float, step_latency_us: float,
                     base_latency_us: float, phases: tuple[str, ...] = ("forward", "recompute", "backward"),
                     sequence_parallel: bool = False) -> float:
    """Their time in a ring. Under sequence parallelism (Korthikanti et al. 2022 §4.2.2) each all-reduce is a
    reduce-scatter plus an all-gather: the same bytes, twice the launches (counted for every collective, the
    loss's small ones included)."""
    if sequence_parallel:
        return sum(2 * c.count * reduce_scatter_time(c.nbytes, ranks, bw_gbps, step_latency_us, base_latency_us)
                   for c in collectives if c.phase in phases)
    return sum(c.count * ring_allreduce_time(c.nbytes, ranks, bw_gbps, step_latency_us, base_latency_us)
               for c in collectives if c.phase in phases)


def reduce_scatter_time(nbytes: float, ranks: int, bw_gbps: float, step_latency_us: float,
                        base_latency_us: float) -> float:
    """A ring reduce-scatter (or all-gather) of an `nbytes` tensor: (n-1) steps of S/n bytes, half a ring
    all-reduce's bytes and steps, one launch."""
    if ranks <= 1:
        return 0.0
    return (base_latency_us + (ranks - 1) * step_latency_us) * 1e-6 + (ranks - 1) / ranks * nbytes / (bw_gbps * 1e9)


def collectives_bytes(collectives: list[Collective], ranks: int) -> float:
    """Bytes each device sends for these all-reduces (ring)."""
    return sum(c.count * ring_allreduce_bytes_per_device(c.nbytes, ranks) for c in collectives)


def data_parallel_bandwidth(intra_bw_gbps: float, node_bw_gbps: float, groups_per_node: int) -> float:
    """GB/s of a data-parallel ring that spans nodes: NCCL's rings each cross a node boundary once per channel,
    spread over the node's NICs, so a ring can use the node's whole network bandwidth, shared by the groups
    all-reducing at the same time (`groups_per_node`), and never faster than the link inside the node."""
    return min(intra_bw_gbps, node_bw_gbps / groups_per_node)


def achievable_fraction(model_tflops: float, model_flops: float, hardware_flops: float, peak_tflops: float) -> float:
    """eta: the fraction of peak the hardware ran at in the calibration point. Its `model_tflops` counts
    model FLOPs (as mtlm reports them); the hardware executed `hardware_flops` in the same time."""
    if model_tflops <= 0 or peak_tflops <= 0:
        raise ValueError(f"need a calibration rate > 0 and a peak > 0, got {model_tflops}, {peak_tflops}")
    return model_tflops * (hardware_flops / model_flops) / peak_tflops


def compute_time(hardware_flops_per_device: float, peak_tflops: float, eta: float) -> float:
    return hardware_flops_per_device / (eta * peak_tflops * 1e12)


def attention_scores(layers: int, micro_batch: int, heads_per_device: int, seq: int) -> int:
    """Attention scores one forward of one micro-batch computes on a device: b·(a/t)·s² per layer."""
    return layers * micro_batch * heads_per_device * seq * seq


def attention_dropout_time(scores: int, ns_per_score: float, forwards: int) -> float:
    """Seconds of attention-dropout work that the FLOPs do not count: `forwards` passes over `scores` scores
    (1, or 2 when the layers are recomputed: the recompute draws every mask again)."""
    return scores * ns_per_score * 1e-9 * forwards


def backward_fraction(model_flops: float, hardware_flops: float) -> float:
    """Share of the executed FLOPs that run in backward (the recompute included): forward is 1/3 of the
    model FLOPs (backward costs twice forward), the rest runs after the loss."""
    return (hardware_flops - model_flops / 3.0) / hardware_flops


def exposed_data_parallel_time(grad_bytes: float, bucket_bytes: float, allreduce_s: float,
                               backward_s: float) -> float:
    """What DDP's gradient all-reduce adds to a step: gradients become ready at an even pace over the last
    micro-batch's backward (`backward_s`) and buckets go out in order, one at a time. If the link keeps up,
    only the last bucket's all-reduce shows; else the whole all-reduce, less the backward it overlapped."""
    if allreduce_s <= 0:
        return 0.0
    bucket = min(1.0, bucket_bytes / grad_bytes)
    return max(allreduce_s * bucket, allreduce_s - backward_s * (1.0 - bucket))


def elementwise_bytes_per_layer(seq: int, micro_batch: int, hidden: int, heads: int, tensor: int,
                                bytes_per_value: int, dropout: bool, recompute: bool, sequence_parallel: bool) -> float:
    """HBM bytes one transformer layer's memory-bound (non-GEMM) work moves for one micro-batch on a device:
    forward, the recompute's forward again, and backward (our count of Megatron's fused kernels).

    Per attention score (b·(a/t)·s², e bytes each): the fused scale-mask-softmax reads and writes one value,
    dropout reads one and writes one plus a 1-byte mask (forward 4e+1, 2e without dropout); backward reads the
    gradient and the mask and writes one (dropout), reads gradient and probabilities and writes one (softmax):
    5e+1 (3e). Per stream value (s·b·h, on every tensor rank, 1/t of them under sequence parallelism): two layer
    norms (read, write: 2e each) and two bias-dropout-adds (two reads, a write, a mask: 3e+1 each) forward,
    10e+2, and as much backward. Per MLP value (4·s·b·h/t): the fused bias-GeLU, 2e forward, 3e backward.
    """
    e = bytes_per_value
    forwards = 2 if recompute else 1
    scores = micro_batch * (heads // tensor) * seq * seq
    score_bytes = ((4 * e + 1) * forwards + 5 * e + 1) if dropout else (2 * e * forwards + 3 * e)
    stream = seq * micro_batch * hidden / (tensor if sequence_parallel else 1)
    stream_bytes = ((10 * e + 2) if dropout else 10 * e) * (forwards + 1)
    mlp = 4 * seq * micro_batch * hidden / tensor
    return scores * score_bytes + stream * stream_bytes + mlp * (2 * e * forwards + 3 * e)


def memory_bound_time(nbytes: float, memory_bw_gbps: float | None) -> float:
    """Seconds to move `nbytes` through device memory at its bandwidth; 0 where the cluster gives none."""
    return nbytes / (memory_bw_gbps * 1e9) if memory_bw_gbps else 0.0
