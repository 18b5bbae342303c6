"""Build one dataset (items, bucket, dataset, batch sampler) from its config node, e.g. `data.dataset1`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcpdiff.config import instantiate as config_instantiate
from hcpdiff.config import read_fields
from hcpdiff.data.buckets import Bucket
from hcpdiff.data.captions import IMAGE_EXTENSIONS, image_stem, load_captions
from hcpdiff.data.dataset import DataItem, ImageCaptionDataset
from hcpdiff.data.images import IMAGE_READ_ERRORS, read_image_size
from hcpdiff.data.prompts import PromptBuilder, load_templates
from hcpdiff.data.sampler import BucketBatchSampler
from hcpdiff.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class DatasetSpec:
    """One entry of `data:` (e.g. `data.dataset1`)."""

    source: dict  # source name -> SourceSpec fields
    bucket: dict  # a `_target_` node, built as a partial and called with image_sizes (and step_size)
    batch_size: int = 1
    loss_weight: float = 1.0


@dataclass
class SourceSpec:
    """One entry of `data.<dataset>.source`."""

    img_root: str | None  # required; None only so that `img_root: null` gets the DataError below
    caption_file: str | None = None  # a folder of .txt / a captions file, a .json/.yaml/.csv/.jsonl file, or null
    prompt_template: str | None = None  # a file of template lines; null means "{caption}"
    word_names: dict = field(default_factory=dict)  # placeholder -> word, e.g. {pt1: pt-cat1}
    repeat: int = 1  # each image appears this many times per epoch
    bg_color: list[int] = field(default_factory=lambda: [255, 255, 255])  # fills transparent pixels


@dataclass
class BuiltDataset:
    """What the trainer needs from one dataset."""

    dataset: ImageCaptionDataset
    batch_sampler: BucketBatchSampler
    batch_size: int
    loss_weight: float
    bucket: Bucket
    num_images: int  # distinct image files, before repeat

    def describe(self) -> list[str]:
        """Lines for the start-of-training report."""
        header = (
            f"{self.num_images} images, {len(self.dataset)} items, batch size {self.batch_size}, "
            f"{len(self.batch_sampler)} batches/epoch"
        )
        return [header, *self.bucket.describe()]


def build_dataset(
    node: Mapping[str, Any],
    key_path: str,
    *,
    pixel_step: int,
    seed: int,
    instantiate: Callable[[Any, str], Callable[..., Bucket]] | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> BuiltDataset:
    """Read the dataset node, scan its sources, bucket the images, and make the dataset and batch sampler."""
    spec = read_fields(node, key_path, DatasetSpec)
    if spec.batch_size < 1:
        raise ConfigError(f"{key_path}.batch_size must be at least 1, got {spec.batch_size}.")
    source_specs = _read_sources(spec.source, f"{key_path}.source")

    items: list[DataItem] = []
    image_sizes: dict[str, tuple[int, int]] = {}
    prompt_builders: list[PromptBuilder] = []
    bg_colors: list[tuple[int, int, int]] = []
    for source_index, (name, source) in enumerate(source_specs.items()):
        where = f"{key_path}.source.{name}"
        sizes = _scan_source(source, where)
        captions = load_captions(source.caption_file, source.img_root, where=f"{where}.caption_file")
        _warn_missing_captions(source, sizes, captions)
        for path, size_wh in sizes.items():
            key = f"{name}/{Path(path).name}"
            image_sizes[key] = size_wh
            caption = captions.get(image_stem(Path(path).name))
            item = DataItem(path=path, key=key, caption=caption, source_index=source_index)
            items.extend([item] * source.repeat)
        templates = load_templates(source.prompt_template, where=f"{where}.prompt_template")
        prompt_builders.append(PromptBuilder(templates, source.word_names))
        bg_colors.append(tuple(source.bg_color))

    bucket = _build_bucket(spec.bucket, f"{key_path}.bucket", image_sizes, pixel_step, instantiate)
    dataset = ImageCaptionDataset(items, bucket, prompt_builders, bg_colors, seed=seed)
    sampler = BucketBatchSampler(
        dataset.bucket_ids, spec.batch_size, seed=seed, shuffle=True, num_replicas=num_replicas, rank=rank
    )
    built = BuiltDataset(dataset, sampler, spec.batch_size, float(spec.loss_weight), bucket, len(image_sizes))
    for line in built.describe():
        logger.info("%s: %s", key_path, line)
    return built


def _read_sources(sources: Any, key_path: str) -> dict[str, SourceSpec]:
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(f"{key_path} must map source names to sources (each with an img_root).")
    specs = {}
    for name, source_node in sources.items():
        where = f"{key_path}.{name}"
        spec = read_fields(source_node, where, SourceSpec)
        if spec.img_root is None:
            raise DataError(f"{where}.img_root is not set; point it at the folder of training images.")
        if spec.repeat < 1:
            raise ConfigError(f"{where}.repeat must be at least 1, got {spec.repeat}.")
        if len(spec.bg_color) != 3 or not all(0 <= c <= 255 for c in spec.bg_color):
            raise ConfigError(f"{where}.bg_color must be three ints in 0..255 (an RGB color), got {spec.bg_color}.")
        specs[str(name)] = spec
    return specs


def _scan_source(source: SourceSpec, where: str) -> dict[str, tuple[int, int]]:
    """{image path: (w, h)} of the readable images directly in img_root, sorted by name."""
    img_root = Path(source.img_root)
    if not img_root.exists():
        raise DataError(f"{where}.img_root: folder '{source.img_root}' does not exist.")
    if not img_root.is_dir():
        raise DataError(f"{where}.img_root: '{source.img_root}' is not a folder.")
    image_paths = sorted(p for p in img_root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    sizes: dict[str, tuple[int, int]] = {}
    unreadable: list[str] = []
    for path in image_paths:
        try:
            sizes[str(path)] = read_image_size(path)
        except IMAGE_READ_ERRORS:
            unreadable.append(path.name)
    if unreadable:
        logger.warning(
            "%d image(s) in %s cannot be read and are skipped (%s).",
            len(unreadable), source.img_root, _first_names(unreadable),
        )
    if not sizes:
        raise DataError(
            f"{where}.img_root: folder '{source.img_root}' holds no readable images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return sizes


def _warn_missing_captions(source: SourceSpec, sizes: Mapping[str, tuple[int, int]], captions: Mapping[str, str]) -> None:
    if source.caption_file is None:
        return
    missing = [Path(path).name for path in sizes if image_stem(Path(path).name) not in captions]
    if missing:
        logger.warning(
            "%d of %d images in %s have no caption in %s (%s); they train on the template alone.",
            len(missing), len(sizes), source.img_root, source.caption_file, _first_names(missing),
        )


def _first_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _build_bucket(
    bucket_node: Any,
    key_path: str,
    image_sizes: dict[str, tuple[int, int]],
    pixel_step: int,
    instantiate: Callable[[Any, str], Callable[..., Bucket]] | None,
) -> Bucket:
    if not isinstance(bucket_node, Mapping) or "_target_" not in bucket_node:
        raise ConfigError(
            f"{key_path} must be a mapping with _target_ (e.g. hcpdiff.data.RatioBucket.from_files, target_area, num_bucket)."
        )
    # The bucket needs the images, which only exist here, so it is always built as a partial.
    partial_node = {**bucket_node, "_partial_": True}
    make_bucket = (instantiate or config_instantiate)(partial_node, key_path)
    kwargs: dict[str, Any] = {"image_sizes": image_sizes}
    if "step_size" not in bucket_node:
        kwargs["step_size"] = pixel_step
    target = bucket_node["_target_"]
    try:
        bucket = make_bucket(**kwargs)
    except DataError as exc:
        raise DataError(f"{key_path}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{key_path}: '{target}' cannot be called with {', '.join(kwargs)}: {exc}.") from exc
    if not isinstance(bucket, Bucket):
        raise ConfigError(f"{key_path}._target_ '{target}' did not build a bucket (got {type(bucket).__name__}).")
    off_step = [f"{w}x{h}" for w, h in bucket.sizes if w % pixel_step or h % pixel_step]
    if off_step:
        raise DataError(
            f"{key_path}: bucket size(s) {', '.join(off_step)} are not multiples of the model's pixel step {pixel_step}; "
            f"remove {key_path}.step_size or set it to a multiple of {pixel_step}."
        )
    return bucket

