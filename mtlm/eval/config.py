"""Typed configs of the evaluation and generation apps, and their up-front checks.

`python -m mtlm.evaluate` composes conf/evaluate.yaml and `python -m mtlm.generate` conf/generate.yaml: the
same `parallel`, `precision` and `logger` groups as train.py (so a key means the same thing everywhere), plus
the keys these apps read. The model shape and tokenizer come from the checkpoint, not from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mtlm.config import LoggerConfig, ParallelConfig, PrecisionConfig, register_configs
from mtlm.config_checks import check_known_keys
from mtlm.data.text_tokenizer import check_spec, tokenizer_spec
from mtlm.errors import ConfigError, DataError

TASKS = ("wikitext", "lambada")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TokenizerConfig:
    # All null: the tokenizer recorded in the checkpoint (what it was trained with). A model converted from
    # Hugging Face records none: name its tokenizer as train.py's data.tokenizer does (mtlm/data/
    # text_tokenizer.py), e.g. type=gpt2 vocab_file=vocab.json merge_file=merges.txt, or model=FILE.model.
    type: str | None = None
    model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    # A checkpoint records its tokenizer's identity (type + content hash); every tool refuses another one
    # (resume, evaluate, generate, lm-eval). true: use this one anyway, for a deliberate swap (a note says so).
    allow_mismatch: bool = False


@dataclass
class EvalDataConfig:
    # wikitext: the raw test file as distributed (wiki.test.raw); lambada: jsonl, one passage per line.
    path: str = MISSING
    text_key: str = "text"  # lambada: the field of each jsonl line holding the passage
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class LoadConfig:
    dir: str = MISSING  # a checkpoint folder (its latest) or one step_* folder


@dataclass
class EvalConfig:
    # WikiText windows of seq_length + 1 tokens start every `overlap` tokens and score only their new targets
    # (Megatron-LM's --overlapping-eval, default 32). seq_length null: the checkpoint's model.seq_length.
    overlap: int = 32
    seq_length: int | None = None
    batch_size: int = 8  # windows (wikitext) or passages (lambada) per forward
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None  # None: an equal share of the cores per rank


@dataclass
class EvaluateConfig:
    task: str = MISSING  # wikitext | lambada
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    checkpoint: LoadConfig = field(default_factory=LoadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class GenerateDataConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # as the evaluate app's


@dataclass
class GenerateOptions:
    max_new_tokens: int = 64
    # 0: greedy (argmax). Otherwise sample from softmax(logits / temperature), restricted to the top_k most
    # likely tokens (0: all) and to the smallest set whose probability reaches top_p (1.0: all).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    kv_cache: bool = True  # keep each layer's keys and values: one token's work per new token
    device: str = "auto"
    num_threads: int | None = None


@dataclass
class GenerateConfig:
    prompt: str | None = None
    prompts_file: str | None = None  # a UTF-8 text file, one prompt per line (empty lines skipped)
    checkpoint: LoadConfig = field(default_factory=LoadConfig)
    data: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    generate: GenerateOptions = field(default_factory=GenerateOptions)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)


def register_eval_configs() -> None:
    register_configs()  # the groups the apps share with train.py are typed by their base_config dataclasses
    cs = ConfigStore.instance()
    cs.store(name="evaluate_config", node=EvaluateConfig)
    cs.store(name="generate_config", node=GenerateConfig)


# --------------------------------------------------------------------------------------------------------


def _common(cfg: Any, world_size: int | None, device: str, num_threads: int | None, prefix: str) -> None:
    p = cfg.parallel
    if p.tensor <= 0:
        raise ConfigError("parallel.tensor", f"must be > 0, got {p.tensor}")
    if p.data != 1:
        raise ConfigError("parallel.data", f"evaluation and generation run one model replica; use "
                          f"parallel.data=1 (got {p.data}) and parallel.tensor for more devices")
    if world_size is not None and world_size != p.tensor:
        raise ConfigError("parallel.tensor", f"the launcher started {world_size} ranks but parallel.tensor="
                          f"{p.tensor}")
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError("parallel.backend", f"must be auto, gloo or nccl, got {p.backend!r}")
    if cfg.precision.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError("precision.dtype", f"must be fp32, bf16 or fp16, got {cfg.precision.dtype!r}")
    if device not in DEVICES:
        raise ConfigError(f"{prefix}.device", f"must be auto, cpu or cuda, got {device!r}")
    if num_threads is not None and num_threads <= 0:
        raise ConfigError(f"{prefix}.num_threads", f"must be > 0 or null, got {num_threads}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{prefix}.device", "cuda requested but no CUDA device is visible")
    if not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.dir", "give the checkpoint to load: checkpoint.dir=DIR")
    tok = cfg.data.tokenizer
    if any(getattr(tok, k) for k in ("type", "model", "vocab_file", "merge_file")):
        try:
            check_spec(tokenizer_spec(tok))
        except DataError as err:
            key, _, message = str(err).partition(": ")
            raise ConfigError(key, message) from None


def validate_evaluate(cfg: Any, world_size: int | None = None) -> None:
    """Everything a type cannot say about an evaluate config; one ConfigError naming the key."""
    check_known_keys(cfg, EvaluateConfig)  # first: a key added with +/++ would be read by nothing
    e = cfg.eval
    if cfg.task not in TASKS:
        raise ConfigError("task", f"must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    _common(cfg, world_size, e.device, e.num_threads, "eval")
    for key in ("overlap", "batch_size"):
        if getattr(e, key) <= 0:
            raise ConfigError(f"eval.{key}", f"must be > 0, got {getattr(e, key)}")
    if e.seq_length is not None and e.seq_length <= 0:
        raise ConfigError("eval.seq_length", f"must be > 0 or null, got {e.seq_length}")
    if e.seq_length is not None and e.overlap > e.seq_length:
        raise ConfigError("eval.overlap", f"{e.overlap} exceeds eval.seq_length={e.seq_length}")
    if not cfg.data.path:
        raise ConfigError("data.path", "give the file to evaluate on: data.path=FILE")


def validate_generate(cfg: Any, world_size: int | None = None) -> None:
    check_known_keys(cfg, GenerateConfig)  # as validate_evaluate
    g = cfg.generate
    _common(cfg, world_size, g.device, g.num_threads, "generate")
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ConfigError("prompt", "give exactly one of prompt=\"...\" or prompts_file=FILE")
    if g.max_new_tokens <= 0:
        raise ConfigError("generate.max_new_tokens", f"must be > 0, got {g.max_new_tokens}")
    if g.temperature < 0:
        raise ConfigError("generate.temperature", f"must be >= 0 (0: greedy), got {g.temperature}")
    if g.top_k < 0:
        raise ConfigError("generate.top_k", f"must be >= 0 (0: no limit), got {g.top_k}")
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError("generate.top_p", f"must be in (0, 1], got {g.top_p}")
