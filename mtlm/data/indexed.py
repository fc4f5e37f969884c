"""Megatron-LM's preprocessed token files (`PREFIX.bin` + `PREFIX.idx`, the "MMIDIDX" indexed dataset), both ways.

The format (docs: /work/shared/reference/released-models.md; Megatron-LM, Shoeybi et al. 2019, trains from it):

    PREFIX.bin   the token ids of every sequence, back to back, one dtype, no header
    PREFIX.idx   little endian:
                 b"MMIDIDX\\x00\\x00"   9 bytes
                 version              uint64, 1
                 dtype code           uint8 (DTYPE_CODES)
                 sequence count n     uint64
                 document-index count uint64 (number of documents + 1)
                 sequence lengths     int32 x n
                 sequence pointers    int64 x n   (byte offsets into .bin)
                 document indices     int64 x (documents + 1): sequence-index boundaries, from 0 to n

A document is one sequence (GPT, `--append-eod`) or several (BERT corpora split into sentences). mtlm writes the
same bytes as Megatron-LM's tools/preprocess_data.py for the same tokens, so files go both ways unchanged.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from types import TracebackType

import numpy as np

from mtlm.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document-index count (after MAGIC)
HEADER_BYTES = len(MAGIC) + HEADER.size  # 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_HINT = "re-run python -m mtlm.data.preprocess (or Megatron-LM's tools/preprocess_data.py)"


def best_dtype(vocab_size: int) -> type:
    """Megatron-LM's choice, so mtlm's files match its bytes: uint16 below 65,500 tokens, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype: type | np.dtype) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {np.dtype(dtype)} has no code in the indexed format")


