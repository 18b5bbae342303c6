"""A denoiser LoRA in an original layout's names (ComfyUI's, kohya's), for families whose original modules are
diffusers' renamed one for one or stacked a few into one (fused_layout).

A family gives a lookup from a diffusers layer to its original layer (a FusedLayer, and the layer's place in it) and
back from a webui layer name (prefix included) to the FusedLayer it names; these two functions do the rest: group,
fuse or split exactly, refuse a part the layout has no names for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hcpdiff.errors import ModelError
from hcpdiff.lora.fused_layout import FusedLayer, Lookup, fused_to_native, native_to_fused

# a webui layer name (its prefix included) and its kohya tensors -> the FusedLayer it names (one ModelError if none)
NameLookup = Callable[[str, "dict[str, torch.Tensor]"], FusedLayer]


def denoiser_to_original(family: Any, states: dict[str, dict[str, torch.Tensor]], lookup: Lookup,
                         webui_name: Callable[[str], str]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{denoiser: {webui layer name: its native tensors}} of native states by part: each original layer named by
    `webui_name(original module path)`, its pieces fused exactly; any other part is one ModelError."""
    if other := [part for part in states if part != family.denoiser]:
        raise ModelError(f"--to_webui: a {family.description} {other[0]} LoRA has no ComfyUI layout in hcpdiff; "
                         f"convert the {family.denoiser} LoRA alone, and render the {other[0]} LoRA with hcpdiff's "
                         "visualizer")
    fused = native_to_fused(states[family.denoiser], lookup, family.denoiser)
    return {family.denoiser: {webui_name(name): parts for name, parts in fused.items()}}


def original_to_denoiser(family: Any, state: dict[str, torch.Tensor], layer_of: NameLookup
                         ) -> dict[str, dict[str, torch.Tensor]]:
    """Native denoiser states of a webui file's tensors, each original layer split back into its diffusers layers
    exactly."""
    from hcpdiff.lora.lycoris_format import native_tensors
    from hcpdiff.lora.webui_format import split_webui_key

    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        webui_layer, suffix = split_webui_key(key)
        by_layer.setdefault(webui_layer, {})[suffix] = tensor
    layers = {webui_layer: layer_of(webui_layer, parts) for webui_layer, parts in by_layer.items()}
    by_original = {layers[webui_layer].name: native_tensors(webui_layer, parts)
                   for webui_layer, parts in by_layer.items()}
    return {family.denoiser: fused_to_native(by_original, layers.values(), family.denoiser)}


# {original layer: (the diffusers layers whose outputs it stacks, in row order; each one's output width over the layer's
# input width)}
LayerTable = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class BflLayout:
    """Black Forest Labs' original transformer layout (FLUX.1's and FLUX.2's): its top-level layers, its block lists
    ({BFL list: (the diffusers list, its layers' table)}), and the layers whose two output halves come in the other
    order than diffusers' (BFL's final adaLN: shift, scale)."""

    top_level: LayerTable
    blocks: dict[str, tuple[str, LayerTable]]
    swapped_halves: tuple[str, ...] = ()

    def fused(self, name: str, block: tuple[str, str] | None) -> FusedLayer:
        """The FusedLayer of BFL layer `name` (relative to its block) in `block` ((its BFL list, its number), None:
        top level)."""
        table = self.top_level if block is None else self.blocks[block[0]][1]
        bfl_prefix = "" if block is None else f"{block[0]}.{block[1]}."
        diffusers_prefix = "" if block is None else f"{self.blocks[block[0]][0]}.{block[1]}."
        pieces, ratios = table[name]
        return FusedLayer(bfl_prefix + name, tuple(diffusers_prefix + piece for piece in pieces), ratios,
                          swap_halves=name in self.swapped_halves)

    def of_layer(self, layer: str) -> tuple[FusedLayer, int] | None:
        """(the BFL layer holding a diffusers transformer layer, the layer's place in it), or None."""
        table, block, rest = self.top_level, None, layer
        for bfl_block, (diffusers_block, block_table) in self.blocks.items():
            if match := re.fullmatch(rf"{diffusers_block}\.(\d+)\.(.+)", layer):
                table, block, rest = block_table, (bfl_block, match[1]), match[2]
                break
        for name, (pieces, _) in table.items():
            if rest in pieces:
                return self.fused(name, block), pieces.index(rest)
        return None

    def of_path(self, path: str, separator: str) -> FusedLayer | None:
        """The BFL layer a module path names, its parts joined by `separator` (kohya's `_`:
        `double_blocks_0_img_attn_qkv`; ComfyUI's `.`), or None."""
        table, block, rest = self.top_level, None, path
        sep = re.escape(separator)
        for bfl_block, (_, block_table) in self.blocks.items():
            if match := re.fullmatch(rf"{bfl_block}{sep}(\d+){sep}(.+)", path):
                table, block, rest = block_table, (bfl_block, match[1]), match[2]
                break
        name = next((name for name in table if name.replace(".", separator) == rest), None)
        return None if name is None else self.fused(name, block)


def version_text(metadata: dict[str, str]) -> str:
    """A kohya file's version metadata (`ss_base_model_version`, `modelspec.architecture`), lower case."""
    return f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
