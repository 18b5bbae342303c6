"""Load a Stable Diffusion base model's parts from a local diffusers folder or the Hugging Face hub."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hcpdiff.errors import ModelError
from hcpdiff.models.hub import cached_snapshot, hub_reachable, offline_mode
from hcpdiff.models.parts import ModelParts

PART_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*")


def looks_like_path(name_or_path: str) -> bool:
    """True when the string can only be meant as a file-system path, never as a hub id."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
        or name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)
        or not HUB_ID.fullmatch(name_or_path)
    )


def check_model_folder(folder: Path, where: str, shown: str) -> None:
    """Refuse folders that are not a Stable Diffusion 1.x/2.x diffusers pipeline, naming what is missing."""
    missing = [part for part in PART_FOLDERS if not (folder / part).is_dir()]
    if missing:
        raise ModelError(
            f"{where}: the model folder '{shown}' has no {', '.join(p + '/' for p in missing)} "
            "(expected a diffusers Stable Diffusion folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
            raise ModelError(f"{where}: '{shown}' is an SDXL model; only Stable Diffusion 1.x/2.x is supported.")


@contextmanager
def transformers_progress_off() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar for the duration, then restore the user's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def training_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """DDPM with the model's betas, whatever sampler the model ships for inference."""
    from diffusers import DDPMScheduler

    # SD's own config sets clip_sample false; DDPM's default (true) clips latents as if they were pixels
    defaults = {} if "clip_sample" in scheduler_config else {"clip_sample": False}
    return DDPMScheduler.from_config(scheduler_config, **defaults)


def load_parts(source: str, *, revision: str | None, local_files_only: bool, where: str, shown: str) -> dict[str, Any]:
    """Load every part with its library's from_pretrained; a failure names the part and the model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": revision, "local_files_only": local_files_only}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "noise_scheduler": lambda: training_scheduler(
            DDPMScheduler.load_config(source, subfolder="scheduler", **common)
        ),
    }
    parts: dict[str, Any] = {}
    for part, load in loaders.items():
        try:
            with transformers_progress_off():
                parts[part] = load()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{where}: cannot load the {part} of '{shown}': {err}") from err
    return parts


def load_model_parts(
    name_or_path: str, *, revision: str | None = None, where: str = "model.pretrained_model_name_or_path"
) -> ModelParts:
    """Load a Stable Diffusion 1.x/2.x model (fp32) from a local diffusers folder or a hub id; `where` names the key."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        check_model_folder(local, where, name_or_path)
        parts = load_parts(str(local), revision=None, local_files_only=True, where=where, shown=name_or_path)
    elif local.is_file():
        raise ModelError(
            f"{where}: '{name_or_path}' is a single checkpoint file; give a diffusers folder instead "
            "(diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py converts one)."
        )
    elif looks_like_path(name_or_path):
        raise ModelError(f"{where}: '{name_or_path}' was not found (expected a diffusers model folder or a hub id).")
    else:
        parts = load_hub_parts(name_or_path, revision=revision, where=where)
    return ModelParts(family="sd", name_or_path=name_or_path, **parts)


def load_hub_parts(repo_id: str, *, revision: str | None, where: str) -> dict[str, Any]:
    """Load from the local hub cache, else download - but only after one quick check that the hub is reachable."""
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None:
        check_model_folder(snapshot, where, repo_id)
        return load_parts(str(snapshot), revision=None, local_files_only=True, where=where, shown=repo_id)
    if offline_mode():
        raise ModelError(
            f"{where}: '{repo_id}' is not a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE=1 forbids downloading it."
        )
    # an unreachable hub otherwise costs ~25 s of retries inside from_pretrained before any error
    if not hub_reachable():
        raise ModelError(
            f"{where}: '{repo_id}' is not a local folder nor in the Hugging Face cache, "
            "and the hub cannot be reached from this machine."
        )
    return load_parts(repo_id, revision=revision, local_files_only=False, where=where, shown=repo_id)
