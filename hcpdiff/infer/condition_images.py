"""An editing model's input images for renders: the visualizer's `condition_image`, the previewer's
`condition_images`, one path for every prompt or one per prompt, checked against what the model's family takes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from hcpdiff.errors import ConfigError


def condition_images_for(family: Any, paths: list[Any], num_prompts: int, key: str
                         ) -> list[list[Image.Image]] | None:
    """Each prompt's input images (RGB, upright; an entry of `paths` is one path or, for a family taking several,
    a list of them), or None for a family that takes none; one ConfigError naming `key` when images are missing, not
    wanted, not one entry per prompt, too many, or unreadable."""
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

    entries = []
    for entry in paths:
        names = [entry] if isinstance(entry, str) else list(entry)
        if not 1 <= len(names) <= family.condition_images:
            raise ConfigError(f"{key}: a {family.description} model takes 1 to {family.condition_images} input "
                              f"image(s) per prompt, not {len(names)}")
        images = []
        for path in names:
            if not Path(path).is_file():
                raise ConfigError(f"{key}: image file '{path}' does not exist")
            try:
                images.append(load_image(path))
            except IMAGE_READ_ERRORS as err:
                raise ConfigError(f"{key}: '{path}' is not a readable image ({err})") from err
        entries.append(images)
    return entries * num_prompts if len(entries) == 1 else entries


def path_list(value: Any) -> list[Any]:
    """A config value naming images (null, a path, or a list whose entries are paths or lists of paths) as a
    list of entries."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [entry if isinstance(entry, str) else [str(path) for path in entry] for entry in value]


def control_images_for(paths: list[Any], num_prompts: int, width: int, height: int, key: str) -> list[Image.Image]:
    """Each prompt's ControlNet control image (one path for every prompt, or one per prompt), resized to cover
    width x height and center-cropped, as the training images and their control images are; one ConfigError naming
    `key` for a missing, unreadable or miscounted one."""
    if len(paths) not in (1, num_prompts) or not all(isinstance(path, str) for path in paths):
        raise ConfigError(f"{key}: give one control image path for every prompt or one per prompt ({num_prompts})")
    images = [control_image(path, width, height, key) for path in paths]
    return images * num_prompts if len(images) == 1 else images


def control_image(path: str, width: int, height: int, key: str) -> Image.Image:
    """One control image, resized to cover width x height and center-cropped (the webui's "crop and resize")."""
    from hcpdiff.data.images import IMAGE_READ_ERRORS, load_image, resize_and_crop

    if not Path(path).is_file():
        raise ConfigError(f"{key}: image file '{path}' does not exist")
    try:
        return resize_and_crop(load_image(path), (width, height))
    except IMAGE_READ_ERRORS as err:
        raise ConfigError(f"{key}: '{path}' is not a readable image ({err})") from err
