"""Qwen-Image: an MMDiT transformer on 2x2-packed 16-channel latents of a video-style VAE (5-D latents, per-channel
mean / std), conditioned on Qwen2.5-VL's last hidden states of a chat-templated prompt (variable length, with an
attention mask), trained by flow matching with a resolution-dependent (exponential) shift.

Everything that training and inference must agree on comes from QwenImagePipeline itself: prompt encoding
(`encode_prompt`: the template, the dropped system prefix, the padded states and their mask), packing
(`_pack_latents` / `_unpack_latents`) and the shift (its `calculate_shift` over the packed sequence length, which is
the flow-matching objective's `resolution` shift). The trainer keeps latents 4-D [B, C, H, W]; the VAE's frame axis
is added and removed here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder, to_module

PACKING = 2  # 2x2 latent cells form one transformer token
MAX_SEQUENCE_LENGTH = 512  # prompt tokens after the template's prefix: QwenImagePipeline.__call__'s default
# ComfyUI's Qwen-Image model keys are `diffusion_model.` + diffusers' module paths; its LoRA loader reads a layer under
# that name (comfy/lora.py model_lora_keys_unet: the generic `diffusion_model.<module>` entry), and also bare and
# `transformer.`-prefixed paths (its QwenImage entries). --to_webui writes the first; --from_webui reads all three and
# kohya-style `lora_unet_<module path with underscores>` names (musubi-tuner's).
COMFY_PREFIX = "diffusion_model."
READ_PREFIXES = (COMFY_PREFIX, "transformer.")
KOHYA_PREFIX = "lora_unet_"
# the last block's text stream after its attention: its text output is discarded (only image tokens reach the output)
LAST_BLOCK_UNUSED = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_ONLY_LAYER = re.compile(  # layers no other family has: the streams' own modulation and MLPs
    r"(lora_unet_transformer_blocks_\d+_|(diffusion_model\.|transformer\.)?transformer_blocks\.\d+\.)"
    r"(img|txt)_(mod|mlp)")


def text_pipeline(components: dict[str, Any]) -> Any:
    """A QwenImagePipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                             tokenizer=components["tokenizer"])


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, L, D], mask [B, L] long: 1 for a prompt token, 0 for padding), by the pipeline's
    encode_prompt; L is the batch's longest prompt (the pipeline gives no mask when nothing is padded)."""
    embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds, mask


class QwenImageConditioner:
    """prompts -> {"encoder_hidden_states" [B, L, D], "encoder_hidden_states_mask" [B, L]}."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them
    # a batch's states are padded to its longest prompt: the text cache keeps each prompt's own tokens and pads again
    padded_sequences: ClassVar[dict[str, str]] = {"encoder_hidden_states": "encoder_hidden_states_mask"}

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text keyword arguments for one batch, encoded as QwenImagePipeline encodes them."""
        embeds, mask = encode_prompts(self.pipe, prompts, self.max_sequence_length, device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, H, W] -> tokens [B, H/2 * W/2, 4C], by QwenImagePipeline's helper."""
    from diffusers import QwenImagePipeline

    batch, channels, height, width = latents.shape
    return QwenImagePipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens [B, H/2 * W/2, 4C] -> latents [B, C, H, W] (H, W in latent cells), by QwenImagePipeline's helper, which
    gives the VAE's 5-D layout [B, C, 1, H, W]."""
    from diffusers import QwenImagePipeline

    # the helper takes pixel sizes and the VAE factor; in latent cells the factor is 1
    return QwenImagePipeline._unpack_latents(tokens, height, width, 1).squeeze(2)


def call_transformer(denoiser: torch.nn.Module, tokens: torch.Tensor, timesteps: torch.Tensor,
                     conditioning: dict[str, Any], img_shapes: list[list[tuple[int, int, int]]]) -> torch.Tensor:
    """The transformer's prediction for packed tokens (one shape per image on the sequence, as the pipelines'
    img_shapes), at sigma = t / 1000 as QwenImagePipeline passes it, with the prompt states and their mask."""
    return denoiser(hidden_states=tokens, timestep=timesteps.to(tokens.dtype),
                    encoder_hidden_states=conditioning["encoder_hidden_states"],
                    encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"], img_shapes=img_shapes,
                    return_dict=False)[0]


