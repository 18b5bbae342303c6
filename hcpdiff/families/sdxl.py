"""SDXL: the SD U-Net layout with two CLIP encoders (penultimate states side by side), pooled text and size ids."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from hcpdiff.families.base import ConfigReader, components_config_reader
from hcpdiff.families.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    """SDXL base / fine-tunes (`StableDiffusionXLPipeline`)."""

    name: ClassVar[str] = "sdxl"
    description: ClassVar[str] = "Stable Diffusion XL"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    webui_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                                                "text_encoder_2": "lora_te2_"}
    train_config: ClassVar[str] = "cfgs/train/examples/lora_sdxl.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_sdxl.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("sdxl",)

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # SDXL's U-Net takes the pooled text of encoder 2 and the size / crop ids ("text_time")
        unet = read_config("unet")
        return unet is not None and unet.get("addition_embed_type") == "text_time"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_sdxl import make_tiny_sdxl

        return make_tiny_sdxl(out_dir, seed=seed)

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {
            **super().part_loaders(source, common),
            "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **common),
            "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
        }

    def load_single_file(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_single_file(path, add_watermarker=False, **options)
        return {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                       "tokenizer_2", "scheduler")}

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        from hcpdiff.models.prompt_encoder import PromptEncoder
        from hcpdiff.models.sdxl import SDXLConditioner

        encoders = [PromptEncoder(components[tokenizer], components[encoder], tokenizer_repeats=tokenizer_repeats,
                                  clip_skip=clip_skip)
                    for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)]
        return SDXLConditioner(*encoders, vae_scale_factor=self.vae_scale_factor(components_config_reader(components)))

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

        parts = dict(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                     tokenizer=components["tokenizer"], text_encoder_2=components["text_encoder_2"],
                     tokenizer_2=components["tokenizer_2"], scheduler=scheduler, add_watermarker=False)
        if components.get("controlnet") is not None:
            return StableDiffusionXLControlNetPipeline(controlnet=components["controlnet"], **parts)
        return StableDiffusionXLPipeline(**parts)

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        from hcpdiff.infer.prompt_weights import chunks_needed, encode_weighted_sdxl

        repeats = chunks_needed(pipe.tokenizer, all_prompts)
        tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
        embeds, pooled = encode_weighted_sdxl(tokenizers, encoders, prompts, repeats, clip_skip)
        # an empty negative prompt is encoded, as diffusers does for negative_prompt="" (it zeros only for None)
        neg_embeds, neg_pooled = encode_weighted_sdxl(tokenizers, encoders, neg_prompts, repeats, clip_skip)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg_embeds, "negative_pooled_prompt_embeds": neg_pooled}