def index_bytes(dtype: type | np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> bytes:
    """The whole .idx file for sequences of `sizes` tokens stored back to back, and document boundaries."""
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    header = MAGIC + HEADER.pack(VERSION, dtype_code(dtype), len(sizes), len(doc_idx))
    return header + sizes.tobytes() + pointers.tobytes() + np.asarray(doc_idx, dtype=np.int64).tobytes()


def prefix_paths(prefix: str) -> tuple[str, str]:
    return f"{prefix}.bin", f"{prefix}.idx"


class IndexedWriter:
    """Writes PREFIX.bin + PREFIX.idx atomically: both go to temporary names next to the target, then .bin is
    renamed, then .idx last; a run that stops early leaves only `.tmp` files, never a pair that loads.

        with IndexedWriter(prefix, np.uint16) as w:
            for doc in docs:
                w.add_document(ids)          # or w.add_sequence(...) x k, then w.end_document()
    """

    def __init__(self, prefix: str, dtype: type | np.dtype) -> None:
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        dtype_code(self.dtype)
        self.bin_path, self.idx_path = prefix_paths(prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.bin_path)), exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = self.bin_path + tag, self.idx_path + tag
        self._bin = open(self._bin_tmp, "wb")
        self._sizes: list[np.ndarray] = []  # int32 chunks, so a large corpus never holds a Python int per sequence
        self._pending: list[int] = []
        self._doc_idx: list[int] = [0]
        self.num_sequences = 0
        self.num_tokens = 0

    def add_sequence(self, tokens: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes())
        self._pending.append(len(array))
        if len(self._pending) >= 1 << 16:
            self._sizes.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []
        self.num_sequences += 1
        self.num_tokens += len(array)

    def end_document(self) -> None:
        self._doc_idx.append(self.num_sequences)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        self.add_sequence(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def finish(self) -> None:
        """Write the index and move both files into place (the index last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.concatenate([*self._sizes, np.asarray(self._pending, dtype=np.int32)])
        with open(self._idx_tmp, "wb") as f:
            f.write(index_bytes(self.dtype, sizes, np.asarray(self._doc_idx, dtype=np.int64)))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(self.idx_path):  # an older pair: drop its index first, so no moment has a mismatched pair
            os.unlink(self.idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()


def read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document-index count) of an .idx file, checked against the file's size."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise DataError(f"data.paths: {idx_path} is not a Megatron indexed-dataset index (no MMIDIDX "
                        f"header); {_HINT}")
    version, code, n, d = HEADER.unpack(head[len(MAGIC):])
    if version != VERSION:
        raise DataError(f"data.paths: {idx_path} has index version {version}; only version {VERSION} "
                        f"is known; {_HINT}")
    if code not in DTYPE_CODES:
        raise DataError(f"data.paths: {idx_path} has an unknown dtype code {code}; {_HINT}")
    expected = HEADER_BYTES + 12 * n + 8 * d
    if size != expected:
        raise DataError(f"data.paths: {idx_path} has {size} bytes but its header ({n} sequences, {d} "
                        f"document indices) needs {expected}: truncated or not this format; {_HINT}")
    return np.dtype(DTYPE_CODES[code]), int(n), int(d)


class IndexedDataset:
    """A PREFIX.bin / PREFIX.idx pair, memory-mapped and checked (header, version, sizes against .bin).

    `tokens` is the whole .bin as one 1-D array; sequence i is tokens[p : p + sizes[i]] with p = pointers[i] /
    itemsize, and document d spans sequences doc_idx[d] .. doc_idx[d+1] - 1, which lie back to back in .bin.
    Nothing proportional to the corpus is held in memory: a corpus of 10^8 documents costs each rank no more
    than the memory maps (the checks read the index once, in chunks).
    """

    CHUNK = 1 << 22  # index entries per step of the one-pass checks

    def __init__(self, prefix: str) -> None:
        self.prefix = os.path.abspath(os.path.expanduser(prefix))
        self.bin_path, self.idx_path = prefix_paths(self.prefix)
        for path in (self.bin_path, self.idx_path):
            if not os.path.isfile(path):
                raise DataError(f"data.paths: {path} not found (a token-file prefix needs both PREFIX.bin and "
                                "PREFIX.idx)")
        self.dtype, n, d = read_header(self.idx_path)
        self.itemsize = self.dtype.itemsize
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sizes = index[off: off + 4 * n].view(np.int32)
        self.pointers = index[off + 4 * n: off + 12 * n].view(np.int64)
        self.doc_idx = index[off + 12 * n: off + 12 * n + 8 * d].view(np.int64)
        self.num_tokens = self._check_sequences()
        bin_bytes = os.path.getsize(self.bin_path)
        if bin_bytes != self.num_tokens * self.itemsize:
            raise DataError(f"data.paths: {self.bin_path} has {bin_bytes} bytes but {self.idx_path} describes "
                            f"{self.num_tokens} tokens x {self.itemsize} bytes: the pair does not match; {_HINT}")
        self._check_documents()
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_bytes
                       else np.empty(0, dtype=self.dtype))

    def _check_sequences(self) -> int:
        """Every pointer is the running sum of the lengths before it (the sequences lie back to back, which the
        samples rely on); returns the token count."""
        total = 0
        for a in range(0, len(self.sizes), self.CHUNK):
            sizes = self.sizes[a: a + self.CHUNK].astype(np.int64)
            ends = total + np.cumsum(sizes)
            if np.any(sizes < 0) or not np.array_equal(self.pointers[a: a + self.CHUNK],
                                                       (ends - sizes) * self.itemsize):
                raise DataError(f"data.paths: {self.idx_path}: sequence pointers are not the running sum of the "
                                f"sequence lengths (a corrupt or foreign index); {_HINT}")
            total = int(ends[-1])
        return total

    def _check_documents(self) -> None:
        n, d = len(self.sizes), len(self.doc_idx)
        ok = d >= 1 and self.doc_idx[0] == 0 and self.doc_idx[-1] == n
        for a in range(0, d - 1, self.CHUNK):
            ok = ok and not np.any(np.diff(self.doc_idx[a: a + self.CHUNK + 1]) < 0)
        if not ok:
            raise DataError(f"data.paths: {self.idx_path}: document indices must rise from 0 to the sequence count "
                            f"{n}; {_HINT}")

    def token_starts(self, sequences: np.ndarray | int) -> np.ndarray:
        """The token offset in `tokens` of each given sequence index (the sequence count n gives the end)."""
        seq = np.asarray(sequences, dtype=np.int64)
        inside = seq < len(self.sizes)
        out = np.full(seq.shape, self.num_tokens, dtype=np.int64)
        out[inside] = self.pointers[seq[inside]] // self.itemsize
        return out

    def document_span(self, d: int) -> tuple[int, int]:
        """(start, stop) of document d in `tokens` (scalar arithmetic: the sample reader's inner loop)."""
        first, end = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        n = len(self.sizes)
        start = int(self.pointers[first]) // self.itemsize if first < n else self.num_tokens
        return start, (int(self.pointers[end]) // self.itemsize if end < n else self.num_tokens)

    def __len__(self) -> int:
        """The number of sequences (Megatron's convention)."""
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """The tokens of sequence i (a read-only view into the memory map)."""
        start = int(self.pointers[i]) // self.itemsize
        return self.tokens[start: start + int(self.sizes[i])]

    def document_bounds(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """[hi - lo, 2] int64: (start, stop) token positions in `tokens` of documents lo .. hi - 1 (all by default)."""
        hi = self.num_documents if hi is None else hi
        return np.stack([self.token_starts(self.doc_idx[lo:hi]), self.token_starts(self.doc_idx[lo + 1: hi + 1])],
                        axis=1)

    def get_document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences joined; with --append-eod the last one is the eod)."""
        start, stop = self.document_span(d)
        return self.tokens[start: stop]

    def document_sequences(self, d: int) -> list[np.ndarray]:
        """Document d's sequences (sentences, for corpora preprocessed with sentence splitting)."""
        return [self[i] for i in range(int(self.doc_idx[d]), int(self.doc_idx[d + 1]))]

    def max_token_id(self, chunk: int = 1 << 26) -> int:
        """The largest token id in .bin (-1 if empty); reads the file once, in chunks."""
        top = -1
        for start in range(0, len(self.tokens), chunk):
            top = max(top, int(self.tokens[start: start + chunk].max()))
        return top

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, dtype={self.dtype.name}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens})")
