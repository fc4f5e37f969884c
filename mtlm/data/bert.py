"""Masked-LM + sentence-order samples for BERT (Megatron-BERT's pretraining data), from the same token files.

A *document* is a span of the cached token stream between two end-of-document tokens (or one given by a
document index). Each document is cut into chunks of at most seq_length - 3 tokens, ending at a sentence
boundary where one is near. A chunk is one sample:

    [CLS] A [SEP] B [SEP] [PAD] ...      token types 0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding

A and B are consecutive spans of the chunk, split at a random sentence boundary (anywhere, if it has none).
With probability 0.5 they are swapped ([CLS] B [SEP] A [SEP]); the sentence-order label says so (ALBERT's
sentence-order prediction, which Megatron-BERT uses as its binary head). Then 15% of the non-special positions
are chosen (randomised rounding of 0.15 x their number, so the rate is 15% in expectation even for short
samples); of those 80% become [MASK], 10% a random ordinary token, 10% stay. Special tokens are never chosen.

Like the GPT stream (mtlm/data/dataset.py), the order is a pure function of (seed, epoch) and a global sample
position, and every random choice of a sample is drawn from a generator seeded by (seed, epoch, sample), so a
data-parallel rank reads its slice by position and a resumed run sees exactly the samples it would have seen.
A sample is masked anew each epoch (dynamic masking), as its generator includes the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtlm.data.build import VAL_SEED, DataBundle, build_data
from mtlm.data.dataset import EpochOrder
from mtlm.errors import DataError

MASK_PROB, MASK_TOKEN_PROB, RANDOM_TOKEN_PROB = 0.15, 0.8, 0.1  # the remaining 10% keep their token
IGNORE = -1  # label of positions that are not predicted
# Pieces that end a sentence: a chunk is preferably cut, and A/B split, right after one of them.
_SENTENCE_ENDS = (".", "!", "?", "\n", ":")


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    mask: int
    pad: int
    vocab_size: int  # real vocabulary size, for drawing random replacement tokens
    never_random: tuple[int, ...]  # special/control ids a random replacement must not be


def special_ids(tokenizer) -> SpecialIds:
    """The ids BERT needs from the tokenizer; a one-line DataError naming the tokenizer when one is missing."""
    ids = {p: tokenizer.piece_id(p) for p in ("[CLS]", "[SEP]", "[MASK]", "<pad>")}
    missing = [p for p, i in ids.items() if i is None]
    if missing:
        raise DataError(f"data.tokenizer: {tokenizer.path} has no {' '.join(missing)} piece(s), which BERT needs; "
                        "set data.tokenizer=null to train one here (it reserves them)")
    others = [tokenizer.piece_id(p) for p in ("<unk>", "<s>", "</s>")]
    never = sorted({*ids.values(), *(i for i in others if i is not None), tokenizer.eos_id})
    return SpecialIds(ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["<pad>"], tokenizer.vocab_size, tuple(never))


def sentence_end_ids(tokenizer) -> np.ndarray:
    """A boolean table over the vocabulary: does this piece end a sentence (a cut after it is natural)?"""
    ends = np.zeros(tokenizer.vocab_size, dtype=bool)
    for i in range(tokenizer.vocab_size):
        ends[i] = tokenizer.decode([i]).endswith(_SENTENCE_ENDS)
    return ends


def document_bounds(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """[n, 2] (start, stop) of every document in a stream where each document ends with eos (eos excluded);
    a trailing document without eos (cut by the train/val split) counts too."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(tokens)]])
    return np.stack([starts, stops], axis=1).astype(np.int64)


