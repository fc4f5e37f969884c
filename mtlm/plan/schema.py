"""The typed `cluster` and `plan` config groups of `python -m mtlm.plan` (conf/cluster/, conf/plan.yaml).

mtlm/config.py's `Config` holds both as optional nodes that stay null in train.py (conf/config.yaml selects
neither), so train.py composes and validates exactly as before; conf/plan.yaml selects a cluster and sets
`plan`. Every number of a cluster file carries a comment naming its source (datasheet, paper, NCCL's own
performance model, or measured here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtlm.errors import ConfigError


@dataclass
class CalibrationPoint:
    """The one measured or published point the achievable compute fraction comes from (docs/planner.md).

    A GPT run of this shape on one device of the cluster, at `tflops_per_device` model TFLOP/s (mtlm's
    `tflops_per_device`: 72·B·s·l·h²·(...) per step, recompute not counted). null on cpu_local: measured by
    `plan.calibrate=true` and cached.
    """

    source: str = ""
    num_layers: int = 1
    hidden_size: int = 1
    num_attention_heads: int = 1
    seq_length: int = 1
    vocab_size: int = 1  # padded
    batch: int = 1
    recompute: bool = False
    precision: str = "fp16"
    threads: int = 1  # CPU: threads of the calibration rank
    dropout: float = 0.0  # the run's model.dropout (on a CPU the dropout masks cost ~10% of a step)
    # Ranks running the shape at once, data-parallel (one micro-batch of `batch` each); null: every core of
    # the node. A GPU's rate does not depend on its neighbours (1); a CPU core's does (docs/planner.md).
    ranks: int | None = 1
    tflops_per_device: float | None = None


@dataclass
class ClusterConfig:
    name: str = "cpu_local"
    device: str = "cpu"  # a GPU name, or cpu
    # A "device" on a CPU is one rank; its peak is the probed per-core GEMM rate x its threads.
    devices_per_node: int | None = None  # null: this machine's cores (probed)
    nodes: int = 1
    device_memory_gb: float | None = None  # null: this machine's RAM (probed)
    # Dense GEMM peak per device and dtype, TFLOP/s; null: probed per core on this CPU (mtlm/metrics/flops.py).
    peak_tflops: dict[str, float | None] = field(default_factory=lambda: {"fp32": None, "bf16": None,
                                                                          "fp16": None})
    # Ring all-reduce inside a node: bandwidth per device per direction (GB/s) and latency per ring step (us).
    intra_node_bw_gbps: float | None = None  # null: measured with gloo here (cached)
    intra_node_step_latency_us: float | None = None
    # Between nodes: the node's total network bandwidth per direction (GB/s), shared by its devices.
    inter_node_bw_gbps: float = 0.0
    inter_node_step_latency_us: float = 0.0
    collective_base_latency_us: float = 0.0  # fixed cost of one collective launch
    # Attention dropout's cost beyond its FLOPs, ns per attention score (b·heads·s² per layer and forward):
    # a CPU draws the mask serially and leaves the fused kernel; a GPU draws it inside the kernel (0: none).
    # null: probed here (cpu_local). It matters when a recompute draws the masks again (docs/planner.md).
    attention_dropout_ns_per_score: float | None = 0.0
    calibration: CalibrationPoint = field(default_factory=CalibrationPoint)


@dataclass
class PlanConfig:
    # Measure the calibration point here (cpu_local only): a short train.py run, cached per CPU and torch.
    calibrate: bool = False
    calibration_steps: int = 20  # steps of that run (its first `timing_warmup_steps` are not timed)
    # torch DDP's default gradient bucket (bucket_cap_mb=25): the last bucket's all-reduce is never hidden.
    ddp_bucket_mb: float = 25.0


NOT_IN_TRAIN = ("is python -m mtlm.plan's (docs/planner.md); train.py does not read it: drop it, or run "
                "python -m mtlm.plan with the same overrides")


def check_not_in_train(cfg: object) -> None:
    """train.py reads neither group: `+cluster=...` or `+plan.x=...` there would be a silently ignored setting."""
    for key in ("cluster", "plan"):
        if getattr(cfg, "get", lambda k: None)(key) is not None:
            raise ConfigError(key, NOT_IN_TRAIN)
