"""A config and a cluster in, the plan out: sizing (sizing.py) and the step time (perf.py) per device.

`make_plan(cfg)` returns the dict written to plan.json. Every number is a prediction except what the cluster
file or the probe states; the calibration point is the only measured throughput it uses.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from mtlm.data.build import build_data
from mtlm.errors import ConfigError
from mtlm.metrics import flops, memory
from mtlm.model.spec import spec_for
from mtlm.parallel.state import Grid
from mtlm.plan import perf, pipeline, probe, sizing
from mtlm.train.objective import objective_for

GB = 2**30  # GiB, as GPU memory sizes are quoted
# train.py warns when the chosen precision's GEMM rate is below this share of fp32's on a CPU.
SLOW_PRECISION_RATIO = 0.5
# cluster.grad_allreduce: when the data-parallel gradient all-reduce runs (perf.grad_allreduce_exposed).
GRAD_ALLREDUCE = ("overlapped", "after_backward")


# The vocabularies the paper trained its presets with (conf/model): GPT-2's byte-level BPE, 50,257 tokens (§5,
# Table 1's 51,200 is it padded to 128 x 8 tensor ranks, the rule mtlm pads by); BERT's uncased WordPiece,
# 30,522 (§5.3, the dictionary of NVIDIA's released BERT 345M, ../shared/reference/released-models.md).
GPT2_VOCAB, BERT_VOCAB = 50_257, 30_522
PAPER_VOCAB = {**dict.fromkeys(("gpt2_345m", "gpt2_1.2b", "gpt2_2.5b", "gpt2_4.2b", "gpt2_8.3b"), GPT2_VOCAB),
               **dict.fromkeys(("bert_336m", "bert_1.3b", "bert_3.9b"), BERT_VOCAB)}


def _trains_tokenizer(cfg: Any) -> bool:
    tok = cfg.data.tokenizer
    return tok is None or (not isinstance(tok, str) and tok.get("type") == "sentencepiece" and tok.get("model") is None)


def plan_vocab_size(cfg: Any) -> tuple[int, str]:
    """(vocabulary, where it comes from) for the plan: model.vocab_size; else, for a paper preset planned
    without data (the built-in corpus and the BPE model mtlm trains on it), the paper's (issue 25: the 8.3B plan
    took the built-in corpus's 4,096 and planned 8.17B parameters); else the vocabulary train.py would use:
    data.vocab_size for the BPE model mtlm trains (exactly that many pieces), else the tokenizer train.py would
    load (built as it does)."""
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size), "model.vocab_size"
    if _trains_tokenizer(cfg):
        if not cfg.data.paths and not cfg.data.get("blend") and cfg.model.name in PAPER_VOCAB:
            vocab = PAPER_VOCAB[cfg.model.name]
            return vocab, f"the paper's {'GPT-2 BPE' if vocab == GPT2_VOCAB else 'BERT WordPiece'}, no data given"
        return int(cfg.data.vocab_size), "data.vocab_size"

    return int(build_data(cfg.data, cfg.model.seq_length, cfg.trainer.seed).tokenizer.vocab_size), "the tokenizer's"


def resolve_cluster(cfg: Any) -> dict[str, Any]:
    """The cluster's numbers with every null filled in by this machine's probe (cpu_local), and each one's
    source ("config" or "probe")."""
    c = cfg.cluster
    out: dict[str, Any] = {"name": c.name, "device": c.device, "nodes": c.nodes, "sources": {}}

    def take(key: str, value: Any, probed: Any) -> Any:
        if value is not None:
            out["sources"][key] = "config"
            return value
        out["sources"][key] = "probe"
        return probed()

    out["devices_per_node"] = take("devices_per_node", c.devices_per_node, probe.cores)
    out["device_memory_gb"] = take("device_memory_gb", c.device_memory_gb, probe.ram_gb)
    out["peak_tflops"] = {dt: take(f"peak_tflops.{dt}", c.peak_tflops.get(dt),
                                   lambda dt=dt: probe.gemm_tflops_per_core(dt)) for dt in ("fp32", "bf16", "fp16")}
    if c.intra_node_bw_gbps is None or c.intra_node_step_latency_us is None:
        gloo = probe.gloo_allreduce()
    out["intra_node_bw_gbps"] = take("intra_node_bw_gbps", c.intra_node_bw_gbps, lambda: gloo["bw_gbps"])
    out["intra_node_step_latency_us"] = take("intra_node_step_latency_us", c.intra_node_step_latency_us,
                                             lambda: gloo["step_latency_us"])
    out["attention_dropout_ns_per_score"] = take("attention_dropout_ns_per_score", c.attention_dropout_ns_per_score,
                                                 probe.attention_dropout_ns_per_score)
    out["memory_bw_gbps"] = c.get("memory_bw_gbps")
    for key in ("inter_node_bw_gbps", "inter_node_step_latency_us", "collective_base_latency_us"):
        out[key] = c[key]
    out["devices"] = out["devices_per_node"] * c.nodes
    return out


def calibration_eta(cfg: Any, cluster: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """eta, the achievable fraction of peak, from the cluster's one calibration point (a GPT run)."""
    cal = cfg.cluster.calibration
    rate, source = cal.tflops_per_device, cal.source
    if rate is None:
        steps = cfg.plan.calibration_steps
        try:
            measured = probe.calibration(cal, bool(cfg.plan.calibrate), steps)
            if measured is None:  # the first plan on this machine: measure the point now, not stop (issue 25)
                print(f"note: cluster {cfg.cluster.name} has no calibration point on this machine yet: measuring "
                      f"it now ({steps} steps of train.py on the calibration shape, cached for later plans)",
                      file=sys.stderr, flush=True)
                measured = probe.calibration(cal, True, steps)
        except RuntimeError as err:  # the calibration run failed: its last line, not a traceback
            raise ConfigError("cluster.calibration", str(err)) from None
        rate, source = measured["tflops_per_device"], f"measured here: {measured['command']}"
    model = flops.model_flops_per_iteration(cal.batch, cal.seq_length, cal.num_layers, cal.hidden_size,
                                            cal.vocab_size)
    hardware = flops.hardware_flops_per_iteration(cal.batch, cal.seq_length, cal.num_layers, cal.hidden_size,
                                                  cal.vocab_size, cal.recompute)
    peak = cluster["peak_tflops"][cal.precision] * (cal.threads if cluster["device"] == "cpu" else 1)
    # The calibration run's attention dropout (once, in its forward) is not FLOPs: take it out of its step
    # time before the FLOPs give eta, as make_plan adds it back per layout.
    dropout_s = perf.attention_dropout_time(
        perf.attention_scores(cal.num_layers, cal.batch, cal.num_attention_heads, cal.seq_length),
        cluster["attention_dropout_ns_per_score"], 1) if cal.dropout > 0 else 0.0
    if cal.get("rate_counts_recompute", False):  # SC'21's Eq. 3 rate: in mtlm's model FLOPs
        rate = rate * model / hardware
    step_s = model / (rate * 1e12)  # the calibration run's measured step
    dp_s = calibration_allreduce_time(cfg, cluster)
    # Its memory-bound work runs at the memory bandwidth, not at eta x peak (perf.elementwise_bytes_per_layer).
    elementwise_s = cal.num_layers * perf.memory_bound_time(perf.elementwise_bytes_per_layer(
        cal.seq_length, cal.batch, cal.hidden_size, cal.num_attention_heads, 1, sizing.compute_bytes(cal.precision),
        cal.dropout > 0, cal.recompute, False), cluster["memory_bw_gbps"])
    rate_without_dropout = model / ((step_s - dropout_s - dp_s - elementwise_s) * 1e12)
    eta = perf.achievable_fraction(rate_without_dropout, model, hardware, peak)
    return eta, {"tflops_per_device": rate, "source": source, "eta": eta, "precision": cal.precision,
                 "attention_dropout_s": dropout_s, "data_parallel_s": dp_s, "elementwise_s": elementwise_s}


