"""SD3's original MMDiT layout, by which kohya (`networks/lora_sd3.py`) and ComfyUI name SD3 / SD3.5 LoRAs:
`lora_unet_` + the original transformer's dotted path with underscores (`lora_unet_joint_blocks_0_x_block_attn_qkv`).

The tables are the inverse of diffusers' own single-file converter (convert_sd3_transformer_checkpoint_to_diffusers):
{original layer: (the diffusers layers whose outputs it stacks, in row order; each one's output width over the
layer's input width)}. Every Linear (and the patch-embedding Conv2d) of SD3Transformer2DModel has a place here.
"""
from __future__ import annotations

import re

import torch

from hcpdiff.errors import ModelError
from hcpdiff.lora.fused_layout import FusedLayer, is_plain_lora

JOINT_BLOCK = {  # per joint block; context_block.* is the text stream, x_block.* the image stream
    "x_block.attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "context_block.attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    "x_block.attn.proj": (("attn.to_out.0",), (1,)), "context_block.attn.proj": (("attn.to_add_out",), (1,)),
    "x_block.attn2.qkv": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), (1, 1, 1)),  # SD3.5-medium's dual attention
    "x_block.attn2.proj": (("attn2.to_out.0",), (1,)),
    "x_block.mlp.fc1": (("ff.net.0.proj",), (4,)), "x_block.mlp.fc2": (("ff.net.2",), (1,)),
    "context_block.mlp.fc1": (("ff_context.net.0.proj",), (4,)), "context_block.mlp.fc2": (("ff_context.net.2",), (1,)),
    "x_block.adaLN_modulation.1": (("norm1.linear",), (6,)),  # 9 with attn2; a rename either way
    "context_block.adaLN_modulation.1": (("norm1_context.linear",), (6,)),
}
# The last block's context_block is "pre-only" (no proj, no MLP): its adaLN gives (shift, scale) only, and diffusers'
# AdaLayerNormContinuous takes (scale, shift), so the halves swap as at the final layer. Such a layer is told by its
# shape (2 x its input width outputs instead of 6), which needs no model at hand.
PRE_ONLY_MODULATION = "context_block.adaLN_modulation.1"
TOP_LEVEL = {
    "x_embedder.proj": (("pos_embed.proj",), (1,)),  # a Conv2d (the patch embedding): a rename carries it
    "context_embedder": (("context_embedder",), (1,)),
    "t_embedder.mlp.0": (("time_text_embed.timestep_embedder.linear_1",), (1,)),
    "t_embedder.mlp.2": (("time_text_embed.timestep_embedder.linear_2",), (1,)),
    "y_embedder.mlp.0": (("time_text_embed.text_embedder.linear_1",), (1,)),
    "y_embedder.mlp.2": (("time_text_embed.text_embedder.linear_2",), (1,)),
    "final_layer.linear": (("proj_out",), (1,)),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), (2,)),  # (shift, scale) vs diffusers' (scale, shift)
}
SWAPPED_HALVES = ("final_layer.adaLN_modulation.1",)
KOHYA_TRANSFORMER_PREFIX = "lora_unet_"  # kohya's lora_sd3.py (LORA_PREFIX_SD3, "make ComfyUI compatible")
# names only SD3's layout has (lora_unet_final_layer_* is FLUX's too)
OWN_STARTS = tuple(KOHYA_TRANSFORMER_PREFIX + name.replace(".", "_")
                   for name in ("joint_blocks", "x_embedder", "context_embedder", "t_embedder", "y_embedder"))


def fused_mmdit_layer(name: str, block: str | None, pre_only: bool = False) -> FusedLayer:
    """The FusedLayer of original layer `name` (relative to its joint block) in joint block `block` (None: top
    level); `pre_only`: the block's context_block is the last block's (its modulation halves swapped)."""
    if block is None:
        pieces, ratios = TOP_LEVEL[name]
        return FusedLayer(name, pieces, ratios, swap_halves=name in SWAPPED_HALVES)
    pieces, ratios = JOINT_BLOCK[name]
    swap = pre_only and name == PRE_ONLY_MODULATION
    return FusedLayer(f"joint_blocks.{block}.{name}", tuple(f"transformer_blocks.{block}.{p}" for p in pieces),
                      (2,) if swap else ratios, swap_halves=swap)


def is_pre_only_modulation(out_features: int, in_features: int) -> bool:
    """Whether a context-block modulation layer of this shape is a pre-only block's: (shift, scale), not 6 chunks."""
    return out_features == 2 * in_features


def native_pre_only_blocks(by_layer: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    """The joint blocks whose context modulation LoRA (`norm1_context.linear`) is shaped as a pre-only block's; one
    ModelError for such a layer that is not a plain LoRA (its shape, and so its row order, would be a guess)."""
    blocks = set()
    for layer, parts in by_layer.items():
        if match := re.fullmatch(r"transformer_blocks\.(\d+)\.norm1_context\.linear", layer):
            if not is_plain_lora(parts):
                raise ModelError(f"transformer layer '{layer}' is not a plain LoRA; SD3's original layout reorders "
                                 "the last block's modulation rows, so hcpdiff writes this layer as a plain LoRA only "
                                 "(hcpdiff.visualizer renders it as trained).")
            if is_pre_only_modulation(parts[".lora_B.weight"].shape[0], parts[".lora_A.weight"].shape[1]):
                blocks.add(match[1])
    return blocks


def mmdit_lookup(pre_only_blocks: set[str]):
    """A fused_layout Lookup: diffusers transformer layer -> (its original layer, the layer's place in it), or None."""
    def lookup(layer: str) -> tuple[FusedLayer, int] | None:
        table, block, rest = TOP_LEVEL, None, layer
        if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer):
            table, block, rest = JOINT_BLOCK, match[1], match[2]
        for name, (pieces, _) in table.items():
            if rest in pieces:
                return fused_mmdit_layer(name, block, block in pre_only_blocks), pieces.index(rest)
        return None
    return lookup


def mmdit_layer_of_webui_name(webui_layer: str, pre_only: bool) -> FusedLayer | None:
    """The original layer a kohya transformer layer name without its prefix (`joint_blocks_0_x_block_attn_qkv`)
    names, or None; `pre_only`: its tensors are shaped as a pre-only context modulation's."""
    table, block, rest = TOP_LEVEL, None, webui_layer
    if match := re.fullmatch(r"joint_blocks_(\d+)_(.+)", webui_layer):
        table, block, rest = JOINT_BLOCK, match[1], match[2]
    name = next((name for name in table if name.replace(".", "_") == rest), None)
    return None if name is None else fused_mmdit_layer(name, block, pre_only)
