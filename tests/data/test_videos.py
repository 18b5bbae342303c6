"""Video rows in a dataset (a video family's): a metadata row names a `video` instead of an image; its frames are
decoded with PyAV, sampled with num_frames and a frame stride, bucketed on (width, height, frames); images in the same
dataset train as 1-frame clips; an undecodable or too short video is skipped and counted once, with its path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hcpdiff.data import build_dataset
from hcpdiff.errors import ConfigError
from hcpdiff.infer.video import save_clip

from data_helpers import write_image

KEY = "data.dataset1"
BUCKET = {"_target_": "hcpdiff.data.RatioBucket.from_files", "target_area": 64 * 48, "num_bucket": 1}


def moving_square(num: int, size_wh: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """Frames of a white square moving right on black, frame i's left edge at 4 i."""
    frames = []
    for i in range(num):
        pixels = np.zeros((size_wh[1], size_wh[0], 3), np.uint8)
        pixels[16:32, 4 * i:4 * i + 16] = 255
        frames.append(Image.fromarray(pixels))
    return frames


def write_video_dataset(root: Path) -> Path:
    """clip.mp4 (12 frames), short.mp4 (3 frames), broken.mp4 (not a video), still.png, and a metadata.jsonl naming
    them by `video` / `image` rows."""
    root.mkdir(parents=True, exist_ok=True)
    save_clip(moving_square(12), root / "clip.mp4", 16)
    save_clip(moving_square(3), root / "short.mp4", 16)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(200))
    write_image(root / "still.png", (64, 48))
    rows = [{"video": "clip.mp4", "text": "a moving square"}, {"video": "short.mp4", "text": "too short"},
            {"video": "broken.mp4", "text": "broken"}, {"image": "still.png", "text": "a still"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def node(root: Path, **source) -> dict:
    return {"batch_size": 1, "bucket": BUCKET,
            "source": {"data_source1": {"img_root": str(root), "caption_file": str(root / "metadata.jsonl"), **source}}}


def test_video_rows_train_as_clips_beside_images(tmp_path, caplog):
    root = write_video_dataset(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        built = build_dataset(node(root, num_frames=5, frame_stride=2), KEY, pixel_step=16, seed=0, frame_step=4)
    skipped = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(skipped) == 1 and "2 image(s)" in skipped[0]  # counted once, each with its path and why
    assert "broken.mp4: cannot be decoded" in skipped[0] and "short.mp4: 3 frames" in skipped[0]
    assert built.sources[0].unreadable == ["broken.mp4", "short.mp4"]
    assert sorted(built.bucket.frames) == [1, 5]  # (64 x 48, 1 frame) and (64 x 48, 5 frames)
    assert any("frames" in line for line in built.describe())
    samples = {built.dataset[i]["prompt"]: built.dataset[i] for i in range(len(built.dataset))}
    assert set(samples) == {"a moving square", "a still"}
    clip = samples["a moving square"]["pixel_values"]
    assert clip.shape == (3, 5, 48, 64) and samples["a still"]["pixel_values"].shape == (3, 48, 64)
    # frames 0, 2, 4, 6, 8: the square's left edge at 0, 8, 16, 24, 32 (H.264 is lossy: the brightest columns)
    lefts = [int(torch.nonzero(clip[0, f, 24] > 0).min()) for f in range(5)]
    assert all(abs(left - 8 * f) <= 1 for f, left in enumerate(lefts)), lefts
    for batch in built.batch_sampler:
        assert len({built.dataset.bucket_ids[i] for i in batch}) == 1


def test_clip_lengths_the_model_cannot_train_are_refused(tmp_path):
    root = write_video_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"^data.dataset1.source.data_source1.num_frames: 6 is not 4k \+ 1 .* use 5 "
                                          r"or 9$"):
        build_dataset(node(root, num_frames=6), KEY, pixel_step=16, seed=0, frame_step=4)
    with pytest.raises(ConfigError, match=r"num_frames: this model trains on images, not video clips"):
        build_dataset(node(root, num_frames=5), KEY, pixel_step=16, seed=0)
    with pytest.raises(ConfigError, match=r"^data.dataset1.source.data_source1: the captions name videos \(clip.mp4\); "
                                          r"set data.dataset1.source.data_source1.num_frames"):
        build_dataset(node(root), KEY, pixel_step=16, seed=0, frame_step=4)


def test_clip_latents_are_cached_on_disk_and_reused(tmp_path):
    """cache_latents with clips: each clip is encoded once as [3, F, H, W] (a stand-in encoder: the frames' channel
    mean, std 0), served as its latents, and found again by a second build."""
    from hcpdiff.data.latent_cache import LatentEncoder

    root = write_video_dataset(tmp_path / "data")
    calls = []

    def encode_dist(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(pixels.shape))
        mean = pixels.mean(dim=1, keepdim=True)
        return mean, torch.zeros_like(mean)

    cached_node = {**node(root, num_frames=5, frame_stride=2), "cache_latents": True,
                   "cache_dir": str(tmp_path / "cache")}
    encoder = LatentEncoder(encode_dist, "stand-in")
    built = build_dataset(cached_node, KEY, pixel_step=16, seed=0, frame_step=4, latent_encoder=encoder,
                          show_progress=False)
    assert sorted(calls, key=len) == [(1, 3, 48, 64), (1, 3, 5, 48, 64)]  # the image, the clip
    plain = build_dataset(node(root, num_frames=5, frame_stride=2), KEY, pixel_step=16, seed=0, frame_step=4)
    for index in range(len(built.dataset)):
        latents, pixels = built.dataset[index]["latents"], plain.dataset[index]["pixel_values"]
        assert torch.allclose(latents, pixels.mean(dim=0, keepdim=True))
    calls.clear()
    build_dataset(cached_node, KEY, pixel_step=16, seed=0, frame_step=4, latent_encoder=encoder, show_progress=False)
    assert calls == []  # every entry reused


def test_clip_area_scales_clip_buckets_down_and_leaves_images(tmp_path):
    root = write_video_dataset(tmp_path / "data")
    built = build_dataset({**node(root, num_frames=5, frame_stride=2), "clip_area": 64 * 48 * 5 // 4}, KEY,
                          pixel_step=16, seed=0, frame_step=4)
    assert sorted(zip(built.bucket.frames, built.bucket.sizes)) == [(1, (64, 48)), (5, (32, 16))]
    shapes = sorted(tuple(built.dataset[i]["pixel_values"].shape) for i in range(len(built.dataset)))
    assert shapes == [(3, 5, 16, 32), (3, 48, 64)]
