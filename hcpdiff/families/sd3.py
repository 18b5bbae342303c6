"""Stable Diffusion 3 / 3.5 (medium, large): an MMDiT transformer on 16-channel latents, conditioned on CLIP-L and
CLIP-G (penultimate states side by side, zero-padded to T5's width, joined with T5's states on the sequence; pooled
text from both CLIPs), trained by flow matching with SD3's static shift.

Prompt encoding comes from StableDiffusion3Pipeline itself (`encode_prompt`, and `_get_t5_prompt_embeds` for the T5
part, which gives zeros when T5 is left out), so training and inference agree by construction. The transformer
patchifies its input itself: latents go in unpacked.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder

MAX_SEQUENCE_LENGTH = 256  # T5 tokens: StableDiffusion3Pipeline's default, in training as at inference
TIMESTEP_SCALE = 1000  # SD3's transformer takes t = sigma * 1000 (the scheduler's timesteps), unlike FLUX's


def text_pipeline(components: dict[str, Any]) -> Any:
    """A StableDiffusion3Pipeline holding the text parts, whose encode_prompt the conditioner calls. The transformer
    is there only for its config: without T5 the pipeline fills T5's place with zeros of its joint_attention_dim."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=components["transformer"], scheduler=None, vae=None,
        text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
        text_encoder_3=components.get("text_encoder_3"), tokenizer_3=components.get("tokenizer_3"))


class SD3Conditioner:
    """prompts -> {"encoder_hidden_states" [B, 77 + L, D_t5], "pooled_projections" [B, D_l + D_g]}."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them
    encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipe: Any, max_sequence_length: int, clip_skip: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.clip_skip = clip_skip

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text keyword arguments for one batch, encoded as StableDiffusion3Pipeline encodes them."""
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False, clip_skip=self.clip_skip,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass: 0 is CLIP-L, 1 CLIP-G, 2 T5."""
        setattr(self.pipe, self.encoder_names[index], pipeline_text_encoder(text_encoder))


def encode_weighted_sd3(pipe: Any, prompts: list[str], clip_skip: int, max_sequence_length: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) laid out as StableDiffusion3Pipeline.encode_prompt lays them out, with
    `(word:1.2)` weights on both CLIPs' states and on T5's (each rescaled to its unweighted mean); the pooled text is
    unweighted, as in a1111. CLIP reads 77 tokens as the pipeline does; T5 carries longer prompts."""
    from hcpdiff.families.flux import encode_weighted_t5
    from hcpdiff.infer.prompt_weights import apply_weights, weighted_rows
    from hcpdiff.models.prompt_encoder import PromptEncoder
    from hcpdiff.models.sdxl import encode_penultimate

    device = pipe.text_encoder.device
    states, pooled = [], []
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        encoder = PromptEncoder(tokenizer, text_encoder, tokenizer_repeats=1, clip_skip=clip_skip)
        input_ids, weights = weighted_rows(encoder, prompts)
        hidden, pooled_text = encode_penultimate(encoder, input_ids)
        states.append(apply_weights(hidden, weights))
        pooled.append(pooled_text)
    if pipe.text_encoder_3 is None:  # zeros where T5's states would be (model.drop_t5), as the pipeline gives
        t5_states = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_sequence_length, device=device)
    else:
        t5_states = encode_weighted_t5(pipe.tokenizer_3, pipe.text_encoder_3, prompts, max_sequence_length)
    clip_states = torch.cat(states, dim=-1).to(t5_states.dtype)
    clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states.to(clip_states.device)], dim=-2), torch.cat(pooled, dim=-1)


