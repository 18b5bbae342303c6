"""The loaded parts of a base model, as one plain value."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from hcpdiff.families import PART_NAMES, Family
from hcpdiff.families.base import Expert, components_config_reader


@dataclass
class ModelParts:
    """Everything the trainer and visualizer need from one base model: its family and its loaded components."""

    family: Family
    components: dict[str, Any]  # diffusers folder name (unet / transformer, vae, text_encoder, tokenizer, ...) -> part
    noise_scheduler: Any  # the scheduler the family's objective trains with
    name_or_path: str  # as the user gave it
    # model_index.json's own settings, not its parts (FLUX.2 [klein]'s is_distilled); empty for a single file
    pipeline_settings: dict[str, Any] = field(default_factory=dict)
    # a model with denoising experts, trained one at a time: the one loaded in the denoiser's place (None: the model
    # has one denoiser, or every expert is loaded in its own folder's place, as a render loads them)
    expert: Expert | None = None
    # the other experts' folders -> a function loading one (from_pretrained), for renders
    expert_loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """`parts.unet`, `parts.text_encoder_2`, ...: a part of this model, None for a part its family lacks."""
        if name != "components" and name in PART_NAMES:
            return self.components.get(name)
        raise AttributeError(f"ModelParts has no attribute {name!r}")

    @property
    def denoiser(self) -> Any:
        """The U-Net or transformer."""
        return self.components[self.family.denoiser]

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers per side (8 for SD)."""
        return self.family.vae_scale_factor(components_config_reader(self.components))

    @property
    def pixel_step(self) -> int:
        """Image sides must be multiples of this (64 for SD)."""
        return self.family.pixel_step(components_config_reader(self.components))


@contextmanager
def render_components(parts: ModelParts, components: dict[str, Any], device: torch.device | str,
                      dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """`components` (the trainer's: the trained expert in the denoiser's place) as a render needs them: every expert in
    its own folder's place, the others loaded now (in `dtype` on `device`) and released when the block ends. A model
    with one denoiser renders with `components` as they are."""
    if parts.expert is None:
        yield components
        return
    others = {folder: load().to(device, dtype) for folder, load in parts.expert_loaders.items()}
    rendered = {**components, **others, parts.expert.folder: components[parts.family.denoiser]}
    try:
        yield rendered
    finally:
        others.clear()
        rendered.clear()
