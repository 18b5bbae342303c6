"""Wan text to video (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V 5B, Wan2.2 T2V A14B's two experts): a 3-D DiT on the
causal video VAE's latents [B, C, F, H, W] (4x fewer frames plus one, 8x or 16x smaller sides, per-channel
normalised), conditioned on a UMT5 encoder's last hidden states (each prompt's own tokens, zero-padded to a fixed
length), trained by flow matching with the scheduler's static flow shift.

Everything that training and inference must agree on comes from WanPipeline itself: prompt encoding
(`encode_prompt`: cleaning, padding to max_sequence_length, states past each prompt's tokens zeroed), the latents'
normalisation (the VAE config's latents_mean / latents_std, as the pipeline undoes it before decoding) and the
transformer's call as its sampling loop makes it: timestep t = 1000 sigma, the output followed as the flow-matching
velocity noise - x0. Wan2.2 TI2V's pipeline gives every latent token its own timestep (`expand_timesteps`); in text to
video they are all t, which the transformer reads as the one timestep t (its output agrees to float rounding), so
training passes t per sample.

An image trains as a 1-frame clip (the causal VAE encodes a first frame on its own), so image and video datasets mix.
Wan2.2 A14B (`transformer` denoises the high-noise steps, t >= boundary_ratio x 1000, `transformer_2` the rest) trains
one expert at a time (`experts`: `model.expert` high_noise | low_noise, loaded alone in the transformer's place, its
sigmas drawn within its range); renders load both, each LoRA on the expert its file's metadata names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Expert, Family, pipeline_text_encoder, to_module

MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens: WanPipeline.__call__'s default
TEMPORAL_FACTOR = 4  # the VAE's frames per latent frame (after the first): clips of 4k + 1 frames

# ComfyUI runs Wan in its original layout (comfy/ldm/wan/model.py, the names diffusers'
# _convert_non_diffusers_wan_lora_to_diffusers reads): `self_attn.q` for `attn1.to_q`, `cross_attn.o` for
# `attn2.to_out.0`, `ffn.0` / `ffn.2` for `ffn.net.0.proj` / `ffn.net.2`, the embedders and head by their own names;
# its LoRA loader reads a layer as `diffusion_model.<original module path>`. Every layer is a plain rename.
COMFY_PREFIX = "diffusion_model."
ORIGINAL_NAMES = (  # (diffusers module path, original module path), as regular expressions with one block group
    (r"(blocks\.\d+)\.attn1\.to_([qkv])", r"\1.self_attn.\2"), (r"(blocks\.\d+)\.attn1\.to_out\.0", r"\1.self_attn.o"),
    (r"(blocks\.\d+)\.attn2\.to_([qkv])", r"\1.cross_attn.\2"),
    (r"(blocks\.\d+)\.attn2\.to_out\.0", r"\1.cross_attn.o"),
    (r"(blocks\.\d+)\.ffn\.net\.0\.proj", r"\1.ffn.0"), (r"(blocks\.\d+)\.ffn\.net\.2", r"\1.ffn.2"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"), (r"proj_out", "head.head"),
)
# the reverse: original module path -> diffusers module path
DIFFUSERS_NAMES = (
    (r"(blocks\.\d+)\.self_attn\.([qkv])", r"\1.attn1.to_\2"), (r"(blocks\.\d+)\.self_attn\.o", r"\1.attn1.to_out.0"),
    (r"(blocks\.\d+)\.cross_attn\.([qkv])", r"\1.attn2.to_\2"), (r"(blocks\.\d+)\.cross_attn\.o", r"\1.attn2.to_out.0"),
    (r"(blocks\.\d+)\.ffn\.0", r"\1.ffn.net.0.proj"), (r"(blocks\.\d+)\.ffn\.2", r"\1.ffn.net.2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"), (r"head\.head", "proj_out"),
)


def renamed(name: str, table: tuple[tuple[str, str], ...], what: str) -> str:
    """`name` through the first pattern of `table` matching it whole; a name none matches is one ModelError."""
    for pattern, replacement in table:
        if re.fullmatch(pattern, name):
            return re.sub(f"^{pattern}$", replacement, name)
    raise ModelError(f"--to_webui / --from_webui: the Wan layer '{name}' has no {what} name in hcpdiff; leave it out "
                     "of the LoRA, or convert with --to_diffusers")


def text_pipeline(components: dict[str, Any]) -> Any:
    """A WanPipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], vae=None,
                       scheduler=None, transformer=None)


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
    """Prompt states [B, max_sequence_length, D] by the pipeline's encode_prompt (zero past each prompt's tokens)."""
    prompt_embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                          max_sequence_length=max_sequence_length, device=device)
    return prompt_embeds


