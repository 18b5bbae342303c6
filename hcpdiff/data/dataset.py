"""The training dataset: one item per image (times repeat), resized to its bucket, with a prompt."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from hcpdiff.data.buckets import Bucket
from hcpdiff.data.images import IMAGE_READ_ERRORS, allow_image_pixels, load_for_bucket, to_tensor, to_uint8_tensor
from hcpdiff.data.prompts import PromptBuilder
from hcpdiff.data.transforms import CaptionTransform, ImageTransform
from hcpdiff.data.videos import ClipSpec, load_clip_for_bucket
from hcpdiff.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataItem:
    """One training image: its file, its bucket key, its caption (None when it has none), its source, and the
    condition images it is trained with (an image-editing family's input images; None when the source has none)."""

    path: str
    key: str
    caption: str | None
    source_index: int
    condition: tuple[str, ...] | None = None
    clip: ClipSpec | None = None  # a video's: the clip it trains as (None: an image, a 1-frame clip)


def noise_seed(seed: int, index: int, draw: int) -> int:
    """The seed of item `index`'s training noise on its `draw`-th fetch (63 bits): the trainer draws the item's noise
    and timestep from it, so they do not depend on the batch or the process the item lands in."""
    return random.Random(f"{seed}:{index}:{draw}:noise").getrandbits(63)


class ImageCaptionDataset(Dataset):
    """Items -> {"pixel_values": FloatTensor [3, H, W] in [-1, 1] (a video's clip: [3, F, H, W]), "prompt": str},
    H x W being the item's bucket size.

    With `uint8_pixels`, "pixel_values" is the image's (or clip's) ByteTensor instead (images.unit_range converts it,
    on the device, to the same floats), and so are an editing row's "condition_pixels": the trainer's loader collates
    and copies a quarter of the bytes.
    """

    def __init__(
        self,
        items: Sequence[DataItem],
        bucket: Bucket,
        prompt_builders: Sequence[PromptBuilder],
        bg_colors: Sequence[tuple[int, int, int]] | None = None,
        seed: int = 0,
        caption_transforms: Sequence[CaptionTransform] | None = None,
        image_transforms: Sequence[ImageTransform] | None = None,
        max_image_pixels: int | None = None,
        uint8_pixels: bool = False,
    ) -> None:
        if not items:
            raise DataError("The dataset has no images.")
        self.items = list(items)
        self.bucket = bucket
        self.prompt_builders = list(prompt_builders)
        self.bg_colors = list(bg_colors) if bg_colors is not None else [(255, 255, 255)] * len(self.prompt_builders)
        self.seed = seed
        # the largest `max_image_pixels` of the sources: Pillow's limit is per process, so workers raise it again
        self.max_image_pixels = max_image_pixels
        self.uint8_pixels = uint8_pixels
        num_sources = len(self.prompt_builders)
        self.caption_transforms = list(caption_transforms or [CaptionTransform()] * num_sources)
        self.image_transforms = list(image_transforms or [ImageTransform()] * num_sources)
        self.bucket_ids: list[int] = [bucket.bucket_of[item.key] for item in self.items]
        self._indices_of_bucket: dict[int, list[int]] = defaultdict(list)
        for index, bucket_id in enumerate(self.bucket_ids):
            self._indices_of_bucket[bucket_id].append(index)
        # Per-process memory of broken files, so each is warned about once and not retried.
        self._broken_paths: set[str] = set()
        # How often each index was fetched in this process: with one fetch per epoch this is the epoch, and it
        # needs no set_epoch call, which persistent DataLoader workers (copies of the dataset) would never see.
        self._fetch_count: dict[int, int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        # Template choice follows (seed, index, draw): reproducible, and different from epoch to epoch. The trainer's
        # sampler passes (index, epoch), so a resumed run or any worker copy draws exactly what the original did;
        # a plain index counts this process's fetches instead.
        if isinstance(index, (tuple, list)):
            index, draw = int(index[0]), int(index[1])
        else:
            draw = self._fetch_count[index]
            self._fetch_count[index] += 1
        rng = random.Random(f"{self.seed}:{index}:{draw}")
        bucket_size = self.bucket.sizes[self.bucket_ids[index]]
        # Flip and crop draw from their own stream, so turning them on leaves prompts unchanged.
        image_rng = random.Random(f"{self.seed}:{index}:{draw}:image")
        item, (image, original_wh, crop_top_left), condition = self._load_or_substitute(index, bucket_size, rng,
                                                                                        image_rng)
        image_transform = self.image_transforms[item.source_index]
        frames = image if isinstance(image, list) else None  # a clip
        if image_transform.random_flip and image_rng.random() < 0.5:
            if frames is not None:
                frames = [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for frame in frames]
            else:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            condition = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in condition or []] or None
        convert = to_uint8_tensor if self.uint8_pixels else to_tensor
        pixels = torch.stack([convert(frame) for frame in frames], dim=1) if frames is not None else convert(image)
        # original_size (h, w) and crop_top_left (top, left): SDXL's size and crop conditioning. Plain ints, as the
        # noise seed: a loader worker hands each tensor over through its own shared-memory file and socket handshake
        # (~0.4 ms of the training process's time each), while ints travel in the batch's pickle.
        sample = {"pixel_values": pixels, "prompt": self._prompt(item, index, draw, rng),
                  "original_size": (original_wh[1], original_wh[0]), "crop_top_left": tuple(crop_top_left),
                  "noise_seed": noise_seed(self.seed, index, draw)}
        if condition is not None:  # the images an editing model starts from [K, 3, H, W], shaped as the target
            sample["condition_pixels"] = torch.stack([convert(image) for image in condition])
        return sample

    def sample_prompt(self, index: int, draw: int = 0) -> str:
        """The prompt item `index` gets on its `draw`-th fetch (no image decoded; substitutes ignored)."""
        rng = random.Random(f"{self.seed}:{index}:{draw}")
        return self._prompt(self.items[index], index, draw, rng)

    def _prompt(self, item: DataItem, index: int, draw: int, template_rng: random.Random) -> str:
        caption_rng = random.Random(f"{self.seed}:{index}:{draw}:caption")
        caption = self.caption_transforms[item.source_index].apply(item.caption, caption_rng)
        return self.prompt_builders[item.source_index].build(caption, template_rng)

    def _load_or_substitute(
        self, index: int, bucket_wh: tuple[int, int], rng: random.Random, image_rng: random.Random
    ) -> tuple[DataItem, tuple[Image.Image, tuple[int, int], tuple[int, int]], list[Image.Image] | None]:
        """The item's image (and condition images) shaped to its bucket, or, if a file does not decode, another item
        of the same bucket."""
        item = self.items[index]
        if item.path not in self._broken_paths:
            loaded = self._try_load(item, bucket_wh, image_rng)
            if loaded is not None:
                return item, *loaded
        candidates = list(self._indices_of_bucket[self.bucket_ids[index]])
        rng.shuffle(candidates)
        for candidate in candidates:
            substitute = self.items[candidate]
            if substitute.path in self._broken_paths:
                continue
            loaded = self._try_load(substitute, bucket_wh, image_rng)
            if loaded is not None:
                return substitute, *loaded
        width, height = bucket_wh
        raise DataError(f"No image of bucket {width}x{height} can be decoded (first broken file: '{item.path}').")

    def _try_load(
        self, item: DataItem, bucket_wh: tuple[int, int], image_rng: random.Random
    ) -> tuple[tuple[Image.Image, tuple[int, int], tuple[int, int]], list[Image.Image] | None] | None:
        crop = self.image_transforms[item.source_index].crop
        bg_color = self.bg_colors[item.source_index]
        if self.max_image_pixels is not None:
            allow_image_pixels(self.max_image_pixels)
        path = item.path
        try:
            # condition images are cut where their image is: the same resize, the same (random) window
            crop_state = image_rng.getstate()
            if item.clip is not None:  # a video: its frames, one window for all
                return load_clip_for_bucket(path, item.clip, bucket_wh, crop, image_rng), None
            loaded = load_for_bucket(path, bucket_wh, bg_color, crop, image_rng)
            if item.condition is None:
                return loaded, None
            conditions = []
            for path in item.condition:
                condition_rng = random.Random()
                condition_rng.setstate(crop_state)
                conditions.append(load_for_bucket(path, bucket_wh, bg_color, crop, condition_rng)[0])
            return loaded, conditions
        except IMAGE_READ_ERRORS as exc:
            self._broken_paths.add(item.path)
            logger.warning("Image '%s' cannot be decoded (%s); another image of its bucket is used instead.", path, exc)
            return None
