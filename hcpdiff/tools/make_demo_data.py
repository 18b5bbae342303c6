"""Write a small captioned image dataset (shapes on colored grounds) for the demo and the tests.

    python -m hcpdiff.tools.make_demo_data OUT [--num 8] [--seed 0] [--captions txt|json|csv|edit|none]

`--captions edit` writes an image-editing dataset: each image's input (`input/<i>.png`, the same shape in another
color) and `metadata.csv` with `image,prompt,edit_image` rows ("make the circle red").
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# (width, height) cycled over the images, so aspect-ratio buckets have something to group.
SIZES = [(160, 160), (192, 128), (128, 192), (176, 144), (144, 176)]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square", "triangle"]


def draw_sample(size: tuple[int, int], shape: str, color: str, ground: str) -> Image.Image:
    """One RGB image: a shape of `color` on a `ground` background."""
    width, height = size
    image = Image.new("RGB", size, COLORS[ground])
    draw = ImageDraw.Draw(image)
    side = min(width, height) // 2
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=COLORS[color])
    return image


def make_demo_data(out_dir: str | Path, num: int = 8, seed: int = 0, captions: str = "txt") -> Path:
    """Write `num` images named 0.png ... and their captions in the chosen form; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    caption_of = {}
    edits = []  # (image, instruction, input image) rows of an editing dataset
    for index in range(num):
        shape = rng.choice(SHAPES)
        color, ground = rng.sample(sorted(COLORS), 2)
        image = draw_sample(SIZES[index % len(SIZES)], shape, color, ground)
        image.save(out / f"{index}.png")
        caption_of[f"{index}.png"] = f"a {color} {shape} on a {ground} background"
        if captions == "edit":
            before = rng.choice([name for name in sorted(COLORS) if name not in (color, ground)])
            (out / "input").mkdir(exist_ok=True)
            draw_sample(SIZES[index % len(SIZES)], shape, before, ground).save(out / "input" / f"{index}.png")
            edits.append((f"{index}.png", f"make the {shape} {color}", f"input/{index}.png"))
    if captions == "txt":
        for name, text in caption_of.items():
            (out / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    elif captions == "json":
        (out / "captions.json").write_text(json.dumps({Path(k).stem: v for k, v in caption_of.items()}, indent=1))
    elif captions == "csv":
        with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "text"])
            writer.writerows(caption_of.items())
    elif captions == "edit":
        with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "prompt", "edit_image"])
            writer.writerows(edits)
    elif captions != "none":
        raise ValueError(f"captions must be txt, json, csv, edit or none, not {captions!r}")
    return out


def family_dataset(family: Any, folder: str | Path, num: int, condition_area: int = 64 * 64
                   ) -> tuple[Path, list[str]]:
    """(the data folder, the training overrides that read it) for a family's shipped training config: `num` demo
    images with their captions; an editing family's (`family.condition_images` > 0) rows (`edit` captions:
    input/<i>.png, "make the circle red") with its input images at `condition_area` pixels (its pipeline's 1024x1024
    takes the tiny VAE ~2 s an image on a CPU). The tests that run every family and tools/bench_train_step.py use it."""
    edits = family.condition_images > 0
    data = make_demo_data(folder, num=num, captions="edit" if edits else "txt")
    overrides = [f"data.dataset1.source.data_source1.img_root={data}",
                 f"data.dataset1.source.data_source1.caption_file={data}",
                 *([f"model.condition_area={condition_area}"] if edits else [])]
    return data, overrides


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.make_demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", choices=["txt", "json", "csv", "edit", "none"], default="txt")
    args = parser.parse_args()
    path = make_demo_data(args.out_dir, args.num, args.seed, args.captions)
    print(f"wrote {args.num} images with {args.captions} captions to {path}")


if __name__ == "__main__":
    main()
