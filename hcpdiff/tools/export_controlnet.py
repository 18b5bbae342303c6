"""Write a trained ControlNet as a diffusers ControlNet folder (`ControlNetModel.from_pretrained` loads it).

    python -m hcpdiff.tools.export_controlnet exps/<run>/ckpts/controlnet-1000.safetensors OUT_DIR

The checkpoint names its base (the ControlNet the run started from) and holds the trained tensors and LoRA; both are
merged into the folder, in fp32 unless --dtype says otherwise.
"""
from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_controlnet(checkpoint: str, out_dir: str, dtype: str = "fp32") -> str:
    """Rebuild the checkpoint's ControlNet and save it with save_pretrained; returns the folder."""
    from hcpdiff.models.controlnet import load_controlnet

    controlnet = load_controlnet(checkpoint, "checkpoint")
    controlnet.to(DTYPES[dtype]).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.export_controlnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ckpts/controlnet-<step>.safetensors (or a ControlNet single file)")
    parser.add_argument("out_dir", help="the diffusers ControlNet folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the saved weights' dtype")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    print(export_controlnet(args.checkpoint, args.out_dir, args.dtype))
    return 0


if __name__ == "__main__":
    from hcpdiff.cli import run_cli

    run_cli(main)
