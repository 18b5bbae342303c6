"""Qwen-Image 2.1 (base and Turbo): a single-stream, block-causal transformer on unpatched 64-channel latents of a
16x RGBA video-style VAE (5-D latents, per-channel mean / std), conditioned on Qwen3-VL's last decoder-layer states
(before its final norm) of a raw-templated prompt, trained by flow matching with a resolution-dependent shift.

Everything that training and inference must agree on comes from QwenImage21Pipeline itself: prompt encoding
(`encode_prompt`: its Qwen3-VL processor called on the template text, left padding, the pre-norm hook, the dropped
system prefix, the states right-padded again with their mask), packing (`_pack_latents` / `_unpack_latents`: a plain
spatial flatten) and the shift (its `calculate_shift` over the packed sequence length H x W).

The transformer's joint sequence is [prompt tokens, target-image slots]; `img_mask` marks the slots, each one 2x2
latent tokens. Its rotary positions are built from the first sample's layout (the image block sits at the padded
prompt length), so a batch of prompts of different lengths, padded with the pipeline's mask, is not the same
computation as its samples one by one. `denoise` therefore calls the transformer once per prompt length in the batch,
each group with its prompts' own tokens and no mask: a batch trains exactly as its samples one by one, as the pipeline
renders each prompt alone.

The Turbo checkpoint differs by model_index.json's `sample_sigmas` (its few-step grid); the run warns about it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ModelError
from hcpdiff.families.base import ConfigReader, pipeline_text_encoder
from hcpdiff.families.qwen_image import QwenImage, plain_prompts
from hcpdiff.families.qwen_image_edit import image_processor_only

SLOT = 2  # one img_mask slot holds 2x2 latent tokens (the transformer's _IMG_TOKENS_PER_SLOT = 4)

# ComfyUI's Qwen-Image 2.1 model keys are `diffusion_model.` + diffusers' module paths, except that each block's SwiGLU
# gate and up projections are one Linear, `img_mlp.gate_up`, gate rows first (diffusers'
# convert_qwen_image21_transformer_checkpoint_to_diffusers reads ComfyUI's single file so). Its LoRA loader reads a
# layer as `diffusion_model.<module path>` (comfy/lora.py's generic key map): --to_webui writes those names, gate and
# up LoRAs fused exactly into one `gate_up` LoRA; --from_webui also reads `transformer.`-prefixed and bare paths.
COMFY_PREFIX = "diffusion_model."
READ_PREFIXES = (COMFY_PREFIX, "transformer.")
GATE_UP = ("img_mlp.gate_layer", "img_mlp.proj")  # the fused layer's pieces, in its row order
LINEAR = re.compile(r"img_in|txt_in\.(in_layer|out_layer)|time_text_embed\.timestep_embedder\.linear_[12]|"
                    r"modulation\.1|norm_out\.linear|proj_out|transformer_blocks\.\d+\."
                    r"(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.(gate_up|gate_layer|proj|out))")
# names Qwen-Image (1)'s transformer lacks: a webui file with them is 2.1's
QWEN21_ONLY = re.compile(r"((diffusion_model|transformer)\.)?(transformer_blocks\.\d+\.img_mlp\."
                         r"(gate_up|gate_layer|proj|out)|txt_in\.(in_layer|out_layer)|modulation\.1)\.")


def load_processor(source: str, common: dict[str, Any]) -> Any:
    """The Qwen3-VL processor from the model's `processor/` folder (image processor, tokenizer, chat template),
    without its video processor (see qwen_image_edit.image_processor_only). QwenImage21Pipeline tokenises the system
    message with the processor's chat template to find its drop index."""
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(source, subfolder="processor", **common)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="processor", **common)
    return image_processor_only(image_processor, tokenizer, "Qwen3VLProcessor",
                                chat_template=processor_chat_template(source, common) or tokenizer.chat_template)


def processor_chat_template(source: str, common: dict[str, Any]) -> str | None:
    """The processor folder's own chat template (`chat_template.jinja`, or `chat_template.json` as processors saved
    it before), as Qwen3VLProcessor.from_pretrained reads it; None without one."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, subfolder="processor", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **common)
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def text_pipeline(components: dict[str, Any]) -> Any:
    """A QwenImage21Pipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                               processor=components["processor"])


def encode_prompts(pipe: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, L, D], mask [B, L] long: 1 for a prompt token, 0 for padding) by the pipeline's
    encode_prompt; L is the batch's longest prompt (the pipeline gives no mask when nothing is padded)."""
    embeds, mask, _ = pipe.encode_prompt(list(prompts), device=device)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds, mask.long()


