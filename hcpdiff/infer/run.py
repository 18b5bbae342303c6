"""One visualizer run: config -> pipeline -> merged LoRAs -> weighted prompt embeddings -> saved images."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hcpdiff.config import check_targets, read_fields
from hcpdiff.errors import ConfigError
from hcpdiff.infer.condition_images import condition_images_for, control_image, path_list
from hcpdiff.infer.modes import prepare, read_render_mode, render
from hcpdiff.infer.pipeline import DTYPES, build_pipeline, merge_all, to_plain
from hcpdiff.infer.saving import next_index, save_image, save_video
from hcpdiff.infer.specs import ControlNetItem, InferArgs, SaveSpec, VisualizerSpec
from hcpdiff.infer.video import sampling_args
from hcpdiff.models import load_model_parts
from hcpdiff.models.controlnet import combined, load_controlnet
from hcpdiff.models.embeddings import load_prompt_embeddings
from hcpdiff.models.loading import peek_model


def pick_device(device: str) -> torch.device:
    """`auto` is cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prompt_list(prompt: Any) -> list[str]:
    """The config's `prompt` (a string or a list) as a list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(to_plain(prompt) or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("`prompt`: expected a string or a list of strings.")
    return prompts


def generate(cfg: DictConfig) -> list[Path]:
    """Render `num` images per prompt (seed + i for image i; a video family's: `.mp4` clips) and save them; returns
    the file paths."""
    check_targets(cfg)
    spec = read_fields(cfg, "", VisualizerSpec)
    infer_args = read_fields(spec.infer_args, "infer_args", InferArgs)
    save = read_fields(spec.save, "save", SaveSpec)
    if spec.dtype not in DTYPES:
        raise ConfigError(f"`dtype`: '{spec.dtype}' is not one of {sorted(DTYPES)}.")
    prompts = prompt_list(spec.prompt)
    # the render mode is checked before any weights load where the model's configs name its family
    peeked = peek_model(spec.pretrained_model, where="pretrained_model", drop_t5=spec.drop_t5)
    mode_keys = (spec.init_image, spec.mask_image, spec.highres_fix, infer_args)
    condition_paths = path_list(to_plain(spec.condition_image))

    controlnets = read_controlnets(spec.controlnet)

    def checked(family: Any) -> tuple[Any, Any]:
        mode = read_render_mode(*mode_keys, family)
        check_controlnets(controlnets, family, mode, infer_args)
        return mode, condition_images_for(family, condition_paths, len(prompts), "condition_image")

    mode, conditions = checked(peeked[0]) if peeked else (None, None)
    parts = load_model_parts(spec.pretrained_model, where="pretrained_model", drop_t5=spec.drop_t5)
    if mode is None:
        mode, conditions = checked(parts.family)
    if controlnets:
        parts.components["controlnet"] = combined([load_controlnet(item.path, f"controlnet.{i}.path")
                                                   for i, item in enumerate(controlnets)])
    pipe = build_pipeline(parts, spec.new_components, spec.zero_terminal_snr)
    all_prompts = [*prompts, spec.neg_prompt]
    embeddings = load_prompt_embeddings(pipe.components, parts.family.tokenizers, parts.family.text_encoders,
                                        spec.emb_dir, all_prompts)
    # once, before sampling; fp32 weights, then cast
    lora_paths = merge_all(pipe, spec.merge, parts.family, spec.pretrained_model,
                           parts.family.experts(parts.pipeline_settings))
    pipe.to(pick_device(spec.device))
    if spec.dtype != "fp32":
        pipe.to(dtype=DTYPES[spec.dtype])
    pipe.set_progress_bar_config(disable=True)
    prepare(mode, pipe, parts.family, infer_args.width, infer_args.height)
    control = {}
    if controlnets:
        control = parts.family.control_args(
            [control_image(item.image, infer_args.width, infer_args.height, f"controlnet.{i}.image")
             for i, item in enumerate(controlnets)], [item.scale for item in controlnets])

    out_dir = Path(save.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if save.save_cfg:
        OmegaConf.save(cfg, out_dir / "cfg.yaml")
    jobs = [(p, prompt, spec.seed + i) for p, prompt in enumerate(prompts) for i in range(spec.num)]
    index, written = next_index(out_dir), []
    batch_size = 1 if conditions else spec.bs  # an editing pipeline takes one input image per call
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        prompt_args = parts.family.prompt_args(pipe, [prompt for _, prompt, _ in batch],
                                               [spec.neg_prompt] * len(batch), clip_skip=spec.clip_skip,
                                               all_prompts=all_prompts)
        if conditions:
            prompt_args.update(parts.family.condition_args(conditions[batch[0][0]]))  # one prompt per call
        prompt_args.update(control)
        generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
        images = render(mode, prompt_args, generators, sampling_args(parts.family, vars(infer_args),
                                                                      "infer_args.num_frames"))
        for image, (p, prompt, seed) in zip(images, batch):
            frames = image if isinstance(image, list) else None  # a clip
            image = frames[0] if frames else image
            info = {
                "prompt": prompt, "negative_prompt": spec.neg_prompt, "seed": seed,
                "steps": infer_args.num_inference_steps, "guidance_scale": infer_args.guidance_scale,
                "width": infer_args.width or image.width, "height": infer_args.height or image.height,
                "sampler": type(pipe.scheduler).__name__,
                "model": spec.pretrained_model, "lora": lora_paths, "embeddings": embeddings,
                "clip_skip": spec.clip_skip,
                "guidance_rescale": infer_args.guidance_rescale, "zero_terminal_snr": spec.zero_terminal_snr,
                **mode.settings(infer_args.width, infer_args.height, infer_args.num_inference_steps),
            }
            if controlnets:
                info["controlnet"] = [vars(item) for item in controlnets]
            if conditions:
                info["condition_image"] = condition_paths[p if len(condition_paths) > 1 else 0]
            if frames:
                info.update(num_frames=len(frames), fps=parts.family.video_fps)
                written.append(save_video(frames, out_dir, index, info))
            else:
                written.append(save_image(image, out_dir, index, info, save.image_type, save.quality))
            index += 1
    return written


def read_controlnets(node: Any) -> list[ControlNetItem]:
    """The `controlnet:` list (null or empty: none), each entry read by name."""
    plain = to_plain(node)
    if plain is None:
        return []
    if not isinstance(plain, list):
        raise ConfigError("`controlnet`: expected a list of {path, image, scale} entries.")
    items = [read_fields(entry, f"controlnet.{i}", ControlNetItem) for i, entry in enumerate(plain)]
    return [item for item in items if item.path is not None]  # a null path (controlnet.yaml's default): skipped


def check_controlnets(controlnets: list[ControlNetItem], family: Any, mode: Any, infer_args: InferArgs) -> None:
    """ControlNets render text to image with a family that takes them, at a set size, from existing images."""
    if not controlnets:
        return
    if not family.takes_controlnet:
        raise ConfigError(f"`controlnet`: a {family.description} model takes no ControlNet here (SD and SDXL do); "
                          "remove it")
    if mode.name != "txt2img" or mode.highres is not None:
        raise ConfigError("`controlnet`: renders text to image only; remove init_image / mask_image / highres_fix")
    if infer_args.width is None or infer_args.height is None:
        raise ConfigError("infer_args.width / height: give the render size; the control images are cut to it")
    for i, item in enumerate(controlnets):
        if not item.image or not Path(item.image).is_file():
            raise ConfigError(f"controlnet.{i}.image: image file '{item.image}' does not exist")
