"""Where documents come from: the embedded default corpus or the user's .txt / .jsonl files.

A corpus is an iterable of documents (str). Documents are read lazily, one file at a time, so a large
.jsonl corpus is never held in memory as a whole; a .txt file is one document and is read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence

from mtlm.data.errors import DataError

SUFFIXES = (".txt", ".jsonl")
_HINT = "give existing .txt or .jsonl files, or data.paths=[] for the built-in corpus"


def default_documents() -> list[str]:
    """The embedded corpus: every topic of the stdlib's pydoc help (~0.47 MB of English), sorted by key.

    It ships with every CPython, so the default run needs no download and no data directory.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key]]


def resolve_paths(paths: Sequence[str] | None) -> list[str]:
    """Absolute paths, checked cheaply (exists, is a file, known suffix); raises DataError otherwise."""
    resolved = []
    for raw in list(paths or []):
        path = os.path.abspath(os.path.expanduser(str(raw)))
        if os.path.isdir(path):
            raise DataError(f"data.paths: {path} is a directory, not a file ({_HINT})")
        if not os.path.isfile(path):
            raise DataError(f"data.paths: file not found: {path} ({_HINT})")
        if not path.endswith(SUFFIXES):
            raise DataError(f"data.paths: unsupported file type: {path} ({_HINT})")
        resolved.append(path)
    return resolved


def iter_documents(paths: Sequence[str], text_key: str = "text") -> Iterator[str]:
    """Documents of the corpus in a fixed order: the default corpus if `paths` is empty, else each file's.

    Empty documents are skipped: they would only add a lone end-of-document token.
    """
    if not paths:
        yield from default_documents()
        return
    for path in resolve_paths(paths):
        if path.endswith(".txt"):
            yield from _read_txt(path)
        else:
            yield from _read_jsonl(path, text_key)


def _read_txt(path: str) -> Iterator[str]:
    try:
        # Universal newlines: \r\n files give the same tokens as \n files.
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"data.paths: {path} is not valid UTF-8 text (byte {e.start}); convert it") from None
    if text:
        yield text


def _read_jsonl(path: str, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"data.paths: {path} line {lineno + 1}: not valid UTF-8") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue  # tolerate blank lines, e.g. a trailing one
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"data.paths: {path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"data.paths: {path} line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            if text_key not in record:
                keys = ", ".join(sorted(map(str, record)))[:80]
                raise DataError(
                    f"data.text_key: key {text_key!r} missing in {path} line {lineno} "
                    f"(keys there: {keys or 'none'}); set data.text_key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(
                    f"data.text_key: {path} line {lineno}: {text_key!r} is a {type(text).__name__}, "
                    "not a string"
                )
            if text:
                yield text


def corpus_fingerprint(paths: Sequence[str]) -> dict:
    """What identifies the corpus for the cache key, without reading user files.

    The default corpus is hashed by content (it changes with the Python version); user files by path,
    size and mtime, which is cheap enough to do on every rank at every start.
    """
    if not paths:
        digest = hashlib.sha256()
        for doc in default_documents():
            digest.update(doc.encode("utf-8"))
            digest.update(b"\0")
        return {"default": digest.hexdigest()}
    files = []
    for path in resolve_paths(paths):
        st = os.stat(path)
        files.append([path, st.st_size, st.st_mtime_ns])
    return {"files": files}


def corpus_bytes(paths: Sequence[str]) -> int:
    """Approximate size of the corpus text in bytes (file sizes; exact for the default corpus)."""
    if not paths:
        return sum(len(doc.encode("utf-8")) for doc in default_documents())
    return sum(os.path.getsize(p) for p in resolve_paths(paths))
