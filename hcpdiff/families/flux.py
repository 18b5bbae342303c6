"""FLUX.1 (dev and schnell): a rectified-flow transformer on 2x2-packed 16-channel latents, CLIP-L pooled + T5 text.

Everything FLUX-specific that training and inference must agree on comes from FluxPipeline itself: prompt encoding
(`encode_prompt`), packing (`_pack_latents` / `_unpack_latents`), image ids (`_prepare_latent_image_ids`) and the
resolution shift (`calculate_shift`, in the flow-matching objective).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError
from hcpdiff.families.base import ConfigReader, Family

PACKING = 2  # 2x2 latent cells form one transformer token
DEV_MAX_SEQUENCE_LENGTH, SCHNELL_MAX_SEQUENCE_LENGTH = 512, 256  # T5 tokens, as Black Forest Labs trained them


def default_max_sequence_length(transformer_config: Any) -> int:
    """512 T5 tokens for a guidance-distilled model (dev), 256 for one without a guidance embedding (schnell)."""
    return DEV_MAX_SEQUENCE_LENGTH if transformer_config.get("guidance_embeds") else SCHNELL_MAX_SEQUENCE_LENGTH


def text_pipeline(components: dict[str, Any]) -> Any:
    """A FluxPipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                        tokenizer=components["tokenizer"], text_encoder_2=components["text_encoder_2"],
                        tokenizer_2=components["tokenizer_2"])


class FluxConditioner:
    """prompts -> {"encoder_hidden_states" (T5) [B, L, D], "pooled_projections" (CLIP) [B, D], "guidance" [B]?}."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them

    def __init__(self, pipe: Any, max_sequence_length: int, guidance: float | None) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance = guidance  # None: the transformer has no guidance embedding (schnell)

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text keyword arguments for one batch, encoded as FluxPipeline encodes them."""
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(prompts, device=device,
                                                           max_sequence_length=self.max_sequence_length)
        conditioning = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
        if self.guidance is not None:
            conditioning["guidance"] = torch.full((len(prompts),), self.guidance, device=device)
        return conditioning

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass: 0 is CLIP, 1 is T5."""
        from accelerate.utils import extract_model_from_parallel

        plain = extract_model_from_parallel(text_encoder)
        if plain is not text_encoder:  # FluxPipeline reads `.dtype`, which a DDP wrapper does not have
            text_encoder = PreparedTextEncoder(text_encoder, plain)
        setattr(self.pipe, ("text_encoder", "text_encoder_2")[index], text_encoder)

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt and the encoders' weights decides the output (part of text-cache keys)."""
        return {"max_sequence_length": self.max_sequence_length, "guidance": self.guidance}


