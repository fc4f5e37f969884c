"""Typed config schemas and the up-front semantic checks.

The schemas are dataclasses stored in Hydra's ConfigStore as `base_config`; `conf/config.yaml` names it first
in its defaults list, so a misspelled key or a wrong type is rejected by Hydra at compose time. Everything a
type cannot express (divisibility, ranges, files that must exist) is checked by `validate()` before any
process is spawned or any tensor is allocated, and each failure is one line that names the key.

The config tree mirrors the code: `model` feeds mtlm/model, `parallel` feeds mtlm/parallel, `data` feeds
mtlm/data, `optimizer`/`scheduler`/`precision`/`trainer`/`checkpoint` feed mtlm/train, `logger` feeds
mtlm/metrics/sinks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mtlm.errors import ConfigError as ConfigError  # re-exported: `from mtlm.config import ConfigError`

# The config tree (conf/ beside the package): every app composes from it (train.py, mtlm.evaluate, mtlm.plan, ...).
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
# The model classes `model._target_` names (mtlm/model/build.py builds them): the one place their paths are
# spelled. GPT_TARGET is also what a config (or an older checkpoint) without `_target_` means.
GPT_TARGET, BERT_TARGET = "mtlm.model.gpt.GPT", "mtlm.model.bert.BERT"

@dataclass
class ModelConfig:
    # The model class (mtlm/model/build.py); each preset names its family's: mtlm.model.gpt.GPT, .bert.BERT.
    _target_: str = GPT_TARGET
    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    seq_length: int = 1024
    max_position_embeddings: int = 1024
    # None: take the tokenizer's vocabulary. Padded up by `make_vocab_size_divisible_by` x tensor (§3).
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.1
    init_std: float = 0.02
    layernorm_eps: float = 1e-5
    # sdpa: torch's scaled_dot_product_attention (flash kernels). unfused: Megatron-LM's core attention
    # (scores by one batched GEMM in the compute dtype, fp32 softmax). auto: unfused under bf16/fp16 autocast
    # on CPU, where torch's flash kernel is ~2x slower than the GEMMs (docs/benchmarks.md); sdpa elsewhere.
    attention: str = "auto"
    # The shared transformer layer's choices (mtlm/model/transformer.py): exact `gelu` (BERT) or `gelu_tanh`
    # (GPT-2); `pre`-LN (the paper's rearrangement) or `post`-LN (original BERT, the paper's Fig. 7 ablation).
    activation: str = "gelu_tanh"
    layernorm_order: str = "pre"
    # GPT only: `learned` position embeddings (GPT-2) or `alibi` (none; a per-head linear bias on the attention
    # scores, mtlm/model/alibi.py), and a layer norm on the word embeddings: both BLOOM's (conf/model/bloom_*).
    position_embedding: str = "learned"
    embedding_layernorm: bool = False


# ModelConfig's defaults, the one place a model option's default is stated: a checkpoint saved before a key
# existed, or a model section written by hand, reads it from here (model_option, mtlm.api.model_config).
MODEL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


def model_option(model: Any, key: str) -> Any:
    """`model.<key>` from a typed config, a checkpoint's model section (dict) or a namespace; ModelConfig's
    default when the key is absent (not when it is set to null)."""
    absent = object()
    value = model.get(key, absent) if isinstance(model, Mapping) else getattr(model, key, absent)
    return MODEL_DEFAULTS[key] if value is absent else value

ATTENTION_IMPLS = ("auto", "sdpa", "unfused")


@dataclass
class ParallelConfig:
    # The rank grid is tensor x data x pipeline, tensor innermost (mtlm/parallel/state.py, docs/parallelism.md).
    tensor: int = 1
    data: int = 1
    # Pipeline stages (SC'21 §2.2), through torch.distributed.pipelining. 1: no pipeline.
    pipeline: int = 1
    # Model chunks per pipeline rank, for schedule=interleaved_1f1b (bubble (p-1)/(v m), SC'21 §2.2.2).
    virtual_stages: int = 1
    # gpipe | 1f1b | interleaved_1f1b (torch.distributed.pipelining's ScheduleGPipe / 1F1B / Interleaved1F1B).
    schedule: str = "1f1b"
    # Sequence parallelism (Korthikanti et al. 2022 §4.2.2): layer norms, dropout and the residual stream on
    # 1/tensor of the sequence; needs tensor > 1.
    sequence: bool = False
    # auto: nccl when training on CUDA, gloo on CPU.
    backend: str = "auto"
    # Collective timeout. Tests set a few seconds so a hang fails fast instead of after 30 minutes.
    timeout_s: float = 600.0


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    # Each optimizer's own keys: conf/optimizer/<name>.yaml sets those its class takes; null ones are not
    # passed (the class's default), and a set key the class does not take is an error (mtlm/train/optim.py).
    betas: list[float] | None = None  # adamw
    eps: float | None = None  # adamw
    # adamw: one fused kernel for the whole update (CPU and CUDA, torch >= 2.4) instead of a Python loop over
    # parameters. None: torch's own default (the loop on CPU, foreach on CUDA).
    fused: bool | None = None
    momentum: float | None = None  # sgd
    nesterov: bool | None = None  # sgd
    beta2_decay: float | None = None  # adafactor: the second moment's decay exponent
    d: float | None = None  # adafactor: the update-clipping threshold


@dataclass
class SchedulerConfig:
    _target_: str = "mtlm.train.schedule.warmup_decay_scheduler"
    _partial_: bool = True
    decay: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    # None: decay over trainer.max_steps.
    decay_steps: int | None = None
    min_lr: float = 0.0


@dataclass
class TokenizerConfig:
    # sentencepiece | gpt2 | wordpiece | tokenizer.json (mtlm/data/text_tokenizer.py).
    type: str = "sentencepiece"
    # sentencepiece: a .model file; None trains a BPE model (data.vocab_size pieces) on the corpus and caches it.
    # tokenizer.json: that file (any Hugging Face fast tokenizer: BLOOM's).
    model: str | None = None
    # gpt2: vocab.json + merges.txt (GPT-2's byte-level BPE, as NVIDIA ships with Megatron); wordpiece: vocab.txt.
    vocab_file: str | None = None
    merge_file: str | None = None
    # A checkpoint records its tokenizer's identity (type + content hash); every tool refuses another one
    # (resume, evaluate, generate, lm-eval). true: use this one anyway, for a deliberate swap (a note says so).
    allow_mismatch: bool = False


@dataclass
class DataConfig:
    # Empty: the built-in corpus (the English text of Python's pydoc_data.topics). .txt / .jsonl (.gz, .zst) files
    # are tokenized into the cache by the first run; a path without such a suffix is a token-file prefix
    # (PREFIX.bin + PREFIX.idx, Megatron-LM's format; mtlm/data/indexed.py); [w1, prefix1, w2, prefix2] blends them.
    paths: list[str] = field(default_factory=list)
    blend: dict[str, float] = field(default_factory=dict)  # token-file prefix -> weight (instead of weights in paths)
    text_key: str = "text"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vocab_size: int = 4096
    val_fraction: float = 0.05  # text files: the last fraction of the token stream is the validation set
    split: str = "969,30,1"  # token files: train,valid,test weights, split by documents as Megatron-LM does
    # A document that is not valid UTF-8, a .jsonl line that is not JSON or lacks text_key: skip (counted and
    # reported) or fail.
    bad_documents: str = "skip"
    cache_dir: str = "~/.cache/mtlm"


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "mtlm"
    group: str | None = None
    run_name: str | None = None
    # None: WANDB_MODE from the environment, else offline. W&B never needs an account by default.
    mode: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    # Dynamic loss scaling, fp16 only (§4: fp16 with dynamic loss scaling).
    initial_scale: float = 65536.0
    growth_interval: int = 1000
    min_scale: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4
    grad_clip: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    # None: all cores for one process, an equal share per rank when several share a machine.
    num_threads: int | None = None
    # Steps left out of the tokens/s and TFLOP/s averages in summary.json (allocator and cache warm-up).
    timing_warmup_steps: int = 3
    activation_checkpointing: bool = False
    # Shard Adam's state over the data-parallel group (ZeRO stage 1, torch's ZeroRedundancyOptimizer).
    # At parallel.data=1 there is nothing to shard over: accepted and a no-op, so sweeps can leave it on.
    shard_optimizer: bool = False
    compile: bool = False
    max_restarts: int = 0


@dataclass
class CheckpointConfig:
    # checkpoints/<model.name>-<shape digest>, relative to the launch dir (not Hydra's timestamped run dir), so a
    # later invocation finds it; in a multirun, the job's dir (mtlm/config_checks.py). One folder holds one
    # run's timeline: a fresh run moves another run's checkpoints into <dir>/earlier/ (mtlm/train/timeline.py).
    dir: str = "${mtlm.checkpoint_dir:}"
    save: bool = True
    interval: int = 0  # save every `interval` steps; 0: only at the end. The end of a run always saves.
    keep: int = 2  # the newest `keep` checkpoints stay on disk
    resume: str = "none"  # none | auto (the latest in `dir`, if any) | a checkpoint path
    # true: delete another timeline's checkpoints found in `dir` (before this run starts) instead of moving them.
    overwrite: bool = False


# ---- python -m mtlm.plan's groups: `cluster` and `plan` (conf/cluster/, conf/plan.yaml; docs/planner.md) ----
# Config holds both as optional nodes that stay null in train.py (conf/config.yaml selects neither). Every
# number of a cluster file carries a comment naming its source (datasheet, paper, NCCL's own performance model,
# or measured here).


@dataclass
class CalibrationPoint:
    """The one measured or published point the achievable compute fraction comes from (docs/planner.md).

    A GPT run of this shape on one device of the cluster, at `tflops_per_device` model TFLOP/s (mtlm's
    `tflops_per_device`: 72·B·s·l·h²·(...) per step, recompute not counted). null on cpu_local: measured by
    the first plan on the machine (again on `plan.calibrate=true`) and cached.
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
    # A GPU point measured with data parallelism (SC'21 Table 1's rows): its data-parallel degree, `batch` being
    # the sequences per data rank and step. Under grad_allreduce=after_backward its gradient all-reduce (the
    # compute dtype's bytes of the model) is taken out of its step before its FLOPs give eta.
    data: int = 1
    # The quoted rate counts the recompute's FLOPs (SC'21's Eq. 3, 96·B·s·l·h²·(...)), not mtlm's model FLOPs.
    rate_counts_recompute: bool = False
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
    # Device memory bandwidth, GB/s: the memory-bound work around the GEMMs (softmax, dropout, layer norms,
    # GeLU: perf.elementwise_bytes_per_layer) runs at it, the GEMM FLOPs at eta x peak. null: not modeled.
    memory_bw_gbps: float | None = None
    # When the data-parallel gradient all-reduce runs: `overlapped` (torch DDP's buckets during the last
    # backward, what mtlm does) or `after_backward` (one flattened buffer per dtype after backward, in the
    # compute dtype, then a device sync: the 2019 Megatron-LM code the paper's Fig. 5 ran; docs/planner.md).
    grad_allreduce: str = "overlapped"
    # Pipeline sends: each tensor rank sends 1/t of the b·s·h activations and the next stage all-gathers them
    # (SC'21 §4.1's scatter/gather, Megatron-LM's code); false: every rank sends all of them (mtlm).
    p2p_scatter_gather: bool = False
    # mtlm's autocast keeps the embedding output and the layer norms' outputs fp32, so their tensor-parallel
    # all-reduces (the embedding's g, backward's f) are fp32 (true). Megatron-LM's fp16 code runs the whole
    # model in half precision: all in the compute dtype (false).
    tensor_parallel_fp32: bool = True
    calibration: CalibrationPoint = field(default_factory=CalibrationPoint)


