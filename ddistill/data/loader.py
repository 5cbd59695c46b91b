"""Deterministic, resumable, rank-sharded micro-batch loader over packed token blocks.

Epoch ``e`` visits the blocks in the order ``perm_e = randperm(N, generator seeded with seed + e)``. With
``drop_last`` the permutation is cut to a multiple of ``world_size``; otherwise it is padded by repeating its
head (as ``torch.utils.data.DistributedSampler`` does). Rank ``r`` takes ``perm_e[r::world_size]`` and reads
it in consecutive micro-batches of ``B`` (the last partial micro-batch is dropped with ``drop_last``, else
yielded short). Iteration never stops: after the last micro-batch of epoch ``e`` comes the first of ``e+1``.

The position is fully described by ``(epoch, position)`` (micro-batches already taken in the epoch), so
``state_dict()`` / ``load_state_dict()`` resume exactly: a restored loader yields the same next batch as the
uninterrupted one. Restoring a state saved with another world size, seed, batch size or dataset size is
refused, because the same ``(epoch, position)`` would then denote different samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BlockLoader", "LoaderStateError"]


class LoaderStateError(ValueError):
    """A loader state does not belong to this loader's data / sharding."""


class BlockLoader:
    """Infinite iterator of ``LongTensor (B, L)`` micro-batches for one data-parallel rank."""

    def __init__(self, blocks: Sequence, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        self.blocks, self.micro_batch_size = blocks, micro_batch_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_blocks = len(blocks)
        per_rank = (self.num_blocks // world_size if drop_last else -(-self.num_blocks // world_size))
        self.batches_per_epoch = per_rank // micro_batch_size if drop_last else -(-per_rank // micro_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_blocks} blocks give no full micro-batch of {micro_batch_size} per rank "
                             f"with world_size={world_size}; lower the batch size or use more data")
        self.epoch, self.position = 0, 0
        self._indices: torch.Tensor | None = None  # this rank's shard of the current epoch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's block indices for ``epoch`` (in visiting order)."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_blocks, generator=gen)
        if self.drop_last:
            perm = perm[: self.num_blocks - self.num_blocks % self.world_size]
        else:
            extra = -self.num_blocks % self.world_size
            perm = torch.cat([perm, perm[:extra]])
        return perm[self.rank::self.world_size]

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._indices = self.epoch + 1, 0, None
        if self._indices is None:
            self._indices = self.epoch_indices(self.epoch)
        start = self.position * self.micro_batch_size
        idx = self._indices[start:start + self.micro_batch_size].numpy()
        self.position += 1
        rows = np.stack([np.asarray(self.blocks[int(i)], dtype=np.int64) for i in idx])
        return torch.from_numpy(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_blocks": self.num_blocks,
                "micro_batch_size": self.micro_batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in ("world_size", "num_blocks", "seed", "micro_batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise LoaderStateError(f"loader state has {key}={state[key]!r} but this loader has "
                                       f"{key}={getattr(self, key)!r}; the saved position would denote other "
                                       "samples (resume with the same data, seed, batch size and world size)")
        if not 0 <= state["position"] <= self.batches_per_epoch or state["epoch"] < 0:
            raise LoaderStateError(f"loader state epoch={state['epoch']} position={state['position']} is out of "
                                   f"range (batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.position, self._indices = state["epoch"], state["position"], None
