"""The released tokenizers: BERT WordPiece (cased, uncased) from vocab.txt and a tokenizer.json (BLOOM's kind)
give transformers' ids on the same files, and come back from a checkpoint's metadata entry."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from mtlm.data.hf_tokenizers import JsonTokenizer, WordPieceTokenizer, check_vocab, from_entry
from mtlm.errors import DataError

TEXT = ("Héllo, World! The QUICK brown fox's jump-over (at 10:30) naïve café; unaffable 東京 tokenizers\n"
        "second\tline  with   spaces. Unknownword xyzzy?")


def write_vocab(path: Path) -> Path:
    """A small BERT vocab.txt: specials, then whole words and ## pieces in both cases, punctuation, CJK."""
    words = ["the", "The", "quick", "QUICK", "brown", "fox", "hello", "Hello", "world", "World", "jump", "over",
             "at", "10", "30", "naive", "cafe", "un", "##aff", "##able", "second", "line", "with", "spaces",
             "token", "##izer", "##s", "##é", "H", "##llo", "h", "é", "nai", "##ve", "caf", "##e", "東", "京",
             "s", "'", ",", "!", "-", "(", ")", ":", ";", ".", "?", "x", "##y", "##z", "##ll", "##o", "##Q"]
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("lowercase", [False, True])
def test_wordpiece_matches_transformers(tmp_path: Path, lowercase: bool) -> None:
    from transformers import BertTokenizer

    vocab = write_vocab(tmp_path / "vocab.txt")
    ours = WordPieceTokenizer(vocab, lowercase=lowercase)
    theirs = BertTokenizer(str(vocab), do_lower_case=lowercase)
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False)
    assert len(set(ids)) > 15 and ours.piece_id("[UNK]") in ids  # a real mix, unknown words included
    assert ours.encode_batch([TEXT, "fox"]) == [ids, ours.encode("fox")]
    assert ours.decode(ours.encode("the quick brown fox")) == "the quick brown fox"
    assert ours.vocab_size == len(vocab.read_text().splitlines()) == theirs.vocab_size
    assert (ours.eos_id, ours.piece_id("[MASK]"), ours.piece_id("<pad>"), ours.piece_id("nope")) == (3, 4, 0, None)
    again = from_entry(json.loads(json.dumps(ours.entry())))
    assert again.encode(TEXT) == ids and again.entry()["lowercase"] is lowercase
    assert pickle.loads(pickle.dumps(ours)).encode(TEXT) == ids


def test_wordpiece_case_is_inferred_from_the_vocabulary(tmp_path: Path) -> None:
    cased = WordPieceTokenizer(write_vocab(tmp_path / "vocab.txt"))
    assert cased.lowercase is False and cased.encode("The") != cased.encode("the")
    lower = tmp_path / "lower.txt"
    lower.write_text("\n".join(w for w in (tmp_path / "vocab.txt").read_text().splitlines() if w == w.lower()
                               or w.startswith("[")))
    uncased = WordPieceTokenizer(lower)
    assert uncased.lowercase is True and uncased.encode("The") == uncased.encode("the")


def test_tokenizer_json_matches_transformers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # BLOOM's kind: byte-level BPE, specials <unk> <s> </s> <pad> at ids 0-3.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                                             "<pad>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = JsonTokenizer(tmp_path / "tokenizer.json")
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False) and len(set(ids)) > 15
    assert ours.decode(ids) == TEXT  # byte level: lossless
    assert ours.eos_id == 2 and ours.vocab_size == theirs.vocab_size
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert from_entry(ours.entry()).eos_id == 3  # the map beside the file wins
    check_vocab(ours, 512, None, 1, "x")  # BLOOM-style: the model's rows exceed the tokenizer's, unpadded rule
    n = ours.vocab_size
    with pytest.raises(DataError, match=f"has {n} tokens, which does not fit the checkpoint's {n - 1} embedding rows"):
        check_vocab(ours, n - 1, None, 1, "x")
    assert 256 < n <= 512
    with pytest.raises(DataError, match="padded to a multiple of 128 x 4"):
        check_vocab(ours, 384, 128, 4, "x")
    check_vocab(ours, 512, 128, 4, "x")
    # As the training data's tokenizer (data.tokenizer.type=tokenizer.json, the file as data.tokenizer.model).
    from mtlm.data.text_tokenizer import check_spec, load_tokenizer, tokenizer_spec

    spec = tokenizer_spec({"type": "tokenizer.json", "model": str(tmp_path / "tokenizer.json")})
    check_spec(spec)
    assert load_tokenizer(spec).encode(TEXT) == ids and spec.files() == [str(tmp_path / "tokenizer.json")]
    with pytest.raises(DataError, match="data.tokenizer.model: data.tokenizer.type=tokenizer.json needs it"):
        check_spec(tokenizer_spec({"type": "tokenizer.json"}))


def test_bad_tokenizer_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"no \[UNK\] token"):
        WordPieceTokenizer(tmp_path / "vocab.txt", lowercase=True)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read") as err:
        JsonTokenizer(tmp_path / "tokenizer.json")
    assert "\n" not in str(err.value)
