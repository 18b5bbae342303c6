"""Bucket batch sampler: one bucket per batch, deterministic per (seed, epoch), distinct batches across ranks."""

from __future__ import annotations

import pytest

from hcpdiff.data import BucketBatchSampler
from hcpdiff.errors import DataError

# 10 items in bucket 0, 7 in bucket 1, 3 in bucket 2, interleaved.
BUCKET_IDS = [0, 1, 0, 2, 1, 0, 0, 1, 0, 2, 1, 0, 0, 1, 0, 2, 1, 0, 1, 0]


def batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_batch_from_one_bucket_and_every_item_once():
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0)
    epoch_batches = batches(sampler, 0)
    assert len(epoch_batches) == len(sampler) == 3 + 2 + 1
    for batch in epoch_batches:
        assert len({BUCKET_IDS[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 4
    assert sorted(i for batch in epoch_batches for i in batch) == list(range(len(BUCKET_IDS)))


def test_drop_last_keeps_only_full_batches():
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0, drop_last=True)
    epoch_batches = batches(sampler, 0)
    assert len(epoch_batches) == len(sampler) == 2 + 1
    assert all(len(batch) == 4 for batch in epoch_batches)


def test_deterministic_per_seed_and_epoch():
    first = BucketBatchSampler(BUCKET_IDS, batch_size=3, seed=7)
    second = BucketBatchSampler(BUCKET_IDS, batch_size=3, seed=7)
    assert batches(first, 2) == batches(second, 2)
    assert batches(first, 2) != batches(first, 3)
    assert batches(first, 2) != batches(BucketBatchSampler(BUCKET_IDS, batch_size=3, seed=8), 2)


def test_no_shuffle_keeps_order():
    sampler = BucketBatchSampler([0, 0, 1, 0], batch_size=2, seed=0, shuffle=False)
    assert list(sampler) == [[0, 1], [3], [2]]


def test_two_ranks_get_distinct_batches_of_equal_count():
    # 12 batches of 2 split evenly: the ranks' batches are disjoint and together cover the epoch.
    bucket_ids = [i % 3 for i in range(24)]
    ranks = [BucketBatchSampler(bucket_ids, batch_size=2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    rank_batches = [batches(s, 4) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 6 == len(rank_batches[0]) == len(rank_batches[1])
    seen = [i for per_rank in rank_batches for batch in per_rank for i in batch]
    assert sorted(seen) == list(range(24))


def test_uneven_split_is_padded_to_equal_length():
    ranks = [BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0, num_replicas=4, rank=r) for r in range(4)]
    lengths = {len(list(s)) for s in ranks}
    assert lengths == {len(ranks[0])} == {2}  # 6 batches -> padded to 8
    covered = {i for s in ranks for batch in s for i in batch}
    assert covered == set(range(len(BUCKET_IDS)))


def test_bad_arguments():
    with pytest.raises(DataError, match="batch_size"):
        BucketBatchSampler([0], batch_size=0, seed=0)
    with pytest.raises(ValueError):
        BucketBatchSampler([0], batch_size=1, seed=0, num_replicas=2, rank=2)
    with pytest.raises(DataError, match="too few"):
        BucketBatchSampler([0, 0], batch_size=4, seed=0, drop_last=True)
