"""What `data.paths` names, and corpora of token files: the checks, the train/valid/test split, the blend.

    data.paths=[]                                   the built-in corpus
    data.paths=[/abs/a.txt,/abs/b.jsonl.gz]         text, tokenized into the cache by the first run
    data.paths=[/abs/corpus_text_document]          a token-file prefix (.bin + .idx, Megatron-LM's format)
    data.paths=[0.7,/abs/a_doc,0.3,/abs/b_doc]      token files blended by weight (or data.blend={prefix: w})

Several prefixes without weights are blended in proportion to their token counts (as if concatenated).
Token files are split by documents into train/valid/test with `data.split` (Megatron-LM's "969,30,1").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mtlm.data.cache import atomic_write_json
from mtlm.data.gpt_dataset import BlendedDataset, TokenFileDataset, index_dir
from mtlm.data.indexed import IndexedDataset, read_header
from mtlm.errors import DataError

RAW_SUFFIXES = tuple(s + c for s in (".txt", ".jsonl") for c in ("", ".gz", ".zst"))
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Sources:
    kind: str  # builtin | text | tokens
    paths: list[str]  # text files, or token-file prefixes (absolute)
    weights: list[float] | None = None  # tokens: blend weights; None: in proportion to each file's tokens


def is_text(path: str) -> bool:
    return str(path).endswith(RAW_SUFFIXES)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def token_prefix(raw: str) -> str:
    """The absolute prefix of a token-file pair (PREFIX, PREFIX.bin or PREFIX.idx given); both files must exist."""
    path = os.path.abspath(os.path.expanduser(str(raw)))
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isdir(path):
        raise DataError(f"data.paths: {path} is a directory; give files (.txt, .jsonl, optionally .gz/.zst) or a "
                        "token-file prefix (PREFIX.bin + PREFIX.idx)")
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(f"data.paths: {path}: neither a text file (.txt, .jsonl, optionally .gz/.zst) nor a "
                        f"token-file prefix ({' and '.join(missing)} not found)")
    return prefix


def parse_sources(paths: Sequence[Any], blend: dict | None) -> Sources:
    """Classify data.paths / data.blend (cheap: stat only)."""
    paths, blend = [str(p) for p in (paths or [])], dict(blend or {})
    if blend:
        if paths:
            raise DataError("data.blend: give the corpus either in data.paths or in data.blend, not both")
        return Sources("tokens", [token_prefix(p) for p in blend], [_weight(w, p) for p, w in blend.items()])
    if not paths:
        return Sources("builtin", [])
    if _number(paths[0]) is not None:  # [w1, prefix1, w2, prefix2, ...]
        if len(paths) % 2:
            raise DataError(f"data.paths: a blend alternates weight and prefix ([w1, prefix1, w2, prefix2]); got "
                            f"{len(paths)} entries")
        pairs = list(zip(paths[::2], paths[1::2], strict=True))
        return Sources("tokens", [token_prefix(p) for _, p in pairs], [_weight(w, p) for w, p in pairs])
    text = [p for p in paths if is_text(p)]
    if text and len(text) != len(paths):
        raise DataError("data.paths: mixes text files and token-file prefixes; preprocess the text "
                        "(python -m mtlm.data.preprocess) and give only prefixes")
    if text:
        return Sources("text", paths)
    return Sources("tokens", [token_prefix(p) for p in paths])


def _weight(value: Any, path: str) -> float:
    w = _number(value)
    if w is None or w < 0 or w != w:
        raise DataError(f"data.paths: blend weight {value!r} of {path} must be a number >= 0")
    return w


def parse_split(split: Any) -> list[float]:
    """"969,30,1" (or "969/30/1", fewer parts padded with 0) -> three weights summing to 1."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    weights = [_number(p) for p in parts]
    if not 1 <= len(parts) <= 3 or any(w is None or w < 0 for w in weights) or not sum(weights) > 0:
        raise DataError(f"data.split={split!r}: must be up to three numbers >= 0 with a positive sum, "
                        "train,valid,test (e.g. '969,30,1')")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_bounds(weights: Sequence[float], documents: int) -> list[int]:
    """Document boundaries [0, a, b, documents] of the train/valid/test split, as Megatron-LM computes them:
    cumulative rounded shares, then all moved so the last boundary is exactly the document count."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * documents)))
    excess = bounds[-1] - documents
    return [0] + [b - excess for b in bounds[1:]]


def check_sources(sources: Sources, split: Any, model_vocab_size: Any, has_tokenizer: bool) -> None:
    """validate()'s cheap checks of a token-file corpus: headers (not the tokens), split, a vocabulary."""
    if sources.kind != "tokens":
        return
    parse_split(split)
    if sources.weights is not None and not sum(sources.weights) > 0:
        raise DataError(f"data.paths: blend weights {sources.weights} must sum to a positive number")
    for prefix in sources.paths:
        read_header(f"{prefix}.idx")
    if model_vocab_size is None and not has_tokenizer:
        raise DataError("model.vocab_size: training from token files without a data.tokenizer needs the "
                        "vocabulary size (e.g. model.vocab_size=50257 for GPT-2's BPE)")


def max_token_id(ds: IndexedDataset, cache_root: str) -> int:
    """The largest id in a token file, read once and remembered in its index folder."""
    st = os.stat(ds.bin_path)
    path = os.path.join(index_dir(ds.prefix, cache_root), "max_token_id.json")
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["stamp"] == stamp:
            return int(saved["max_token_id"])
    except (OSError, ValueError, KeyError):
        pass
    top = ds.max_token_id()
    try:
        atomic_write_json(path, {"stamp": stamp, "max_token_id": top})
    except OSError:
        pass
    return top


def check_vocab(datasets: list[IndexedDataset], vocab_size: int, where: str, cache_root: str) -> None:
    """Every id in the token files is below the vocabulary (an id past it would read a padding row)."""
    for ds in datasets:
        top = max_token_id(ds, cache_root)
        if top >= vocab_size:
            raise DataError(f"{where}: {ds.bin_path} holds token id {top}, at or above the vocabulary size "
                            f"{vocab_size}; set {where} > {top} (or use the tokenizer these files were made with)")


def split_datasets(indexed: list[IndexedDataset], sources: Sources, split: Any, seq_length: int, seed: int,
                   val_seed: int, cache_root: str) -> tuple[Any, Any]:
    """(train, valid) datasets: each file split by documents, and several files blended per split."""
    shares = parse_split(split)
    if shares[1] == 0:
        raise DataError(f"data.split={split!r}: the validation split (second number) must be > 0; training "
                        "evaluates on it")
    parts: dict[str, list[TokenFileDataset]] = {"train": [], "valid": []}
    for ds in indexed:
        bounds = split_bounds(shares, ds.num_documents)
        for i, name in enumerate(("train", "valid")):
            parts[name].append(TokenFileDataset(ds, bounds[i], bounds[i + 1], seq_length,
                                                seed if name == "train" else val_seed, name, cache_root))
    weights = sources.weights or [float(ds.num_tokens) for ds in indexed]
    if len(indexed) == 1:
        return parts["train"][0], parts["valid"][0]
    return BlendedDataset(parts["train"], weights, "train"), BlendedDataset(parts["valid"], weights, "valid")
