"""One small interface over every tokenizer mtlm uses, and the `data.tokenizer` settings that select one.

    data.tokenizer.type=sentencepiece  data.tokenizer.model=FILE.model   # or model=null: train one on the corpus
    data.tokenizer.type=gpt2           data.tokenizer.vocab_file=vocab.json data.tokenizer.merge_file=merges.txt
    data.tokenizer.type=wordpiece      data.tokenizer.vocab_file=vocab.txt  # BERT's (its [SEP] ends documents)
    data.tokenizer.type=tokenizer.json data.tokenizer.model=tokenizer.json  # any Hugging Face fast tokenizer (BLOOM)

Every tokenizer offers the `TextTokenizer` protocol below; the data pipeline, the BERT samples, evaluation and
the converters use nothing else. Before this file, `data.tokenizer` was the path of a sentencepiece model; the
Python API still takes that form (a str, or None to train), the command line says how to migrate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mtlm.data.cache import content_hash as content_hash  # re-exported: it lives below the tokenizers
from mtlm.data.gpt2_bpe import GPT2BPETokenizer
from mtlm.data.hf_tokenizers import JsonTokenizer, WordPieceTokenizer, from_entry
from mtlm.data.tokenizer import Tokenizer
from mtlm.errors import DataError

TOKENIZER_TYPES = ("sentencepiece", "gpt2", "wordpiece", "tokenizer.json")


@runtime_checkable
class TextTokenizer(Protocol):
    """What any mtlm tokenizer offers (sentencepiece, GPT-2 BPE, BERT WordPiece, tokenizer.json)."""

    path: str  # the file it was loaded from (GPT-2: the vocab.json)
    kind: str  # its `type` in data.tokenizer and in checkpoint metadata

    @property
    def vocab_size(self) -> int: ...  # real vocabulary size (the model pads its embedding beyond it)

    @property
    def eos_id(self) -> int: ...  # appended after every document

    def encode(self, text: str) -> list[int]: ...  # no special token added

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def piece_id(self, piece: str) -> int | None: ...  # "[CLS]", "[SEP]", "[MASK]", "<pad>": None if absent

    def entry(self) -> dict: ...  # checkpoint metadata (with `sha256`); tokenizer_from_entry() turns it back into this


@dataclass(frozen=True)
class TokenizerSpec:
    """The `data.tokenizer` settings, with paths made absolute."""

    type: str = "sentencepiece"
    model: str | None = None  # sentencepiece .model; None: train one on the corpus (data.vocab_size pieces)
    vocab_file: str | None = None  # gpt2: vocab.json; wordpiece: vocab.txt
    merge_file: str | None = None  # gpt2: merges.txt

    @property
    def trains(self) -> bool:
        """True when mtlm trains the tokenizer on the corpus itself (a raw-text corpus is then needed)."""
        return self.type == "sentencepiece" and self.model is None

    def files(self) -> list[str]:
        return [p for p in (self.model, self.vocab_file, self.merge_file) if p is not None]

    def identity(self) -> list:
        """What identifies the tokenizer for cache keys, without reading the files: type, paths, sizes, mtimes."""
        return [self.type] + [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in self.files()]


def _describe(entry: dict) -> str:
    sha = entry.get("sha256")
    return f"{entry.get('type') or 'sentencepiece'} {entry.get('path')}" + (f" (sha256 {sha[:12]})" if sha else "")


def check_same_tokenizer(recorded: dict | None, tok: TextTokenizer, where: str, allow_mismatch: bool = False,
                         ) -> str | None:
    """Is `tok` the tokenizer a checkpoint's metadata entry `recorded` names? Same content hash: None.
    Another one: a DataError naming both, or with `allow_mismatch` (data.tokenizer.allow_mismatch=true, a
    deliberate swap) a note. A checkpoint saved before identities were recorded (no `sha256`): a note, and
    only its size is checked (by the caller). No entry at all: None (nothing to compare with)."""
    if not recorded:
        return None
    ours = tok.entry()
    if not recorded.get("sha256"):
        return (f"note: {where} records no tokenizer identity (saved before mtlm recorded one): the tokenizer "
                f"{ours.get('path')} is checked by its size only")
    if recorded["sha256"] == ours.get("sha256"):
        return None
    line = f"data.tokenizer: {_describe(ours)} is not the tokenizer {where} was trained with, {_describe(recorded)}"
    if allow_mismatch:
        return f"note: {line}; used anyway (data.tokenizer.allow_mismatch=true)"
    raise DataError(f"{line}; use that one (or set data.tokenizer.allow_mismatch=true if the swap is deliberate)")


def legacy_override_message(overrides: Sequence[str]) -> str | None:
    """The one line for an override of the old form `data.tokenizer=PATH` (or null), which the typed schema
    rejects now that data.tokenizer is a group of keys."""
    for override in overrides:
        if override.lstrip("+~").startswith("data.tokenizer="):
            return ("data.tokenizer: is a group of keys now: give a sentencepiece model as data.tokenizer.model=PATH "
                    "(null trains one), or GPT-2's BPE as data.tokenizer.type=gpt2 data.tokenizer.vocab_file=... "
                    "data.tokenizer.merge_file=...")
    return None


def _abs(path: Any) -> str | None:
    return None if path in (None, "") else os.path.abspath(os.path.expanduser(str(path)))


def tokenizer_spec(node: Any) -> TokenizerSpec:
    """`data.tokenizer` as a TokenizerSpec. Takes the config node (or any object / mapping with its keys), and
    the older forms of the Python API: None (train a sentencepiece model) or the path of a sentencepiece model."""
    if node is None:
        return TokenizerSpec()
    if isinstance(node, (str, os.PathLike)):
        return TokenizerSpec(model=_abs(node))

    def get(key: str) -> Any:
        return node.get(key) if hasattr(node, "get") else getattr(node, key, None)

    kind = get("type") or "sentencepiece"
    if kind not in TOKENIZER_TYPES:
        raise DataError(f"data.tokenizer.type={kind!r}: must be one of {', '.join(TOKENIZER_TYPES)}")
    return TokenizerSpec(kind, _abs(get("model")), _abs(get("vocab_file")), _abs(get("merge_file")))


def check_spec(spec: TokenizerSpec) -> None:
    """Cheap checks (stat only): the files each type needs are given and exist, and no stray one is set."""
    needs = {"sentencepiece": (), "gpt2": ("vocab_file", "merge_file"), "wordpiece": ("vocab_file",),
             "tokenizer.json": ("model",)}[spec.type]
    allowed = {"sentencepiece": ("model",)}.get(spec.type, needs)
    for key in ("model", "vocab_file", "merge_file"):
        value = getattr(spec, key)
        if key in needs and value is None:
            raise DataError(f"data.tokenizer.{key}: data.tokenizer.type={spec.type} needs it (give the file)")
        if value is not None and key not in allowed:
            raise DataError(f"data.tokenizer.{key}: not used by data.tokenizer.type={spec.type}; remove it")
        if value is not None and not os.path.isfile(value):
            hint = " (or null to train one on the corpus)" if key == "model" and spec.type == "sentencepiece" else ""
            raise DataError(f"data.tokenizer.{key}: file not found: {value}{hint}")


def load_tokenizer(spec: TokenizerSpec) -> TextTokenizer:
    """The tokenizer the spec names (a trained-here sentencepiece model must be given as `model`)."""
    if spec.type == "gpt2":
        return GPT2BPETokenizer(spec.vocab_file, spec.merge_file)
    if spec.type == "wordpiece":
        return WordPieceTokenizer(spec.vocab_file)
    if spec.type == "tokenizer.json":
        return JsonTokenizer(spec.model)
    if spec.model is None:
        raise DataError("data.tokenizer.model: no sentencepiece model given (null trains one from raw text, "
                        "which token files are not)")

    return Tokenizer(spec.model)


def tokenizer_from_entry(entry: dict) -> TextTokenizer:
    """The tokenizer a checkpoint's metadata `tokenizer` entry names (entries without a type are sentencepiece,
    as training wrote them before GPT-2 BPE existed)."""
    kind = entry.get("type") or "sentencepiece"
    if kind == "sentencepiece":
        return Tokenizer(entry["path"])
    if kind == "gpt2":
        return GPT2BPETokenizer(entry["path"], entry["merge_file"])

    return from_entry(entry)
