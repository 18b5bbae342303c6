"""A tiny random-weight Ideogram 4 pipeline (Ideogram4Pipeline), for tests and demos, built offline.

The real layout at tiny width and depth: two Ideogram4Transformer2DModel of 2 blocks (the real one has 34; the
shipped config names layers by pattern), width 32 (2 heads of 16, MRoPE sections (4, 2, 2) over the 8 frequencies of
a head, as (24, 20, 20) over the real 128), 128 input channels (32 FLUX.2 VAE channels in 2x2 patches) and text
features 13 x 16 wide (the pipeline concatenates 13 hidden states of its encoder): the conditional `transformer` and
the `unconditional_transformer` of the asymmetric guidance, with different weights. The VAE is tiny_flux2's FLUX.2 VAE
(4 blocks, 8x, random batch-norm statistics over the 128 patchified channels). The text encoder is a head-less
Qwen3VLModel with Qwen3-VL-8B's 36 text layers (the pipeline taps decoder layers 0, 3, ..., 33 and 35 by number) at
width 16, and a one-block vision tower (the class has one; text to image never runs it). The tokenizer is the offline
Qwen2 byte-level BPE of tiny_qwen_image with a chat template that renders a user message of text items as Qwen3-VL's
does. The scheduler config is a plain FlowMatchEulerDiscreteScheduler with shift 1 and no dynamic shifting: the
pipeline sets its own logit-normal sigmas, which any other shift would distort. The optional prompt_enhancer_head is
left out (as in a checkpoint loaded without it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel
from transformers import Qwen2Tokenizer, Qwen3VLModel

from hcpdiff.tools.tiny_flux2 import LATENT_CHANNELS, build_flux2_vae
from hcpdiff.tools.tiny_qwen_image import build_qwen_tokenizer, tiny_qwen3_vl_config

TEXT_WIDTH = 16  # Qwen3-VL's hidden size (4096 in the 8B); the transformer reads 13 layers side by side
TEXT_LAYERS = 36  # Qwen3-VL-8B's depth: the pipeline's taps (QWEN3_VL_ACTIVATION_LAYERS) end at layer 35
NUM_TAPS = 13  # len(QWEN3_VL_ACTIVATION_LAYERS)
NUM_LAYERS = 2  # transformer blocks (34 in Ideogram 4)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# What Qwen3-VL's chat template renders for Ideogram4Pipeline's one user message of text items with
# add_generation_prompt; its image / video / tool branches are left out.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}{%- if item['type'] == 'text' %}{{ item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_ideogram4_tokenizer() -> Qwen2Tokenizer:
    """The offline byte-level BPE Qwen2 tokenizer with a Qwen3-VL chat template for one message."""
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_ideogram4_text_encoder(vocab_size: int, pad_id: int) -> Qwen3VLModel:
    """Head-less Qwen3-VL: 36 text layers of 16 (2 heads of 8, one key/value head, interleaved multimodal rope over
    sections (2, 1, 1)), a one-block vision tower of 16 projecting to the text width."""
    return Qwen3VLModel(tiny_qwen3_vl_config(vocab_size, pad_id, width=TEXT_WIDTH, layers=TEXT_LAYERS,
                                             max_position_embeddings=4096, patch_size=14, num_position_embeddings=64,
                                             deepstack_visual_indexes=[0]))


def build_ideogram4_transformer() -> Ideogram4Transformer2DModel:
    """2 blocks at width 32 (2 heads of 16, MRoPE sections (4, 2, 2)), 128 input channels, 13 x 16 text features."""
    return Ideogram4Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS, num_layers=NUM_LAYERS, attention_head_dim=16, num_attention_heads=2,
        intermediate_size=64, adaln_dim=16, llm_features_dim=NUM_TAPS * TEXT_WIDTH, rope_theta=5_000_000,
        mrope_section=(4, 2, 2),
    )


def make_tiny_ideogram4(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny Ideogram 4 pipeline in diffusers format."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_ideogram4_tokenizer()
    pipeline = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_flux2_vae(),
        text_encoder=build_ideogram4_text_encoder(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
        transformer=build_ideogram4_transformer(), unconditional_transformer=build_ideogram4_transformer(),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