@dataclass
class PlanConfig:
    # Measure the calibration point here (cpu_local only): a short train.py run, cached per CPU and torch.
    calibrate: bool = False
    calibration_steps: int = 20  # steps of that run (its first `timing_warmup_steps` are not timed)
    # torch DDP's default gradient bucket (bucket_cap_mb=25): the last bucket's all-reduce is never hidden.
    ddp_bucket_mb: float = 25.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # python -m mtlm.plan only (conf/plan.yaml selects them; null under train.py): the schemas above.
    cluster: ClusterConfig | None = None
    plan: PlanConfig | None = None


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("mtlm.sweep_group", _sweep_group, replace=True)
    OmegaConf.register_new_resolver("mtlm.checkpoint_dir", default_checkpoint_dir, replace=True)


def _sweep_group() -> str | None:
    """`${mtlm.sweep_group:}`, logger.group's default: in a multirun the sweep dir's last two parts (W&B then
    groups the sweep's jobs, and mtlm/report.py adds its report run to that group); None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return sweep_group_name(HydraConfig.get().sweep.dir)


def sweep_group_name(sweep_dir: str | Path) -> str:
    """W&B group of a sweep: the sweep dir's last two parts, e.g. weak_scaling_cpu/2026-11-25_18-00-00."""
    parts = Path(sweep_dir).resolve().parts
    return "/".join(parts[-2:])


