"""What a model family is: its parts, how they load, its latents, conditioning, objective, denoiser call and pipeline.

One subclass per family (`hcpdiff/families/<name>.py`), registered in `hcpdiff/families/__init__.py`. The trainer,
the visualizer and the converters ask the family; none of them names a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from hcpdiff.errors import ConfigError

ConfigReader = Callable[[str], "dict[str, Any] | None"]  # folder name -> its config.json / scheduler_config.json


def components_config_reader(components: dict[str, Any]) -> ConfigReader:
    """A ConfigReader over loaded components (their `.config`)."""
    def read(part: str) -> dict[str, Any] | None:
        component = components.get(part)
        return dict(component.config) if component is not None and hasattr(component, "config") else None
    return read


@dataclass(frozen=True)
class Expert:
    """One of a model's denoisers that split the sampling steps by noise level (Wan2.2 A14B's high- and low-noise
    experts): `model.expert` names it, it loads from its diffusers folder, and denoises the sigmas in
    [sigma_min, sigma_max) (sigma_max 1: up to pure noise, included), as the pipeline routes its steps."""

    name: str  # the config's value: high_noise, low_noise
    folder: str  # its diffusers folder: transformer, transformer_2
    sigma_min: float
    sigma_max: float

    def holds(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Which sigmas [B] this expert denoises (bool [B])."""
        return (sigmas >= self.sigma_min) & ((sigmas < self.sigma_max) | (self.sigma_max >= 1.0))


