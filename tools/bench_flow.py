"""Flow-matching parts of tools/bench_train_step.py: the bare diffusers + peft loops of FLUX, SD3, Qwen-Image, Z-Image,
Krea 2, Wan (and Wan2.2 A14B's high-noise expert), Ideogram 4, Qwen-Image 2.1, FLUX.2 [dev] / [klein] and the
editing families FLUX.1 Kontext, Qwen-Image-Edit and Qwen-Image-Edit-2509 (one shared step, with each family's
diffusers functions for latents, prompts, sigmas and the transformer call), the full-width FLUX builder, and the
batch the bare loops train on. Not run on its own."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

REPO_ROOT = Path(__file__).resolve().parents[1]


VARIANT_CONFIGS = {"wan2.2-a14b": "cfgs/train/examples/lora_wan_a14b.yaml"}  # a tiny variant with its own config


def shipped_config(family: str) -> Path:
    """The family's shipped training config (cfgs/train/examples/lora_<family>.yaml): the trainer runs it."""
    from hcpdiff.families import family_named

    return REPO_ROOT / (VARIANT_CONFIGS.get(family) or family_named(family).train_config)


def shipped_lora_group(family: str) -> dict:
    """The shipped config's transformer LoRA group (rank, alpha, layer patterns): both loops train it; a config
    without one inherits its first `_base_`'s."""
    config = yaml.safe_load(shipped_config(family).read_text())
    while "lora_transformer" not in config:
        config = yaml.safe_load((REPO_ROOT / config["_base_"][0]).read_text())
    return config["lora_transformer"][0]


def peft_target_regex(patterns: list[str]) -> str:
    """hcpdiff's `re:` patterns (each must match a module's whole dotted name) as one regex, which peft fullmatches."""
    return "|".join(f"(?:{pattern.removeprefix('re:')})" for pattern in patterns)


