"""From the data config to train/val datasets: validate, prepare (slow, cached on disk), build (cheap).

The split is by tokens: the documents are concatenated (each followed by an end-of-document token) and
the last `val_fraction` of the stream is the validation set. Unlike a split by documents, this works for
a corpus of one document (a single .txt file) and always gives the requested proportion.

The tokenizer, when trained here, is trained on the whole corpus (validation text included), like most
LM pipelines; it only sees character statistics, never the train/val boundary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtlm.data import cache
from mtlm.data.corpus import corpus_bytes, corpus_fingerprint, iter_documents, resolve_paths
from mtlm.data.dataset import TokenDataset, too_small
from mtlm.data.errors import DataError
from mtlm.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

VAL_SEED = 0  # fixed, so validation batches (and val loss) do not depend on the training seed
ENCODE_CHUNK_CHARS = 1 << 20  # encode huge documents piecewise to bound sentencepiece's memory
ENCODE_BATCH_CHARS = 8 << 20  # text handed to sentencepiece per (multi-threaded) call


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TokenDataset
    val: TokenDataset


@dataclass(frozen=True)
class _Settings:
    """The data config with defaults filled in and paths made absolute."""

    paths: list[str]
    text_key: str
    tokenizer: str | None
    vocab_size: int
    val_fraction: float
    cache_dir: str


def _settings(cfg: Any) -> _Settings:
    # getattr with defaults: cfg may be a DictConfig or any attribute object (tests use SimpleNamespace).
    def get(key: str, default: Any) -> Any:
        value = getattr(cfg, key, default)
        return default if value is None else value

    tok = getattr(cfg, "tokenizer", None)
    return _Settings(
        paths=[str(p) for p in get("paths", [])],
        text_key=get("text_key", "text"),
        tokenizer=os.path.abspath(os.path.expanduser(str(tok))) if tok not in (None, "") else None,
        vocab_size=get("vocab_size", 4096),
        val_fraction=get("val_fraction", 0.05),
        cache_dir=get("cache_dir", cache.DEFAULT_CACHE_DIR),
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_data_config(cfg: Any) -> None:
    """Cheap checks of the data config (stat only, no file is read); raises a one-line DataError."""
    s = _settings(cfg)
    resolve_paths(s.paths)
    if not isinstance(s.text_key, str) or not s.text_key:
        raise DataError(f"data.text_key={s.text_key!r}: must be a non-empty string")
    if s.tokenizer is not None and not os.path.isfile(s.tokenizer):
        raise DataError(
            f"data.tokenizer: file not found: {s.tokenizer} (give a sentencepiece .model file, "
            "or data.tokenizer=null to train one)"
        )
    if not _is_number(s.val_fraction) or not 0 < s.val_fraction < 1:
        raise DataError(f"data.val_fraction={s.val_fraction!r}: must be a number with 0 < val_fraction < 1")
    if not _is_number(s.vocab_size) or int(s.vocab_size) != s.vocab_size or s.vocab_size < 256:
        raise DataError(f"data.vocab_size={s.vocab_size!r}: must be an integer >= 256")


def _entry(s: _Settings) -> tuple[str, str | None, str]:
    """(tokens entry dir, path to train the tokenizer to or None, tokenizer path in use)."""
    root = cache.cache_root(s.cache_dir)
    corpus = {"corpus": corpus_fingerprint(s.paths), "text_key": s.text_key if s.paths else None}
    if s.tokenizer is None:
        # The tokenizer has its own entry, so changing only val_fraction does not retrain it.
        tok_key = cache.cache_key({**corpus, "vocab_size": int(s.vocab_size)})
        trained = tok_path = os.path.join(root, f"tok-{tok_key}", "tokenizer.model")
        tok_id: Any = tok_key
    else:
        # vocab_size is not part of the key here: a given tokenizer ignores it.
        st = os.stat(s.tokenizer)
        trained, tok_path, tok_id = None, s.tokenizer, [s.tokenizer, st.st_size, st.st_mtime_ns]
    key = cache.cache_key({**corpus, "tokenizer": tok_id, "val_fraction": float(s.val_fraction)})
    return os.path.join(root, f"data-{key}"), trained, tok_path


def _token_stream(tokenizer: Tokenizer, documents: Iterator[str]) -> Iterator[tuple[list[list[int]], int]]:
    """Batches of (encoded pieces, number of documents finished); each document ends with eos."""
    threads = max(1, min(8, os.cpu_count() or 1))
    batch: list[str] = []
    ends: list[bool] = []

    def flush() -> tuple[list[list[int]], int]:
        encoded = tokenizer.encode_batch(batch, num_threads=threads)
        for ids, is_end in zip(encoded, ends, strict=True):
            if is_end:
                ids.append(tokenizer.eos_id)
        done = sum(ends)
        batch.clear()
        ends.clear()
        return encoded, done

    size = 0
    for doc in documents:
        # Huge documents are encoded piecewise; each piece round-trips, so the stream still decodes to doc.
        pieces = [doc[i : i + ENCODE_CHUNK_CHARS] for i in range(0, len(doc), ENCODE_CHUNK_CHARS)]
        for j, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(j == len(pieces) - 1)
            size += len(piece)
            if size >= ENCODE_BATCH_CHARS:
                yield flush()
                size = 0
    if batch:
        yield flush()


def _check_size(meta: dict, seq_length: int) -> None:
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] < seq_length + 1:
            raise too_small(split, meta[f"{split}_tokens"], seq_length)


def prepare_data(cfg: Any, seq_length: int) -> None:
    """Train/load the tokenizer and tokenize the corpus into the cache, unless already there.

    Call once in the launching process before ranks start. Safe to run concurrently: all writes are
    atomic and deterministic. Raises DataError if the corpus is too small for `seq_length`.
    """
    validate_data_config(cfg)
    s = _settings(cfg)
    entry, trained, tok_path = _entry(s)
    meta_path = os.path.join(entry, "meta.json")
    if os.path.exists(meta_path) and os.path.exists(tok_path):
        with open(meta_path) as f:
            _check_size(json.load(f), seq_length)
        return

    t0 = time.perf_counter()
    if trained is not None and not os.path.exists(trained):
        log.info("mtlm.data: training a %d-piece BPE tokenizer -> %s", s.vocab_size, trained)
        docs = iter_documents(s.paths, s.text_key)
        train_tokenizer(docs, trained, int(s.vocab_size), corpus_bytes(s.paths))
    tokenizer = Tokenizer(tok_path)
    t_tok = time.perf_counter() - t0

    log.info("mtlm.data: tokenizing the corpus -> %s", entry)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    docs = iter_documents(s.paths, s.text_key)
    n_docs, n_tokens = _write_splits(tokenizer, docs, entry, dtype, s.val_fraction)
    meta = {
        "format_version": cache.FORMAT_VERSION,
        "paths": s.paths or "<default: pydoc_data.topics>",
        "text_key": s.text_key,
        "tokenizer": tok_path,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": np.dtype(dtype).name,
        "documents": n_docs,
        "val_fraction": float(s.val_fraction),
        "train_tokens": n_tokens[0],
        "val_tokens": n_tokens[1],
        "tokenizer_seconds": round(t_tok, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    cache.atomic_write_json(meta_path, meta)  # last: marks the entry complete
    _check_size(meta, seq_length)


def _write_splits(
    tokenizer: Tokenizer, documents: Iterator[str], entry: str, dtype: type, val_fraction: float
) -> tuple[int, tuple[int, int]]:
    """Tokenize into <entry>/train.npy and val.npy; returns (documents, (train tokens, val tokens)).

    Tokens stream to a raw scratch file first, so memory stays bounded by one encode batch however large
    the corpus is; the split point is only known once the total is.
    """
    os.makedirs(entry, exist_ok=True)
    fd, raw_path = cache.tmp_in(os.path.join(entry, "stream.bin"))
    try:
        n_docs = n_tokens = 0
        with os.fdopen(fd, "wb") as raw:
            for encoded, docs_done in _token_stream(tokenizer, documents):
                for ids in encoded:
                    np.asarray(ids, dtype=dtype).tofile(raw)
                    n_tokens += len(ids)
                n_docs += docs_done
        stream = np.memmap(raw_path, dtype=dtype, mode="r") if n_tokens else np.empty(0, dtype)
        n_train = n_tokens - int(round(n_tokens * float(val_fraction)))
        cache.atomic_save_npy(os.path.join(entry, "train.npy"), stream[:n_train])
        cache.atomic_save_npy(os.path.join(entry, "val.npy"), stream[n_train:])
        del stream
    finally:
        os.unlink(raw_path)
    return n_docs, (n_train, n_tokens - n_train)


def build_data(cfg: Any, seq_length: int, seed: int) -> DataBundle:
    """Load the cached tokenizer and memory-map the cached tokens (preparing them first if missing).

    Cheap enough to call on every rank. The training order depends on `seed`; validation uses a fixed seed.
    """
    validate_data_config(cfg)
    entry, _, tok_path = _entry(_settings(cfg))
    if not (os.path.exists(os.path.join(entry, "meta.json")) and os.path.exists(tok_path)):
        prepare_data(cfg, seq_length)
    tokenizer = Tokenizer(tok_path)
    train = np.load(os.path.join(entry, "train.npy"), mmap_mode="r")
    val = np.load(os.path.join(entry, "val.npy"), mmap_mode="r")
    return DataBundle(
        tokenizer=tokenizer,
        train=TokenDataset(train, seq_length, seed, split="train"),
        val=TokenDataset(val, seq_length, VAL_SEED, split="val"),
    )
