"""Clips, for families that render video (`Family.renders_video`): the pipeline's renders, the `num_frames` setting,
and `.mp4` files written and read with PyAV (`pip install av`; its wheels bundle FFmpeg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hcpdiff.errors import ConfigError

CLIP_SUFFIX = ".mp4"


def pipeline_renders(output: Any) -> list[Any]:
    """A diffusers pipeline output's renders: its images (PIL), or a video pipeline's clips (each a list of PIL
    frames)."""
    return output.images if hasattr(output, "images") else list(output.frames)


def sampling_args(family: Any, args: dict[str, Any], key: str) -> dict[str, Any]:
    """The pipeline's keyword arguments for hcpdiff's sampling settings (`family.pipeline_call_args`); `num_frames`
    (the config's `key`) is a video family's and is refused, when set, for an image family."""
    args = dict(args)
    if not family.renders_video:
        if args.pop("num_frames", None) is not None:
            raise ConfigError(f"{key}: a {family.description} model renders images, not clips; remove num_frames")
    return family.pipeline_call_args(args)


def av_module() -> Any:
    """PyAV, or one ConfigError saying how to install it."""
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is a declared extra
        raise ConfigError("video files need PyAV: pip install av (or hcpdiff[video])") from err
    return av


def save_clip(frames: list[Image.Image], path: Path, fps: int, metadata: dict[str, str] | None = None) -> Path:
    """Write frames (PIL, one size) as an H.264 `.mp4` at `fps`, with `metadata` as the container's tags (an mp4
    keeps `title`, `comment`, `description`, ...); odd sides are cropped to even (yuv420p)."""
    av = av_module()
    width, height = frames[0].width // 2 * 2, frames[0].height // 2 * 2
    with av.open(str(path), "w") as container:
        for tag, value in (metadata or {}).items():
            container.metadata[tag] = value
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            array = np.asarray(frame.convert("RGB"))[:height, :width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
    return path


def read_clip_metadata(path: Path) -> dict[str, str]:
    """The container tags of a video file."""
    with av_module().open(str(path)) as container:
        return dict(container.metadata)


def frame_strip(frames: list[Image.Image]) -> np.ndarray:
    """The frames side by side as one image [H, W x F, 3] (uint8): a clip for TensorBoard's image tab."""
    return np.concatenate([np.asarray(frame.convert("RGB")) for frame in frames], axis=1)
