"""Video reading with PyAV (`pip install av`; its wheels bundle FFmpeg): header sizes and frame counts for the data
scan, and clips of `num_frames` frames every `frame_stride` frames, each cover-resized and cropped as an image is."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from PIL import Image

from hcpdiff.data.images import UnusableImage, resize_and_crop_box

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")


@dataclass(frozen=True)
class ClipSpec:
    """How a source samples its videos: `num_frames` frames, one every `frame_stride` source frames, from the first."""

    num_frames: int
    frame_stride: int = 1

    @property
    def span(self) -> int:
        """Source frames a clip covers (a shorter video is skipped)."""
        return (self.num_frames - 1) * self.frame_stride + 1


def is_video(path: str | os.PathLike) -> bool:
    """Whether a file name is a video's (by its suffix)."""
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def _av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is a declared extra
        raise UnusableImage("PyAV is not installed (pip install av)") from err
    return av


def _decoded_frames(path: str | os.PathLike, count: int | None) -> tuple[list[Image.Image], tuple[int, int]]:
    """The first `count` frames (None: all) as RGB images, and the video's (w, h)."""
    av = _av()
    frames: list[Image.Image] = []
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise UnusableImage("no video stream")
        stream = container.streams.video[0]
        size_wh = (int(stream.codec_context.width), int(stream.codec_context.height))
        for frame in container.decode(stream):
            frames.append(frame.to_image().convert("RGB"))
            if count is not None and len(frames) >= count:
                break
    return frames, size_wh


def read_video_size(path: str | os.PathLike) -> tuple[int, int]:
    """A video's (w, h) from its stream header (no frame decoded)."""
    with _av().open(os.fspath(path)) as container:
        context = container.streams.video[0].codec_context
        return int(context.width), int(context.height)


def scan_video(path: str | os.PathLike, clip: ClipSpec) -> tuple[int, int]:
    """(w, h) of a video long enough for `clip`; UnusableImage (why, in a few words) for one that does not decode or
    is too short. Frames are decoded up to the clip's span, so a truncated file is caught here, once."""
    try:
        frames, size_wh = _decoded_frames(path, clip.span)
    except UnusableImage:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg's errors vary by container and codec; the file is skipped
        raise UnusableImage(f"cannot be decoded ({type(err).__name__}: {err})") from err
    if len(frames) < clip.span:
        raise UnusableImage(f"{len(frames)} frames, a clip of {clip.num_frames} every {clip.frame_stride} needs "
                            f"{clip.span}")
    if min(size_wh) < 1:
        raise UnusableImage("no frame size")
    return size_wh


def load_clip_for_bucket(
    path: str | os.PathLike,
    clip: ClipSpec,
    bucket_wh: tuple[int, int],
    crop: str = "center",
    rng: random.Random | None = None,
) -> tuple[list[Image.Image], tuple[int, int], tuple[int, int]]:
    """A clip's frames, each cover-resized and cropped to `bucket_wh` through the same window: (frames, original
    (w, h), crop window (top, left)). OSError when the video is shorter than the clip."""
    try:
        frames, size_wh = _decoded_frames(path, clip.span)
    except Exception as err:  # noqa: BLE001 - FFmpeg's errors vary; the dataset substitutes the item, as an image's
        raise OSError(f"cannot be decoded ({type(err).__name__}: {err})") from err
    if len(frames) < clip.span:
        raise OSError(f"{len(frames)} frames, the clip needs {clip.span}")
    picked = frames[:: clip.frame_stride][: clip.num_frames]
    state = rng.getstate() if rng is not None else None
    shaped, top_left = [], (0, 0)
    for frame in picked:
        if state is not None:
            rng.setstate(state)  # one window for every frame
        cropped, top_left = resize_and_crop_box(frame, bucket_wh, crop, rng)
        shaped.append(cropped)
    return shaped, size_wh, top_left
