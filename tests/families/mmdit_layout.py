"""The inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: a diffusers SD3Transformer2DModel
state dict in Stability's original MMDiT layout (`model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight`, ...),
q / k / v fused, so tests can write the single `.safetensors` file SD3 / SD3.5 ship as. It is built from hcpdiff's own
layout tables (hcpdiff.families.sd3_layout), so loading the file through diffusers also checks those tables. Test
helper, imported as `from mmdit_layout import ...` (a plain module, not conftest)."""
from __future__ import annotations

import torch

from hcpdiff.families.sd3_layout import JOINT_BLOCK, PRE_ONLY_MODULATION, SWAPPED_HALVES, TOP_LEVEL

PREFIX = "model.diffusion_model."  # as sd3_medium.safetensors / sd3.5_*.safetensors name the transformer
QK_NORMS = {  # diffusers (within a block) -> original, SD3.5's RMSNorm scales
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_mmdit(state: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in the original layout; every key is used exactly once (else KeyError)."""
    left = dict(state)
    out = {prefix + "pos_embed": left.pop("pos_embed.pos_embed")}

    def fuse(pieces: list[str], target: str, swap: bool) -> None:
        for suffix in ("weight", "bias"):
            tensor = torch.cat([left.pop(f"{piece}.{suffix}") for piece in pieces])
            out[f"{prefix}{target}.{suffix}"] = swap_halves(tensor) if swap else tensor

    for name, (pieces, _) in TOP_LEVEL.items():
        fuse(list(pieces), name, name in SWAPPED_HALVES)
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")})
    for i in blocks:
        for name, (pieces, _) in JOINT_BLOCK.items():
            keys = [f"transformer_blocks.{i}.{piece}" for piece in pieces]
            if f"{keys[0]}.weight" in left:  # attn2: dual-attention blocks only; the last block has no text proj / MLP
                fuse(keys, f"joint_blocks.{i}.{name}", i == blocks[-1] and name == PRE_ONLY_MODULATION)
        for source, target in QK_NORMS.items():
            if f"transformer_blocks.{i}.{source}.weight" in left:
                out[f"{prefix}joint_blocks.{i}.{target}.weight"] = left.pop(f"transformer_blocks.{i}.{source}.weight")
    if left:
        raise KeyError(f"diffusers keys with no original name: {sorted(left)[:5]}")
    return out
