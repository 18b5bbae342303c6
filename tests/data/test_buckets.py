"""Aspect-ratio buckets: sizes on the step grid near the target area, nearest-ratio assignment, bad arguments."""

from __future__ import annotations

import math

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from hcpdiff.data import FixedBucket, RatioBucket
from hcpdiff.errors import DataError


def varied_sizes(count: int = 40, seed: int = 0) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ratios = np.exp(rng.uniform(math.log(1 / 3), math.log(3), size=count))
    return {f"img{i:03d}.png": (int(800 * math.sqrt(r)), int(800 / math.sqrt(r))) for i, r in enumerate(ratios)}


def log_ratio(size_wh: tuple[int, int]) -> float:
    return math.log(size_wh[0] / size_wh[1])


@pytest.mark.parametrize("target_area, step_size", [(512 * 768, 64), (512 * 512, 64), (768 * 768, 8), (256 * 256, 32)])
@pytest.mark.parametrize("num_bucket", [1, 3, 5, 8])
def test_sizes_on_step_grid_near_target_area(target_area, step_size, num_bucket):
    image_sizes = varied_sizes()
    bucket = RatioBucket.from_files(target_area, num_bucket, step_size, image_sizes=image_sizes)
    assert 1 <= len(bucket.sizes) <= num_bucket
    for width, height in bucket.sizes:
        assert width % step_size == 0 and height % step_size == 0
        assert width >= step_size and height >= step_size
        assert abs(width * height / target_area - 1) < 0.15


def test_num_bucket_reached_with_spread_ratios():
    bucket = RatioBucket.from_files(512 * 768, 5, 64, image_sizes=varied_sizes())
    assert len(bucket.sizes) == 5
    assert len(set(bucket.sizes)) == 5


def test_each_image_in_bucket_closest_in_log_ratio():
    image_sizes = varied_sizes(60, seed=3)
    bucket = RatioBucket.from_files(512 * 512, 4, 64, image_sizes=image_sizes)
    assert set(bucket.bucket_of) == set(image_sizes)
    bucket_log_ratios = np.array([log_ratio(s) for s in bucket.sizes])
    for key, size_wh in image_sizes.items():
        distances = np.abs(bucket_log_ratios - log_ratio(size_wh))
        assert distances[bucket.bucket_of[key]] == pytest.approx(distances.min())


def test_every_bucket_has_images_and_rows_describe_them():
    bucket = RatioBucket.from_files(512 * 512, 4, 64, image_sizes=varied_sizes())
    counts = np.bincount(list(bucket.bucket_of.values()), minlength=len(bucket.sizes))
    assert (counts > 0).all()
    rows = bucket.describe()
    assert len(rows) == len(bucket.sizes) + 1
    width, height = bucket.sizes[0]
    assert f"{width} x {height}" in rows[1] and rows[1].endswith(str(counts[0]))


def test_fewer_distinct_ratios_give_fewer_buckets():
    image_sizes = {"a": (100, 100), "b": (200, 200), "c": (200, 100), "d": (400, 200)}
    bucket = RatioBucket.from_files(512 * 512, 5, 64, image_sizes=image_sizes)
    assert sorted(bucket.sizes) == [(512, 512), (704, 384)]
    assert bucket.bucket_of["a"] == bucket.bucket_of["b"] and bucket.bucket_of["c"] == bucket.bucket_of["d"]


def test_num_bucket_above_image_count_is_clamped():
    image_sizes = {"a": (100, 150), "b": (150, 100)}
    bucket = RatioBucket.from_files(512 * 512, 10, 64, image_sizes=image_sizes)
    assert len(bucket.sizes) == 2
    assert bucket.size_of("a")[0] < bucket.size_of("a")[1] and bucket.size_of("b")[0] > bucket.size_of("b")[1]


def test_deterministic():
    first = RatioBucket.from_files(512 * 768, 5, 64, image_sizes=varied_sizes())
    second = RatioBucket.from_files(512 * 768, 5, 64, image_sizes=dict(reversed(list(varied_sizes().items()))))
    assert first.sizes == second.sizes and first.bucket_of == second.bucket_of


def test_from_ratios_spans_ratio_max():
    image_sizes = {"wide": (400, 100), "square": (100, 100), "tall": (100, 400)}
    bucket = RatioBucket.from_ratios(512 * 512, 5, ratio_max=4.0, step_size=64, image_sizes=image_sizes)
    wide_w, wide_h = bucket.size_of("wide")
    assert wide_w / wide_h > 3
    assert bucket.size_of("square") == (512, 512)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket.sizes)


def test_fixed_bucket():
    image_sizes = {"a": (100, 150), "b": (150, 100)}
    assert FixedBucket(512, image_sizes=image_sizes).sizes == [(512, 512)]
    fixed = FixedBucket([768, 512], 64, image_sizes=image_sizes)
    assert fixed.sizes == [(768, 512)] and fixed.bucket_of == {"a": 0, "b": 0}
    assert FixedBucket(OmegaConf.create([256, 128]), 64, image_sizes=image_sizes).sizes == [(256, 128)]


def test_fixed_bucket_off_step_is_refused_with_neighbours():
    with pytest.raises(DataError, match="multiples of the pixel step 64.*448 or 512"):
        FixedBucket(500, 64, image_sizes={"a": (1, 1)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_area=0, num_bucket=3), "target_area"),
        (dict(target_area=-5, num_bucket=3), "target_area"),
        (dict(target_area=4096, num_bucket=0), "num_bucket"),
        (dict(target_area=4096, num_bucket=3, step_size=0), "step_size"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        RatioBucket.from_files(**kwargs, image_sizes={"a": (10, 10)})


def test_empty_image_sizes():
    with pytest.raises(DataError, match="at least one image"):
        RatioBucket.from_files(4096, 2, image_sizes={})
    with pytest.raises(DataError, match="at least one image"):
        FixedBucket(64, image_sizes={})


def test_hydra_partial_target():
    node = {"_target_": "hcpdiff.data.RatioBucket.from_files", "_partial_": True, "target_area": 4096, "num_bucket": 2}
    bucket = hydra.utils.instantiate(node)(image_sizes={"a": (64, 64), "b": (128, 64)})
    assert isinstance(bucket, RatioBucket) and set(bucket.bucket_of) == {"a", "b"}
    fixed_node = {"_target_": "hcpdiff.data.FixedBucket", "_partial_": True, "target_size": [128, 64], "step_size": 64}
    assert hydra.utils.instantiate(fixed_node)(image_sizes={"a": (1, 1)}).sizes == [(128, 64)]
