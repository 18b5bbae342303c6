"""U-Net layer names in the original (ldm / "compvis") layout, read from a diffusers U-Net's own structure.

kohya's SDXL LoRAs (`lora_unet_input_blocks_4_1_...`), A1111 and ComfyUI name U-Net layers by the original Stable
Diffusion modules: `input_blocks.<n>.<0 resnet | 1 attention>`, `middle_block.<n>`, `output_blocks.<n>.<...>`,
`time_embed`, `label_emb`, `out`. The block numbers follow from the number of blocks, the layers per block and which
blocks have attentions and down/upsamplers, so the map is built from the model, not from a table of one model's
names; the tiny test U-Nets and the full-size SD1.x / SDXL ones get their own numbering.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

# a diffusers ResnetBlock2D's layers in the original ResBlock (the other sub-modules hold no weights)
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED_PREFIXES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's text_time
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


def has_attentions(block: nn.Module) -> bool:
    """Whether a diffusers U-Net block holds transformer (attention) layers beside its resnets."""
    return getattr(block, "attentions", None) is not None and len(block.attentions) > 0


def unet_block_prefixes(unet: nn.Module) -> dict[str, str]:
    """{diffusers module prefix: original-layout prefix} for every block of a diffusers UNet2DConditionModel."""
    prefixes = dict(FIXED_PREFIXES)
    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if has_attentions(block):
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if getattr(block, "downsamplers", None):
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    if unet.mid_block is not None:  # middle_block is resnet, attention, resnet, ... in that order
        index = 0
        attentions = len(unet.mid_block.attentions) if has_attentions(unet.mid_block) else 0
        for j in range(len(unet.mid_block.resnets)):
            prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{index}"
            index += 1
            if j < attentions:
                prefixes[f"mid_block.attentions.{j}"] = f"middle_block.{index}"
                index += 1
    index = 0
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attentions(block):
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if getattr(block, "upsamplers", None):  # in the block's last output block, after its resnet (and attention)
            position = 2 if has_attentions(block) else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{position}.conv"
    return prefixes


def ldm_unet_names(unet: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{diffusers layer name: original-layout name} for those of `names` that hold weights in the original layout."""
    prefixes = unet_block_prefixes(unet)
    out: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest block prefix of the name
            prefix = ".".join(parts[:cut])
            if prefix not in prefixes:
                continue
            rest = parts[cut:]
            if ".resnets." in prefix and rest:
                if rest[0] not in RESNET_LDM:
                    break
                rest = [RESNET_LDM[rest[0]], *rest[1:]]
            out[name] = ".".join([prefixes[prefix], *rest])
            break
    return out


# diffusers' SDXL base 1.0 U-Net config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), for naming a
# native SDXL file's layers in the original layout when its base model folder is not at hand
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
