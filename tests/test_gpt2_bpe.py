"""GPT-2 byte-level BPE (mtlm/data/gpt2_bpe.py) on a small vocab.json + merges.txt the tests build: the same ids as
a plain-Python BPE written here from the algorithm and as transformers' GPT2Tokenizer, lossless round trips."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from mtlm.data import DataError
from mtlm.data.gpt2_bpe import EOD, GPT2BPETokenizer, bytes_to_symbols, write_bpe_files
from mtlm.data.text_tokenizer import TextTokenizer, TokenizerSpec, check_spec, load_tokenizer, tokenizer_from_entry

regex = pytest.importorskip("regex")  # transformers' dependency; GPT-2's pattern needs \p{L}

# GPT-2's pre-tokenization pattern (contractions, letters, digits, other, whitespace runs).
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't. " * 20 +
              "Tensor parallelism splits the weights of every layer across the ranks of a group. " * 10 +
              "Zahlen 1234 und 5678, naïve café, 日本語.\n\n")
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   \n\n\ttabs\tand newlines\r\n",
    "It's they're we've I'm you'll he'd: contractions",
    "digits 0123456789 3.14159e-10 and unicode naïve café Ελληνικά 日本語のテキスト 🙂🚀",
    "tensor parallelism over the ranks of the group",
    "\x00 control \x07 chars",
    "",
]


def words(text: str) -> list[str]:
    table = bytes_to_symbols()
    return ["".join(table[b] for b in piece.encode("utf-8")) for piece in PATTERN.findall(text)]


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """A plain BPE trainer: repeatedly merge the most frequent adjacent pair (ties by first occurrence)."""
    corpus = Counter(tuple(w) for w in words(text))
    merges = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, freq in corpus.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        merged = Counter()
        for word, freq in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def reference_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """GPT-2's encoding, written from the algorithm: per pre-token, merge the lowest-ranked adjacent pair
    until none is in the merge table."""
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for word in words(text):
        parts = list(word)
        while len(parts) > 1:
            ranked = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:], strict=False))]
            best, i = min(ranked)
            if best == len(rank):
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    merges = learn_merges(TRAIN_TEXT, 120)
    vocab = {s: i for i, s in enumerate(bytes_to_symbols().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOD] = len(vocab)
    vocab_path, merges_path = write_bpe_files(tmp_path_factory.mktemp("bpe"), vocab, merges)
    return vocab_path, merges_path, vocab, merges


def test_gpt2_bpe_matches_reference_and_transformers(bpe_files):
    vocab_path, merges_path, vocab, merges = bpe_files
    tok = GPT2BPETokenizer(vocab_path, merges_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Tokenizer.from_pretrained(str(vocab_path.parent))  # reads vocab.json + merges.txt
    assert tok.vocab_size == len(vocab) and tok.eos_id == vocab[EOD] == hf.eos_token_id
    merged = 0
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == reference_encode(text, vocab, merges), text
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        merged += sum(i >= 256 for i in ids)
    assert merged > 10  # the merges were applied, not only single bytes
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_gpt2_bpe_interface_entry_and_pickle(bpe_files):
    vocab_path, merges_path, *_ = bpe_files
    spec = TokenizerSpec(type="gpt2", vocab_file=str(vocab_path), merge_file=str(merges_path))
    check_spec(spec)
    tok = load_tokenizer(spec)
    assert isinstance(tok, TextTokenizer) and tok.kind == "gpt2"
    # A literal <|endoftext|> in a document is text (Megatron-LM's GPT-2 tokenizer), not the eod id.
    assert tok.eos_id not in tok.encode(f"a{EOD}b") and tok.decode(tok.encode(f"a{EOD}b")) == f"a{EOD}b"
    again = tokenizer_from_entry(tok.entry())
    assert again.encode("the fox") == tok.encode("the fox") and again.entry() == tok.entry()
    assert pickle.loads(pickle.dumps(tok)).encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_gpt2_bpe_bad_files(tmp_path, bpe_files):
    vocab_path, merges_path, vocab, merges = bpe_files
    with pytest.raises(DataError, match="merge_file: data.tokenizer.type=gpt2 needs it"):
        check_spec(TokenizerSpec(type="gpt2", vocab_file=str(vocab_path)))
    with pytest.raises(DataError, match="file not found"):
        check_spec(TokenizerSpec(type="gpt2", vocab_file=str(tmp_path / "nope.json"), merge_file=str(merges_path)))
    small = {k: v for k, v in vocab.items() if k != "Ġ"}
    v2, m2 = write_bpe_files(tmp_path / "nobyte", small, [m for m in merges if "Ġ" not in "".join(m)])
    with pytest.raises(DataError, match="lacks 1 of the 256 byte symbols"):
        GPT2BPETokenizer(v2, m2)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the GPT-2 BPE files"):
        GPT2BPETokenizer(tmp_path / "broken.json", merges_path)
