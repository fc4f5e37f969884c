"""Fixed-length samples from a token stream, in an endless, seeded, position-addressable order.

The order of samples is a pure function of (tokens, seq_length, seed) and a global sample position, with
no iterator state. Data-parallel ranks take disjoint slices of each global batch by position, and a
resumed run continues exactly where it stopped by restarting at position step * global_batch_size.
"""

from __future__ import annotations

import numpy as np
import torch

from mtlm.errors import DataError


def too_small(split: str, num_tokens: int, seq_length: int, hint: str | None = None) -> DataError:
    """The error for a split with fewer than seq_length + 1 tokens (not even one sample)."""
    if hint is None:
        hint = "raise data.val_fraction, " if split == "val" else ""
    return DataError(
        f"data: corpus too small for model.seq_length={seq_length}: the {split} split has {num_tokens} "
        f"tokens, needs at least {seq_length + 1}; {hint}add text or lower model.seq_length"
    )


class EpochOrder:
    """An endless order over `num_samples` samples, addressed by global position: position p is sample
    order(p // num_samples)[p % num_samples], each epoch a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._orders: dict[int, np.ndarray] = {}  # epoch -> permutation; a batch touches at most two

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices used in `epoch`, seeded by (seed, epoch)."""
        perm = self._orders.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            if len(self._orders) >= 2:  # positions only move forward; keep the current and next epoch
                self._orders.pop(min(self._orders))
            self._orders[epoch] = perm
        return perm

    def sample_indices(self, start: int, count: int) -> np.ndarray:
        """Which sample sits at each global position start .. start + count - 1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self.order(int(epoch))[within[mask]]
        return indices


class TokenDataset(EpochOrder):
    """Samples of seq_length + 1 tokens cut back to back from a 1-D token array (usually a memmap).

    Sample i is tokens[i * seq_length : i * seq_length + seq_length + 1]: consecutive samples share one
    token, so inputs = x[:-1] and targets = x[1:] cover every token of the stream as a target once.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int, split: str = "train"):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_length < 1:
            raise DataError(f"model.seq_length={seq_length}: must be >= 1")
        self.tokens = tokens
        self.seq_length = int(seq_length)
        self.split = split
        num_samples = (len(tokens) - 1) // self.seq_length
        if num_samples <= 0:
            raise too_small(split, len(tokens), seq_length)
        super().__init__(num_samples, seed)
        self._offsets = np.arange(self.seq_length + 1, dtype=np.int64)

    def get_batch(self, start: int, count: int) -> torch.Tensor:
        """The samples at global positions start .. start + count - 1 as an int64 tensor [count, seq+1]."""
        starts = self.sample_indices(start, count) * self.seq_length
        # One fancy-indexing gather: on a memmap this reads only the needed pages.
        batch = self.tokens[starts[:, None] + self._offsets[None, :]]
        return torch.from_numpy(batch.astype(np.int64, copy=False))

    def __repr__(self) -> str:
        return (
            f"TokenDataset(split={self.split!r}, tokens={len(self.tokens)}, seq_length={self.seq_length}, "
            f"num_samples={self.num_samples}, seed={self.seed})"
        )
