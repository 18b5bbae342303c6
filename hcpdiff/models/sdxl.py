"""SDXL conditioning: two CLIP encoders' penultimate states side by side, pooled text and size/crop time ids."""
from __future__ import annotations

from typing import Any

import torch

from hcpdiff.models.prompt_encoder import PromptEncoder
from hcpdiff.models.transfer import to_device


def encode_penultimate(prompt_encoder: PromptEncoder, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [B, 77 * repeats, D] of layer -(clip_skip + 2), no final norm; first chunk's pooled output [B, P]).

    As diffusers' SDXL encode_prompt: SDXL always reads the penultimate layer, and its pooled
    text is output [0] of CLIPTextModelWithProjection (only encoder 2's is used).
    """
    batch_size, repeats, chunk_len = input_ids.shape[0], prompt_encoder.repeats, prompt_encoder.chunk_len
    model = getattr(prompt_encoder.text_encoder, "module", prompt_encoder.text_encoder)
    chunks = input_ids.reshape(batch_size * repeats, chunk_len).to(model.device)
    output = prompt_encoder.text_encoder(chunks, output_hidden_states=True)
    hidden = output.hidden_states[-(prompt_encoder.clip_skip + 2)]
    pooled = output[0].reshape(batch_size, repeats, -1)[:, 0] if output[0].ndim == 2 else None
    return hidden.reshape(batch_size, repeats * chunk_len, hidden.shape[-1]), pooled


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """[B, 6] = (original h, w, crop top, left, target h, w) per sample, as SDXL was trained on."""
    return torch.cat([original_size, crop_top_left, target_size], dim=-1).float()


class SDXLConditioner:
    """SDXL: `encoder_hidden_states` from both encoders, plus `added_cond_kwargs` (pooled text, time ids)."""

    def __init__(self, prompt_encoder: PromptEncoder, prompt_encoder_2: PromptEncoder, vae_scale_factor: int = 8):
        self.prompt_encoders = [prompt_encoder, prompt_encoder_2]
        self.vae_scale_factor = vae_scale_factor

    def encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, 77 * repeats, D1 + D2], pooled_prompt_embeds [B, P]) for `prompts`."""
        hidden_states, pooled = [], None
        for prompt_encoder in self.prompt_encoders:
            input_ids = to_device(prompt_encoder.tokenize(prompts), device)
            hidden, pooled = encode_penultimate(prompt_encoder, input_ids)
            hidden_states.append(hidden)
        return torch.cat(hidden_states, dim=-1), pooled

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """U-Net kwargs for one batch; sizes come from the batch's `original_size` / `crop_top_left` when present."""
        prompt_embeds, pooled = self.encode(prompts, device)
        time_ids = to_device(self.batch_time_ids(batch, len(prompts)), device)  # not a blocking copy: no sync
        return {"encoder_hidden_states": prompt_embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def batch_time_ids(self, batch: dict[str, Any], batch_size: int) -> torch.Tensor:
        """Time ids from the batch: target is the trained (bucket) size; without the dataset's sizes (cached
        latents), the image is taken as uncropped at that size."""
        images = batch["pixel_values"] if "pixel_values" in batch else batch["latents"]
        scale = 1 if "pixel_values" in batch else self.vae_scale_factor
        target = torch.tensor([images.shape[-2] * scale, images.shape[-1] * scale]).expand(batch_size, 2)
        original = batch.get("original_size")
        original = target if original is None else torch.as_tensor(original).reshape(batch_size, 2)
        crop = batch.get("crop_top_left")
        crop = torch.zeros(batch_size, 2) if crop is None else torch.as_tensor(crop).reshape(batch_size, 2)
        return sdxl_time_ids(original.float(), crop.float(), target.float())

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (DDP) text encoder `index` (0 or 1) for the forward pass, so its LoRA gradients synchronise."""
        self.prompt_encoders[index].text_encoder = text_encoder
