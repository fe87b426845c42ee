"""Seeded, resumable batching of an ``ImageDataset``.

Batching and resuming
---------------------
:func:`make_loader` returns a ``DataLoader`` driven by an :class:`EpochBatchSampler`: the order of
epoch ``e`` is a permutation drawn from ``SeedSequence([seed, e])``, so it depends only on
``(seed, e)``. A training loop that checkpoints ``(epoch, next_batch)`` resumes mid-epoch with
``loader.sampler.set_epoch(epoch, start_batch=next_batch)``, or simply iterates
:func:`endless_batches`, which yields ``(epoch, batch_index, (x, y))`` from a given position.
Images come out as uint8; :func:`to_float` maps them to ``k / 255`` in ``[0, 1]``, the input
that :func:`acf.layers.flow.uniform_dequantize` expects.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .registry import ImageDataset


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit seed of epoch ``epoch``'s order: ``SeedSequence([seed, epoch])`` (no collisions
    between e.g. ``(seed=0, epoch=1)`` and ``(seed=1, epoch=0)``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors, one per batch, in an order fixed by ``(seed, epoch)``.

    With ``world_size > 1`` every rank takes ``perm[rank::world_size]`` of the first
    ``world_size * (N // world_size)`` positions, so all ranks see the same number of batches.
    ``set_epoch(epoch, start_batch)`` selects the epoch and skips its first ``start_batch`` batches
    (resuming mid-epoch); ``len()`` counts the batches the next iteration yields.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} examples over {world_size} rank(s) give no batch of {batch_size} "
                             f"(drop_last={drop_last}); lower batch_size")

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self.n // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} must be in [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        """This rank's indices for the current epoch, before batching."""
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        else:
            perm = torch.arange(self.n)
        used = (self.n // self.world_size) * self.world_size
        return perm[self.rank:used:self.world_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.order()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` of ``(images uint8 (B, C, H, W), labels int64 (B,))`` batches.

    Batches are cut by an :class:`EpochBatchSampler` (``loader.sampler``) and fetched with one
    indexing step each. Per epoch call ``loader.sampler.set_epoch(epoch)``; to resume mid-epoch,
    ``set_epoch(epoch, start_batch=next_batch)``; or use :func:`endless_batches`. The loader has a
    generator of its own, so iterating it never draws from the global torch generator; its
    ``num_workers`` worker processes (kept across epochs) fetch the batches the sampler cuts in this
    process, so they change nothing in the batches.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def endless_batches(loader: DataLoader, epoch: int = 0, batch: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, batch_index, batch)`` forever, starting at batch ``batch`` of epoch ``epoch``.

    A checkpoint taken after consuming ``(e, b, ...)`` resumes with ``endless_batches(loader, e, b + 1)``
    (``b + 1`` may equal ``batches_per_epoch``: the next epoch starts) and sees the same batches as
    an uninterrupted run.
    """
    sampler: EpochBatchSampler = loader.sampler  # type: ignore[assignment]
    if batch >= sampler.batches_per_epoch:
        epoch, batch = epoch + batch // sampler.batches_per_epoch, batch % sampler.batches_per_epoch
    while True:
        sampler.set_epoch(epoch, start_batch=batch)
        for offset, item in enumerate(loader):
            yield epoch, batch + offset, item
        epoch, batch = epoch + 1, 0
