"""Helpers the family tests share (a plain module, imported as `from family_data import ...`, not conftest):

- `family_dataset`: the dataset a family's shipped training config trains on in the tests that run every registered
  family (the contract, resume): hcpdiff.tools.make_demo_data.family_dataset (shared with tools/bench_train_step.py);
- `overfit_args`, `edit_overfit_args`, `train_in`, `logged_losses`: a family's overfit run on one demo image in a
  fresh folder, and the losses its log records;
- `matched_layers`, `checkpoint_layers`: what a run's LoRA groups matched, and what its checkpoint holds;
- `per_sample_losses`, `batch_and_alone_losses`, `fixed_noise_loss`, `fixed_noise_losses`: flow-matching losses
  through a family's `denoise`;
- `random_lora_ups`: a fresh LoRA made to pass gradients to its lora_A;
- `transformer_calls`: what a real pipeline call feeds its transformer;
- `random_image`, `as_pixels`, `batch_and_alone_edits`: input images of the editing families, and a batch of edits;
- `to_diffusers`, `lora_convert_run`, `partial_lora`: LoRA files converted as a user converts them;
- `visualizer_output`, `visualizer_render`, `quiet_pipeline`, `diffusers_render`, `lora_renders`, `flag_renders`:
  images of a shipped visualizer config with a LoRA, and of the diffusers pipeline that loads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from hcpdiff.tools.make_demo_data import family_dataset, make_demo_data

__all__ = ["CPU", "LONG", "REPO_ROOT", "SHORT", "as_pixels", "batch_and_alone_edits", "batch_and_alone_losses",
           "checkpoint_layers", "diffusers_render", "edit_overfit_args", "family_dataset", "fixed_noise_loss",
           "fixed_noise_losses", "flag_renders", "logged_losses", "lora_convert_run", "lora_renders", "matched_layers",
           "overfit_args", "partial_lora", "per_sample_losses", "quiet_pipeline", "random_image", "random_lora_ups",
           "to_diffusers", "train_in", "transformer_calls", "visualizer_output", "visualizer_render"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SHORT, LONG = "a red circle", "a blue square photo of the objects and background, texture and color detailing"


def overfit_args(config: str, model: Path, data: Path, steps: int, *overrides: str, captions_beside: bool = True,
                 lr: str = "1e-2") -> list[str]:
    """The documented training command on `config` as a family's overfit run gives it: `model` in fp32 on the CPU,
    the images in `data` (their captions beside them, unless not `captions_beside`) in one 64 px bucket, no loader
    workers or warmup, a loss logged each step, one checkpoint at the end, a rank-4 transformer LoRA at `lr`
    (logit_std 0.3); then `overrides`."""
    captions = [f"data.dataset1.source.data_source1.caption_file={data}"] if captions_beside else []
    return ["-m", "hcpdiff.train_ac_single", "--cfg", config, f"model.pretrained_model_name_or_path={model}",
            "mixed_precision=null", f"data.dataset1.source.data_source1.img_root={data}", *captions,
            "train.workers=0", "train.scheduler.num_warmup_steps=0",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.bucket.num_bucket=1",
            f"train.train_steps={steps}", "train.log_step=1", "train.save_step=1000", f"transformer_lr={lr}",
            "train.loss.logit_std=0.3", "lora_transformer.0.rank=4", "lora_transformer.0.alpha=4", *overrides]


def edit_overfit_args(config: str, model: Path, data: Path, steps: int) -> list[str]:
    """`overfit_args` of an editing family's run on the demo edits in `data` (captions="edit"): input images at a
    64 x 64 area, one edit preview at the end."""
    return overfit_args(config, model, data, steps, "model.condition_area=4096",
                        f"previewer={{step: {steps}, prompts: ['make the circle red'], width: 64, height: 64, "
                        f"num_inference_steps: 2, condition_images: ['{data}/input/0.png']}}", captions_beside=False)


def train_in(workdir: Path, run: Callable, args: Callable[[Path], list[str]], captions: str = "txt"
             ) -> tuple[Path, str]:
    """(experiment folder, stderr) of `args(data)` run in `workdir` (the repo's cfgs/ linked in) on one demo image
    (its caption in the `captions` form of make_demo_data) in `workdir / "data"`."""
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(workdir / "data", num=1, captions=captions)
    result = run(args(data), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return next((workdir / "exps").iterdir()), result.stderr


def logged_losses(exp: Path, steps: int) -> list[float]:
    """The step losses the train.log of a `steps`-step run in `exp` records."""
    import re

    return [float(value) for value in re.findall(rf"step \d+/{steps} loss ([\d.]+)", (exp / "train.log").read_text())]


def matched_layers(exp: Path, part: str = "transformer") -> set[str]:
    """The layers the `lora_<part>` groups of the run in `exp` matched (its lora_layers.json)."""
    groups = json.loads((exp / "lora_layers.json").read_text())[f"lora_{part}"]
    return {layer for group in groups for layer in group["layers"]}


def checkpoint_layers(file: Path) -> tuple[dict[str, str], set[str], list[torch.Tensor]]:
    """(metadata, the layers it adapts, their lora_B weights) of a LoRA checkpoint."""
    from safetensors import safe_open

    with safe_open(file, "pt") as opened:
        metadata, keys = opened.metadata(), list(opened.keys())
        ups = [opened.get_tensor(key) for key in keys if ".lora_B." in key]
    return metadata, {key.split(".lora_")[0] for key in keys if ".lora_" in key}, ups


def per_sample_losses(family: Any, transformer: torch.nn.Module, conditioning: dict, latents: torch.Tensor,
                      noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss of each sample [B] through `family.denoise` for fixed noise and sigmas."""
    expanded = sigmas.view(-1, *[1] * (latents.dim() - 1))
    noisy = (1 - expanded) * latents + expanded * noise
    with torch.no_grad():
        prediction = family.denoise(transformer, noisy, sigmas, conditioning)
    return (prediction - (noise - latents)).square().mean(dim=tuple(range(1, latents.dim())))


def batch_and_alone_losses(family: Any, transformer: torch.nn.Module, conditioner: Callable, prompts: list[str],
                           latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_sample_losses of `prompts` as one batch, the same of each sample alone)."""
    batched = per_sample_losses(family, transformer, conditioner(prompts, {}, CPU), latents, noise, sigmas)
    alone = torch.cat([per_sample_losses(family, transformer, conditioner([prompt], {}, CPU), latents[i:i + 1],
                                         noise[i:i + 1], sigmas[i:i + 1]) for i, prompt in enumerate(prompts)])
    return batched, alone


def fixed_noise_loss(family: Any, pipe: Any, image: Image.Image, prompt: str, size: tuple[int, int] = (64, 64),
                     **conditioner_args: Any) -> float:
    """The flow-matching loss of one image at `size` (width, height) over fixed noise draws and sigmas (the per-step
    losses of a run are too noisy to show the tiny model's progress in a few steps)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32))
    pixels = pixels.permute(2, 0, 1)[None] / 127.5 - 1
    conditioner = family.build_conditioner(dict(pipe.components), 1, 0, **conditioner_args)
    with torch.no_grad():
        latents, _ = family.encode_latent_dist(pipe.vae, pixels)
        conditioning = conditioner([prompt], {}, CPU)
        generator = torch.Generator().manual_seed(0)
        losses = [per_sample_losses(family, pipe.transformer, conditioning, latents,
                                    torch.randn(latents.shape, generator=generator), torch.tensor([sigma]))
                  for sigma in (0.3, 0.5, 0.7, 0.9) for _ in range(4)]
    return torch.cat(losses).mean().item()


def random_lora_ups(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Set `model`'s lora_B weights to 0.1 x normal draws (at their initial 0 they block lora_A's gradient)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image of uniform random pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def as_pixels(image: Image.Image) -> torch.Tensor:
    """What a dataset gives for an image: [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def batch_and_alone_edits(family: Any, transformer: torch.nn.Module, conditioner: Callable, prompts: list[str],
                          pixels: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the conditioning of `prompts` with their input images `pixels` [B, K, 3, H, W] as one batch, `denoise` of
    that batch, `denoise` of each sample alone), on fixed noisy latents [B, 16, 4, 4] at sigmas 0.3 and 0.8."""
    noisy, sigmas = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        batched = conditioner(prompts, {"condition_pixels": pixels}, CPU)
        together = family.denoise(transformer, noisy, sigmas, batched)
        alone = torch.cat([family.denoise(transformer, noisy[i:i + 1], sigmas[i:i + 1],
                                          conditioner(prompts[i:i + 1], {"condition_pixels": pixels[i:i + 1]}, CPU))
                           for i in range(len(prompts))])
    return batched, together, alone


def fixed_noise_losses(family: Any, pipe: Any, lora: Path, image: Image.Image, prompt: str,
                       size: tuple[int, int] = (64, 64), **conditioner_args: Any) -> tuple[float, float]:
    """`fixed_noise_loss` of `pipe` before and after `pipe.load_lora_weights(lora)`."""
    before = fixed_noise_loss(family, pipe, image, prompt, size, **conditioner_args)
    pipe.load_lora_weights(str(lora))
    return before, fixed_noise_loss(family, pipe, image, prompt, size, **conditioner_args)


def transformer_calls(pipe: Any, **call: Any) -> list[dict]:
    """{"kwargs", "output"} of each transformer call in a real 2-step run of `pipe(**call)` (seed 0, latents out)."""
    calls = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append({"kwargs": kwargs, "output": output[0]})
        return output

    pipe.transformer.forward = recording
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    finally:
        pipe.transformer.forward = forward
    return calls


def to_diffusers(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` written by `lora_convert --to_diffusers` to `out`."""
    from hcpdiff.tools.lora_convert import main as lora_convert

    assert lora_convert(["--to_diffusers", "--lora_path", str(checkpoint), "--dump_path", str(out)]) == 0
    return out


def lora_convert_run(run: Callable, workdir: Path, *args: str) -> str:
    """The stderr of `python -m hcpdiff.tools.lora_convert *args` run in `workdir` (which succeeds)."""
    done = run(["-m", "hcpdiff.tools.lora_convert", *args], cwd=workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def partial_lora(lora: Path, keep: Callable[[str], bool], folder: Path) -> Path:
    """`folder / "transformer-1.safetensors"`: the tensors of `lora` whose keys `keep` takes, with its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(lora, "pt") as file:
        metadata = file.metadata()
    partial = folder / "transformer-1.safetensors"
    folder.mkdir()
    save_file({key: value for key, value in load_file(lora).items() if keep(key)}, partial, metadata)
    return partial


def visualizer_output(run: Callable, workdir: Path, infer_config: str, model: Path, lora: Path, *overrides: str,
                      prompt: str = "a red circle", width: int = 64, height: int = 64, suffix: str = ".png") -> Path:
    """The one file `infer_config` writes (into `workdir / "out"`) rendering `prompt` with `lora` on `model`: fp32,
    `width` x `height` px, 2 steps; then `overrides`."""
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    done = run(["-m", "hcpdiff.visualizer", "--cfg", infer_config, f"pretrained_model={model}", "dtype=fp32",
                f"lora_path={lora}", f"prompt='{prompt}'", f"save.out_dir={workdir / 'out'}",
                f"infer_args.width={width}", f"infer_args.height={height}", "infer_args.num_inference_steps=2",
                *overrides], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (out_file,) = sorted((workdir / "out").glob(f"*{suffix}"))
    return out_file


def visualizer_render(run: Callable, workdir: Path, infer_config: str, model: Path, lora: Path, *overrides: str,
                      **options: Any) -> np.ndarray:
    """The one image `visualizer_output` renders ('a red circle', 64 px, unless `options` say otherwise), pixels
    0-255 as int16, in the channels the PNG has (Qwen-Image 2.1's VAE decodes RGBA)."""
    image_file = visualizer_output(run, workdir, infer_config, model, lora, *overrides, **options)
    return np.asarray(Image.open(image_file), dtype=np.int16)


def quiet_pipeline(pipeline_class: Any, model: Path, **kwargs: Any) -> Any:
    """`pipeline_class.from_pretrained(model, **kwargs)` without its progress bar."""
    pipe = pipeline_class.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_render(pipe: Any, **call: Any) -> np.ndarray:
    """The first image of `pipe(**call)`, 64 px, 2 steps and seed 42 unless `call` says otherwise, pixels 0-255 as
    int16."""
    defaults = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "pil"}
    with torch.no_grad():
        image = pipe(**{**defaults, **call}, generator=torch.Generator("cpu").manual_seed(42)).images[0]
    return np.asarray(image, dtype=np.int16)


def lora_renders(pipe: Any, lora: Path, render: Callable[[Any], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(`render(pipe)`, the same after `pipe.load_lora_weights(lora)`); the LoRA stays loaded."""
    base = render(pipe)
    pipe.load_lora_weights(str(lora))
    return base, render(pipe)


def flag_renders(partial: Path, pipe: Any, render: Callable[[Any], np.ndarray]) -> list[np.ndarray]:
    """`render(pipe)` with `partial` converted by --to_diffusers, then by --to_webui (into `<folder>--to_diffusers
    .safetensors` / `<folder>--to_webui.safetensors` beside its folder), each loaded by load_lora_weights and
    unloaded after."""
    from hcpdiff.tools.lora_convert import main as lora_convert

    renders = []
    for flag in ("--to_diffusers", "--to_webui"):
        out = partial.parent.parent / f"{partial.parent.name}{flag}.safetensors"
        assert lora_convert([flag, "--lora_path", str(partial), "--dump_path", str(out)]) == 0
        pipe.load_lora_weights(str(out))
        try:
            renders.append(render(pipe))
        finally:
            pipe.unload_lora_weights()
    return renders
