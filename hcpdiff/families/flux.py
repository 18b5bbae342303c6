"""FLUX.1 (dev and schnell): a rectified-flow transformer on 2x2-packed 16-channel latents, CLIP-L pooled + T5 text.

Everything FLUX-specific that training and inference must agree on comes from FluxPipeline itself: prompt encoding
(`encode_prompt`), packing (`_pack_latents` / `_unpack_latents`), image ids (`_prepare_latent_image_ids`) and the
resolution shift (`calculate_shift`, in the flow-matching objective).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder
from hcpdiff.lora.original_layout import BflLayout

PACKING = 2  # 2x2 latent cells form one transformer token
DEV_MAX_SEQUENCE_LENGTH, SCHNELL_MAX_SEQUENCE_LENGTH = 512, 256  # T5 tokens, as Black Forest Labs trained them

# BFL's original transformer layout, by which kohya, ComfyUI and Forge name FLUX LoRAs (`lora_unet_` + the dotted path
# with underscores). {BFL layer: (the diffusers layers whose outputs it stacks, in row order; each one's output width
# over the layer's input width)}, per double block, per single block and at the top level; it is the inverse of
# diffusers' own single-file converter (convert_flux_transformer_checkpoint_to_diffusers). Every Linear of
# FluxTransformer2DModel has a place here.
BFL_DOUBLE_BLOCK = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    "img_attn.proj": (("attn.to_out.0",), (1,)), "txt_attn.proj": (("attn.to_add_out",), (1,)),
    "img_mlp.0": (("ff.net.0.proj",), (4,)), "img_mlp.2": (("ff.net.2",), (1,)),
    "txt_mlp.0": (("ff_context.net.0.proj",), (4,)), "txt_mlp.2": (("ff_context.net.2",), (1,)),
    "img_mod.lin": (("norm1.linear",), (6,)), "txt_mod.lin": (("norm1_context.linear",), (6,)),
}
BFL_SINGLE_BLOCK = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),  # FLUX's MLP ratio is 4
    "linear2": (("proj_out",), (1,)), "modulation.lin": (("norm.linear",), (3,)),
}
BFL_TOP_LEVEL = {
    "img_in": (("x_embedder",), (1,)), "txt_in": (("context_embedder",), (1,)),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), (1,)),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), (1,)),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",), (1,)),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",), (1,)),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1",), (1,)),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2",), (1,)),
    "final_layer.linear": (("proj_out",), (1,)),
    # BFL's final adaLN gives (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift): the halves swap
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), (2,)),
}
BFL_SWAPPED_HALVES = ("final_layer.adaLN_modulation.1",)
BFL_BLOCKS = {"double_blocks": ("transformer_blocks", BFL_DOUBLE_BLOCK),
              "single_blocks": ("single_transformer_blocks", BFL_SINGLE_BLOCK)}
BFL = BflLayout(BFL_TOP_LEVEL, BFL_BLOCKS, BFL_SWAPPED_HALVES)
KOHYA_TRANSFORMER_PREFIX = "lora_unet_"  # kohya's lora_flux.py (LORA_PREFIX_FLUX), for ComfyUI's sake


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
        setattr(self.pipe, ("text_encoder", "text_encoder_2")[index], pipeline_text_encoder(text_encoder))

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt and the encoders' weights decides the output (part of text-cache keys)."""
        return {"max_sequence_length": self.max_sequence_length, "guidance": self.guidance}


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


def bfl_layer(layer: str) -> Any:
    """(the BFL layer holding a diffusers transformer layer: a FusedLayer, the layer's place in it), or None."""
    return BFL.of_layer(layer)


def bfl_layer_of_webui_name(webui_layer: str) -> Any:
    """The BFL layer (a FusedLayer) that a kohya transformer layer name without its prefix
    (`double_blocks_0_img_attn_qkv`) names, or None."""
    return BFL.of_path(webui_layer, "_")


