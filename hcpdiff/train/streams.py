"""Endless, resumable batch streams: one per dataset, remembering epoch and position for resume."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader, Sampler


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a bucket batch sampler; yields (index, epoch) pairs so the dataset's random choices follow the epoch.

    `skip` batches of the next pass are passed over without loading any image (resuming mid-epoch).
    """

    def __init__(self, inner: Sampler[list[int]]):
        self.inner = inner
        self.skip = 0
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """The wrapped sampler's batch size."""
        return self.inner.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the wrapped sampler for `epoch`."""
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self.skip = self.skip, 0
        for position, batch in enumerate(self.inner):
            if position >= skip:
                yield [(index, self.epoch) for index in batch]


@dataclass
class DataStream:
    """One dataset's loader and loss weight; `batches()` cycles it forever, epoch after epoch."""

    name: str
    loader: DataLoader  # its batch_sampler is a ResumableBatchSampler
    loss_weight: float
    epoch: int = 0  # the epoch being read
    position: int = 0  # batches of that epoch already handed to the trainer

    def batches(self) -> Iterator[dict]:
        """Yield batches from the current epoch and position on, reshuffling the buckets every epoch."""
        sampler = self.loader.batch_sampler
        while True:
            sampler.set_epoch(self.epoch)
            sampler.skip = self.position
            for batch in self.loader:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    @property
    def noise_salt(self) -> int:
        """Mixed into this dataset's per-sample noise seeds, so items of two datasets with the same index and epoch
        do not share their noise."""
        return random.Random(f"noise:{self.name}").getrandbits(62)

    def state(self) -> dict:
        """Where the stream is, for a resumable checkpoint."""
        return {"name": self.name, "epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        """Continue from a saved `state()`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
