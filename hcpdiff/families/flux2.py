"""FLUX.2 [klein] (4B and 9B, base and distilled): a FLUX-style MMDiT (double- then single-stream blocks) on the FLUX.2
VAE's 32-channel latents in 2x2 patches (128 channels per token), normalised by the VAE's batch-norm statistics,
conditioned on three stacked hidden states (layers 9, 18, 27) of a Qwen3 encoder over a chat-templated prompt, trained
by flow matching with the pipeline's empirical resolution shift.

Everything that training and inference must agree on comes from Flux2KleinPipeline itself: prompt encoding
(`encode_prompt`: the chat template without thinking, padding to max_sequence_length, every prompt encoded at that
fixed length, so the transformer sees all of them unmasked), latents (`_patchify_latents`, then the VAE's batch norm as
`_encode_vae_image` applies it), packing and position ids (`_pack_latents`, `_prepare_latent_ids`, `_prepare_text_ids`,
`_unpack_latents_with_ids`) and the shift (`compute_empirical_mu`). Its sampling loop calls the transformer with
timestep t / 1000 = sigma and no guidance, and steps along its output: the flow-matching target noise - x0.

FLUX.2 [dev] (32B, Flux2Pipeline) is the second family here, `Flux2Dev`: the same transformer class (with a guidance
embedding), VAE, latents, packing, ids and shift, hence the shared base `Flux2Base`; its own are the conditioner
(Flux2Pipeline.encode_prompt: a Mistral-3 (Mistral Small 3.1, ~24B) encoder over a system-prompted chat, hidden states
10, 20, 30 stacked, every prompt at the fixed 512 tokens) and the embedded guidance (`train.guidance`, as FLUX.1-dev).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder, to_module
from hcpdiff.lora.original_layout import BflLayout

PATCH = 2  # the pipeline patchifies 2x2 VAE cells into one 128-channel latent cell (= one token)
MAX_SEQUENCE_LENGTH = 512  # chat-templated prompt tokens: Flux2KleinPipeline.__call__'s default
# the deepest hidden state the pipeline reads (text_encoder_out_layers (9, 18, 27)): later Qwen3 layers are unused
DEEPEST_TEXT_LAYER = 27
# compute_empirical_mu depends on the number of sampling steps; training takes the pipeline's default 50 (a base
# model's; the distilled ones sample in 4 and are not what LoRAs train on)
MU_STEPS = 50

# BFL's original FLUX.2 layout, in which ComfyUI runs FLUX.2 (its flux model with FLUX.2's global modulation: the
# checkpoint's own names, the ones diffusers' convert_flux2_transformer_checkpoint_to_diffusers reads) and by which
# kohya-style files name a layer (`lora_unet_` + the module path with underscores, which ComfyUI's generic key map
# reads for every `diffusion_model.` weight, as diffusers' _convert_kohya_flux2_lora_to_diffusers does for the blocks).
# {BFL layer: (the diffusers layers whose outputs it stacks, in row order; each one's output width over the layer's
# input width)}; only q / k / v fuse, and the final adaLN's two halves swap (BFL: shift, scale; diffusers: scale,
# shift). Every Linear of Flux2Transformer2DModel has a place here.
BFL_DOUBLE_BLOCK = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    "img_attn.proj": (("attn.to_out.0",), (1,)), "txt_attn.proj": (("attn.to_add_out",), (1,)),
    "img_mlp.0": (("ff.linear_in",), (1,)), "img_mlp.2": (("ff.linear_out",), (1,)),
    "txt_mlp.0": (("ff_context.linear_in",), (1,)), "txt_mlp.2": (("ff_context.linear_out",), (1,)),
}
BFL_SINGLE_BLOCK = {"linear1": (("attn.to_qkv_mlp_proj",), (1,)), "linear2": (("attn.to_out",), (1,))}
BFL_TOP_LEVEL = {
    "img_in": (("x_embedder",), (1,)), "txt_in": (("context_embedder",), (1,)),
    "time_in.in_layer": (("time_guidance_embed.timestep_embedder.linear_1",), (1,)),
    "time_in.out_layer": (("time_guidance_embed.timestep_embedder.linear_2",), (1,)),
    "guidance_in.in_layer": (("time_guidance_embed.guidance_embedder.linear_1",), (1,)),
    "guidance_in.out_layer": (("time_guidance_embed.guidance_embedder.linear_2",), (1,)),
    "double_stream_modulation_img.lin": (("double_stream_modulation_img.linear",), (1,)),
    "double_stream_modulation_txt.lin": (("double_stream_modulation_txt.linear",), (1,)),
    "single_stream_modulation.lin": (("single_stream_modulation.linear",), (1,)),
    "final_layer.linear": (("proj_out",), (1,)),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), (2,)),
}
BFL_SWAPPED_HALVES = ("final_layer.adaLN_modulation.1",)
BFL_BLOCKS = {"double_blocks": ("transformer_blocks", BFL_DOUBLE_BLOCK),
              "single_blocks": ("single_transformer_blocks", BFL_SINGLE_BLOCK)}
BFL = BflLayout(BFL_TOP_LEVEL, BFL_BLOCKS, BFL_SWAPPED_HALVES)
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."  # read too: ComfyUI's generic key map takes the dotted path under it
# the top-level layers diffusers' kohya FLUX.2 reader (0.42) maps; it leaves out the others with a warning
DIFFUSERS_KOHYA_TOP_LEVEL = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear")
# layers only FLUX.2's layout has (FLUX.1's blocks share the others' names): a webui file with one is FLUX.2's
FLUX2_ONLY = re.compile(r"(lora_unet_|diffusion_model\.)?(double_stream_modulation_(img|txt)|single_stream_modulation)"
                        r"[._]lin\.")
FLUX2_VERSION = re.compile(r"flux[-_. ]?2")


def text_pipeline(components: dict[str, Any]) -> Any:
    """A Flux2KleinPipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                              tokenizer=components["tokenizer"])


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
    """Prompt states [B, max_sequence_length, 3 D] by the pipeline's encode_prompt."""
    prompt_embeds, _ = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)
    return prompt_embeds


