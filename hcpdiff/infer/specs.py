"""The visualizer config's fields, read by name so a typo is an error, not a silent default."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from hcpdiff.config.fields import Bound

AT_LEAST_ONE = Bound(ge=1)


@dataclass
class InferArgs:
    """Sampling settings passed to the diffusers pipeline."""

    # null: the pipeline's own (an editing model's: the input image's aspect ratio at about 1 megapixel)
    width: Annotated[int | None, AT_LEAST_ONE] = 512
    height: Annotated[int | None, AT_LEAST_ONE] = 512
    guidance_scale: Annotated[float, Bound(finite=True)] = 7.5
    num_inference_steps: Annotated[int, AT_LEAST_ONE] = 30
    strength: Annotated[float, Bound(finite=True)] = 0.75  # img2img / inpaint: 1 starts from pure noise
    guidance_rescale: Annotated[float, Bound(ge=0, finite=True)] = 0.0  # CFG rescale (0.7 with zero_terminal_snr)
    num_frames: Annotated[int | None, AT_LEAST_ONE] = None  # a video model's clip length (Wan: 4k + 1; null: 1)


@dataclass
class SaveSpec:
    """Where and how images are written."""

    out_dir: str = "output/"
    save_cfg: bool = True  # write cfg.yaml beside the images
    image_type: str = "png"  # png | jpg | webp
    quality: int = 95  # jpg / webp quality


@dataclass
class LoraItem:
    """One LoRA file in a merge group; `layers: all` or a list of patterns (`re:...` or exact layer names)."""

    path: str | None
    alpha: float = 1.0
    layers: Any = "all"


@dataclass
class ControlNetItem:
    """One entry of the visualizer's `controlnet:` list: a ControlNet, its control image and its weight."""

    path: str | None  # a diffusers ControlNet folder, a controlnet-<step>.safetensors checkpoint or a single file
    image: str | None  # the control image, resized to cover width x height and center-cropped
    scale: float = 1.0  # controlnet_conditioning_scale: 0 leaves the render as without it


@dataclass
class MergeGroup:
    """LoRAs merged into one model part; the base weights of their layers are scaled by base_model_alpha first."""

    type: str  # unet | TE
    lora: list = field(default_factory=list)
    base_model_alpha: float = 1.0


@dataclass
class VisualizerSpec:
    """Top-level keys of cfgs/infer/*.yaml."""

    pretrained_model: str
    prompt: Any  # str or list of str
    neg_prompt: str = ""
    seed: int = 42
    num: Annotated[int, AT_LEAST_ONE] = 1  # images per prompt
    bs: Annotated[int, AT_LEAST_ONE] = 1  # images per pipeline call
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "auto"  # auto: cuda when available, else cpu
    clip_skip: int = 0
    drop_t5: bool = False  # SD3: render without the T5 encoder (zeros in its place, as diffusers); not loaded at all
    condition_image: Any = None  # an editing model's input image: a path for every prompt, or a list, one per prompt
    infer_args: dict = field(default_factory=dict)
    new_components: dict = field(default_factory=dict)
    merge: Any = None
    save: dict = field(default_factory=dict)
    lora_path: str | None = None  # shortcuts that t2i_lora.yaml feeds into `merge`
    lora_alpha: float = 1.0
    lora_path_TE: str | None = None
    lora_alpha_TE: float = 1.0
    lora_path_TE2: str | None = None  # SDXL: a native text_encoder_2 LoRA (text2img_sdxl.yaml)
    lora_path_expert: str | None = None  # Wan2.2 A14B: the other expert's LoRA beside lora_path (text2video_wan.yaml)
    # render modes (hcpdiff/infer/modes.py) and the sampler's zero-terminal-SNR betas
    init_image: str | None = None  # img2img: start from this image, resized and cropped to width x height
    mask_image: str | None = None  # inpaint (with init_image): white repaints, black keeps
    highres_fix: Any = None  # {scale, upscale: latent | pixel, strength, steps}: a second, upscaled img2img pass
    zero_terminal_snr: bool = False  # sample with zero-terminal-SNR betas and trailing timesteps
    controlnet: Any = None  # SD / SDXL: a list of {path, image, scale}, rendered through the ControlNet pipeline
    controlnet_path: str | None = None  # shortcuts that controlnet.yaml feeds into `controlnet`
    control_image: str | None = None
    controlnet_scale: float = 1.0
    emb_dir: str = "embs/"  # prompt embeddings (textual inversion) by file name: `{pt-cat1:1.2}` in a prompt
