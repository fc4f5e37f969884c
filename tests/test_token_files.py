"""Issue 12: text -> token files (python -m mtlm.data.preprocess) -> GPT samples over them: exact round trips with
both tokenizers, data-parallel slices, blends by weight, exact resume, and every bad-data case as one line."""

from __future__ import annotations

import gzip
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from mtlm.data import DataError, build_data, prepare_data, validate_data_config
from mtlm.data.corpus import default_documents
from mtlm.data.gpt2_bpe import EOD, bytes_to_symbols, write_bpe_files
from mtlm.data.gpt_dataset import BlendedDataset, TokenFileDataset, blend_pattern
from mtlm.data.indexed import IndexedDataset, IndexedWriter
from mtlm.data.preprocess import main as preprocess_main
from mtlm.data.preprocess import preprocess
from mtlm.data.text_tokenizer import TokenizerSpec, load_tokenizer
from mtlm.data.token_files import parse_split, split_bounds
from mtlm.data.tokenizer import train_tokenizer
from mtlm.train.loop import Trainer
from tests.test_gpt2_bpe import learn_merges

DOCS = default_documents()[:24]


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def data_cfg(**overrides) -> SimpleNamespace:
    base = dict(paths=[], blend={}, text_key="text", tokenizer=None, vocab_size=4096, val_fraction=0.05,
                split="969,30,1", bad_documents="skip", cache_dir="~/.cache/mtlm")
    return SimpleNamespace(**{**base, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Raw text in every form preprocess reads (plain, .gz, .zst), a bad line and a blank one, and both
    tokenizers: a sentencepiece model trained here and a small GPT-2 BPE vocab.json + merges.txt."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": d}) for d in DOCS[:10]]
    (root / "a.jsonl").write_text("\n".join(lines[:5] + ["{not json", ""] + lines[5:]) + "\n")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[10])
    import zstandard  # in the [test] extra
    blob = ("\n".join(json.dumps({"text": d}) for d in DOCS[11:]) + "\n").encode()
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    sp = train_tokenizer(DOCS, str(root / "sp.model"), 600)
    merges = learn_merges(" ".join(DOCS[:6]), 200)
    vocab = {s: i for i, s in enumerate(bytes_to_symbols().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOD] = len(vocab)
    vjson, mtxt = write_bpe_files(root / "gpt2", vocab, merges)
    specs = {"sentencepiece": TokenizerSpec(model=sp.path),
             "gpt2": TokenizerSpec(type="gpt2", vocab_file=str(vjson), merge_file=str(mtxt))}
    return SimpleNamespace(root=root, inputs=[str(root / n) for n in ("a.jsonl", "b.txt.gz", "c.jsonl.zst")],
                           specs=specs)


@pytest.mark.parametrize("kind,workers", [("sentencepiece", 1), ("gpt2", 2)])
def test_preprocess_round_trip_every_document(corpus, tmp_path, kind, workers):
    spec = corpus.specs[kind]
    summary = preprocess(corpus.inputs, str(tmp_path / "c_text_document"), spec, workers=workers, quiet=True)
    tok = load_tokenizer(spec)
    ds = IndexedDataset(str(tmp_path / "c_text_document"))
    assert summary["documents"] == ds.num_documents == len(DOCS) and summary["skipped_documents"] == 1
    assert summary["tokens"] == ds.num_tokens and summary["mb_per_s"] > 0
    for i, doc in enumerate(DOCS):
        ids = ds.get_document(i).tolist()
        assert ids == tok.encode(doc) + [tok.eos_id] and tok.decode(ids[:-1]) == doc
    # The GPT samples of an epoch are the documents, in the epoch's seeded order, cut every seq_length tokens.
    train = TokenFileDataset(ds, 0, ds.num_documents, 16, seed=5, split="train", cache_root=str(tmp_path))
    doc_order, _, shuffle = train.epoch_index(0)
    stream = np.concatenate([ds.get_document(int(d)) for d in doc_order]).astype(np.int64)
    got = train.get_batch(0, len(train)).numpy()
    want = np.stack([stream[k * 16: k * 16 + 17] for k in shuffle])
    assert np.array_equal(got, want) and len(train) == (len(stream) - 1) // 16
    assert sorted(os.listdir(tmp_path)) == ["c_text_document.bin", "c_text_document.idx",
                                           "c_text_document.mtlm-index"]


def test_preprocess_cli_refuses_to_overwrite_and_fails_on_bad_lines(corpus, tmp_path, capsys):
    prefix = str(tmp_path / "x")
    sp = ["--tokenizer-model", corpus.specs["sentencepiece"].model, "--quiet"]
    assert preprocess_main(["--input", corpus.inputs[0], "--output-prefix", prefix, *sp]) == 0
    assert "10 documents" in capsys.readouterr().out
    assert preprocess_main(["--input", corpus.inputs[0], "--output-prefix", prefix, *sp]) == 2
    assert "x.bin exists" in capsys.readouterr().err
    assert preprocess_main(["--input", corpus.inputs[0], "--output-prefix", str(tmp_path / "y"), *sp,
                            "--bad-documents", "fail"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --input: ") and "a.jsonl line 6: invalid JSON" in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]  # the failed run left nothing behind


def write_tokens(prefix: str, docs: list[list[int]]) -> IndexedDataset:
    with IndexedWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix)


def file_of(rng: np.random.Generator, base: int, n: int = 200) -> list[list[int]]:
    """Documents whose ids all lie in [base, base + 100): a sample's file is known from its ids."""
    return [rng.integers(base, base + 100, size=int(rng.integers(3, 60))).tolist() for _ in range(n)]


def test_data_ranks_split_the_global_batch_and_resume_continues(tmp_path):
    ds = write_tokens(str(tmp_path / "t"), file_of(np.random.default_rng(0), 0))
    full = TokenFileDataset(ds, 0, 200, 32, seed=3, split="train", cache_root=str(tmp_path))
    g = 8
    for step in range(0, 60, 7):  # crosses epochs
        ranks = [Trainer._rank_slice(SimpleNamespace(state=SimpleNamespace(data=2, dp_rank=r)), full, step * g, g)
                 for r in range(2)]
        assert np.array_equal(np.concatenate([r.numpy() for r in ranks]), full.get_batch(step * g, g).numpy())
        epoch, within = np.divmod(np.arange(step * g, step * g + g), len(full))
        assert len({(int(e), int(full.epoch_index(int(e))[2][w])) for e, w in zip(epoch, within, strict=True)}) == g
    # Resume: a new dataset (its index memory-mapped from the cache, not rebuilt) continues the same sequence.
    fresh = TokenFileDataset(ds, 0, 200, 32, seed=3, split="train", cache_root=str(tmp_path))
    import mtlm.data.gpt_dataset as gd

    built = gd.build_epoch
    gd.build_epoch = lambda *a: pytest.fail("epoch 0 index was rebuilt instead of read from the cache")
    try:
        assert np.array_equal(fresh.get_batch(40, 24).numpy(), full.get_batch(40, 24).numpy())
    finally:
        gd.build_epoch = built
    other_seed = TokenFileDataset(ds, 0, 200, 32, seed=4, split="train", cache_root=str(tmp_path))
    assert not np.array_equal(other_seed.get_batch(0, 8).numpy(), full.get_batch(0, 8).numpy())


def test_blend_meets_weights_within_one_percent(tmp_path):
    rng = np.random.default_rng(1)
    files = [write_tokens(str(tmp_path / f"f{k}"), file_of(rng, 100 * k)) for k in range(3)]
    weights = [0.5, 0.3, 0.2]
    parts = [TokenFileDataset(f, 0, f.num_documents, 16, 0, "train", str(tmp_path)) for f in files]
    blend = BlendedDataset(parts, [5, 3, 2], "train")
    batch = blend.get_batch(0, 10_000).numpy()
    source = batch[:, 0] // 100
    assert np.array_equal(source, batch.max(axis=1) // 100)  # whole samples come from one file
    shares = np.bincount(source, minlength=3) / 10_000
    assert np.all(np.abs(shares - weights) < 0.01), shares
    dataset, rank, counts = blend_pattern(np.array([1.0, 1.0, 2.0]), block=100)
    assert counts.tolist() == [25, 25, 50] and all(np.abs(np.cumsum(dataset == 2) - np.arange(1, 101) / 2) <= 1)
    assert np.array_equal(blend.get_batch(12_345, 9).numpy(), blend.get_batch(12_340, 14).numpy()[5:])
    with pytest.raises(DataError) as err:
        BlendedDataset(parts, [0, 0, 0], "train")
    assert "sum to a positive number" in one_line(err)


def test_split_by_documents_as_megatron():
    assert split_bounds(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_bounds(parse_split("1,1,1"), 7) == [0, 3, 5, 7]  # rounded shares, moved to end at 7
    assert split_bounds(parse_split("98/2"), 50) == [0, 49, 50, 50]
    for bad in ("", "1,2,3,4", "a,b", "-1,2", "0,0,0"):
        with pytest.raises(DataError) as err:
            parse_split(bad)
        assert one_line(err).startswith("data.split=")


def test_training_from_token_files_and_resume(tmp_path, monkeypatch):
    from mtlm.train.checkpoint import save_trainer
    from tests.compose import SMALL_MODEL, compose_config

    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    write_tokens(str(tmp_path / "t_text_document"), file_of(np.random.default_rng(2), 0, 400))
    model = [o for o in SMALL_MODEL if not o.startswith("data.")]
    over = [*model, f"data.paths=[{tmp_path}/t_text_document]", "data.split='90,10,0'", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2", f"checkpoint.dir={tmp_path}/ck"]
    with pytest.raises(Exception, match="model.vocab_size: training from token files without a data.tokenizer"):
        compose_config(*over)
    cfg = compose_config(*over, "model.vocab_size=99")
    with pytest.raises(DataError) as err:  # ids up to 99 do not fit 99 rows
        prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size, cfg.trainer.seed)
    assert "t_text_document.bin holds token id 99, at or above the vocabulary size 99" in one_line(err)
    cfg = compose_config(*over, "model.vocab_size=100")
    prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size, cfg.trainer.seed)
    first = Trainer(cfg, _state(), None, {})
    assert first.data.tokenizer is None
    batches = []
    for step in range(4):
        batches.append(first._rank_slice(first.data.train, first.consumed_samples, 4))
        first.train_step()
        if step == 1:
            saved = save_trainer(first)
    assert json.loads((saved / "metadata.json").read_text())["tokenizer"] is None
    second = Trainer(compose_config(*over, "model.vocab_size=100", f"checkpoint.resume={saved}"), _state(), None, {})
    assert second.consumed_samples == 8
    for want in batches[2:]:
        assert np.array_equal(second._rank_slice(second.data.train, second.consumed_samples, 4), want)
        second.train_step()


def _state():
    from mtlm.parallel import ParallelState

    return ParallelState()


def test_bad_data_is_one_line_naming_file_and_line(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MTLM_CACHE_DIR", str(tmp_path / "cache"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as err:
        validate_data_config(data_cfg(paths=[str(empty)]))
    assert one_line(err) == f"data.paths: {empty} is empty; remove it from data.paths or give it text"
    blank = tmp_path / "blank.jsonl.gz"
    blank.write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(DataError) as err:
        prepare_data(data_cfg(paths=[str(blank)], vocab_size=300), seq_length=8)
    assert f"{blank} holds no text" in one_line(err)

    good = [json.dumps({"text": d}) for d in DOCS[:6]]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes("\n".join(good[:3]).encode() + b"\n" + b'{"text": "caf\xe9"}\n' +
                      json.dumps({"body": "x"}).encode() + b"\n" + "\n".join(good[3:]).encode() + b"\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"na\xefve " * 50)
    cfg = data_cfg(paths=[str(mixed), str(latin)], tokenizer=corpus.specs["sentencepiece"].model)
    bundle = build_data(cfg, seq_length=8, seed=0)  # default: skip and count
    assert bundle.train.num_samples > 0
    meta = json.loads(next((tmp_path / "cache").rglob("meta.json")).read_text())
    assert meta["documents"] == 6 and meta["skipped_documents"]["count"] == 3
    assert f"{mixed} line 4: not valid UTF-8" in meta["skipped_documents"]["report"]
    for path, want in ((mixed, f"data.paths: {mixed} line 4: not valid UTF-8"),
                       (latin, f"data.paths: {latin}: not valid UTF-8 (byte 2)")):
        with pytest.raises(DataError) as err:
            prepare_data(data_cfg(paths=[str(path)], tokenizer=corpus.specs["sentencepiece"].model,
                                  bad_documents="fail", val_fraction=0.3), seq_length=8)
        assert one_line(err).startswith(want)
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text(good[0] + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        prepare_data(data_cfg(paths=[str(no_key)], bad_documents="fail"), seq_length=8)
    assert one_line(err).startswith(f"data.text_key: {no_key} line 2: key 'text' missing")

    prefix = str(tmp_path / "tok")
    write_tokens(prefix, [[1, 2, 3]] * 50)
    cases = {
        "mixed kinds": (data_cfg(paths=[str(mixed), prefix]), "data.paths: mixes text files and token-file"),
        "odd blend": (data_cfg(paths=["0.5", prefix, "0.5"]), "data.paths: a blend alternates weight and prefix"),
        "zero blend": (data_cfg(paths=["0", prefix, "0", prefix]), "must sum to a positive number"),
        "negative": (data_cfg(blend={prefix: -1.0}), "blend weight -1.0 of"),
        "no prefix": (data_cfg(paths=[str(tmp_path / "nothing")]), "neither a text file"),
        "split": (data_cfg(paths=[prefix], split="1,2,x"), "data.split='1,2,x'"),
        "bad policy": (data_cfg(bad_documents="maybe"), "data.bad_documents='maybe'"),
    }
    for name, (cfg, want) in cases.items():
        with pytest.raises(DataError) as err:
            validate_data_config(cfg, model_vocab_size=100)
        assert want in one_line(err), name
    with pytest.raises(DataError) as err:
        build_data(data_cfg(paths=[prefix], split="999,1,0"), seq_length=8, seed=0)
    assert f"the valid split of {prefix}" in one_line(err) and "data.split" in str(err.value)
