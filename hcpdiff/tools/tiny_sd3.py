"""A tiny random-weight Stable Diffusion 3 / 3.5 pipeline, for tests and demos, built offline.

The real layout at tiny width: an SD3Transformer2DModel (MMDiT, 2x2 patches inside the transformer) with two joint
blocks, a 4-block VAE with 16 latent channels and SD3's shift / scaling factors, CLIP-L and CLIP-G (both with
projections; their penultimate states side by side, zero-padded to T5's width), a T5 encoder, and SD3's static-shift
FlowMatchEulerDiscreteScheduler. The two CLIPs differ in width and padding token, as the real ones do, so mixing them
up shows. `sd3.5` adds SD3.5-medium's differences: RMS q/k norms and a second (image-only) attention in block 0.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from hcpdiff.tools.make_tiny_model import byte_level_vocab, write_slow_tokenizer_files
from hcpdiff.tools.tiny_flux import build_t5_encoder, build_t5_tokenizer

LATENT_CHANNELS = 16
CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 48  # 768 and 1280 in SD3; both project to their own width
T5_WIDTH = 96  # 4096 in SD3; wider than the two CLIPs together (80), so their states are zero-padded as in SD3
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # SD3's vae/config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler_config.json: static shift 3


def build_clip(width: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder with a projection (SD3 pools both CLIPs' projected text)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=width,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    ))


POSTERIOR_LOGVAR = -10.0  # a trained VAE's posterior is nearly a point (std ~ 0.007), not random init's std ~ 1


def build_sd3_vae() -> AutoencoderKL:
    """4 blocks (8x, as the real VAE), 16 latent channels, no quant convs, SD3's shift and scale, and a narrow
    posterior as a trained VAE has: with random init's (std ~ 1, x 1.53 scale) each step's latent sample would be
    mostly noise that no denoiser can learn, and a one-image overfit would show nothing."""
    blocks = 4
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8, sample_size=256,
        scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # the encoder's last conv gives (mean, logvar) channels
        vae.encoder.conv_out.bias[LATENT_CHANNELS:] = POSTERIOR_LOGVAR
    return vae


def build_sd3_transformer(sd35: bool) -> SD3Transformer2DModel:
    """Two joint blocks, 2 heads of 16, 2x2 patches; position table for latents up to 128 cells (1024 px)."""
    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=64,
        dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )


def make_tiny_sd3(out_dir: str | Path, seed: int = 0, sd35: bool = False) -> Path:
    """The tiny SD3-medium pipeline, or with `sd35` the SD3.5-medium layout; returns the folder."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    vocab = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)  # pads with <|endoftext|> as CLIP-L
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!")  # as SD3's CLIP-G
    tokenizer_3 = build_t5_tokenizer(256)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pipeline = StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=build_sd3_vae(),
        text_encoder=build_clip(CLIP_L_WIDTH, len(tokenizer), bos, eos, tokenizer.pad_token_id),
        tokenizer=tokenizer,
        text_encoder_2=build_clip(CLIP_G_WIDTH, len(tokenizer_2), bos, eos, tokenizer_2.pad_token_id),
        tokenizer_2=tokenizer_2,
        text_encoder_3=build_t5_encoder(len(tokenizer_3), width=T5_WIDTH),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    for folder, clip_tokenizer in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        write_slow_tokenizer_files(clip_tokenizer, out_path / folder)
    return out_path
