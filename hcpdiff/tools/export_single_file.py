"""Write a diffusers SD1.x folder as one original-layout (CompVis / a1111) .safetensors checkpoint.

The inverse of diffusers' `from_single_file` conversion, after diffusers' old
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to any number of U-Net levels and resnets per
level (the tiny test models have 2 levels). Checked by loading the result back with `from_single_file` (tests).
SD1.x CLIP text encoders only (SD2.x's OpenCLIP layout is not written).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def unet_prefixes(levels: int, per_level: int, up_has_attn: list[bool]) -> dict[str, str]:
    """{diffusers prefix: original prefix} of every U-Net block."""
    stride = per_level + 1
    prefixes = {"mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(per_level):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{stride * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{stride * i + j + 1}.1."
        for j in range(stride):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{stride * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{stride * i + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{stride * (i + 1)}.0.op."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{stride * i + per_level}.{2 if up_has_attn[i] else 1}."
    return prefixes


def rename(key: str, prefixes: dict[str, str], resnet: dict[str, str]) -> str:
    """The original name of one diffusers key (longest matching prefix; resnet sub-names inside resnets)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if "resnets" in prefix or ".block" in prefixes[prefix]:
                head, _, tail = rest.partition(".")
                rest = f"{resnet.get(head, head)}.{tail}"
            return prefixes[prefix] + rest
    raise KeyError(key)


def unet_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """U-Net weights under `model.diffusion_model.` with LDM names."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    up_has_attn = ["CrossAttn" in name for name in config["up_block_types"]]
    prefixes = {**UNET_TOP, **unet_prefixes(levels, per_level, up_has_attn)}
    return {"model.diffusion_model." + rename(k, prefixes, RESNET): v for k, v in state.items()}


def vae_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """VAE weights under `first_stage_model.` with LDM names (attention projections as 1x1 convs)."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.",
                "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    for part in ("encoder", "decoder"):
        for i in range(2):
            prefixes[f"{part}.mid_block.resnets.{i}."] = f"{part}.mid.block_{i + 1}."
    for i in range(levels):
        for j in range(per_level):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per_level + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                 "quant_conv.", "post_quant_conv."):
        prefixes[name] = name
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = rename(key, prefixes, {"conv_shortcut": "nin_shortcut"})
        if ".attn_1." in name:
            head, _, tail = name.partition(".attn_1.")
            sub, _, rest = tail.partition(".")
            rest = rest.removeprefix("0.")  # to_out.0.weight
            name = f"{head}.attn_1.{attn[sub]}.{rest}"
            if tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + name] = tensor
    return out


def write_original_checkpoint(model_dir: str | Path, out_file: str | Path) -> Path:
    """One `.safetensors` in the original SD1.x layout holding the folder's U-Net, VAE and CLIP weights."""
    model_dir = Path(model_dir)
    unet = load_file(model_dir / "unet/diffusion_pytorch_model.safetensors")
    vae = load_file(model_dir / "vae/diffusion_pytorch_model.safetensors")
    text = load_file(model_dir / "text_encoder/model.safetensors")
    state = unet_original(unet, json.loads((model_dir / "unet/config.json").read_text()))
    state.update(vae_original(vae, json.loads((model_dir / "vae/config.json").read_text())))
    for key, tensor in text.items():  # transformers 5 saves without `text_model.`; the LDM layout keeps it
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return Path(out_file)


def main(argv: list[str]) -> int:
    """CLI: `python -m hcpdiff.tools.export_single_file MODEL_DIR OUT.safetensors`."""
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.export_single_file", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="diffusers SD1.x folder (unet/, vae/, text_encoder/ in safetensors)")
    parser.add_argument("out_file", help="the .safetensors file to write")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    print(write_original_checkpoint(args.model_dir, args.out_file))
    return 0


if __name__ == "__main__":
    from hcpdiff.cli import run_cli

    run_cli(main)
