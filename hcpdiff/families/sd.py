"""Stable Diffusion 1.x / 2.x: a U-Net on 4-channel VAE latents, one CLIP text encoder, DDPM (epsilon or v)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.families.base import ConfigReader, Family


class StableDiffusion(Family):
    """SD1.x / SD2.x (`StableDiffusionPipeline`)."""

    name: ClassVar[str] = "sd"
    description: ClassVar[str] = "Stable Diffusion 1.x / 2.x"
    webui_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    train_config: ClassVar[str] = "cfgs/train/examples/lora_conventional.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/t2i_lora.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("sd", "sd2")  # sd2: SD2.x layout, v-prediction
    # diffusers' img2img / inpaint pipelines of the same components (AutoPipelineFor*.from_pipe)
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img", "img2img", "inpaint", "highres_fix", "latent_upscale")
    takes_controlnet: ClassVar[bool] = True

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        unet = read_config("unet")
        return unet is not None and unet.get("addition_embed_type") != "text_time"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.make_tiny_model import make_tiny_sd

        return make_tiny_sd(out_dir, seed=seed, v_prediction=variant == "sd2")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common),
            "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """DDPM with the model's betas, whatever sampler the model ships for inference."""
        from diffusers import DDPMScheduler

        # SD's own config sets clip_sample false; DDPM's default (true) clips latents as if they were pixels
        defaults = {} if "clip_sample" in scheduler_config else {"clip_sample": False}
        return DDPMScheduler.from_config(scheduler_config, **defaults)

    def load_single_file(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None, requires_safety_checker=False,
                                                        **options)
        return {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x 2^(U-Net levels - 1): 64 for SD, so every U-Net level divides evenly."""
        return self.vae_scale_factor(read_config) * 2 ** (len(read_config("unet")["block_out_channels"]) - 1)

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        from hcpdiff.models.conditioning import SDConditioner
        from hcpdiff.models.prompt_encoder import PromptEncoder

        return SDConditioner(PromptEncoder(components["tokenizer"], components["text_encoder"],
                                           tokenizer_repeats=tokenizer_repeats, clip_skip=clip_skip))

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.ddpm import DDPMObjective, refuse_other_objective_keys
        from hcpdiff.objectives.flow_matching import FLOW_LOSS_KEYS

        refuse_other_objective_keys(loss_spec, FLOW_LOSS_KEYS, "flow-matching", "the DDPM objective", self.description)
        return DDPMObjective.from_spec(noise_scheduler, loss_spec)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy_latents, timesteps, **conditioning).sample

    def control_residuals(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                          conditioning: dict[str, Any], control_pixels: torch.Tensor) -> dict[str, Any]:
        """The ControlNet's residuals for the U-Net, as StableDiffusion(XL)ControlNetPipeline computes them: the
        same latents, timestep and text (SDXL: added_cond_kwargs) and the control image in [0, 1]."""
        control = (control_pixels.to(noisy_latents.device, noisy_latents.dtype) + 1) / 2
        down, mid = controlnet(noisy_latents, timesteps, controlnet_cond=control, return_dict=False, **conditioning)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        parts = dict(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                     tokenizer=components["tokenizer"], scheduler=scheduler,
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if components.get("controlnet") is not None:
            return StableDiffusionControlNetPipeline(controlnet=components["controlnet"], **parts)
        return StableDiffusionPipeline(**parts)

    def control_args(self, images: list[Any], scales: list[float]) -> dict[str, Any]:
        """`image` and `controlnet_conditioning_scale`: one of each, or a list for a MultiControlNetModel."""
        if len(images) == 1:
            return {"image": images[0], "controlnet_conditioning_scale": scales[0]}
        return {"image": list(images), "controlnet_conditioning_scale": list(scales)}

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        from hcpdiff.infer.prompt_weights import chunks_needed, encode_weighted

        # as many 75-token chunks as the render's longest prompt needs, so every batch of one render is encoded alike
        repeats = chunks_needed(pipe.tokenizer, all_prompts)
        return {
            "prompt_embeds": encode_weighted(pipe.tokenizer, pipe.text_encoder, prompts, repeats, clip_skip),
            "negative_prompt_embeds": encode_weighted(pipe.tokenizer, pipe.text_encoder, neg_prompts, repeats, clip_skip),
        }
