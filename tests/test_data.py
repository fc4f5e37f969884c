"""Tests of mtlm.data: tokenizer, cache, token datasets and the errors for bad input."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtlm.data import DataBundle, DataError, Tokenizer, build_data, prepare_data, validate_data_config
from mtlm.data.cache import cache_root
from mtlm.data.corpus import default_documents
from mtlm.data.dataset import TokenDataset
from mtlm.data.tokenizer import train_tokenizer

TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
    "multiple     spaces    inside",
    "digits 0123456789 and 3.14159e-10 and 1,000,000",
    "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀 and combining e\u0301 and zero width\u200bjoiner",
    "\u2581 the sentencepiece space marker itself \u2581\u2581",
    "<s> </s> <pad> <unk> look like specials but are text",
    "\x00 control \x07 chars \x1b[0m",
    " ",
    "\n",
]


def make_cfg(**overrides) -> SimpleNamespace:
    # The data section of the Hydra config, as an attribute object.
    defaults = dict(paths=[], text_key="text", tokenizer=None, vocab_size=4096, val_fraction=0.05)
    return SimpleNamespace(**{**defaults, "cache_dir": "~/.cache/mtlm", **overrides})


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache root, never ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MTLM_CACHE_DIR", str(root))
    return root


@pytest.fixture
def default_bundle(cache) -> DataBundle:
    return build_data(make_cfg(), seq_length=64, seed=1)


def full_stream(bundle: DataBundle) -> np.ndarray:
    return np.concatenate([np.asarray(bundle.train.tokens), np.asarray(bundle.val.tokens)])


def split_docs(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    """Cut a token stream at eos tokens; every document must be followed by one."""
    assert stream[-1] == eos
    ends = np.flatnonzero(stream == eos)
    return np.split(stream, ends + 1)[:-1]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_tricky_text(default_bundle):
    tok = default_bundle.tokenizer
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text, repr(text)
    # decode takes tensors and arrays as well as lists
    ids = tok.encode(TRICKY[7])
    assert tok.decode(torch.tensor(ids)) == TRICKY[7]
    assert tok.decode(np.array(ids, dtype=np.uint16)) == TRICKY[7]
    # the whole tricky set in one string too (pieces may span the joins)
    joined = "\n".join(TRICKY) * 3
    assert tok.decode(tok.encode(joined)) == joined


def test_tokenizer_properties_and_corpus_stream_round_trip(default_bundle):
    tok = default_bundle.tokenizer
    assert tok.vocab_size == 4096
    assert tok.eos_id == 3 and tok.eos_id not in tok.encode("</s> text ending in </s>")
    assert os.path.isfile(tok.path)
    # The cached stream is the documents in order, each followed by eos, and decodes back exactly.
    docs = default_documents()
    pieces = split_docs(full_stream(default_bundle), tok.eos_id)
    assert len(pieces) == len(docs) == 79
    for piece, doc in zip(pieces, docs, strict=True):
        assert piece[-1] == tok.eos_id and tok.eos_id not in piece[:-1]
        assert tok.decode(piece[:-1]) == doc
    # It compresses: BPE with 4096 pieces is far fewer tokens than characters.
    assert len(full_stream(default_bundle)) < sum(map(len, docs)) / 3


def test_tokenizer_vocab_size_follows_config_and_pickles(cache):
    bundle = build_data(make_cfg(vocab_size=1000), seq_length=32, seed=0)
    assert bundle.tokenizer.vocab_size == 1000
    assert int(full_stream(bundle).max()) < 1000
    tok = bundle.tokenizer
    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, Tokenizer) and clone.path == tok.path
    assert clone.encode(TRICKY[7]) == tok.encode(TRICKY[7])


def test_training_is_deterministic(tmp_path):
    docs = default_documents()[:20]
    a = train_tokenizer(iter(docs), str(tmp_path / "a.model"), 800)
    b = train_tokenizer(iter(docs), str(tmp_path / "b.model"), 800)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(docs[0]) == b.encode(docs[0])


def test_user_tokenizer_is_loaded_not_trained(cache, tmp_path):
    model = tmp_path / "my.model"
    train_tokenizer(iter(default_documents()), str(model), 700)
    mtime = model.stat().st_mtime_ns
    bundle = build_data(make_cfg(tokenizer=str(model), vocab_size=4096), seq_length=32, seed=0)
    assert bundle.tokenizer.path == str(model) and bundle.tokenizer.vocab_size == 700
    assert model.stat().st_mtime_ns == mtime
    assert not list(cache.glob("tok-*")), "no tokenizer may be trained when data.tokenizer is given"


# ---------------------------------------------------------------- cache


def test_second_build_hits_cache(cache, monkeypatch):
    cfg = make_cfg()
    prepare_data(cfg, seq_length=64)
    entries = sorted(p.name for p in cache.iterdir())
    assert [e.split("-")[0] for e in entries] == ["data", "tok"]
    tok_file = next(cache.glob("tok-*/tokenizer.model"))
    data_dir = next(cache.glob("data-*"))
    assert sorted(p.name for p in data_dir.iterdir()) == ["meta.json", "train.npy", "val.npy"]
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["documents"] == 79 and meta["vocab_size"] == 4096
    stamps = {p: p.stat().st_mtime_ns for p in [tok_file, *data_dir.iterdir()]}
    first = build_data(cfg, seq_length=64, seed=1)

    # A cache hit must not retrain or retokenize: make both impossible.
    def boom(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr("mtlm.data.build.train_tokenizer", boom)
    monkeypatch.setattr("mtlm.data.build._write_splits", boom)
    time.sleep(0.01)
    prepare_data(cfg, seq_length=64)
    second = build_data(cfg, seq_length=64, seed=1)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert np.array_equal(full_stream(first), full_stream(second))
    assert torch.equal(first.train.get_batch(5, 7), second.train.get_batch(5, 7))
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_changed_corpus_gets_new_entry(cache, tmp_path):
    corpus = tmp_path / "corpus.txt"
    text = "\n".join(default_documents()[:30])
    corpus.write_text(text)
    cfg = make_cfg(paths=[str(corpus)], vocab_size=1000)
    a = build_data(cfg, seq_length=32, seed=0)
    time.sleep(0.01)
    corpus.write_text(text + "\nA brand new closing paragraph about something else entirely.\n")
    b = build_data(cfg, seq_length=32, seed=0)
    assert len(list(cache.glob("data-*"))) == 2 and len(list(cache.glob("tok-*"))) == 2
    assert a.tokenizer.path != b.tokenizer.path
    assert b.tokenizer.decode(full_stream(b)[:-1]).endswith("something else entirely.\n")
    # Changing only val_fraction re-splits but reuses the tokenizer.
    c = build_data(make_cfg(paths=[str(corpus)], vocab_size=1000, val_fraction=0.2), seq_length=32, seed=0)
    assert c.tokenizer.path == b.tokenizer.path
    assert np.array_equal(full_stream(c), full_stream(b))
    assert len(c.val.tokens) == round(0.2 * len(full_stream(c)))


def test_cache_root_env_and_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root("~/.cache/mtlm") == str(tmp_path / "env")
    monkeypatch.delenv("MTLM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root("~/.cache/mtlm") == str(tmp_path / "home" / ".cache" / "mtlm")


def test_omegaconf_config(cache, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"body": d}) + "\n" for d in default_documents()[:25]))
    settings = make_cfg(paths=[str(docs)], text_key="body", vocab_size=600, val_fraction=0.1)
    cfg = OmegaConf.create(vars(settings))
    OmegaConf.set_struct(cfg, True)  # as Hydra hands it over: unknown keys raise
    validate_data_config(cfg)
    bundle = build_data(cfg, seq_length=16, seed=3)
    assert bundle.tokenizer.vocab_size == 600 and len(bundle.train) > len(bundle.val) > 0


# ---------------------------------------------------------------- dataset


def test_get_batch_shape_and_offsets(default_bundle):
    ds = default_bundle.train
    seq = ds.seq_length
    tokens = np.asarray(ds.tokens).astype(np.int64)
    assert len(ds) == (len(tokens) - 1) // seq
    batch = ds.get_batch(10, 6)
    assert batch.shape == (6, seq + 1) and batch.dtype == torch.int64
    for row, idx in zip(batch, ds.sample_indices(10, 6), strict=True):
        expect = tokens[idx * seq : idx * seq + seq + 1]
        assert np.array_equal(row.numpy(), expect)
        inputs, targets = row[:-1], row[1:]
        # target t is the token after input t in the raw stream
        assert np.array_equal(targets.numpy(), tokens[idx * seq + 1 : idx * seq + seq + 1])
        assert np.array_equal(inputs.numpy(), tokens[idx * seq : idx * seq + seq])
    assert ds.get_batch(0, 0).shape == (0, seq + 1)


def test_positions_deterministic_and_permutation_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)  # sample i starts with token i * seq
    seq = 7
    ds = TokenDataset(tokens, seq_length=seq, seed=42)
    n = len(ds)
    assert n == 999 // 7
    epoch0 = ds.get_batch(0, n)[:, 0].numpy() // seq
    epoch1 = ds.get_batch(n, n)[:, 0].numpy() // seq
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1), "each epoch must be reshuffled"
    assert not np.array_equal(epoch0, np.arange(n)), "samples must be shuffled"
    # A fresh dataset (new process, resumed run) gives the same samples at the same positions.
    again = TokenDataset(tokens, seq_length=seq, seed=42)
    assert torch.equal(again.get_batch(n - 3, 9), ds.get_batch(n - 3, 9))
    assert torch.equal(again.get_batch(5 * n + 11, 4), ds.get_batch(5 * n + 11, 4))
    other = TokenDataset(tokens, seq_length=seq, seed=43)
    assert not torch.equal(other.get_batch(0, n), ds.get_batch(0, n))
    with pytest.raises(ValueError):
        ds.get_batch(-1, 2)


def test_data_parallel_slices_make_the_global_batch(default_bundle):
    ds = default_bundle.train
    n = len(ds)
    global_batch, dp = 24, 4
    per_rank = global_batch // dp
    # Include steps whose global batch crosses an epoch boundary.
    for step in [0, 1, n // global_batch, n // global_batch + 1, 3 * n // global_batch]:
        full = ds.get_batch(step * global_batch, global_batch)
        parts = [ds.get_batch(step * global_batch + r * per_rank, per_rank) for r in range(dp)]
        assert torch.equal(torch.cat(parts), full)


def test_val_split_fixed_seed_and_disjoint(cache):
    a = build_data(make_cfg(), seq_length=64, seed=1)
    b = build_data(make_cfg(), seq_length=64, seed=2)
    assert torch.equal(a.val.get_batch(0, len(a.val)), b.val.get_batch(0, len(b.val)))
    assert not torch.equal(a.train.get_batch(0, 8), b.train.get_batch(0, 8))
    total = len(a.train.tokens) + len(a.val.tokens)
    assert len(a.val.tokens) == round(0.05 * total)


# ---------------------------------------------------------------- user files


def test_user_txt_and_jsonl(cache, tmp_path):
    docs = default_documents()
    txt = tmp_path / "a.txt"
    txt.write_text(docs[0] + docs[1])
    jsonl = tmp_path / "b.jsonl"
    records = [{"text": d, "id": i} for i, d in enumerate(docs[2:40])]
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "")  # a blank line is tolerated
    jsonl.write_text("\n".join(lines) + "\n")
    bundle = build_data(make_cfg(paths=[str(txt), str(jsonl)], vocab_size=800), seq_length=32, seed=0)
    pieces = split_docs(full_stream(bundle), bundle.tokenizer.eos_id)
    expected = [docs[0] + docs[1]] + [r["text"] for r in records]
    assert [bundle.tokenizer.decode(p[:-1]) for p in pieces] == expected


# ---------------------------------------------------------------- errors


def test_bad_paths_raise_one_line_errors(cache, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as e:
        validate_data_config(make_cfg(paths=[str(missing)]))
    assert one_line(e).startswith(f"data.paths: file not found: {missing}")
    assert "data.paths=[]" in str(e.value)

    with pytest.raises(DataError) as e:
        build_data(make_cfg(paths=[str(tmp_path)]), seq_length=8, seed=0)
    assert str(tmp_path) in one_line(e) and "directory" in str(e.value)

    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(paths=[str(csv)]), seq_length=8)
    assert str(csv) in one_line(e) and ".jsonl" in str(e.value)

    # relative paths and ~ are resolved (and reported) as absolute paths
    with pytest.raises(DataError) as e:
        validate_data_config(make_cfg(paths=["~/surely/missing.txt"]))
    assert os.path.expanduser("~/surely/missing.txt") in one_line(e)


def test_bad_jsonl_raise_one_line_errors(cache, tmp_path):
    """data.bad_documents=fail: each bad line is a one-line error naming file and line (default skip: see
    tests/test_token_files.py)."""
    good = json.dumps({"text": default_documents()[0]})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError) as e:
        build_data(make_cfg(paths=[str(bad_json)], vocab_size=400, bad_documents="fail"), seq_length=8, seed=0)
    assert f"{bad_json} line 3" in one_line(e) and "JSON" in str(e.value)

    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text(f"{good}\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        build_data(make_cfg(paths=[str(no_key)], vocab_size=400, bad_documents="fail"), seq_length=8, seed=0)
    msg = one_line(e)
    assert msg.startswith("data.text_key") and "'text'" in msg and f"{no_key} line 2" in msg

    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text("[1, 2]\n")
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(paths=[str(not_obj)], vocab_size=400, bad_documents="fail"), seq_length=8)
    assert f"{not_obj} line 1" in one_line(e)
    assert not [p for p in cache.rglob("*") if p.is_file()], "a failed prepare must not leave files"


def test_bad_tokenizer_and_settings(cache, tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(DataError) as e:
        build_data(make_cfg(tokenizer=str(missing)), seq_length=8, seed=0)
    assert one_line(e).startswith(f"data.tokenizer.model: file not found: {missing}")

    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError) as e:
        build_data(make_cfg(tokenizer=str(garbage)), seq_length=8, seed=0)
    assert str(garbage) in one_line(e)

    for bad in [0, 1, 1.5, -0.1]:
        with pytest.raises(DataError) as e:
            validate_data_config(make_cfg(val_fraction=bad))
        assert one_line(e).startswith("data.val_fraction=")
    for bad in [100, 255, 1000.5]:
        with pytest.raises(DataError) as e:
            validate_data_config(make_cfg(vocab_size=bad))
        assert one_line(e).startswith("data.vocab_size=")
    # Passes the cheap check, but this corpus needs more pieces than that (bytes + its characters).
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(vocab_size=300), seq_length=8)
    assert one_line(e).startswith("data.vocab_size=300")


def test_tiny_corpus(cache, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a tiny corpus of a few words, nothing more. " * 3)
    with pytest.raises(DataError) as e:
        build_data(make_cfg(paths=[str(tiny)]), seq_length=8, seed=0)
    assert one_line(e).startswith("data.vocab_size=4096 is too large")
    with pytest.raises(DataError) as e:
        build_data(make_cfg(paths=[str(tiny)], vocab_size=300), seq_length=512, seed=0)
    assert "model.seq_length=512" in one_line(e)
    with pytest.raises(DataError) as e:
        TokenDataset(np.arange(8, dtype=np.uint16), seq_length=8, seed=0)
    assert "model.seq_length=8" in one_line(e)
    assert len(TokenDataset(np.arange(9, dtype=np.uint16), seq_length=8, seed=0)) == 1
