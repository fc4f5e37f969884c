"""GPT samples over Megatron-format token files: documents shuffled by seed, cut into samples of seq_length + 1
tokens across document boundaries, and blends of several files by weight.

One *epoch* of a split is one seeded permutation of its documents, read as one token stream and cut every
seq_length tokens (consecutive samples share one token, so every token is a target once); the samples of the
epoch are then visited in a second seeded permutation. Both permutations and the sample index (for each sample:
which document it starts in, at which offset) are built once per epoch and cached beside the data as .npy files
that later runs memory-map (the arrays Megatron-LM calls doc_idx, sample_idx and shuffle_idx).

As for the built-in corpus (mtlm/data/dataset.py), a sample is a pure function of its global position, so the
data-parallel ranks read disjoint slices by position and a resumed run (restarting at the global sample count
its checkpoint stores) sees exactly the samples it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from mtlm.data.cache import atomic_save_npy
from mtlm.data.dataset import too_small
from mtlm.data.indexed import IndexedDataset
from mtlm.errors import DataError

INDEX_VERSION = 1  # bump when the cached index layout or its meaning changes
# Epoch 0 is always cached; later epochs (a small corpus seen many times) only when they take a while to build.
CACHE_LATER_EPOCHS = 1 << 20  # samples
BLEND_BLOCK = 1 << 16  # blend pattern period (positions); counts per block are exact to within 1 per dataset


def index_dir(prefix: str, cache_root: str) -> str:
    """Where a token file's sample indexes live: PREFIX.mtlm-index/ beside it, or under the cache root when the
    data's folder is read-only (a shared corpus)."""
    folder = os.path.dirname(prefix)
    if os.access(folder, os.W_OK):
        return f"{prefix}.mtlm-index"
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:16]
    return os.path.join(cache_root, "index", f"{os.path.basename(prefix)}-{digest}")


def build_epoch(lengths: np.ndarray, seq_length: int, seed: int, epoch: int) -> tuple[np.ndarray, ...]:
    """(doc_order, sample_idx, shuffle) of one epoch: the permuted documents, each sample's (position in
    doc_order, token offset in that document), and the order in which the samples are visited."""
    doc_order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    ends = np.cumsum(lengths[doc_order], dtype=np.int64)
    num_samples = (int(ends[-1]) - 1) // seq_length if len(ends) else 0
    starts = np.arange(num_samples, dtype=np.int64) * seq_length
    # The document holding each start: the first whose end lies beyond it (empty documents are never chosen).
    which = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[which] - lengths[doc_order][which])
    sample_idx = np.stack([which, offsets], axis=1).astype(np.int64)
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(num_samples)
    return doc_order, sample_idx, shuffle


