"""A tiny random-weight SDXL pipeline (two CLIP text encoders, text_time micro-conditioning), for tests and demos."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hcpdiff.tools.make_tiny_model import (TEXT_WIDTH, TINY_UNET_LAYOUT, build_tokenizer, build_vae,
                                          write_slow_tokenizer_files)

TIME_EMBED_DIM = 8  # per time id; SDXL uses 256
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def text_config(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextConfig:
    """2-layer, 32-wide CLIP (gelu, as both of SDXL's encoders), projecting to 32."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def build_sdxl_unet() -> UNet2DConditionModel:
    """2-level U-Net conditioned on both encoders' states (32 + 32 wide) and on pooled text + time ids."""
    return UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # the pooled embeds of encoder 2 (its projection_dim) next to the embedded time ids
        projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED_DIM + TEXT_WIDTH,
        norm_num_groups=32,
    )


def build_sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler SDXL base ships with: Euler, scaled-linear betas 0.00085 -> 0.012, epsilon."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )


def make_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline with weights drawn from `seed`, save it to `out_dir`; returns the folder."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    pipeline = StableDiffusionXLPipeline(
        vae=build_vae(),
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=build_sdxl_unet(),
        scheduler=build_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        write_slow_tokenizer_files(tokenizer, out_path / folder)
    return out_path
