"""An editing model's input images for renders: the visualizer's `condition_image`, the previewer's
`condition_images`, one path for every prompt or one per prompt, checked against what the model's family takes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from hcpdiff.errors import ConfigError


def condition_images_for(family: Any, paths: list[str], num_prompts: int, key: str) -> list[Image.Image] | None:
    """One input image per prompt (RGB, upright), or None for a family that takes none; one ConfigError naming
    `key` when images are missing, not wanted, not one per prompt, or unreadable."""
    if not family.condition_images:
        if paths:
            raise ConfigError(f"{key}: a {family.description} model takes no input image; remove it")
        return None
    if not paths:
        raise ConfigError(f"{key}: a {family.description} model edits an input image; give its path")
    if len(paths) not in (1, num_prompts):
        raise ConfigError(f"{key}: give one image for every prompt or one per prompt ({num_prompts}), not "
                          f"{len(paths)}")
    from hcpdiff.data.images import IMAGE_READ_ERRORS, load_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{key}: image file '{path}' does not exist")
        try:
            images.append(load_image(path))
        except IMAGE_READ_ERRORS as err:
            raise ConfigError(f"{key}: '{path}' is not a readable image ({err})") from err
    return images * num_prompts if len(images) == 1 else images


def path_list(value: Any) -> list[str]:
    """A config value naming images (null, a path, or a list of paths) as a list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(path) for path in value]