class TokenFileDataset:
    """Samples of seq_length + 1 tokens over documents [lo, hi) of one token file (one split of it).

    `tokens` (the .bin memmap) and `document_bounds` ([documents, 2] start/stop into `tokens`, in file order)
    give document-level access, e.g. for BERT's masked-LM samples (mtlm/data/bert.py).
    """

    def __init__(self, indexed: IndexedDataset, lo: int, hi: int, seq_length: int, seed: int, split: str,
                 cache_root: str) -> None:
        self.indexed, self.split, self.lo, self.hi = indexed, split, int(lo), int(hi)
        self.tokens = indexed.tokens
        self.seq_length, self.seed = int(seq_length), int(seed)
        first, end = indexed.token_starts(indexed.doc_idx[[self.lo, self.hi]])
        total = int(end - first)
        self.num_samples = max(0, (total - 1) // self.seq_length)
        if self.num_samples <= 0:
            raise too_small(f"{split} split of {indexed.prefix}", total, seq_length,
                            hint="give it more documents in data.split, " if split != "train" else None)
        st = os.stat(indexed.idx_path)
        key = json.dumps([INDEX_VERSION, indexed.prefix, st.st_size, st.st_mtime_ns, lo, hi, self.seq_length,
                          self.seed], sort_keys=True)
        self._stem = os.path.join(index_dir(indexed.prefix, cache_root),
                                  f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
        self._epochs: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def document_bounds(self) -> np.ndarray:
        """[documents, 2] (start, stop) into `tokens` of this split's documents, in file order."""
        return self.indexed.document_bounds(self.lo, self.hi)

    def epoch_index(self, epoch: int) -> tuple[np.ndarray, ...]:
        """(doc_order, sample_idx, shuffle) of `epoch`: memory-mapped from the cache, built and saved if absent
        (atomically, so ranks building the same epoch at once write identical files)."""
        got = self._epochs.get(epoch)
        if got is not None:
            return got
        paths = [f"{self._stem}-e{epoch}-{name}.npy" for name in ("doc", "sample", "shuffle")]
        if all(os.path.exists(p) for p in paths):
            got = tuple(np.load(p, mmap_mode="r") for p in paths)
        else:
            bounds = self.document_bounds
            got = build_epoch(bounds[:, 1] - bounds[:, 0], self.seq_length, self.seed, epoch)
            if epoch > 0 and self.num_samples < CACHE_LATER_EPOCHS:  # quick to rebuild: keep the folder tidy
                return self._keep(epoch, got)
            try:
                for path, array in zip(paths, got, strict=True):
                    atomic_save_npy(path, array)
            except OSError as err:  # a read-only cache only costs the rebuild next time
                print(f"note: data: cannot cache the sample index in {os.path.dirname(paths[0])} ({err})")
        return self._keep(epoch, got)

    def _keep(self, epoch: int, got: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        if len(self._epochs) >= 2:  # positions only move forward: keep the current and the next epoch
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = got
        return got

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """[len(positions), seq_length + 1] tokens of the samples at these global positions."""
        out = np.empty((len(positions), self.seq_length + 1), dtype=np.int64)
        span = self.indexed.document_span
        for row, position in enumerate(np.asarray(positions, dtype=np.int64)):
            epoch, within = divmod(int(position), self.num_samples)
            doc_order, sample_idx, shuffle = self.epoch_index(epoch)
            j, offset = (int(v) for v in sample_idx[shuffle[within]])
            filled = 0
            while filled <= self.seq_length:  # walk on into the next documents of the epoch's order
                start, stop = span(self.lo + int(doc_order[j]))
                take = min(int(stop - start) - offset, self.seq_length + 1 - filled)
                out[row, filled: filled + take] = self.tokens[start + offset: start + offset + take]
                filled, j, offset = filled + take, j + 1, 0
        return out

    def get_batch(self, start: int, count: int) -> torch.Tensor:
        """The samples at global positions start .. start + count - 1 as an int64 tensor [count, seq + 1]."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        return torch.from_numpy(self.samples(np.arange(start, start + count, dtype=np.int64)))

    def __repr__(self) -> str:
        return (f"TokenFileDataset({self.indexed.prefix!r}, split={self.split!r}, documents="
                f"{self.hi - self.lo}, num_samples={self.num_samples}, seed={self.seed})")


def blend_pattern(weights: np.ndarray, block: int = BLEND_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One period of a blend: (dataset of each position, its rank among that dataset's positions, per-dataset
    count in the period). Dataset k's j-th sample is placed at "time" (j + 1/2) / w_k and positions follow time
    order (the Sainte-Lague apportionment), so after any n positions each dataset has w_k * n samples, +-1."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    times, owners = [], []
    for k, wk in enumerate(w):
        if wk > 0:
            j = np.arange(int(np.ceil(wk * block)) + 1, dtype=np.float64)
            times.append((j + 0.5) / wk)
            owners.append(np.full(len(j), k, dtype=np.int64))
    time, owner = np.concatenate(times), np.concatenate(owners)
    order = np.lexsort((owner, time))[:block]
    dataset = owner[order]
    rank = np.empty(block, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for k in range(len(w)):
        mask = dataset == k
        rank[mask] = np.arange(int(mask.sum()))
        counts[k] = int(mask.sum())
    return dataset, rank, counts


class BlendedDataset:
    """Several datasets mixed by weight: position p goes to dataset pattern[p % block], as that dataset's
    sample (p // block) * count_k + rank[p % block]; each dataset keeps its own endless shuffled stream."""

    def __init__(self, datasets: list[TokenFileDataset], weights: list[float], split: str) -> None:
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise DataError(f"data.paths: blend weights {list(weights)} must be >= 0 and sum to a positive number")
        self.datasets, self.split = datasets, split
        self.weights = [w / sum(weights) for w in weights]
        self.seq_length = datasets[0].seq_length
        self._dataset, self._rank, self._counts = blend_pattern(np.asarray(weights))
        self.num_samples = sum(len(d) for d, w in zip(datasets, weights, strict=True) if w > 0)

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, position within that dataset's stream) of each global position."""
        block, within = np.divmod(np.asarray(positions, dtype=np.int64), len(self._dataset))
        dataset = self._dataset[within]
        return dataset, block * self._counts[dataset] + self._rank[within]

    def get_batch(self, start: int, count: int) -> torch.Tensor:
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        dataset, inner = self.locate(np.arange(start, start + count, dtype=np.int64))
        out = np.empty((count, self.seq_length + 1), dtype=np.int64)
        for k in np.unique(dataset):
            rows = dataset == k
            out[rows] = self.datasets[k].samples(inner[rows])
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3g}: {d.indexed.prefix}" for d, w in zip(self.datasets, self.weights, strict=True))
        return f"BlendedDataset(split={self.split!r}, {{{parts}}})"
