"""Aspect-ratio buckets: a few training sizes, and which images go to which size."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from hcpdiff.errors import DataError

_KMEANS_MAX_ITERS = 100


class Bucket:
    """A set of training sizes (width, height) and the bucket index of every image key."""

    def __init__(self, sizes: Sequence[tuple[int, int]], bucket_of: Mapping[str, int]) -> None:
        self.sizes: list[tuple[int, int]] = [(int(w), int(h)) for w, h in sizes]
        self.bucket_of: dict[str, int] = dict(bucket_of)
        # each bucket's clip length (a video family's datasets, see builders.split_by_frames); 1: images
        self.frames: list[int] = [1] * len(self.sizes)

    def size_of(self, key: str) -> tuple[int, int]:
        """The (width, height) an image is trained at."""
        return self.sizes[self.bucket_of[key]]

    def describe(self) -> list[str]:
        """One table row per bucket: size, aspect ratio, image count."""
        counts = Counter(self.bucket_of.values())
        clips = any(frames > 1 for frames in self.frames)
        rows = [f"{'size':^13}  {'w/h':>5}  " + ("frames  " if clips else "") + "images"]
        for index, (width, height) in enumerate(self.sizes):
            frames = f"{self.frames[index]:>6}  " if clips else ""
            rows.append(f"{width:>5} x {height:<5}  {width / height:>5.2f}  {frames}{counts.get(index, 0)}")
        return rows


class RatioBucket(Bucket):
    """Buckets of about `target_area` pixels whose aspect ratios follow the images'."""

    @classmethod
    def from_files(
        cls,
        target_area: int,
        num_bucket: int,
        step_size: int = 64,
        *,
        image_sizes: Mapping[str, tuple[int, int]],
    ) -> RatioBucket:
        """Cluster the images' log aspect ratios into at most `num_bucket` sizes (1-D k-means)."""
        _check_common(target_area, step_size, image_sizes)
        if int(num_bucket) < 1:
            raise DataError(f"RatioBucket num_bucket must be at least 1, got {num_bucket}.")
        keys = sorted(image_sizes)
        log_ratios = np.array([_log_ratio(image_sizes[key]) for key in keys])
        centers = _kmeans_1d(log_ratios, int(num_bucket))
        sizes = [_size_for_ratio(math.exp(c), target_area, step_size) for c in centers]
        return cls._assign(sizes, keys, log_ratios)

    @classmethod
    def from_ratios(
        cls,
        target_area: int,
        num_bucket: int,
        ratio_max: float = 4.0,
        step_size: int = 64,
        *,
        image_sizes: Mapping[str, tuple[int, int]],
    ) -> RatioBucket:
        """`num_bucket` sizes with log-spaced ratios in [1/ratio_max, ratio_max]; each image to the nearest."""
        _check_common(target_area, step_size, image_sizes)
        if int(num_bucket) < 1:
            raise DataError(f"RatioBucket num_bucket must be at least 1, got {num_bucket}.")
        if not ratio_max >= 1:
            raise DataError(f"RatioBucket ratio_max must be at least 1 (a width/height ratio), got {ratio_max}.")
        log_max = math.log(ratio_max)
        centers = np.linspace(-log_max, log_max, int(num_bucket)) if num_bucket > 1 else np.zeros(1)
        sizes = [_size_for_ratio(math.exp(c), target_area, step_size) for c in centers]
        keys = sorted(image_sizes)
        log_ratios = np.array([_log_ratio(image_sizes[key]) for key in keys])
        return cls._assign(sizes, keys, log_ratios)

    @classmethod
    def _assign(cls, sizes: list[tuple[int, int]], keys: list[str], log_ratios: np.ndarray) -> RatioBucket:
        # Rounding to the step can merge sizes and shift ratios, so images are assigned to the
        # rounded sizes, and buckets left empty are dropped.
        unique_sizes = sorted(set(sizes), key=lambda s: (s[0] / s[1], s[0]))
        size_log_ratios = np.array([_log_ratio(s) for s in unique_sizes])
        nearest = np.abs(log_ratios[:, None] - size_log_ratios[None, :]).argmin(axis=1)
        used = sorted(set(nearest.tolist()))
        new_index = {old: new for new, old in enumerate(used)}
        bucket_of = {key: new_index[int(b)] for key, b in zip(keys, nearest)}
        return cls([unique_sizes[i] for i in used], bucket_of)