def latents_mean_std(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents mean and std, shaped [1, C, 1, 1, 1] like the VAE's 5-D latents."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def plain_prompts(prompts: list[str]) -> list[str]:
    """Prompts without `(word:1.2)` weight syntax."""
    from hcpdiff.infer.prompt_weights import parse_prompt_weights

    return ["".join(text for text, _ in parse_prompt_weights(prompt)) for prompt in prompts]


def encode_weighted(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, mask) as `encode_prompts` gives them, with `(word:1.2)` weights on the prompt tokens' states
    (each prompt's states rescaled to their unweighted mean). Unweighted prompts go through the pipeline's
    encode_prompt itself; weighted ones are tokenised as the pipeline tokenises the plain text in its template (a
    token takes the weight of its last character) and encoded as `_get_qwen_prompt_embeds` encodes them."""
    from hcpdiff.infer.prompt_weights import apply_weights, parse_prompt_weights

    spans = [parse_prompt_weights(prompt) for prompt in prompts]
    if all(weight == 1.0 for prompt_spans in spans for _, weight in prompt_spans):
        return encode_prompts(pipe, plain_prompts(prompts), max_sequence_length, device)
    drop = pipe.prompt_template_encode_start_idx
    prefix_chars = len(pipe.prompt_template_encode.split("{}")[0])
    texts = [pipe.prompt_template_encode.format("".join(text for text, _ in prompt_spans)) for prompt_spans in spans]
    tokens = pipe.tokenizer(texts, max_length=pipe.tokenizer_max_length + drop, padding=True, truncation=True,
                            return_offsets_mapping=True, return_tensors="pt")
    weight_rows = []
    for prompt_spans, text, offsets in zip(spans, texts, tokens.offset_mapping.tolist()):
        char_weights = [1.0] * prefix_chars + [w for span, w in prompt_spans for _ in span]
        char_weights += [1.0] * (len(text) - len(char_weights))
        weight_rows.append([char_weights[end - 1] if end > start else 1.0 for start, end in offsets])
    mask = tokens.attention_mask.to(device)
    hidden = pipe.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                               output_hidden_states=True).hidden_states[-1]
    lengths = mask.sum(dim=1).tolist()
    states = [apply_weights(hidden[i : i + 1, drop:length], torch.tensor([weight_rows[i][drop:length]]))[0]
              for i, length in enumerate(lengths)]
    longest = max(state.shape[0] for state in states)
    embeds = torch.stack([torch.cat([state, state.new_zeros(longest - state.shape[0], state.shape[1])])
                          for state in states])
    prompt_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None] - drop).long()
    return (embeds[:, :max_sequence_length].to(pipe.text_encoder.dtype),
            prompt_mask[:, :max_sequence_length].to(device))


class QwenImage(Family):
    """Qwen-Image text to image (`QwenImagePipeline`)."""

    name: ClassVar[str] = "qwen_image"
    description: ClassVar[str] = "Qwen-Image"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen2.5-VL
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": COMFY_PREFIX}
    has_webui_layout: ClassVar[bool] = True
    train_config: ClassVar[str] = "cfgs/train/examples/lora_qwen_image.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_qwen_image.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("qwen_image",)
    # diffusers' img2img / inpaint pipelines of the same components; its latents are a packed sequence, so the
    # highres fix upscales pixels only
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img", "img2img", "inpaint", "highres_fix")

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # text to image only: Qwen-Image-Edit (QwenImageEditPipeline) has the same transformer class
        if "_class_name" in index:
            return index["_class_name"] == "QwenImagePipeline"
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "QwenImageTransformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_qwen_image import make_tiny_qwen_image

        return make_tiny_qwen_image(out_dir, seed=seed)

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        return {
            "transformer": lambda: QwenImageTransformer2DModel.from_pretrained(source, subfolder="transformer",
                                                                               **common),
            "vae": lambda: AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(
                source, subfolder="text_encoder", **common),
            "tokenizer": lambda: Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """The last transformer block's text queries, text attention output and text MLP: the block's text output is
        discarded, so the reference system's layer list (every block) trains without dead adapters."""
        if part != self.denoiser:
            return frozenset()
        last = len(model.transformer_blocks) - 1
        return frozenset(f"transformer_blocks.{last}.{name}" for name in LAST_BLOCK_UNUSED)

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler: its config holds the shift the objective applies."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is refused: Qwen-Image is bf16-native and its transformer's activations overflow fp16 (NaN losses,
        black images)."""
        if mixed_precision == "fp16":
            raise ConfigError(f"mixed_precision: fp16 overflows {self.description}'s transformer (NaN losses); "
                              "use bf16 (or null for fp32)")

    # ---------------------------------------------------------------------------------------- latents
    def vae_scale_factor(self, read_config: ConfigReader) -> int:
        """2 per downsampling stage of the VAE (`temperal_downsample` has one entry per stage): 8 for Qwen-Image."""
        return 2 ** len(read_config("vae")["temperal_downsample"])

    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x 2 (2x2 packing): 16 for Qwen-Image."""
        return self.vae_scale_factor(read_config) * PACKING

    def latent_scale_shift(self, vae: Any) -> tuple[float, float]:
        raise NotImplementedError("Qwen-Image normalises latents per channel (encode_latent_dist)")

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> the posterior's (mean, std) [B, C, H/8, W/8], each channel normalised by the VAE
        config's latents_mean / latents_std as QwenImagePipeline denormalises before decoding."""
        frames = to_module(vae, pixel_values).unsqueeze(2)  # one frame: [B, 3, 1, H, W]
        dist = vae.encode(frames).latent_dist
        mean, std = latents_mean_std(vae, dist.mean)
        return ((dist.mean - mean) / std).squeeze(2).float(), (dist.std / std).squeeze(2).float()

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """Prompt tokens after the template's prefix are cut at `max_sequence_length` (null: the pipeline's 512);
        tokenizer_repeats and clip_skip do not apply."""
        return QwenImageConditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """Pack, call the transformer at sigma (QwenImagePipeline passes t / 1000) with the text mask, unpack."""
        height, width = noisy_latents.shape[-2:]
        tokens = pack_latents(noisy_latents)
        img_shapes = [[(1, height // PACKING, width // PACKING)]] * noisy_latents.shape[0]
        return unpack_latents(call_transformer(denoiser, tokens, timesteps, conditioning, img_shapes), height, width)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                                 text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states and masks, with `(word:1.2)` weights (an unweighted prompt: the
        pipeline's encode_prompt exactly). The negative prompt is always given, so `true_cfg_scale` > 1 turns on
        classifier-free guidance (an empty negative prompt too, as the pipeline's docs say)."""
        device = pipe.text_encoder.device
        with torch.no_grad():
            embeds, mask = encode_weighted(pipe, prompts, MAX_SEQUENCE_LENGTH, device)
            neg_embeds, neg_mask = encode_weighted(pipe, neg_prompts, MAX_SEQUENCE_LENGTH, device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg_embeds,
                "negative_prompt_embeds_mask": neg_mask, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """`guidance_scale` is QwenImagePipeline's `true_cfg_scale` (classifier-free guidance with the negative
        prompt); its own `guidance_scale` is for guidance-distilled models, which Qwen-Image is not."""
        args = dict(call_args)
        if "guidance_scale" in args:
            args["true_cfg_scale"] = args.pop("guidance_scale")
        return args

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI / kohya Qwen-Image file: `diffusion_model.transformer_blocks.` keys, a layer only Qwen-Image has
        (img_mod, txt_mlp, ...), or Qwen-Image version metadata."""
        version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return ("qwen" in version.lower() or any(key.startswith(COMFY_PREFIX + "transformer_blocks.") for key in keys)
                or any(QWEN_ONLY_LAYER.match(key) for key in keys))

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{transformer: {`diffusion_model.<layer>`: its native tensors}}: ComfyUI's names are diffusers' module paths,
        so every layer converts exactly; a text-encoder LoRA is one error (no ComfyUI layout here)."""
        from hcpdiff.lora.state_io import layer_states

        if other := [part for part in states if part != self.denoiser]:
            raise ModelError(f"--to_webui: a Qwen-Image {other[0]} LoRA has no ComfyUI layout in hcpdiff; convert the "
                             "transformer LoRA alone, and render the text-encoder LoRA with hcpdiff's visualizer")
        return {self.denoiser: {COMFY_PREFIX + layer: parts
                                for layer, parts in layer_states(states[self.denoiser]).items()}}

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a ComfyUI (`diffusion_model.` / `transformer.` / bare module paths) or kohya
        (`lora_unet_` + the path with underscores, decoded by `model_path`'s transformer, else Qwen-Image's) file."""
        from hcpdiff.lora.lycoris_format import native_tensors
        from hcpdiff.lora.webui_format import split_webui_key

        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            webui_layer, suffix = split_webui_key(key)
            by_layer.setdefault(webui_layer, {})[suffix] = tensor
        kohya_names = transformer_kohya_names(model_path) if any(
            layer.startswith(KOHYA_PREFIX) for layer in by_layer) else {}
        native: dict[str, torch.Tensor] = {}
        for webui_layer, parts in by_layer.items():
            if webui_layer.startswith(KOHYA_PREFIX):
                layer = kohya_names.get(webui_layer.removeprefix(KOHYA_PREFIX))
                if layer is None:
                    raise ModelError(f"webui LoRA layer '{webui_layer}' names no layer of the Qwen-Image transformer "
                                     "(lora_unet_transformer_blocks_0_attn_to_q, ...); nothing was written.")
            else:
                layer = next((webui_layer.removeprefix(p) for p in READ_PREFIXES if webui_layer.startswith(p)),
                             webui_layer)
            native.update({layer + suffix: tensor for suffix, tensor in native_tensors(layer, parts).items()})
        return {self.denoiser: native}

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Qwen-Image (musubi-tuner's network module for it)."""
        return {"ss_base_model_version": "qwen_image", "ss_v2": "False", "architecture": "qwen-image",
                "network_module": "networks.lora_qwen_image"}


def transformer_kohya_names(model_path: str | None) -> dict[str, str]:
    """{module path with underscores: module path} of every Linear of the Qwen-Image transformer, from `model_path`'s
    transformer config or else Qwen-Image's own (the class defaults), built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    config: dict[str, Any] = {}
    if model_path is not None:
        path = Path(model_path) / "transformer" / "config.json"
        if not path.is_file():
            raise ModelError(f"--model '{model_path}' is not a Qwen-Image model folder (no transformer/config.json).")
        config = {key: value for key, value in json.loads(path.read_text(encoding="utf-8")).items()
                  if not key.startswith("_")}
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    return {name.replace(".", "_"): name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}
