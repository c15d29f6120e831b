"""Which examples make up micro-batch i of a run.

Batch i depends only on (seed, i, global batch size): epochs are permutations seeded by (seed, epoch),
consecutive global batches are taken from them (the last partial batch of an epoch is dropped), and
process r takes the r-th contiguous shard of each global batch. A run resumed at step s therefore sees
exactly the batches an uninterrupted run sees, and N processes together see what one process with
an N-times larger batch would.
"""
from __future__ import annotations

import torch

from ..config import ConfigError


class StepBatches:
    def __init__(self, n_examples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.global_batch = batch_size * world
        if n_examples < self.global_batch:
            raise ConfigError(f"{n_examples} training examples cannot fill one batch of {batch_size} x {world} "
                              f"processes; lower the batch size")
        self.n, self.batch_size, self.seed, self.rank = n_examples, batch_size, seed, rank
        self.per_epoch = n_examples // self.global_batch
        self._epoch, self._perm = -1, None

    def indices(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        start = j * self.global_batch + self.rank * self.batch_size
        return self._perm[start: start + self.batch_size].tolist()
