"""Qwen-Image-Edit: Qwen-Image's transformer, VAE and Qwen2.5-VL encoder, trained on (input image, prompt, edited
image) triples. The input image is encoded twice, as QwenImageEditPipeline encodes it: resized to a 1024x1024 area at
its own aspect ratio, its VAE latents are packed and joined after the noisy latents on the transformer's sequence
(the prediction for those tokens is dropped), and the same resized image goes with the prompt through the VL
processor into the text encoder (its vision tokens' states become part of the prompt states).

A dataset gives each sample its input image with `condition_column` (e.g. `edit_image`), cut and flipped as its
target (`condition_pixels` in the batch); the visualizer and previews take `condition_image` / `condition_images`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from PIL import Image

from hcpdiff.families.base import ConfigReader, batch_condition_images
from hcpdiff.families.qwen_image import (PACKING, QwenImage, call_transformer, pack_latents, plain_prompts,
                                         unpack_latents)

EDIT_AREA = 1024 * 1024  # QwenImageEditPipeline sizes the input image to this many pixels, at its aspect ratio


def load_vl_processor(source: str, common: dict[str, Any]) -> Any:
    """The VL processor from the model's `processor/` folder: its image processor and tokenizer, as a
    Qwen2VLProcessor for images (the one QwenImageEditPipeline calls)."""
    from transformers import AutoImageProcessor, Qwen2Tokenizer

    image_processor = AutoImageProcessor.from_pretrained(source, subfolder="processor", **common)
    tokenizer = Qwen2Tokenizer.from_pretrained(source, subfolder="processor", **common)
    return image_processor_only(image_processor, tokenizer)


def image_processor_only(image_processor: Any, tokenizer: Any, processor_class: str = "Qwen2VLProcessor",
                         **kwargs: Any) -> Any:
    """A Qwen2VLProcessor (or transformers' `processor_class`, e.g. Qwen3VLProcessor; `kwargs`: its chat_template)
    without a video processor. transformers (5.x) checks the class of every processor part, a missing one too, and
    without torchvision that check fails for the video processor; hcpdiff never gives videos, so a missing part is
    not checked. Processing is the library's own."""
    import transformers

    class ImageOnlyProcessor(getattr(transformers, processor_class)):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def edit_pipeline(components: dict[str, Any], scheduler: Any = None, transformer: Any = None,
                  pipeline_class: str = "QwenImageEditPipeline") -> Any:
    """QwenImageEditPipeline (or `pipeline_class`) over these components (without scheduler and transformer: the
    conditioner's)."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class)
    return pipeline(scheduler=scheduler, vae=components["vae"], text_encoder=components["text_encoder"],
                    tokenizer=components["tokenizer"], processor=components["processor"], transformer=transformer)


def edit_size(image: Image.Image, area: int = EDIT_AREA) -> tuple[int, int]:
    """(width, height) QwenImageEditPipeline resizes an input image to: `area` at its aspect ratio, in 32s."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(area, image.width / image.height)
    return int(width), int(height)


def encode_edit(pipe: Any, prompts: list[str], images: list[Image.Image], device: torch.device,
                area: int = EDIT_AREA) -> dict[str, Any]:
    """The transformer's text and input-image keyword arguments for prompts with their input images (all of one
    size), computed as QwenImageEditPipeline computes them: the images resized (to `area`, the pipeline's by default)
    by its image processor, the prompt states (with the vision tokens) by its encode_prompt, the VAE latents by its
    _encode_vae_image and _pack_latents."""
    width, height = edit_size(images[0], area)
    resized = [pipe.image_processor.resize(image, height, width) for image in images]
    embeds, mask = pipe.encode_prompt(prompts, image=resized, device=device)
    if mask is None:  # the pipeline drops an all-ones mask
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pixels = pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)
    with torch.no_grad():
        latents = pipe._encode_vae_image(pixels.to(device, pipe.vae.dtype), generator=None)
    batch, channels, _, latent_height, latent_width = latents.shape
    tokens = pipe._pack_latents(latents, batch, channels, latent_height, latent_width)
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask, "condition_latents": tokens.float(),
            "condition_sizes": ((latent_height, latent_width),)}


class QwenImageEditConditioner:
    """(prompts, batch with `condition_pixels`) -> the prompt states and mask, and the input images' packed latents.

    Not prompt-only: the states depend on the input image, so the text cache does not keep them."""

    def __init__(self, pipe: Any, area: int = EDIT_AREA) -> None:
        self.pipe = pipe
        self.area = area

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        images = [sample[0] for sample in batch_condition_images(batch)]  # one per sample
        return encode_edit(self.pipe, prompts, images, device, self.area)

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        from hcpdiff.families.base import pipeline_text_encoder

        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit image editing (`QwenImageEditPipeline`): one input image per sample."""

    name: ClassVar[str] = "qwen_image_edit"
    description: ClassVar[str] = "Qwen-Image-Edit"
    other_folders: ClassVar[tuple[str, ...]] = ("vae", "scheduler", "processor")
    condition_images: ClassVar[int] = 1
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img",)  # the pipeline's own edit; no img2img / inpaint pipeline
    train_config: ClassVar[str] = "cfgs/train/examples/lora_qwen_image_edit.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/edit_qwen_image.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("qwen_image_edit",)

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        return index.get("_class_name") == "QwenImageEditPipeline"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_qwen_image import make_tiny_qwen_image_edit

        return make_tiny_qwen_image_edit(out_dir, seed=seed)

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        return {**super().part_loaders(source, common), "processor": lambda: load_vl_processor(source, common)}

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None,
                          condition_area: int | None = None) -> Any:
        """Input images are sized to `condition_area` pixels (null: the pipeline's 1024x1024); the prompt is not cut
        (QwenImageEditPipeline does not cut it); tokenizer_repeats and clip_skip do not apply."""
        return QwenImageEditConditioner(edit_pipeline(components), condition_area or EDIT_AREA)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The noisy latents' tokens, then the input images', on one sequence with a shape each (the pipeline's
        img_shapes); the prediction for the noisy tokens, unpacked."""
        height, width = noisy_latents.shape[-2:]
        tokens = pack_latents(noisy_latents)
        condition = conditioning["condition_latents"].to(tokens.dtype)
        img_shapes = [[(1, height // PACKING, width // PACKING),
                       *((1, h // PACKING, w // PACKING) for h, w in conditioning["condition_sizes"])]
                      ] * noisy_latents.shape[0]
        prediction = call_transformer(denoiser, torch.cat([tokens, condition], dim=1), timesteps, conditioning,
                                      img_shapes)
        return unpack_latents(prediction[:, : tokens.shape[1]], height, width)

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        return edit_pipeline(components, scheduler, components["transformer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts as text: QwenImageEditPipeline encodes them with the input image itself. `(word:1.2)` weights
        are not applied (the weight syntax is removed)."""
        return {"prompt": plain_prompts(prompts), "negative_prompt": plain_prompts(neg_prompts)}

    def condition_args(self, images: list[Image.Image]) -> dict[str, Any]:
        """The pipeline's input image (one per call: QwenImageEditPipeline edits one image per prompt)."""
        (image,) = images
        return {"image": image}
