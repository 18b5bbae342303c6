"""Gradient checkpointing keeps LoRA gradients flowing, in the text encoder above all."""
from __future__ import annotations

import torch

from hcpdiff.lora import LoraGroupSpec, attach_lora
from hcpdiff.models import enable_gradient_checkpointing


def lora_b_grads(groups) -> list[torch.Tensor | None]:
    """Gradients of every lora_B weight (lora_A gets none at init, since B starts at zero)."""
    return [param.grad for group in groups for param in group.params[1::2]]


def test_text_encoder_lora_gets_gradients_with_checkpointing(tiny_text_encoder) -> None:
    groups = attach_lora(tiny_text_encoder, [LoraGroupSpec(lr=1e-4, layers=["re:.*self_attn$", "re:.*mlp$"])], "text_encoder", "lora_text_encoder")
    enable_gradient_checkpointing(tiny_text_encoder)
    tiny_text_encoder.train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in tiny_text_encoder.modules())
    ids = torch.randint(0, 500, (2, 77))
    tiny_text_encoder(ids)[0].square().mean().backward()
    grads = lora_b_grads(groups)
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads)


def test_unet_lora_gets_gradients_with_checkpointing(tiny_unet) -> None:
    groups = attach_lora(tiny_unet, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*\.to_k$"])], "unet", "lora_unet")
    enable_gradient_checkpointing(tiny_unet)
    tiny_unet.train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in tiny_unet.modules())
    latents = torch.randn(1, 4, 16, 16)
    tiny_unet(latents, torch.tensor([10]), torch.randn(1, 77, 32)).sample.square().mean().backward()
    grads = lora_b_grads(groups)
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads)
