"""Megatron-LM's indexed token files (mtlm/data/indexed.py): files written by a small reference writer of the format
(written here from its description, not with mtlm's code) load, mtlm's writer produces the same bytes, and every
mismatch between .idx and .bin is a one-line error naming the file."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from mtlm.data import DataError
from mtlm.data.indexed import IndexedDataset, IndexedWriter, best_dtype

CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.uint8): 1, np.dtype(np.int64): 5}


def reference_write(prefix: str, documents: list[list[list[int]]], dtype) -> None:
    """The format as Megatron-LM's tools/preprocess_data.py leaves it: each document a list of sequences."""
    dtype = np.dtype(dtype)
    sizes, pointers, doc_idx, offset = [], [], [0], 0
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                f.write(np.array(seq, dtype=dtype).tobytes())
                sizes.append(len(seq))
                pointers.append(offset)
                offset += len(seq) * dtype.itemsize
            doc_idx.append(len(sizes))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes())
        f.write(np.array(pointers, dtype=np.int64).tobytes())
        f.write(np.array(doc_idx, dtype=np.int64).tobytes())


def random_documents(rng: np.random.Generator, n: int, vocab: int, sentences: bool) -> list[list[list[int]]]:
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 4)) if sentences else 1
        docs.append([rng.integers(0, vocab, size=int(rng.integers(0 if sentences else 1, 40))).tolist()
                     for _ in range(k)])
    return docs


@pytest.mark.parametrize("vocab,sentences", [(50257, False), (70000, False), (30522, True)])
def test_reference_files_load_and_mtlm_writes_the_same_bytes(tmp_path, vocab, sentences):
    rng = np.random.default_rng(vocab)
    docs = random_documents(rng, 50, vocab, sentences)
    dtype = best_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    reference_write(str(tmp_path / "ref"), docs, dtype)
    ds = IndexedDataset(str(tmp_path / "ref"))
    assert ds.dtype == np.dtype(dtype) and ds.num_documents == 50
    assert len(ds) == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        assert ds.get_document(i).tolist() == [t for seq in doc for t in seq]
        assert [s.tolist() for s in ds.document_sequences(i)] == doc
    bounds = ds.document_bounds()
    assert [ds.tokens[a:b].tolist() for a, b in bounds] == [ds.get_document(i).tolist() for i in range(50)]
    assert ds.max_token_id() == max(t for d in docs for s in d for t in s)

    with IndexedWriter(str(tmp_path / "mine"), dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()
    for ext in ("idx", "bin"):
        assert (tmp_path / f"mine.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes(), ext
    header = (tmp_path / "mine.idx").read_bytes()[:34]
    code = CODES[np.dtype(dtype)]
    assert header == b"MMIDIDX\x00\x00" + bytes([1, 0, 0, 0, 0, 0, 0, 0, code]) + \
        len(ds).to_bytes(8, "little") + (51).to_bytes(8, "little")
    assert sorted(os.listdir(tmp_path)) == ["mine.bin", "mine.idx", "ref.bin", "ref.idx"]  # no temporaries left


def test_interrupted_writer_leaves_nothing_that_loads(tmp_path):
    prefix = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    w = IndexedWriter(prefix, np.uint16)
    w.add_document([1, 2, 3])  # killed before finish(): only temporaries exist, which nothing reads as a pair
    assert all(".tmp-" in name for name in os.listdir(tmp_path))
    with pytest.raises(DataError, match="part.bin not found"):
        IndexedDataset(prefix)
    w.abort()


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_mismatched_pairs_are_one_line_errors(tmp_path):
    prefix = str(tmp_path / "c")
    reference_write(prefix, [[[1, 2, 3]], [[4, 5]]], np.uint16)
    good_idx, good_bin = open(f"{prefix}.idx", "rb").read(), open(f"{prefix}.bin", "rb").read()
    cases = {
        "bin too short": (good_idx, good_bin[:-2], "does not match"),
        "bin too long": (good_idx, good_bin + b"\0\0", "does not match"),
        "no magic": (b"XXIDIDX\x00\x00" + good_idx[9:], good_bin, "no MMIDIDX header"),
        "version 2": (good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], good_bin, "index version 2"),
        "dtype code": (good_idx[:17] + bytes([9]) + good_idx[18:], good_bin, "unknown dtype code 9"),
        "truncated idx": (good_idx[:-8], good_bin, "truncated or not this format"),
        "empty idx": (b"", good_bin, "no MMIDIDX header"),
        "pointers": (good_idx[:34 + 8] + struct.pack("<qq", 0, 4) + good_idx[34 + 24:], good_bin, "running sum"),
        "doc index": (good_idx[:-8] + struct.pack("<q", 1), good_bin, "document indices"),
    }
    for name, (idx, binary, want) in cases.items():
        open(f"{prefix}.idx", "wb").write(idx)
        open(f"{prefix}.bin", "wb").write(binary)
        with pytest.raises(DataError) as err:
            IndexedDataset(prefix)
        msg = one_line(err)
        assert want in msg and f"{prefix}." in msg, f"{name}: {msg}"