def calibration_allreduce_time(cfg: Any, cluster: dict[str, Any]) -> float:
    """The gradient all-reduce inside a data-parallel calibration run's step (0 for one device, or when the
    cluster's code overlaps it with backward): the compute dtype's bytes of the model (GPT, no tensor split)
    over `data` ranks, across nodes at the node's network bandwidth (one data-parallel group per node)."""
    cal = cfg.cluster.calibration
    data = int(cal.get("data", 1) or 1)
    if data == 1 or cfg.cluster.get("grad_allreduce", "overlapped") != "after_backward":
        return 0.0
    params = memory.parameters_per_device(cal.num_layers, cal.hidden_size, cal.vocab_size, cal.seq_length, 1)
    link = ((min(cluster["intra_node_bw_gbps"], cluster["inter_node_bw_gbps"]), cluster["inter_node_step_latency_us"])
            if data > cluster["devices_per_node"] else
            (cluster["intra_node_bw_gbps"], cluster["intra_node_step_latency_us"]))
    return perf.ring_allreduce_time(sizing.compute_bytes(cal.precision) * params, data, *link,
                                    cluster["collective_base_latency_us"])


def check_layout(cfg: Any, cluster: dict[str, Any]) -> None:
    grid = Grid.of(cfg.parallel)
    if grid.world > cluster["devices"]:
        raise ConfigError("parallel.data", f"{grid.describe()} devices, but cluster "
                          f"{cluster['name']} has {cluster['devices']} ({cluster['nodes']} node(s) x "
                          f"{cluster['devices_per_node']})")


