"""Where documents come from: the embedded default corpus or the user's .txt / .jsonl files (.gz, .zst too).

A corpus is an iterable of documents (str). Documents are read lazily, one file at a time, so a large
.jsonl corpus is never held in memory as a whole; a .txt file is one document and is read whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from mtlm.errors import DataError

SUFFIXES = tuple(s + c for s in (".txt", ".jsonl") for c in ("", ".gz", ".zst"))
_HINT = "give existing .txt or .jsonl files (optionally .gz/.zst), or data.paths=[] for the built-in corpus"
BAD_POLICIES = ("skip", "fail")


class BadDocuments:
    """data.bad_documents: a document that is not valid UTF-8, or a .jsonl line that is not a JSON object with a
    string under text_key, is skipped and counted ("skip"), or stops the run with a one-line error ("fail")."""

    def __init__(self, policy: str = "skip", setting: str = "data.bad_documents=") -> None:
        if policy not in BAD_POLICIES:
            raise DataError(f"{setting}{policy!r}: must be skip or fail")
        self.policy, self.count, self.first, self.setting = policy, 0, "", setting

    def __call__(self, key: str, where: str, what: str) -> None:
        if self.policy == "fail":
            raise DataError(f"{key}: {where}: {what} ({self.setting}skip skips such documents)")
        self.count += 1
        self.first = self.first or f"{where}: {what}"

    def report(self) -> str | None:
        if not self.count:
            return None
        return (f"data: skipped {self.count} bad document(s), the first at {self.first} "
                f"({self.setting}fail stops instead)")


def default_documents() -> list[str]:
    """The embedded corpus: every topic of the stdlib's pydoc help (~0.47 MB of English), sorted by key.

    It ships with every CPython, so the default run needs no download and no data directory.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key]]


def resolve_paths(paths: Sequence[str] | None) -> list[str]:
    """Absolute paths, checked cheaply (exists, is a file, known suffix, not empty); raises DataError otherwise."""
    resolved = []
    for raw in list(paths or []):
        path = os.path.abspath(os.path.expanduser(str(raw)))
        if os.path.isdir(path):
            raise DataError(f"data.paths: {path} is a directory, not a file ({_HINT})")
        if not os.path.isfile(path):
            raise DataError(f"data.paths: file not found: {path} ({_HINT})")
        if not path.endswith(SUFFIXES):
            raise DataError(f"data.paths: unsupported file type: {path} ({_HINT})")
        if os.path.getsize(path) == 0:
            raise DataError(f"data.paths: {path} is empty; remove it from data.paths or give it text")
        resolved.append(path)
    return resolved


def open_binary(path: str) -> BinaryIO:
    """A file's bytes, decompressed for .gz and .zst (the latter needs the zstandard package)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"data.paths: {path}: reading .zst needs the zstandard package: pip install "
                            "zstandard (or pip install -e '.[zstd]')") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_documents(paths: Sequence[str], text_key: str = "text", bad: BadDocuments | None = None) -> Iterator[str]:
    """Documents of the corpus in a fixed order: the default corpus if `paths` is empty, else each file's.

    Empty documents are skipped: they would only add a lone end-of-document token. `bad` decides what a bad
    document does (default: fail).
    """
    if not paths:
        yield from default_documents()
        return
    bad = bad or BadDocuments("fail")
    for path in resolve_paths(paths):
        found = 0
        skipped = bad.count
        reader = _read_txt(path, bad) if ".txt" in os.path.basename(path) else _read_jsonl(path, text_key, bad)
        for doc in reader:
            found += 1
            yield doc
        if not found and bad.count == skipped:
            raise DataError(f"data.paths: {path} holds no text (empty after decompression, or only blank lines)")


class BadDocument(ValueError):
    """One bad document: `key` is the config key to name, `what` what is wrong with it."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(what)
        self.key, self.what = key, what


def decode_txt(raw: bytes) -> str:
    """A .txt file's bytes as its one document, with universal newlines as text-mode reading has them (CRLF
    and CR files give the same tokens as LF files)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadDocument("data.paths", f"not valid UTF-8 (byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_jsonl_line(raw: bytes, text_key: str) -> str:
    """The document of one .jsonl line ("" for a blank line or an empty text)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadDocument("data.paths", "not valid UTF-8") from None
    if not line.strip():
        return ""  # tolerate blank lines, e.g. a trailing one
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadDocument("data.paths", f"invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                          "JSON object") from None
    if not isinstance(record, dict):
        raise BadDocument("data.paths", f"expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        keys = ", ".join(sorted(map(str, record)))[:80]
        raise BadDocument("data.text_key", f"key {text_key!r} missing (keys there: {keys or 'none'}); set "
                          "data.text_key")
    text = record[text_key]
    if not isinstance(text, str):
        raise BadDocument("data.text_key", f"{text_key!r} is a {type(text).__name__}, not a string")
    return text


def _read_txt(path: str, bad: BadDocuments) -> Iterator[str]:
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = decode_txt(raw)
    except BadDocument as e:
        bad(e.key, path, e.what)
        return
    if text:
        yield text


def _read_jsonl(path: str, text_key: str, bad: BadDocuments) -> Iterator[str]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = decode_jsonl_line(raw, text_key)
            except BadDocument as e:
                bad(e.key, f"{path} line {lineno}", e.what)
                continue
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
