"""A tiny random-weight FLUX.1 pipeline (dev or schnell layout, or FLUX.1 Kontext), for tests and demos, built offline.

The real layout at tiny width: a FluxTransformer2DModel with two double-stream and two single-stream blocks, a
4-block VAE with 16 latent channels and FLUX's shift / scaling factors, CLIP-L (pooled) and a T5 encoder (sequence),
and a T5 tokenizer built from a vocabulary list (no sentencepiece file, no download).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                       FluxTransformer2DModel)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from hcpdiff.tools.make_tiny_model import (TEXT_WIDTH, build_text_encoder, build_tokenizer,
                                          write_slow_tokenizer_files)

LATENT_CHANNELS = 16  # FLUX's VAE; packed 2x2 into 64-channel tokens
T5_WIDTH = 32
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611  # FLUX.1's vae/config.json
# FLUX.1-dev's scheduler_config.json; schnell's has no dynamic shifting and shift 1
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def build_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """A unigram T5 tokenizer from a vocabulary list: pad, eos, unk, then printable characters with and without
    the word-start mark (every word splits into characters)."""
    characters = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -1.5) for c in characters] + [(c, -1.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_t5_encoder(vocab_size: int, width: int = T5_WIDTH) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated-gelu, as FLUX's and SD3's T5-XXL), 32 wide unless told."""
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def build_flux_vae(width: int = 8, mid_attention: bool = True) -> AutoencoderKL:
    """4 blocks (8x, as the real VAE) of `width`, 2x, 2x, 2x channels, 16 latent channels, no quant convs, FLUX's
    shift and scale; `mid_attention` False leaves out the middle block's self-attention."""
    blocks = 4
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=width, sample_size=256,
        scaling_factor=FLUX_VAE_SCALE, shift_factor=FLUX_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=mid_attention,
    )


def build_flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    """Two double- and two single-stream blocks, 2 heads of 16 (rope axes 4 + 6 + 6), conditioned on 32-wide text."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def make_tiny_flux(out_dir: str | Path, seed: int = 0, schnell: bool = False, kontext: bool = False) -> Path:
    """The tiny FLUX.1-dev pipeline (guidance embedding, resolution shift), or with `schnell` the schnell layout; with
    `kontext` the same parts as a FluxKontextPipeline (FLUX.1 Kontext [dev]: dev's transformer and scheduler)."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer_2 = build_t5_tokenizer(256 if schnell else 512)
    pipeline = (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else DEV_SCHEDULER)),
        # Kontext's input images are encoded at the pipeline's ~1 megapixel: a narrower VAE without mid-block
        # attention (16384 tokens there) encodes one in 0.5 s on a CPU instead of 2.3 s
        vae=build_flux_vae(4, mid_attention=False) if kontext else build_flux_vae(),
        text_encoder=build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id),
        tokenizer=tokenizer,
        text_encoder_2=build_t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=build_flux_transformer(guidance_embeds=not schnell),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, out_path / "tokenizer")
    return out_path


def make_tiny_flux_kontext(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny FLUX.1 Kontext [dev] pipeline (model_index names FluxKontextPipeline)."""
    return make_tiny_flux(out_dir, seed=seed, kontext=True)
