"""A tiny random-weight Qwen-Image 2.1 pipeline (base or Turbo layout), for tests and demos, built offline.

The real layout at tiny width: a QwenImage21Transformer2DModel (single-stream, block-causal, `causal_condition`;
2 heads of 16, rope axes 4 + 6 + 6) on unpatched 64-channel latents of an AutoencoderKLQwenImage21 (16x spatial:
four downsampling stages, RGBA in and out, Qwen-Image 2.1's per-channel latents mean / std), a Qwen3-VL text encoder
(two text layers of 32, a one-block vision tower) and a Qwen3-VL processor (`processor/`: Qwen2-VL's PIL image
processor with Qwen3-VL's 16-pixel patches, a byte-level BPE tokenizer trained offline on the pipeline's template
words with the chat and vision tokens, and a chat template that renders a system message as Qwen3-VL's does, so
QwenImage21Pipeline's drop index is the tokenised system message, as with the real processor).

The Turbo layout differs by model_index.json's `sample_sigmas` (the sampling grid the distilled checkpoint ships;
diffusers' modular loader picks QwenImage21TurboModularPipeline by it). The scheduler config is Qwen-Image's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from hcpdiff.tools.tiny_qwen_image import SCHEDULER, build_qwen_tokenizer

TEXT_WIDTH = 32  # the text encoder's hidden size = the transformer's context_in_dim
LATENT_CHANNELS = 64  # the VAE's z_dim = the transformer's in_channels (unpatched)
NUM_LAYERS = 4  # the shipped config names blocks by pattern, not number
# QwenImage21Pipeline's t2i template words and a few caption words: the tokenizer's training text
TEMPLATE_TEXT = ("system\nComprehend and analyze the provided prompt.\nuser\nassistant\n"
                 " a red circle blue square photo of cat")
# Qwen3-VL's chat template, reduced to what QwenImage21Pipeline renders through it (one message per role, text or
# image items)
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'text' %}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# a Turbo checkpoint's model_index.json `sample_sigmas` (the tiny one's: four steps)
TURBO_SIGMAS = [1.0, 0.9, 0.75, 0.5]
VL_MAX_PIXELS = 128 * 128  # the tiny image processor's cap


def build_text_encoder(tokenizer) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL at tiny width: 2 text layers of 32 (2 heads of 16, one key/value head, interleaved multimodal rope
    sections summing to half the head), a 1-block vision tower of 16 (patches of 16) projecting to the text width."""
    pad_id = tokenizer.pad_token_id
    image_id, video_id, start_id, end_id = tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id, vision_end_token_id=end_id,
    )
    return Qwen3VLForConditionalGeneration(config)


def build_image_processor():
    """Qwen2-VL's PIL image processor (no torchvision) with Qwen3-VL's 16-pixel patches and 2x2 merge, capped at
    VL_MAX_PIXELS."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=VL_MAX_PIXELS,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_vae() -> AutoencoderKLQwenImage21:
    """16x spatial (four downsampling stages), 64 latent channels, RGBA, Qwen-Image 2.1's latents mean / std."""
    return AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1, 1],
                                    num_res_blocks=1, temperal_downsample=[False, True, True, True])


def build_transformer() -> QwenImage21Transformer2DModel:
    """NUM_LAYERS single-stream blocks, 2 heads of 16 (rope axes 4 + 6 + 6), 64 latent channels, 32-wide text."""
    return QwenImage21Transformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=NUM_LAYERS,
        attention_head_dim=16, num_attention_heads=2, context_in_dim=TEXT_WIDTH, mlp_ratio=2, axes_dims_rope=(4, 6, 6),
    )


def make_tiny_qwen_image_21(out_dir: str | Path, seed: int = 0, turbo: bool = False) -> Path:
    """The tiny Qwen-Image 2.1 pipeline in diffusers format; with `turbo`, a Turbo checkpoint's `sample_sigmas`.

    The parts are saved one by one and model_index.json written as the real model has it: transformers cannot
    save a Qwen3VLProcessor without its video processor, which needs torchvision (the processor folder holds the
    image processor's, the tokenizer's and the chat template's files)."""
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer(TEMPLATE_TEXT, vision_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    build_transformer().save_pretrained(out_path / "transformer", safe_serialization=True)
    build_vae().save_pretrained(out_path / "vae", safe_serialization=True)
    build_text_encoder(tokenizer).save_pretrained(out_path / "text_encoder", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out_path / "scheduler")
    build_image_processor().save_pretrained(out_path / "processor")
    tokenizer.save_pretrained(out_path / "processor")
    (out_path / "processor" / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    import diffusers

    index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": diffusers.__version__,
             "processor": ["transformers", "Qwen3VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"],
             "sample_sigmas": TURBO_SIGMAS if turbo else None}
    (out_path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
    return out_path
