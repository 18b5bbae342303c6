"""FLUX parts of tools/bench_train_step.py: the bare diffusers + peft flow-matching loop, the full-width model builder,
and the batch the bare loop trains on. Not run on its own."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
FLUX_CONFIG = REPO_ROOT / "cfgs/train/examples/lora_flux.yaml"


def shipped_lora_group() -> dict:
    """The shipped FLUX config's transformer LoRA group (rank, alpha, layer patterns): both loops train it."""
    return yaml.safe_load(FLUX_CONFIG.read_text())["lora_transformer"][0]


def peft_target_regex(patterns: list[str]) -> str:
    """hcpdiff's `re:` patterns (each must match a module's whole dotted name) as one regex, which peft fullmatches."""
    return "|".join(f"(?:{pattern.removeprefix('re:')})" for pattern in patterns)


def demo_batch(data_dir: Path, size: int, batch_size: int) -> dict:
    """The first `batch_size` demo images at size x size (cover-resized, center-cropped) and their captions."""
    from hcpdiff.data.images import load_for_bucket, to_tensor

    paths = sorted(data_dir.glob("*.png"))[:batch_size]
    pixels = [to_tensor(load_for_bucket(str(path), (size, size), (255, 255, 255))[0]) for path in paths]
    prompts = [path.with_suffix(".txt").read_text().strip() for path in paths]
    return {"pixel_values": torch.stack(pixels), "prompts": prompts}


def make_full_width_flux(out_dir: Path, seed: int = 0) -> Path:
    """FLUX.1's transformer width (3072 = 24 heads x 128, joint_attention_dim 4096, pooled 768) at reduced depth
    (1 double + 1 single block), random weights; CLIP and T5 are one-layer encoders with those output widths, the VAE
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
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=build_flux_vae(),
                            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                            transformer=transformer)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, out_dir / "tokenizer")
    return out_dir


class FluxBareLoop:
    """The loop diffusers' FLUX LoRA example writes: VAE encode (shift, scale), FluxPipeline.encode_prompt, logit-normal
    sigmas with the resolution shift, 2x2 packing, the transformer at sigma with guidance 1, MSE to noise - latents,
    clipping, AdamW. Every step encodes images and prompts."""

    def __init__(self, model_dir: str, batch: dict, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int = 512, lr: float = 1e-4):
        from diffusers import FluxPipeline
        from peft import LoraConfig

        from hcpdiff.models import load_model_parts

        parts = load_model_parts(model_dir)
        self.vae, self.transformer, self.scheduler = parts.vae, parts.transformer, parts.noise_scheduler
        encoders = (parts.text_encoder, parts.text_encoder_2)
        self.text = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=encoders[0],
                                 tokenizer=parts.tokenizer, text_encoder_2=encoders[1], tokenizer_2=parts.tokenizer_2)
        modules = (self.vae, self.transformer, *encoders)
        for module in modules:
            module.requires_grad_(False)
        group = shipped_lora_group()
        self.transformer.add_adapter(LoraConfig(r=group["rank"], lora_alpha=group["alpha"], init_lora_weights="gaussian",
                                                target_modules=peft_target_regex(group["layers"])))
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
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def adapted_layers(self) -> set[str]:
        """Dotted names of the transformer layers peft put a LoRA on."""
        return {name for name, module in self.transformer.named_modules() if hasattr(module, "lora_A")}

    def step(self) -> None:
        """One optimizer step."""
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from diffusers.training_utils import compute_density_for_timestep_sampling

        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        config = self.scheduler.config
        with torch.no_grad():
            latents = self.vae.encode(self.pixel_values).latent_dist.sample()
            latents = ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()
            with autocast:
                embeds, pooled, text_ids = self.text.encode_prompt(self.prompts, prompt_2=None, device=self.device,
                                                                   max_sequence_length=self.max_sequence_length)
        batch, channels, height, width = latents.shape
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0,
                                                  device=self.device)
        mu = calculate_shift((height // 2) * (width // 2), config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
        sigmas = self.scheduler.time_shift(mu, 1.0, u)
        expanded = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - expanded) * latents + expanded * noise
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        guidance = torch.full((batch,), 1.0, device=self.device) if self.transformer.config.guidance_embeds else None
        with autocast:
            pred = self.transformer(hidden_states=packed.to(self.dtype), timestep=sigmas, guidance=guidance,
                                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                    img_ids=image_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, height * self.vae_factor, width * self.vae_factor, self.vae_factor)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
