"""A denoiser LoRA in an original layout's names (ComfyUI's, kohya's), for families whose original modules are
diffusers' renamed one for one or stacked a few into one (fused_layout).

A family gives a lookup from a diffusers layer to its original layer (a FusedLayer, and the layer's place in it) and
back from a webui layer name (prefix included) to the FusedLayer it names; these two functions do the rest: group,
fuse or split exactly, refuse a part the layout has no names for.
"""
from __future__ import annotations

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


def version_text(metadata: dict[str, str]) -> str:
    """A kohya file's version metadata (`ss_base_model_version`, `modelspec.architecture`), lower case."""
    return f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
