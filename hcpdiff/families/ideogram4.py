"""Ideogram 4: a single-stream DiT over one packed sequence ([left-padded text][image tokens]) with multi-axis RoPE,
on the FLUX.2 VAE's 32-channel latents in 2x2 patches (128 channels per token) normalised by the VAE's batch-norm
statistics, conditioned on 13 hidden states (decoder layers 0, 3, ..., 33, 35) of a head-less Qwen3-VL encoder over a
chat-templated prompt, side by side, and trained by flow matching. Classifier-free guidance is asymmetric: a second,
`unconditional_transformer` denoises the image tokens alone with zeroed text, and the two velocities are blended.

Everything that training and inference must agree on comes from Ideogram4Pipeline itself: prompt encoding
(`encode_prompt`: the chat template, left padding, the tapped layers concatenated, padding zeroed), the packed layout
(`_prepare_ids`: position ids, segment ids, token roles), the transformer call as its sampling loop makes it (text
rows of zero latents, model time t = 1 - sigma, the output read at the image tokens; it predicts x0 - noise, the
scheduler steps along its negation, the flow-matching target noise - x0) and the resolution-aware mean of its
logit-normal schedule (`_resolution_aware_mu`). Latents are the exact inverse of its decoding (batch-norm statistics
on the packed channels, each token's channels (patch row, patch column, VAE channel)); the pipeline has no encoding
of its own (no image input).

Only the conditional `transformer` trains; the unconditional one (no text: nothing a caption could teach it) is
loaded as it is for previews and renders, and Ideogram4Pipeline.load_lora_weights loads a LoRA into `transformer`
alone as well. The optional `prompt_enhancer_head` (an LM head that turns the encoder into a caption rewriter for
`prompt_upsampling`) is not needed: it never touches the conditioning path, so training neither loads nor trains it;
write captions as the prompts you will render with (e.g. Ideogram's JSON captions).

A prompt's features do not depend on how far it is padded (left padding, masked, text positions counted from the
prompt's first token) and padding sits in its own attention segment, so a batch pads its captions only to its
longest (not the pipeline's 2048), and trains as its samples one by one.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pad_sequences, to_module

logger = logging.getLogger(__name__)

PATCH = 2  # the pipeline patchifies 2x2 VAE cells into one 128-channel token
MAX_SEQUENCE_LENGTH = 2048  # chat-templated prompt tokens at most: Ideogram4Pipeline.__call__'s default
BASE_PIXELS = 512 * 512  # _resolution_aware_mu's base resolution

# ComfyUI runs Ideogram 4's conditional transformer in its original layout (comfy/ldm/ideogram4/model.py, read at
# ComfyUI commit ca686606): q, k, v fused into one `attention.qkv` (rows q, k, v: it views its output as (3, heads,
# head_dim)), `attention.o` for diffusers' `to_out.0`, every other Linear under diffusers' module path. Its LoRA loader
# reads a layer as `diffusion_model.<original module path>` (comfy/lora.py's generic key map), as diffusers'
# _convert_non_diffusers_ideogram4_lora_to_diffusers reads ai-toolkit's files (its blocks' layers only).
COMFY_PREFIX = "diffusion_model."
QKV = ("to_q", "to_k", "to_v")
ORIGINAL_LINEAR = re.compile(r"input_proj|llm_cond_proj|t_embedding\.mlp_(in|out)|adaln_proj|"
                             r"final_layer\.(linear|adaln_modulation)|"
                             r"layers\.\d+\.(attention\.(qkv|o)|feed_forward\.w[123]|adaln_modulation)")
# names no other family's original layout has (Z-Image's is alike, with `attention.out` and `adaLN_modulation.0`)
IDEOGRAM_ONLY = re.compile(r"(diffusion_model\.)?(layers\.\d+\.(attention\.o|adaln_modulation)|input_proj|"
                           r"llm_cond_proj|t_embedding\.mlp_(in|out)|adaln_proj|final_layer\.adaln_modulation)\.")


def text_pipeline(components: dict[str, Any]) -> Any:
    """An Ideogram4Pipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import Ideogram4Pipeline

    return Ideogram4Pipeline(scheduler=None, vae=None, text_encoder=components["text_encoder"],
                             tokenizer=components["tokenizer"], transformer=None, unconditional_transformer=None)


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """A prompt's chat-templated token count, tokenised as Ideogram4Pipeline.encode_prompt tokenises it."""
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device
                   ) -> list[torch.Tensor]:
    """Each prompt's features [L_i, 13 D] by the pipeline's encode_prompt, run at the longest prompt's length (its
    left padding cut off: a prompt's features are the same at any padding)."""
    lengths = [prompt_length(pipe.tokenizer, prompt) for prompt in prompts]
    if max(lengths) > max_sequence_length:
        raise ConfigError(f"model.max_sequence_length: a caption has {max(lengths)} chat-templated tokens, more than "
                          f"{max_sequence_length}; shorten it or raise the limit")
    features, _, _, _ = pipe.encode_prompt(list(prompts), grid_h=0, grid_w=0, max_sequence_length=max(lengths),
                                           device=device)
    return [row[row.shape[0] - length:] for row, length in zip(features, lengths)]


