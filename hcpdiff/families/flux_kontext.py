"""FLUX.1 Kontext: FLUX.1's transformer, VAE and text encoders, trained on (input image, instruction, edited image)
triples. The input image is encoded as FluxKontextPipeline encodes it: resized to the preferred Kontext resolution
nearest its aspect ratio (PREFERRED_KONTEXT_RESOLUTIONS, sides in multiples of 16), VAE latents (the posterior's mode)
packed 2x2 and joined after the noisy latents on the transformer's sequence with their own image ids (first coordinate
1); the prediction for those tokens is dropped. The prompt is FLUX.1's (CLIP-L pooled + T5), the resolution shift is
computed on the noisy latents' sequence only, as the pipeline computes it.

A dataset gives each sample its input image with `condition_column` (e.g. `edit_image`), cut and flipped as its
target (`condition_pixels` in the batch); the visualizer and previews take `condition_image` / `condition_images`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from hcpdiff.families.base import ConfigReader, batch_condition_images
from hcpdiff.families.flux import (PACKING, Flux, FluxConditioner, default_max_sequence_length, pack_latents,
                                   unpack_latents)


def kontext_pipeline(components: dict[str, Any], scheduler: Any = None, transformer: Any = None) -> Any:
    """FluxKontextPipeline over these components (without scheduler and transformer: the conditioner's)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(scheduler=scheduler, vae=components["vae"], transformer=transformer,
                               text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                               text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"])


def kontext_size(image: Image.Image, multiple_of: int, area: int | None = None) -> tuple[int, int]:
    """(width, height) FluxKontextPipeline resizes an input image to: the preferred Kontext resolution nearest its
    aspect ratio, in `multiple_of`s (VAE factor x packing). With `area` (pixels), that resolution scaled to the area."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    aspect_ratio = image.width / image.height
    _, width, height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    if area is not None:
        scale = math.sqrt(area / (width * height))
        width, height = round(width * scale), round(height * scale)
    return max(multiple_of, width // multiple_of * multiple_of), max(multiple_of, height // multiple_of * multiple_of)


def encode_kontext_images(pipe: Any, images: list[Image.Image], device: torch.device,
                          area: int | None = None) -> dict[str, Any]:
    """The input images' packed latents [B, N, 64] and image ids [N, 3], computed as FluxKontextPipeline computes
    them: resized (to the preferred resolution, or at `area`) and preprocessed by its image processor, encoded and
    packed by its prepare_latents (which sets the ids' first coordinate to 1)."""
    multiple_of = pipe.vae_scale_factor * PACKING
    width, height = kontext_size(images[0], multiple_of, area)
    resized = [pipe.image_processor.resize(image, height, width) for image in images]
    pixels = pipe.image_processor.preprocess(resized, height, width)
    channels = pipe.vae.config.latent_channels
    with torch.no_grad():
        # `latents` given (an empty stand-in, never used): prepare_latents then draws no noise from the global stream
        _, tokens, _, ids = pipe.prepare_latents(pixels, len(images), channels, height, width, pipe.vae.dtype, device,
                                                 generator=None, latents=torch.empty(0))
    return {"condition_latents": tokens.float(), "condition_ids": ids.float()}


class FluxKontextConditioner(FluxConditioner):
    """(prompts, batch with `condition_pixels`) -> FLUX.1's text keyword arguments, and the input images' packed
    latents and ids. Not prompt-only (the input images are part of the output), so the text cache does not keep it."""

    prompt_only: ClassVar[bool] = False

    def __init__(self, pipe: Any, max_sequence_length: int, guidance: float | None, area: int | None) -> None:
        super().__init__(pipe, max_sequence_length, guidance)
        self.area = area  # None: the pipeline's preferred resolution

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        conditioning = super().__call__(prompts, batch, device)
        images = [sample[0] for sample in batch_condition_images(batch)]  # one per sample
        return {**conditioning, **encode_kontext_images(self.pipe, images, device, self.area)}


class FluxKontext(Flux):
    """FLUX.1 Kontext [dev] image editing (`FluxKontextPipeline`): one input image per sample."""

    name: ClassVar[str] = "flux_kontext"
    description: ClassVar[str] = "FLUX.1 Kontext"
    condition_images: ClassVar[int] = 1
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img",)  # the pipeline's own edit
    # a BFL Kontext file has FLUX.1's keys: its single_file_config folder (a Kontext one) tells it apart
    single_file_marker: ClassVar[str | None] = None
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux_kontext.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/edit_flux_kontext.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux_kontext",)

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # only by its pipeline class: its transformer's config is FLUX.1-dev's
        return index.get("_class_name") == "FluxKontextPipeline"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_flux import make_tiny_flux_kontext

        return make_tiny_flux_kontext(out_dir, seed=seed)

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = 1.0,
                          condition_area: int | None = None) -> Any:
        """Input images at `condition_area` pixels (null: the pipeline's preferred resolution); the text as FLUX.1."""
        config = components["transformer"].config
        return FluxKontextConditioner(kontext_pipeline(components),
                                      max_sequence_length or default_max_sequence_length(config),
                                      guidance if config.get("guidance_embeds") else None, condition_area)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The noisy latents' tokens, then the input image's, on one sequence (ids joined likewise); the prediction
        for the noisy tokens, unpacked."""
        height, width = noisy_latents.shape[-2:]
        tokens, image_ids = pack_latents(noisy_latents)
        condition = conditioning["condition_latents"].to(tokens.dtype)
        ids = torch.cat([image_ids, conditioning["condition_ids"].to(image_ids)], dim=0)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)  # as encode_prompt makes them
        prediction = denoiser(hidden_states=torch.cat([tokens, condition], dim=1), timestep=timesteps.to(tokens.dtype),
                              guidance=conditioning.get("guidance"),
                              pooled_projections=conditioning["pooled_projections"],
                              encoder_hidden_states=text, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        return unpack_latents(prediction[:, : tokens.shape[1]], height, width)

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        return kontext_pipeline(components, scheduler, components["transformer"])

    def condition_args(self, images: list[Image.Image]) -> dict[str, Any]:
        """The pipeline's input image (one per call); it resizes it to its preferred resolution itself."""
        (image,) = images
        return {"image": image}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """`max_area` = width x height: FluxKontextPipeline rescales the output to `max_area` (1024x1024 unless told)
        at the requested aspect ratio, so without it every render would be about a megapixel."""
        args = dict(call_args)
        if args.get("width") and args.get("height"):
            args["max_area"] = args["width"] * args["height"]
        return args
