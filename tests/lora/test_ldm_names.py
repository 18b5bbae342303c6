"""Original-layout (ldm) U-Net names built from a diffusers U-Net's own blocks: tiny and full-size SD1.x / SDXL."""
from __future__ import annotations

import pytest
import torch

from hcpdiff.lora.ldm_names import SDXL_UNET_CONFIG, ldm_unet_names


def meta_unet(config: dict):
    """A UNet2DConditionModel built without weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def weight_layers(unet) -> list[str]:
    """Every Linear / Conv2d of a U-Net: the layers a LoRA file can name."""
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_tiny_unets_name_every_layer_once(family: str) -> None:
    from hcpdiff.tools.make_tiny_model import build_unet
    from hcpdiff.tools.tiny_sdxl import build_sdxl_unet

    unet = build_unet() if family == "sd" else build_sdxl_unet()
    names = ldm_unet_names(unet, weight_layers(unet))
    assert set(names) == set(weight_layers(unet))
    assert len(set(names.values())) == len(names)
    # two levels, two layers each: the numbering follows the model, not SD1.5's four levels
    want = {
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",  # after up block 0's attention
        "up_blocks.1.resnets.2.conv_shortcut": "output_blocks.5.0.skip_connection",
        "conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_2": "time_embed.2",
    }
    if family == "sdxl":
        want["add_embedding.linear_1"] = "label_emb.0.0"
        want["down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2"] = "input_blocks.4.1.transformer_blocks.1.ff.net.2"
    assert {k: names[k] for k in want} == want


def test_full_size_sd15_names_match_the_original_checkpoint_layout() -> None:
    unet = meta_unet({})  # UNet2DConditionModel's defaults are SD1.5's U-Net
    names = ldm_unet_names(unet, weight_layers(unet))
    assert set(names) == set(weight_layers(unet))
    # keys of the original v1-5-pruned checkpoint (model.diffusion_model.*)
    want = {
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # up block 0 has no attention in SD1.5
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0": "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "time_embedding.linear_1": "time_embed.0", "conv_out": "out.2",
    }
    assert {k: names[k] for k in want} == want


def test_full_size_sdxl_names_every_layer() -> None:
    unet = meta_unet(SDXL_UNET_CONFIG)
    names = ldm_unet_names(unet, weight_layers(unet))
    assert set(names) == set(weight_layers(unet)) and len(set(names.values())) == len(names)
    assert names["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_v"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert names["up_blocks.2.resnets.2.conv2"] == "output_blocks.8.0.out_layers.3"
    assert names["add_embedding.linear_2"] == "label_emb.0.2"
