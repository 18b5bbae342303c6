"""Helpers the family tests share (a plain module, imported as `from family_data import ...`, not conftest):

- `family_dataset`: the dataset a family's shipped training config trains on in the tests that run every registered
  family (the contract, resume): hcpdiff.tools.make_demo_data.family_dataset (shared with tools/bench_train_step.py);
- `train_in`: one run of a training command on one demo image in a fresh folder, as a family's overfit fixture makes it;
- `to_diffusers`: a checkpoint converted by `lora_convert --to_diffusers`, as a user converts it;
- `visualizer_render`: one 64 px, 2-step image of a shipped visualizer config with a LoRA, as int16 pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from hcpdiff.tools.make_demo_data import family_dataset, make_demo_data

__all__ = ["family_dataset", "to_diffusers", "train_in", "visualizer_render"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def train_in(workdir: Path, run: Callable, args: Callable[[Path], list[str]]) -> tuple[Path, str]:
    """(experiment folder, stderr) of `args(data)` run in `workdir` (the repo's cfgs/ linked in) on one demo image."""
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(workdir / "data", num=1)
    result = run(args(data), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return next((workdir / "exps").iterdir()), result.stderr


def to_diffusers(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` written by `lora_convert --to_diffusers` to `out`."""
    from hcpdiff.tools.lora_convert import main as lora_convert

    assert lora_convert(["--to_diffusers", "--lora_path", str(checkpoint), "--dump_path", str(out)]) == 0
    return out


def visualizer_render(run: Callable, workdir: Path, infer_config: str, model: Path, lora: Path,
                      *overrides: str) -> np.ndarray:
    """The one image `infer_config` renders with `lora` on `model`: 'a red circle', fp32, 64 px, 2 steps, pixels
    0-255 as int16, in the channels the PNG has (Qwen-Image 2.1's VAE decodes RGBA)."""
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    done = run(["-m", "hcpdiff.visualizer", "--cfg", infer_config, f"pretrained_model={model}", "dtype=fp32",
                f"lora_path={lora}", "prompt='a red circle'", f"save.out_dir={workdir / 'out'}", "infer_args.width=64",
                "infer_args.height=64", "infer_args.num_inference_steps=2", *overrides], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (image_file,) = sorted((workdir / "out").glob("*.png"))
    return np.asarray(Image.open(image_file), dtype=np.int16)