class FixedBucket(Bucket):
    """One training size for every image."""

    def __init__(
        self,
        target_size: int | Sequence[int],
        step_size: int = 8,
        *,
        image_sizes: Mapping[str, tuple[int, int]],
    ) -> None:
        """`target_size`: an int (square) or [width, height], each a multiple of `step_size`."""
        _check_step_and_images(step_size, image_sizes)
        if isinstance(target_size, (int, np.integer)) and not isinstance(target_size, bool):
            width = height = int(target_size)
        elif isinstance(target_size, Sequence) and not isinstance(target_size, str) and len(target_size) == 2:
            width, height = (int(side) for side in target_size)
        else:
            raise DataError(f"FixedBucket target_size must be an int or [width, height], got {target_size!r}.")
        for side in (width, height):
            if side < step_size or side % step_size:
                lower = max(step_size, side // step_size * step_size)
                raise DataError(
                    f"FixedBucket target_size {width}x{height} must have sides that are multiples of the pixel step "
                    f"{step_size} (e.g. {lower} or {lower + step_size})."
                )
        super().__init__([(width, height)], {key: 0 for key in image_sizes})


class MaxPixelsBucket(Bucket):
    """Each image keeps its aspect ratio, scaled down only when above `max_pixels`; sides snapped down to the step."""

    def __init__(
        self,
        max_pixels: int,
        step_size: int = 64,
        *,
        image_sizes: Mapping[str, tuple[int, int]],
    ) -> None:
        """Images of the same resulting (width, height) share a bucket, so batches stay single-size."""
        _check_step_and_images(step_size, image_sizes)
        if not max_pixels >= step_size * step_size:
            raise DataError(
                f"MaxPixelsBucket max_pixels must be at least step_size^2 = {step_size * step_size}, got {max_pixels}."
            )
        size_of = {key: _capped_size(size_wh, max_pixels, step_size) for key, size_wh in image_sizes.items()}
        sizes = sorted(set(size_of.values()), key=lambda s: (s[0] / s[1], s[0]))
        index_of = {size: index for index, size in enumerate(sizes)}
        super().__init__(sizes, {key: index_of[size] for key, size in size_of.items()})


def _capped_size(size_wh: tuple[int, int], max_pixels: float, step_size: int) -> tuple[int, int]:
    width, height = size_wh
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return (
        max(step_size, math.floor(width * scale / step_size) * step_size),
        max(step_size, math.floor(height * scale / step_size) * step_size),
    )


def _check_step_and_images(step_size: int, image_sizes: Mapping[str, tuple[int, int]]) -> None:
    if int(step_size) < 1:
        raise DataError(f"Bucket step_size must be a positive number of pixels, got {step_size}.")
    if not image_sizes:
        raise DataError("A bucket needs at least one image, but image_sizes is empty.")
    for key, (width, height) in image_sizes.items():
        if width < 1 or height < 1:
            raise DataError(f"Image '{key}' has an invalid size {width}x{height}.")


def _check_common(target_area: int, step_size: int, image_sizes: Mapping[str, tuple[int, int]]) -> None:
    if not target_area > 0:
        raise DataError(f"RatioBucket target_area must be a positive number of pixels (e.g. 512*512), got {target_area}.")
    _check_step_and_images(step_size, image_sizes)


def _log_ratio(size_wh: tuple[int, int]) -> float:
    return math.log(size_wh[0] / size_wh[1])


def _kmeans_1d(values: np.ndarray, num_clusters: int) -> np.ndarray:
    """Lloyd's k-means on a 1-D array, started at quantiles of the distinct values (deterministic)."""
    distinct = np.unique(np.round(values, 9))
    num_clusters = min(num_clusters, len(distinct))
    if num_clusters == len(distinct):
        return distinct
    centers = np.quantile(distinct, np.linspace(0.0, 1.0, num_clusters))
    assignment = None
    for _ in range(_KMEANS_MAX_ITERS):
        new_assignment = np.abs(values[:, None] - centers[None, :]).argmin(axis=1)
        if assignment is not None and np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(num_clusters):
            members = values[assignment == cluster]
            if len(members):
                centers[cluster] = members.mean()
    used = np.unique(assignment)
    return centers[used]


def _size_for_ratio(ratio: float, target_area: float, step_size: int) -> tuple[int, int]:
    """The (w, h), multiples of step_size, closest to area `target_area` and width/height `ratio`."""
    exact_width = math.sqrt(target_area * ratio)
    exact_height = math.sqrt(target_area / ratio)

    def candidates(exact: float) -> set[int]:
        lower = max(step_size, math.floor(exact / step_size) * step_size)
        return {lower, lower + step_size}

    def cost(size_wh: tuple[int, int]) -> float:
        area_error = math.log(size_wh[0] * size_wh[1] / target_area)
        ratio_error = math.log(size_wh[0] / size_wh[1] / ratio)
        return area_error**2 + ratio_error**2

    options = [(w, h) for w in candidates(exact_width) for h in candidates(exact_height)]
    return min(sorted(options), key=cost)
