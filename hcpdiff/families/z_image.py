"""Z-Image (base and Turbo): a single-stream DiT on 2x2-patched 16-channel latents of FLUX's VAE, conditioned on a
Qwen3 encoder's penultimate hidden states of a chat-templated prompt (one variable-length sequence per prompt),
trained by flow matching with the scheduler config's static shift.

Everything that training and inference must agree on comes from ZImagePipeline itself: prompt encoding
(`encode_prompt`: the chat template, padding to max_sequence_length, each prompt's own tokens kept by its mask) and
the transformer's call as its sampling loop makes it: latents as a list of [C, 1, H, W] frames, the timestep
(1000 - t) / 1000 = 1 - sigma, captions as a list of [L_i, D], and the output negated (the transformer predicts
x0 - noise; the scheduler steps along noise - x0, the flow-matching target). The transformer itself pads each caption
and image to its own lengths and masks the batch, so a batch trains as its samples one by one. The conditioner
carries the captions padded to the batch's longest with their mask (the text cache stores each at its own length)
and `denoise` cuts each back to its own tokens.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pad_sequences, pipeline_text_encoder

PATCH = 2  # the transformer's 2x2 latent patches (all_patch_size)
MAX_SEQUENCE_LENGTH = 512  # chat-templated prompt tokens: ZImagePipeline.__call__'s default
# Z-Image-Turbo's scheduler_config.json has shift 3.0, the base Z-Image's 6.0 (both static); the transformer configs
# are the same, so the scheduler's shift is what tells the distilled checkpoint apart
DISTILLED_SHIFTS = {3.0: "Z-Image-Turbo"}


# ComfyUI runs Z-Image in its original layout (the single file diffusers' convert_z_image_transformer_checkpoint_to_
# diffusers reads): q, k, v fused into one `attention.qkv`, `attention.out` for `to_out.0`, `x_embedder` /
# `final_layer` for diffusers' `all_x_embedder.2-1` / `all_final_layer.2-1`, every other module under its diffusers
# path. Its LoRA loader reads a layer as `diffusion_model.<original module path>` (comfy/lora.py's generic key map).
COMFY_PREFIX = "diffusion_model."
QKV = ("to_q", "to_k", "to_v")
ORIGINAL_RENAMES = (("all_x_embedder.2-1", "x_embedder"), ("all_final_layer.2-1", "final_layer"),
                    (".attention.to_out.0", ".attention.out"))  # diffusers -> original, on module paths


def text_pipeline(components: dict[str, Any]) -> Any:
    """A ZImagePipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                          tokenizer=components["tokenizer"])


def unpad_captions(states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """(states [B, L, D], mask [B, L]) -> each prompt's own states [L_i, D], as ZImagePipeline's encode_prompt gives."""
    return [row[row_mask.bool()] for row, row_mask in zip(states, mask)]


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                   ) -> list[torch.Tensor]:
    """Each prompt's states [L_i, D] by the pipeline's encode_prompt (which rewrites the list it is given: a copy)."""
    captions, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                     max_sequence_length=max_sequence_length)
    return captions


