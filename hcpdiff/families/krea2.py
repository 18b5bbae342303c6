"""Krea 2 (Raw, and the step-distilled Turbo): a single-stream MMDiT on 2x2-packed 16-channel latents of the Qwen-Image
VAE (per-channel mean / std), conditioned on twelve stacked hidden states (2, 5, ..., 35) of a Qwen3-VL text model
over the Qwen-Image chat template, padded to a fixed length with a key-padding mask; its own small text-fusion
transformer collapses the stack. Trained by flow matching with the resolution (exponential) shift.

Everything that training and inference must agree on comes from Krea2Pipeline itself: prompt encoding
(`encode_prompt`: the template padded in the middle, real-token positions, the tapped layers, the dropped system
prefix, every prompt at max_sequence_length with its mask), packing (`_pack_latents` / `_unpack_latents`), position
ids (`prepare_position_ids`) and the shift (its calculate_shift over the packed sequence, the flow-matching
objective's `resolution` shift: the same config keys and the same 2x2 packing). Its sampling loop calls the
transformer at timestep t / 1000 = sigma and steps along its output: the flow-matching target noise - x0.

Turbo is the same transformer with `is_distilled` in model_index.json (Krea2TurboAutoBlocks differ only in a fixed
mu of 1.15 and no guidance); the run warns about it. The family builds Krea2Pipeline with is_distilled False, so a
render takes the resolution mu (Turbo: render its model card's 8 steps at guidance_scale 1, and expect the schedule to
differ slightly from Krea's fixed 1.15). The pipeline's `text_encoder_select_layers` are its defaults (Krea 2's own
model_index.json sets none); a folder that sets others is warned about.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder, to_module

MAX_SEQUENCE_LENGTH = 512  # prompt tokens after the template's prefix: Krea2Pipeline.__call__'s default
# Krea2Pipeline's taps when model_index.json names none (hidden state i is layer i - 1's output; 0: the embeddings)
DEFAULT_TAPS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)

# ComfyUI runs Krea 2 in its original layout (comfy/ldm/krea2/model.py, the single file diffusers'
# convert_krea2_transformer_checkpoint_to_diffusers reads), whose Linear layers are diffusers' one for one, renamed;
# its LoRA loader reads a layer as `diffusion_model.<original module path>` (comfy/lora.py's generic key map, beside
# its Krea 2 aliases for diffusers' names), as does diffusers' own _convert_non_diffusers_krea2_lora_to_diffusers.
COMFY_PREFIX = "diffusion_model."
READ_PREFIXES = (COMFY_PREFIX, "base_model.model.", "transformer.")  # ComfyUI / Krea's trainer, ai-toolkit, diffusers
KOHYA_PREFIX = "lora_unet_"  # ComfyUI also reads `lora_unet_` + the original path with underscores
BLOCK_RENAMES = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
                 "attn.to_out.0": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up", "ff.down": "mlp.down"}
TOP_RENAMES = {"img_in": "first", "time_embed.linear_1": "tmlp.0", "time_embed.linear_2": "tmlp.2",
               "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1", "txt_in.linear_2": "txtmlp.3",
               "text_fusion.projector": "txtfusion.projector", "final_layer.linear": "last.linear"}
DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|text_fusion\.(?:layerwise_blocks|refiner_blocks))\.(\d+)\.(.+)")
ORIGINAL_BLOCK = re.compile(r"(blocks|txtfusion\.(?:layerwise_blocks|refiner_blocks))\.(\d+)\.(.+)")
# names only Krea 2's original layout has: a webui file with them is Krea 2's
ORIGINAL_ONLY = re.compile(r"(diffusion_model\.|base_model\.model\.)?(blocks\.\d+\.(attn\.(wq|wk|wv|wo|gate)|"
                           r"mlp\.(gate|up|down))|txtfusion\.|txtmlp\.|tproj\.|tmlp\.)"
                           r"|lora_unet_(blocks_\d+_(attn_(wq|wk|wv|wo|gate)|mlp_(gate|up|down))|txtfusion_|txtmlp_)")


def text_pipeline(components: dict[str, Any]) -> Any:
    """A Krea2Pipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import Krea2Pipeline

    return Krea2Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                         tokenizer=components["tokenizer"])


def layout_pipeline(patch: int) -> Any:
    """An empty Krea2Pipeline (no parts; its VAE factor is then 8), for its packing and position helpers."""
    from diffusers import Krea2Pipeline

    return Krea2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None,
                         patch_size=patch)


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [B, L, 12, D], mask [B, L] bool) by the pipeline's encode_prompt, L = max_sequence_length."""
    return pipe.encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)


