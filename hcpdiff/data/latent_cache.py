"""Latent cache: each image VAE-encoded once (per bucket size, crop and flip), in memory or in a folder.

What is stored is the VAE posterior (its mean and std, both already multiplied by the scaling factor), not one
sample of it: every fetch draws `mean + std * noise`, so a cached run keeps the sampling noise an uncached run
has (fresh noise per epoch, reproducible from (seed, index, epoch)). A flipped image's latents are not the
flipped latents of the image, so with random_flip both orientations are encoded and stored.

An entry's key names the file (absolute path, size, mtime_ns), the bucket size, the crop box, the flip and the
VAE (model path, dtype and a hash of its config and first weights); a changed image, bucket or VAE misses the
cache and is encoded again, and a stored entry is used only when the key written inside it matches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hcpdiff.data.dataset import ImageCaptionDataset, noise_seed
from hcpdiff.data.images import IMAGE_READ_ERRORS, load_for_bucket, read_image_size, to_tensor
from hcpdiff.data.videos import ClipSpec, load_clip_for_bucket, read_video_size
from hcpdiff.data.tensor_store import TensorStore
from hcpdiff.errors import DataError

logger = logging.getLogger(__name__)

# pixels [B, 3, H, W] in [-1, 1] -> (mean, std), each [B, C, H/f, W/f], scaled by the VAE's scaling factor.
EncodeDist = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LatentEncoder:
    """What the cache needs from the trainer: the VAE's posterior and a string naming that VAE."""

    encode_dist: EncodeDist
    identity: str  # vae_identity(...): a different VAE (or dtype) gives a different string
    batch_size: int = 8  # images per VAE call while filling the cache


def vae_identity(vae: torch.nn.Module, name_or_path: str, weight_bytes: int = 1 << 20) -> str:
    """`<model path>|<dtype>|<sha256 of the VAE config and its first weight bytes>`, for cache keys."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    first = next(iter(vae.state_dict().values()), None)
    dtype = "none"
    if first is not None:
        dtype = str(first.dtype).replace("torch.", "")
        raw = first.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw[:weight_bytes].numpy().tobytes())
    return f"{name_or_path}|{dtype}|{digest.hexdigest()[:16]}"


def center_crop_box(image_wh: tuple[int, int], bucket_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bucket window in the resized image, as resize_and_crop cuts it."""
    (width, height), (bucket_width, bucket_height) = image_wh, bucket_wh
    if (width, height) == (bucket_width, bucket_height):
        return 0, 0, width, height
    scale = max(bucket_width / width, bucket_height / height)
    resized_wh = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    left, top = (resized_wh[0] - bucket_width) // 2, (resized_wh[1] - bucket_height) // 2
    return left, top, left + bucket_width, top + bucket_height


def entry_key(path: str, bucket_wh: tuple[int, int], flip: bool, vae: str, clip: ClipSpec | None = None) -> str:
    """The cache key of one image (a video's clip: its frames and stride too) at one bucket size (center crop) and
    orientation, as a JSON string."""
    stat = os.stat(path)
    size_wh = read_video_size(path) if clip is not None else read_image_size(path)
    fields = {
        "path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "bucket": list(bucket_wh), "crop": list(center_crop_box(size_wh, bucket_wh)),
        "flip": bool(flip), "vae": vae,
    }
    if clip is not None:
        fields["clip"] = [clip.num_frames, clip.frame_stride]
    return json.dumps(fields, sort_keys=True)


