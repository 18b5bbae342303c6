"""adapters_disabled: the base model's output inside the block (class images are the base model's), the run's adapters
and their requires_grad exactly as before after it."""
from __future__ import annotations

import torch

from hcpdiff.lora import LoraGroupSpec, attach_lora
from hcpdiff.lora.attach import adapters_disabled


def unet_output(unet) -> torch.Tensor:
    """The U-Net's prediction for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), context).sample


def test_adapters_are_bypassed_inside_and_trainable_after(tiny_unet) -> None:
    base = unet_output(tiny_unet)
    groups = attach_lora(tiny_unet, [LoraGroupSpec(lr=1e-4, rank=4, layers=[r"re:.*\.to_k$"]),
                                     LoraGroupSpec(lr=1e-4, rank=2, layers=[r"re:.*\.ff$"])], "unet", "lora_unet")
    frozen = groups[1].params[0]
    frozen.requires_grad_(False)  # a parameter the run froze stays frozen
    with torch.no_grad():
        for group in groups:
            for lora_b in group.params[1::2]:
                lora_b.fill_(0.01)  # as an init_lora would: the adapters change the output
    adapted = unet_output(tiny_unet)
    assert not torch.equal(adapted, base)
    with adapters_disabled([tiny_unet]):
        assert torch.equal(unet_output(tiny_unet), base)
    assert torch.equal(unet_output(tiny_unet), adapted)
    grads = [param.requires_grad for group in groups for param in group.params]
    assert grads.count(False) == 1 and not frozen.requires_grad
