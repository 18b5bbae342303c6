"""A tiny random-weight Qwen-Image pipeline, for tests and demos, built offline.

The real layout at tiny width: a QwenImageTransformer2DModel with Qwen-Image's 60 blocks, an
AutoencoderKLQwenImage (8x spatial, 16 latent channels, Qwen-Image's per-channel latents mean / std), a Qwen2.5-VL
text encoder (two text layers, a one-block vision tower: the class has one) and a Qwen2 byte-level BPE tokenizer
trained offline on the prompt template's words, so the template's system prefix is 34 tokens as with the real
tokenizer and QwenImagePipeline drops exactly it. The scheduler is Qwen-Image's (exponential resolution shift).

Qwen-Image-Edit (`make_tiny_qwen_image_edit`) has the same parts plus the VL processor (`processor/`: Qwen2-VL's
image processor, capped at 112x112 pixels here, and the tokenizer), a tokenizer with the vision tokens whose edit
template's system prefix is 64 tokens (QwenImageEditPipeline's drop index), and a 2-block transformer: the input
image's 1024x1024-area latents join the sequence (4096 tokens), which 60 blocks would make slow on a CPU, and a VAE
of width 2 (PyTorch's CPU 3-D convolutions make 1024x1024 encodes slow).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3VLConfig

TEXT_WIDTH = 32  # the text encoder's hidden size = the transformer's joint_attention_dim (3584 in Qwen-Image)
LATENT_CHANNELS = 16
NUM_LAYERS = 60  # Qwen-Image's depth: the last block's text output is unused, which the shipped config allows for
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # Qwen2.5-VL's
# Qwen-Image's scheduler/scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
# the tokenizer's training text: QwenImagePipeline's prompt template (so its system prefix is 34 tokens, as the
# pipeline's drop index assumes) and a few caption words
TEMPLATE_TEXT = ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                 "relationships of the objects and background:\nuser\nassistant\n a red circle blue square photo")
# QwenImageEditPipeline's template words (its system prefix is then 64 tokens, the pipeline's drop index)
EDIT_TEMPLATE_TEXT = ("system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
                      "background), then explain how the user's text instruction should alter or modify the image. "
                      "Generate a new image that meets the user's requirements while maintaining consistency with the "
                      "original input where appropriate.\nuser\nassistant\n a red circle blue square photo make it")
EDIT_NUM_LAYERS = 2
EDIT_VAE_WIDTH = 2  # the input image is VAE-encoded at 1024x1024: 2 s on a CPU at this width (22 s at 8)
VL_MAX_PIXELS = 112 * 112  # the tiny processor's cap: 8x8 patches of 14, 16 image tokens after the 2x2 merge


def build_qwen_tokenizer(text: str = TEMPLATE_TEXT, vision_tokens: bool = False) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer trained offline (tokenizers' BpeTrainer) on `text`: the 256 byte
    characters plus merges that make each of its words one token, and the chat-template special tokens
    `<|endoftext|>` (also padding), `<|im_start|>`, `<|im_end|>` (and with `vision_tokens` Qwen2.5-VL's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # enough merges to spell every training word whole: BPE then splits those words as it learned them
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([text], trainer)
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" "))
              for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges)
    specials = [*SPECIAL_TOKENS[1:], *(VISION_TOKENS if vision_tokens else ())]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.model_max_length = 32768
    return tokenizer


def build_qwen_text_encoder(vocab_size: int, pad_id: int, tokenizer: Qwen2Tokenizer | None = None
                            ) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL at tiny width: 2 text layers of 32 (2 heads of 16, one key/value head, multimodal rope sections
    summing to half the head), a 1-block vision tower of 16 projecting to the text width. With a `tokenizer` that
    has the vision tokens, the config names their ids (the vision tower then reads images)."""
    last = vocab_size - 1
    image_id, video_id, start_id, end_id = (last,) * 4 if tokenizer is None else tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0]),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id, vision_end_token_id=end_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_vae(base_dim: int = 8) -> AutoencoderKLQwenImage:
    """8x spatial (three downsamples, as the real VAE), 16 latent channels, Qwen-Image's default latents mean / std."""
    return AutoencoderKLQwenImage(base_dim=base_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def build_qwen_transformer(num_layers: int = NUM_LAYERS) -> QwenImageTransformer2DModel:
    """Qwen-Image's 60 blocks (the shipped config names blocks by number), 2 heads of 16 (rope axes 4 + 6 + 6), 2x2
    patches of 16 channels, conditioned on 32-wide text."""
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS * 4, out_channels=LATENT_CHANNELS, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    )


def make_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny Qwen-Image pipeline in diffusers format."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_qwen_vae(),
        text_encoder=build_qwen_text_encoder(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
        transformer=build_qwen_transformer(),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path


def build_vl_image_processor() -> Any:
    """Qwen2-VL's image processor (patches of 14, 2x2 merge, 2 frames per patch) capped at VL_MAX_PIXELS; the PIL
    one, which needs no torchvision."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=VL_MAX_PIXELS)


def make_tiny_qwen_image_edit(out_dir: str | Path, seed: int = 0, pipeline_class: str = "QwenImageEditPipeline"
                              ) -> Path:
    """The tiny Qwen-Image-Edit pipeline in diffusers format, `processor/` as the real model ships it (the image
    processor's and the tokenizer's files), so QwenImageEditPipeline's own loader reads it where torchvision is
    installed, and hcpdiff's family loader everywhere. `pipeline_class` QwenImageEditPlusPipeline: Edit-2509 /
    2511's folder (the same parts)."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer(EDIT_TEMPLATE_TEXT, vision_tokens=True)
    # saved without its processor: transformers cannot save a Qwen2VLProcessor without a video processor, which
    # needs torchvision; the folder's processor/ and model_index.json entry are written as the real model has them
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_qwen_vae(EDIT_VAE_WIDTH),
        text_encoder=build_qwen_text_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer), tokenizer=tokenizer,
        transformer=build_qwen_transformer(EDIT_NUM_LAYERS),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    build_vl_image_processor().save_pretrained(out_path / "processor")
    tokenizer.save_pretrained(out_path / "processor")
    index_path = out_path / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index.update(_class_name=pipeline_class, processor=["transformers", "Qwen2VLProcessor"])
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
    return out_path


def tiny_qwen3_vl_config(vocab_size: int, pad_id: int, *, width: int, layers: int, max_position_embeddings: int,
                         **vision: object) -> Qwen3VLConfig:
    """A Qwen3-VL at tiny width for the families that tap its text layers by number (Krea 2, Ideogram 4): `layers` text
    layers of `width` (2 heads of 8, one key/value head, interleaved multimodal rope over sections (2, 1, 1)) and a
    one-block vision tower of 16 projecting to the text width; `vision` adds to or overrides its settings."""
    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=max_position_embeddings, pad_token_id=pad_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": width,
                       **vision},
        image_token_id=vocab_size - 1, video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 1,
        vision_end_token_id=vocab_size - 1,
    )