def text_encoder_module_names(model_path: str | None) -> dict[str, list[str]]:
    """{text_encoder (CLIP-L), text_encoder_2 (T5): module names}, from `model_path`'s configs or else FLUX.1's (12
    CLIP layers, 24 T5 blocks, gated MLP), built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if model_path is not None:
        if not all((Path(model_path) / part / "config.json").is_file() for part in ("text_encoder", "text_encoder_2")):
            raise ModelError(f"--model '{model_path}' is not a FLUX model folder (no text_encoder/ and "
                             "text_encoder_2/ configs inside).")
        clip_config = CLIPTextConfig.from_pretrained(model_path, subfolder="text_encoder")
        t5_config = T5Config.from_pretrained(model_path, subfolder="text_encoder_2")
    else:
        clip_config = CLIPTextConfig(num_hidden_layers=12)
        t5_config = T5Config(num_layers=24, feed_forward_proj="gated-gelu")
    with init_empty_weights():
        models = {"text_encoder": CLIPTextModel(clip_config), "text_encoder_2": T5EncoderModel(t5_config)}
    return {part: [name for name, _ in model.named_modules() if name] for part, model in models.items()}


class Flux(Family):
    """FLUX.1-dev and FLUX.1-schnell (`FluxPipeline`)."""

    name: ClassVar[str] = "flux"
    description: ClassVar[str] = "FLUX.1 (dev / schnell)"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5 (sequence)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    # kohya's lora_flux.py: lora_unet (the transformer, BFL layout), lora_te1 (CLIP-L), lora_te3 (T5; ComfyUI reads it)
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": KOHYA_TRANSFORMER_PREFIX, "text_encoder": "lora_te1_",
                                                "text_encoder_2": "lora_te3_"}
    has_webui_layout: ClassVar[bool] = True
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_flux.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux", "flux-schnell")
    # diffusers' img2img / inpaint pipelines of the same components; its latents are a packed sequence, so the
    # highres fix upscales pixels only
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img", "img2img", "inpaint", "highres_fix")
    single_file_marker: ClassVar[str | None] = "double_blocks."  # Black Forest Labs' transformer layout

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # text-to-image FLUX only: Kontext (FluxKontextPipeline) has the same transformer config, so a pipeline class
        # decides; without one, Fill / Depth / Canny transformers take extra image channels (384 / 128 inputs)
        if "_class_name" in index:
            return index["_class_name"] == "FluxPipeline"
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

    def run_warnings(self, noise_scheduler: Any) -> list[str]:
        """FLUX.1-schnell (told by its scheduler: a static shift, where dev's shifts with the resolution) is
        step-distilled: a LoRA trained on it tends to break its 1-4 step sampling."""
        if noise_scheduler.config.get("use_dynamic_shifting", True):
            return []
        return ["this looks like FLUX.1-schnell (its scheduler does not shift with the resolution), a step-distilled "
                "model: a LoRA trained on it tends to break its 1-4 step sampling; train on FLUX.1-dev and render the "
                "LoRA on schnell, or train on a de-distilled schnell"]

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
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

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

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A kohya FLUX file: kohya's FLUX version metadata, or (no other architecture named) BFL layer names or a T5
        (`lora_te3_`) layer, with no transformer layer outside BFL's layout and no second CLIP (`lora_te2_`), which
        FLUX does not have (other families' kohya files share `lora_te3_` and `final_layer`); not FLUX.2's version."""
        bfl_starts = tuple(f"{KOHYA_TRANSFORMER_PREFIX}{name.replace('.', '_')}"
                           for name in (*BFL_BLOCKS, *BFL_TOP_LEVEL))
        version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        if "flux" in version:
            return not re.search(r"flux[-_. ]?2", version.lower())  # FLUX.2's files are its own family's
        if metadata.get("modelspec.architecture") or any(key.startswith("lora_te2_") for key in keys):
            return False
        transformer_keys = [key for key in keys if key.startswith(KOHYA_TRANSFORMER_PREFIX)]
        return (all(key.startswith(bfl_starts) for key in transformer_keys)
                and any(key.startswith((*bfl_starts, self.webui_prefixes["text_encoder_2"])) for key in keys))

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{part: {kohya layer: its native tensors}}: the transformer in BFL's layout, q / k / v (and a single block's
        MLP input) fused exactly into one LoRA each; the text encoders by their module paths."""
        from hcpdiff.lora.fused_layout import native_to_fused
        from hcpdiff.lora.state_io import layer_states
        from hcpdiff.lora.webui_format import webui_name_map

        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for part, state in states.items():
            prefix = self.webui_prefixes[part]
            if part == self.denoiser:
                out[part] = {prefix + name.replace(".", "_"): parts
                             for name, parts in native_to_fused(state, bfl_layer, part).items()}
            else:
                by_layer = layer_states(state)
                names = webui_name_map(by_layer, part, self.webui_prefixes)
                out[part] = {names[layer]: parts for layer, parts in by_layer.items()}
        return out

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native states by part of a kohya FLUX file: BFL layers split back into diffusers layers (a fused q / k / v
        LoRA into one per projection, exactly), text-encoder layers by the names of `model_path`'s encoders (else
        FLUX.1's)."""
        from hcpdiff.lora.fused_layout import fused_to_native
        from hcpdiff.lora.lycoris_format import native_tensors
        from hcpdiff.lora.webui_format import split_webui_key, webui_to_native

        denoiser_prefix = self.webui_prefixes[self.denoiser]
        transformer: dict[str, dict[str, torch.Tensor]] = {}
        text = {key: tensor for key, tensor in state.items() if not key.startswith(denoiser_prefix)}
        for key, tensor in state.items():
            if key.startswith(denoiser_prefix):
                webui_layer, suffix = split_webui_key(key)
                transformer.setdefault(webui_layer, {})[suffix] = tensor
        layers = {webui_layer: bfl_layer_of_webui_name(webui_layer.removeprefix(denoiser_prefix))
                  for webui_layer in transformer}
        if unknown := [webui_layer for webui_layer, layer in layers.items() if layer is None]:
            more = f" ({len(unknown)} such layers)" if len(unknown) > 1 else ""
            raise ModelError(f"webui LoRA layer '{unknown[0]}' is no layer of FLUX's original (BFL) layout{more}, "
                             "whose names look like lora_unet_double_blocks_0_img_attn_qkv, "
                             "lora_unet_single_blocks_0_linear1; nothing was written.")
        states: dict[str, dict[str, torch.Tensor]] = {}
        if transformer:
            by_bfl = {layers[w].name: native_tensors(w, parts) for w, parts in transformer.items()}
            states[self.denoiser] = fused_to_native(by_bfl, layers.values(), self.denoiser)
        if text:
            prefixes = {part: prefix for part, prefix in self.webui_prefixes.items() if part != self.denoiser}
            states.update(webui_to_native(text, text_encoder_module_names(model_path), prefixes))
        return states

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Layers a reader leaves out without an error: diffusers' kohya-FLUX reader (0.42) the T5 ones (a logged
        warning) and the transformer's top-level ones (img_in, txt_in, time_in, vector_in, guidance_in, final_layer:
        their converted keys lack the `transformer.` prefix, so they load into nothing); kohya's lora_flux builds no
        LoRA module for final_layer (its network covers the blocks and, given weights, the input layers)."""
        from hcpdiff.lora.state_io import layer_states

        blocks = tuple(f"{block}." for block, _ in BFL_BLOCKS.values())
        top_level = sorted(bfl_layer(layer)[0].name for layer in layer_states(states.get(self.denoiser, {}))
                           if not layer.startswith(blocks))
        final = [name for name in top_level if name.startswith("final_layer.")]
        diffusers_drops = [f"the top-level transformer layers ({', '.join(top_level)})"] if top_level else []
        if "text_encoder_2" in states:
            diffusers_drops.append("the T5 (text_encoder_2, lora_te3_) layers")
        notes = []
        if diffusers_drops:
            notes.append(f"diffusers' load_lora_weights leaves out {' and '.join(diffusers_drops)} of a kohya FLUX "
                         "file (ComfyUI loads them); give diffusers a --to_diffusers file.")
        if final:
            notes.append(f"kohya's lora_flux leaves out {', '.join(final)} (ComfyUI loads them).")
        return notes

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """The version metadata kohya's lora_flux writes: `ss_base_model_version` flux1, `modelspec.architecture`
        flux-1-dev / flux-1-schnell (from the base model folder's guidance embedding, else the hub id's name), else
        flux-1."""
        config = Path(base_model) / "transformer" / "config.json" if base_model else None
        name = Path(base_model).name.lower() if base_model else ""
        architecture = "flux-1-schnell" if "schnell" in name else "flux-1-dev" if "dev" in name else "flux-1"
        if config is not None and config.is_file():
            guidance = json.loads(config.read_text(encoding="utf-8")).get("guidance_embeds")
            architecture = "flux-1-dev" if guidance else "flux-1-schnell"
        return {"ss_base_model_version": "flux1", "ss_v2": "False", "architecture": architecture,
                "network_module": "networks.lora_flux"}
