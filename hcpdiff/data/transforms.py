"""Per-sample randomness: caption tag shuffle / keep / dropout, and image flip / crop choices."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hcpdiff.errors import ConfigError

CROP_MODES = ("center", "random")


@dataclass(frozen=True)
class CaptionTransform:
    """Acts on a comma-separated caption before the prompt template is filled."""

    tag_shuffle: bool = False  # shuffle the tags after the first keep_tokens
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped
    tag_dropout: float = 0.0  # each other tag is dropped with this probability
    caption_dropout: float = 0.0  # the whole caption is dropped (template alone) with this probability

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where` when a value is out of range."""
        if self.keep_tokens < 0:
            raise ConfigError(f"{where}.keep_tokens must be 0 or more, got {self.keep_tokens}.")
        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}.{name} must be a probability in [0, 1], got {value}.")

    @property
    def is_identity(self) -> bool:
        """True when apply() returns every caption unchanged."""
        return not self.tag_shuffle and self.tag_dropout == 0.0 and self.caption_dropout == 0.0

    def apply(self, caption: str | None, rng: random.Random) -> str | None:
        """The transformed caption; None when the caption is dropped or was None."""
        if caption is None or self.is_identity:
            return caption
        # Draws happen in a fixed order whatever the caption, so one rng stream stays reproducible.
        if self.caption_dropout > 0.0 and rng.random() < self.caption_dropout:
            return None
        tags = [tag.strip() for tag in caption.split(",")]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.tag_dropout > 0.0:
            rest = [tag for tag in rest if rng.random() >= self.tag_dropout]
        if self.tag_shuffle:
            rng.shuffle(rest)
        return ", ".join(kept + rest)


@dataclass(frozen=True)
class ImageTransform:
    """How an image is fitted to its bucket: crop position and an optional horizontal flip."""

    random_flip: bool = False  # mirror left-right with probability 0.5
    crop: str = "center"  # center | random: where the bucket-sized window is cut from the resized image

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where` when crop is not a known mode."""
        if self.crop not in CROP_MODES:
            raise ConfigError(f"{where}.crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}.")
