"""Endless, resumable batch streams, one per dataset, remembering epoch and position for resume; batches collated in
the loader's workers and handed to the training process."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info


# tensors up to this size travel from a loader worker inline (InlineTensor), larger ones as torch shares them
INLINE_MAX_BYTES = 2**20


class InlineTensor:
    """A batch tensor on its way from a loader worker, its bytes pickled into the batch's own message.

    A worker hands a plain tensor over through a shared-memory file whose descriptor the training process fetches
    over a socket, with a handshake per tensor. `python tools/bench_data.py --transfer` (2 workers, the 2-core CPU
    machine) timed the training process at 0.4-0.6 ms CPU per 24 KiB batch that way against 0.2 ms inline, 1.1-1.8
    against 0.5-1.0 ms at 384 KiB; from 3 MiB on, inline cost 1.2-1.35x more, so tensors over INLINE_MAX_BYTES keep
    torch's way. The loader's pin-memory thread turns it into a pinned tensor (`pin_memory`), `DataStream.batches`
    into a plain one.
    """

    def __init__(self, tensor: torch.Tensor):
        self.dtype, self.shape = tensor.dtype, tensor.shape
        # as raw bytes: numpy has no bfloat16 (a text cache's rows may be)
        self.data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()

    def tensor(self) -> torch.Tensor:
        """The tensor again (sharing this message's memory)."""
        return torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        """The tensor in pinned memory (the DataLoader's pin-memory thread asks)."""
        return self.tensor().pin_memory()


def collate_batch(samples: list[dict]) -> dict:
    """Stack tensor fields of one bucket's samples (pixel_values [B, 3, H, W], latents, ...); list the rest.

    The per-sample `prompt` strings become the batch's `prompts` list. In a loader worker the stacked tensors up to
    INLINE_MAX_BYTES travel as `InlineTensor`s.
    """
    batch = {}
    in_worker = get_worker_info() is not None
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        name = "prompts" if key == "prompt" else key
        stackable = isinstance(values[0], torch.Tensor) and all(value.shape == values[0].shape for value in values)
        if not stackable:
            batch[name] = values
            continue
        stacked = torch.stack(values)
        small = stacked.numel() * stacked.element_size() <= INLINE_MAX_BYTES
        batch[name] = InlineTensor(stacked) if in_worker and small else stacked
    return batch


def received(batch: dict) -> dict:
    """A batch from the loader with its `InlineTensor`s as tensors."""
    return {name: value.tensor() if isinstance(value, InlineTensor) else value for name, value in batch.items()}


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a bucket batch sampler into one endless stream of batches, epoch after epoch; yields (index, epoch) pairs
    so the dataset's random choices follow the epoch.

    Endless, so the loader's workers prefetch across epoch ends instead of idling while the next epoch's first batch
    loads. An iteration starts at `start` (epoch, position); batches before that position are passed over without
    loading any image (resuming mid-epoch).
    """

    def __init__(self, inner: Sampler[list[int]]):
        self.inner = inner
        self.start = (0, 0)

    @property
    def batch_size(self) -> int:
        """The wrapped sampler's batch size."""
        return self.inner.batch_size

    def __len__(self) -> int:
        """Batches per epoch (every epoch has as many)."""
        return len(self.inner)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.start
        while True:
            self.inner.set_epoch(epoch)  # reshuffles the buckets
            for position, batch in enumerate(self.inner):
                if position >= skip:
                    yield [(index, epoch) for index in batch]
            epoch, skip = epoch + 1, 0


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
        per_epoch = len(sampler)
        # a state saved right after an epoch's last batch may say (epoch, per_epoch): that is the next epoch's start
        self.epoch, self.position = self.epoch + self.position // per_epoch, self.position % per_epoch
        sampler.start = (self.epoch, self.position)
        for batch in self.loader:  # endless
            self.position += 1
            if self.position == per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield received(batch)

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
