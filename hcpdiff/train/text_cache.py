"""Text-embedding cache: every prompt the data can give is encoded once, before training, into a TensorStore (in
memory, or on disk under the dataset's `cache_dir`, reused by later runs), and batches read their rows from there.

Valid only while the text encoders are frozen (the builder turns it off when one trains). Once every dataset's prompts
are cached, the trainer can release the text encoders (`release_encoders`): nothing encodes text again.

An entry's key is the prompt plus the encoders' identity: the family, the conditioner's settings (clip_skip, T5
length, guidance ...) and each text encoder's `weights_identity` (model path, dtype, a hash of its config and of
every tensor's first bytes), so another model, precision, setting or a LoRA fused into an encoder misses the cache.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from hcpdiff.data.tensor_store import TensorStore, weights_identity
from hcpdiff.models import SDConditioner
from hcpdiff.models.transfer import to_device

# Conditioners whose outputs depend on the prompts alone (not on other batch fields), so a prompt string is a
# complete cache key. A family whose conditioning reads the batch (SDXL's size / crop ids) is left uncached.
PROMPT_ONLY_CONDITIONERS = (SDConditioner,)
TEXT_CACHE_FOLDER = "text_embeds"  # under a dataset's cache_dir, beside the latent entries


@dataclass
class TextCacheReport:
    """What filling the cache did (for the log and tests)."""

    encoded: int = 0  # prompts encoded by this process
    reused: int = 0  # prompts found already stored


class CachedConditioner:
    """Wraps a conditioner `(prompts, batch, device) -> denoiser kwargs`; prompts added with `add` are encoded by
    `fill` and then read from their store. A batch with any other prompt goes to the wrapped conditioner unchanged
    (an error once the encoders are released)."""

    def __init__(self, conditioner: Any, identity: str) -> None:
        self.conditioner: Any = conditioner  # None once release_encoders() ran
        self.identity = identity
        # {states: their mask}: sequences the conditioner pads to the longest prompt of a batch (Qwen-Image); a row
        # is stored at its prompt's own length and padded again (zeros, mask 0) to the longest of the batch read
        self.padded: dict[str, str] = dict(getattr(type(conditioner), "padded_sequences", {}))
        self._entries: dict[str, tuple[TensorStore, str]] = {}  # prompt -> (its store, its key)

    def key(self, prompt: str) -> str:
        """The cache key of one prompt under these encoders."""
        return json.dumps({"prompt": prompt, "encoders": self.identity}, sort_keys=True)

    def add(self, prompts: Iterable[str], store: TensorStore) -> None:
        """Cache these prompts in `store` (a prompt already added keeps its first store)."""
        for prompt in prompts:
            self._entries.setdefault(prompt, (store, self.key(prompt)))

    @property
    def prompts(self) -> list[str]:
        """Every cached prompt, sorted (the order every process fills in)."""
        return sorted(self._entries)

    def fill(self, device: torch.device, encode_context: Callable[[], AbstractContextManager] = nullcontext, *,
             batch_size: int = 8, num_replicas: int = 1, rank: int = 0,
             barrier: Callable[[], None] | None = None) -> TextCacheReport:
        """Encode every added prompt not yet stored, `batch_size` at a time under `encode_context` (the run's
        autocast). Disk entries are filled in shares, as the latent cache: process `rank` encodes its contiguous
        share, all meet at `barrier`, then any entry still missing is encoded; a memory cache is filled whole."""
        report = TextCacheReport()
        prompts = self.prompts
        on_disk = any(store.cache_dir is not None for store, _ in self._entries.values())
        if on_disk and num_replicas > 1:
            share = prompts[len(prompts) * rank // num_replicas: len(prompts) * (rank + 1) // num_replicas]
            self._encode_missing(share, device, encode_context, batch_size, report)
            if barrier is not None:
                barrier()
            share_set = set(share)
            prompts = [prompt for prompt in prompts if prompt not in share_set]
        self._encode_missing(prompts, device, encode_context, batch_size, report)
        return report

    def _encode_missing(self, prompts: list[str], device: torch.device,
                        encode_context: Callable[[], AbstractContextManager], batch_size: int,
                        report: TextCacheReport) -> None:
        missing = []
        for prompt in prompts:
            store, key = self._entries[prompt]
            if key in store:
                report.reused += 1
            else:
                missing.append(prompt)
        if missing and self.conditioner is None:
            raise RuntimeError("the text encoders were released before every prompt was cached")
        for start in range(0, len(missing), batch_size):
            chunk = missing[start: start + batch_size]
            with torch.no_grad(), encode_context():
                encoded = self.conditioner(chunk, {"prompts": chunk}, device)
            for row, prompt in enumerate(chunk):
                store, key = self._entries[prompt]
                store.put(key, unpadded_row({name: value[row] for name, value in encoded.items()}, self.padded))
            report.encoded += len(chunk)

    def release_encoders(self) -> None:
        """Drop the wrapped conditioner (and with it the text encoders it holds); only cached prompts work after."""
        self.conditioner = None

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Denoiser kwargs for one batch, each row read from the cache."""
        if not all(prompt in self._entries for prompt in prompts):
            if self.conditioner is None:
                unknown = next(prompt for prompt in prompts if prompt not in self._entries)
                raise RuntimeError(f"prompt {unknown!r} is not in the text cache and the text encoders were released")
            return self.conditioner(prompts, batch, device)
        rows = [store.get(key) for store, key in (self._entries[prompt] for prompt in prompts)]
        if self.padded:
            longest = {states: max(row[states].shape[0] for row in rows) for states in self.padded}
            rows = [{**row, **{name: pad_rows(row[name], longest[states])
                               for states, mask in self.padded.items() for name in (states, mask)}} for row in rows]
        # stacked on the host, copied without waiting for the GPU (pinned, non-blocking)
        return {name: to_device(torch.stack([row[name] for row in rows]), device) for name in rows[0]}


def unpadded_row(values: dict[str, torch.Tensor], padded: dict[str, str]) -> dict[str, torch.Tensor]:
    """One prompt's row with each padded sequence (and its mask) cut to the prompt's own length."""
    values = dict(values)
    for states, mask in padded.items():
        length = int(values[mask].sum())  # masks are ones, then zeros
        values[states], values[mask] = values[states][:length], values[mask][:length]
    return values


def pad_rows(value: torch.Tensor, length: int) -> torch.Tensor:
    """`value` [L, ...] zero-padded along its first axis to `length`."""
    padding = value.new_zeros(length - value.shape[0], *value.shape[1:])
    return torch.cat([value, padding])


def text_identity(family: Any, conditioner: Any, components: dict[str, Any], name_or_path: str) -> str:
    """What besides the prompt decides a conditioner's output: family, conditioner settings, text encoder weights (None
    for one left out, as SD3's T5 with drop_t5, whose place the conditioner fills with zeros)."""
    settings = conditioner.cache_settings() if hasattr(conditioner, "cache_settings") else {}
    encoders = [None if components.get(part) is None else weights_identity(components[part], f"{name_or_path}/{part}")
                for part in family.text_encoders]
    return json.dumps({"family": family.name, "settings": settings, "encoders": encoders}, sort_keys=True)


def can_cache_text(conditioner: Any) -> bool:
    """Whether `conditioner`'s outputs are a function of the prompt strings alone."""
    # a family's own conditioner says so with a `prompt_only = True` class attribute
    return type(conditioner) in PROMPT_ONLY_CONDITIONERS or getattr(type(conditioner), "prompt_only", False) is True
