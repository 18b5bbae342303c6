"""Model families, one module each, and the registry that detects a model folder's family once.

Adding a family: write `hcpdiff/families/<name>.py` with a `Family` subclass and add it to FAMILIES (most specific
first: detection takes the first family whose `matches` accepts the folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hcpdiff.errors import ModelError
from hcpdiff.families.base import ConfigReader, Family
from hcpdiff.families.flux import Flux
from hcpdiff.families.flux2 import Flux2Dev, Flux2Klein
from hcpdiff.families.flux_kontext import FluxKontext
from hcpdiff.families.ideogram4 import Ideogram4
from hcpdiff.families.krea2 import Krea2
from hcpdiff.families.qwen_image import QwenImage
from hcpdiff.families.qwen_image_21 import QwenImage21
from hcpdiff.families.qwen_image_edit import QwenImageEdit
from hcpdiff.families.qwen_image_edit_plus import QwenImageEditPlus
from hcpdiff.families.sd import StableDiffusion
from hcpdiff.families.sd3 import StableDiffusion3
from hcpdiff.families.sdxl import StableDiffusionXL
from hcpdiff.families.wan import Wan
from hcpdiff.families.z_image import ZImage

# (the same order decides which family reads a webui / ComfyUI LoRA file: Qwen-Image 2.1's and Ideogram 4's names
# overlap Qwen-Image's and Z-Image's, so they are asked first)
FAMILIES: tuple[Family, ...] = (Flux(), StableDiffusion3(), StableDiffusionXL(), StableDiffusion(), QwenImage21(),
                                 QwenImage(), QwenImageEdit(), QwenImageEditPlus(), Ideogram4(), ZImage(),
                                 FluxKontext(), Flux2Klein(), Flux2Dev(), Krea2(), Wan())
# Every part name some family trains: config keys `lora_<part>` / `<part>:` are read for these before any model loads.
TRAINABLE_PARTS: tuple[str, ...] = tuple(dict.fromkeys(p for family in FAMILIES for p in family.trainable_parts))
PART_NAMES: tuple[str, ...] = tuple(dict.fromkeys(
    p for family in FAMILIES for p in (*family.required_folders, *family.tokenizers)))


def family_named(name: str) -> Family:
    """The registered family called `name`."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def tiny_variant_family(variant: str) -> Family:
    """The family that builds `make_tiny_model --family <variant>`."""
    for family in FAMILIES:
        if variant in family.tiny_variants:
            return family
    raise ModelError(f"unknown tiny model {variant!r}; known: {', '.join(tiny_variants())}")


def tiny_variants() -> list[str]:
    """Every `make_tiny_model --family` name."""
    return [variant for family in FAMILIES for variant in family.tiny_variants]


def folder_config_reader(folder: Path) -> ConfigReader:
    """Reads `<folder>/<part>/config.json` (or scheduler_config.json); None when the part has none."""
    def read(part: str) -> dict[str, Any] | None:
        for name in ("config.json", "scheduler_config.json"):
            path = folder / part / name
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
        return None
    return read


def hub_config_reader(source: str, common: dict[str, Any]) -> ConfigReader:
    """Reads a part's config.json through diffusers (a hub id or the hub cache); None when the part has none."""
    def read(part: str) -> dict[str, Any] | None:
        from diffusers import ModelMixin

        try:
            return dict(ModelMixin.load_config(source, subfolder=part, **common))
        except (OSError, ValueError):
            return None
    return read


def detect_family(index: dict[str, Any], read_config: ConfigReader, shown: str, where: str) -> Family:
    """The family of a diffusers model from its model_index.json and part configs; one error when none fits."""
    for family in FAMILIES:
        if family.matches(index, read_config):
            return family
    pipeline = index.get("_class_name", "no model_index.json")
    raise ModelError(f"{where}: '{shown}' ({pipeline}) is not a model family hcpdiff knows "
                     f"({', '.join(f.description for f in FAMILIES)}).")


__all__ = ["FAMILIES", "Family", "PART_NAMES", "TRAINABLE_PARTS", "detect_family",
           "family_named", "folder_config_reader", "hub_config_reader", "tiny_variant_family", "tiny_variants"]