def token_weights(pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
    """Each weighted prompt's per-token weights [L_i] for the states encode_prompt gives for its plain text: the
    template text tokenised as the processor tokenises it (a token takes the weight of its last character), the
    system prefix dropped as the pipeline drops it."""
    from hcpdiff.infer.prompt_weights import parse_prompt_weights

    prefix_chars = len(pipe.prompt_template_t2i.split("{}")[0])
    rows = []
    for prompt in prompts:
        spans = parse_prompt_weights(prompt)
        text = pipe.prompt_template_t2i.format("".join(span for span, _ in spans) or " ")
        char_weights = [1.0] * prefix_chars + [w for span, w in spans for _ in span]
        char_weights += [1.0] * (len(text) - len(char_weights))
        offsets = pipe.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        rows.append(torch.tensor([char_weights[end - 1] if end > start else 1.0
                                  for start, end in offsets][pipe._drop_idx:]))
    return rows


def encode_weighted(pipe: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, mask) as `encode_prompts` gives them for the prompts' plain text, with `(word:1.2)` weights on
    each prompt's token states (rescaled to their unweighted mean)."""
    from hcpdiff.infer.prompt_weights import apply_weights

    embeds, mask = encode_prompts(pipe, plain_prompts(prompts), device)
    weighted = [apply_weights(row[None, : len(weights)], weights[None])[0]
                for row, weights in zip(embeds, token_weights(pipe, prompts))]
    return torch.stack([torch.cat([w, row[w.shape[0]:]]) for w, row in zip(weighted, embeds)]), mask


class QwenImage21Conditioner:
    """prompts -> {"encoder_hidden_states" [B, L, D], "encoder_hidden_states_mask" [B, L]}."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them
    # a batch's states are padded to its longest prompt: the text cache keeps each prompt's own tokens and pads again
    padded_sequences: ClassVar[dict[str, str]] = {"encoder_hidden_states": "encoder_hidden_states_mask"}

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text inputs for one batch, encoded as QwenImage21Pipeline encodes them."""
        embeds, mask = encode_prompts(self.pipe, prompts, device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass. The pipeline hooks `text_encoder.model`'s
        final norm (to read the pre-norm states), so a prepared encoder also answers `.model` with the plain one's."""
        from accelerate.utils import extract_model_from_parallel

        encoder = pipeline_text_encoder(text_encoder)
        if encoder is not text_encoder:  # not registered as a submodule: the wrapper already holds it
            encoder.__dict__["model"] = extract_model_from_parallel(text_encoder).model
        self.pipe.text_encoder = encoder


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, H, W] -> tokens [B, H * W, C], by QwenImage21Pipeline's helper (no patches)."""
    from diffusers import QwenImage21Pipeline

    batch, channels, height, width = latents.shape
    return QwenImage21Pipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens [B, H * W, C] -> latents [B, C, H, W] (H, W in latent cells, even), by QwenImage21Pipeline's helper,
    which gives the VAE's 5-D layout [B, C, 1, H, W]."""
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline._unpack_latents(tokens, height, width, 1).squeeze(2)  # in latent cells: factor 1


def call_transformer(denoiser: torch.nn.Module, tokens: torch.Tensor, sigmas: torch.Tensor, states: torch.Tensor,
                     height: int, width: int) -> torch.Tensor:
    """The transformer's prediction for one image's tokens per sample, every prompt `states` [B, L, D] unpadded, as
    QwenImage21Pipeline's loop calls it for one prompt: timestep t / 1000 = sigma, img_shapes the target's
    (1, H, W), img_mask the prompt's positions (no vision tokens in a text prompt) then one slot per 2x2 tokens, no
    text mask (nothing is padded); the prediction for the target's tokens."""
    batch, length = states.shape[:2]
    img_mask = torch.cat([torch.zeros(batch, length, dtype=torch.bool, device=tokens.device),
                          torch.ones(batch, height * width // SLOT ** 2, dtype=torch.bool, device=tokens.device)],
                         dim=1)
    prediction = denoiser(hidden_states=tokens, timestep=sigmas.to(tokens.dtype), encoder_hidden_states=states,
                          encoder_hidden_states_mask=None, img_shapes=[[(1, height, width)]] * batch,
                          img_mask=img_mask, return_dict=False)[0]
    return prediction[:, -tokens.shape[1]:]


class QwenImage21(QwenImage):
    """Qwen-Image 2.1 and 2.1 Turbo text to image (`QwenImage21Pipeline`)."""

    name: ClassVar[str] = "qwen_image_21"
    description: ClassVar[str] = "Qwen-Image 2.1"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3-VL
    tokenizers: ClassVar[tuple[str, ...]] = ()  # the tokenizer is the processor's
    other_folders: ClassVar[tuple[str, ...]] = ("vae", "scheduler", "processor")
    train_config: ClassVar[str] = "cfgs/train/examples/lora_qwen_image_21.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_qwen_image_21.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("qwen_image_21", "qwen_image_21-turbo")
    render_modes: ClassVar[tuple[str, ...]] = ("txt2img",)  # no img2img / inpaint pipeline of 2.1 in diffusers

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        if "_class_name" in index:
            return index["_class_name"] == "QwenImage21Pipeline"
        transformer = read_config("transformer")
        return transformer is not None and transformer.get("_class_name") == "QwenImage21Transformer2DModel"

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_qwen_image_21 import make_tiny_qwen_image_21

        return make_tiny_qwen_image_21(out_dir, seed=seed, turbo=variant == "qwen_image_21-turbo")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
        from transformers import Qwen3VLForConditionalGeneration

        return {
            "transformer": lambda: QwenImage21Transformer2DModel.from_pretrained(source, subfolder="transformer",
                                                                                 **common),
            "vae": lambda: AutoencoderKLQwenImage21.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen3VLForConditionalGeneration.from_pretrained(
                source, subfolder="text_encoder", **common),
            "processor": lambda: load_processor(source, common),
        }

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """None: one stream, every layer serves the image tokens."""
        return frozenset()

    def pipeline_warnings(self, pipeline_settings: dict[str, Any]) -> list[str]:
        """Qwen-Image 2.1 Turbo (`sample_sigmas` in model_index.json, its few-step grid; the base has none): LoRAs
        trained on it tend to lose the few-step sampling."""
        if not pipeline_settings.get("sample_sigmas"):
            return []
        return ["this looks like Qwen-Image 2.1 Turbo (sample_sigmas in its model_index.json), a step-distilled "
                "model: a LoRA trained on it tends to lose the few-step sampling; train on the base Qwen-Image 2.1 "
                "(Qwen/Qwen-Image-2.1) and render the LoRA on Turbo"]

    # ---------------------------------------------------------------------------------------- latents
    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images [B, 3, H, W] -> the posterior's normalised (mean, std) [B, 64, H/16, W/16]: the VAE reads RGBA,
        so an opaque alpha channel is added (QwenImage21Pipeline converts its images to RGBA: alpha 255 = 1.0)."""
        alpha = pixel_values.new_ones(pixel_values.shape[0], 1, *pixel_values.shape[2:])
        return super().encode_latent_dist(vae, torch.cat([pixel_values, alpha], dim=1))

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """The prompt is not cut (QwenImage21Pipeline does not cut it); tokenizer_repeats and clip_skip do not
        apply."""
        return QwenImage21Conditioner(text_pipeline(components))

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        """Flow matching; the resolution shift's mu by the pipeline's calculate_shift over H x W tokens (no patches)."""
        from hcpdiff.objectives.flow_matching import flow_matching_objective, resolution_mu

        config = noise_scheduler.config
        return flow_matching_objective(noise_scheduler, loss_spec, self.description,
                                       lambda height, width: resolution_mu(config, height * width))

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """Pack, call the transformer once per prompt length (each sample's own tokens, as the pipeline renders one
        prompt), unpack in the batch's order."""
        height, width = noisy_latents.shape[-2:]
        tokens = pack_latents(noisy_latents)
        states = conditioning["encoder_hidden_states"]
        lengths = conditioning["encoder_hidden_states_mask"].sum(dim=1)
        order, outputs = [], []
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero(as_tuple=True)[0]
            outputs.append(call_transformer(denoiser, tokens[rows], timesteps[rows], states[rows, :length], height,
                                            width))
            order.append(rows)
        prediction = torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return unpack_latents(prediction, height, width)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        from diffusers import QwenImage21Pipeline

        return QwenImage21Pipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                                   text_encoder=components["text_encoder"], processor=components["processor"])

    def configure_pipeline(self, pipe: Any, pipeline_settings: dict[str, Any]) -> None:
        """Qwen-Image 2.1 Turbo renders on its shipped `sample_sigmas` grid (their length is its step count), which
        QwenImage21Pipeline reads from its config; the base keeps evenly spaced sigmas."""
        pipe.register_to_config(sample_sigmas=pipeline_settings.get("sample_sigmas"))

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states and masks by the pipeline's encode_prompt, with `(word:1.2)`
        weights on the states. The negative prompt is always given, so `true_cfg_scale` > 1 turns on
        classifier-free guidance."""
        device = pipe.text_encoder.device
        with torch.no_grad():
            embeds, mask = encode_weighted(pipe, prompts, device)
            neg_embeds, neg_mask = encode_weighted(pipe, neg_prompts, device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg_embeds,
                "negative_prompt_embeds_mask": neg_mask}

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A ComfyUI Qwen-Image 2.1 file: 2.1 version metadata, or a layer Qwen-Image (1) lacks (`img_mlp.gate_up`,
        `txt_in.in_layer`, the shared `modulation.1`, ...). A file of attention layers alone has the same names in
        both and is read as Qwen-Image's (the same native tensors)."""
        from hcpdiff.lora.original_layout import version_text

        version = version_text(metadata)
        return any(mark in version for mark in ("qwen_image_21", "qwen-image-2.1", "qwen-image-21")) or any(
            QWEN21_ONLY.match(key) for key in keys)

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{transformer: {`diffusion_model.<module path>`: its native tensors}}, a block's gate and up LoRAs fused
        exactly into `img_mlp.gate_up`; a text-encoder LoRA is one error."""
        from hcpdiff.lora.original_layout import denoiser_to_original

        state = states.get(self.denoiser, {})
        return denoiser_to_original(self, states, lambda layer: original_layer(layer, state),
                                    lambda name: COMFY_PREFIX + name)

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a ComfyUI Qwen-Image 2.1 file (`diffusion_model.`, `transformer.` or bare
        module paths), a fused `gate_up` split back exactly into the gate and up LoRAs."""
        from hcpdiff.lora.original_layout import original_to_denoiser

        return original_to_denoiser(self, state, layer_of_webui_name)

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """diffusers' Qwen-Image reader passes `gate_up` on to a module 2.1's diffusers transformer does not have."""
        from hcpdiff.lora.state_io import layer_states

        fused = sorted({original_layer(layer, {})[0].name for layer in layer_states(states.get(self.denoiser, {}))
                        if layer.endswith(GATE_UP)})
        if not fused:
            return []
        more = f" and {len(fused) - 1} more" if len(fused) > 1 else ""
        return [f"QwenImage21Pipeline.load_lora_weights leaves out the fused MLP layers of a file in these names "
                f"({fused[0]}{more}; ComfyUI loads them); give diffusers a --to_diffusers file."]

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming Qwen-Image 2.1."""
        return {"ss_base_model_version": "qwen_image_21", "ss_v2": "False", "architecture": "qwen-image-2.1",
                "network_module": "networks.lora"}


# ---------------------------------------------------------------------------------------- LoRA files (ComfyUI)


def gate_up_layer(block: str, mlp_ratio: int) -> Any:
    """The FusedLayer `<block>.img_mlp.gate_up` of a block's gate and up projections, each `mlp_ratio` times as wide
    as the block."""
    from hcpdiff.lora.fused_layout import FusedLayer

    return FusedLayer(f"{block}.img_mlp.gate_up", tuple(f"{block}.{piece}" for piece in GATE_UP),
                      (mlp_ratio, mlp_ratio))


def original_layer(layer: str, state: dict[str, torch.Tensor]) -> tuple[Any, int] | None:
    """(ComfyUI's layer holding diffusers transformer layer `layer`: a FusedLayer, the layer's place in it), or None
    for a layer ComfyUI's model has no Linear for; a gate / up layer's width ratio is read from its LoRA in
    `state`."""
    from hcpdiff.lora.fused_layout import FusedLayer

    if match := re.fullmatch(r"(transformer_blocks\.\d+)\.(img_mlp\.(?:gate_layer|proj))", layer):
        up, down = state.get(f"{layer}.lora_B.weight"), state.get(f"{layer}.lora_A.weight")
        ratio = up.shape[0] // down.shape[1] if up is not None and down is not None else 1
        return gate_up_layer(match[1], ratio), GATE_UP.index(match[2])
    return (FusedLayer(layer, (layer,)), 0) if LINEAR.fullmatch(layer) and not layer.endswith(".gate_up") else None


def layer_of_webui_name(webui_layer: str, parts: dict[str, torch.Tensor]) -> Any:
    """The FusedLayer a ComfyUI layer name names (a `gate_up` one sized by its LoRA `parts`); one ModelError naming
    it when Qwen-Image 2.1's transformer has no such Linear."""
    from hcpdiff.lora.fused_layout import FusedLayer

    name = next((webui_layer.removeprefix(p) for p in READ_PREFIXES if webui_layer.startswith(p)), webui_layer)
    if not LINEAR.fullmatch(name):
        raise ModelError(f"webui LoRA layer '{webui_layer}' names no Linear of the Qwen-Image 2.1 transformer "
                         "(diffusion_model.transformer_blocks.0.attn.to_q, ...img_mlp.gate_up, ...); nothing was "
                         "written.")
    if name.endswith(".img_mlp.gate_up"):
        up, down = parts.get(".lora_up.weight"), parts.get(".lora_down.weight")
        ratio = up.shape[0] // (2 * down.shape[1]) if up is not None and down is not None else 1
        return gate_up_layer(name.removesuffix(".img_mlp.gate_up"), ratio)
    return FusedLayer(name, (name,))
