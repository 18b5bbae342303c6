"""Write images with their settings in the file (a1111 `parameters` text and a JSON chunk), and cfg.yaml."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hcpdiff.errors import ConfigError

UPSCALER_NAMES = {"latent": "Latent", "pixel": "Lanczos"}  # highres_fix.upscale -> the webui's "Hires upscaler"
IMAGE_TYPES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def a1111_parameters(info: dict[str, Any]) -> str:
    """The settings as the webui writes them: prompt, `Negative prompt:` line, then `Key: value, ...` (img2img,
    inpaint and highres fix add the webui's `Denoising strength` / `Hires ...` keys, and the init and mask paths)."""
    fields = {
        "Steps": info["steps"], "Sampler": info["sampler"], "CFG scale": info["guidance_scale"],
        "Seed": info["seed"], "Size": f"{info['width']}x{info['height']}", "Model": info["model"],
    }
    if info.get("guidance_rescale"):
        fields["CFG Rescale phi"] = info["guidance_rescale"]
    if "strength" in info:  # img2img / inpaint
        fields["Denoising strength"] = info["strength"]
        fields["Init image"] = info["init_image"]
    if info.get("mask_image"):
        fields["Mask image"] = info["mask_image"]
    if info.get("highres_fix"):
        highres = info["highres_fix"]
        fields.update({"Denoising strength": highres["strength"], "Hires upscale": highres["scale"],
                       "Hires steps": highres["steps"], "Hires upscaler": UPSCALER_NAMES[highres["upscale"]],
                       "Hires resize": f"{highres['width']}x{highres['height']}"})
    if info["lora"]:
        fields["Lora"] = " ".join(info["lora"])
    for i, entry in enumerate(info.get("controlnet") or []):  # as the webui's ControlNet extension names its units
        fields[f"ControlNet {i}"] = f'"Model: {entry["path"]}, Image: {entry["image"]}, Weight: {entry["scale"]}"'
    tail = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return f"{info['prompt']}\nNegative prompt: {info['negative_prompt']}\n{tail}"


def save_image(image: Image.Image, out_dir: Path, index: int, info: dict[str, Any], image_type: str, quality: int) -> Path:
    """Save `<index>-<seed>.<type>`; PNGs carry `parameters` and `hcpdiff` (JSON) text chunks."""
    if image_type.lower() not in IMAGE_TYPES:
        raise ConfigError(f"`save.image_type`: '{image_type}' is not one of {sorted(IMAGE_TYPES)}.")
    path = out_dir / f"{index:04d}-{info['seed']}.{image_type.lower()}"
    file_format = IMAGE_TYPES[image_type.lower()]
    if file_format == "PNG":
        pnginfo = PngInfo()
        pnginfo.add_text("parameters", a1111_parameters(info))
        pnginfo.add_text("hcpdiff", json.dumps(info))
        image.save(path, format=file_format, pnginfo=pnginfo)
    else:
        image.convert("RGB").save(path, format=file_format, quality=quality)
    return path


def save_video(frames: list[Image.Image], out_dir: Path, index: int, info: dict[str, Any]) -> Path:
    """Save a clip as `<index>-<seed>.mp4` at `info["fps"]`, its settings in the container's tags as a PNG's are in
    its text chunks: `comment` the a1111 `parameters` text, `description` the `hcpdiff` JSON."""
    from hcpdiff.infer.video import save_clip

    path = out_dir / f"{index:04d}-{info['seed']}.mp4"
    return save_clip(frames, path, info["fps"], {"comment": a1111_parameters(info), "description": json.dumps(info)})


def next_index(out_dir: Path) -> int:
    """The first image number not used in `out_dir`, so a second run adds images instead of overwriting."""
    numbers = [int(p.name.split("-", 1)[0]) for p in out_dir.glob("*-*.*") if p.name.split("-", 1)[0].isdigit()]
    return max(numbers, default=-1) + 1
