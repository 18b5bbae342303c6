"""Data streams: one endless loader iteration across epochs, resumable at any batch, and batches from loader workers
equal to batches made in the training process (small tensors travel inline, large ones as torch shares them)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hcpdiff.data import BucketBatchSampler
from hcpdiff.train.streams import (INLINE_MAX_BYTES, DataStream, InlineTensor, ResumableBatchSampler,
                                   collate_batch)

BUCKET_IDS = [0, 1, 0, 0, 1, 0, 1]  # batch 2: bucket 0 gives 2 batches, bucket 1 gives 2 -> 4 per epoch


class Items(Dataset):
    """What the trainer's dataset gives, made from (index, epoch): pixels, a bf16 field, a large field, host ints."""

    def __len__(self) -> int:
        return len(BUCKET_IDS)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        return {"pixel_values": torch.full((3, 8, 8), index * 10 + epoch, dtype=torch.uint8),
                "text": torch.full((4, 3), index + epoch / 4, dtype=torch.bfloat16),
                "large": torch.full((INLINE_MAX_BYTES // 4 + 1,), float(index)),  # over the inline limit
                "prompt": f"item {index} epoch {epoch}", "noise_seed": index * 1000 + epoch,
                "original_size": (index, epoch)}


def make_stream(workers: int) -> DataStream:
    sampler = ResumableBatchSampler(BucketBatchSampler(BUCKET_IDS, batch_size=2, seed=3))
    loader = DataLoader(Items(), batch_sampler=sampler, num_workers=workers, collate_fn=collate_batch,
                        persistent_workers=workers > 0)
    return DataStream("dataset1", loader, 1.0)


def take(stream: DataStream, count: int) -> list[dict]:
    batches = stream.batches()
    return [next(batches) for _ in range(count)]


def same_batch(first: dict, second: dict) -> bool:
    if first.keys() != second.keys():
        return False
    for name, value in first.items():
        other = second[name]
        if isinstance(value, torch.Tensor):
            if not (isinstance(other, torch.Tensor) and value.dtype == other.dtype and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


def test_one_loader_iteration_runs_epoch_after_epoch_reshuffled(monkeypatch):
    stream = make_stream(workers=0)
    iterations = []
    real_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: iterations.append(1) or real_iter(self))
    batches = take(stream, 12)  # three epochs
    assert len(iterations) == 1  # workers prefetch across epoch ends: the iteration is never restarted
    epochs = [[tuple(batch["prompts"]) for batch in batches[start:start + 4]] for start in (0, 4, 8)]
    for epoch, prompts in enumerate(epochs):  # each epoch holds every item once, from its own draw
        items = sorted(prompt for batch in prompts for prompt in batch)
        assert items == sorted(f"item {i} epoch {epoch}" for i in range(len(BUCKET_IDS)))
    order = [[int(p.split()[1]) for p in batch] for batch in epochs[0]]
    assert order != [[int(p.split()[1]) for p in batch] for batch in epochs[1]]  # reshuffled
    assert stream.state() == {"name": "dataset1", "epoch": 3, "position": 0}


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 9])
def test_a_stream_restored_from_its_state_continues_with_the_same_batches(cut):
    whole = take(make_stream(workers=0), 11)
    first = make_stream(workers=0)
    take(first, cut)
    resumed = make_stream(workers=0)
    resumed.restore(first.state())
    assert all(same_batch(a, b) for a, b in zip(take(resumed, 11 - cut), whole[cut:], strict=True))


def test_a_state_saved_at_an_epoch_end_by_the_older_stream_resumes_at_the_next_epoch():
    whole = take(make_stream(workers=0), 6)
    resumed = make_stream(workers=0)
    resumed.restore({"name": "dataset1", "epoch": 0, "position": 4})  # all 4 batches of epoch 0 handed out
    assert all(same_batch(a, b) for a, b in zip(take(resumed, 2), whole[4:], strict=True))
    assert resumed.state() == {"name": "dataset1", "epoch": 1, "position": 2}


def test_batches_from_loader_workers_equal_those_made_in_process():
    in_process = take(make_stream(workers=0), 9)
    from_workers = take(make_stream(workers=2), 9)
    assert all(same_batch(a, b) for a, b in zip(from_workers, in_process, strict=True))
    assert from_workers[0]["text"].dtype == torch.bfloat16 and from_workers[0]["pixel_values"].dtype == torch.uint8


def test_in_a_worker_small_tensors_travel_inline_and_large_ones_shared():
    stream = make_stream(workers=1)
    raw = next(iter(stream.loader))  # as it leaves the worker, before the stream's `received`
    assert isinstance(raw["pixel_values"], InlineTensor) and isinstance(raw["text"], InlineTensor)
    assert isinstance(raw["large"], torch.Tensor)
    assert raw["noise_seed"] == [int(value) for value in raw["noise_seed"]]  # plain ints, no tensor to share
