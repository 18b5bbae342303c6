"""Preview images while training: the current weights render a few fixed prompts every N steps."""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch



@dataclass
class PreviewSpec:
    """`previewer`: what to render, and how often. Images go to `exps/<ts>/preview/<step>-<i>.png` (a video model's
    clips to `<step>-<i>.mp4`) and TensorBoard."""

    step: int  # render every N optimizer steps, and at the end
    prompts: list[str] = field(default_factory=list)  # one image per prompt; (word:1.2) weights as in the visualizer
    neg_prompt: str = ""  # negative prompt for every image
    seed: int = 0  # image i uses seed + i, the same at every step, so previews show only what training changed
    width: int = 512  # pixels; multiples of the model's pixel step
    height: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    num_frames: int | None = None  # a video model's clip length (null: 1 frame); previews are then `.mp4` clips
    # an editing model's input images: one entry per prompt, or one for all, each a path or a list of paths (for a
    # model taking several); the model's family says if it takes any. With model.controlnet: the control images
    condition_images: list[Any] = field(default_factory=list)


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Put python's, numpy's, torch's and CUDA's global random states back as they were when the block ends."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state_all(saved[3])


def preview_prompt_args(pipe: Any, family: Any, spec: PreviewSpec, clip_skip: int = 0) -> list[dict[str, Any]]:
    """Each preview prompt's pipeline keyword arguments, encoded by the family as the visualizer encodes them
    (`(word:1.2)` weights, long prompts), with its input image for an editing model. While the text encoders are
    frozen they never change, so a run that releases its text encoders encodes them once, before."""
    from hcpdiff.infer.condition_images import condition_images_for, control_images_for, path_list

    all_prompts = [*spec.prompts, spec.neg_prompt]
    paths = path_list(spec.condition_images)
    controlled = getattr(pipe, "controlnet", None) is not None  # a run with a ControlNet: these are its images
    conditions = None if controlled else condition_images_for(family, paths, len(spec.prompts),
                                                              "previewer.condition_images")
    with torch.no_grad():
        args = [family.prompt_args(pipe, [prompt], [spec.neg_prompt], clip_skip=clip_skip, all_prompts=all_prompts)
                for prompt in spec.prompts]
    for i, prompt_args in enumerate(args if conditions else []):
        prompt_args.update(family.condition_args(conditions[i]))
    if controlled:
        controls = control_images_for(paths, len(spec.prompts), spec.width, spec.height, "previewer.condition_images")
        for prompt_args, control in zip(args, controls):
            prompt_args.update(family.control_args([control], [1.0]))
    return args


def render_previews(pipe: Any, family: Any, spec: PreviewSpec, clip_skip: int = 0,
                    prompt_args: list[dict[str, Any]] | None = None) -> list[Any]:
    """Render each prompt with the pipeline's current weights (prompts encoded now, or `prompt_args` from
    preview_prompt_args); returns PIL images.

    The caller's random state (python, numpy, torch, CUDA) is restored afterwards and the images draw from their own
    generators, so a run with previews trains exactly as one without.
    """
    from hcpdiff.infer.video import pipeline_renders, sampling_args

    with kept_random_state():
        if prompt_args is None:
            prompt_args = preview_prompt_args(pipe, family, spec, clip_skip)
        images = []
        with torch.no_grad():
            for i, args in enumerate(prompt_args):
                generator = torch.Generator("cpu").manual_seed(spec.seed + i)
                sampling = sampling_args(family, {
                    "width": spec.width, "height": spec.height, "num_inference_steps": spec.num_inference_steps,
                    "guidance_scale": spec.guidance_scale, "num_frames": spec.num_frames}, "previewer.num_frames")
                images += pipeline_renders(pipe(**args, **sampling, generator=generator, output_type="pil"))
        return images


def save_previews(images: Sequence[Any], out_dir: Path, step: int, writer: Any = None, *,
                  spec: PreviewSpec | None = None, fps: int = 16) -> list[Path]:
    """Write `<step>-<i>.png` files (a clip, a list of frames: `<step>-<i>.mp4` at `fps`, with its prompt and settings
    in the file's tags), and each image (a clip's frames side by side) to a TensorBoard writer as `preview/<i>` when
    one is given."""
    import json

    from hcpdiff.infer.video import frame_strip, save_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        if isinstance(image, list):
            info = {"step": step, "fps": fps}
            if spec is not None:
                info.update(prompt=spec.prompts[i], negative_prompt=spec.neg_prompt, seed=spec.seed + i,
                            steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                            width=spec.width, height=spec.height, num_frames=len(image))
            path = save_clip(image, out_dir / f"{step}-{i}.mp4", fps,
                             {"comment": str(info.get("prompt", "")), "description": json.dumps(info)})
            pixels = frame_strip(image)
        else:
            path = out_dir / f"{step}-{i}.png"
            image.save(path)
            pixels = np.asarray(image.convert("RGB"))
        paths.append(path)
        if writer is not None:
            writer.add_image(f"preview/{i}", pixels, step, dataformats="HWC")
    return paths