class PreparedTextEncoder(torch.nn.Module):
    """A prepared (DDP-wrapped) text encoder as FluxPipeline uses one: calls go through the wrapper, so a trained
    encoder's gradients synchronise across processes; `dtype` and `device` are the plain model's."""

    def __init__(self, prepared: torch.nn.Module, plain: torch.nn.Module) -> None:
        super().__init__()
        self.prepared = prepared
        self._plain = [plain]  # in a list: not registered twice as a submodule (the wrapper holds it)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.prepared(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The plain encoder's dtype (FluxPipeline casts the pooled CLIP output to it)."""
        return self._plain[0].dtype

    @property
    def device(self) -> torch.device:
        """The plain encoder's device."""
        return self._plain[0].device


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [B, C, H, W] -> (tokens [B, H/2 * W/2, 4C], image ids [H/2 * W/2, 3]), by FluxPipeline's helpers."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    ids = FluxPipeline._prepare_latent_image_ids(batch, height // PACKING, width // PACKING, latents.device,
                                                 latents.dtype)
    return packed, ids


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens [B, H/2 * W/2, 4C] -> latents [B, C, H, W] (H, W in latent cells), by FluxPipeline's helper."""
    from diffusers import FluxPipeline

    # the helper takes pixel sizes and the VAE factor; in latent cells the factor is 1
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def encode_weighted_t5(tokenizer: Any, text_encoder: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """T5 states [B, max_length, D] with `(word:1.2)` weights, rescaled to each row's unweighted mean; an unweighted
    prompt gets exactly FluxPipeline's tokens (content, eos, padding)."""
    from hcpdiff.infer.prompt_weights import apply_weights, weighted_tokens

    rows, weight_rows = [], []
    for prompt in prompts:
        ids, weights = weighted_tokens(tokenizer, prompt)
        ids, weights = ids[: max_length - 1], weights[: max_length - 1]
        padding = max_length - 1 - len(ids)
        rows.append([*ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weight_rows.append([*weights, 1.0] + [1.0] * padding)
    input_ids = torch.tensor(rows, dtype=torch.long, device=text_encoder.device)
    with torch.no_grad():
        embeds = text_encoder(input_ids, output_hidden_states=False)[0]
    return apply_weights(embeds, torch.tensor(weight_rows))


class Flux(Family):
    """FLUX.1-dev and FLUX.1-schnell (`FluxPipeline`)."""

    name: ClassVar[str] = "flux"
    description: ClassVar[str] = "FLUX.1 (dev / schnell)"
    denoiser: ClassVar[str] = "transformer"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5 (sequence)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_flux.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux", "flux-schnell")
    single_file_marker: ClassVar[str | None] = "double_blocks."  # Black Forest Labs' transformer layout

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        if index.get("_class_name") == "FluxPipeline":
            return True
        # text-to-image FLUX only: Fill / Depth / Canny transformers take extra image channels (384 / 128 inputs)
        transformer = read_config("transformer")
        return (transformer is not None and transformer.get("_class_name") == "FluxTransformer2DModel"
                and transformer.get("in_channels", 64) == 64)

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_flux import make_tiny_flux

        return make_tiny_flux(out_dir, seed=seed, schnell=variant == "flux-schnell")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return {
            "transformer": lambda: FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            "text_encoder_2": lambda: T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **common),
            "tokenizer_2": lambda: T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", **common),
        }

    def load_single_file(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """The transformer from one Black Forest Labs-layout file (`double_blocks.0.img_attn.qkv.weight`, ...), which
        diffusers' from_single_file converts with the config folder's transformer config; every other part (VAE, CLIP,
        T5, tokenizers, scheduler) from the config folder, whose own transformer weights are never read."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        folder = options["config"]
        common = {"revision": None, "local_files_only": options.get("local_files_only", True)}
        components = {part: load() for part, load in self.part_loaders(folder, common).items() if part != "transformer"}
        # fp32 as from a folder: the trainer casts frozen weights to the run's precision itself
        components["transformer"] = FluxTransformer2DModel.from_single_file(
            path, config=folder, subfolder="transformer", torch_dtype=torch.float32, **common)
        components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler",
                                                                                  **common)
        return components

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler: its config holds the shift the objective applies."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x 2 (2x2 packing): 16 for FLUX."""
        return self.vae_scale_factor(read_config) * PACKING * int(read_config("transformer").get("patch_size", 1))

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 overflows FLUX's activations (NaN losses, empty LoRAs): refused."""
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 makes FLUX.1 train NaN losses; use bf16 (or null for fp32)")

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = 1.0) -> Any:
        config = components["transformer"].config
        return FluxConditioner(text_pipeline(components),
                               max_sequence_length or default_max_sequence_length(config),
                               guidance if config.get("guidance_embeds") else None)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.ddpm import DDPM_LOSS_KEYS, refuse_other_objective_keys
        from hcpdiff.objectives.flow_matching import FlowMatchingObjective

        refuse_other_objective_keys(loss_spec, DDPM_LOSS_KEYS, "DDPM", "flow matching", self.description)
        return FlowMatchingObjective.from_spec(noise_scheduler, loss_spec)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """Pack, call the transformer at sigma (it scales by 1000 itself), unpack to [B, C, H, W] for the loss."""
        height, width = noisy_latents.shape[-2:]
        tokens, image_ids = pack_latents(noisy_latents)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)  # as encode_prompt makes them
        prediction = denoiser(hidden_states=tokens, timestep=timesteps.to(tokens.dtype),
                              guidance=conditioning.get("guidance"), pooled_projections=conditioning["pooled_projections"],
                              encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return unpack_latents(prediction, height, width)

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                            text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                            text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """T5 states with `(word:1.2)` weights, CLIP pooled text unweighted; FLUX-dev is guidance-distilled, so the
        negative prompt is not used (guidance_scale sets the embedded guidance)."""
        from hcpdiff.infer.prompt_weights import parse_prompt_weights

        max_length = default_max_sequence_length(pipe.transformer.config)
        plain = ["".join(text for text, _ in parse_prompt_weights(prompt)) for prompt in prompts]
        with torch.no_grad():
            pooled = pipe._get_clip_prompt_embeds(plain, device=pipe.text_encoder.device)
        return {"prompt_embeds": encode_weighted_t5(pipe.tokenizer_2, pipe.text_encoder_2, prompts, max_length),
                "pooled_prompt_embeds": pooled, "max_sequence_length": max_length}