class Ideogram4Conditioner:
    """prompts -> {"llm_features" [B, L, 13 D], "llm_mask" [B, L]}: each prompt's features, right-padded to the
    batch's longest (`denoise` lays them out as the pipeline does)."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them
    padded_sequences: ClassVar[dict[str, str]] = {"llm_features": "llm_mask"}

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text input for one batch, encoded as Ideogram4Pipeline encodes it."""
        features, mask = pad_sequences(encode_prompts(self.pipe, prompts, self.max_sequence_length, device))
        return {"llm_features": features, "llm_mask": mask}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use the trained text encoder for the forward pass. A DDP-wrapped one is refused: encode_prompt runs the
        encoder's embedding and decoder layers directly, never the wrapper's forward, so its gradients would not be
        synchronised across processes."""
        from accelerate.utils import extract_model_from_parallel

        if extract_model_from_parallel(text_encoder) is not text_encoder:
            raise ConfigError("lora_text_encoder: Ideogram4Pipeline.encode_prompt runs the text encoder's layers "
                              "directly, past the multi-process wrapper that synchronises its gradients; train the "
                              "Qwen3-VL LoRA in one process, or only the transformer in several")
        self.pipe.text_encoder = text_encoder

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt decides the states (part of the text cache's key): nothing (the limit only
        refuses)."""
        return {}


def batch_norm_stats(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm (mean, std) [1, 128, 1, 1] over the packed channels, as Ideogram4Pipeline reads them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    return mean, std


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents [B, C, H, W] -> [B, 4 C, H/2, W/2] with each cell's channels in the order (patch row, patch
    column, VAE channel): the inverse of the view / permute Ideogram4Pipeline decodes with."""
    batch, channels, height, width = latents.shape
    cells = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return cells.permute(0, 3, 5, 1, 2, 4).reshape(batch, PATCH * PATCH * channels, height // PATCH, width // PATCH)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] -> the pipeline's image tokens [B, h w, 128], row by row."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's image tokens [B, h w, 128] -> [B, 128, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def resolution_mu(height: int, width: int) -> float:
    """The pipeline's schedule mean (base 0) for latents of height x width tokens of 16 x 16 pixels (the VAE's 8x and
    the 2x2 patches; tiny models keep the ratio)."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu

    pixels_per_token = 8 * PATCH
    return _resolution_aware_mu(height * pixels_per_token, width * pixels_per_token, base_mu=0.0)


def packed_sequence(features: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, height: int, width: int
                    ) -> dict[str, torch.Tensor]:
    """The conditional transformer's inputs as Ideogram4Pipeline's loop builds them: [left-padded text][image tokens]
    for the latents (text rows zero), the text features (image rows zero), and `_prepare_ids`'s layout."""
    from diffusers import Ideogram4Pipeline

    batch, text_length = mask.shape
    lengths = [int(n) for n in mask.sum(dim=1)]
    left_padded = torch.stack([torch.cat([row.new_zeros(text_length - n, row.shape[1]), row[:n]])
                               for row, n in zip(features, lengths)])
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(lengths, height, width, text_length,
                                                                          tokens.device)
    return {"hidden_states": torch.cat([tokens.new_zeros(batch, text_length, tokens.shape[2]), tokens], dim=1),
            "encoder_hidden_states": torch.cat([left_padded, left_padded.new_zeros(batch, tokens.shape[1],
                                                                                   features.shape[2])], dim=1),
            "position_ids": position_ids, "segment_ids": segment_ids, "indicator": indicator}