class Krea2Conditioner:
    """prompts -> {"encoder_hidden_states" [B, L, 12, D], "encoder_attention_mask" [B, L]}: every prompt at the fixed
    length L with its mask, as the pipeline hands them to the transformer."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text keyword arguments for one batch, encoded as Krea2Pipeline encodes them."""
        states, mask = encode_prompts(self.pipe, prompts, self.max_sequence_length, device)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt decides the states (part of the text cache's key)."""
        return {"max_sequence_length": self.max_sequence_length}


def patch_size(read_config: ConfigReader) -> int:
    """The pipeline's latent patch side: the transformer's input channels are the VAE's times patch^2 (2 for Krea 2)."""
    return math.isqrt(int(read_config("transformer")["in_channels"]) // int(read_config("vae")["z_dim"]))


def encode_weighted(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, mask) as `encode_prompts` gives them for the prompts without their markup, with `(word:1.2)` weights
    on each prompt's own tokens' states (all twelve layers; each prompt's tokens rescaled to their unweighted mean).
    The weights follow the tokens as the pipeline tokenises the template around the plain text (a token takes the
    weight of its last character); padding and the assistant suffix keep weight 1."""
    from hcpdiff.infer.prompt_weights import apply_weights, parse_prompt_weights

    spans = [parse_prompt_weights(prompt) for prompt in prompts]
    plain = ["".join(text for text, _ in prompt_spans) for prompt_spans in spans]
    states, mask = encode_prompts(pipe, plain, max_sequence_length, device)
    if all(weight == 1.0 for prompt_spans in spans for _, weight in prompt_spans):
        return states, mask
    prefix, drop = pipe.prompt_template_encode_prefix, pipe.prompt_template_encode_start_idx
    suffix_tokens = pipe.prompt_template_encode_num_suffix_tokens
    texts = [prefix + text for text in plain]  # Krea2Pipeline.get_text_hidden_states' tokenisation, with offsets
    tokens = pipe.tokenizer(texts, truncation=True, padding="max_length", return_offsets_mapping=True,
                            max_length=max_sequence_length + drop - suffix_tokens)
    weighted = states.clone()
    for i, (prompt_spans, text, offsets) in enumerate(zip(spans, texts, tokens["offset_mapping"])):
        char_weights = [1.0] * len(prefix) + [w for span, w in prompt_spans for _ in span]
        char_weights += [1.0] * (len(text) - len(char_weights))
        token_weights = [char_weights[end - 1] if end > start else 1.0 for start, end in offsets][drop:]
        weights = torch.tensor(token_weights + [1.0] * suffix_tokens)
        own = mask[i].cpu()
        rows = states[i][mask[i]]  # [tokens, 12, D]
        scaled = apply_weights(rows.flatten(1)[None], weights[own][None])[0]
        weighted[i][mask[i]] = scaled.view(rows.shape)
    return weighted, mask


class Krea2(Family):
    """Krea 2 and Krea 2 Turbo text to image (`Krea2Pipeline`)."""

    name: ClassVar[str] = "krea2"
    description: ClassVar[str] = "Krea 2"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3-VL
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": COMFY_PREFIX}
    has_webui_layout: ClassVar[bool] = True
    train_config: ClassVar[str] = "cfgs/train/examples/lora_krea2.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_krea2.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("krea2", "krea2-turbo")

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # by its own pipeline or transformer class: no other family's folder has either
        if "_class_name" in index:
            return index["_class_name"] == "Krea2Pipeline"
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "Krea2Transformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_krea2 import make_tiny_krea2

        return make_tiny_krea2(out_dir, seed=seed, turbo=variant == "krea2-turbo")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3VLModel

        return {
            "transformer": lambda: Krea2Transformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen3VLModel.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """Qwen3-VL's vision tower (prompts are text) and its layers from the last tap on (hidden state 35 is layer
        34's output: Qwen3-VL-4B's last layer is unused): their outputs never reach the transformer."""
        if part not in self.text_encoders:
            return frozenset()
        unused_from = max(DEFAULT_TAPS)
        return frozenset(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and (
            name.startswith("visual.") or any(name.startswith(f"language_model.layers.{i}.")
                                              for i in range(unused_from, len(model.language_model.layers)))))

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler (dynamic exponential shift: the objective applies the
        pipeline's mu)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is refused: Krea 2 is bf16-native (its docs render in bf16) and its single-stream activations overflow
        fp16 as FLUX's and Qwen-Image's do."""
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 overflows Krea 2's transformer (NaN losses); use bf16 "
                              "(or null for fp32)")

    def pipeline_warnings(self, pipeline_settings: dict[str, Any]) -> list[str]:
        """Krea 2 Turbo (`is_distilled` in model_index.json, the only setting that tells it from the base): LoRAs
        trained on it tend to lose the 8-step sampling. Text-encoder taps other than the pipeline's defaults: hcpdiff
        encodes with the defaults."""
        warnings = []
        if pipeline_settings.get("is_distilled"):
            warnings.append("this looks like Krea 2 Turbo (is_distilled in its model_index.json), a step-distilled "
                            "model: a LoRA trained on it tends to lose the 8-step sampling; train on the base Krea 2 "
                            "(krea/Krea-2-Raw) and render the LoRA on Turbo")
        taps = pipeline_settings.get("text_encoder_select_layers")
        if taps is not None and tuple(taps) != DEFAULT_TAPS:
            warnings.append(f"model_index.json's text_encoder_select_layers {list(taps)} are not Krea 2's "
                            f"{list(DEFAULT_TAPS)}: hcpdiff encodes prompts with Krea 2's")
        return warnings

    # ---------------------------------------------------------------------------------------- latents
    def vae_scale_factor(self, read_config: ConfigReader) -> int:
        """2 per downsampling stage of the Qwen-Image VAE (`temperal_downsample` has one entry per stage): 8."""
        return 2 ** len(read_config("vae")["temperal_downsample"])

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the 2x2 patches: 16 for Krea 2 (the pipeline rounds other sizes up)."""
        return self.vae_scale_factor(read_config) * patch_size(read_config)

    def latent_scale_shift(self, vae: Any) -> tuple[float, float]:
        raise NotImplementedError("Krea 2 normalises latents per channel (encode_latent_dist)")

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> the posterior's (mean, std) [B, 16, H/8, W/8], each channel normalised by the VAE
        config's latents_mean / latents_std as Krea2Pipeline denormalises before decoding."""
        from hcpdiff.families.qwen_image import latents_mean_std

        frames = to_module(vae, pixel_values).unsqueeze(2)  # one frame: [B, 3, 1, H, W]
        dist = vae.encode(frames).latent_dist
        mean, std = latents_mean_std(vae, dist.mean)
        return ((dist.mean - mean) / std).squeeze(2).float(), (dist.std / std).squeeze(2).float()

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """Prompt tokens after the template's prefix, padded / cut to `max_sequence_length` (null: the pipeline's
        512); tokenizer_repeats, clip_skip and guidance do not apply."""
        return Krea2Conditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        """Flow matching; the resolution shift is FLUX's calculate_shift over 2x2-packed tokens with the scheduler
        config's bounds (256 / 6400 tokens, 0.5 / 1.15), as Krea2Pipeline computes mu."""
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The velocity noise - x0 at sigma = `timesteps`, by the transformer called as Krea2Pipeline's loop calls it
        (packed tokens, its position ids, timestep t / 1000 = sigma, the text mask), unpacked to [B, 16, h, w]."""
        batch, channels, height, width = noisy_latents.shape
        patch = math.isqrt(denoiser.config.in_channels // channels)
        pipe = layout_pipeline(patch)
        tokens = pipe._pack_latents(noisy_latents, batch, channels, height, width)
        text = conditioning["encoder_hidden_states"]
        position_ids = pipe.prepare_position_ids(text.shape[1], height // patch, width // patch, tokens.device)
        prediction = denoiser(hidden_states=tokens, encoder_hidden_states=text, timestep=timesteps.to(tokens.dtype),
                              position_ids=position_ids, encoder_attention_mask=conditioning["encoder_attention_mask"],
                              return_dict=False)[0]
        factor = pipe.vae_scale_factor  # the helper takes pixel sizes
        return pipe._unpack_latents(prediction, height * factor, width * factor).squeeze(2)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        """Krea2Pipeline with is_distilled False: the resolution mu (Turbo's fixed 1.15 is not applied) and
        guidance_scale deciding classifier-free guidance."""
        from diffusers import Krea2Pipeline

        from hcpdiff.families.base import components_config_reader

        return Krea2Pipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                             text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                             patch_size=patch_size(components_config_reader(components)))

    def configure_pipeline(self, pipe: Any, pipeline_settings: dict[str, Any]) -> None:
        """Krea 2 Turbo (is_distilled in model_index.json) renders with its fixed schedule shift mu = 1.15, as
        Krea2Pipeline does for it; guidance stays hcpdiff's guidance_scale (Turbo: 1.0, off)."""
        pipe.register_to_config(is_distilled=bool(pipeline_settings.get("is_distilled", False)))

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states and masks, with `(word:1.2)` weights (an unweighted prompt: the
        pipeline's encode_prompt exactly)."""
        device = pipe.text_encoder.device
        with torch.no_grad():
            states, mask = encode_weighted(pipe, prompts, MAX_SEQUENCE_LENGTH, device)
            neg_states, neg_mask = encode_weighted(pipe, neg_prompts, MAX_SEQUENCE_LENGTH, device)
        return {"prompt_embeds": states, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg_states,
                "negative_prompt_embeds_mask": neg_mask, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """hcpdiff's `guidance_scale` is the usual classifier-free guidance scale (neg + s (pos - neg); 1 = off);
        Krea2Pipeline's own is pos + s (pos - neg), on when above 0, so it gets s - 1 (its docs' 4.5 is 5.5 here;
        Turbo's 0 is 1)."""
        args = dict(call_args)
        if "guidance_scale" in args:
            args["guidance_scale"] = args["guidance_scale"] - 1.0
        return args

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI Krea 2 file: names only its original layout has (`blocks.N.attn.wq`, `txtfusion`, ...), or
        Krea 2 version metadata."""
        version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return "krea2" in version or "krea-2" in version or any(ORIGINAL_ONLY.match(key) for key in keys)

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{transformer: {`diffusion_model.<original layer>`: its native tensors}}: every Linear is one original
        Linear renamed, so every layer and adapter type converts exactly; a text-encoder LoRA is one error."""
        from hcpdiff.lora.state_io import layer_states

        if other := [part for part in states if part != self.denoiser]:
            raise ModelError(f"--to_webui: a Krea 2 {other[0]} LoRA has no ComfyUI layout in hcpdiff; convert the "
                             "transformer LoRA alone, and render the text-encoder LoRA with hcpdiff's visualizer")
        return {self.denoiser: {COMFY_PREFIX + original_name(layer): parts
                                for layer, parts in layer_states(states[self.denoiser]).items()}}

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a Krea 2 file in ComfyUI's names (`diffusion_model.` + the original layout's,
        also bare, ai-toolkit's `base_model.model.`, kohya's `lora_unet_` + the original path with underscores, or
        diffusers' names under any of those or `transformer.`)."""
        from hcpdiff.lora.lycoris_format import native_tensors
        from hcpdiff.lora.webui_format import split_webui_key

        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            webui_layer, suffix = split_webui_key(key)
            by_layer.setdefault(webui_layer, {})[suffix] = tensor
        native: dict[str, torch.Tensor] = {}
        for webui_layer, parts in by_layer.items():
            name = next((webui_layer.removeprefix(p) for p in READ_PREFIXES if webui_layer.startswith(p)), webui_layer)
            if name.startswith(KOHYA_PREFIX):
                name = kohya_original_name(name.removeprefix(KOHYA_PREFIX))
            layer = diffusers_name(name)
            native.update({layer + suffix: tensor for suffix, tensor in native_tensors(layer, parts).items()})
        return {self.denoiser: native}

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Krea 2."""
        return {"ss_base_model_version": "krea2", "ss_v2": "False", "architecture": "krea-2",
                "network_module": "networks.lora"}


def original_name(layer: str) -> str:
    """The original layout's name of diffusers transformer layer `layer` (`transformer_blocks.0.attn.to_q` ->
    `blocks.0.attn.wq`); one ModelError for a layer it has no Linear for."""
    if layer in TOP_RENAMES:
        return TOP_RENAMES[layer]
    if (match := DIFFUSERS_BLOCK.fullmatch(layer)) and match[3] in BLOCK_RENAMES:
        block = "blocks" if match[1] == "transformer_blocks" else match[1].replace("text_fusion.", "txtfusion.")
        return f"{block}.{match[2]}.{BLOCK_RENAMES[match[3]]}"
    raise ModelError(f"transformer layer '{layer}' has no counterpart in Krea 2's original layout; nothing was "
                     "written.")


def diffusers_name(name: str) -> str:
    """The diffusers transformer layer of a webui layer name, original (`blocks.0.attn.wq`) or diffusers' own; one
    ModelError naming it when it is neither."""
    if name in TOP_RENAMES or ((match := DIFFUSERS_BLOCK.fullmatch(name)) and match[3] in BLOCK_RENAMES):
        return name
    top = {original: layer for layer, original in TOP_RENAMES.items()}
    if name in top:
        return top[name]
    block_renames = {original: layer for layer, original in BLOCK_RENAMES.items()}
    if (match := ORIGINAL_BLOCK.fullmatch(name)) and match[3] in block_renames:
        block = "transformer_blocks" if match[1] == "blocks" else match[1].replace("txtfusion.", "text_fusion.")
        return f"{block}.{match[2]}.{block_renames[match[3]]}"
    raise ModelError(f"webui LoRA layer '{name}' names no layer of the Krea 2 transformer (diffusion_model."
                     "blocks.0.attn.wq, ...); nothing was written.")


def kohya_original_name(name: str) -> str:
    """The original module path of a kohya layer name (`blocks_0_attn_wq` -> `blocks.0.attn.wq`): underscores are
    dots except inside `layerwise_blocks` / `refiner_blocks`."""
    dotted = name.replace("_", ".")
    for kept in ("layerwise_blocks", "refiner_blocks"):
        dotted = dotted.replace(kept.replace("_", "."), kept)
    return dotted
