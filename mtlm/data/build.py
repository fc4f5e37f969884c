"""From the data config to train/val datasets: validate, prepare (slow, cached on disk), build (cheap).

Text (the built-in corpus, .txt / .jsonl files) is tokenized into the cache by the first run. Its split is by
tokens: the documents are concatenated (each followed by an end-of-document token) and the last `val_fraction`
of the stream is the validation set. Unlike a split by documents, this works for a corpus of one document (a
single .txt file) and always gives the requested proportion. Token files (Megatron-LM's format, written by
`python -m mtlm.data.preprocess` or by Megatron-LM) are split by documents (`data.split`) and read in place
(mtlm/data/token_files.py, gpt_dataset.py).

The tokenizer, when trained here, is trained on the whole corpus (validation text included), like most
LM pipelines; it only sees character statistics, never the train/val boundary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtlm.data import cache
from mtlm.data.corpus import BadDocuments, corpus_bytes, corpus_fingerprint, iter_documents, resolve_paths
from mtlm.data.dataset import TokenDataset, too_small
from mtlm.data.indexed import IndexedDataset
from mtlm.data.text_tokenizer import TextTokenizer, TokenizerSpec, check_spec, load_tokenizer, tokenizer_spec
from mtlm.data.token_files import Sources, check_sources, check_vocab, parse_sources, split_datasets
from mtlm.data.tokenizer import Tokenizer, train_tokenizer
from mtlm.errors import DataError

log = logging.getLogger(__name__)

VAL_SEED = 0  # fixed, so validation batches (and val loss) do not depend on the training seed
ENCODE_CHUNK_CHARS = 1 << 20  # encode huge documents piecewise to bound sentencepiece's memory
ENCODE_BATCH_CHARS = 8 << 20  # text handed to sentencepiece per (multi-threaded) call


@dataclass
class DataBundle:
    tokenizer: TextTokenizer | None  # None: token files without a data.tokenizer (model.vocab_size says the size)
    train: Any  # TokenDataset (text), TokenFileDataset or BlendedDataset (token files): get_batch(start, count)
    val: Any


@dataclass(frozen=True)
class _Settings:
    """The data config with defaults filled in and paths made absolute."""

    paths: list[str]  # text files (empty: the built-in corpus); token files are in `sources`
    sources: Sources
    text_key: str
    tokenizer: TokenizerSpec
    vocab_size: int
    val_fraction: float
    split: str
    bad_documents: str
    cache_dir: str


def _settings(cfg: Any) -> _Settings:
    # getattr with defaults: cfg may be a DictConfig or any attribute object (tests use SimpleNamespace).
    def get(key: str, default: Any) -> Any:
        value = getattr(cfg, key, default)
        return default if value is None else value

    sources = parse_sources(get("paths", []), get("blend", {}))
    return _Settings(
        paths=sources.paths if sources.kind == "text" else [],
        sources=sources,
        text_key=get("text_key", "text"),
        tokenizer=tokenizer_spec(getattr(cfg, "tokenizer", None)),
        vocab_size=get("vocab_size", 4096),
        val_fraction=get("val_fraction", 0.05),
        split=str(get("split", "969,30,1")),
        bad_documents=get("bad_documents", "skip"),
        cache_dir=get("cache_dir", cache.DEFAULT_CACHE_DIR),
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_UNKNOWN = object()


def validate_data_config(cfg: Any, model_vocab_size: Any = _UNKNOWN) -> None:
    """Cheap checks of the data config (stat and token-file headers only); raises a one-line DataError.
    `model_vocab_size` (model.vocab_size, when the caller knows it) lets token files without a tokenizer pass."""
    s = _settings(cfg)
    resolve_paths(s.paths)
    if not isinstance(s.text_key, str) or not s.text_key:
        raise DataError(f"data.text_key={s.text_key!r}: must be a non-empty string")
    check_spec(s.tokenizer)
    BadDocuments(s.bad_documents)
    if s.sources.kind == "tokens" and model_vocab_size is not _UNKNOWN:
        check_sources(s.sources, s.split, model_vocab_size, has_tokenizer=not s.tokenizer.trains)
    if not _is_number(s.val_fraction) or not 0 < s.val_fraction < 1:
        raise DataError(f"data.val_fraction={s.val_fraction!r}: must be a number with 0 < val_fraction < 1")
    if not _is_number(s.vocab_size) or int(s.vocab_size) != s.vocab_size or s.vocab_size < 256:
        raise DataError(f"data.vocab_size={s.vocab_size!r}: must be an integer >= 256")


def _entry(s: _Settings) -> tuple[str, str | None, str]:
    """(tokens entry dir, path to train the tokenizer to or None, tokenizer path in use)."""
    root = cache.cache_root(s.cache_dir)
    corpus = {"corpus": corpus_fingerprint(s.paths), "text_key": s.text_key if s.paths else None}
    if s.tokenizer.trains:
        # The tokenizer has its own entry, so changing only val_fraction does not retrain it.
        tok_key = cache.cache_key({**corpus, "vocab_size": int(s.vocab_size)})
        trained = tok_path = os.path.join(root, f"tok-{tok_key}", "tokenizer.model")
        tok_id: Any = tok_key
    elif s.tokenizer.type == "sentencepiece":
        # vocab_size is not part of the key here: a given tokenizer ignores it.
        st = os.stat(s.tokenizer.model)
        trained, tok_path, tok_id = None, s.tokenizer.model, [s.tokenizer.model, st.st_size, st.st_mtime_ns]
    else:
        trained, tok_path, tok_id = None, s.tokenizer.files()[0], s.tokenizer.identity()
    key = cache.cache_key({**corpus, "tokenizer": tok_id, "val_fraction": float(s.val_fraction)})
    return os.path.join(root, f"data-{key}"), trained, tok_path


def _token_stream(tokenizer: TextTokenizer, documents: Iterator[str]) -> Iterator[tuple[list[list[int]], int]]:
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


def _text_tokenizer(s: _Settings, tok_path: str) -> TextTokenizer:
    return Tokenizer(tok_path) if s.tokenizer.type == "sentencepiece" else load_tokenizer(s.tokenizer)


def _open_token_files(s: _Settings, model_vocab_size: Any) -> tuple[TextTokenizer | None, list[IndexedDataset]]:
    """The tokenizer (if one is configured) and every token file, fully checked; with `model_vocab_size` known,
    every id is checked against the vocabulary the model will have."""
    if model_vocab_size is not _UNKNOWN:
        check_sources(s.sources, s.split, model_vocab_size, has_tokenizer=not s.tokenizer.trains)
    tokenizer = None if s.tokenizer.trains else load_tokenizer(s.tokenizer)
    indexed = [IndexedDataset(p) for p in s.sources.paths]
    if model_vocab_size is not _UNKNOWN:
        vocab, key = (model_vocab_size, "model.vocab_size") if model_vocab_size else \
            (tokenizer.vocab_size, "model.vocab_size (null: the data.tokenizer's size)")
        check_vocab(indexed, int(vocab), key, cache.cache_root(s.cache_dir))
    return tokenizer, indexed


def prepare_data(cfg: Any, seq_length: int, model_vocab_size: Any = _UNKNOWN, seed: int | None = None) -> None:
    """Text: train/load the tokenizer and tokenize the corpus into the cache, unless already there. Token files:
    check them (ids below `model_vocab_size`, model.vocab_size, when given) and, with `seed`, build and cache the
    training sample index.

    Call once in the launching process before ranks start. Safe to run concurrently: all writes are
    atomic and deterministic. Raises DataError if the corpus is too small for `seq_length`.
    """
    validate_data_config(cfg, model_vocab_size)
    s = _settings(cfg)
    if s.sources.kind == "tokens":
        _, indexed = _open_token_files(s, model_vocab_size)
        split_datasets(indexed, s.sources, s.split, seq_length, VAL_SEED if seed is None else seed, VAL_SEED,
                       cache.cache_root(s.cache_dir))
        return
    entry, trained, tok_path = _entry(s)
    meta_path = os.path.join(entry, "meta.json")
    if os.path.exists(meta_path) and os.path.exists(tok_path):
        with open(meta_path) as f:
            meta = json.load(f)
        _report_skipped(meta)
        _check_size(meta, seq_length)
        return

    t0 = time.perf_counter()
    if trained is not None and not os.path.exists(trained):
        log.info("mtlm.data: training a %d-piece BPE tokenizer -> %s", s.vocab_size, trained)
        docs = iter_documents(s.paths, s.text_key, BadDocuments(s.bad_documents))
        train_tokenizer(docs, trained, int(s.vocab_size), corpus_bytes(s.paths))
    tokenizer = _text_tokenizer(s, tok_path)
    t_tok = time.perf_counter() - t0

    log.info("mtlm.data: tokenizing the corpus -> %s", entry)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    bad = BadDocuments(s.bad_documents)
    docs = iter_documents(s.paths, s.text_key, bad)
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
    if bad.count:
        meta["skipped_documents"] = {"count": bad.count, "report": bad.report()}
    cache.atomic_write_json(meta_path, meta)  # last: marks the entry complete
    _report_skipped(meta)
    _check_size(meta, seq_length)


def _report_skipped(meta: dict) -> None:
    skipped = meta.get("skipped_documents")
    if skipped:
        print(skipped["report"], file=sys.stderr, flush=True)


def _write_splits(
    tokenizer: TextTokenizer, documents: Iterator[str], entry: str, dtype: type, val_fraction: float
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
    """Load the tokenizer and memory-map the tokens (text: preparing the cache first if missing).

    Cheap enough to call on every rank. The training order depends on `seed`; validation uses a fixed seed.
    """
    validate_data_config(cfg)
    s = _settings(cfg)
    if s.sources.kind == "tokens":
        tokenizer, indexed = _open_token_files(s, _UNKNOWN)
        train, val = split_datasets(indexed, s.sources, s.split, seq_length, seed, VAL_SEED,
                                    cache.cache_root(s.cache_dir))
        return DataBundle(tokenizer=tokenizer, train=train, val=val)
    entry, _, tok_path = _entry(s)
    if not (os.path.exists(os.path.join(entry, "meta.json")) and os.path.exists(tok_path)):
        prepare_data(cfg, seq_length)
    tokenizer = _text_tokenizer(s, tok_path)
    train = np.load(os.path.join(entry, "train.npy"), mmap_mode="r")
    val = np.load(os.path.join(entry, "val.npy"), mmap_mode="r")
    return DataBundle(
        tokenizer=tokenizer,
        train=TokenDataset(train, seq_length, seed, split="train"),
        val=TokenDataset(val, seq_length, VAL_SEED, split="val"),
    )
