"""The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: a diffusers FluxTransformer2DModel
state dict in Black Forest Labs' original layout (`double_blocks.0.img_attn.qkv.weight`, ...), q / k / v fused, so
tests can write the single `.safetensors` file FLUX.1 ships as. Test helper, imported as `from bfl_layout import ...`
(a plain module, not conftest, so no other folder's conftest is picked up instead)."""
from __future__ import annotations

import torch

# diffusers name (after the block prefix) -> BFL name, for weights and biases alike
DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_BLOCK_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
DOUBLE_BLOCK_FUSED = {  # BFL fused projection <- its diffusers parts, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_BLOCK = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_BLOCK_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SINGLE_BLOCK_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
TOP_LEVEL = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
}


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift): the swap is its
    own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer state dict in BFL's layout; every key is used exactly once (else KeyError)."""
    left = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(source: str, target: str) -> None:
        for suffix in ("weight", "bias"):  # every FLUX linear has a bias
            out[f"{target}.{suffix}"] = left.pop(f"{source}.{suffix}")

    def fuse(sources: tuple[str, ...], target: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{target}.{suffix}"] = torch.cat([left.pop(f"{source}.{suffix}") for source in sources])

    for name, target in TOP_LEVEL.items():
        if f"{name}.weight" in left:  # guidance_embedder: FLUX-dev only
            move(name, target)
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")})
    for i in blocks:
        prefix = f"transformer_blocks.{i}."
        for name, target in DOUBLE_BLOCK.items():
            move(prefix + name, f"double_blocks.{i}.{target}")
        for name, target in DOUBLE_BLOCK_NORMS.items():
            out[f"double_blocks.{i}.{target}.scale"] = left.pop(f"{prefix}{name}.weight")
        for target, sources in DOUBLE_BLOCK_FUSED.items():
            fuse(tuple(prefix + source for source in sources), f"double_blocks.{i}.{target}")
    singles = sorted({int(key.split(".")[1]) for key in state if key.startswith("single_transformer_blocks.")})
    for i in singles:
        prefix = f"single_transformer_blocks.{i}."
        for name, target in SINGLE_BLOCK.items():
            move(prefix + name, f"single_blocks.{i}.{target}")
        for name, target in SINGLE_BLOCK_NORMS.items():
            out[f"single_blocks.{i}.{target}.scale"] = left.pop(f"{prefix}{name}.weight")
        for target, sources in SINGLE_BLOCK_FUSED.items():
            fuse(tuple(prefix + source for source in sources), f"single_blocks.{i}.{target}")
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = swap_halves(left.pop(f"norm_out.linear.{suffix}"))
    if left:
        raise KeyError(f"diffusers keys with no BFL name: {sorted(left)[:5]}")
    return out