class Flux2Conditioner:
    """prompts -> {"encoder_hidden_states" [B, L, 3 D], "guidance" [B]?}: every prompt at the fixed length L (its
    padding included, as the pipeline hands it to the transformer) by the pipeline's encode_prompt (Flux2KleinPipeline's
    or Flux2Pipeline's), and for FLUX.2 [dev] the embedded guidance."""

    prompt_only: ClassVar[bool] = True  # outputs depend on the prompt strings alone: the text cache may keep them

    def __init__(self, pipe: Any, max_sequence_length: int, guidance: float | None = None) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance = guidance  # None: the transformer has no guidance embedding (klein)

    def __call__(self, prompts: list[str], batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The transformer's text input for one batch, encoded as the pipeline encodes it."""
        conditioning = {"encoder_hidden_states": encode_prompts(self.pipe, prompts, self.max_sequence_length, device)}
        if self.guidance is not None:
            conditioning["guidance"] = torch.full((len(prompts),), self.guidance, device=device)
        return conditioning

    def set_text_encoder(self, text_encoder: torch.nn.Module, index: int = 0) -> None:
        """Use a wrapped (prepared) text encoder for the forward pass."""
        self.pipe.text_encoder = pipeline_text_encoder(text_encoder)

    def cache_settings(self) -> dict[str, Any]:
        """What besides the prompt decides the states (part of the text cache's key)."""
        settings: dict[str, Any] = {"max_sequence_length": self.max_sequence_length}
        if self.guidance is not None:
            settings["guidance"] = self.guidance
        return settings


def batch_norm_stats(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm (mean, std) [1, 128, 1, 1] over patchified latents, as Flux2KleinPipeline reads them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def empirical_mu(height: int, width: int) -> float:
    """The pipeline's shift exponent for latents of height x width patchified cells (one token each)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=height * width, num_steps=MU_STEPS)


def bfl_layer(layer: str) -> Any:
    """(the BFL layer holding a diffusers transformer layer: a FusedLayer, the layer's place in it), or None."""
    return BFL.of_layer(layer)


def bfl_layer_of_webui_name(webui_layer: str) -> Any:
    """The BFL layer (a FusedLayer) a kohya (`lora_unet_double_blocks_0_img_attn_qkv`) or ComfyUI
    (`diffusion_model.double_blocks.0.img_attn.qkv`) layer name names; one ModelError naming it when none."""
    dotted = webui_layer.startswith(COMFY_PREFIX)
    layer = None
    if dotted or webui_layer.startswith(KOHYA_PREFIX):
        layer = BFL.of_path(webui_layer.removeprefix(COMFY_PREFIX if dotted else KOHYA_PREFIX), "." if dotted else "_")
    if layer is None:
        raise ModelError(f"webui LoRA layer '{webui_layer}' is no layer of FLUX.2's original (BFL) layout, whose names "
                         "look like lora_unet_double_blocks_0_img_attn_qkv, lora_unet_single_blocks_0_linear1, "
                         "lora_unet_double_stream_modulation_img_lin; nothing was written.")
    return layer


class Flux2Base(Family):
    """What FLUX.2 [klein] and [dev] share: the Flux2Transformer2DModel, the FLUX.2 VAE's patchified, batch-normed
    latents, packing and position ids, the empirical resolution shift, the transformer call."""

    denoiser: ClassVar[str] = "transformer"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # the deepest hidden state the pipeline reads: the text model's layers from it on never reach the transformer
    deepest_text_layer: ClassVar[int] = DEEPEST_TEXT_LAYER
    text_layers_prefix: ClassVar[str] = "model.layers."  # the text model's decoder layers' module path
    unused_text_modules: ClassVar[tuple[str, ...]] = ()  # text encoder modules the text path never runs
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")  # block swap order
    webui_prefixes: ClassVar[dict[str, str]] = {"transformer": KOHYA_PREFIX}
    has_webui_layout: ClassVar[bool] = True
    guidance_embeds: ClassVar[bool] = False  # the transformer has a guidance embedding ([dev])
    architecture: ClassVar[str]  # the kohya `modelspec.architecture` of its LoRA files

    def unused_layers(self, part: str, model: torch.nn.Module) -> frozenset[str]:
        """The text model's decoder layers from the deepest hidden state the pipeline reads on, its LM head and
        `unused_text_modules`: their outputs never reach the transformer."""
        if part not in self.text_encoders:
            return frozenset()
        prefix = self.text_layers_prefix
        depth = len(model.get_submodule(prefix.rstrip(".")))
        deep = tuple(f"{prefix}{i}." for i in range(self.deepest_text_layer, depth))
        unused = ("lm_head", *self.unused_text_modules, *deep)
        return frozenset(name for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and name.startswith(unused))

    def training_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler (dynamic shifting: the objective applies the pipeline's
        mu)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def check_run(self, mixed_precision: str | None) -> None:
        """fp16 is refused: FLUX.2 is bf16-native and its activations overflow fp16 as FLUX.1's do."""
        if mixed_precision == "fp16":
            raise ConfigError("mixed_precision: fp16 overflows FLUX.2's transformer (NaN losses); use bf16 "
                              "(or null for fp32)")

    # ---------------------------------------------------------------------------------------- latents
    def pixel_step(self, read_config: ConfigReader) -> int:
        """vae factor x the 2x2 patches: 16 for FLUX.2 (the pipeline rounds other sizes down)."""
        return self.vae_scale_factor(read_config) * PATCH

    def encode_latent_dist(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> the posterior's (mean, std) [B, 128, H/16, W/16], fp32, patchified and batch-normed
        as Flux2KleinPipeline._encode_vae_image makes latents (its mean; both steps are linear per channel, so the
        std follows)."""
        from diffusers import Flux2KleinPipeline

        dist = vae.encode(to_module(vae, pixel_values)).latent_dist
        bn_mean, bn_std = batch_norm_stats(vae)
        mean = (Flux2KleinPipeline._patchify_latents(dist.mean) - bn_mean.to(dist.mean)) / bn_std.to(dist.mean)
        std = Flux2KleinPipeline._patchify_latents(dist.std) / bn_std.to(dist.std)
        return mean.float(), std.float()

    def build_objective(self, noise_scheduler: Any, loss_spec: Any) -> Any:
        """Flow matching; the resolution shift (the default: the scheduler shifts dynamically) takes the pipeline's
        compute_empirical_mu at its default 50 steps, not FLUX.1's calculate_shift."""
        from hcpdiff.objectives.flow_matching import flow_matching_objective

        return flow_matching_objective(noise_scheduler, loss_spec, self.description, resolution_mu=empirical_mu)

    def denoise(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The velocity noise - x0 at sigma = `timesteps`, by the transformer called as the pipelines' loops call it
        (packed tokens, their position ids, timestep t / 1000 = sigma, the conditioning's guidance: none for klein),
        unpacked to [B, 128, h, w]. Flux2KleinPipeline's static helpers serve both (Flux2Pipeline's are the same
        functions; its unpacking reads the size from the ids)."""
        from diffusers import Flux2KleinPipeline as Pipe

        height, width = noisy_latents.shape[-2:]
        tokens = Pipe._pack_latents(noisy_latents)
        image_ids = Pipe._prepare_latent_ids(noisy_latents).to(noisy_latents.device)
        text = conditioning["encoder_hidden_states"]
        text_ids = Pipe._prepare_text_ids(text).to(text.device)
        prediction = denoiser(hidden_states=tokens, timestep=timesteps.to(tokens.dtype),
                              guidance=conditioning.get("guidance"), encoder_hidden_states=text, txt_ids=text_ids,
                              img_ids=image_ids, return_dict=False)[0]
        return Pipe._unpack_latents_with_ids(prediction, image_ids, height, width)

    # ---------------------------------------------------------------------------------------- LoRA files
    def is_webui_file(self, keys: list[str], metadata: dict[str, str]) -> bool:
        """A kohya / ComfyUI FLUX.2 file: FLUX.2 version metadata, or a layer only FLUX.2's layout has (the global
        modulation); klein takes those not marked as [dev]'s (version `flux-2-dev`, or a guidance embedding's
        layers), [dev] the rest. A file of block layers alone has FLUX.1's names and is read as FLUX.1's."""
        from hcpdiff.lora.original_layout import version_text

        version = version_text(metadata)
        if not (FLUX2_VERSION.search(version) or any(FLUX2_ONLY.match(key) for key in keys)):
            return False
        is_dev = "dev" in version or any(re.match(r"(lora_unet_|diffusion_model\.)?guidance_in", key) for key in keys)
        return is_dev == self.guidance_embeds

    def native_to_webui(self, states: dict[str, dict[str, torch.Tensor]]
                        ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """{transformer: {`lora_unet_<BFL path with underscores>`: its native tensors}}: q / k / v fused exactly into
        one `qkv` LoRA, the final adaLN's halves swapped, the rest renamed; a text-encoder LoRA is one error."""
        from hcpdiff.lora.original_layout import denoiser_to_original

        return denoiser_to_original(self, states, bfl_layer, lambda name: KOHYA_PREFIX + name.replace(".", "_"))

    def webui_to_native(self, state: dict[str, torch.Tensor], model_path: str | None
                        ) -> dict[str, dict[str, torch.Tensor]]:
        """Native transformer states of a kohya / ComfyUI FLUX.2 file (`lora_unet_` + the BFL path with underscores,
        or `diffusion_model.` + the dotted path), fused q / k / v split back exactly."""
        from hcpdiff.lora.original_layout import original_to_denoiser

        return original_to_denoiser(self, state, lambda name, parts: bfl_layer_of_webui_name(name))

    def webui_notes(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        """Top-level layers diffusers' kohya FLUX.2 reader leaves out (with a logged warning): the global modulation,
        the guidance embedding and the final adaLN."""
        from hcpdiff.lora.state_io import layer_states

        names = {bfl_layer(layer)[0].name for layer in layer_states(states.get(self.denoiser, {}))}
        left_out = sorted(name for name in names
                          if not name.startswith(tuple(BFL_BLOCKS)) and name not in DIFFUSERS_KOHYA_TOP_LEVEL)
        if not left_out:
            return []
        return [f"diffusers' load_lora_weights leaves out {', '.join(left_out)} of a kohya FLUX.2 file (ComfyUI loads "
                "them); give diffusers a --to_diffusers file."]

    def kohya_version(self, base_model: str | None) -> dict[str, str]:
        """Version metadata naming FLUX.2 and the model (klein or dev)."""
        return {"ss_base_model_version": "flux2", "ss_v2": "False", "architecture": self.architecture,
                "network_module": "networks.lora"}


class Flux2Klein(Flux2Base):
    """FLUX.2 [klein] 4B / 9B text to image (`Flux2KleinPipeline`)."""

    name: ClassVar[str] = "flux2_klein"
    description: ClassVar[str] = "FLUX.2 [klein]"
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux2_klein.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_flux2_klein.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux2_klein", "flux2_klein-distilled")
    architecture: ClassVar[str] = "flux-2-klein"

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # text to image (with optional reference images) only: the inpaint / KV pipelines have their own class names,
        # and FLUX.2 [dev] (Flux2Pipeline, the same transformer class) has another text encoder
        if "_class_name" in index:
            return index["_class_name"] == "Flux2KleinPipeline"
        transformer = read_config("transformer")
        return (transformer is not None and transformer.get("_class_name") == "Flux2Transformer2DModel"
                and not transformer.get("guidance_embeds", True))

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_flux2 import make_tiny_flux2_klein

        return make_tiny_flux2_klein(out_dir, seed=seed, distilled=variant == "flux2_klein-distilled")

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        return {
            "transformer": lambda: Flux2Transformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKLFlux2.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Qwen3ForCausalLM.from_pretrained(source, subfolder="text_encoder", **common),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        }

    def pipeline_warnings(self, pipeline_settings: dict[str, Any]) -> list[str]:
        """A step-distilled klein (FLUX.2-klein-4B / -9B: `is_distilled` in model_index.json, the only setting that
        tells it from the base): LoRAs trained on it tend to lose the 4-step sampling."""
        if not pipeline_settings.get("is_distilled"):
            return []
        return ["this looks like a step-distilled FLUX.2 [klein] (is_distilled in its model_index.json): a LoRA "
                "trained on it tends to lose the 4-step sampling; train on the base klein "
                "(black-forest-labs/FLUX.2-klein-base-4B / -base-9B) and render the LoRA on the distilled one"]

    # ---------------------------------------------------------------------------------------- conditioning and step
    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = None) -> Any:
        """Chat-templated prompt tokens padded / cut to `max_sequence_length` (null: the pipeline's 512);
        tokenizer_repeats, clip_skip and guidance do not apply (klein has no guidance embedding)."""
        return Flux2Conditioner(text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH)

    # ---------------------------------------------------------------------------------------- rendering
    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        """Flux2KleinPipeline with is_distilled False: guidance_scale decides classifier-free guidance (a distilled
        checkpoint renders with guidance_scale 1, its model card's setting)."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                                  text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' and negative prompts' states by the pipeline's encode_prompt. `(word:1.2)` weights are read
        and dropped (the text without its markup is encoded): weighting three stacked Qwen3 layers is not done yet."""
        from hcpdiff.infer.prompt_weights import parse_prompt_weights

        def plain(texts: list[str]) -> list[str]:
            return ["".join(text for text, _ in parse_prompt_weights(prompt)) for prompt in texts]

        device = pipe.text_encoder.device
        with torch.no_grad():
            return {"prompt_embeds": encode_prompts(pipe, plain(prompts), MAX_SEQUENCE_LENGTH, device),
                    "negative_prompt_embeds": encode_prompts(pipe, plain(neg_prompts), MAX_SEQUENCE_LENGTH, device)}


DEV_DEEPEST_TEXT_LAYER = 30  # Flux2Pipeline's text_encoder_out_layers (10, 20, 30) of Mistral Small 3.1's 40


def dev_text_pipeline(components: dict[str, Any]) -> Any:
    """A Flux2Pipeline holding only the text parts, whose encode_prompt the conditioner calls."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=components["text_encoder"],
                         tokenizer=components["tokenizer"])


def load_dev_processor(source: str, common: dict[str, Any]) -> Any:
    """FLUX.2 [dev]'s `tokenizer/` by AutoProcessor, as Flux2Pipeline loads it. Its PixtralProcessor needs
    torchvision in transformers 5; the bare tokenizer is no substitute (its chat template is not the processor's, so
    prompts would encode differently), so a missing torchvision is one error."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, subfolder="tokenizer", **common)
    except ImportError as error:
        raise ModelError(f"{source}/tokenizer: FLUX.2 [dev]'s PixtralProcessor needs torchvision "
                         f"(pip install torchvision): {error}".splitlines()[0]) from None


class Flux2Dev(Flux2Base):
    """FLUX.2 [dev] (32B) text to image (`Flux2Pipeline`): klein's latents, shift and transformer call, with a
    Mistral-3 text encoder and the embedded guidance."""

    name: ClassVar[str] = "flux2_dev"
    description: ClassVar[str] = "FLUX.2 [dev]"
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux2_dev.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_flux2_dev.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux2_dev",)
    guidance_embeds: ClassVar[bool] = True
    architecture: ClassVar[str] = "flux-2-dev"
    deepest_text_layer: ClassVar[int] = DEV_DEEPEST_TEXT_LAYER
    text_layers_prefix: ClassVar[str] = "model.language_model.layers."
    # Mistral3ForConditionalGeneration's vision tower and projector: the text-only prompt path never runs them
    unused_text_modules: ClassVar[tuple[str, ...]] = ("model.vision_tower.", "model.multi_modal_projector.")

    @classmethod
    def matches(cls, index: dict[str, Any], read_config: ConfigReader) -> bool:
        # Flux2Pipeline only (klein's pipelines have their own class names); without a model_index.json, the
        # transformer config with a guidance embedding (klein's has none)
        if "_class_name" in index:
            return index["_class_name"] == "Flux2Pipeline"
        transformer = read_config("transformer")
        return (transformer is not None and transformer.get("_class_name") == "Flux2Transformer2DModel"
                and bool(transformer.get("guidance_embeds", True)))

    def make_tiny(self, out_dir: Path, seed: int = 0, variant: str | None = None) -> Path:
        from hcpdiff.tools.tiny_flux2_dev import make_tiny_flux2_dev

        return make_tiny_flux2_dev(out_dir, seed=seed)

    def part_loaders(self, source: str, common: dict[str, Any]) -> dict[str, Callable[[], Any]]:
        """The `tokenizer/` part as Flux2Pipeline loads it (AutoProcessor: the real folder's PixtralProcessor, whose
        chat template the prompts go through; a folder with a tokenizer alone, as the tiny one, gives the tokenizer)."""
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Mistral3ForConditionalGeneration

        return {
            "transformer": lambda: Flux2Transformer2DModel.from_pretrained(source, subfolder="transformer", **common),
            "vae": lambda: AutoencoderKLFlux2.from_pretrained(source, subfolder="vae", **common),
            "text_encoder": lambda: Mistral3ForConditionalGeneration.from_pretrained(source, subfolder="text_encoder",
                                                                                     **common),
            "tokenizer": lambda: load_dev_processor(source, common),
        }

    def build_conditioner(self, components: dict[str, Any], tokenizer_repeats: int, clip_skip: int, *,
                          max_sequence_length: int | None = None, guidance: float | None = 1.0) -> Any:
        """Flux2Pipeline.encode_prompt (system message, chat template, hidden states 10, 20, 30) at
        `max_sequence_length` tokens (null: 512) and the embedded guidance `train.guidance`; tokenizer_repeats and
        clip_skip do not apply."""
        return Flux2Conditioner(dev_text_pipeline(components), max_sequence_length or MAX_SEQUENCE_LENGTH,
                                1.0 if guidance is None else guidance)

    def build_pipeline(self, components: dict[str, Any], scheduler: Any) -> Any:
        """Flux2Pipeline: guidance_scale is the embedded guidance (guidance-distilled; no negative prompt)."""
        from diffusers import Flux2Pipeline

        return Flux2Pipeline(scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
                             text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])

    def prompt_args(self, pipe: Any, prompts: list[str], neg_prompts: list[str], *, clip_skip: int,
                    all_prompts: list[str]) -> dict[str, Any]:
        """The prompts' states by the pipeline's encode_prompt; the negative prompt is not used (Flux2Pipeline has
        none) and `(word:1.2)` weights are read and dropped."""
        from hcpdiff.infer.prompt_weights import parse_prompt_weights

        plain = ["".join(text for text, _ in parse_prompt_weights(prompt)) for prompt in prompts]
        with torch.no_grad():
            return {"prompt_embeds": encode_prompts(pipe, plain, MAX_SEQUENCE_LENGTH, pipe.text_encoder.device)}