class Ideogram4(Family):
    """Ideogram 4 text to image (`Ideogram4Pipeline`)."""

    name: ClassVar[str] = "ideogram4"
    description: ClassVar[str] = "Ideogram 4"
    denoiser: ClassVar[str] = "transformer"
    block_lists: ClassVar[tuple[str, ...]] = ("layers",)
    renders_from_text: ClassVar[bool] = True  # Ideogram4Pipeline takes no prompt embeddings
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # head-less Qwen3-VL
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # the asymmetric guidance's text-free transformer: rendered with, never trained
    other_folders: ClassVar[tuple[str, ...]] = ("vae", "scheduler", "unconditional_transformer")
    train_config: ClassVar[str] = "cfgs/train/examples/lora_ideogram4.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_ideogram4.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("ideogram4",)
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": COMFY_PREFIX}
    has_webui_layout: ClassVar[bool] = True

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        if "_class_name" in index:
            return index["_class_name"] == "Ideogram4Pipeline"
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "Ideogram4Transformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_ideogram4 import make_tiny_ideogram4

        return make_tiny_ideogram4(out_dir, seed=seed)

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKLFlux2, Ideogram4Transformer2DModel
        from transformers import AutoTokenizer, Qwen3VLModel

        def transformer(folder: str) -> Callable[[], Any]:
            return lambda: Ideogram4Transformer2DModel.from_pretrained(source, subfolder=folder, **common)

        return {
            "transformer": transformer("transformer"),
            "unconditional_transformer": transformer("unconditional_transformer"),
            "vae": lambda: AutoencoderKLFlux2.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen3VLModel.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """Qwen3-VL's vision tower (text to image never runs it) and any decoder layer after the deepest one the
        pipeline taps (35, the last of the 8B's 36): their outputs never reach the transformer."""
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

        if part not in self.text_encoders:
            return frozenset()
        deepest = max(QWEN3_VL_ACTIVATION_LAYERS)
        return frozenset(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and (
            name.startswith("visual.") or any(name.startswith(f"language_model.layers.{i}.")
                                              for i in range(deepest + 1, len(model.language_model.layers)))))

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler (shift 1, no dynamic shifting: the pipeline sets its own
        sigmas, and the objective applies the pipeline's resolution-aware mean)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    # ---------------------------------------------------------------------------------------- latents
    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the 2x2 patches: 16 for Ideogram 4 (the pipeline refuses other sizes)."""
        return self.vae_scale_factor(read_config) * PATCH

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> the posterior's (mean, std) [B, 128, H/16, W/16], fp32, patchified and batch-normed
        so that Ideogram4Pipeline's decoding gives the posterior back (both steps are linear per channel, so the std
        follows)."""
        dist = vae.encode(to_module(vae, pixel_values)).latent_dist
        bn_mean, bn_std = batch_norm_stats(vae)
        mean = (patchify(dist.mean) - bn_mean.to(dist.mean)) / bn_std.to(dist.mean)
        std = patchify(dist.std) / bn_std.to(dist.std)
        return mean.float(), std.float()

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """Chat-templated captions up to `max_sequence_length` tokens (null: the pipeline's 2048; a longer one is
        refused, as the pipeline refuses it), each batch padded to its longest; tokenizer_repeats, clip_skip and
        guidance do not apply."""
        return Ideogram4Conditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        """Flow matching; `shift` null means the pipeline's resolution-aware mean (0.5 log(pixels / 512^2), added to
        the logit-normal's mean exactly as its schedule adds it), not the scheduler config's static shift 1."""
        import dataclasses

        from hcpdiff.objectives.flow_matching import flow_matching_objective

        if loss_spec.shift is None and loss_spec.shift_value is None:
            loss_spec = dataclasses.replace(loss_spec, shift="resolution")
        return flow_matching_objective(noise_scheduler, loss_spec, self.description, resolution_mu=resolution_mu)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The velocity noise - x0 at sigma = `timesteps`, by the conditional transformer called as
        Ideogram4Pipeline's loop calls it (the packed sequence, model time 1 - sigma), its image rows negated and
        unpacked to [B, 128, h, w]."""
        height, width = noisy_latents.shape[-2:]
        tokens = pack(noisy_latents)
        inputs = packed_sequence(conditioning["llm_features"], conditioning["llm_mask"], tokens, height, width)
        text_length = conditioning["llm_mask"].shape[1]
        output = denoiser(**inputs, timestep=(1.0 - timesteps.float()).to(tokens.dtype), return_dict=False)[0]
        return unpack(-output[:, text_length:], height, width)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import Ideogram4Pipeline

        return Ideogram4Pipeline(scheduler=scheduler, vae=components["vae"], text_encoder=components["text_encoder"],
                                 tokenizer=components["tokenizer"], transformer=components["transformer"],
                                 unconditional_transformer=components["unconditional_transformer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts as text (Ideogram4Pipeline takes no prompt embeddings; `(word:1.2)` weights are read and
        dropped), its text rows as long as the longest. It has no negative prompt (its unconditional transformer sees
        no text): a non-empty one is warned about and left out."""
        from hcpdiff.infer.prompt_weights import parse_prompt_weights

        if any(prompt.strip() for prompt in neg_prompts):
            logger.warning("neg_prompt: Ideogram 4 renders without a negative prompt (its unconditional transformer "
                           "sees no text); it is left out (set neg_prompt: '')")
        plain = ["".join(text for text, _ in parse_prompt_weights(prompt)) for prompt in prompts]
        # the text rows padded to the longest prompt, not the pipeline's 2048: the same image, far fewer tokens
        return {"prompt": plain, "max_sequence_length": max(prompt_length(pipe.tokenizer, text) for text in plain)}

    def pipeline_call_args(self, call_args: dict[str, Any]) -> dict[str, Any]:
        """hcpdiff's `guidance_scale` is the pipeline's constant one (the usual classifier-free scale: neg + s (pos -
        neg), here against the unconditional transformer); its default per-step guidance_schedule is then off."""
        args = dict(call_args)
        if "guidance_scale" in args:
            args["guidance_schedule"] = None
        return args

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI Ideogram 4 file: Ideogram 4 version metadata, or names only its original layout has
        (`attention.o`, `adaln_modulation`, `llm_cond_proj`, ...)."""
        from hcpdiff.lora.original_layout import version_text

        return "ideogram" in version_text(metadata) or any(IDEOGRAM_ONLY.match(key) for key in keys)

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{transformer: {`diffusion_model.<original layer>`: its native tensors}}: q / k / v fused exactly into
        `attention.qkv`, the rest renamed; a text-encoder LoRA is one error."""
        from hcpdiff.lora.original_layout import denoiser_to_original

        return denoiser_to_original(self, states, original_layer, lambda name: COMFY_PREFIX + name)

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a ComfyUI Ideogram 4 file (`diffusion_model.` + original names, or bare),
        a fused q / k / v split back exactly."""
        from hcpdiff.lora.original_layout import original_to_denoiser

        return original_to_denoiser(self, state, lambda name, parts: layer_of_original_name(name))

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """diffusers' Ideogram 4 reader of this layout takes the blocks' layers only: a file with others is refused
        there (ComfyUI loads them)."""
        from hcpdiff.lora.state_io import layer_states

        top = sorted(original_layer(layer)[0].name for layer in layer_states(states.get(self.denoiser, {}))
                     if not layer.startswith("layers."))
        if not top:
            return []
        return [f"Ideogram4Pipeline.load_lora_weights refuses a file in these names with layers outside the blocks "
                f"({', '.join(top)}; ComfyUI loads them); give diffusers a --to_diffusers file."]

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Ideogram 4."""
        return {"ss_base_model_version": "ideogram4", "ss_v2": "False", "architecture": "ideogram-4",
                "network_module": "networks.lora"}


# ---------------------------------------------------------------------------------------- LoRA files (ComfyUI)


def original_layer(layer: str) -> tuple[Any, int] | None:
    """(the original-layout layer holding diffusers transformer layer `layer`: a FusedLayer, the layer's place in
    it), or None for a layer the original layout has no Linear for."""
    from hcpdiff.lora.fused_layout import FusedLayer

    if match := re.fullmatch(r"(layers\.\d+\.attention)\.(to_q|to_k|to_v)", layer):
        return FusedLayer(f"{match[1]}.qkv", tuple(f"{match[1]}.{piece}" for piece in QKV), (1, 1, 1)), QKV.index(
            match[2])
    name = re.sub(r"\.attention\.to_out\.0$", ".attention.o", layer)
    return (FusedLayer(name, (layer,)), 0) if ORIGINAL_LINEAR.fullmatch(name) else None


def layer_of_original_name(webui_layer: str) -> Any:
    """The FusedLayer a ComfyUI layer name (`diffusion_model.layers.0.attention.qkv`, or without the prefix) names;
    one ModelError naming it when the original layout has no such Linear."""
    name = webui_layer.removeprefix(COMFY_PREFIX)
    if not ORIGINAL_LINEAR.fullmatch(name):
        raise ModelError(f"webui LoRA layer '{webui_layer}' names no Linear of Ideogram 4's original layout "
                         "(diffusion_model.layers.0.attention.qkv, ...attention.o, ...feed_forward.w1, ...); nothing "
                         "was written.")
    if name.endswith(".attention.qkv"):
        return original_layer(name.removesuffix("qkv") + "to_q")[0]
    return original_layer(re.sub(r"\.attention\.o$", ".attention.to_out.0", name))[0]
