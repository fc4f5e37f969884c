"""Text -> Megatron-format token files, with N worker processes (argparse, like Megatron-LM's own tool).

    python -m mtlm.data.preprocess --input data/*.jsonl.gz --output-prefix data/corpus_text_document \\
        --tokenizer-type gpt2 --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt --workers 2

Each document (a .jsonl line's `--json-key`, or a whole .txt file; .gz and .zst are read as they are) is
encoded and ends with the end-of-document token, as one sequence of one document. The main process reads and
writes, in order; the workers decode UTF-8, parse JSON and tokenize. Output goes to temporary names, the index
last, then both are renamed: a run that stops early leaves nothing that loads as a corpus.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from mtlm.data.corpus import BadDocument, BadDocuments, decode_jsonl_line, decode_txt, open_binary, resolve_paths
from mtlm.data.indexed import IndexedWriter, best_dtype
from mtlm.data.text_tokenizer import TOKENIZER_TYPES, TokenizerSpec, check_spec, load_tokenizer, tokenizer_spec
from mtlm.errors import DataError

BATCH_BYTES = 1 << 18  # text handed to a worker at a time

# The data config's names in the messages shared with train.py -> this command's flags.
CLI_NAMES = {"data.paths": "--input", "data.text_key": "--json-key", "data.tokenizer.type": "--tokenizer-type",
             "data.tokenizer.model": "--tokenizer-model", "data.tokenizer.vocab_file": "--vocab-file",
             "data.tokenizer.merge_file": "--merge-file",
             "data.tokenizer": "--tokenizer-type"}
_worker: dict[str, Any] = {}  # this worker process's tokenizer, dtype and json key


def _init(spec: dict, dtype: str, json_key: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers says the parallelism
    tok = load_tokenizer(TokenizerSpec(**spec))
    _worker.update(tok=tok, dtype=np.dtype(dtype), key=json_key)


def _encode(job: tuple[str, bool, list[tuple[int, bytes]]]) -> tuple[np.ndarray, np.ndarray, list, int]:
    """One batch of raw lines (or one .txt file) -> (tokens, per-document lengths, bad lines, bytes read)."""
    path, is_txt, items = job
    tok, dtype, key = _worker["tok"], _worker["dtype"], _worker["key"]
    texts, bad, nbytes = [], [], 0
    for lineno, raw in items:
        nbytes += len(raw)
        try:
            text = decode_txt(raw) if is_txt else decode_jsonl_line(raw, key)
        except BadDocument as e:
            bad.append((path if is_txt else f"{path} line {lineno}", e.key, e.what))
            continue
        if text:
            texts.append(text)
    ids = tok.encode_batch(texts) if texts else []
    lengths = np.asarray([len(x) + 1 for x in ids], dtype=np.int32)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for x in ids:
        flat[end: end + len(x)] = x
        flat[end + len(x)] = tok.eos_id
        end += len(x) + 1
    return flat, lengths, bad, nbytes


def _jobs(paths: list[str]) -> Iterator[tuple[str, bool, list[tuple[int, bytes]]]]:
    for path in paths:
        is_txt = ".txt" in os.path.basename(path)
        with open_binary(path) as f:
            if is_txt:
                yield path, True, [(1, f.read())]
                continue
            batch, size = [], 0
            for lineno, raw in enumerate(f, start=1):
                batch.append((lineno, raw))
                size += len(raw)
                if size >= BATCH_BYTES:
                    yield path, False, batch
                    batch, size = [], 0
            if batch:
                yield path, False, batch


def _in_order(pool: Any, jobs: Iterator, window: int) -> Iterator:
    """The workers' results in input order, with at most `window` jobs in flight: Pool.imap would read the whole
    corpus ahead into its task queue."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_encode, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class Progress:
    """One status line (documents, tokens, MB/s), redrawn in place on a terminal, every 10 s in a log."""

    def __init__(self, total_bytes: int, quiet: bool) -> None:
        self.t0 = self.last = time.perf_counter()
        self.total, self.quiet, self.tty = total_bytes, quiet, sys.stderr.isatty()
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + tokens, self.bytes + nbytes
        now = time.perf_counter()
        if self.quiet or not (final or now - self.last >= (0.5 if self.tty else 10.0)):
            return
        self.last = now
        line = (f"{self.docs:,} docs  {self.tokens:,} tokens  {self.bytes / 2**20:,.1f} MiB "
                f"({self.mb_per_s:.2f} MB/s)")
        print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr,
              flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def preprocess(inputs: list[str], prefix: str, spec: TokenizerSpec, json_key: str = "text", workers: int = 1,
               bad_documents: str = "skip", force: bool = False, quiet: bool = False,
               setting: str = "bad_documents=") -> dict:
    """Tokenize `inputs` into PREFIX.bin + PREFIX.idx; returns the summary (documents, tokens, MB/s, ...).
    `setting`: how messages name the bad-documents choice."""
    paths = resolve_paths(inputs)
    check_spec(spec)
    if spec.trains:
        raise DataError("--tokenizer-model: give a sentencepiece .model (python -m mtlm.data.train_tokenizer "
                        "makes one), or --tokenizer-type gpt2 with --vocab-file and --merge-file")
    if workers < 1:
        raise DataError(f"--workers={workers}: must be >= 1")
    prefix = os.path.abspath(os.path.expanduser(prefix))
    existing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if os.path.exists(p)]
    if existing and not force:
        raise DataError(f"--output-prefix: {existing[0]} exists; choose another prefix or pass --force to replace it")
    bad = BadDocuments(bad_documents, setting)
    tok = load_tokenizer(spec)
    dtype = np.dtype(best_dtype(tok.vocab_size))
    progress = Progress(sum(os.path.getsize(p) for p in paths), quiet)
    init_args = (asdict(spec), dtype.name, json_key)
    pool = mp.get_context("spawn").Pool(workers, _init, init_args) if workers > 1 else None
    try:
        if pool is None:
            _init(*init_args)
        results = _in_order(pool, _jobs(paths), 4 * workers) if pool else map(_encode, _jobs(paths))
        with IndexedWriter(prefix, dtype) as writer:
            for flat, lengths, bad_lines, nbytes in results:
                for where, key, what in bad_lines:
                    bad(key, where, what)
                for piece in np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else ():
                    writer.add_document(piece)
                progress.update(len(lengths), len(flat), nbytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    progress.update(0, 0, 0, final=True)
    summary = {"prefix": prefix, "documents": writer.num_documents, "tokens": writer.num_tokens,
               "skipped_documents": bad.count, "input_bytes": progress.bytes, "seconds": round(progress.seconds, 3),
               "mb_per_s": round(progress.mb_per_s, 3), "workers": workers, "tokenizer": tok.entry(),
               "dtype": dtype.name}
    if bad.count:
        print(bad.report(), file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtlm.data.preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files (optionally .gz / .zst)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="sentencepiece")
    p.add_argument("--tokenizer-model", help="sentencepiece: the .model file")
    p.add_argument("--vocab-file", help="gpt2: vocab.json; wordpiece: vocab.txt")
    p.add_argument("--merge-file", help="gpt2: merges.txt")
    p.add_argument("--json-key", default="text", help="the text field of each .jsonl line (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--bad-documents", choices=("skip", "fail"), default="skip",
                   help="invalid UTF-8, a line that is not JSON or lacks the key: skip and count (default) or fail")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    try:
        spec = tokenizer_spec({"type": args.tokenizer_type, "model": args.tokenizer_model,
                               "vocab_file": args.vocab_file, "merge_file": args.merge_file})
        s = preprocess(args.input, args.output_prefix, spec, args.json_key, args.workers, args.bad_documents,
                       args.force, args.quiet, "--bad-documents ")
    except DataError as err:
        line = str(err)
        for key, flag in CLI_NAMES.items():
            line = line.replace(key, flag)
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written (temporary files removed)", file=sys.stderr)
        return 130
    print(f"wrote {s['prefix']}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}), "
          f"{s['input_bytes'] / 1e6:,.1f} MB of text in {s['seconds']:.1f} s = {s['mb_per_s']:.2f} MB/s with "
          f"{s['workers']} worker(s); skipped {s['skipped_documents']} bad document(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
