"""Where training starts from: LoRAs fused into the base model (differential training) and LoRAs to continue."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hcpdiff.config import read_fields
from hcpdiff.errors import ConfigError
from hcpdiff.lora import load_lora, load_lora_into, merge_lora

logger = logging.getLogger("hcpdiff.train")


@dataclass
class PresetLora:
    """One entry of `model.preset_lora`: a native LoRA merged into the base weights before training."""

    path: str  # native LoRA file (convert webui files with hcpdiff.tools.lora_convert --from_webui)
    alpha: float = 1.0  # strength of the merge


def check_expert(metadata: dict[str, str], expert: str | None, where: str, path: str) -> None:
    """A denoiser LoRA of one denoising expert (its metadata's `expert`) fits that expert only: another than the run's
    `expert` (None: the model has one denoiser) is one ConfigError."""
    if metadata.get("expert", expert) != expert:
        trains = f"this run trains the {expert} expert" if expert else "this model has one denoiser"
        raise ConfigError(f"{where}: '{path}' is a LoRA of the {metadata['expert']} expert, and {trains} "
                          "(model.expert)")


def fuse_preset_loras(parts: Any, entries: list, where: str = "model.preset_lora") -> None:
    """Merge each preset LoRA into the part its file names (unet, text_encoder, ...) before adapters attach."""
    for i, node in enumerate(entries or []):
        preset = read_fields(node, f"{where}[{i}]", PresetLora)
        state, metadata = load_lora(preset.path)
        part = metadata.get("part", "unet")
        model = getattr(parts, part, None)
        if model is None:
            raise ConfigError(f"{where}[{i}].path: '{preset.path}' is a LoRA for '{part}', which this model lacks")
        if part == parts.family.denoiser:
            check_expert(metadata, parts.expert.name if parts.expert else None, f"{where}[{i}].path", preset.path)
        merge_lora(model, state, alpha_scale=preset.alpha, source=str(preset.path))
        logger.info("fused %s into the base %s at alpha %g", preset.path, part, preset.alpha)


def load_initial_loras(models: dict[str, Any], init_lora: dict, trained_parts: list[str],
                       where: str = "model.init_lora", denoiser: str | None = None, expert: str | None = None) -> None:
    """Start the attached adapters from saved LoRA weights: {part: native LoRA file} (layers must match); the
    `denoiser` part's file must be of the denoising `expert` it is (None: the model has one denoiser)."""
    for part, path in (init_lora or {}).items():
        if part not in trained_parts:
            raise ConfigError(f"{where}.{part}: no LoRA group trains '{part}'; trained parts: {', '.join(trained_parts)}")
        state, metadata = load_lora(path)
        if metadata.get("part", part) != part:
            raise ConfigError(f"{where}.{part}: '{path}' is a LoRA for '{metadata['part']}', not '{part}'")
        if part == denoiser:
            check_expert(metadata, expert, f"{where}.{part}", path)
        load_lora_into(models[part], state)
        logger.info("%s adapters start from %s", part, path)