def chunk_documents(bounds: np.ndarray, tokens: np.ndarray, is_end: np.ndarray, max_tokens: int) -> np.ndarray:
    """[n, 2] (start, stop) chunks of at most max_tokens tokens (at least 2, so A and B are non-empty). A chunk
    that must be cut ends after the last sentence end (`is_end`: a table over the vocabulary) in its second
    half, if there is one. A Python loop over chunks: fine for CPU-sized corpora, slow for billions of tokens."""
    chunks = []
    for start, stop in bounds:
        pos = int(start)
        while stop - pos >= 2:
            end = min(pos + max_tokens, int(stop))
            if end < stop:
                cuts = np.flatnonzero(is_end[np.asarray(tokens[pos + max_tokens // 2: end])])
                if len(cuts):
                    end = pos + max_tokens // 2 + int(cuts[-1]) + 1
            chunks.append((pos, end))
            pos = end
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 2)


class MaskedLMDataset(EpochOrder):
    """Samples of `seq_length` positions; `get_batch(start, count)` gives the samples at global positions
    start .. start + count - 1 as a dict of int64 tensors:

    input_ids, token_type_ids, attention_mask (1 real, 0 padding), labels (the original token where masked,
    -1 elsewhere) [count, seq_length]; sop_labels (1: A and B were swapped) [count].
    """

    def __init__(self, tokens: np.ndarray, bounds: np.ndarray, is_end: np.ndarray, special: SpecialIds,
                 seq_length: int, seed: int, split: str = "train") -> None:
        if seq_length < 5:
            raise DataError(f"model.seq_length={seq_length}: BERT samples need at least 5 positions")
        self.tokens, self.special, self.seq_length = tokens, special, int(seq_length)
        self.split = split
        self.is_end = is_end
        self.chunks = chunk_documents(bounds, tokens, is_end, self.seq_length - 3)
        super().__init__(len(self.chunks), seed)
        if self.num_samples == 0:
            raise DataError(f"data: the {split} split has no document of 2 or more tokens for BERT samples; "
                            "add text or raise data.val_fraction")
        ordinary = np.ones(special.vocab_size, dtype=bool)
        ordinary[list(special.never_random)] = False
        self._ordinary = np.flatnonzero(ordinary)  # what a "random token" replacement is drawn from

    def sample(self, position: int) -> dict[str, np.ndarray]:
        """The sample at one global position (all its randomness from (seed, epoch, sample index))."""
        epoch, within = divmod(int(position), self.num_samples)
        index = int(self.order(epoch)[within])
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        start, stop = self.chunks[index]
        chunk = np.asarray(self.tokens[start:stop], dtype=np.int64)
        # A | B split after a sentence end inside the chunk if there is one, else anywhere.
        cuts = np.flatnonzero(self.is_end[chunk[:-1]]) + 1
        cut = int(rng.choice(cuts)) if len(cuts) else int(rng.integers(1, len(chunk)))
        a, b = chunk[:cut], chunk[cut:]
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b = b, a
        sp, s = self.special, self.seq_length
        n = len(a) + len(b) + 3
        ids = np.full(s, sp.pad, dtype=np.int64)
        ids[:n] = np.concatenate([[sp.cls], a, [sp.sep], b, [sp.sep]])
        types = np.zeros(s, dtype=np.int64)
        types[len(a) + 2: n] = 1
        attention = np.zeros(s, dtype=np.int64)
        attention[:n] = 1
        labels = np.full(s, IGNORE, dtype=np.int64)
        # Non-special positions: 1..len(a) and len(a)+2..n-2.
        candidates = np.concatenate([np.arange(1, len(a) + 1), np.arange(len(a) + 2, n - 1)])
        k = int(np.floor(MASK_PROB * len(candidates) + rng.random()))  # randomised rounding: E[k] = 15%
        chosen = rng.choice(candidates, size=k, replace=False) if k else np.empty(0, dtype=np.int64)
        labels[chosen] = ids[chosen]
        action = rng.random(k)
        to_mask = chosen[action < MASK_TOKEN_PROB]
        to_random = chosen[(action >= MASK_TOKEN_PROB) & (action < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB)]
        ids[to_mask] = sp.mask
        ids[to_random] = rng.choice(self._ordinary, size=len(to_random))
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": attention, "labels": labels,
                "sop_labels": np.int64(swapped)}

    def get_batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        samples = [self.sample(p) for p in range(start, start + count)]
        return {k: torch.from_numpy(np.stack([x[k] for x in samples])) for k in samples[0]} if samples else {}

    def __repr__(self) -> str:
        return (f"MaskedLMDataset(split={self.split!r}, samples={self.num_samples}, "
                f"seq_length={self.seq_length}, seed={self.seed})")


def _documents(ds, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, [n, 2] document bounds without their end-of-document token) of one split: the text cache's token
    stream (documents end with eos), or a Megatron token file's split (its document index, issue 12)."""
    bounds = getattr(ds, "document_bounds", None)
    if bounds is None:
        if not hasattr(ds, "tokens"):
            raise DataError(f"data.paths: BERT reads one corpus or one token file; a blend ({type(ds).__name__}) "
                            "is not supported for masked-LM samples")
        return ds.tokens, document_bounds(ds.tokens, eos_id)
    bounds = np.array(bounds, dtype=np.int64)
    if len(bounds):
        ends_with_eos = np.asarray(ds.tokens[np.maximum(bounds[:, 1] - 1, 0)]) == eos_id
        bounds[:, 1] -= ends_with_eos & (bounds[:, 1] > bounds[:, 0])
    return ds.tokens, bounds


def build_bert_data(cfg, seq_length: int, seed: int):
    """The GPT pipeline's tokens (mtlm.data.build_data: the cached text corpus, or one Megatron token file),
    cut into documents and served as masked-LM samples. Cheap enough for every rank."""
    bundle = build_data(cfg, seq_length, seed)
    tok = bundle.tokenizer
    if tok is None:
        raise DataError("data.tokenizer: BERT needs the tokenizer of the token files (its [CLS] [SEP] [MASK] "
                        "ids); set data.tokenizer.model")
    special, is_end = special_ids(tok), sentence_end_ids(tok)

    def wrap(ds, split_seed: int) -> MaskedLMDataset:
        tokens, bounds = _documents(ds, tok.eos_id)
        return MaskedLMDataset(tokens, bounds, is_end, special, seq_length, split_seed, split=ds.split)

    return DataBundle(tokenizer=tok, train=wrap(bundle.train, seed), val=wrap(bundle.val, VAL_SEED))