def threads_per_device(cfg: Any, cluster: dict[str, Any]) -> int:
    """CPU: a device is one rank; its threads as train.py gives them (mtlm/parallel/launch.py)."""
    if cluster["device"] != "cpu":
        return 1
    ranks_here = min(Grid.of(cfg.parallel).world, cluster["devices_per_node"])
    return cfg.trainer.num_threads or max(1, cluster["devices_per_node"] // ranks_here)


def make_plan(cfg: Any) -> dict[str, Any]:
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    cluster = resolve_cluster(cfg)
    check_layout(cfg, cluster)
    dtype, recompute = cfg.precision.dtype, bool(t.activation_checkpointing)
    vocab, vocab_source = plan_vocab_size(cfg)
    rank = sizing.size_rank(m, vocab, p.tensor)
    gpt = spec_for(m).family == "gpt"  # the analytic count is GPT-2's
    analytic = sizing.analytic_params_per_rank(m, rank.padded_vocab_size, p.tensor) if gpt else None
    grid = Grid.of(p)
    stages, virtual = grid.pipeline, int(p.get("virtual_stages", 1) or 1)
    schedule, sp = str(p.get("schedule", "1f1b")), bool(p.get("sequence", False))
    micro_steps = t.global_batch_size // (t.micro_batch_size * p.data)  # m: per pipeline, per step
    if stages > 1 or sp:
        mem = sizing.stage_memory_per_device(m, rank, cfg.optimizer, t.micro_batch_size, p.tensor, p.data, dtype,
                                             recompute, t.shard_optimizer, stages, virtual, schedule, micro_steps, sp)
    else:
        mem = sizing.memory_per_device(m, rank, cfg.optimizer, t.micro_batch_size, p.tensor, p.data, dtype,
                                       recompute, t.shard_optimizer)
    total_gb = sum(mem.values()) / GB
    capacity = cluster["device_memory_gb"]

    # Compute: the executed FLOPs of one step, per device, at eta x peak.
    eta, cal = calibration_eta(cfg, cluster)
    threads = threads_per_device(cfg, cluster)
    peak = cluster["peak_tflops"][dtype] * threads
    model_flops, hw_flops = objective_for(m).flops(m, t.global_batch_size, rank.padded_vocab_size, recompute)
    devices = grid.world
    layers_here = m.num_layers // stages  # a pipeline rank runs its l/P layers (all its chunks)
    # Attention dropout beyond its FLOPs: every forward draws the masks, a recompute draws them again.
    scores = perf.attention_scores(layers_here, t.micro_batch_size, m.num_attention_heads // p.tensor, m.seq_length)
    dropout_s = micro_steps * perf.attention_dropout_time(scores, cluster["attention_dropout_ns_per_score"],
                                                          2 if recompute else 1) if m.dropout > 0 else 0.0
    elementwise_s = micro_steps * layers_here * perf.memory_bound_time(perf.elementwise_bytes_per_layer(
        m.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads, p.tensor,
        sizing.compute_bytes(dtype), m.dropout > 0, recompute, sp), cluster["memory_bw_gbps"])
    compute_s = perf.compute_time(hw_flops / devices, peak, eta) + dropout_s + elementwise_s

    # Tensor-parallel all-reduces: micro-batches per step x one micro-batch's collectives, inside a node.
    colls = perf.tensor_parallel_collectives(layers_here, t.micro_batch_size, m.seq_length, m.hidden_size,
                                             sizing.compute_bytes(dtype), recompute,
                                             half_model=not cfg.cluster.get("tensor_parallel_fp32", True))
    intra = (cluster["intra_node_bw_gbps"], cluster["intra_node_step_latency_us"],
             cluster["collective_base_latency_us"])
    if p.tensor > cluster["devices_per_node"]:  # the paper keeps a tensor group inside one server (Fig. 8)
        intra = (cluster["inter_node_bw_gbps"] / cluster["devices_per_node"], cluster["inter_node_step_latency_us"],
                 cluster["collective_base_latency_us"])
    tp_s = micro_steps * perf.collectives_time(colls, p.tensor, *intra, sequence_parallel=sp)
    tp_bwd_s = perf.collectives_time(colls, p.tensor, *intra, phases=("recompute", "backward"), sequence_parallel=sp)

    # Data-parallel. mtlm (overlapped): DDP all-reduces the fp32 gradients in buckets during the last
    # micro-batch's backward. The 2019 Megatron-LM code (after_backward): one flattened buffer per dtype
    # after backward, in the model's dtype (fp16 gradients under fp16), nothing hidden.
    after = cfg.cluster.get("grad_allreduce", "overlapped") == "after_backward"
    grad_value_bytes = sizing.compute_bytes(dtype) if after else sizing.STATE_BYTES
    grad_bytes = grad_value_bytes * mem["grads"] // sizing.STATE_BYTES
    spans_nodes = p.tensor * p.data > cluster["devices_per_node"]
    if spans_nodes:  # the node's network is shared by the data-parallel groups with members on it (one per
        # tensor rank, Fig. 8); each ring crosses a node boundary once per channel, so one group alone gets all of it
        groups = min(p.tensor, cluster["devices_per_node"])
        dp_link = (perf.data_parallel_bandwidth(cluster["intra_node_bw_gbps"], cluster["inter_node_bw_gbps"], groups),
                   cluster["inter_node_step_latency_us"], cluster["collective_base_latency_us"])
    else:
        dp_link = intra
    dp_s = perf.ring_allreduce_time(grad_bytes, p.data, *dp_link)
    backward_s = compute_s / micro_steps * perf.backward_fraction(model_flops, hw_flops) + tp_bwd_s
    bucket = cfg.plan.ddp_bucket_mb * 1024 * 1024
    # With a pipeline mtlm (and SC'21's code) all-reduces after the schedule: nothing hidden.
    dp_exposed_s = (dp_s if after or stages > 1 else
                    perf.exposed_data_parallel_time(grad_bytes, bucket, dp_s, backward_s))

    # Pipeline: the bubble stretches the busy time, blocking sends between stages (over the network when a
    # stage's t x d ranks fill a node, as the rank order puts stages outermost), the tied embedding's sum.
    bubble_s = (compute_s + tp_s) * (pipeline.step_factor(stages, virtual, micro_steps) - 1)
    across = p.tensor * p.data >= cluster["devices_per_node"]
    hop_link = ((cluster["inter_node_bw_gbps"] / cluster["devices_per_node"], cluster["inter_node_step_latency_us"])
                if across else intra[:2])
    hop_bytes = pipeline.p2p_bytes(t.micro_batch_size, m.seq_length, m.hidden_size, sizing.compute_bytes(dtype),
                                   p.tensor, bool(cfg.cluster.get("p2p_scatter_gather", False)), sp)
    hop_s = pipeline.p2p_time(hop_bytes, *hop_link) if stages > 1 else 0.0
    p2p_s = pipeline.p2p_exposed_time(hop_s, stages, virtual, micro_steps)
    tied_bytes = (pipeline.tied_embedding_allreduce_bytes(rank.padded_vocab_size, m.hidden_size, p.tensor,
                                                          grad_value_bytes) if stages > 1 else 0.0)
    tied_s = (perf.ring_allreduce_time(tied_bytes, 2, *hop_link, cluster["collective_base_latency_us"])
              if stages > 1 else 0.0)

    step_s = compute_s + tp_s + bubble_s + p2p_s + tied_s + dp_exposed_s
    tflops = flops.tflops_per_device(model_flops, step_s, devices)
    tokens = t.global_batch_size * m.seq_length
    plan = {
        "cluster": cluster["name"], "device": cluster["device"], "model": m.name,
        "family": spec_for(m).objective,
        "tensor": p.tensor, "data": p.data, "devices": devices, "precision": dtype, "recompute": recompute,
        "optimizer": m_target(cfg.optimizer), "shard_optimizer": bool(t.shard_optimizer),
        "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "seq_length": m.seq_length, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "threads_per_device": threads,
        "vocab_size": vocab, "vocab_source": vocab_source, "padded_vocab_size": rank.padded_vocab_size,
        "params_total": rank.params_total, "params_per_rank": rank.params_per_rank,
        "params_per_device": mem["params"] // sizing.STATE_BYTES,  # the most loaded pipeline stage's share
        "params_per_rank_analytic": analytic,
        "memory_per_device_gb": total_gb, "memory_parts_gb": {k: v / GB for k, v in mem.items()},
        "device_memory_gb": capacity, "fits": total_gb <= capacity,
        "memory_margin_gb": capacity - total_gb,
        "step_time_s": step_s,
        "step_time_parts_s": {"compute": compute_s, "tensor_parallel": tp_s, "pipeline_bubble": bubble_s,
                              "pipeline_p2p": p2p_s, "tied_embedding": tied_s,
                              "data_parallel_exposed": dp_exposed_s},
        "pipeline": stages, "virtual_stages": virtual, "schedule": schedule, "sequence_parallel": sp,
        "micro_batches": micro_steps, "bubble_fraction": pipeline.step_factor(stages, virtual, micro_steps) - 1,
        "p2p_bytes_per_hop": hop_bytes if stages > 1 else 0.0, "p2p_across_nodes": across and stages > 1,
        "attention_dropout_s": dropout_s, "elementwise_s": elementwise_s,  # both inside "compute"
        "data_parallel_allreduce_s": dp_s, "backward_s": backward_s,
        "tensor_parallel_bytes_per_step": micro_steps * perf.collectives_bytes(colls, p.tensor),
        "tensor_parallel_allreduces_per_step": micro_steps * sum(c.count for c in colls) if p.tensor > 1 else 0,
        "data_parallel_bytes_per_step": perf.ring_allreduce_bytes_per_device(grad_bytes, p.data),
        "grad_allreduce": "after_backward" if after else "overlapped",
        "model_flops_per_step": model_flops, "hardware_flops_per_step": hw_flops,
        "tflops_per_device": tflops, "pflops": flops.aggregate_pflops(model_flops, step_s),
        "tokens_per_s": tokens / step_s, "peak_tflops_per_device": peak, "mfu": flops.mfu(tflops, peak),
        "eta": eta, "calibration": cal,
        "efficiency_vs_calibration": tflops / cal["tflops_per_device"],
        "gemm_tflops_per_core": cluster["peak_tflops"] if cluster["device"] == "cpu" else None,
        "cluster_numbers": {k: v for k, v in cluster.items() if k != "name"},
    }
    if not math.isfinite(step_s):
        raise ValueError(f"the model gave a step time of {step_s}")
    return plan


def m_target(opt: Any) -> str:
    return str(opt._target_)


def slow_precision_line(dtype: str, rates: dict[str, float]) -> str | None:
    """The warning train.py prints when `dtype`'s GEMM rate is far below fp32's on this CPU, or None."""
    if dtype == "fp32" or rates.get(dtype) is None or rates.get("fp32") is None:
        return None
    if rates[dtype] >= SLOW_PRECISION_RATIO * rates["fp32"]:
        return None
    return (f"warning: precision={dtype} runs {rates[dtype] * 1e3:.3g} GFLOP/s per core in a GEMM on this CPU "
            f"against {rates['fp32'] * 1e3:.3g} for fp32 (no native {dtype}): expect a much slower step; "
            f"precision=fp32 is faster here")


def precision_warning(cfg: Any) -> str | None:
    """train.py's one line before training when cfg's precision runs far below fp32 on this CPU (probed GEMM
    rates, cached): an AVX2-only CPU runs a bf16 GEMM ~100x slower than fp32, which looks like a hang."""
    import torch

    dtype = cfg.precision.dtype
    if dtype == "fp32" or (cfg.trainer.device != "cpu" and torch.cuda.is_available()):
        return None

    return slow_precision_line(dtype, {"fp32": probe.gemm_tflops_per_core("fp32"),
                                       dtype: probe.gemm_tflops_per_core(dtype)})
