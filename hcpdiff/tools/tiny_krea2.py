"""A tiny random-weight Krea 2 pipeline (Krea2Pipeline; base or Turbo), for tests and demos, built offline.

The real layout at tiny width: a Krea2Transformer2DModel with 4 single-stream blocks (Krea 2 has 28; the shipped
config names layers by pattern, and every prompt is 512 tokens, so depth is CPU test time), 2 query heads of 16 over
1 key/value head (grouped-query attention, as the real 48 over 12), rope axes 4 + 6 + 6, Krea 2's 2 layerwise and 2
refiner text-fusion blocks over 12 tapped text layers, 2x2 patches of 16 channels; the Qwen-Image VAE
(AutoencoderKLQwenImage, 8x, its per-channel latents mean / std; tiny_qwen_image's), a Qwen3-VL text model
(`Qwen3VLModel`, as model_index.json loads it) of 36 layers of 16, so the pipeline's default taps (hidden states 2,
5, ..., 35) read middle layers as with the real Qwen3-VL-4B, with a one-block vision tower (the class has one), and
the offline Qwen2 byte-level BPE tokenizer trained on the Qwen-Image template (its system prefix is 34 tokens, the
pipeline's drop index, and the assistant suffix 5). The scheduler config is the one Krea2Pipeline's docs name
(dynamic exponential shift, base 0.5 / max 1.15 over 256 / 6400 tokens). Turbo (`turbo`) differs only by the
pipeline's `is_distilled` in model_index.json, as the modular Krea2TurboAutoBlocks differ only in the schedule (fixed
mu 1.15) and having no guidance.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
from transformers import Qwen3VLModel

from hcpdiff.tools.tiny_qwen_image import LATENT_CHANNELS, build_qwen_tokenizer, build_qwen_vae, tiny_qwen3_vl_config

TEXT_WIDTH = 16  # Qwen3-VL's hidden size = the transformer's text_hidden_dim (2560 in Krea 2)
TEXT_LAYERS = 36  # Qwen3-VL-4B's depth: the pipeline's default taps read hidden states 2, 5, ..., 35
NUM_TAPS = 12  # the transformer's num_text_layers (len(text_encoder_select_layers))
NUM_LAYERS = 4
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential")


def build_krea2_text_encoder(vocab_size: int, pad_id: int) -> Qwen3VLModel:
    """Qwen3-VL at tiny width: 36 text layers of 16 (2 heads of 8, one key/value head, interleaved multimodal rope
    sections summing to half the head), a 1-block vision tower of 16 projecting to the text width."""
    config = tiny_qwen3_vl_config(vocab_size, pad_id, width=TEXT_WIDTH, layers=TEXT_LAYERS,
                                  max_position_embeddings=2048, deepstack_visual_indexes=[])
    return Qwen3VLModel(config)


def build_krea2_transformer() -> Krea2Transformer2DModel:
    """4 blocks of 32 (2 query heads of 16 over 1 key/value head, rope axes 4 + 6 + 6), 2 + 2 text-fusion blocks of
    the text width over 12 taps, 2x2 patches of 16 channels."""
    return Krea2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS, num_layers=NUM_LAYERS, attention_head_dim=16, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=TEXT_WIDTH,
        num_text_layers=NUM_TAPS, text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        axes_dims_rope=(4, 6, 6),
    )


def randomize_tables(transformer: Krea2Transformer2DModel, generator: torch.Generator) -> None:
    """Small random values in the zero-initialised norms and modulation tables (the real checkpoint's are trained):
    with zeros, every block's gates are 0 and a LoRA inside a block would change nothing."""
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith("scale_shift_table") or "norm" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_tiny_krea2(out_dir: str | Path, seed: int = 0, turbo: bool = False) -> Path:
    """The tiny Krea 2 pipeline in diffusers format; `turbo` sets the pipeline's is_distilled (Krea 2 Turbo's
    model_index.json), which is all that tells it from the base (Raw) one."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = build_krea2_transformer()
    randomize_tables(transformer, torch.Generator().manual_seed(seed))
    pipeline = Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_qwen_vae(),
        text_encoder=build_krea2_text_encoder(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
        transformer=transformer, is_distilled=turbo,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
