"""A tiny random-weight FLUX.2 [klein] pipeline (Flux2KleinPipeline), for tests and demos, built offline.

The real layout at tiny width and depth: a Flux2Transformer2DModel with 2 double-stream and 4 single-stream blocks
(klein 4B has 5 and 20; the shipped config names layers by pattern, and every prompt is 512 tokens, so depth is CPU
test time; 2 heads of 16, rope axes 4 x 4, no guidance embedding, 128 input channels = 32 VAE channels in 2x2
patches), the FLUX.2 VAE (AutoencoderKLFlux2: 4 blocks, 8x, 32 latent channels, its batch-norm statistics over the 128
patchified channels, set to random values here so that the normalisation is not the identity, and a small posterior
std), a 28-layer Qwen3ForCausalLM text encoder (the pipeline reads hidden states 9, 18 and 27, so 27 must be a
middle layer, as in the real 36) and the offline Qwen2 byte-level BPE tokenizer with Qwen3's chat template
(tiny_z_image's). The scheduler config is FLUX.1-dev's, as
diffusers' convert_flux2_to_diffusers writes it (dynamic shifting; the pipeline computes its own mu).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from hcpdiff.tools.tiny_z_image import build_z_image_tokenizer

TEXT_WIDTH = 16  # Qwen3's hidden size; the transformer reads 3 stacked layers: joint_attention_dim = 3 x 16
TEXT_LAYERS = 28  # > 27, the deepest hidden state Flux2KleinPipeline reads (Qwen3-4B / 8B have 36)
LATENT_CHANNELS = 32  # the FLUX.2 VAE's; 2x2 patchified: 128 transformer input channels
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def build_flux2_vae(width: int = 8) -> AutoencoderKLFlux2:
    """4 blocks (8x, as the real VAE) of `width`, 2x, 2x, 2x channels, 32 latent channels, quant convs (as the real
    one), random batch-norm running statistics (the real ones are the latent distribution's; the default 0 / 1 would
    test nothing) and a small posterior std."""
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=width, sample_size=256,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
        # a posterior std of about 0.05, as a trained VAE's is small: random weights give about 1, and sampled latents
        # that vary that much from step to step leave a tiny model nothing to overfit
        vae.quant_conv.weight[LATENT_CHANNELS:] = 0.0
        vae.quant_conv.bias[LATENT_CHANNELS:] = -6.0
    return vae


def build_flux2_text_encoder(vocab_size: int, pad_id: int) -> Qwen3ForCausalLM:
    """Qwen3 at tiny width: 28 layers of 16 (2 heads of 8, one key/value head, q/k norms)."""
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id, tie_word_embeddings=True,
    ))


def build_flux2_transformer() -> Flux2Transformer2DModel:
    """2 double and 4 single blocks at width 32 (2 heads of 16, rope axes 4 x 4), no guidance embedding."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    )


def make_tiny_flux2_klein(out_dir: str | Path, seed: int = 0, distilled: bool = False) -> Path:
    """The tiny FLUX.2 [klein] pipeline in diffusers format; `distilled` sets the pipeline's is_distilled (the
    step-distilled klein checkpoints' model_index.json), which is all that tells them from the base ones."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_z_image_tokenizer()
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_flux2_vae(),
        text_encoder=build_flux2_text_encoder(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
        transformer=build_flux2_transformer(), is_distilled=distilled,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
