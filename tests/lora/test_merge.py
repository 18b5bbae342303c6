"""merge_lora: folding native weights into a plain model gives what peft computes with the adapter attached."""
from __future__ import annotations

import pytest
import torch

from hcpdiff.errors import ModelError
from hcpdiff.lora import LoraGroupSpec, attach_lora, lora_state_dict, merge_lora

UNET_SPECS = [
    LoraGroupSpec(lr=1e-4, rank=4, alpha=2, layers=[r"re:.*\.to_k$", r"re:.*\.ff$"]),  # Linear
    LoraGroupSpec(lr=1e-4, rank=0.5, layers=["conv_in", r"re:.*resnets\.0\.conv1$", r"re:.*proj_in$"]),  # 3x3 and 1x1 conv
]


def unet_output(unet) -> torch.Tensor:
    """The U-Net's prediction for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), context).sample


def with_random_adapters(model, specs, part: str) -> dict[str, torch.Tensor]:
    """Attach `specs`, fill every adapter weight randomly and return the native state."""
    groups = attach_lora(model, specs, part, f"lora_{part}")
    torch.manual_seed(1)
    with torch.no_grad():
        for group in groups:
            for param in group.params:
                param.normal_(std=0.05)
    return lora_state_dict(model)


def test_merged_unet_equals_peft(tiny_unet_factory) -> None:
    adapted = tiny_unet_factory()
    state = with_random_adapters(adapted, UNET_SPECS, "unet")
    plain = tiny_unet_factory()
    base = unet_output(plain)
    merge_lora(plain, state)
    expected = unet_output(adapted)
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(unet_output(plain), expected, atol=1e-5, rtol=1e-5)


def test_merged_text_encoder_equals_peft(tiny_text_encoder, tiny_model_dir) -> None:
    from transformers import CLIPTextModel

    specs = [LoraGroupSpec(lr=2e-5, rank=2, layers=["re:.*self_attn$", "re:.*mlp$"])]
    state = with_random_adapters(tiny_text_encoder, specs, "text_encoder")
    tiny_text_encoder.eval()
    plain = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    merge_lora(plain, state)
    ids = torch.randint(0, 500, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids)[0], tiny_text_encoder(ids)[0], atol=1e-5, rtol=1e-5)


def test_alpha_scale_scales_the_weight_change(tiny_unet_factory) -> None:
    state = with_random_adapters(tiny_unet_factory(), UNET_SPECS[1:], "unet")
    base, full, half = tiny_unet_factory(), tiny_unet_factory(), tiny_unet_factory()
    merge_lora(full, state)
    merge_lora(half, state, alpha_scale=0.5)
    for name in ("conv_in", "down_blocks.1.attentions.0.proj_in"):
        base_weight, full_weight, half_weight = (m.get_submodule(name).weight for m in (base, full, half))
        torch.testing.assert_close(half_weight - base_weight, 0.5 * (full_weight - base_weight))


def test_unknown_layer_is_named(tiny_unet) -> None:
    state = {
        "mid_block.no_such.lora_A.weight": torch.zeros(2, 8),
        "mid_block.no_such.lora_B.weight": torch.zeros(8, 2),
        "mid_block.no_such.alpha": torch.tensor(2.0),
    }
    with pytest.raises(ModelError, match="LoRA layer 'mid_block.no_such' does not exist"):
        merge_lora(tiny_unet, state)


def test_incomplete_layer_is_named(tiny_unet) -> None:
    with pytest.raises(ModelError, match=r"'conv_in' lack conv_in\.lora_B\.weight, conv_in\.alpha"):
        merge_lora(tiny_unet, {"conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)})
