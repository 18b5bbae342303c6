"""Build one dataset (items, bucket, dataset, batch sampler) from its config node, e.g. `data.dataset1`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from hcpdiff.config import instantiate as config_instantiate
from hcpdiff.config import Bound, read_fields
from hcpdiff.data.buckets import Bucket
from hcpdiff.data.captions import (IMAGE_EXTENSIONS, Columns, image_key, image_stem, load_caption_entries,
                                   load_condition_entries)
from hcpdiff.data.class_images import read_generate
from hcpdiff.data.dataset import DataItem, ImageCaptionDataset
from hcpdiff.data.images import UnusableImage, scan_image
from hcpdiff.data.latent_cache import CachedLatentDataset, LatentEncoder, fill_latent_cache
from hcpdiff.data.prompts import PromptBuilder, load_templates
from hcpdiff.data.sampler import BucketBatchSampler
from hcpdiff.data.videos import VIDEO_EXTENSIONS, ClipSpec, is_video, scan_video
from hcpdiff.data.transforms import CaptionTransform, ImageTransform
from hcpdiff.errors import ConfigError, ConfigProblems, DataError
from hcpdiff.folders import make_folder

logger = logging.getLogger(__name__)


@dataclass
class DatasetSpec:
    """One entry of `data:` (e.g. `data.dataset1`)."""

    source: dict  # source name -> SourceSpec fields
    bucket: dict  # a `_target_` node, built as a partial and called with image_sizes (and step_size)
    batch_size: Annotated[int, Bound(ge=1)] = 1
    loss_weight: float = 1.0
    cache_latents: bool = False  # VAE-encode each image once (bucket size, crop, both flips) and train on stored latents
    cache_dir: str | None = None  # null: latent and text caches live in memory; a folder: on disk, reused across runs
    cache_text_embeds: bool | str = "auto"  # auto: cache prompt embeddings when prompts are fixed and no TE trains
    # prior preservation: {prompt, num, steps, ...} (class_images.GenerateSpec); the base model renders the images
    # its one source's img_root lacks before training, captioned with the prompt
    generate: dict | None = None
    # a video model's clips: the most pixels one clip holds (width x height x frames); a clip bucket above it is scaled
    # down (aspect kept, sides multiples of the pixel step); null: clips take their frames' bucket size
    clip_area: Annotated[int | None, Bound(ge=1)] = None


@dataclass
class SourceSpec:
    """One entry of `data.<dataset>.source`."""

    img_root: str | None  # required; None only so that `img_root: null` gets the DataError below
    caption_file: str | None = None  # a folder of .txt / a captions file, a .json/.yaml/.csv/.jsonl file, or null
    prompt_template: str | None = None  # a file of template lines; null means "{caption}"
    word_names: dict = field(default_factory=dict)  # placeholder -> word, e.g. {pt1: pt-cat1}
    # null: Pillow's decompression-bomb limit (179 million pixels); larger images are skipped with a warning
    max_image_pixels: Annotated[int | None, Bound(ge=1)] = None
    repeat: Annotated[int, Bound(ge=1)] = 1  # each image appears this many times per epoch
    bg_color: list[int] = field(default_factory=lambda: [255, 255, 255])  # fills transparent pixels
    tag_shuffle: bool = False  # shuffle the caption's comma-separated tags each time it is drawn
    keep_tokens: int = 0  # the first N tags stay in place (never shuffled or dropped)
    tag_dropout: float = 0.0  # drop each (not kept) tag with this probability
    caption_dropout: float = 0.0  # drop the whole caption with this probability (the template alone remains)
    image_column: str | None = None  # metadata column / key naming the image file; null: file_name or image
    caption_column: str | None = None  # metadata column / key holding the caption; null: text or prompt
    # metadata column / key naming each image's condition image (relative to img_root), e.g. `edit_image` for an
    # image-editing family: loaded, resized, cropped and flipped with its image; null: none
    condition_column: str | None = None
    random_flip: bool = False  # mirror images left-right with probability 0.5
    crop: str = "center"  # center | random: where the bucket-sized window is cut after resizing
    # a video family's videos (.mp4, .webm, .mov, .mkv, .avi in img_root, or a metadata `video` column): each trains
    # as a clip of num_frames frames (Wan: 4k + 1), one every frame_stride source frames from the first; shorter or
    # undecodable videos are skipped; images train as 1-frame clips
    num_frames: Annotated[int | None, Bound(ge=1)] = None
    frame_stride: Annotated[int, Bound(ge=1)] = 1


@dataclass
class SourceReport:
    """What scanning one source found (for logs and `inspect_data`)."""

    name: str
    img_root: str
    num_images: int
    num_captioned: int
    missing_captions: list[str]  # image names with no caption (only when a caption_file is set)
    unreadable: list[str]  # image names skipped: unreadable, truncated or over the pixel limit


@dataclass
class BuiltDataset:
    """What the trainer needs from one dataset."""

    dataset: ImageCaptionDataset | CachedLatentDataset  # cached: samples hold "latents" instead of "pixel_values"
    batch_sampler: BucketBatchSampler
    batch_size: int
    loss_weight: float
    bucket: Bucket
    num_images: int  # distinct image files, before repeat
    sources: list[SourceReport] = field(default_factory=list)
    num_upscaled: int = 0  # images smaller than their bucket size (they are upscaled)
    text_cache_prompts: set[str] | None = None  # every prompt the dataset can give, when its text embeddings are cached
    cache_dir: str | None = None  # the dataset's cache_dir: its latent and text-cache entries live there (None: memory)

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
    latent_encoder: LatentEncoder | None = None,
    barrier: Callable[[], None] | None = None,
    show_progress: bool = True,
    text_encoder_trained: bool = False,
    max_conditions: int | None = None,
    frame_step: int = 0,
    uint8_pixels: bool = False,
) -> BuiltDataset:
    """Read the dataset node, scan its sources, bucket the images, and make the dataset and batch sampler.

    With `latent_encoder` (the trainer's VAE) and `cache_latents: true`, the dataset is served from the latent
    cache, filled here; `barrier` lets the processes of a distributed run share a disk cache. `max_conditions`: the
    most input images one sample may have (the model family's); rows with more are skipped with the others.
    `frame_step`: a video family's frames per latent frame (clips are frame_step k + 1 long); 0: no video training.
    `uint8_pixels`: samples hold the images' uint8 pixels (the trainer converts them on its device).
    """
    spec = read_fields(node, key_path, DatasetSpec)
    source_specs = _read_sources(spec.source, f"{key_path}.source")
    if read_generate(node, key_path) is not None:  # the generated images' captions: <stem>.txt beside each
        for source in source_specs.values():
            source.caption_file = source.caption_file or source.img_root
    cache_text = _text_cache_wanted(spec.cache_text_embeds, source_specs, key_path, text_encoder_trained)

    items: list[DataItem] = []
    image_sizes: dict[str, tuple[int, int]] = {}
    prompt_builders: list[PromptBuilder] = []
    bg_colors: list[tuple[int, int, int]] = []
    reports: list[SourceReport] = []
    for source_index, (name, source) in enumerate(source_specs.items()):
        where = f"{key_path}.source.{name}"
        columns = Columns(source.image_column, source.caption_column)
        entries = load_caption_entries(source.caption_file, source.img_root, f"{where}.caption_file", columns)
        clip = _clip_spec(source, where, frame_step)
        sizes, unreadable = _scan_source(source, where, entries, clip)
        captions_by_key = {image_key(entry): caption for entry, caption in entries.items()}
        captions_by_stem = {image_stem(entry): caption for entry, caption in entries.items()}
        conditions = _condition_images(source, where, sizes, max_conditions)
        missing: list[str] = []
        for path, size_wh in sizes.items():
            relative = Path(path).relative_to(source.img_root).as_posix()
            if conditions is not None and path not in conditions:
                continue  # no usable condition image: warned about once
            key = f"{name}/{relative}"
            image_sizes[key] = size_wh
            caption = captions_by_key.get(image_key(relative))
            if caption is None and "/" not in relative:
                caption = captions_by_stem.get(image_stem(relative))
            if caption is None:
                missing.append(relative)
            item = DataItem(path=path, key=key, caption=caption, source_index=source_index,
                            condition=None if conditions is None else conditions[path],
                            clip=clip if is_video(path) else None)
            items.extend([item] * source.repeat)
        if source.caption_file is None:
            missing = []
        _warn_missing_captions(source, len(sizes), missing)
        reports.append(SourceReport(name, source.img_root, len(sizes), len(sizes) - len(missing), missing, unreadable))
        templates = load_templates(source.prompt_template, where=f"{where}.prompt_template")
        prompt_builders.append(PromptBuilder(templates, source.word_names))
        bg_colors.append(tuple(source.bg_color))

    counts = sorted({len(item.condition) for item in items if item.condition is not None})
    if len(counts) > 1 and spec.batch_size > 1:  # a batch's input images join one sequence: as many for each sample
        raise ConfigError(f"{key_path}.batch_size: rows have {counts[0]} to {counts[-1]} input images, and a batch "
                          "needs as many for every sample; set batch_size: 1 or give every row the same number")
    bucket = _build_bucket(spec.bucket, f"{key_path}.bucket", image_sizes, pixel_step, instantiate)
    if any(item.clip is not None for item in items):  # a batch is one (width, height, frames)
        bucket = split_by_frames(bucket, {item.key: item.clip.num_frames if item.clip else 1 for item in items},
                                 spec.clip_area, pixel_step)
    num_upscaled = _warn_upscaled(image_sizes, bucket, key_path)
    limits = [s.max_image_pixels for s in source_specs.values() if s.max_image_pixels is not None]
    dataset = ImageCaptionDataset(
        items, bucket, prompt_builders, bg_colors, seed=seed, max_image_pixels=max(limits, default=None),
        caption_transforms=[_caption_transform(s) for s in source_specs.values()],
        image_transforms=[ImageTransform(s.random_flip, s.crop) for s in source_specs.values()],
        uint8_pixels=uint8_pixels,
    )
    sampler = BucketBatchSampler(
        dataset.bucket_ids, spec.batch_size, seed=seed, shuffle=True, num_replicas=num_replicas, rank=rank
    )
    served: ImageCaptionDataset | CachedLatentDataset = dataset
    if latent_encoder is not None and _latent_cache_allowed(spec, source_specs, key_path):
        if spec.cache_dir:  # made here so a folder the disk refuses is named by its key
            make_folder(spec.cache_dir, f"{key_path}.cache_dir")
        served, report = fill_latent_cache(
            dataset, latent_encoder, spec.cache_dir, num_replicas=num_replicas, rank=rank, barrier=barrier,
            show_progress=show_progress, desc=f"{key_path}: cache latents",
        )
        where = f"in {spec.cache_dir}" if spec.cache_dir else "in memory"
        logger.info("%s: latent cache %s: %d encoded, %d reused", key_path, where, report.encoded, report.reused)
    built = BuiltDataset(
        served, sampler, spec.batch_size, float(spec.loss_weight), bucket, len(image_sizes), reports, num_upscaled
    )
    built.cache_dir = spec.cache_dir
    if cache_text:
        built.text_cache_prompts = {dataset.sample_prompt(index) for index in range(len(dataset))}
    for line in built.describe():
        logger.info("%s: %s", key_path, line)
    return built


def _latent_cache_allowed(spec: DatasetSpec, sources: Mapping[str, SourceSpec], key_path: str) -> bool:
    """cache_latents, unless a source crops at random (a random window cannot be encoded ahead): one warning."""
    if not spec.cache_latents:
        return False
    conditioned = [name for name, source in sources.items() if source.condition_column is not None]
    if conditioned:
        logger.warning("%s.cache_latents is off: %s.source.%s has condition images, which are encoded with their "
                       "image every step.", key_path, key_path, conditioned[0])
        return False
    random_crops = [name for name, source in sources.items() if source.crop == "random"]
    if random_crops:
        logger.warning("%s.cache_latents is off: %s.source.%s.crop is random, and random crops cannot be cached.",
                       key_path, key_path, random_crops[0])
        return False
    return True


def _text_cache_wanted(
    setting: bool | str, sources: Mapping[str, SourceSpec], key_path: str, text_encoder_trained: bool
) -> bool:
    """Resolve cache_text_embeds (auto | true | false): on when every prompt is a fixed function of its image."""
    where = f"{key_path}.cache_text_embeds"
    if isinstance(setting, str) and setting != "auto":
        raise ConfigError(f"{where} must be auto, true or false, got {setting!r}.")
    if setting is False:
        return False
    reasons = []
    if text_encoder_trained:
        reasons.append("a text-encoder LoRA trains (lora_text_encoder), so embeddings change every step")
    for name, source in sources.items():
        if source.tag_shuffle or source.tag_dropout or source.caption_dropout:
            reasons.append(f"{key_path}.source.{name} draws captions at random (tag_shuffle / tag_dropout / "
                           "caption_dropout)")
        elif source.prompt_template is not None and len(load_templates(source.prompt_template, f"{key_path}.source.{name}.prompt_template")) > 1:
            reasons.append(f"{key_path}.source.{name}.prompt_template has several lines, one is drawn at random")
    if setting is True and reasons:
        raise ConfigError(f"{where} is true but cannot be: {reasons[0]}; set it to auto or false.")
    return not reasons


def check_dataset_fields(node: Any, key_path: str, problems: ConfigProblems) -> None:
    """Read a dataset's and its sources' fields only (no file is touched), so their errors join the trainer's others."""
    spec = problems.collect(read_fields, node, key_path, DatasetSpec)
    if spec is not None and isinstance(spec.source, Mapping):
        for name, source_node in spec.source.items():
            problems.collect(read_fields, source_node, f"{key_path}.source.{name}", SourceSpec)
        problems.collect(read_generate, node, key_path)


def _read_sources(sources: Any, key_path: str) -> dict[str, SourceSpec]:
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(f"{key_path} must map source names to sources (each with an img_root).")
    specs = {}
    for name, source_node in sources.items():
        where = f"{key_path}.{name}"
        spec = read_fields(source_node, where, SourceSpec)
        if spec.img_root is None:
            raise DataError(f"{where}.img_root is not set; point it at the folder of training images.")
        if len(spec.bg_color) != 3 or not all(0 <= c <= 255 for c in spec.bg_color):
            raise ConfigError(f"{where}.bg_color must be three ints in 0..255 (an RGB color), got {spec.bg_color}.")
        _caption_transform(spec).check(where)
        ImageTransform(spec.random_flip, spec.crop).check(where)
        specs[str(name)] = spec
    return specs


def _caption_transform(spec: SourceSpec) -> CaptionTransform:
    return CaptionTransform(spec.tag_shuffle, spec.keep_tokens, float(spec.tag_dropout), float(spec.caption_dropout))


def _clip_spec(source: SourceSpec, where: str, frame_step: int) -> ClipSpec | None:
    """How the source's videos are sampled (None: it takes none, its videos are not scanned); a num_frames the
    family cannot train (not frame_step k + 1, or set for an image family) is one ConfigError."""
    if source.num_frames is None:
        return None
    if frame_step <= 0:
        raise ConfigError(f"{where}.num_frames: this model trains on images, not video clips; remove num_frames")
    if (source.num_frames - 1) % frame_step:
        lower = (source.num_frames - 1) // frame_step * frame_step + 1
        raise ConfigError(f"{where}.num_frames: {source.num_frames} is not {frame_step}k + 1 (the VAE encodes a first "
                          f"frame, then groups of {frame_step}); use {lower} or {lower + frame_step}")
    return ClipSpec(source.num_frames, source.frame_stride)


def split_by_frames(bucket: Bucket, frames_of: Mapping[str, int], clip_area: int | None = None,
                    step: int = 1) -> Bucket:
    """The bucket with each size split by clip length, so every batch has one (width, height, frames); the result's
    `frames[i]` is bucket i's clip length (1: images). With `clip_area`, a clip's size is scaled down until width x
    height x frames fits it (sides multiples of `step`, at least one step)."""
    groups = sorted({(bucket.bucket_of[key], frames_of.get(key, 1)) for key in bucket.bucket_of})
    index_of = {group: index for index, group in enumerate(groups)}

    def size_of(size: int, frames: int) -> tuple[int, int]:
        width, height = bucket.sizes[size]
        if clip_area is None or frames == 1 or width * height * frames <= clip_area:
            return width, height
        scale = math.sqrt(clip_area / (width * height * frames))
        return (max(step, math.floor(width * scale / step) * step), max(step, math.floor(height * scale / step) * step))

    split = Bucket([size_of(size, frames) for size, frames in groups],
                   {key: index_of[(size, frames_of.get(key, 1))] for key, size in bucket.bucket_of.items()})
    split.frames = [frames for _, frames in groups]
    return split


def _scan_source(
    source: SourceSpec, where: str, entries: Mapping[str, str], clip: ClipSpec | None = None
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{image path: (w, h)} of the readable images in img_root (plus those in subfolders the captions name), with
    `clip` its videos long enough for one, and the names of unreadable (or too short) ones."""
    img_root = Path(source.img_root)
    if not img_root.exists():
        raise DataError(f"{where}.img_root: folder '{source.img_root}' does not exist.")
    if not img_root.is_dir():
        raise DataError(f"{where}.img_root: '{source.img_root}' is not a folder.")
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if clip is not None else ())
    image_paths = {p for p in img_root.iterdir() if p.is_file() and p.suffix.lower() in extensions}
    # Metadata tables (DiffSynth's metadata.csv) may name images in subfolders by relative path.
    for entry in entries:
        if "/" in entry and Path(entry).suffix.lower() in extensions and (img_root / entry).is_file():
            image_paths.add(img_root / entry)
    if clip is None and (videos := [e for e in entries if is_video(e)]):
        raise ConfigError(f"{where}: the captions name videos ({videos[0]}); set {where}.num_frames to train them "
                          "as clips (a video model only)")
    sizes: dict[str, tuple[int, int]] = {}
    reasons: dict[str, str] = {}  # skipped image name -> why
    for path in sorted(image_paths):
        try:
            sizes[str(path)] = (scan_video(path, clip) if clip is not None and is_video(path)
                                else scan_image(path, source.max_image_pixels))
        except UnusableImage as err:  # skipped here, once: not counted, never substituted epoch after epoch
            reasons[path.relative_to(img_root).as_posix()] = str(err)
    unreadable = list(reasons)
    if unreadable:
        shown = "; ".join(f"{name}: {reason}" for name, reason in list(reasons.items())[:3])
        too_large = any("pixels" in reason for reason in reasons.values())
        hint = f"; to use larger images, set {where}.max_image_pixels (pixels per image)" if too_large else ""
        logger.warning("%d image(s) in %s cannot be read and are skipped (%s%s)%s.", len(unreadable),
                       source.img_root, shown, "; ..." if len(reasons) > 3 else "", hint)
    if not sizes:
        raise DataError(
            f"{where}.img_root: folder '{source.img_root}' holds no readable images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return sizes, unreadable


def _condition_images(source: SourceSpec, where: str, sizes: Mapping[str, tuple[int, int]],
                      max_conditions: int | None) -> dict[str, tuple[str, ...]] | None:
    """{image path: its input images' paths} for a source with a condition_column (None without one). Images whose
    row names no input image, one that is missing or unreadable, or more than `max_conditions` are left out with
    one warning."""
    if source.condition_column is None:
        return None
    key = f"{where}.condition_column"
    if source.caption_file is None:
        raise ConfigError(f"{key}: condition images are named in a metadata table; set {where}.caption_file to a "
                          f".csv, .json or .jsonl file with an image column and a '{source.condition_column}' column")
    columns = Columns(source.image_column, source.condition_column, caption_key="condition_column")
    named = load_condition_entries(source.caption_file, source.img_root, key, columns)
    img_root = Path(source.img_root)
    # condition images beside their targets (DiffSynth's layout) are inputs, not training images of their own
    inputs = {image_key(Path(value).as_posix()) for values in named.values() for value in values}
    conditions: dict[str, tuple[str, ...]] = {}
    skipped: dict[str, str] = {}  # image name -> why
    for path in sizes:
        relative = Path(path).relative_to(img_root).as_posix()
        names = named.get(image_key(relative))
        if names is None:
            if image_key(relative) not in inputs:
                skipped[relative] = f"no {source.condition_column}"
            continue
        if max_conditions is not None and len(names) > max_conditions:
            skipped[relative] = f"{len(names)} input images, the model takes at most {max_conditions}"
            continue
        problem = next((why for why in map(lambda name: _unusable(img_root / name, name, source), names) if why), None)
        if problem:
            skipped[relative] = problem
            continue
        conditions[path] = tuple(str(img_root / name) for name in names)
    if skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:3])
        logger.warning("%d image(s) in %s have no usable condition image and are skipped (%s%s).", len(skipped),
                       source.img_root, shown, "; ..." if len(skipped) > 3 else "")
    if not conditions:
        raise DataError(f"{key}: no image in '{source.img_root}' has a usable '{source.condition_column}' image "
                        f"in {source.caption_file}")
    return conditions


def _unusable(path: Path, name: str, source: SourceSpec) -> str | None:
    """Why an input image cannot be used (None: it can)."""
    if not path.is_file():
        return f"{name} does not exist"
    try:
        scan_image(path, source.max_image_pixels)
    except UnusableImage as err:
        return f"{name}: {err}"
    return None


def _warn_missing_captions(source: SourceSpec, num_images: int, missing: list[str]) -> None:
    if missing:
        logger.warning(
            "%d of %d images in %s have no caption in %s (%s); they train on the template alone.",
            len(missing), num_images, source.img_root, source.caption_file, _first_names(missing),
        )


def _warn_upscaled(image_sizes: Mapping[str, tuple[int, int]], bucket: Bucket, key_path: str) -> int:
    """Count (and warn once about) images smaller than their bucket size, which are upscaled."""
    small = [key for key, (w, h) in image_sizes.items() if w < bucket.size_of(key)[0] or h < bucket.size_of(key)[1]]
    if small:
        logger.warning(
            "%s: %d of %d images are smaller than their bucket size and will be upscaled (%s).",
            key_path, len(small), len(image_sizes), _first_names(small),
        )
    return len(small)


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

