"""DDP: each process's share of the training and validation batches of :class:`SequenceDataModule`."""

from __future__ import annotations

from collections.abc import Iterator

import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from recsys.data import IndexBatchSampler, SequenceDataModule


class RankBatches(Sampler[torch.Tensor]):
    """One DDP rank's share of every (B,) index batch of an :class:`IndexBatchSampler`.

    Each batch is dealt out row by row, rank ``rank`` taking rows ``rank``, ``rank + world_size``, ..., so the
    ranks together see exactly the batches one process would (the batch size is global), and each rank's part
    is like the whole batch: with ``train.group_by_length`` a batch is sorted longest first, and contiguous
    parts gave rank 0 the longest histories and the last rank the shortest (each rank's loss is a mean over
    its own target positions, so the short histories' positions weighed up to 1.22x, the long ones' 0.83x).
    ``pad`` (training): a batch whose size is not a multiple of ``world_size`` is first padded with its own
    first indices, so that every rank gets the same number of rows at every step; DDP needs the same number of
    steps on every rank and averages their gradients, which equals the one-process gradient when the parts
    are equal. Without ``pad`` (validation) no user is counted twice: parts may differ by one row, and a rank
    whose part of the last batch is empty skips it.
    """

    def __init__(self, batches: IndexBatchSampler, rank: int, world_size: int, pad: bool) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.batches, self.rank, self.world_size, self.pad = batches, rank, world_size, pad

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            if self.pad and len(batch) % self.world_size:
                size = -(-len(batch) // self.world_size) * self.world_size
                batch = batch[torch.arange(size) % len(batch)]  # (size,)
            part = batch[self.rank :: self.world_size]
            if len(part):
                yield part

    def __len__(self) -> int:
        full = len(self.batches)
        last = self.batches.n - (full - 1) * self.batches.batch_size  # rows of the last batch
        return full if self.pad or full == 0 or last > self.rank else full - 1


class RankShardedData(SequenceDataModule):
    """:class:`SequenceDataModule` whose loaders give each DDP rank its :class:`RankBatches` share.

    With one process (or no trainer attached) the loaders are the parent's, unchanged.
    """

    def train_dataloader(self) -> DataLoader:
        return self._share(super().train_dataloader(), pad=True)

    def val_dataloader(self) -> DataLoader:
        return self._share(super().val_dataloader(), pad=False)

    def _share(self, loader: DataLoader, pad: bool) -> DataLoader:
        trainer: L.Trainer | None = self.trainer
        if trainer is None or trainer.world_size == 1:
            return loader
        assert isinstance(loader.sampler, IndexBatchSampler)
        sampler = RankBatches(loader.sampler, trainer.global_rank, trainer.world_size, pad)
        return DataLoader(loader.dataset, sampler=sampler, batch_size=None, pin_memory=loader.pin_memory)