def demo_batch(data_dir: Path, size: int, batch_size: int) -> dict:
    """The first `batch_size` demo images at size x size (cover-resized, center-cropped) and their captions; an
    editing dataset's (make_demo_data's `edit` captions: metadata.csv) instructions, and its input images shaped as
    their targets (`condition_images`: one list of PIL images per sample), as the trainer's data gives them."""
    import csv

    from hcpdiff.data.images import load_for_bucket, to_tensor

    def load(path: Path) -> Any:
        return load_for_bucket(str(path), (size, size), (255, 255, 255))[0]

    paths = sorted(data_dir.glob("*.png"))[:batch_size]
    batch = {"pixel_values": torch.stack([to_tensor(load(path)) for path in paths])}
    if (data_dir / "metadata.csv").is_file():  # image,prompt,edit_image rows
        with open(data_dir / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = {row["image"]: row for row in csv.DictReader(f)}
        batch["prompts"] = [rows[path.name]["prompt"] for path in paths]
        batch["condition_images"] = [[load(data_dir / rows[path.name]["edit_image"])] for path in paths]
    else:
        batch["prompts"] = [path.with_suffix(".txt").read_text().strip() for path in paths]
    return batch


def make_full_width_flux(out_dir: Path, seed: int = 0, double: int = 1, single: int = 1) -> Path:
    """FLUX.1's transformer width (3072 = 24 heads x 128, joint_attention_dim 4096, pooled 768) at reduced depth
    (`double` + `single` blocks; FLUX.1 has 19 + 38), random weights; CLIP and T5 are one-layer encoders with those output widths, the VAE
    the tiny 16-channel one (8x, as FLUX's), so the conditioning has real shapes at little cost."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from hcpdiff.tools.make_tiny_model import build_tokenizer, write_slow_tokenizer_files
    from hcpdiff.tools.tiny_flux import DEV_SCHEDULER, build_flux_vae, build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer(512)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=build_flux_vae(),
                            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                            transformer=transformer)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, out_dir / "tokenizer")
    return out_dir


class FlowBareLoop:
    """The loop diffusers' LoRA training examples write for a flow-matching transformer: VAE encode, the pipeline's
    encode_prompt, noise and sigmas, the transformer, MSE to noise - latents, clipping, AdamW; every step encodes
    images and prompts. A subclass gives its family's text pipeline, latents, sigmas and transformer call."""

    family: str
    expert: str | None = None  # a model with denoising experts: the one trained (loaded alone, as the trainer does)

    def __init__(self, model_dir: str, batch: dict, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int, lr: float = 1e-4, condition_area: int | None = None):
        from peft import LoraConfig

        from hcpdiff.models import load_model_parts

        parts = load_model_parts(model_dir, expert=self.expert, expert_key="expert" if self.expert else None)
        self.expert_range = (parts.expert.sigma_min, parts.expert.sigma_max) if parts.expert else (0.0, 1.0)
        self.vae, self.transformer, self.scheduler = parts.vae, parts.transformer, parts.noise_scheduler
        encoders = [parts.components[name] for name in parts.family.text_encoders if name in parts.components]
        self.text = self.text_pipeline(parts)
        modules = (self.vae, self.transformer, *encoders)
        for module in modules:
            module.requires_grad_(False)
        group = shipped_lora_group(self.family)
        # the layers the family leaves out of hcpdiff's groups (outputs the model discards) are left out here too
        unused = sorted(parts.family.unused_layers("transformer", self.transformer))
        self.transformer.add_adapter(LoraConfig(r=group["rank"], lora_alpha=group["alpha"], init_lora_weights="gaussian",
                                                target_modules=peft_target_regex(group["layers"]),
                                                exclude_modules=unused or None))
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        for module in modules:
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            module.to(device)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.pixel_values = batch["pixel_values"].to(device, dtype)
        self.prompts = batch["prompts"]
        self.vae_factor = parts.vae_scale_factor
        # an editing family: each sample's input images (PIL, shaped as its target) and the area they are encoded at
        self.condition_images, self.condition_area = batch.get("condition_images"), condition_area

    def adapted_layers(self) -> set[str]:
        """Dotted names of the transformer layers peft put a LoRA on."""
        return {name for name, module in self.transformer.named_modules() if hasattr(module, "lora_A")}

    def step(self) -> None:
        """One optimizer step."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad():
            latents = self.encode_images()
            with autocast:
                text = self.encode_text()
        noise = torch.randn_like(latents)
        sigmas, timesteps = self.sigmas(latents)
        ones = [1] * (latents.ndim - 1)  # [B, C, H, W], or a video family's [B, C, F, H, W]
        expanded = sigmas.view(-1, *ones)
        noisy = (1.0 - expanded) * latents + expanded * noise
        with autocast:
            pred = self.predict(noisy, timesteps, text)
        weighting = compute_loss_weighting_for_sd3("none", sigmas).view(-1, *ones)
        loss = (weighting * (pred.float() - (noise - latents).float()) ** 2).reshape(latents.shape[0], -1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def text_pipeline(self, parts: Any) -> Any:
        """The family's diffusers pipeline holding the parts its encode_prompt needs."""
        raise NotImplementedError

    def encode_images(self) -> torch.Tensor:
        """The batch's clean latents [B, C, H, W], made as the family's diffusers training example makes them."""
        raise NotImplementedError

    def encode_text(self) -> dict:
        """The transformer's text keyword arguments for the batch's prompts, by the pipeline's encode_prompt."""
        raise NotImplementedError

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [B] in [0, 1] for the noise mix, the timesteps [B] the transformer is given)."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        """The transformer's velocity prediction [B, C, H, W] for noisy latents [B, C, H, W]."""
        raise NotImplementedError

    def logit_normal(self, batch: int) -> torch.Tensor:
        """Unshifted sigmas: logit-normal(0, 1), the shipped configs' sampling."""
        return compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0,
                                                     device=self.device)

    def resolution_shifted(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Sigmas shifted for `image_seq_len` packed tokens, as FluxPipeline and QwenImagePipeline shift them."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        return self.scheduler.time_shift(mu, 1.0, u)


class FluxBareLoop(FlowBareLoop):
    """diffusers' FLUX LoRA example: latents shifted and scaled, FluxPipeline.encode_prompt, logit-normal sigmas with
    the resolution shift, 2x2 packing, the transformer at sigma with guidance 1."""

    family = "flux"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                            tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
                            tokenizer_2=parts.tokenizer_2)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values).latent_dist.sample()
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def encode_text(self) -> dict:
        embeds, pooled, text_ids = self.text.encode_prompt(self.prompts, prompt_2=None, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = latents.shape[-2:]
        sigmas = self.resolution_shifted(self.logit_normal(latents.shape[0]), (height // 2) * (width // 2))
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        guidance = torch.full((batch,), 1.0, device=self.device) if self.transformer.config.guidance_embeds else None
        pred = self.transformer(hidden_states=packed.to(self.dtype), timestep=timesteps, guidance=guidance,
                                img_ids=image_ids, return_dict=False, **text)[0]
        return FluxPipeline._unpack_latents(pred, height * self.vae_factor, width * self.vae_factor, self.vae_factor)


class SD3BareLoop(FlowBareLoop):
    """diffusers' train_dreambooth_lora_sd3: latents shifted and scaled, StableDiffusion3Pipeline.encode_prompt (CLIP-L,
    CLIP-G, T5), logit-normal draws indexing the scheduler's (statically shifted) timesteps and sigmas, the transformer
    on unpacked latents at t = sigma * 1000."""

    family = "sd3"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=parts.transformer, scheduler=None, vae=None, text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
            text_encoder_3=parts.text_encoder_3, tokenizer_3=parts.tokenizer_3)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values).latent_dist.sample()
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def encode_text(self) -> dict:
        embeds, _, pooled, _ = self.text.encode_prompt(self.prompts, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = (self.logit_normal(latents.shape[0]) * self.scheduler.config.num_train_timesteps).long()
        return self.scheduler.sigmas[indices].to(self.device), self.scheduler.timesteps[indices].to(self.device)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        return self.transformer(hidden_states=noisy.to(self.dtype), timestep=timesteps, return_dict=False, **text)[0]


class QwenImageBareLoop(FlowBareLoop):
    """diffusers' train_dreambooth_lora_qwen_image: one-frame VAE latents normalised per channel,
    QwenImagePipeline.encode_prompt (states and mask), logit-normal sigmas with the resolution shift,
    QwenImagePipeline._pack_latents / _unpack_latents, the transformer at sigma with the text mask."""

    family = "qwen_image"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                                 tokenizer=parts.tokenizer)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values.unsqueeze(2)).latent_dist.sample()  # [B, C, 1, H, W]
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents)
        return ((latents - mean) / std).squeeze(2).float()

    def encode_text(self) -> dict:
        embeds, mask = self.text.encode_prompt(self.prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = latents.shape[-2:]
        sigmas = self.resolution_shifted(self.logit_normal(latents.shape[0]), (height // 2) * (width // 2))
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        batch, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.to(self.dtype), batch, channels, height, width)
        img_shapes = [[(1, height // 2, width // 2)]] * batch
        pred = self.transformer(hidden_states=packed, timestep=timesteps, img_shapes=img_shapes, return_dict=False,
                                **text)[0]
        return QwenImagePipeline._unpack_latents(pred, height * self.vae_factor, width * self.vae_factor,
                                                 self.vae_factor).squeeze(2)


class ZImageBareLoop(FlowBareLoop):
    """A Z-Image loop as diffusers' flow-matching LoRA examples write one, with ZImagePipeline's own conventions:
    FLUX-VAE latents shifted and scaled, ZImagePipeline.encode_prompt (one caption of its own length per prompt),
    logit-normal sigmas with the scheduler's static shift, the transformer on one [C, 1, H, W] frame per sample at
    1 - sigma, its output negated (it predicts x0 - noise)."""

    family = "z_image"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                              tokenizer=parts.tokenizer)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values).latent_dist.sample()
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def encode_text(self) -> dict:
        captions, _ = self.text.encode_prompt(list(self.prompts), device=self.device, do_classifier_free_guidance=False,
                                              max_sequence_length=self.max_sequence_length)
        return {"captions": captions}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = float(self.scheduler.config.shift)
        u = self.logit_normal(latents.shape[0])
        sigmas = shift * u / (1 + (shift - 1) * u)
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        frames = list(noisy.to(self.dtype).unsqueeze(2).unbind(dim=0))
        out = self.transformer(frames, 1.0 - timesteps, text["captions"], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class Krea2BareLoop(FlowBareLoop):
    """A Krea 2 loop as diffusers' flow-matching LoRA examples write one, with Krea2Pipeline's own conventions:
    one-frame Qwen-Image-VAE latents normalised per channel, Krea2Pipeline.encode_prompt (twelve tapped layers at a
    fixed length, with the mask), logit-normal sigmas with the resolution shift, Krea2Pipeline._pack_latents /
    prepare_position_ids / _unpack_latents, the transformer at sigma."""

    family = "krea2"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import Krea2Pipeline

        return Krea2Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                             tokenizer=parts.tokenizer)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values.unsqueeze(2)).latent_dist.sample()  # [B, C, 1, H, W]
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents)
        return ((latents - mean) / std).squeeze(2).float()

    def encode_text(self) -> dict:
        states, mask = self.text.encode_prompt(list(self.prompts), device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = latents.shape[-2:]
        sigmas = self.resolution_shifted(self.logit_normal(latents.shape[0]), (height // 2) * (width // 2))
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        packed = self.text._pack_latents(noisy.to(self.dtype), batch, channels, height, width)
        position_ids = self.text.prepare_position_ids(text["encoder_hidden_states"].shape[1], height // 2,
                                                      width // 2, self.device)
        pred = self.transformer(hidden_states=packed, timestep=timesteps.to(self.dtype), position_ids=position_ids,
                                return_dict=False, **text)[0]
        return self.text._unpack_latents(pred, height * self.vae_factor, width * self.vae_factor).squeeze(2)


class WanBareLoop(FlowBareLoop):
    """A Wan loop as diffusers' flow-matching LoRA examples write one, with WanPipeline's own conventions: the images
    as 1-frame clips through AutoencoderKLWan, normalised per channel by latents_mean / latents_std, WanPipeline's
    encode_prompt (fixed length, zero past each prompt), logit-normal sigmas with the sampler's static flow_shift, the
    transformer at 1000 sigma predicting noise - x0."""

    family = "wan"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=None, transformer=None,
                           scheduler=None)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values.unsqueeze(2)).latent_dist.sample()  # [B, C, 1, H, W]
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents)
        return ((latents - mean) / std).float()

    def encode_text(self) -> dict:
        embeds, _ = self.text.encode_prompt(list(self.prompts), do_classifier_free_guidance=False, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = float(self.scheduler.config.shift)  # the training scheduler's: the sampler's flow_shift
        u = self.logit_normal(latents.shape[0])
        sigmas = shift * u / (1 + (shift - 1) * u)
        return sigmas, sigmas * 1000.0

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        return self.transformer(hidden_states=noisy.to(self.dtype), timestep=timesteps, return_dict=False,
                                encoder_hidden_states=text["encoder_hidden_states"].to(self.dtype))[0]


class Ideogram4BareLoop(FlowBareLoop):
    """An Ideogram 4 loop as diffusers' flow-matching LoRA examples write one, with Ideogram4Pipeline's own
    conventions: FLUX.2-VAE latents patchified 2x2 as its decoding unpatchifies them (channels per token: patch row,
    patch column, VAE channel) and batch-normed by the VAE's statistics, Ideogram4Pipeline.encode_prompt (text padded
    to max_sequence_length, its packed ids), logit-normal sigmas around the pipeline's resolution-aware mean, the
    conditional transformer on [text rows of zeros][image tokens] at 1 - sigma, its image rows negated (it predicts
    x0 - noise)."""

    family = "ideogram4"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import Ideogram4Pipeline

        return Ideogram4Pipeline(scheduler=None, vae=None, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                 transformer=None, unconditional_transformer=None)

    def encode_images(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixel_values).latent_dist.sample()
        batch, channels, height, width = latents.shape
        cells = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 3, 5, 1, 2, 4)
        packed = cells.reshape(batch, 4 * channels, height // 2, width // 2)
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.vae.bn.running_var + self.vae.config.batch_norm_eps).view(1, -1, 1, 1)
        return ((packed - mean) / std).float()

    def encode_text(self) -> dict:
        height, width = (side // (self.vae_factor * 2) for side in self.pixel_values.shape[-2:])
        features, position_ids, segment_ids, indicator = self.text.encode_prompt(
            self.prompts, grid_h=height, grid_w=width, max_sequence_length=self.max_sequence_length,
            device=self.device)
        return {"encoder_hidden_states": features, "position_ids": position_ids, "segment_ids": segment_ids,
                "indicator": indicator}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu

        height, width = (side * self.vae_factor * 2 for side in latents.shape[-2:])
        sigmas = self.scheduler.time_shift(_resolution_aware_mu(height, width, 0.0), 1.0,
                                           self.logit_normal(latents.shape[0]))
        return sigmas, 1.0 - sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        tokens = noisy.to(self.dtype).flatten(2).transpose(1, 2)
        padding = tokens.new_zeros(batch, self.max_sequence_length, channels)
        out = self.transformer(hidden_states=torch.cat([padding, tokens], dim=1), timestep=timesteps.to(self.dtype),
                               return_dict=False, **text)[0]
        return -out[:, self.max_sequence_length:].transpose(1, 2).reshape(batch, channels, height, width)


class QwenImage21BareLoop(FlowBareLoop):
    """A Qwen-Image 2.1 loop with QwenImage21Pipeline's own conventions (diffusers has no 2.1 training example): the
    image made RGBA, one-frame VAE latents normalised per channel, QwenImage21Pipeline.encode_prompt (states, mask,
    image-slot mask), logit-normal sigmas with the resolution shift over H x W tokens, _pack_latents (a flatten), and
    one transformer call for the batch as the pipeline makes it (prompts padded, its text mask, img_mask with the
    target's slots appended)."""

    family = "qwen_image_21"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import QwenImage21Pipeline

        return QwenImage21Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                                   processor=parts.components["processor"])

    def encode_images(self) -> torch.Tensor:
        alpha = self.pixel_values.new_ones(self.pixel_values.shape[0], 1, *self.pixel_values.shape[2:])
        rgba = torch.cat([self.pixel_values, alpha], dim=1).unsqueeze(2)
        latents = self.vae.encode(rgba).latent_dist.sample()  # [B, C, 1, H, W]
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents)
        return ((latents - mean) / std).squeeze(2).float()

    def encode_text(self) -> dict:
        embeds, mask, image_pad_mask = self.text.encode_prompt(self.prompts, device=self.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask, "img_mask": image_pad_mask}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = latents.shape[-2:]
        sigmas = self.resolution_shifted(self.logit_normal(latents.shape[0]), height * width)
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import QwenImage21Pipeline

        batch, channels, height, width = noisy.shape
        packed = QwenImage21Pipeline._pack_latents(noisy.to(self.dtype), batch, channels, height, width)
        img_mask = text["img_mask"]
        img_mask = torch.cat([img_mask, img_mask.new_ones(img_mask.shape[0], packed.shape[1] // 4)], dim=1)
        pred = self.transformer(hidden_states=packed, timestep=timesteps,
                                encoder_hidden_states=text["encoder_hidden_states"],
                                encoder_hidden_states_mask=text["encoder_hidden_states_mask"],
                                img_shapes=[[(1, height, width)]] * batch, img_mask=img_mask, return_dict=False)[0]
        return QwenImage21Pipeline._unpack_latents(pred[:, -packed.shape[1]:], height, width, 1).squeeze(2)


class Flux2DevBareLoop(FlowBareLoop):
    """diffusers' FLUX.2 LoRA example as it writes the loop: VAE latents patchified 2x2 and normalised by the VAE's
    batch-norm statistics, Flux2Pipeline.encode_prompt, logit-normal sigmas with the pipeline's empirical shift
    (compute_empirical_mu at 50 steps), Flux2Pipeline's packing and ids, the transformer at sigma with guidance 1."""

    family = "flux2_dev"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import Flux2Pipeline

        return Flux2Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                             tokenizer=parts.tokenizer)

    def encode_images(self) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        latents = Flux2Pipeline._patchify_latents(self.vae.encode(self.pixel_values).latent_dist.sample())
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents)
        return ((latents - mean) / std).float()

    def encode_text(self) -> dict:
        embeds, text_ids = self.text.encode_prompt(list(self.prompts), device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        height, width = latents.shape[-2:]
        mu = compute_empirical_mu(image_seq_len=height * width, num_steps=50)
        sigmas = self.scheduler.time_shift(mu, 1.0, self.logit_normal(latents.shape[0]))
        return sigmas, sigmas

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        image_ids = Flux2Pipeline._prepare_latent_ids(noisy).to(self.device)
        guidance = torch.full((noisy.shape[0],), 1.0, device=self.device)
        pred = self.transformer(hidden_states=Flux2Pipeline._pack_latents(noisy).to(self.dtype),
                                timestep=timesteps.to(self.dtype), guidance=guidance, img_ids=image_ids,
                                return_dict=False, **text)[0]
        return Flux2Pipeline._unpack_latents_with_ids(pred, image_ids)


class Flux2KleinBareLoop(Flux2DevBareLoop):
    """FLUX.2 [klein] as the [dev] loop (the same VAE latents, empirical shift, packing and ids), its prompts by
    Flux2KleinPipeline.encode_prompt (Qwen3, hidden states 9, 18, 27 stacked) and no guidance embedding."""

    family = "flux2_klein"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(scheduler=None, vae=None, transformer=None, text_encoder=parts.text_encoder,
                                  tokenizer=parts.tokenizer)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(self.device)
        pred = self.transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy).to(self.dtype),
                                timestep=timesteps.to(self.dtype), guidance=None, img_ids=image_ids,
                                return_dict=False, **text)[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(pred, image_ids)


class WanA14BBareLoop(WanBareLoop):
    """Wan2.2 A14B's high-noise expert (`transformer`, which lora_wan_a14b.yaml trains; the low-noise one is the same
    architecture) as the Wan loop, loaded alone, its sigmas uniform over the expert's range of the shifted schedule
    (DiffSynth-Studio's way, the shipped config's sigma_sampling: uniform)."""

    family = "wan2.2-a14b"
    expert = "high_noise"

    def sigmas(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = float(self.scheduler.config.shift)
        low, high = (s / (shift - (shift - 1) * s) for s in self.expert_range)  # the shift undone
        u = low + (high - low) * torch.rand(latents.shape[0], device=self.device)
        sigmas = shift * u / (1 + (shift - 1) * u)
        return sigmas, sigmas * 1000.0


class FluxKontextBareLoop(FluxBareLoop):
    """FLUX.1 Kontext as diffusers' Kontext LoRA example and FluxKontextPipeline write it: the FLUX.1 loop (latents,
    FluxPipeline-style encode_prompt, the resolution shift on the noisy latents' sequence, guidance 1), each sample's
    input image resized to the preferred Kontext resolution nearest its aspect ratio, scaled to `condition_area`, by
    the pipeline's image processor, encoded and packed by its prepare_latents (the posterior's mode, ids with first
    coordinate 1), joined after the noisy tokens; the prediction for the input tokens dropped."""

    family = "flux_kontext"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline(scheduler=None, vae=parts.vae, transformer=None, text_encoder=parts.text_encoder,
                                   tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
                                   tokenizer_2=parts.tokenizer_2)

    def encode_text(self) -> dict:
        import math

        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        pipe, images = self.text, [sample[0] for sample in self.condition_images]
        multiple_of = pipe.vae_scale_factor * 2
        _, width, height = min((abs(images[0].width / images[0].height - w / h), w, h)
                               for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        scale = math.sqrt(self.condition_area / (width * height))
        width, height = (max(multiple_of, round(side * scale) // multiple_of * multiple_of) for side in (width, height))
        pixels = pipe.image_processor.preprocess([pipe.image_processor.resize(image, height, width)
                                                  for image in images], height, width)
        _, tokens, _, ids = pipe.prepare_latents(pixels, len(images), pipe.vae.config.latent_channels, height, width,
                                                 self.dtype, self.device, latents=torch.empty(0))  # no noise drawn
        return {**super().encode_text(), "condition_latents": tokens, "condition_ids": ids}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import FluxKontextPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxKontextPipeline._pack_latents(noisy, batch, channels, height, width).to(self.dtype)
        image_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device,
                                                                  self.dtype)
        guidance = torch.full((batch,), 1.0, device=self.device) if self.transformer.config.guidance_embeds else None
        pred = self.transformer(hidden_states=torch.cat([packed, text["condition_latents"].to(self.dtype)], dim=1),
                                timestep=timesteps, guidance=guidance, pooled_projections=text["pooled_projections"],
                                encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text["txt_ids"],
                                img_ids=torch.cat([image_ids, text["condition_ids"]], dim=0), return_dict=False)[0]
        return FluxKontextPipeline._unpack_latents(pred[:, : packed.shape[1]], height * self.vae_factor,
                                                   width * self.vae_factor, self.vae_factor)


class QwenImageEditBareLoop(QwenImageBareLoop):
    """Qwen-Image-Edit as QwenImageEditPipeline computes its inputs (diffusers has no Edit training example), on the
    Qwen-Image loop: each sample's input image resized to `condition_area` at its aspect ratio (the pipeline's
    calculate_dimensions, 1024x1024 there) by its image processor, read with the prompt by its encode_prompt
    (Qwen2.5-VL), encoded by its _encode_vae_image and packed, joined after the noisy tokens with a shape of its own
    in img_shapes; the prediction for the input tokens dropped. The prompt is not cut (the pipeline does not cut it)."""

    family = "qwen_image_edit"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import QwenImageEditPipeline

        return QwenImageEditPipeline(scheduler=None, vae=parts.vae, text_encoder=parts.text_encoder,
                                     tokenizer=parts.tokenizer, processor=parts.components["processor"],
                                     transformer=None)

    def encode_text(self) -> dict:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        pipe, images = self.text, [sample[0] for sample in self.condition_images]
        width, height, _ = calculate_dimensions(self.condition_area, images[0].width / images[0].height)
        resized = [pipe.image_processor.resize(image, height, width) for image in images]
        embeds, mask = pipe.encode_prompt(self.prompts, image=resized, device=self.device)
        pixels = pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)
        latents = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
        batch, channels, _, latent_height, latent_width = latents.shape
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                "condition_latents": pipe._pack_latents(latents, batch, channels, latent_height, latent_width),
                "condition_shapes": [(1, latent_height // 2, latent_width // 2)]}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        batch, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.to(self.dtype), batch, channels, height, width)
        img_shapes = [[(1, height // 2, width // 2), *text["condition_shapes"]]] * batch
        pred = self.transformer(hidden_states=torch.cat([packed, text["condition_latents"].to(self.dtype)], dim=1),
                                timestep=timesteps, img_shapes=img_shapes,
                                encoder_hidden_states=text["encoder_hidden_states"],
                                encoder_hidden_states_mask=text["encoder_hidden_states_mask"], return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(pred[:, : packed.shape[1]], height * self.vae_factor,
                                                 width * self.vae_factor, self.vae_factor).squeeze(2)


class QwenImageEditPlusBareLoop(QwenImageEditBareLoop):
    """Qwen-Image-Edit-2509 / 2511 as QwenImageEditPlusPipeline computes its inputs: per sample (the pipeline gives
    every prompt all its images, so one call each), its input images resized to the pipeline's CONDITION_IMAGE_SIZE
    area for its encode_prompt ("Picture 1: ..."), and preprocessed at `condition_area` (the pipeline's
    VAE_IMAGE_SIZE) for _encode_vae_image, packed and joined in order; the samples' prompt states zero-padded to the
    longest with their mask, as the pipeline pads a batch."""

    family = "qwen_image_edit_plus"

    def text_pipeline(self, parts: Any) -> Any:
        from diffusers import QwenImageEditPlusPipeline

        return QwenImageEditPlusPipeline(scheduler=None, vae=parts.vae, text_encoder=parts.text_encoder,
                                         tokenizer=parts.tokenizer, processor=parts.components["processor"],
                                         transformer=None)

    def encode_text(self) -> dict:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE,
                                                                                calculate_dimensions)

        pipe, states, tokens = self.text, [], []
        for prompt, images in zip(self.prompts, self.condition_images):
            vl_images, sample_tokens, shapes = [], [], []
            for image in images:
                width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
                vl_images.append(pipe.image_processor.resize(image, height, width))
                width, height = calculate_dimensions(self.condition_area, image.width / image.height)
                pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
                latents = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
                _, channels, _, latent_height, latent_width = latents.shape
                sample_tokens.append(pipe._pack_latents(latents, 1, channels, latent_height, latent_width))
                shapes.append((1, latent_height // 2, latent_width // 2))
            embeds, _ = pipe.encode_prompt([prompt], image=vl_images, device=self.device)
            states.append(embeds[0])
            tokens.append(torch.cat(sample_tokens, dim=1))
        longest = max(state.shape[0] for state in states)
        embeds = torch.stack([torch.cat([state, state.new_zeros(longest - state.shape[0], state.shape[1])])
                              for state in states])
        mask = torch.stack([torch.arange(longest, device=self.device) < state.shape[0] for state in states]).long()
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                "condition_latents": torch.cat(tokens), "condition_shapes": shapes}


BARE_LOOPS = {loop.family: loop for loop in (FluxBareLoop, SD3BareLoop, QwenImageBareLoop, ZImageBareLoop,
                                             Krea2BareLoop, WanBareLoop, WanA14BBareLoop, Ideogram4BareLoop,
                                             QwenImage21BareLoop, Flux2DevBareLoop, Flux2KleinBareLoop,
                                             FluxKontextBareLoop, QwenImageEditBareLoop, QwenImageEditPlusBareLoop)}
