"""NeMo `.nemo` archives of Megatron-Core GPT models -> mtlm (`python -m mtlm.convert from-nemo X.nemo OUT`).

A `.nemo` file is a tar (optionally gzipped) holding `model_config.yaml` (the model's shape and options, NeMo's
key names) and `model_weights/`, a Megatron-Core torch_dist folder whose keys carry NeMo's `model.` prefix, and
the tokenizer's files, which the config names as `nemo:FILE` (a sentencepiece model or a GPT-2 BPE's two files
are read from there and copied to OUT/tokenizer/).
The archive's regular files are copied into a temporary folder, and nothing else: a member with an absolute
path, a `..` component, a link or a device is refused in one line before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mtlm.checkpoint.format import CheckpointError
from mtlm.convert.mcore import CONFIG, from_mcore
from mtlm.data.text_tokenizer import tokenizer_from_entry
from mtlm.errors import DataError

CONFIG_YAML = "model_config.yaml"
WEIGHTS = "model_weights"


def safe_members(tar: tarfile.TarFile, label: str) -> list[tarfile.TarInfo]:
    """Every member, after checking none could write outside the folder it is extracted to."""
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or m.name.startswith(("/", "\\")) or ".." in path.parts:
            raise CheckpointError(f"{label}: member {m.name!r} has an absolute path or '..': refused")
        if not (m.isfile() or m.isdir()):
            kind = "link" if m.issym() or m.islnk() else "device or special file"
            raise CheckpointError(f"{label}: member {m.name!r} is a {kind}: refused (a .nemo holds files only)")
    return members


def extract(src: Path, into: Path) -> None:
    """Copy the archive's regular files under `into` (after safe_members has passed them all)."""
    try:
        with tarfile.open(src, "r:*") as tar:
            for m in safe_members(tar, str(src)):
                if m.isfile():
                    target = into / PurePosixPath(m.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fileobj = tar.extractfile(m)
                    if fileobj is None:
                        raise CheckpointError(f"{src}: member {m.name!r} cannot be read")
                    target.write_bytes(fileobj.read())
    except tarfile.TarError as err:
        raise CheckpointError(f"{src}: not a readable .nemo archive (a tar): {err}") from None


def nemo_args(cfg: dict, label: str) -> argparse.Namespace:
    """NeMo's model config as the Megatron-LM args the importer reads (and refuses on)."""
    activation = cfg.get("activation", "gelu")
    if activation not in ("gelu", "openai-gelu", "swiglu", "fast-swiglu"):
        raise CheckpointError(f"{label}: {CONFIG_YAML} activation {activation!r}: mtlm's GPT uses GeLU")
    heads = cfg.get("num_attention_heads")
    groups = cfg.get("num_query_groups")
    return argparse.Namespace(
        num_layers=cfg.get("num_layers"), hidden_size=cfg.get("hidden_size"), num_attention_heads=heads,
        ffn_hidden_size=cfg.get("ffn_hidden_size"), max_position_embeddings=cfg.get("max_position_embeddings"),
        seq_length=cfg.get("encoder_seq_length"), layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        make_vocab_size_divisible_by=cfg.get("make_vocab_size_divisible_by", 128),
        tensor_model_parallel_size=cfg.get("tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=cfg.get("pipeline_model_parallel_size", 1),
        init_method_std=cfg.get("init_method_std", 0.02), hidden_dropout=cfg.get("hidden_dropout", 0.1),
        # NeMo's bias_activation_fusion is Megatron's fused (tanh) bias-GeLU; openai-gelu is tanh too.
        bias_gelu_fusion=bool(cfg.get("bias_activation_fusion", True)), openai_gelu=activation == "openai-gelu",
        swiglu="swiglu" in activation, add_bias_linear=bool(cfg.get("bias", True)),
        untie_embeddings_and_output_weights=not cfg.get("share_embeddings_and_output_weights", True),
        group_query_attention=groups is not None and groups != heads,
        position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
        normalization={"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}.get(cfg.get("normalization", "layernorm"),
                                                                          cfg.get("normalization")),
    )


def _find(root: Path, name: str) -> Path | None:
    """`name` at the archive's top level, or one folder down (archives made with a leading `./` or a folder)."""
    hits = sorted(p for p in root.glob(f"**/{name}") if len(p.relative_to(root).parts) <= 2)
    return hits[0] if hits else None


def nemo_tokenizer(cfg: dict, root: Path, out_dir: Path, label: str) -> Any:
    """The tokenizer model_config.yaml names, when its files are in the archive (`nemo:NAME` references):
    copied to OUT/tokenizer/ (the archive's copy is temporary) and opened. None, with a note, otherwise."""
    tok = cfg.get("tokenizer") or {}
    library, kind = tok.get("library"), tok.get("type")
    if library == "sentencepiece":
        entry, refs = {"type": "sentencepiece", "lowercase": None}, {"path": tok.get("model")}
    elif library == "megatron" and kind == "GPT2BPETokenizer":
        entry, refs = {"type": "gpt2", "lowercase": None}, {"path": tok.get("vocab_file"),
                                                             "merge_file": tok.get("merge_file")}
    else:
        print(f"note: {label}: tokenizer {library}/{kind} is not read from the archive; give its files as options "
              "to record it", file=sys.stderr)
        return None
    for key, ref in refs.items():
        found = _find(root, ref[len("nemo:"):]) if isinstance(ref, str) and ref.startswith("nemo:") else None
        if found is None:
            print(f"note: {label}: the tokenizer file {ref!r} is not in the archive; give it as an option to record "
                  "it", file=sys.stderr)
            return None
        target = out_dir / "tokenizer" / found.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, target)
        entry[key] = str(target.resolve())
    entry.setdefault("merge_file", None)
    try:
        return tokenizer_from_entry(entry)
    except DataError as err:
        raise CheckpointError(f"{label}: the tokenizer in the archive: {err}") from None


def from_nemo(src: str | Path, out_dir: str | Path, tensor: int = 1, tokenizer: Any = None) -> Path:
    """Import a `.nemo` archive of a Megatron-Core GPT (torch_dist model_weights) at `tensor`."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file (a .nemo archive)")
    with tempfile.TemporaryDirectory(prefix="mtlm-nemo-") as tmp:
        root = Path(tmp)
        extract(src, root)
        config, weights = _find(root, CONFIG_YAML), _find(root, WEIGHTS)
        if config is None or weights is None or not (weights / CONFIG).is_file():
            raise CheckpointError(f"{src}: no {CONFIG_YAML} and {WEIGHTS}/{CONFIG}: not a .nemo of a Megatron-Core "
                                  "(torch_dist) model")
        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{src}: {CONFIG_YAML} is not a mapping")
        args = nemo_args(cfg, str(src))
        if tokenizer is None:
            tokenizer = nemo_tokenizer(cfg, root, Path(out_dir), str(src))
        return from_mcore(weights, out_dir, tensor, tokenizer, args, origin=str(src))
