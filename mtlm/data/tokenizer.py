"""A small wrapper around sentencepiece: a lossless byte-fallback BPE tokenizer, trained on the corpus.

Lossless means decode(encode(text)) == text for any text: no normalization, whitespace kept as is
(runs of spaces, tabs, newlines), unseen characters fall back to their UTF-8 bytes.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from mtlm.data.cache import atomic_write_bytes, content_hash
from mtlm.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The masked-LM (BERT) pieces, reserved as sentencepiece *control* symbols (ids 4, 5, 6): encoding text never
# produces them (a literal "[MASK]" in the corpus stays ordinary text), so the stream stays lossless.
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
# sentencepiece stores spaces as U+2581 and so decodes a literal U+2581 in the text as a space. To stay
# lossless we encode that character as its three UTF-8 byte-fallback pieces, which decode verbatim.
SPACE_MARK = "\u2581"
# sentencepiece drops training "sentences" longer than max_sentence_length, so long documents are cut
# into chunks (at a newline where possible). Chunks far longer than a line keep newlines inside them, so
# pieces such as "\n\n" and "):\n" are learned.
TRAIN_CHUNK_CHARS = 16_384
# Beyond this much text, BPE training is slow and barely better: sample chunks evenly across the corpus.
MAX_TRAIN_BYTES = 64 * 2**20


class Tokenizer:
    """A sentencepiece model loaded from a .model file."""

    kind = "sentencepiece"  # data.tokenizer.type (mtlm/data/text_tokenizer.py)

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer: cannot load sentencepiece model {self.path} ({e})") from None
        # eos separates documents in the token stream, so a model without one is unusable here.
        if self._sp.eos_id() < 0:
            raise DataError(
                f"data.tokenizer: {self.path} has no end-of-sentence piece (eos_id=-1); "
                "train it with an eos_id, or set data.tokenizer=null"
            )
        mark = [self._sp.PieceToId(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
        # Only models with byte fallback have these pieces; others keep sentencepiece's behaviour.
        self._mark_ids = mark if self._sp.unk_id() not in mark else None

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size (the model may pad its embedding table beyond it)."""
        return self._sp.GetPieceSize()

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token appended after every document."""
        return self._sp.eos_id()

    def piece_id(self, piece: str) -> int | None:
        """Id of a special piece such as "[MASK]" or "<pad>", None when this model lacks it."""
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i) else i

    def encode(self, text: str) -> list[int]:
        if self._mark_ids is None or SPACE_MARK not in text:
            return self._sp.EncodeAsIds(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids.extend(self._mark_ids)
            ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """encode() of each text, using sentencepiece's threads."""
        texts = list(texts)
        encoded = self._sp.Encode(texts, out_type=int, num_threads=num_threads)
        if self._mark_ids is not None:
            for i, text in enumerate(texts):
                if SPACE_MARK in text:
                    encoded[i] = self.encode(text)
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        # Accepts lists, numpy arrays and 1-D tensors alike.
        return self._sp.DecodeIds([int(i) for i in ids])

    def entry(self) -> dict:
        """This tokenizer as a checkpoint's metadata `tokenizer` entry, with its identity (content hash)."""
        if getattr(self, "_sha256", None) is None:
            self._sha256 = content_hash(self.kind, [self.path])
        return {"type": self.kind, "path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "sha256": self._sha256}

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

    # Pickle by path so a Tokenizer can travel to spawned workers.
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def _chunks(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + size // 2, end)
            end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end


def _training_chunks(documents: Iterable[str], total_bytes: int | None) -> Iterator[str]:
    stride = max(1, math.ceil((total_bytes or 0) / MAX_TRAIN_BYTES))
    n = 0
    for doc in documents:
        for chunk in _chunks(doc, TRAIN_CHUNK_CHARS):
            if n % stride == 0:
                yield chunk
            n += 1


def train_tokenizer(
    documents: Iterable[str], out_path: str, vocab_size: int, total_bytes: int | None = None
) -> Tokenizer:
    """Train a lossless BPE model on `documents`, write it atomically to `out_path`, and load it.

    Deterministic for a given corpus and vocab_size (one thread, no input shuffling), so concurrent
    trainers write identical files. `total_bytes` (corpus size) lets very large corpora be subsampled.
    """
    model = io.BytesIO()
    failed: list[BaseException] = []

    def chunks() -> Iterator[str]:
        # sentencepiece turns an exception raised by the iterator into a RuntimeError holding a traceback;
        # keep the original (e.g. a DataError naming a bad .jsonl line) to re-raise it as is.
        try:
            yield from _training_chunks(documents, total_bytes)
        except BaseException as e:
            failed.append(e)
            raise

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=chunks(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=1.0,
            max_sentence_length=4 * TRAIN_CHUNK_CHARS,  # in bytes; a UTF-8 char is at most 4
            input_sentence_size=0,
            shuffle_input_sentence=False,
            control_symbols=[CLS, SEP, MASK],
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        msg = str(e)
        need = re.search(r"required_chars\. (\d+) vs (\d+)", msg)
        if need:
            raise DataError(
                f"data.vocab_size={vocab_size} is too small for this corpus: byte fallback and its "
                f"characters need at least {need.group(2)}; raise data.vocab_size"
            ) from None
        if "Vocabulary size too high" in msg:
            raise DataError(
                f"data.vocab_size={vocab_size} is too large for this corpus (BPE ran out of merges); "
                "lower data.vocab_size or add text"
            ) from None
        raise DataError(f"data: sentencepiece training failed: {msg.splitlines()[-1]}") from None
    atomic_write_bytes(out_path, model.getvalue())
    return Tokenizer(out_path)
