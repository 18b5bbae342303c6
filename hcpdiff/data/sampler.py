"""Batches that each hold images of one bucket, shuffled per epoch and split between processes."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from hcpdiff.errors import DataError


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; every list comes from one bucket; order fixed by (seed, epoch)."""

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not within num_replicas {num_replicas}.")
        if not bucket_ids:
            raise DataError("The dataset has no images to sample batches from.")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._indices_of_bucket: dict[int, list[int]] = {}
        for index, bucket_id in enumerate(self.bucket_ids):
            self._indices_of_bucket.setdefault(bucket_id, []).append(index)
        rounding = math.floor if drop_last else math.ceil
        self._num_batches_all_ranks = sum(rounding(len(ix) / batch_size) for ix in self._indices_of_bucket.values())
        self._num_batches_per_rank = rounding(self._num_batches_all_ranks / num_replicas)
        if self._num_batches_per_rank == 0:
            raise DataError(
                f"With batch_size {batch_size} and drop_last, the dataset gives {self._num_batches_all_ranks} batch(es), "
                f"too few for {num_replicas} process(es); lower batch_size or add images."
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches(self.epoch))

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"bucket-batches:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for bucket_id in sorted(self._indices_of_bucket):
            indices = list(self._indices_of_bucket[bucket_id])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        # Every rank must run the same number of steps, or the collective ops of the others wait forever:
        # pad with batches from the start of the (shuffled) list, or cut the tail when drop_last.
        total = self._num_batches_per_rank * self.num_replicas
        if total > len(batches):
            batches += [batches[i % len(batches)] for i in range(total - len(batches))]
        return batches[:total][self.rank :: self.num_replicas]