class LatentStore:
    """(mean, std) by key, in a TensorStore: a dict when `cache_dir` is None, else one safetensors file per key."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.tensors = TensorStore(cache_dir, what="latent cache")

    @property
    def cache_dir(self) -> Path | None:
        """The folder of the entries (None: in memory)."""
        return self.tensors.cache_dir

    def file_of(self, key: str) -> Path:
        """Where the entry for `key` lives on disk."""
        return self.tensors.file_of(key)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (mean, std); DataError when the entry is gone or holds another key."""
        entry = self.tensors.get(key)
        return entry["mean"], entry["std"]

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store one entry (fp32; on disk: written to a temporary name, then renamed)."""
        self.tensors.put(key, {"mean": mean.float(), "std": std.float()})


@dataclass
class CacheReport:
    """What filling the cache did (for the log and tests)."""

    encoded: int = 0  # entries (image x orientation) VAE-encoded by this process
    reused: int = 0  # entries found already stored
    substituted: int = 0  # items whose image did not decode and use another image of their bucket


class CachedLatentDataset(Dataset):
    """An ImageCaptionDataset served from the latent cache: {"latents": [C, H/f, W/f] (a clip's [C, F', H/f, W/f]),
    "prompt": str}; no image decoding.

    Prompts, flips and the epoch-by-epoch draws follow the wrapped dataset's seeded streams exactly.
    """

    def __init__(
        self, dataset: ImageCaptionDataset, store: LatentStore, keys: Sequence[tuple[str, str | None]],
        source_of: dict[int, int] | None = None,
    ) -> None:
        # Per index: the image's (height, width) as displayed and the crop window's (top, left); from file headers.
        by_path: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        for index, item in enumerate(dataset.items):
            if item.path not in by_path:
                by_path[item.path] = _geometry(dataset, index)
        self.geometry = [by_path[item.path] for item in dataset.items]
        self.dataset = dataset
        self.store = store
        self.keys = list(keys)  # per index: (key unflipped, key flipped or None)
        self.source_of = dict(source_of or {})  # index -> index of the substitute image it uses
        self._fetch_count: dict[int, int] = defaultdict(int)

    @property
    def items(self):
        """The wrapped dataset's items."""
        return self.dataset.items

    @property
    def bucket(self):
        """The wrapped dataset's bucket."""
        return self.dataset.bucket

    @property
    def bucket_ids(self) -> list[int]:
        """The wrapped dataset's bucket id per index."""
        return self.dataset.bucket_ids

    def sample_prompt(self, index: int, draw: int = 0) -> str:
        """As ImageCaptionDataset.sample_prompt."""
        return self.dataset.sample_prompt(index, draw)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        if isinstance(index, (tuple, list)):
            index, draw = int(index[0]), int(index[1])
        else:
            draw = self._fetch_count[index]
            self._fetch_count[index] += 1
        dataset = self.dataset
        seed = dataset.seed
        # The same seeded streams as ImageCaptionDataset.__getitem__: center crops draw nothing, so the flip is the
        # image stream's first draw.
        item = dataset.items[self.source_of.get(index, index)]
        image_rng = random.Random(f"{seed}:{index}:{draw}:image")
        flip = dataset.image_transforms[item.source_index].random_flip and image_rng.random() < 0.5
        unflipped, flipped = self.keys[index]
        mean, std = self.store.get(flipped if flip else unflipped)
        original_hw, crop_top_left = self.geometry[self.source_of.get(index, index)]
        posterior_seed = random.Random(f"{seed}:{index}:{draw}:latent").getrandbits(63)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(posterior_seed))
        template_rng = random.Random(f"{seed}:{index}:{draw}")
        prompt = dataset._prompt(item, index, draw, template_rng)
        # original_size (h, w) and crop_top_left (top, left), as the uncached dataset gives them (SDXL conditioning).
        return {"latents": mean + std * noise, "prompt": prompt,
                "original_size": tuple(original_hw), "crop_top_left": tuple(crop_top_left),
                "noise_seed": noise_seed(seed, index, draw)}


