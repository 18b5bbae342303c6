"""One layer's native adapter weights as the webui / ComfyUI (kohya LoRA, LyCORIS LoHa / LoKr, DoRA) suffixes,
and back.

LoHa and LoKr tensors keep peft's names, which are LyCORIS's (`hada_w1_a` [out, r], `hada_w1_b` [r, in], ...;
`lokr_w1`, `lokr_w2`, or their `_a` / `_b` factors); the readers scale by alpha / r with r read from a `_b` factor.
A LoKr with both Kronecker factors full has no `_b` factor, so the readers use scale 1: its alpha / rank is folded
into `lokr_w1` and no alpha is written. DoRA's magnitude (one per output row) is written as `dora_scale`, shaped
[out, 1] (Linear) or [out, 1, 1, 1] (Conv2d), which ComfyUI reads as a norm over each output row, as peft's DoRA is.
"""
from __future__ import annotations

import torch

from hcpdiff.errors import ModelError
from hcpdiff.lora.state_io import OPTIONAL_SUFFIXES, REQUIRED_SUFFIXES, layer_kind

LORA_SUFFIX = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".alpha": ".alpha"}
# LoHa / LoKr tensors have the same names on both sides
LYCORIS_SUFFIXES = tuple(s for kind in ("loha", "lokr") for s in (*REQUIRED_SUFFIXES[kind], *OPTIONAL_SUFFIXES[kind])
                         if s not in (".alpha", ".rank"))
# every suffix a webui / LyCORIS layer may carry, longest first (so `.lokr_w1_a` is not read as `.lokr_w1` + `_a`)
WEBUI_SUFFIXES = tuple(sorted({*LORA_SUFFIX.values(), *LYCORIS_SUFFIXES, ".dora_scale"}, key=len, reverse=True))


def webui_tensors(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{webui suffix: tensor} of one layer's native weights (see the module docstring for each type)."""
    kind = layer_kind(parts)
    if kind == "lora":
        out = {LORA_SUFFIX[s]: t for s, t in parts.items() if s in LORA_SUFFIX}
        if ".lora_magnitude_vector.weight" in parts:
            magnitude = parts[".lora_magnitude_vector.weight"]
            out[".dora_scale"] = magnitude.reshape(-1, *[1] * (parts[".lora_A.weight"].dim() - 1)).clone()
        return out
    out = {s: t for s, t in parts.items() if s != ".rank"}
    if kind == "lokr" and ".lokr_w1" in parts and ".lokr_w2" in parts:
        scale = float(parts[".alpha"]) / float(parts[".rank"])
        out[".lokr_w1"] = (parts[".lokr_w1"].to(torch.float32) * scale).to(parts[".lokr_w1"].dtype)
        del out[".alpha"]
    return out



def native_tensors(layer: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{native suffix: tensor} of one layer's webui weights (kohya LoRA, DoRA, LyCORIS LoHa / LoKr): the inverse of
    webui_tensors. A missing alpha means the readers' default (alpha = rank: scale 1)."""
    kind = layer_kind(parts)
    alpha = parts.get(".alpha")
    if kind == "lora":
        out = {native: parts[webui] for native, webui in LORA_SUFFIX.items() if webui in parts and webui != ".alpha"}
        rank = out[".lora_A.weight"].shape[0] if ".lora_A.weight" in out else None
        if ".dora_scale" in parts:
            out[".lora_magnitude_vector.weight"] = dora_magnitude(layer, parts)
    else:
        out = {s: t for s, t in parts.items() if s in LYCORIS_SUFFIXES}
        if kind == "loha":
            rank = parts[".hada_w1_b"].shape[0] if ".hada_w1_b" in parts else None
        elif (factor_b := parts.get(".lokr_w1_b", parts.get(".lokr_w2_b"))) is not None:
            rank = factor_b.shape[0]
        elif ".lokr_w2" in parts:  # both factors full: the readers use scale 1; a rank this large keeps peft's w2 full
            rank, alpha = max(parts[".lokr_w2"].shape[:2]), None
        else:
            rank = None
        if kind == "lokr" and rank is not None:
            out[".rank"] = torch.tensor(float(rank))
    if rank is not None:  # a layer missing weights keeps no alpha either, and layer_states names what it lacks
        out[".alpha"] = torch.tensor(float(rank) if alpha is None else float(alpha))
    return out


def dora_magnitude(layer: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft's DoRA magnitude from a webui `dora_scale`: [out] for a Linear, [1, out, 1, 1] for a Conv2d."""
    scale, up = parts[".dora_scale"], parts.get(".lora_up.weight")
    if up is None or scale.shape[0] != up.shape[0] or scale.numel() != up.shape[0]:
        raise ModelError(
            f"webui layer '{layer}': its dora_scale {tuple(scale.shape)} is not one value per output row "
            "(LyCORIS wd_on_out=False); peft's DoRA, and so hcpdiff, keeps the magnitude per output row."
        )
    return scale.reshape(1, -1, 1, 1) if up.dim() == 4 else scale.reshape(-1)