class WanConditioner:
    """prompts -> {"encoder_hidden_states" [B, L, D]}: every prompt at the fixed length L, zero past its tokens, as
    WanPipeline hands it to the transformer."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text input for one batch, encoded as WanPipeline encodes it."""
        return {"encoder_hidden_states": encode_prompts(self.pipe, prompts, self.max_sequence_length, device)}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt decides the states (part of the text cache's key)."""
        return {"max_sequence_length": self.max_sequence_length}


def encode_weighted_umt5(pipe: Any, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """States [B, L, D] as `encode_prompts` gives them, with `(word:1.2)` weights on the prompt's tokens (each row
    rescaled to its unweighted mean over its own tokens). Unweighted prompts go through the pipeline's encode_prompt
    itself; weighted ones are tokenised span by span, cleaned as the pipeline cleans a prompt, and encoded with the
    pipeline's mask."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    from hcpdiff.infer.prompt_weights import apply_weights, parse_prompt_weights

    device = pipe.text_encoder.device
    spans = [parse_prompt_weights(prompt) for prompt in prompts]
    if all(weight == 1.0 for prompt_spans in spans for _, weight in prompt_spans):
        return encode_prompts(pipe, ["".join(text for text, _ in s) for s in spans], max_sequence_length, device)
    tokenizer = pipe.tokenizer
    rows, weight_rows, lengths = [], [], []
    for prompt_spans in spans:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in prompt_spans:
            span_ids = tokenizer(prompt_clean(text), add_special_tokens=False).input_ids
            ids, weights = ids + span_ids, weights + [weight] * len(span_ids)
        ids = [*ids[: max_sequence_length - 1], tokenizer.eos_token_id]
        weights = [*weights[: max_sequence_length - 1], 1.0]
        lengths.append(len(ids))
        rows.append(ids + [tokenizer.pad_token_id] * (max_sequence_length - len(ids)))
        weight_rows.append(weights + [1.0] * (max_sequence_length - len(ids)))
    input_ids = torch.tensor(rows, device=device)
    mask = (torch.arange(max_sequence_length)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    states = pipe.text_encoder(input_ids, mask).last_hidden_state.float()
    weighted = []
    for row, row_weights, length in zip(states, weight_rows, lengths):
        own = apply_weights(row[:length][None], torch.tensor(row_weights[:length])[None])[0]
        weighted.append(torch.cat([own, own.new_zeros(max_sequence_length - length, own.shape[1])]))
    return torch.stack(weighted).to(pipe.text_encoder.dtype)


def latents_mean_std(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents (mean, std) [1, C, 1, 1, 1], as WanPipeline denormalises with them."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


class Wan(Family):
    """Wan2.1 / Wan2.2 text to video (`WanPipeline`)."""

    name: ClassVar[str] = "wan"
    description: ClassVar[str] = "Wan"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("blocks",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # UMT5-XXL
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    train_config: ClassVar[str] = "cfgs/train/examples/lora_wan_t2v.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2video_wan.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("wan", "wan2.2-ti2v", "wan2.2-a14b")
    renders_video: ClassVar[bool] = True
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": COMFY_PREFIX}
    has_webui_layout: ClassVar[bool] = True
    video_fps: ClassVar[int] = 16  # Wan2.1's frame rate (Wan2.2 TI2V renders 24)
    frame_step: ClassVar[int] = TEMPORAL_FACTOR  # training clips of 4k + 1 frames

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # text to video only: image to video, VACE, animate and video to video have their own class names
        if "_class_name" in index:
            return index["_class_name"] == "WanPipeline"
        transformer = read_config("transformer")
        return (transformer is not None and transformer.get("_class_name") == "WanTransformer3DModel"
                and not transformer.get("image_dim"))

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_wan import make_tiny_wan

        return make_tiny_wan(out_dir, seed=seed, variant=variant or "wan")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        """The four parts, and Wan2.2 A14B's low-noise expert `transformer_2` (a `boundary_ratio` in
        model_index.json)."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        from hcpdiff.models.loading import pipeline_settings

        loaders = {
            "transformer": lambda: WanTransformer3DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKLWan.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }
        if self.experts(pipeline_settings(source, common)):
            loaders["transformer_2"] = lambda: WanTransformer3DModel.from_pretrained(source, subfolder="transformer_2",
                                                                                     **common)
        return loaders

    def experts(self, pipeline_settings: dict[str, Any]) -> tuple[Expert, ...]:
        """Wan2.2 A14B's two experts, split where WanPipeline switches them: `transformer` (high_noise) denoises the
        steps t >= boundary_ratio x 1000, i.e. sigma >= boundary_ratio (t = 1000 sigma), `transformer_2`
        (low_noise) the rest."""
        boundary = pipeline_settings.get("boundary_ratio")
        if boundary is None:
            return ()
        return (Expert("high_noise", "transformer", float(boundary), 1.0),
                Expert("low_noise", "transformer_2", 0.0, float(boundary)))

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """A FlowMatchEulerDiscreteScheduler with the shipped sampler's static flow shift (UniPC's `flow_shift`), so
        training draws sigmas shifted as sampling steps through them."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        shift = scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
                                               shift=float(shift), use_dynamic_shifting=False)

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is refused: Wan is bf16-native (its pipelines run the transformer in bf16)."""
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 overflows Wan's transformer; use bf16 (or null for fp32)")

    # ---------------------------------------------------------------------------------------- latents
    def vae_scale_factor(self, read_config: ConfigReader) -> int:
        """The VAE's spatial factor (`scale_factor_spatial`: 8 for Wan2.1, 16 for Wan2.2 TI2V's patched VAE)."""
        return int(read_config("vae").get("scale_factor_spatial") or 8)

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the transformer's spatial patch: 16 for Wan2.1 (WanPipeline refuses other sizes), 32 for
        Wan2.2 TI2V."""
        patch = read_config("transformer").get("patch_size", (1, 2, 2))
        return self.vae_scale_factor(read_config) * int(patch[1])

    def latent_scale_shift(self, vae: Any) -> tuple[float, float]:
        raise NotImplementedError("Wan normalises latents per channel (encode_latent_dist)")

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] (1-frame clips) or clips [B, 3, F, H, W] in [-1, 1] -> the posterior's (mean, std)
        [B, C, (F - 1) / 4 + 1, H/f, W/f], each channel normalised by latents_mean / latents_std as WanPipeline
        denormalises before decoding."""
        clips = pixel_values if pixel_values.ndim == 5 else pixel_values.unsqueeze(2)
        dist = vae.encode(to_module(vae, clips)).latent_dist
        mean, std = latents_mean_std(vae, dist.mean)
        return ((dist.mean - mean) / std).float(), (dist.std / std).float()

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """UMT5 tokens are cut at `max_sequence_length` (null: the pipeline's 512); tokenizer_repeats and clip_skip
        do not apply."""
        return WanConditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The velocity noise - x0 at sigma = `timesteps`, by the transformer called as WanPipeline's loop calls it:
        latents [B, C, F, H, W], timestep 1000 sigma, the prompt states."""
        return denoiser(hidden_states=noisy_latents, timestep=timesteps.float() * 1000.0,
                        encoder_hidden_states=conditioning["encoder_hidden_states"].to(noisy_latents.dtype),
                        return_dict=False)[0]

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                           vae=components["vae"], transformer=components["transformer"], scheduler=scheduler,
                           transformer_2=components.get("transformer_2"))

    def configure_pipeline(self, pipe: Any, pipeline_settings: dict[str, Any]) -> None:
        """Wan2.2 A14B's `boundary_ratio`, where the pipeline hands the steps from `transformer` to `transformer_2`."""
        if pipeline_settings.get("boundary_ratio") is not None:
            pipe.register_to_config(boundary_ratio=pipeline_settings["boundary_ratio"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states with `(word:1.2)` weights (an unweighted prompt: the pipeline's
        encode_prompt exactly)."""
        with torch.no_grad():
            return {"prompt_embeds": encode_weighted_umt5(pipe, prompts, MAX_SEQUENCE_LENGTH),
                    "negative_prompt_embeds": encode_weighted_umt5(pipe, neg_prompts, MAX_SEQUENCE_LENGTH),
                    "max_sequence_length": MAX_SEQUENCE_LENGTH}

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI Wan file: `diffusion_model.blocks.N.self_attn.` / `cross_attn.` keys, or Wan version metadata."""
        version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return "wan" in version.lower() or any(
            re.match(rf"{re.escape(COMFY_PREFIX)}blocks\.\d+\.(self_attn|cross_attn)\.", key) for key in keys)

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """ComfyUI's names: `diffusion_model.` + the original layout's module path (every layer a rename)."""
        from hcpdiff.lora.fused_layout import FusedLayer, native_to_fused

        if other := [part for part in states if part != self.denoiser]:
            raise ModelError(f"--to_webui: a Wan {other[0]} LoRA has no ComfyUI layout in hcpdiff; convert the "
                             "transformer LoRA alone, and render the text-encoder LoRA with hcpdiff's visualizer")

        def original(layer: str) -> tuple[Any, int]:
            return FusedLayer(renamed(layer, ORIGINAL_NAMES, "ComfyUI"), (layer,)), 0

        fused = native_to_fused(states[self.denoiser], original, self.denoiser)
        return {self.denoiser: {COMFY_PREFIX + name: parts for name, parts in fused.items()}}

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a ComfyUI Wan file (`diffusion_model.` + original names, or bare ones)."""
        from hcpdiff.lora.fused_layout import FusedLayer, fused_to_native
        from hcpdiff.lora.lycoris_format import native_tensors
        from hcpdiff.lora.webui_format import split_webui_key

        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            webui_layer, suffix = split_webui_key(key)
            by_layer.setdefault(webui_layer.removeprefix(COMFY_PREFIX), {})[suffix] = tensor
        layers = [FusedLayer(name, (renamed(name, DIFFUSERS_NAMES, "diffusers"),)) for name in by_layer]
        by_original = {name: native_tensors(name, parts) for name, parts in by_layer.items()}
        return {self.denoiser: fused_to_native(by_original, layers, self.denoiser)}

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Layers outside the blocks (embedders, head): ComfyUI reads them, diffusers' Wan loader refuses their
        alphas."""
        outside = sorted({key.split(".lora_")[0] for key in states.get(self.denoiser, {})
                          if ".lora_" in key and not key.startswith("blocks.")})
        if not outside:
            return []
        return [f"{len(outside)} layer(s) outside the blocks ({', '.join(outside[:3])}): ComfyUI loads them, "
                "diffusers' WanPipeline.load_lora_weights refuses their alphas (use --to_diffusers for diffusers)"]

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Wan."""
        return {"ss_base_model_version": "wan", "ss_v2": "False", "architecture": "wan",
                "network_module": "networks.lora"}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """`num_frames` (null: 1, a still) rounded to the VAE's 4k + 1 is the pipeline's own; the rest as given."""
        args = dict(call_args)
        frames = args.pop("num_frames", None) or 1
        if (frames - 1) % TEMPORAL_FACTOR:
            raise ConfigError(f"num_frames: {frames} is not 4k + 1 (Wan's VAE encodes a first frame, then groups of "
                              f"{TEMPORAL_FACTOR}); use {(frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1}")
        args["num_frames"] = frames
        return args
