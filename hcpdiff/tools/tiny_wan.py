"""Tiny random-weight Wan text-to-video pipelines (Wan2.1 T2V, Wan2.2 TI2V 5B, Wan2.2 A14B's two experts), for tests
and demos, built offline.

The real layouts at tiny width: a WanTransformer3DModel with (1, 2, 2) patches (2 heads of 16, 2 blocks), a UMT5
encoder (`UMT5EncoderModel`, as model_index.json loads it) over a unigram T5 tokenizer from a vocabulary list, and the
3-D causal VAE `AutoencoderKLWan` with its 4x temporal and 8x spatial compression (clips of 4k + 1 frames), Wan2.1's
per-channel latents mean / std. Wan2.2 TI2V 5B: the residual VAE with 2x2 pixel patches (16x spatial, 48 latent
channels) and the pipeline's `expand_timesteps` (one timestep per latent token). Wan2.2 A14B: a high-noise
`transformer` and a low-noise `transformer_2` split at `boundary_ratio` 0.875. Schedulers as the real
scheduler_config.json: UniPC with flow sigmas and a static flow shift (3 for Wan2.1 480p, 5 for TI2V, 12 for A14B).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from hcpdiff.tools.tiny_flux import build_t5_tokenizer

TEXT_WIDTH = 32  # UMT5-XXL's 4096 (the transformer's text_dim)
NUM_LAYERS = 2  # the shipped config names blocks by pattern, not number
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
VARIANTS = ("wan", "wan2.2-ti2v", "wan2.2-a14b")
FLOW_SHIFTS = {"wan": 3.0, "wan2.2-ti2v": 5.0, "wan2.2-a14b": 12.0}
A14B_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B-Diffusers' model_index.json


def build_wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The shipped sampler: UniPC over flow-matching sigmas with a static shift (flow_prediction)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=flow_shift)


def build_umt5_encoder(vocab_size: int) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder (gated-gelu, per-layer relative attention bias, as UMT5-XXL), 32 wide."""
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def build_wan_vae(ti2v: bool = False) -> AutoencoderKLWan:
    """Wan2.1's VAE layout at base width 8 (three spatial and two temporal downsamples: 8x and 4x, 16 latent
    channels); with `ti2v` Wan2.2's residual VAE with 2x2 pixel patches (16x spatial) and 48 latent channels."""
    if not ti2v:
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    generator = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                            out_channels=12,
                            scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=(torch.randn(48, generator=generator) * 0.3).tolist(),
                            latents_std=(1.0 + torch.rand(48, generator=generator)).tolist())


def build_wan_transformer(latent_channels: int = 16) -> WanTransformer3DModel:
    """(1, 2, 2) patches, 2 heads of 16 (rope over frames, height and width), conditioned on 32-wide text."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
        out_channels=latent_channels, text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    )


def make_tiny_wan(out_dir: str | Path, seed: int = 0, variant: str = "wan") -> Path:
    """The tiny Wan pipeline of `variant` (VARIANTS) in diffusers format."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    ti2v = variant == "wan2.2-ti2v"
    channels = 48 if ti2v else 16
    extra = {}
    if variant == "wan2.2-a14b":
        extra = dict(transformer_2=build_wan_transformer(channels), boundary_ratio=A14B_BOUNDARY_RATIO)
    pipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=build_umt5_encoder(len(tokenizer)), vae=build_wan_vae(ti2v),
        transformer=build_wan_transformer(channels), scheduler=build_wan_scheduler(FLOW_SHIFTS[variant]),
        expand_timesteps=ti2v, **extra,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
