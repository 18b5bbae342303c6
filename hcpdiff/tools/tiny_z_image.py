"""A tiny random-weight Z-Image pipeline (base or Turbo layout), for tests and demos, built offline.

The real layout at tiny width: a ZImageTransformer2DModel with Z-Image's 30 single-stream blocks and 2 noise / 2
context refiner blocks (2 heads of 16, rope axes 4 + 6 + 6), FLUX's 16-channel VAE (shift / scale factors as Z-Image's
vae/config.json), a 3-layer Qwen3 text encoder (`Qwen3Model`, as model_index.json loads it) and a Qwen2 byte-level BPE
tokenizer trained offline, with a chat template that renders a user message as Qwen3's own template does. The
scheduler config is Z-Image's (static shift 6) or Z-Image-Turbo's (static shift 3).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from hcpdiff.tools.tiny_flux import LATENT_CHANNELS, build_flux_vae
from hcpdiff.tools.tiny_qwen_image import build_qwen_tokenizer

TEXT_WIDTH = 32  # Qwen3's hidden size = the transformer's cap_feat_dim (2560 in Z-Image)
NUM_LAYERS = 30  # Z-Image's depth (the shipped config names layers by pattern, not number)
# scheduler/scheduler_config.json of Tongyi-MAI/Z-Image and of Tongyi-MAI/Z-Image-Turbo
BASE_SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# What Qwen3's chat template renders for ZImagePipeline's one user message with add_generation_prompt (thinking on:
# no empty <think> block); the real template's tool and multi-turn branches are left out.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_z_image_tokenizer() -> Qwen2Tokenizer:
    """The offline byte-level BPE Qwen2 tokenizer (tiny_qwen_image's) with Qwen3's chat template for one message."""
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_z_image_text_encoder(vocab_size: int, pad_id: int) -> Qwen3Model:
    """Qwen3 at tiny width: 3 layers of 32 (2 heads of 16, one key/value head, q/k norms), so the penultimate hidden
    state the pipeline reads is a middle layer's output, as with the real 36 layers."""
    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id,
    ))


def build_z_image_transformer() -> ZImageTransformer2DModel:
    """Z-Image's 30 blocks and 2 + 2 refiners at width 32 (2 heads of 16, rope axes 4 + 6 + 6; Z-Image-Turbo's axes
    lengths), 2x2 patches of 16 channels, conditioned on 32-wide text."""
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=NUM_LAYERS,
        n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_WIDTH, axes_dims=[4, 6, 6],
        axes_lens=[1536, 512, 512],
    )


def make_tiny_z_image(out_dir: str | Path, seed: int = 0, turbo: bool = False) -> Path:
    """The tiny Z-Image pipeline in diffusers format; with `turbo`, Z-Image-Turbo's scheduler config (shift 3)."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_z_image_tokenizer()
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(TURBO_SCHEDULER if turbo else BASE_SCHEDULER)),
        vae=build_flux_vae(), text_encoder=build_z_image_text_encoder(len(tokenizer), tokenizer.pad_token_id),
        tokenizer=tokenizer, transformer=build_z_image_transformer(),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