class ZImageConditioner:
    """prompts -> {"cap_feats" [B, L, D], "cap_mask" [B, L]}: each prompt's states, padded to the batch's longest."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them
    # a batch's states are padded to its longest prompt: the text cache keeps each prompt's own tokens and pads again
    padded_sequences: ClassVar[dict[str, str]] = {"cap_feats": "cap_mask"}

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's caption inputs for one batch, encoded as ZImagePipeline encodes them."""
        states, mask = pad_sequences(encode_prompts(self.pipe, prompts, self.max_sequence_length, device))
        return {"cap_feats": states, "cap_mask": mask}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt decides the states (part of the text cache's key)."""
        return {"max_sequence_length": self.max_sequence_length}


def chat_text(tokenizer: Any, prompt: str) -> str:
    """A prompt in the chat template, as ZImagePipeline._encode_prompt renders it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def encode_weighted(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                    ) -> list[torch.Tensor]:
    """Each prompt's states [L_i, D] as `encode_prompts` gives them, with `(word:1.2)` weights on the prompt's tokens
    (each prompt's states rescaled to their unweighted mean). Unweighted prompts go through the pipeline's
    encode_prompt itself; weighted ones are tokenised as the pipeline tokenises the plain text in its chat template (a
    token takes the weight of its last character) and encoded as `_encode_prompt` encodes them."""
    from hcpdiff.infer.prompt_weights import apply_weights, parse_prompt_weights

    spans = [parse_prompt_weights(prompt) for prompt in prompts]
    plain = ["".join(text for text, _ in prompt_spans) for prompt_spans in spans]
    if all(weight == 1.0 for prompt_spans in spans for _, weight in prompt_spans):
        return encode_prompts(pipe, plain, max_sequence_length, device)
    prefix_chars = chat_text(pipe.tokenizer, "\x00").index("\x00")
    texts = [chat_text(pipe.tokenizer, text) for text in plain]
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                            return_offsets_mapping=True, return_tensors="pt")
    masks = tokens.attention_mask.to(device).bool()
    hidden = pipe.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=masks,
                               output_hidden_states=True).hidden_states[-2]
    captions = []
    for i, (prompt_spans, text, offsets) in enumerate(zip(spans, texts, tokens.offset_mapping.tolist())):
        char_weights = [1.0] * prefix_chars + [w for span, w in prompt_spans for _ in span]
        char_weights += [1.0] * (len(text) - len(char_weights))
        weights = torch.tensor([char_weights[end - 1] if end > start else 1.0 for start, end in offsets])
        captions.append(apply_weights(hidden[i][masks[i]][None], weights[masks[i].cpu()][None])[0])
    return captions


class ZImage(Family):
    """Z-Image and Z-Image-Turbo text to image (`ZImagePipeline`)."""

    name: ClassVar[str] = "z_image"
    description: ClassVar[str] = "Z-Image"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("noise_refiner", "context_refiner", "layers")
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    train_config: ClassVar[str] = "cfgs/train/examples/lora_z_image.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_z_image.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("z_image", "z_image-turbo")
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": COMFY_PREFIX}
    has_webui_layout: ClassVar[bool] = True

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # text to image only: the img2img / inpaint / controlnet / omni pipelines have their own class names
        if "_class_name" in index:
            return index["_class_name"] == "ZImagePipeline"
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "ZImageTransformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_z_image import make_tiny_z_image

        return make_tiny_z_image(out_dir, seed=seed, turbo=variant == "z_image-turbo")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen2Tokenizer, Qwen3Model

        return {
            "transformer": lambda: ZImageTransformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen3Model.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler: its config holds the static shift the objective applies."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is refused: Z-Image is bf16-native (its model card renders in bf16) and its single-stream
        activations overflow fp16 as FLUX's and Qwen-Image's do."""
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 overflows Z-Image's transformer (NaN losses); use bf16 "
                              "(or null for fp32)")

    def run_warnings(self, noise_scheduler: Any) -> list[str]:
        """A distilled checkpoint (Z-Image-Turbo, told by its scheduler's shift): LoRAs trained on it break the
        few-step distillation, so the run says to train on the base and render on Turbo."""
        config = noise_scheduler.config
        distilled = None if config.get("use_dynamic_shifting") else DISTILLED_SHIFTS.get(float(config.get("shift", 1)))
        if distilled is None:
            return []
        return [f"this looks like {distilled} (scheduler shift {config.get('shift')}), a step-distilled model: a LoRA "
                "trained on it tends to lose the few-step distillation (blurry at 8 steps); train on the base "
                "Z-Image (Tongyi-MAI/Z-Image) and render the LoRA on Turbo"]

    # ---------------------------------------------------------------------------------------- latents
    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the transformer's 2x2 patches: 16 for Z-Image (ZImagePipeline refuses other sizes)."""
        patch = int(read_config("transformer").get("all_patch_size", [PATCH])[0])
        return self.vae_scale_factor(read_config) * patch

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """Chat-templated prompt tokens are cut at `max_sequence_length` (null: the pipeline's 512); tokenizer_repeats
        and clip_skip do not apply."""
        return ZImageConditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The velocity noise - x0 at sigma = `timesteps`, by the transformer called as ZImagePipeline's loop calls
        it: one [C, 1, H, W] frame and one caption [L_i, D] per sample, timestep 1 - sigma, output negated."""
        frames = list(noisy_latents.unsqueeze(2).unbind(dim=0))
        captions = unpad_captions(conditioning["cap_feats"], conditioning["cap_mask"])
        prediction = denoiser(frames, 1.0 - timesteps.float(), captions, return_dict=False)[0]
        return -torch.stack(prediction).squeeze(2)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                              text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states (lists, one tensor per prompt, as the pipeline takes them), with
        `(word:1.2)` weights (an unweighted prompt: the pipeline's encode_prompt exactly)."""
        device = pipe.text_encoder.device
        with torch.no_grad():
            captions = encode_weighted(pipe, prompts, MAX_SEQUENCE_LENGTH, device)
            negative = encode_weighted(pipe, neg_prompts, MAX_SEQUENCE_LENGTH, device)
        return {"prompt_embeds": captions, "negative_prompt_embeds": negative,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI Z-Image file: `diffusion_model.` keys of its original layout (fused `attention.qkv`, refiners),
        or Z-Image version metadata."""
        version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return "z_image" in version or "z-image" in version or any(
            key.startswith(tuple(f"{COMFY_PREFIX}{block}" for block in ("layers.", "noise_refiner.",
                                                                         "context_refiner.")))
            and ".attention." in key for key in keys)

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """ComfyUI's names: `diffusion_model.` + the original layout's module path, q / k / v fused exactly."""
        return native_to_webui(self, states)

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a ComfyUI Z-Image file (its fused q / k / v split exactly)."""
        return webui_to_native(self, state)

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Z-Image."""
        return {"ss_base_model_version": "z_image", "ss_v2": "False", "architecture": "z-image",
                "network_module": "networks.lora"}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """hcpdiff's `guidance_scale` is the usual classifier-free guidance scale (neg + s (pos - neg); 1 = off);
        ZImagePipeline's own is pos + s (pos - neg), so it gets s - 1 (its model card's 4 is 5 here; Turbo's 0 is 1)."""
        args = dict(call_args)
        if "guidance_scale" in args:
            args["guidance_scale"] = args["guidance_scale"] - 1.0
        return args


# ---------------------------------------------------------------------------------------- LoRA files (ComfyUI)


def original_layer(layer: str) -> tuple[Any, int]:
    """(the original-layout layer holding diffusers layer `layer`: a FusedLayer, the layer's place in it)."""
    from hcpdiff.lora.fused_layout import FusedLayer

    if match := re.fullmatch(r"(.+\.attention)\.(to_q|to_k|to_v)", layer):
        return (FusedLayer(f"{match[1]}.qkv", tuple(f"{match[1]}.{piece}" for piece in QKV), (1, 1, 1)),
                QKV.index(match[2]))
    name = f"{layer}."
    for diffusers_name, original in ORIGINAL_RENAMES:
        name = name.replace(f"{diffusers_name}.", f"{original}.")
    return FusedLayer(name[:-1], (layer,)), 0


def layer_of_original_name(name: str) -> Any:
    """The FusedLayer an original-layout module path names (`layers.0.attention.qkv`, `x_embedder`, ...)."""
    from hcpdiff.lora.fused_layout import FusedLayer

    if name.endswith(".attention.qkv"):
        return original_layer(name.removesuffix("qkv") + "to_q")[0]
    layer = f"{name}."
    for diffusers_name, original in ORIGINAL_RENAMES:
        layer = layer.replace(f"{original}.", f"{diffusers_name}.")
    return FusedLayer(name, (layer[:-1],))


def native_to_webui(family: Family, states: dict[str, dict[str, torch.Tensor]]
                    ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{transformer: {`diffusion_model.<original layer>`: its native tensors}}, q / k / v fused exactly."""
    from hcpdiff.lora.fused_layout import native_to_fused

    if other := [part for part in states if part != family.denoiser]:
        raise ModelError(f"--to_webui: a Z-Image {other[0]} LoRA has no ComfyUI layout in hcpdiff; convert the "
                         "transformer LoRA alone, and render the text-encoder LoRA with hcpdiff's visualizer")
    fused = native_to_fused(states[family.denoiser], original_layer, family.denoiser)
    return {family.denoiser: {COMFY_PREFIX + name: parts for name, parts in fused.items()}}


def webui_to_native(family: Family, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Native transformer states of a ComfyUI Z-Image file (`diffusion_model.` + original names, or bare ones),
    fused q / k / v split back exactly."""
    from hcpdiff.lora.fused_layout import fused_to_native
    from hcpdiff.lora.lycoris_format import native_tensors
    from hcpdiff.lora.webui_format import split_webui_key

    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        webui_layer, suffix = split_webui_key(key)
        by_layer.setdefault(webui_layer.removeprefix(COMFY_PREFIX), {})[suffix] = tensor
    layers = {name: layer_of_original_name(name) for name in by_layer}
    by_original = {name: native_tensors(name, parts) for name, parts in by_layer.items()}
    return {family.denoiser: fused_to_native(by_original, layers.values(), family.denoiser)}
