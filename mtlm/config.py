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

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from mtlm.errors import ConfigError as ConfigError  # re-exported: `from mtlm.config import ConfigError`
from mtlm.plan.schema import ClusterConfig, PlanConfig, check_not_in_train


@dataclass
class ModelConfig:
    # The model class (mtlm/model/build.py); each preset names its family's: mtlm.model.gpt.GPT, .bert.BERT.
    _target_: str = "mtlm.model.gpt.GPT"
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
    # python -m mtlm.plan only (conf/plan.yaml selects them; null under train.py): mtlm/plan/schema.py.
    cluster: ClusterConfig | None = None
    plan: PlanConfig | None = None


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("mtlm.sweep_group", _sweep_group, replace=True)
    from mtlm.config_checks import default_checkpoint_dir

    OmegaConf.register_new_resolver("mtlm.checkpoint_dir", default_checkpoint_dir, replace=True)


def _sweep_group() -> str | None:
    """`${mtlm.sweep_group:}`, logger.group's default: in a multirun the sweep dir's last two parts (W&B then
    groups the sweep's jobs, and mtlm/report.py adds its report run to that group); None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    from mtlm.report import sweep_group_name

    return sweep_group_name(HydraConfig.get().sweep.dir)


# --------------------------------------------------------------------------------------------------------
# Semantic checks. Each raises ConfigError naming the key; validate() runs them all before anything heavy.


def _positive(cfg: Any, key: str) -> None:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def validate(cfg: Any, world_size: int | None = None) -> None:
    """Check everything a type cannot. `world_size` is the number of ranks a launcher provides, if any."""
    from mtlm.config_checks import check as check_keys_and_modes

    check_keys_and_modes(cfg)  # keys the schema lacks (added with +/++), logger.mode
    check_not_in_train(cfg)  # cluster / plan: python -m mtlm.plan's groups (it validates a copy without them)
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    for key in ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
                "model.max_position_embeddings", "parallel.tensor", "parallel.data", "parallel.pipeline",
                "parallel.virtual_stages", "trainer.max_steps",
                "trainer.micro_batch_size", "trainer.global_batch_size", "trainer.log_interval",
                "trainer.eval_interval", "trainer.eval_iters", "model.make_vocab_size_divisible_by"):
        _positive(cfg, key)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % p.tensor:
        raise ConfigError("parallel.tensor", f"{p.tensor} does not divide model.num_attention_heads="
                          f"{m.num_attention_heads} (each rank owns whole heads, §3)")
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError("model.seq_length", f"{m.seq_length} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    if m.attention not in ATTENTION_IMPLS:
        raise ConfigError("model.attention", f"must be one of {', '.join(ATTENTION_IMPLS)}, got {m.attention!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.vocab_size is not None and m.vocab_size <= 0:
        raise ConfigError("model.vocab_size", f"must be > 0 or null, got {m.vocab_size}")
    if t.global_batch_size % (t.micro_batch_size * p.data):
        raise ConfigError("trainer.global_batch_size", f"{t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size x parallel.data = {t.micro_batch_size} x {p.data}")
    if t.grad_clip < 0:
        raise ConfigError("trainer.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("trainer.device", f"must be auto, cpu or cuda, got {t.device!r}")
    if t.num_threads is not None and t.num_threads <= 0:
        raise ConfigError("trainer.num_threads", f"must be > 0 or null, got {t.num_threads}")
    if t.max_restarts < 0:
        raise ConfigError("trainer.max_restarts", f"must be >= 0, got {t.max_restarts}")
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError("parallel.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    if p.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", f"must be > 0, got {p.timeout_s}")
    from mtlm.model.build import validate_model_config

    validate_model_config(m)
    _validate_optim(cfg)
    _validate_precision(cfg)
    _validate_checkpoint(cfg)
    if cfg.logger.name not in ("wandb", "none"):
        raise ConfigError("logger.name", f"must be wandb or none, got {cfg.logger.name!r}")
    _validate_layout(cfg, world_size)

    from mtlm.data import DataError, validate_data_config

    try:
        validate_data_config(cfg.data, model_vocab_size=cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError(str(err).split(":", 1)[0], str(err).split(":", 1)[-1].strip()) from None


def _validate_optim(cfg: Any) -> None:
    o, s = cfg.optimizer, cfg.scheduler
    if o.lr <= 0:
        raise ConfigError("optimizer.lr", f"must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.betas is not None and (len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas)):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    from mtlm.train.optim import check_optimizer_config

    check_optimizer_config(o)
    if s.decay not in ("cosine", "linear", "constant"):
        raise ConfigError("scheduler.decay", f"must be cosine, linear or constant, got {s.decay!r}")
    if s.warmup_steps < 0:
        raise ConfigError("scheduler.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    if s.decay_steps is not None and s.decay_steps <= 0:
        raise ConfigError("scheduler.decay_steps", f"must be > 0 or null, got {s.decay_steps}")
    if not 0.0 <= s.min_lr <= o.lr:
        raise ConfigError("scheduler.min_lr", f"must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")


def _validate_precision(cfg: Any) -> None:
    pr = cfg.precision
    if pr.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError("precision.dtype", f"must be fp32, bf16 or fp16, got {pr.dtype!r}")
    if pr.initial_scale <= 0 or pr.min_scale <= 0 or pr.min_scale > pr.initial_scale:
        raise ConfigError("precision.initial_scale", "need 0 < precision.min_scale <= precision.initial_scale")
    if pr.growth_interval <= 0:
        raise ConfigError("precision.growth_interval", f"must be > 0, got {pr.growth_interval}")


def _validate_checkpoint(cfg: Any) -> None:
    c = cfg.checkpoint
    if not c.dir:
        raise ConfigError("checkpoint.dir", "must be a non-empty path")
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: save only at the end), got {c.interval}")
    if c.keep < 1:
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {c.keep}")
    if not c.resume:
        raise ConfigError("checkpoint.resume", "must be none, auto or a checkpoint path")


def _validate_layout(cfg: Any, world_size: int | None) -> None:
    """The rank layout: world = tensor x data x pipeline, and on GPUs no more local ranks than devices."""
    import torch

    from mtlm.parallel.state import Grid

    p = cfg.parallel
    grid = Grid.of(p)
    needed = grid.world
    try:
        grid.check(world_size)
    except ValueError as err:
        key, message = str(err).split(": ", 1)
        raise ConfigError(key, message) from None
    _validate_new_axes(cfg)

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda requested but no CUDA device is visible")
    if _uses_cuda(cfg) and world_size is None and needed > torch.cuda.device_count():
        raise ConfigError("parallel.tensor", f"{needed} ranks (tensor x data x pipeline) need {needed} GPUs on this "
                          f"machine but {torch.cuda.device_count()} are visible")
    if p.backend == "nccl" and not _uses_cuda(cfg):
        raise ConfigError("parallel.backend", "nccl needs CUDA devices; use gloo (or auto) on CPU")


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def _validate_new_axes(cfg: Any) -> None:
    """Sequence and pipeline parallelism: what each needs, before any rank is spawned."""
    m, p = cfg.model, cfg.parallel
    if p.get("sequence", False):
        if p.tensor < 2:
            raise ConfigError("parallel.sequence", "needs parallel.tensor > 1 (it splits the tensor-parallel "
                              "region's sequence over the tensor group)")
        if m.seq_length % p.tensor:
            raise ConfigError("parallel.sequence", f"model.seq_length={m.seq_length} is not divisible by "
                              f"parallel.tensor={p.tensor} (each rank holds 1/tensor of the sequence)")
    schedule = p.get("schedule", "1f1b")
    if schedule not in PIPELINE_SCHEDULES:
        raise ConfigError("parallel.schedule", f"must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
    pipeline, virtual = p.get("pipeline", 1), p.get("virtual_stages", 1)
    if virtual > 1 and schedule != "interleaved_1f1b":
        raise ConfigError("parallel.virtual_stages", f"{virtual} needs parallel.schedule=interleaved_1f1b")
    if pipeline == 1:
        return
    raise ConfigError("parallel.pipeline", f"{pipeline}: pipeline parallelism is not implemented yet; "
                      "use parallel.pipeline=1")


def _uses_cuda(cfg: Any) -> bool:
    import torch

    if cfg.trainer.device == "cpu":
        return False
    return torch.cuda.is_available()


def env_world_size() -> int | None:
    """The world size a launcher (torchrun, SLURM) set up for us, or None when we launch ranks ourselves."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None
