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

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families.base import ConfigReader, Family, pipeline_text_encoder, to_module

PATCH = 2  # the pipeline patchifies 2x2 VAE cells into one 128-channel latent cell (= one token)
MAX_SEQUENCE_LENGTH = 512  # chat-templated prompt tokens: Flux2KleinPipeline.__call__'s default
# the deepest hidden state the pipeline reads (text_encoder_out_layers (9, 18, 27)): later Qwen3 layers are unused
DEEPEST_TEXT_LAYER = 27
# compute_empirical_mu depends on the number of sampling steps; training takes the pipeline's default 50 (a base
# model's; the distilled ones sample in 4 and are not what LoRAs train on)
MU_STEPS = 50


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


class Flux2Klein(Flux2Base):
    """FLUX.2 [klein] 4B / 9B text to image (`Flux2KleinPipeline`)."""

    name: ClassVar[str] = "flux2_klein"
    description: ClassVar[str] = "FLUX.2 [klein]"
    train_config: ClassVar[str] = "cfgs/train/examples/lora_flux2_klein.yaml"
    infer_config: ClassVar[str] = "cfgs/infer/text2img_flux2_klein.yaml"
    tiny_variants: ClassVar[tuple[str, ...]] = ("flux2_klein", "flux2_klein-distilled")

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