def text_encoder_module_names(model_path: str | None) -> dict[str, list[str]]:
    """{text_encoder (CLIP-L), text_encoder_2 (CLIP-G), text_encoder_3 (T5): module names}, from `model_path`'s
    configs or else SD3's (12 and 32 CLIP layers with projections, 24 T5 blocks, gated MLP), on the meta device."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    if model_path is not None:
        missing = [part for part in parts if not (Path(model_path) / part / "config.json").is_file()]
        if missing:
            raise ModelError(f"--model '{model_path}' is not an SD3 model folder (no {missing[0]}/config.json inside).")
        configs = [CLIPTextConfig.from_pretrained(model_path, subfolder=parts[0]),
                   CLIPTextConfig.from_pretrained(model_path, subfolder=parts[1]),
                   T5Config.from_pretrained(model_path, subfolder=parts[2])]
    else:
        configs = [CLIPTextConfig(num_hidden_layers=12), CLIPTextConfig(num_hidden_layers=32),
                   T5Config(num_layers=24, feed_forward_proj="gated-gelu")]
    with init_empty_weights():
        models = [CLIPTextModelWithProjection(configs[0]), CLIPTextModelWithProjection(configs[1]),
                  T5EncoderModel(configs[2])]
    return {part: [name for name, _ in model.named_modules() if name] for part, model in zip(parts, models)}


class StableDiffusion3(Family):
    """SD3-medium, SD3.5-medium and SD3.5-large (`StableDiffusion3Pipeline`)."""

    name: ClassVar[str] = "sd3"
    description: ClassVar[str] = "Stable Diffusion 3 / 3.5"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    # CLIP-L, CLIP-G (both with projections), T5; T5 trains only when a config asks (lora_text_encoder_3)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    t5_parts: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")
    # kohya's lora_sd3.py: lora_unet (the MMDiT, original layout), lora_te1 (CLIP-L), lora_te2 (CLIP-G), lora_te3 (T5)
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet_", "text_encoder": "lora_te1_",
                                                "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
    has_webui_layout: ClassVar[bool] = True
    train_config: ClassVar[str] = "cfgs/train/examples/lora_sd3.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_sd3.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("sd3", "sd3.5")
    # diffusers' SD3 img2img / inpaint pipelines of the same components (AutoPipelineFor*.from_pipe)
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img", "img2img", "inpaint", "highres_fix", "latent_upscale")
    single_file_marker: ClassVar[str | None] = "joint_blocks."  # Stability's original MMDiT layout

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        if index.get("_class_name") == "StableDiffusion3Pipeline":
            return True
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "SD3Transformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_sd3 import make_tiny_sd3

        return make_tiny_sd3(out_dir, seed=seed, sd35=variant == "sd3.5")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        def clip(folder: str) -> Callable[[], Any]:
            return lambda: CLIPTextModelWithProjection.from_pretrained(source, subfolder=folder, **common)

        return {
            "transformer": lambda: SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": clip("text_encoder"),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            "text_encoder_2": clip("text_encoder_2"),
            "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
            "text_encoder_3": lambda: T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **common),
            "tokenizer_3": lambda: T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **common),
        }

    def load_single_file(self, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """The transformer from one file in Stability's original MMDiT layout (`joint_blocks.0.x_block.attn.qkv.weight`,
        ..., with or without `model.diffusion_model.`; other parts a full checkpoint holds are not read), converted by
        diffusers' from_single_file with the config folder's transformer config; every other part (VAE, CLIPs, T5
        unless `options["skip"]` names it, tokenizers, scheduler) from the config folder, whose own transformer weights
        are never read."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        folder, skip = options["config"], options.get("skip", ())
        common = {"revision": None, "local_files_only": options.get("local_files_only", True)}
        components = {part: load() for part, load in self.part_loaders(folder, common).items()
                      if part != "transformer" and part not in skip}
        # fp32 as from a folder: the trainer casts frozen weights to the run's precision itself
        components["transformer"] = SD3Transformer2DModel.from_single_file(
            path, config=folder, subfolder="transformer", torch_dtype=torch.float32, **common)
        components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler",
                                                                                  **common)
        return components

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler: its config's `shift` is the static shift trained with."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the transformer's patch size: 16 for SD3."""
        return self.vae_scale_factor(read_config) * int(read_config("transformer").get("patch_size", 2))

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is allowed (diffusers' own SD3 example trains SD3-medium in fp16) with a warning: SD3.5 and the T5
        encoder were trained in bf16 and are reported to overflow in fp16 (NaN losses, black images)."""
        if mixed_precision == "fp16":
            logging.getLogger("hcpdiff.train").warning(
                "mixed_precision: fp16 on Stable Diffusion 3: SD3.5 and T5 are known to overflow in fp16 (NaN loss, "
                "black previews); use bf16 where the GPU has it")

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """CLIPs read 77 tokens as the pipeline does (tokenizer_repeats does not apply); T5 reads
        `max_sequence_length` (null: the pipeline's 256)."""
        return SD3Conditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH, clip_skip)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The transformer on unpacked latents [B, C, H, W] at t = sigma * 1000, as StableDiffusion3Pipeline calls it."""
        # in fp32, as the pipeline passes its scheduler's timesteps (bf16 would round t to steps of 4 near 1000)
        return denoiser(hidden_states=noisy_latents, timestep=timesteps.float() * TIMESTEP_SCALE,
                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=components["transformer"], scheduler=scheduler, vae=components["vae"],
            text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
            text_encoder_3=components.get("text_encoder_3"), tokenizer_3=components.get("tokenizer_3"))

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """Weighted states of all three encoders for the prompts and the negative prompts (an empty negative
        prompt is encoded, as the pipeline does for negative_prompt=""); pooled text unweighted."""
        with torch.no_grad():
            embeds, pooled = encode_weighted_sd3(pipe, prompts, clip_skip, MAX_SEQUENCE_LENGTH)
            neg_embeds, neg_pooled = encode_weighted_sd3(pipe, neg_prompts, clip_skip, MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg_embeds,
                "negative_pooled_prompt_embeds": neg_pooled, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A kohya SD3 file: names only SD3's original layout has (joint_blocks, the embedders), or kohya's SD3
        version metadata (`modelspec.architecture` stable-diffusion-3-...)."""
        from hcpdiff.families.sd3_layout import OWN_STARTS

        return (metadata.get("modelspec.architecture", "").startswith("stable-diffusion-3")
                or any(key.startswith(OWN_STARTS) for key in keys))

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{part: {kohya layer: its native tensors}}: the transformer in the original MMDiT layout (q / k / v fused
        exactly into one qkv LoRA per stream), the text encoders by their module paths."""
        from hcpdiff.families.sd3_layout import mmdit_lookup, native_pre_only_blocks
        from hcpdiff.lora.fused_layout import native_to_fused
        from hcpdiff.lora.state_io import layer_states
        from hcpdiff.lora.webui_format import webui_name_map

        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for part, state in states.items():
            prefix = self.webui_prefixes[part]
            by_layer = layer_states(state)
            if part == self.denoiser:
                lookup = mmdit_lookup(native_pre_only_blocks(by_layer))
                out[part] = {prefix + name.replace(".", "_"): parts
                             for name, parts in native_to_fused(state, lookup, part).items()}
            else:
                names = webui_name_map(by_layer, part, self.webui_prefixes)
                out[part] = {names[layer]: parts for layer, parts in by_layer.items()}
        return out

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native states by part of a kohya SD3 file: original-layout layers split back into diffusers layers (a
        fused qkv LoRA into one per projection, exactly), text-encoder layers by the names of `model_path`'s encoders
        (else SD3's: CLIP-L, CLIP-G, T5-XXL)."""
        from hcpdiff.families.sd3_layout import PRE_ONLY_MODULATION, is_pre_only_modulation, mmdit_layer_of_webui_name
        from hcpdiff.lora.fused_layout import fused_to_native, is_plain_lora
        from hcpdiff.lora.lycoris_format import native_tensors
        from hcpdiff.lora.webui_format import split_webui_key, webui_to_native

        denoiser_prefix = self.webui_prefixes[self.denoiser]
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        text = {key: tensor for key, tensor in state.items() if not key.startswith(denoiser_prefix)}
        for key, tensor in state.items():
            if key.startswith(denoiser_prefix):
                webui_layer, suffix = split_webui_key(key)
                grouped.setdefault(webui_layer, {})[suffix] = tensor
        by_name, layers = {}, []
        for webui_layer, webui_parts in grouped.items():
            parts = native_tensors(webui_layer, webui_parts)
            pre_only = False
            if webui_layer.endswith(PRE_ONLY_MODULATION.replace(".", "_")):
                if not is_plain_lora(parts):
                    raise ModelError(f"webui LoRA layer '{webui_layer}' is not a plain LoRA; SD3's last block orders "
                                     "this layer's rows unlike diffusers, so hcpdiff reads it as a plain LoRA only.")
                pre_only = is_pre_only_modulation(parts[".lora_B.weight"].shape[0], parts[".lora_A.weight"].shape[1])
            layer = mmdit_layer_of_webui_name(webui_layer.removeprefix(denoiser_prefix), pre_only)
            if layer is None:
                raise ModelError(f"webui LoRA layer '{webui_layer}' is no layer of SD3's original (MMDiT) layout, "
                                 "whose names look like lora_unet_joint_blocks_0_x_block_attn_qkv, "
                                 "lora_unet_joint_blocks_0_context_block_mlp_fc1; nothing was written.")
            by_name[layer.name] = parts
            layers.append(layer)
        states: dict[str, dict[str, torch.Tensor]] = {}
        if by_name:
            states[self.denoiser] = fused_to_native(by_name, layers, self.denoiser)
        if text:
            prefixes = {part: prefix for part, prefix in self.webui_prefixes.items() if part != self.denoiser}
            states.update(webui_to_native(text, text_encoder_module_names(model_path), prefixes))
        return states

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Layers a reader leaves out without an error: kohya's lora_sd3 builds LoRA modules for the joint blocks and
        only given `emb_dims` for the top-level layers; diffusers' load_lora_weights reads no kohya SD3 names."""
        from hcpdiff.families.sd3_layout import mmdit_lookup
        from hcpdiff.lora.state_io import layer_states

        lookup = mmdit_lookup(set())  # names only: whether a modulation's halves swap does not matter here
        top_level = sorted({found[0].name for layer in layer_states(states.get(self.denoiser, {}))
                            if not layer.startswith("transformer_blocks.") and (found := lookup(layer)) is not None})
        notes = ["diffusers' StableDiffusion3Pipeline.load_lora_weights does not read kohya SD3 names; give diffusers "
                 "a --to_diffusers file (ComfyUI loads this one)."]
        if top_level:
            notes.append(f"kohya's lora_sd3 adds LoRA modules for the top-level transformer layers "
                         f"({', '.join(top_level)}) "
                         "only when its network is built with emb_dims (ComfyUI loads them).")
        return notes

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """The version metadata kohya's SD3 trainer writes: `ss_base_model_version` its model type (medium, 5-medium,
        5-large, from the base model folder's transformer config) and `modelspec.architecture`
        stable-diffusion-3-<type>; without a readable config, stable-diffusion-3."""
        config = Path(base_model) / "transformer" / "config.json" if base_model else None
        model_type = ""
        if config is not None and config.is_file():
            transformer = json.loads(config.read_text(encoding="utf-8"))
            if transformer.get("qk_norm"):  # SD3.5; medium has dual-attention (attn2) blocks, large none
                model_type = "5-medium" if transformer.get("dual_attention_layers") else "5-large"
            else:
                model_type = "medium"
        return {"ss_base_model_version": model_type or "sd3", "ss_v2": "False",
                "architecture": f"stable-diffusion-3-{model_type}" if model_type else "stable-diffusion-3",
                "network_module": "networks.lora_sd3"}
