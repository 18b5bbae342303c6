"""Prior preservation (DreamBooth): a dataset's class images, rendered by the base model before training when its
folder holds fewer than `data.<name>.generate.num` images, and reused by every later run.

Image `i` is `<img_root>/<i:05d>.png`, rendered from the seed `generate.seed + i` with `<i:05d>.txt` (the prompt, its
caption) written first and the image renamed into place last, so an interrupted run leaves no half image and the
next run renders the same missing indices with the same seeds: the folder ends up as one uninterrupted run makes it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from hcpdiff.config import Bound, read_fields
from hcpdiff.data.captions import IMAGE_EXTENSIONS
from hcpdiff.errors import ConfigError, DataError
from hcpdiff.folders import make_folder

logger = logging.getLogger(__name__)


@dataclass
class GenerateSpec:
    """`data.<name>.generate`: the class images the base model renders into the dataset's one source folder."""

    prompt: str  # the class prompt ("a photo of a dog"); also every generated image's caption
    num: Annotated[int, Bound(ge=1)]  # images the folder should hold; fewer present (any names): the rest are rendered
    neg_prompt: str = ""
    steps: Annotated[int, Bound(ge=1)] = 30  # num_inference_steps
    guidance_scale: Annotated[float, Bound(finite=True)] = 7.5  # classifier-free guidance, as the visualizer's
    width: Annotated[int | None, Bound(ge=1)] = 512  # null: the pipeline's own size
    height: Annotated[int | None, Bound(ge=1)] = 512
    seed: int = 0  # image i renders from seed + i, whichever run or process renders it
    batch_size: Annotated[int, Bound(ge=1)] = 1  # images per pipeline call (>1: faster on a GPU, same noise per image)


@dataclass
class ClassImagePlan:
    """One dataset's class folder: how many images it holds and which indices are still to render."""

    key_path: str  # data.<name>.generate
    folder: Path
    spec: GenerateSpec
    present: int
    missing: list[int]  # image indices to render, in order


def read_generate(node: Any, key_path: str) -> tuple[GenerateSpec, str, str] | None:
    """The dataset node's `generate` spec, the folder it fills (its one source's img_root) and that key; None without
    one. Checks only the config (no file is touched): one ConfigError naming the key."""
    if not isinstance(node, Mapping) or node.get("generate") is None:
        return None
    spec = read_fields(node["generate"], f"{key_path}.generate", GenerateSpec)
    sources = node.get("source")
    if not isinstance(sources, Mapping) or len(sources) != 1:
        raise ConfigError(f"{key_path}.generate: renders into one folder; give {key_path}.source exactly one source "
                          f"(its img_root is where the class images go)")
    name, source = next(iter(sources.items()))
    where = f"{key_path}.source.{name}"
    img_root = source.get("img_root") if isinstance(source, Mapping) else None
    if not img_root:
        raise ConfigError(f"{where}.img_root: not set; {key_path}.generate renders the class images into this folder")
    caption_file = source.get("caption_file")
    if caption_file is not None and Path(caption_file) != Path(img_root):
        raise ConfigError(f"{where}.caption_file: {key_path}.generate writes each image's caption as <name>.txt "
                          f"beside it; set caption_file to null (or to the img_root '{img_root}')")
    return spec, str(img_root), f"{where}.img_root"


def plan_class_images(data: Mapping[str, Any]) -> list[ClassImagePlan]:
    """Count the images of every dataset with `generate` (creating its folder); the missing indices are the lowest
    whose `<i:05d>` name is free, as many as the folder lacks."""
    plans = []
    for name, node in data.items():
        key_path = f"data.{name}"
        found = read_generate(node, key_path)
        if found is None:
            continue
        spec, img_root, img_root_key = found
        folder = make_folder(img_root, img_root_key)
        present = {p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
        missing, index = [], 0
        while len(present) + len(missing) < spec.num:
            if image_name(index) not in present:
                missing.append(index)
            index += 1
        plans.append(ClassImagePlan(f"{key_path}.generate", folder, spec, len(present), missing))
    return plans


def image_name(index: int) -> str:
    """Generated image `index`'s file stem."""
    return f"{index:05d}"


def render_class_images(plan: ClassImagePlan, pipe: Any, family: Any, *, clip_skip: int = 0, rank: int = 0,
                        num_replicas: int = 1, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Render this process's share of the plan's missing images (every `num_replicas`-th, from `rank`) with the
    family's pipeline, as the visualizer renders a prompt; write each caption, then its image. Returns the images."""
    spec = plan.spec
    share = plan.missing[rank::num_replicas]
    sampling = family.pipeline_call_args({"width": spec.width, "height": spec.height,
                                          "num_inference_steps": spec.steps, "guidance_scale": spec.guidance_scale})
    written: list[Path] = []
    prompt_args: dict[int, dict[str, Any]] = {}  # batch length -> the encoded prompts (the same for every batch)
    for start in range(0, len(share), spec.batch_size):
        indices = share[start : start + spec.batch_size]
        if len(indices) not in prompt_args:
            prompt_args[len(indices)] = family.prompt_args(
                pipe, [spec.prompt] * len(indices), [spec.neg_prompt] * len(indices), clip_skip=clip_skip,
                all_prompts=[spec.prompt, spec.neg_prompt])
        generators = [torch.Generator("cpu").manual_seed(spec.seed + index) for index in indices]
        images = pipe(**prompt_args[len(indices)], **sampling, generator=generators, output_type="pil").images
        for index, image in zip(indices, images):
            written.append(_write(plan, index, image))
        if progress is not None:
            progress(len(indices))
    return written


def _write(plan: ClassImagePlan, index: int, image: Any) -> Path:
    """The caption first, then the image under a temporary name renamed into place: an image never lacks its caption,
    and a killed run leaves no partial image to be counted."""
    stem = image_name(index)
    path, partial = plan.folder / f"{stem}.png", plan.folder / f".{stem}.png.part"
    try:
        (plan.folder / f"{stem}.txt").write_text(plan.spec.prompt + "\n", encoding="utf-8")
        image.save(partial, format="PNG")
        os.replace(partial, path)
    except OSError as err:
        raise DataError(f"{plan.key_path}: cannot write class image '{path}': {err.strerror or err}") from err
    return path
