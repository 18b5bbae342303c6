"""What the U-Net is conditioned on, per model family: prompts (and batch extras) -> U-Net keyword arguments."""
from __future__ import annotations

from typing import Any

import torch

from hcpdiff.models.prompt_encoder import PromptEncoder
from hcpdiff.models.transfer import to_device


class SDConditioner:
    """SD1.x / 2.x: the text encoder's hidden states are the U-Net's `encoder_hidden_states`."""

    def __init__(self, prompt_encoder: PromptEncoder):
        self.prompt_encoder = prompt_encoder

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """U-Net kwargs for one batch: {"encoder_hidden_states": [B, 77 * repeats, D]}."""
        input_ids = to_device(self.prompt_encoder.tokenize(prompts), device)  # a blocking copy would sync the step
        return {"encoder_hidden_states": self.prompt_encoder.encode(input_ids)}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (DDP) text encoder for the forward pass, so its LoRA gradients synchronise."""
        self.prompt_encoder.text_encoder = text_encoder

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt and the encoder's weights decides the output (part of text-cache keys)."""
        return {"tokenizer_repeats": self.prompt_encoder.repeats, "clip_skip": self.prompt_encoder.clip_skip}


def build_conditioner(parts: Any, tokenizer_repeats: int = 1, clip_skip: int = 0) -> Any:
    """The conditioner of the model's family (`parts` is a ModelParts): SDConditioner, SDXLConditioner, ..."""
    return parts.family.build_conditioner(parts.components, tokenizer_repeats, clip_skip)


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside dicts, lists and tuples) cast to `dtype`; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: cast_floats(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(item, dtype) for item in value)
    return value
