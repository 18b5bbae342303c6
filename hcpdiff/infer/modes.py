"""The visualizer's render modes: text to image, img2img (`init_image`), inpaint (+ `mask_image`), and the
two-pass highres fix, each with diffusers' own pipeline for the mode built from the same components."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from PIL import Image

from hcpdiff.config import read_fields
from hcpdiff.config.fields import Bound
from hcpdiff.errors import ConfigError
from hcpdiff.families import Family
from hcpdiff.families.base import components_config_reader
from hcpdiff.infer.saving import UPSCALER_NAMES
from hcpdiff.infer.video import pipeline_renders


@dataclass
class HighresFixSpec:
    """`highres_fix`: render at width x height, upscale by `scale`, then denoise again with img2img (the webui's hires
    fix)."""

    scale: Annotated[float, Bound(gt=1, finite=True)] = 2.0  # final size = size x scale, rounded to the pixel step
    upscale: str = "latent"  # latent: resize the latents (bilinear); pixel: decode, resize the image (Lanczos), encode
    strength: Annotated[float, Bound(gt=0, finite=True)] = 0.6  # the second pass's denoising strength, in (0, 1]
    steps: Annotated[int | None, Bound(ge=1)] = None  # the second pass's num_inference_steps; null: the first pass's


@dataclass
class RenderMode:
    """What one render does, read and checked once before any model loads."""

    name: str  # txt2img | img2img | inpaint
    strength: float  # img2img / inpaint: how far from the init image (1: start from pure noise)
    init_path: str | None = None
    mask_path: str | None = None
    highres: HighresFixSpec | None = None
    init_image: Image.Image | None = None  # resized and cropped to width x height
    mask_image: Image.Image | None = None  # "L", binarised: 255 = repaint, 0 = keep
    pipelines: dict[str, Any] = field(default_factory=dict)  # mode name -> diffusers pipeline, built by `prepare`
    pixel_step: int = 8  # image sides are multiples of this (the family's), set by `prepare`

    def settings(self, width: int, height: int, steps: int) -> dict[str, Any]:
        """The mode's settings for the image metadata."""
        info: dict[str, Any] = {"mode": self.name}
        if self.name != "txt2img":
            info.update(init_image=self.init_path, strength=self.strength)
        if self.name == "inpaint":
            info["mask_image"] = self.mask_path
        if self.highres is not None:
            final_w, final_h = self.highres_size(width, height)
            info["highres_fix"] = {"scale": self.highres.scale, "upscale": self.highres.upscale,
                                   "strength": self.highres.strength, "steps": self.highres.steps or steps,
                                   "width": final_w, "height": final_h}
        return info

    def highres_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: width and height times the scale, rounded to the pixel step."""
        step = self.pixel_step
        return tuple(max(step, round(side * self.highres.scale / step) * step) for side in (width, height))


def check_strength(strength: float, steps: int, key: str) -> None:
    """Strength in (0, 1], and at least one denoising step (diffusers runs int(steps x strength) of them)."""
    if not 0 < strength <= 1:
        raise ConfigError(f"{key}: must be in (0, 1] (1: start from pure noise), got {strength}")
    if int(steps * strength) < 1:
        raise ConfigError(f"{key}: {strength} x {steps} steps leaves no denoising step; raise it or the steps "
                          f"(diffusers runs int(steps x strength) steps)")


def read_render_mode(init_image: str | None, mask_image: str | None, highres_fix: Any, infer_args: Any,
                     family: Family) -> RenderMode:
    """The mode the config asks for (`init_image`, `mask_image`, `highres_fix`, `infer_args.strength`); one ConfigError
    for a missing file, a mode this family does not render or settings that cannot work."""
    highres = read_fields(highres_fix, "highres_fix", HighresFixSpec) if highres_fix is not None else None
    if mask_image and not init_image:
        raise ConfigError("mask_image: inpainting needs init_image too (the image to paint into)")
    name = "inpaint" if mask_image else "img2img" if init_image else "txt2img"
    mode = RenderMode(name=name, strength=infer_args.strength, init_path=init_image, mask_path=mask_image,
                      highres=highres)
    wanted = {"init_image": "img2img" if name == "img2img" else None, "mask_image": "inpaint" if mask_image else None,
              "highres_fix": "highres_fix" if highres else None,
              "highres_fix.upscale": "latent_upscale" if highres and highres.upscale == "latent" else None}
    for key, wanted_mode in wanted.items():
        if wanted_mode and wanted_mode not in family.render_modes:
            hint = "; use upscale: pixel" if wanted_mode == "latent_upscale" else ""
            raise ConfigError(f"{key}: {wanted_mode} is not supported for a {family.description} model; it renders "
                              f"{', '.join(family.render_modes)}{hint}")
    if name != "txt2img":
        check_strength(mode.strength, infer_args.num_inference_steps, "infer_args.strength")
        for key, path in (("init_image", init_image), ("mask_image", mask_image)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{key}: no such file '{path}'")
    if highres is not None:
        if name != "txt2img":
            raise ConfigError("highres_fix: a second pass after text to image; with init_image, render at the size "
                              "you want instead")
        if highres.upscale not in UPSCALER_NAMES:
            raise ConfigError(f"highres_fix.upscale: '{highres.upscale}' is not one of {', '.join(UPSCALER_NAMES)}")
        check_strength(highres.strength, highres.steps or infer_args.num_inference_steps, "highres_fix.strength")
    return mode


def load_mode_images(mode: RenderMode, width: int, height: int) -> None:
    """Read the init image and mask, each resized to cover width x height and center-cropped (as the webui's "crop and
    resize"); an unreadable file is one ConfigError."""
    from hcpdiff.data.images import load_image, resize_and_crop

    for key, path in (("init_image", mode.init_path), ("mask_image", mode.mask_path)):
        if not path:
            continue
        try:
            image = resize_and_crop(load_image(path), (width, height))
        except OSError as err:
            raise ConfigError(f"{key}: cannot read '{path}' as an image ({err})") from err
        if key == "init_image":
            mode.init_image = image
        else:  # white repaints, black keeps; binarised as diffusers' mask processor does
            mode.mask_image = image.convert("L").point(lambda value: 255 if value >= 128 else 0)


def prepare(mode: RenderMode, pipe: Any, family: Family, width: int, height: int) -> None:
    """Build the mode's diffusers pipelines from the text-to-image pipeline's components (no copies), and load its
    images."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    load_mode_images(mode, width, height)
    mode.pixel_step = family.pixel_step(components_config_reader(pipe.components))
    mode.pipelines["txt2img"] = pipe
    if mode.name == "img2img" or mode.highres is not None:
        mode.pipelines["img2img"] = AutoPipelineForImage2Image.from_pipe(pipe)
    if mode.name == "inpaint":
        mode.pipelines["inpaint"] = AutoPipelineForInpainting.from_pipe(pipe)
    for built in mode.pipelines.values():
        built.set_progress_bar_config(disable=True)


def call_args(pipeline: Any, args: dict[str, Any]) -> dict[str, Any]:
    """The sampling arguments this diffusers pipeline takes: width / height are left to the image where it sizes the
    output; a guidance_rescale it has no argument for is one ConfigError; a zero one is not passed."""
    params = inspect.signature(pipeline.__call__).parameters
    args = {key: value for key, value in args.items() if not (key == "guidance_rescale" and not value)}
    if "guidance_rescale" in args and "guidance_rescale" not in params:
        raise ConfigError(f"infer_args.guidance_rescale: diffusers' {type(pipeline).__name__} has no guidance_rescale; "
                          "set it to 0 for this mode")
    return {key: value for key, value in args.items() if key in params or key not in ("width", "height")}


def render(mode: RenderMode, prompt_args: dict[str, Any], generators: list[torch.Generator],
           sampling: dict[str, Any]) -> list[Any]:
    """One batch of images (a video family's: clips, lists of frames) in the mode; `sampling` is the pipeline's own
    keyword arguments for infer_args (width, height, steps, guidance; strength and guidance_rescale included)."""
    sampling = dict(sampling)
    strength = sampling.pop("strength", mode.strength)
    batch = len(generators)
    with torch.no_grad():
        if mode.name == "img2img":
            pipe = mode.pipelines["img2img"]
            return pipe(**prompt_args, image=[mode.init_image] * batch, strength=strength, generator=generators,
                        output_type="pil", **call_args(pipe, sampling)).images
        if mode.name == "inpaint":
            pipe = mode.pipelines["inpaint"]
            images = pipe(**prompt_args, image=[mode.init_image] * batch, mask_image=[mode.mask_image] * batch,
                          strength=strength, generator=generators, output_type="pil",
                          **call_args(pipe, sampling)).images
            # outside the mask the original pixels are kept exactly, as the webui pastes them back
            return [Image.composite(image, mode.init_image, mode.mask_image) for image in images]
        pipe = mode.pipelines["txt2img"]
        if mode.highres is None:  # a video pipeline's renders are clips (lists of frames)
            return pipeline_renders(pipe(**prompt_args, generator=generators, output_type="pil",
                                         **call_args(pipe, sampling)))
        return highres_fix(mode, prompt_args, generators, sampling)


def highres_fix(mode: RenderMode, prompt_args: dict[str, Any], generators: list[torch.Generator],
                sampling: dict[str, Any]) -> list[Image.Image]:
    """Text to image at width x height, upscaled (latents bilinearly, or decoded pixels with Lanczos) to the final
    size, then img2img at highres_fix.strength; the generators go on from the first pass."""
    txt2img, img2img, highres = mode.pipelines["txt2img"], mode.pipelines["img2img"], mode.highres
    final_w, final_h = mode.highres_size(sampling["width"], sampling["height"])
    latent = highres.upscale == "latent"
    first = txt2img(**prompt_args, generator=generators, output_type="latent" if latent else "pil",
                    **call_args(txt2img, sampling)).images
    if latent:  # [B, C, H/f, W/f] in the denoiser's scaled latent space, which img2img takes as its start
        factor = txt2img.vae_scale_factor
        upscaled = F.interpolate(first, size=(final_h // factor, final_w // factor), mode="bilinear")
    else:
        upscaled = [image.resize((final_w, final_h), Image.LANCZOS) for image in first]
    second = {**sampling, "width": final_w, "height": final_h,
              "num_inference_steps": highres.steps or sampling["num_inference_steps"]}
    return img2img(**prompt_args, image=upscaled, strength=highres.strength, generator=generators, output_type="pil",
                   **call_args(img2img, second)).images