class Family:
    """One model family. Stateless: the loaded modules travel in ModelParts.components, never on the family."""

    name: ClassVar[str]
    description: ClassVar[str]  # for messages and the README's family table
    denoiser: ClassVar[str] = "unet"  # the part that denoises (diffusers folder name): unet | transformer
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # in the conditioner's order
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    other_folders: ClassVar[tuple[str, ...]] = ("vae", "scheduler")  # also required in a diffusers folder
    t5_parts: ClassVar[tuple[str, ...]] = ()  # a T5 encoder and tokenizer the model renders without (`drop_t5`)
    webui_prefixes: ClassVar[dict[str, str]] = {}  # part -> kohya / a1111 key prefix
    # True: the family converts its kohya / ComfyUI files itself (the LoRA-file methods below); False: lora_convert
    # writes SD's and SDXL's kohya names (`--sdxl`)
    has_webui_layout: ClassVar[bool] = False
    train_config: ClassVar[str]  # the shipped example training config (cfgs/train/examples/...)
    infer_config: ClassVar[str]  # the shipped visualizer config with lora_path / lora_alpha (cfgs/infer/...)
    tiny_variants: ClassVar[tuple[str, ...]]  # `make_tiny_model --family` names this family builds; first = default
    # the visualizer's modes it renders (hcpdiff/infer/modes.py): txt2img, img2img, inpaint, highres_fix, and
    # latent_upscale (highres_fix upscaling the latents: not for packed latent sequences)
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img",)
    # a key fragment only this family's original-layout single files have (None: none tells it apart from SD's)
    single_file_marker: ClassVar[str | None] = None
    # the most input images a sample is trained and rendered with (an editing model's): 0 none; then each dataset
    # source names them (`condition_column`), the batch holds `condition_pixels` [B, K, 3, H, W], renders take
    # `condition_image`
    condition_images: ClassVar[int] = 0
    # the denoiser's lists of repeated blocks, in the order they run (`model.blocks_to_swap` keeps some in CPU
    # memory); empty: the family refuses blocks_to_swap (a U-Net's blocks differ in size and nest)
    block_lists: ClassVar[tuple[str, ...]] = ()
    # True: the family's pipeline takes prompts as text only (no embeddings), so it renders through the text encoders:
    # a run with previews keeps them loaded even when every caption is text-cached
    renders_from_text: ClassVar[bool] = False
    # True: a ControlNet (diffusers' ControlNetModel, part `controlnet`) can steer the denoiser: trained with
    # `model.controlnet` (control_residuals), rendered with the visualizer's `controlnet:` (build_pipeline with a
    # `controlnet` component, control_args)
    takes_controlnet: ClassVar[bool] = False
    # True: the pipeline renders clips (a list of frames per sample; previews and the visualizer write `.mp4` files,
    # `num_frames` sets their length) at `video_fps`; False: images (`.png`)
    renders_video: ClassVar[bool] = False
    video_fps: ClassVar[int] = 16
    # a video family's frames per latent frame: its training clips are frame_step k + 1 frames (a source's
    # num_frames); 0: the family trains on images only
    frame_step: ClassVar[int] = 0

    # ---------------------------------------------------------------------------------------- parts and loading
    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """Parts that can carry LoRA (`lora_<part>`) or full fine-tuning (`<part>:`) groups."""
        return (self.denoiser, *self.text_encoders, *(("controlnet",) if self.takes_controlnet else ()))

    @property
    def required_folders(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family must have."""
        return (self.denoiser, *self.text_encoders, *self.tokenizers, *self.other_folders)

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        """Whether a diffusers folder (its model_index.json and part configs) is of this family."""
        raise NotImplementedError

    def experts(self, pipeline_settings: dict[str, Any]) -> tuple[Expert, ...]:
        """The denoising experts of a model whose denoisers split the steps by noise level, told by its model_index.json
        settings (ModelParts.pipeline_settings); empty (the default): one denoiser takes every step. Training loads
        the expert `model.expert` names in the denoiser's place and draws sigmas in its range only; renders load all."""
        return ()

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """Layers of a part whose outputs the model discards (a LoRA there gets no gradient): LoRA groups leave them
        out of their matches. None by default."""
        return frozenset()

    def swappable_blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's transformer blocks in the order they run (`block_lists`), for block swap."""
        return [block for name in self.block_lists for block in (getattr(denoiser, name, None) or [])]

    def dropped_parts(self, drop_t5: bool, key: str) -> tuple[str, ...]:
        """The parts left unloaded (None in the components): with `drop_t5` (the config's `key`) the T5 encoder and
        tokenizer; one ConfigError when this family cannot do without its T5 or has none."""
        if not drop_t5:
            return ()
        if not self.t5_parts:
            raise ConfigError(f"{key}: a {self.description} model has no T5 encoder it can run without; "
                              "remove drop_t5")
        return self.t5_parts

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        """part name -> a function loading it with its library's from_pretrained (`common`: revision, local_files_only)."""
        raise NotImplementedError

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The noise scheduler the objective trains with, built from the model's scheduler config."""
        raise NotImplementedError

    def load_single_file(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """Components of an original-layout checkpoint file (diffusers' from_single_file), configs from `options`."""
        raise NotImplementedError(f"{self.name}: single-file checkpoints are not supported")

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        """Build a tiny random-weight model of this family in diffusers format (tests, the demo, benchmarks)."""
        raise NotImplementedError

    def check_run(self, mixed_precision: str | None) -> None:
        """Refuse run settings this family cannot train with (one ConfigError); the default accepts all."""

    def run_warnings(self, noise_scheduler: Any) -> list[str]:
        """Warning lines the run logs once at start about this checkpoint, told by its scheduler's config (a
        step-distilled model: what to train on instead); the default has none."""
        return []

    def pipeline_warnings(self, pipeline_settings: dict[str, Any]) -> list[str]:
        """Warning lines the run logs once at start about this checkpoint, told by its model_index.json's settings
        (ModelParts.pipeline_settings: FLUX.2 [klein]'s is_distilled) where its scheduler config tells nothing; the
        default has none."""
        return []

    # ---------------------------------------------------------------------------------------- latents
    def vae_scale_factor(self, read_config: ConfigReader) -> int:
        """Pixels per latent cell per side, from the VAE config (8 for real SD; tiny models keep the ratio)."""
        return 2 ** (len(read_config("vae")["block_out_channels"]) - 1)

    def pixel_step(self, read_config: ConfigReader) -> int:
        """Image sides must be multiples of this (every denoiser level, and any latent packing, divides evenly);
        from the part configs alone, so tools can tell it without loading weights."""
        raise NotImplementedError

    def latent_scale_shift(self, vae: Any) -> tuple[float, float]:
        """(scale, shift) with latents = (VAE posterior - shift) * scale, from the VAE's own config."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return float(vae.config.scaling_factor), float(shift)

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> the scaled posterior's (mean, std), fp32, in the denoiser's layout."""
        dist = vae.encode(to_module(vae, pixel_values)).latent_dist
        scale, shift = self.latent_scale_shift(vae)
        return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """prompts (+ batch extras) -> the denoiser's keyword arguments; has `set_text_encoder(module, index)`.
        `max_sequence_length` (T5 tokens, null: the family's) and `guidance` (a guidance embedding's training value)
        matter only to families whose encoders / denoisers have them."""
        raise NotImplementedError

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        """The training objective (noising, target, weights, loss) for `train.loss`."""
        raise NotImplementedError

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction for noisy latents at `timesteps` under `conditioning`."""
        raise NotImplementedError

    def control_residuals(self, controlnet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                          conditioning: dict[str, Any], control_pixels: torch.Tensor) -> dict[str, Any]:
        """The denoiser adapter of a ControlNet (takes_controlnet): given the noisy latents, timesteps, conditioning
        and control images [B, 3, H, W] in [-1, 1] (the batch's first `condition_pixels`), the extra keyword
        arguments of the denoiser's call (its residuals), merged into the conditioning `denoise` is given."""
        raise NotImplementedError(f"{self.name}: takes no ControlNet")

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        """The family's diffusers pipeline over these components; previews and the visualizer both use it."""
        raise NotImplementedError

    def configure_pipeline(self, pipe: Any, pipeline_settings: dict[str, Any]) -> None:
        """Apply model_index.json's own settings (ModelParts.pipeline_settings) to a pipeline build_pipeline made from
        the parts alone, for previews and renders alike (Krea 2 Turbo's is_distilled: its fixed schedule shift); the
        default applies none."""

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The pipeline's prompt keyword arguments for prompts with `(word:1.2)` weights; `all_prompts` are every
        prompt of the render (long prompts size the token chunks of all of them)."""
        raise NotImplementedError

    def condition_args(self, images: list[Any]) -> dict[str, Any]:
        """The pipeline's keyword arguments for one call's (one prompt's) input images (PIL), with
        condition_images > 0."""
        raise NotImplementedError(f"{self.name}: renders take no input image")

    def control_args(self, images: list[Any], scales: list[float]) -> dict[str, Any]:
        """The ControlNet pipeline's keyword arguments for each ControlNet's control image (PIL, at the render's size)
        and conditioning scale (takes_controlnet)."""
        raise NotImplementedError(f"{self.name}: takes no ControlNet")

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's own keyword arguments for hcpdiff's sampling settings (width, height, num_inference_steps,
        guidance_scale: the classifier-free guidance scale); the default passes them as they are."""
        return call_args

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """Whether a kohya / ComfyUI LoRA file (its keys and metadata) is of this family (with has_webui_layout)."""
        return False

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """Native LoRA states by part -> {part: {kohya layer name (prefix included): its native tensors}}, in the
        family's kohya layout; a layer that layout cannot hold exactly is one ModelError naming it."""
        raise NotImplementedError(f"{self.name}: no webui / kohya layout of its own")

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """A kohya file's tensors -> native LoRA states by part, with the same merged weights; `model_path` (a model
        folder, or None) names layers the family's layout leaves open (text-encoder depth)."""
        raise NotImplementedError(f"{self.name}: no webui / kohya layout of its own")

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Notes for the user on a kohya file of these native states: layers some tool would leave out."""
        return []

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """The kohya version metadata of a converted file: `ss_base_model_version`, `ss_v2`, `architecture` (the
        `modelspec.architecture` without its adapter suffix) and `network_module` (kohya's for plain LoRA)."""
        raise NotImplementedError(f"{self.name}: no webui / kohya layout of its own")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """An image tensor [3, H, W], uint8 or float in [-1, 1], as the RGB image it was read from (exact for 8-bit
    images)."""
    if pixels.dtype != torch.uint8:
        pixels = pixels.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()), "RGB")


def batch_condition_images(batch: dict[str, Any]) -> list[list[Any]]:
    """Each sample's input images as PIL images (RGB), from the batch's `condition_pixels` [B, K, 3, H, W] (uint8,
    or float in [-1, 1]): what an editing family's pipeline is given at render time."""
    return [[to_pil(pixels) for pixels in sample] for sample in batch["condition_pixels"]]


def pad_sequences(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt states [L_i, D] -> (states [B, L, D] zero-padded to the longest, mask [B, L] long: 1 for a token),
    as the pipelines pad a batch of prompts of different lengths."""
    longest = max(caption.shape[0] for caption in captions)
    states = torch.stack([torch.cat([caption, caption.new_zeros(longest - caption.shape[0], caption.shape[1])])
                          for caption in captions])
    lengths = torch.tensor([caption.shape[0] for caption in captions], device=states.device)
    mask = (torch.arange(longest, device=states.device)[None, :] < lengths[:, None]).long()
    return states, mask


def pipeline_text_encoder(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder a conditioner's pipeline should call: the module itself, or for a prepared (DDP-wrapped) one
    a `PreparedTextEncoder` that forwards through the wrapper and answers `.dtype` / `.device`."""
    from accelerate.utils import extract_model_from_parallel

    plain = extract_model_from_parallel(text_encoder)
    return text_encoder if plain is text_encoder else PreparedTextEncoder(text_encoder, plain)


class PreparedTextEncoder(torch.nn.Module):
    """A prepared (DDP-wrapped) text encoder as a diffusers pipeline's encode_prompt uses one: calls go through the
    wrapper, so a trained encoder's gradients synchronise across processes; `dtype` and `device` are the plain
    model's (FluxPipeline and StableDiffusion3Pipeline read them; a DDP wrapper has neither)."""

    def __init__(self, prepared: torch.nn.Module, plain: torch.nn.Module) -> None:
        super().__init__()
        self.prepared = prepared
        self._plain = [plain]  # in a list: not registered twice as a submodule (the wrapper holds it)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.prepared(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The plain encoder's dtype (the pipelines cast the encoder's outputs to it)."""
        return self._plain[0].dtype

    @property
    def device(self) -> torch.device:
        """The plain encoder's device."""
        return self._plain[0].device


def to_module(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on `module`'s device in its dtype, read from its first parameter: a diffusers model's `.device` /
    `.dtype` walk every submodule for offloading hooks (~10 ms a step on the tiny VAE)."""
    weight = next(module.parameters())
    return tensor.to(weight.device, dtype=weight.dtype)
