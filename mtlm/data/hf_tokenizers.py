"""The released models' own tokenizers, through Hugging Face's `tokenizers` library (Rust, no transformers):

- BERT WordPiece from `vocab.txt` (Megatron-BERT 345M, cased or uncased): BERT's normalizer (clean up
  control characters, split CJK characters; uncased: lower case and strip accents), BERT's pre-tokenizer
  (whitespace and punctuation), then greedy longest-match-first word pieces with `##` continuations;
- any `tokenizer.json` (BLOOM's byte-level BPE, and every other fast tokenizer on the Hub).

Both offer what mtlm's data and tools use of a tokenizer (encode, encode_batch, decode, eos_id, vocab_size,
piece_id, path) and describe themselves as a checkpoint's `tokenizer` metadata entry (`entry()`), which
`from_entry` turns back into the same tokenizer, so a converted checkpoint names the one it was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mtlm.data.cache import content_hash
from mtlm.errors import DataError

# Names mtlm's sentencepiece models use for special pieces -> BERT's names for the same roles.
BERT_ALIASES = {"<pad>": "[PAD]", "<unk>": "[UNK]"}
# The end-of-document token of tokenizer.json files, when no special_tokens_map.json beside it says.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("data.tokenizer: the `tokenizers` package is needed for released tokenizers: "
                        "pip install tokenizers") from None
    return tokenizers


class _Wrapped:
    """Shared by both: a `tokenizers.Tokenizer` with no special tokens added on encode (documents are
    concatenated into one stream; the data pipeline adds eos / [CLS] / [SEP] itself)."""

    kind = ""

    def __init__(self, path: str, tok: Any, eos: str) -> None:
        self.path = path
        self._tok = tok
        eos_id = tok.token_to_id(eos)
        if eos_id is None:
            raise DataError(f"data.tokenizer: {path} has no end-of-document token {eos!r}")
        self._eos = eos
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size (added tokens included; the model may pad its embedding table beyond it)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        """Id of a special piece such as "[MASK]" or "<pad>", None when this vocabulary lacks it."""
        i = self._tok.token_to_id(piece)
        return self._tok.token_to_id(BERT_ALIASES[piece]) if i is None and piece in BERT_ALIASES else i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """The library parallelises batches itself (RAYON_NUM_THREADS); num_threads is accepted for the
        common interface."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def files(self) -> list[str]:
        """The files that define this tokenizer (hashed into its identity)."""
        return [self.path]

    def settings(self) -> str:
        """Options outside the files that change its output (hashed into its identity)."""
        return ""

    def entry(self) -> dict:
        """This tokenizer as a checkpoint's metadata `tokenizer` entry, with its identity (content hash)."""
        if getattr(self, "_sha256", None) is None:
            self._sha256 = content_hash(self.kind, self.files(), self.settings())
        return {"type": self.kind, "path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "sha256": self._sha256}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


class WordPieceTokenizer(_Wrapped):
    """BERT's WordPiece from a `vocab.txt` (one token per line, the line number is its id)."""

    kind = "wordpiece"

    def __init__(self, vocab_txt: str | Path, lowercase: bool | None = None) -> None:
        """lowercase None: infer it from the vocabulary (an uncased one has no upper-case letter outside its
        [SPECIAL] tokens: its training text was lower-cased; a cased one has thousands)."""
        t = _tokenizers()
        path = str(Path(vocab_txt).expanduser().resolve())
        try:
            vocab = t.models.WordPiece.read_file(path)
        except Exception as err:  # the Rust side raises plain Exceptions
            raise DataError(f"data.tokenizer: cannot read WordPiece vocabulary {path} ({err})") from None
        if "[UNK]" not in vocab:
            raise DataError(f"data.tokenizer: {path} has no [UNK] token: not a BERT vocab.txt")
        if lowercase is None:
            lowercase = not any(c.isupper() for w in vocab if not (w.startswith("[") and w.endswith("]")) for c in w)
        tok = t.Tokenizer(t.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # BERT's: strip_accents follows lowercase (uncased models were trained on accent-stripped text).
        tok.normalizer = t.normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = t.pre_tokenizers.BertPreTokenizer()
        tok.decoder = t.decoders.WordPiece(prefix="##")
        self.lowercase = lowercase
        # BERT has no end-of-document token; [SEP] ends a document in mtlm's token stream.
        super().__init__(path, tok, "[SEP]")

    def settings(self) -> str:
        return f"lowercase={self.lowercase}"

    def entry(self) -> dict:
        return {**super().entry(), "lowercase": self.lowercase}

    def __getstate__(self) -> dict:  # pickle by path, so it can travel to spawned workers
        return {"path": self.path, "lowercase": self.lowercase}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["lowercase"])


class JsonTokenizer(_Wrapped):
    """A `tokenizer.json` (BLOOM's, or any fast tokenizer's). The end-of-document token comes from the
    `special_tokens_map.json` beside it when there is one, else the first of EOS_CANDIDATES it has."""

    kind = "tokenizer.json"

    def __init__(self, tokenizer_json: str | Path) -> None:
        t = _tokenizers()
        path = Path(tokenizer_json).expanduser().resolve()
        try:
            tok = t.Tokenizer.from_file(str(path))
        except Exception as err:
            raise DataError(f"data.tokenizer: cannot read {path} ({err})") from None
        eos = _eos_from_map(path.parent / "special_tokens_map.json")
        if eos is None:
            eos = next((c for c in EOS_CANDIDATES if tok.token_to_id(c) is not None), None)
        if eos is None:
            raise DataError(f"data.tokenizer: {path} has none of {', '.join(EOS_CANDIDATES)} and no "
                            "special_tokens_map.json naming its eos_token")
        super().__init__(str(path), tok, eos)

    def files(self) -> list[str]:
        # special_tokens_map.json, when there is one, chooses the end-of-document token.
        extra = Path(self.path).parent / "special_tokens_map.json"
        return [self.path] + ([str(extra)] if extra.is_file() else [])

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def _eos_from_map(path: Path) -> str | None:
    if not path.is_file():
        return None
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def from_entry(entry: dict) -> WordPieceTokenizer | JsonTokenizer:
    """The tokenizer a checkpoint's metadata `tokenizer` entry (written by `entry()`) describes."""
    kind = entry.get("type")
    if kind == WordPieceTokenizer.kind:
        return WordPieceTokenizer(entry["path"], bool(entry.get("lowercase")))
    if kind == JsonTokenizer.kind:
        return JsonTokenizer(entry["path"])
    raise DataError(f"data.tokenizer: unknown tokenizer type {kind!r} in checkpoint metadata")


def check_vocab(tokenizer: Any, rows: int, divisible: int | None, saved_tensor: int, where: str) -> None:
    """The tokenizer fits the checkpoint's embedding: `rows` is its size padded the way the checkpoint's
    trainer padded it (a multiple of `divisible` x the saved tensor degree), or, with `divisible` None (the
    model's vocabulary is its own, e.g. BLOOM's 250,880 rows for 250,680 tokens), at least its size."""
    size = tokenizer.vocab_size
    if divisible is None:
        ok = size <= rows
    else:
        multiple = divisible * saved_tensor
        ok = -(-size // multiple) * multiple == rows
    if not ok:
        pad = "" if divisible is None else f" padded to a multiple of {divisible} x {saved_tensor}"
        raise DataError(f"{where}: the tokenizer {tokenizer.path} has {size} tokens, which does not fit the "
                        f"checkpoint's {rows} embedding rows{pad}: wrong tokenizer files for this model?")


def tokenizer_entry(tokenizer: Any) -> dict:
    """A tokenizer's checkpoint metadata entry: its own `entry()`, else what training records for any
    tokenizer (path, vocab_size, eos_id)."""
    if hasattr(tokenizer, "entry"):
        return tokenizer.entry()
    return {"path": getattr(tokenizer, "path", None), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
