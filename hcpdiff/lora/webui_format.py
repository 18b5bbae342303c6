"""Native <-> webui (kohya / a1111) <-> diffusers LoRA keys: one name map per model part, inverted to go back."""
from __future__ import annotations

from typing import Iterable

import torch

from hcpdiff.errors import ModelError
from hcpdiff.families.sd import StableDiffusion
from hcpdiff.families.sdxl import StableDiffusionXL
from hcpdiff.lora.lycoris_format import WEBUI_SUFFIXES, native_tensors, webui_tensors
from hcpdiff.lora.state_io import layer_states

# The families say their kohya prefixes; SDXL's U-Net layers go by their original-layout names (ldm_names).
WEBUI_PREFIX = StableDiffusion.webui_prefixes
SDXL_WEBUI_PREFIX = StableDiffusionXL.webui_prefixes
DIFFUSERS_PREFIX = {"unet": "unet.", "transformer": "transformer.", "text_encoder": "text_encoder.",
                    "text_encoder_2": "text_encoder_2."}


def webui_layer_name(layer: str, part: str, prefixes: dict[str, str] = WEBUI_PREFIX,
                     renames: dict[str, str] | None = None) -> str:
    """kohya's name of a layer: prefix + dotted path with underscores (CLIP's transformer paths start at `text_model`;
    `renames` gives a layer another path first, e.g. its original-layout U-Net name)."""
    layer = (renames or {}).get(layer, layer)
    # transformers 5 dropped `text_model.` from CLIPTextModel's names; kohya / a1111 / ComfyUI keep it. The projection
    # of CLIPTextModelWithProjection sits beside text_model: ComfyUI reads `lora_te2_text_projection`. T5 (FLUX's
    # text_encoder_2, `encoder.block.<i>...`) has no text_model: kohya and ComfyUI name its layers by their paths
    if part.startswith("text_encoder") and not layer.startswith(("text_model.", "text_projection", "encoder.block.")):
        layer = "text_model." + layer
    return prefixes[part] + layer.replace(".", "_")


def webui_name_map(layers: Iterable[str], part: str, prefixes: dict[str, str] = WEBUI_PREFIX,
                   renames: dict[str, str] | None = None) -> dict[str, str]:
    """{native layer: webui layer} for the given layer names; two layers with one webui name is an error."""
    name_map: dict[str, str] = {}
    seen: dict[str, str] = {}
    for layer in layers:
        webui = webui_layer_name(layer, part, prefixes, renames)
        if webui in seen and seen[webui] != layer:
            raise ModelError(f"layers '{seen[webui]}' and '{layer}' have the same webui name '{webui}'.")
        seen[webui] = layer
        name_map[layer] = webui
    return name_map


def native_to_webui(
    state: dict[str, torch.Tensor], part: str, prefixes: dict[str, str] = WEBUI_PREFIX,
    renames: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Native keys of one part as webui keys (`lora_unet_..._to_k.lora_down.weight`, `.lora_up.weight`, `.alpha`);
    with `renames`, every layer must have one (a layer without an original-layout name is an error)."""
    by_layer = layer_states(state)
    if renames is not None and (unnamed := [layer for layer in by_layer if layer not in renames]):
        raise ModelError(f"{part} layer '{unnamed[0]}' has no name in the original (ldm) U-Net layout, which kohya's "
                         f"SDXL files use ({len(unnamed)} such layers).")
    name_map = webui_name_map(by_layer, part, prefixes, renames)
    return {  # LoHa / LoKr / DoRA layers get LyCORIS suffixes (lycoris_format)
        name_map[layer] + suffix: tensor for layer, parts in by_layer.items() for suffix, tensor in webui_tensors(parts).items()
    }


def is_webui_state(keys: Iterable[str]) -> bool:
    """True when every key is a webui LoRA key of the U-Net or text encoder."""
    keys = list(keys)
    prefixes = (*WEBUI_PREFIX.values(), *SDXL_WEBUI_PREFIX.values())
    return bool(keys) and all(key.startswith(prefixes) for key in keys)


def is_sdxl_webui_state(keys: Iterable[str]) -> bool:
    """True when some key names one of SDXL's two text encoders (`lora_te1_` / `lora_te2_`)."""
    return any(key.startswith(("lora_te1_", "lora_te2_")) for key in keys)


def split_webui_key(key: str) -> tuple[str, str]:
    """(webui layer, webui suffix) of a webui key."""
    for suffix in WEBUI_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ModelError(f"webui LoRA key '{key}' ends in none of .lora_down.weight, .lora_up.weight, .alpha, "
                     ".dora_scale, .hada_w1_a ..., .lokr_w1 ....")


def webui_to_native(
    state: dict[str, torch.Tensor], module_names: dict[str, list[str]], prefixes: dict[str, str] = WEBUI_PREFIX,
    renames: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Split a webui state into native states per part, using the inverted name maps of the model's module names;
    a part's `renames` (original-layout U-Net names) are read too, beside the diffusers-style names."""
    inverse = {part: {w: n for n, w in webui_name_map(names, part, prefixes).items()}
               for part, names in module_names.items()}
    for part, part_renames in (renames or {}).items():  # the two name sets are disjoint (input_blocks vs down_blocks)
        inverse.setdefault(part, {}).update(
            {w: n for n, w in webui_name_map(part_renames, part, prefixes, part_renames).items()})
    by_layer: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        webui_layer, suffix = split_webui_key(key)
        part = next((p for p, prefix in prefixes.items() if webui_layer.startswith(prefix)), None)
        if part is None or webui_layer not in inverse.get(part, {}):
            raise ModelError(
                f"webui LoRA layer '{webui_layer}' names no layer of the reference model; pass --model with the base model."
            )
        by_layer.setdefault((part, webui_layer), {})[suffix] = tensor
    states: dict[str, dict[str, torch.Tensor]] = {}
    for (part, webui_layer), parts in by_layer.items():
        layer = inverse[part][webui_layer]
        for suffix, tensor in native_tensors(webui_layer, parts).items():
            states.setdefault(part, {})[layer + suffix] = tensor
    for part_state in states.values():
        layer_states(part_state)  # every layer must be whole
    return states


def native_to_diffusers(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """diffusers/peft keys `<part>.<layer>.lora_A.weight` / `.lora_B.weight`, with alpha / rank folded into B."""
    out: dict[str, torch.Tensor] = {}
    for layer, parts in layer_states(state).items():
        if set(parts) != {".lora_A.weight", ".lora_B.weight", ".alpha"}:
            raise ModelError(
                f"layer '{layer}' holds a LoHa / LoKr / DoRA adapter; only plain LoRA converts to diffusers "
                "(use --to_webui, which ComfyUI and the webui load)."
            )
        lora_a, lora_b = parts[".lora_A.weight"], parts[".lora_B.weight"]
        scale = float(parts[".alpha"]) / lora_a.shape[0]  # diffusers loads without alphas as scale 1
        out[f"{DIFFUSERS_PREFIX[part]}{layer}.lora_A.weight"] = lora_a.clone()
        out[f"{DIFFUSERS_PREFIX[part]}{layer}.lora_B.weight"] = (lora_b.to(torch.float32) * scale).to(lora_b.dtype)
    return out
