"""ControlNets: the one a run trains (`model.controlnet`), its checkpoints as diffusers folders, and the ones the
visualizer renders with (`controlnet:`).

A ControlNet is a model part like the U-Net (`controlnet` in ModelParts.components): `controlnet:` groups train it
fully, `lora_controlnet` groups put LoRA on it, and its checkpoints are `ckpts/controlnet-<step>.safetensors`. Those
checkpoints name the ControlNet they started from (`controlnet_base` metadata: a diffusers folder) and its config,
so `load_controlnet` rebuilds the trained ControlNet from the file alone (the starting weights of a new one, or of
one read from a file, are written to `<exp_dir>/controlnet-init/` by the trainer).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from hcpdiff.errors import ConfigError, ModelError

FROM_UNET = "unet"  # `model.controlnet: unet`: a new ControlNet from the U-Net's weights
NEW = "new"  # `model.controlnet: new`: a new ControlNet of the U-Net's architecture, randomly initialised
INIT_FOLDER = "controlnet-init"  # a new ControlNet's starting weights, in the experiment folder


def new_or_loaded_controlnet(value: str, family: Any, components: dict[str, Any], key: str) -> torch.nn.Module:
    """`model.controlnet`: `unet` (a new ControlNet from the U-Net's weights: diffusers' ControlNetModel.from_unet),
    `new` (the U-Net's architecture, random weights; its zero convolutions start at zero either way) or a ControlNet
    to continue (a diffusers folder, an original-layout single file or a hcpdiff checkpoint)."""
    if not family.takes_controlnet:
        raise ConfigError(f"{key}: a {family.description} model takes no ControlNet here (SD and SDXL do); remove it")
    if value in (FROM_UNET, NEW):
        from diffusers import ControlNetModel

        return ControlNetModel.from_unet(components[family.denoiser], load_weights_from_unet=value == FROM_UNET)
    return load_controlnet(value, key)


def load_controlnet(path: str, key: str) -> torch.nn.Module:
    """A ControlNet (fp32) from a diffusers folder (ControlNetModel.from_pretrained), a hcpdiff checkpoint
    (`controlnet-<step>.safetensors`: its base with the trained tensors and LoRA merged) or an original-layout single
    file (from_single_file); one ModelError naming `key` when it is none of them."""
    from diffusers import ControlNetModel

    local = Path(os.path.expanduser(path))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{key}: '{path}' has no config.json; expected a diffusers ControlNet folder")
        return ControlNetModel.from_pretrained(str(local), local_files_only=True)
    if not local.is_file():
        raise ModelError(f"{key}: '{path}' was not found (expected a ControlNet folder, a .safetensors file or "
                         f"'{FROM_UNET}' for a new one from the U-Net's weights, '{NEW}' for a random one)")
    metadata = safetensors_metadata(local)
    if metadata.get("part") == "controlnet" and "controlnet_config" in metadata:
        return controlnet_of_checkpoint(local, metadata, key)
    try:
        return ControlNetModel.from_single_file(str(local))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{key}: '{path}' is neither a hcpdiff ControlNet checkpoint nor a ControlNet single file "
                         f"({reason})") from err


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata (empty for another file type)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as opened:
            return dict(opened.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def controlnet_of_checkpoint(path: Path, metadata: dict[str, str], key: str) -> torch.nn.Module:
    """A trained ControlNet from a hcpdiff checkpoint: its base (`controlnet_base`, or the config alone when the file
    holds every tensor), the fully trained tensors put in, the LoRA merged."""
    from diffusers import ControlNetModel

    from hcpdiff.lora import load_checkpoint, merge_lora

    lora, full, _ = load_checkpoint(path)
    base = metadata.get("controlnet_base") or ""
    if base and Path(base).is_dir():
        model = ControlNetModel.from_pretrained(base, local_files_only=True)
    else:
        model = ControlNetModel.from_config(json.loads(metadata["controlnet_config"]))
        missing = sorted(set(model.state_dict()) - set(full))
        if missing:
            raise ModelError(f"{key}: '{path}' holds {len(full)} of the ControlNet's {len(model.state_dict())} "
                             f"tensors and its base '{base}' (controlnet_base) is not a folder here; the missing "
                             f"ones start with {missing[0]}")
    result = model.load_state_dict(full, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"{key}: '{path}': tensor '{result.unexpected_keys[0]}' names no parameter of the ControlNet")
    if lora:
        merge_lora(model, lora, source=str(path))
    return model


def checkpoint_metadata(part: str, module: torch.nn.Module, base: str | None) -> dict[str, str]:
    """What a ControlNet checkpoint adds to its metadata: the ControlNet's config and the folder it started from,
    so it can be rebuilt from the file alone; nothing for another part."""
    if part != "controlnet":
        return {}
    return {"controlnet_config": json.dumps(dict(module.config), default=list), "controlnet_base": base or ""}


def write_init_folder(module: torch.nn.Module, exp_dir: Path) -> str:
    """Save a new ControlNet's starting weights as a diffusers folder in the experiment folder (the base its
    checkpoints name); returns its path."""
    folder = exp_dir / INIT_FOLDER
    module.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def controlnet_base(value: str, exp_dir: Path) -> str:
    """The diffusers folder a run's ControlNet starts from: the folder given to continue, else (a new one, or one
    from a file) its starting weights in the experiment folder (`needs_init_folder`)."""
    local = Path(os.path.expanduser(value))
    if value not in (FROM_UNET, NEW) and local.is_dir():
        return str(local.resolve())
    return str((exp_dir / INIT_FOLDER).resolve())  # absolute: checkpoints are read from anywhere


def needs_init_folder(value: str) -> bool:
    """Whether the run writes its ControlNet's starting weights (anything but a diffusers folder to continue)."""
    return value in (FROM_UNET, NEW) or not Path(os.path.expanduser(value)).is_dir()


def combined(controlnets: list[torch.nn.Module]) -> torch.nn.Module:
    """One ControlNet as it is, several as diffusers' MultiControlNetModel (the pipelines' `controlnet`)."""
    if len(controlnets) == 1:
        return controlnets[0]
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    return MultiControlNetModel(controlnets)
