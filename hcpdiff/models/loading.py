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
SDXL_PART_FOLDERS = ("text_encoder_2", "tokenizer_2")
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
        if "XL" in str(index.get("_class_name", "")):
            missing = [part for part in SDXL_PART_FOLDERS if not (folder / part).is_dir()]
            if missing:
                raise ModelError(f"{where}: the SDXL model folder '{shown}' has no {', '.join(p + '/' for p in missing)}")


def model_family(unet_config: dict[str, Any]) -> str:
    """"sdxl" when the U-Net takes SDXL's pooled-text + size/crop conditioning (text_time), else "sd" (1.x / 2.x)."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = {"revision": revision, "local_files_only": local_files_only}
    try:
        family = model_family(UNet2DConditionModel.load_config(source, subfolder="unet", **common))
    except (OSError, ValueError) as err:
        raise ModelError(f"{where}: cannot load the unet of '{shown}': {err}") from err
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "noise_scheduler": lambda: training_scheduler(
            DDPMScheduler.load_config(source, subfolder="scheduler", **common)
        ),
    }
    if family == "sdxl":  # encoder 2 (OpenCLIP bigG) adds the pooled, projected text SDXL is conditioned on
        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **common)
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
    parts: dict[str, Any] = {"family": family}
    for part, load in loaders.items():
        try:
            with transformers_progress_off():
                parts[part] = load()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{where}: cannot load the {part} of '{shown}': {err}") from err
    return parts


def load_model_parts(
    name_or_path: str, *, revision: str | None = None, where: str = "model.pretrained_model_name_or_path",
    single_file_config: str | None = None,
) -> ModelParts:
    """Load a Stable Diffusion 1.x/2.x model (fp32) from a local diffusers folder, a hub id or one checkpoint file.

    `single_file_config` is the diffusers folder (or cached hub id) whose configs describe a single checkpoint file.
    """
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        check_model_folder(local, where, name_or_path)
        parts = load_parts(str(local), revision=None, local_files_only=True, where=where, shown=name_or_path)
    elif local.is_file():
        parts = load_single_file_parts(local, single_file_config, where=where, shown=name_or_path)
    elif looks_like_path(name_or_path):
        raise ModelError(f"{where}: '{name_or_path}' was not found (expected a diffusers model folder or a hub id).")
    else:
        parts = load_hub_parts(name_or_path, revision=revision, where=where)
    return ModelParts(**{"family": "sd", **parts}, name_or_path=name_or_path)


def single_file_config_folder(single_file_config: str | None, where: str, shown: str) -> str | None:
    """The local folder giving a single file's configs; None lets diffusers fetch them (only when the hub is reachable)."""
    config_key = where.rsplit(".", 1)[0] + ".single_file_config" if "." in where else "single_file_config"
    if single_file_config is None:
        if offline_mode() or not hub_reachable():
            raise ModelError(
                f"{where}: '{shown}' is a single checkpoint file, whose part configs come from a diffusers model of the "
                f"same family; set {config_key} to a local diffusers folder (e.g. the base model it was trained "
                "from), since the hub cannot be reached from this machine to fetch them."
            )
        return None
    folder = Path(os.path.expanduser(single_file_config))
    if not folder.is_dir():
        snapshot = None if looks_like_path(single_file_config) else cached_snapshot(single_file_config, None)
        if snapshot is None:
            raise ModelError(
                f"{config_key}: '{single_file_config}' is not a local diffusers folder nor a hub id in the local cache."
            )
        folder = snapshot
    check_model_folder(folder, config_key, single_file_config)
    return str(folder)


def load_single_file_parts(path: Path, single_file_config: str | None, *, where: str, shown: str) -> dict[str, Any]:
    """Load an original-layout (CompVis / a1111) checkpoint with diffusers' from_single_file, configs from a folder."""
    from diffusers import StableDiffusionPipeline

    config = single_file_config_folder(single_file_config, where, shown)
    options = {"config": config, "local_files_only": True} if config else {}
    try:
        with transformers_progress_off():
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), safety_checker=None, requires_safety_checker=False, **options
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise ModelError(f"{where}: cannot load the single checkpoint file '{shown}': {err}") from err
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "noise_scheduler": training_scheduler(dict(pipe.scheduler.config)),
    }


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