# ---- the default checkpoint folder (`${mtlm.checkpoint_dir:}`) --------------------
# The model keys that decide what a checkpoint holds (its tensors' shapes and what they mean); the vocabulary
# comes from model.vocab_size or else the tokenizer (data.vocab_size / data.tokenizer). Keys a resume may
# change (seq_length, dropout, attention, vocab padding) are left out.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "vocab_size")
# Keys that also change what the tensors mean, counted only away from GPT-2's values, so adding such a key to
# the schema leaves every existing folder name as it was.
SHAPE_KEYS_IF_NOT = {"_target_": GPT_TARGET, "activation": "gelu_tanh", "layernorm_order": "pre"}


def shape_digest(model: Any, data: Any) -> str:
    """Six hex digits that change with anything a checkpoint's tensors depend on (SHAPE_KEYS...)."""
    def get(node: Any, key: str) -> Any:
        return node.get(key) if hasattr(node, "get") else getattr(node, key, None)

    shape = {k: get(model, k) for k in SHAPE_KEYS if get(model, k) is not None}
    shape.update({k: get(model, k) for k, usual in SHAPE_KEYS_IF_NOT.items() if get(model, k) not in (None, usual)})
    if shape.get("vocab_size") is None:  # the tokenizer's vocabulary: its size, and a tokenizer file if one is set
        shape["data.vocab_size"] = get(data, "vocab_size")
        tok = get(data, "tokenizer")
        if isinstance(tok, DictConfig):
            tok = OmegaConf.to_container(tok, resolve=True)
        if isinstance(tok, dict):  # {type, model, vocab_file, ...}: the set ones; sentencepiece trained is the default
            # allow_mismatch says how to load, not what the tensors mean: not part of the shape.
            tok = {k: v for k, v in tok.items() if v is not None and (k, v) != ("type", "sentencepiece")
                   and k != "allow_mismatch"} or None
        if tok:
            shape["data.tokenizer"] = tok
    return hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:6]


def default_checkpoint_dir(*, _root_: DictConfig) -> str:
    """`${mtlm.checkpoint_dir:}`, checkpoint.dir's default. A run: checkpoints/<model.name>-<shape digest>,
    relative to the launch dir, so a later `checkpoint.resume=auto` with the same shape finds it and another
    shape never meets it. A multirun job: `checkpoints/` in the job's own dir (jobs of one sweep often share a
    shape, and each is its own timeline)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = HydraConfig.get().sweep
        return os.path.join(str(sweep.dir), str(sweep.subdir), "checkpoints")
    return f"checkpoints/{_root_.model.name}-{shape_digest(_root_.model, _root_.data)}"