def fill_latent_cache(
    dataset: ImageCaptionDataset,
    encoder: LatentEncoder,
    cache_dir: str | os.PathLike | None = None,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    barrier: Callable[[], None] | None = None,
    show_progress: bool = True,
    desc: str = "cache latents",
) -> tuple[CachedLatentDataset, CacheReport]:
    """Encode every (image, bucket, orientation) of `dataset` not yet stored; return the cached dataset and a report.

    A disk cache is filled in parts: process `rank` encodes its contiguous share of the images, then all meet at
    `barrier` and read every entry. A memory cache is filled whole by every process.
    """
    store = LatentStore(cache_dir)
    report = CacheReport()
    # One entry per distinct image (repeat makes several items of one image).
    first_index: dict[str, int] = {}
    for index, item in enumerate(dataset.items):
        first_index.setdefault(item.key, index)
    unique = list(first_index.values())
    keys_of = {index: _keys(dataset, index, encoder.identity) for index in unique}

    if store.cache_dir is not None and num_replicas > 1:
        share = unique[len(unique) * rank // num_replicas: len(unique) * (rank + 1) // num_replicas]
        broken = _encode_missing(dataset, encoder, store, keys_of, share, report, show_progress, desc)
        if barrier is not None:
            barrier()
        # Entries of the others' shares are there now; a missing one (say, a failed write) is encoded here.
        others = [index for index in unique if index not in set(share)]
        broken |= _encode_missing(dataset, encoder, store, keys_of, others, report, False, desc)
    else:
        broken = _encode_missing(dataset, encoder, store, keys_of, unique, report, show_progress, desc)

    source_of: dict[int, int] = {}
    keys: list[tuple[str, str | None]] = []
    for index, item in enumerate(dataset.items):
        source = first_index[item.key]
        if source in broken:
            source = _substitute(dataset, source, broken)
            source_of[index] = source
            report.substituted += 1
        keys.append(keys_of[first_index[dataset.items[source].key]])
    return CachedLatentDataset(dataset, store, keys, source_of), report


def _geometry(dataset: ImageCaptionDataset, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
    item = dataset.items[index]
    width, height = read_video_size(item.path) if item.clip is not None else read_image_size(item.path)
    left, top, _, _ = center_crop_box((width, height), dataset.bucket.sizes[dataset.bucket_ids[index]])
    return (height, width), (top, left)


def _keys(dataset: ImageCaptionDataset, index: int, vae: str) -> tuple[str, str | None]:
    item = dataset.items[index]
    bucket_wh = dataset.bucket.sizes[dataset.bucket_ids[index]]
    with_flip = dataset.image_transforms[item.source_index].random_flip
    return (entry_key(item.path, bucket_wh, False, vae, item.clip),
            entry_key(item.path, bucket_wh, True, vae, item.clip) if with_flip else None)


def _encode_missing(
    dataset: ImageCaptionDataset, encoder: LatentEncoder, store: LatentStore,
    keys_of: dict[int, tuple[str, str | None]], indices: Sequence[int], report: CacheReport,
    show_progress: bool, desc: str,
) -> set[int]:
    """Encode the entries of `indices` not in `store`, a bucket at a time; return the indices whose image is broken."""
    missing_by_bucket: dict[int, list[int]] = defaultdict(list)
    for index in indices:
        wanted = [key for key in keys_of[index] if key is not None]
        stored = sum(key in store for key in wanted)
        report.reused += stored
        if stored < len(wanted):
            missing_by_bucket[dataset.bucket_ids[index]].append(index)
    total = sum(len(v) for v in missing_by_bucket.values())
    broken: set[int] = set()
    with tqdm(total=total, desc=desc, disable=not show_progress or total == 0, dynamic_ncols=True) as progress:
        for bucket_id in sorted(missing_by_bucket):
            bucket_wh = dataset.bucket.sizes[bucket_id]
            batch_indices = missing_by_bucket[bucket_id]
            for start in range(0, len(batch_indices), encoder.batch_size):
                chunk = batch_indices[start: start + encoder.batch_size]
                pixels, entry_keys = [], []
                for index in chunk:
                    item = dataset.items[index]
                    try:  # an image, or a video's clip (its frames [3, F, H, W])
                        frames = (load_clip_for_bucket(item.path, item.clip, bucket_wh)[0] if item.clip is not None
                                  else [load_for_bucket(item.path, bucket_wh, dataset.bg_colors[item.source_index])[0]])
                    except IMAGE_READ_ERRORS as exc:
                        logger.warning("Image '%s' cannot be decoded (%s); another image of its bucket is used instead.",
                                       item.path, exc)
                        broken.add(index)
                        continue
                    unflipped, flipped = keys_of[index]
                    pixels.append(frames_tensor(frames, item.clip is not None, flip=False))
                    entry_keys.append(unflipped)
                    if flipped is not None:
                        pixels.append(frames_tensor(frames, item.clip is not None, flip=True))
                        entry_keys.append(flipped)
                if pixels:
                    means, stds = encoder.encode_dist(torch.stack(pixels))
                    for key, mean, std in zip(entry_keys, means, stds):
                        store.put(key, mean, std)
                    report.encoded += len(entry_keys)
                progress.update(len(chunk))
    return broken


def frames_tensor(frames: list[Image.Image], clip: bool, flip: bool) -> torch.Tensor:
    """An image [3, H, W] (a clip's frames: [3, F, H, W]) in [-1, 1], mirrored with `flip`."""
    if flip:
        frames = [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for frame in frames]
    return torch.stack([to_tensor(frame) for frame in frames], dim=1) if clip else to_tensor(frames[0])


def _substitute(dataset: ImageCaptionDataset, index: int, broken: set[int]) -> int:
    """The first item of the same bucket whose image decoded (deterministic, so every process agrees)."""
    bucket_id = dataset.bucket_ids[index]
    broken_keys = {dataset.items[other].key for other in broken}
    for candidate, candidate_bucket in enumerate(dataset.bucket_ids):
        if candidate_bucket == bucket_id and dataset.items[candidate].key not in broken_keys:
            return candidate
    width, height = dataset.bucket.sizes[bucket_id]
    raise DataError(f"No image of bucket {width}x{height} can be decoded (first broken file: '{dataset.items[index].path}').")
