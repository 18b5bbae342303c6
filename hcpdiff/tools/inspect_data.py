"""Show what each dataset of a training config would feed the trainer: images, captions, buckets, prompts."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hcpdiff.cli import cfg_parser, run_cli
from hcpdiff.config import load_config
from hcpdiff.data import BuiltDataset, build_dataset
from hcpdiff.errors import ConfigError

DEFAULT_STEP = 64
NUM_SAMPLE_PROMPTS = 3


def model_frame_step(model_path: object) -> int:
    """A local video model's frames per latent frame (its clips are frame_step k + 1 long); 0 for an image model's
    folder; 1 (any clip length) when the model is not a local folder."""
    from hcpdiff.errors import ModelError
    from hcpdiff.families import detect_family, folder_config_reader

    if not isinstance(model_path, str) or not Path(model_path).is_dir():
        return 1
    try:
        index_file = Path(model_path) / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
        return detect_family(index, folder_config_reader(Path(model_path)), model_path, "model").frame_step
    except (ModelError, OSError, ValueError, KeyError, TypeError):
        return 1


def model_pixel_step(model_path: object) -> int | None:
    """The pixel step of a local diffusers folder, as its family computes it from the part configs (no weights
    read); None if the path is not a local folder of a known family."""
    from hcpdiff.errors import ModelError
    from hcpdiff.families import detect_family, folder_config_reader

    if not isinstance(model_path, str) or not Path(model_path).is_dir():
        return None
    try:
        read_config = folder_config_reader(Path(model_path))
        index_file = Path(model_path) / "model_index.json"
        index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.is_file() else {}
        return detect_family(index, read_config, model_path, "model").pixel_step(read_config)
    except (ModelError, OSError, ValueError, KeyError, TypeError):
        return None


def pick_pixel_step(cfg: Mapping[str, Any], dataset_node: Mapping[str, Any]) -> tuple[int, str]:
    """(step, where it came from): the bucket's step_size, else the local model folder, else 64."""
    bucket = dataset_node.get("bucket") or {}
    if isinstance(bucket, Mapping) and bucket.get("step_size") is not None:
        return int(bucket["step_size"]), "the bucket's step_size"
    model_path = (cfg.get("model") or {}).get("pretrained_model_name_or_path")
    step = model_pixel_step(model_path)
    if step is not None:
        return step, f"the config.json files of {model_path}"
    return DEFAULT_STEP, f"assumed {DEFAULT_STEP}: no step_size and the model is not a local folder (no model is loaded)"


def describe(built: BuiltDataset, name: str, step: int, step_note: str) -> list[str]:
    """Report lines for one built dataset."""
    lines = [f"dataset data.{name}: {built.describe()[0]}", f"  pixel step {step} ({step_note})"]
    for source in built.sources:
        lines.append(
            f"  source {source.name} ({source.img_root}): {source.num_images} images, "
            f"{source.num_captioned} with captions, {len(source.missing_captions)} missing, "
            f"{len(source.unreadable)} unreadable"
        )
        if source.missing_captions:
            lines.append(f"    missing captions: {', '.join(source.missing_captions[:5])}")
        if source.unreadable:
            lines.append(f"    unreadable: {', '.join(source.unreadable[:5])}")
    if built.num_upscaled:
        lines.append(f"  {built.num_upscaled} image(s) are smaller than their bucket and will be upscaled")
    lines.append("  buckets:")
    lines.extend(f"    {row}" for row in built.bucket.describe())
    lines.append("  sample prompts:")
    count = len(built.dataset)
    picks = sorted({round(i * (count - 1) / max(1, NUM_SAMPLE_PROMPTS - 1)) for i in range(NUM_SAMPLE_PROMPTS)})
    lines.extend(f"    [{built.dataset.items[i].key}] {built.dataset.sample_prompt(i)}" for i in picks)
    return lines


def main(argv: list[str]) -> int:
    """Entry point: `python -m hcpdiff.tools.inspect_data --cfg F [overrides]`."""
    args = cfg_parser("hcpdiff.tools.inspect_data", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    cfg = load_config(args.cfg, args.overrides)
    data = cfg.get("data")
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{args.cfg}: the config has no data: section with datasets (data.dataset1, ...).")
    seed = int(cfg.get("seed", 0) or 0)
    for name, node in data.items():
        step, note = pick_pixel_step(cfg, node)
        frame_step = model_frame_step((cfg.get("model") or {}).get("pretrained_model_name_or_path"))
        built = build_dataset(node, f"data.{name}", pixel_step=step, seed=seed, frame_step=frame_step)
        print("\n".join(describe(built, str(name), step, note)))
    return 0


if __name__ == "__main__":
    run_cli(main)
