"""Qwen-Image-Edit-2509 / 2511 (`QwenImageEditPlusPipeline`): Qwen-Image-Edit with one to three input images per
sample. Each input image is encoded as the pipeline encodes it: its VAE latents at a 1024x1024 area at its own aspect
ratio, packed and joined after the noisy latents one after another (a shape each in img_shapes), and the image at a
384x384 area read by Qwen2.5-VL, the prompt prefixed with "Picture 1: <image> Picture 2: <image> ...".

The pipeline encodes one prompt per call; the conditioner encodes each sample with it and pads the batch's prompt
states (with their mask), so a batch trains as its samples one by one. A dataset row names its input images as a
list (`condition_column`); a batch needs as many for every sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from hcpdiff.families.base import ConfigReader, batch_condition_images, pad_sequences
from hcpdiff.families.qwen_image_edit import EDIT_AREA, QwenImageEdit, QwenImageEditConditioner, edit_pipeline

PIPELINE = "QwenImageEditPlusPipeline"
VL_AREA = 384 * 384  # the pipeline's CONDITION_IMAGE_SIZE: the area Qwen2.5-VL reads each input image at


def plus_sizes(image: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) the pipeline sizes an input image to for `area` (its calculate_dimensions)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    width, height = calculate_dimensions(area, image.width / image.height)
    return int(width), int(height)


def encode_edit_plus(pipe: Any, prompt: str, images: list[Image.Image], device: torch.device,
                     area: int = EDIT_AREA) -> dict[str, Any]:
    """One prompt with its input images, as QwenImageEditPlusPipeline encodes them: each image resized to VL_AREA for
    the VL encoder (its image processor's resize; encode_prompt builds the Picture prefix), and preprocessed at `area`
    (the pipeline's 1024x1024 by default) for the VAE (_encode_vae_image, _pack_latents), tokens joined in order."""
    vl_images = [pipe.image_processor.resize(image, *reversed(plus_sizes(image, VL_AREA))) for image in images]
    embeds, mask = pipe.encode_prompt([prompt], image=vl_images, device=device)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    tokens, sizes = [], []
    for image in images:
        width, height = plus_sizes(image, area)
        pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
        with torch.no_grad():
            latents = pipe._encode_vae_image(pixels.to(device, pipe.vae.dtype), generator=None)
        _, channels, _, latent_height, latent_width = latents.shape
        tokens.append(pipe._pack_latents(latents, 1, channels, latent_height, latent_width))
        sizes.append((latent_height, latent_width))
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
            "condition_latents": torch.cat(tokens, dim=1).float(), "condition_sizes": tuple(sizes)}


class QwenImageEditPlusConditioner(QwenImageEditConditioner):
    """(prompts, batch with `condition_pixels` [B, K, 3, H, W]) -> padded prompt states and mask, and each sample's
    K input images' packed latents (as many, of one size, for every sample of a batch)."""

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        samples = [encode_edit_plus(self.pipe, prompt, images, device, self.area)
                   for prompt, images in zip(prompts, batch_condition_images(batch))]
        # one prompt per call: each sample's states are all its own tokens
        embeds, mask = pad_sequences([s["encoder_hidden_states"][0] for s in samples])
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                "condition_latents": torch.cat([s["condition_latents"] for s in samples]),
                "condition_sizes": samples[0]["condition_sizes"]}


class QwenImageEditPlus(QwenImageEdit):
    """Qwen-Image-Edit-2509 / 2511 (`QwenImageEditPlusPipeline`): one to three input images per sample."""

    name: ClassVar[str] = "qwen_image_edit_plus"
    description: ClassVar[str] = "Qwen-Image-Edit-2509 / 2511"
    condition_images: ClassVar[int] = 3
    train_config: ClassVar[str] = "cfgs/train/examples/lora_qwen_image_edit_plus.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/edit_qwen_image_plus.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("qwen_image_edit_plus",)

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        return index.get("_class_name") == PIPELINE

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_qwen_image import make_tiny_qwen_image_edit

        return make_tiny_qwen_image_edit(out_dir, seed=seed, pipeline_class=PIPELINE)

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None,
                          condition_area: int | None = None) -> Any:
        """Input images' VAE latents at `condition_area` pixels (null: the pipeline's 1024x1024); the VL encoder
        reads them at the pipeline's 384x384 area."""
        return QwenImageEditPlusConditioner(edit_pipeline(components, pipeline_class=PIPELINE),
                                            condition_area or EDIT_AREA)

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        return edit_pipeline(components, scheduler, components["transformer"], pipeline_class=PIPELINE)

    def condition_args(self, images: list[Image.Image]) -> dict[str, Any]:
        """The prompt's input images, in order (Picture 1, 2, ...)."""
        return {"image": list(images)}
