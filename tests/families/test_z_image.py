"""Z-Image as a family: detection (base and Turbo), its conditioner as ZImagePipeline's encode_prompt (one
variable-length caption per prompt, carried padded with its mask, text-cached per prompt), a batch of prompts of
different lengths training exactly as its samples one by one, the denoiser called as the pipeline's sampling loop calls
it (timestep 1 - sigma, output negated) with the static shift of its scheduler, guidance_scale as the pipeline's minus
one, (word:1.2) weights, fp16 refused, Turbo's one warning line at start, and one run of the shipped config whose
loss falls, whose checkpoint holds the matched layers, and whose LoRA the visualizer renders as
ZImagePipeline.load_lora_weights renders the --to_diffusers file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from safetensors.torch import load_file

from family_data import (CPU, LONG, SHORT, checkpoint_layers, diffusers_render, logged_losses, lora_renders,
                         matched_layers, overfit_args, per_sample_losses, quiet_pipeline, random_lora_ups,
                         to_diffusers, train_in, visualizer_render)
from hcpdiff.data.tensor_store import TensorStore
from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import sample_sigmas, static_shift
from hcpdiff.train.specs import LossSpec
from hcpdiff.train.text_cache import CachedConditioner, can_cache_text

Z_IMAGE = family_named("z_image")


@pytest.fixture(scope="module")
def tiny_z_image(tiny_models) -> Path:
    return tiny_models("z_image")


@pytest.fixture(scope="module")
def z_pipe(tiny_z_image) -> ZImagePipeline:
    return quiet_pipeline(ZImagePipeline, tiny_z_image)


def encode_prompt(pipe: ZImagePipeline, prompts: list[str]) -> list[torch.Tensor]:
    """The pipeline's own encoding (on a copy: encode_prompt rewrites the list it is given)."""
    return pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)[0]


def test_tiny_models_are_detected_as_z_image_and_turbo_warns_once(tiny_z_image, z_pipe, tmp_path):
    index = json.loads((tiny_z_image / "model_index.json").read_text())
    assert detect_family(index, folder_config_reader(tiny_z_image), str(tiny_z_image), "test") is Z_IMAGE
    assert not Z_IMAGE.matches({"_class_name": "ZImageImg2ImgPipeline"}, folder_config_reader(tiny_z_image))
    parts = load_model_parts(str(tiny_z_image))
    assert parts.family is Z_IMAGE and parts.pixel_step == 16 == z_pipe.vae_scale_factor * 2
    assert type(parts.text_encoder).__name__ == "Qwen3Model" and index["text_encoder"] == ["transformers", "Qwen3Model"]
    # the chat template renders a prompt as Qwen3's does for the pipeline's one user message
    tokens = z_pipe.tokenizer.tokenize(z_pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": SHORT}], tokenize=False, add_generation_prompt=True, enable_thinking=True))
    assert tokens == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcircle", "<|im_end|>", "Ċ", "<|im_start|>",
                      "assistant", "Ċ"]
    assert Z_IMAGE.run_warnings(parts.noise_scheduler) == []  # the base model (shift 6)
    turbo = load_model_parts(str(Z_IMAGE.make_tiny(tmp_path / "turbo", variant="z_image-turbo")))
    assert turbo.family is Z_IMAGE and turbo.noise_scheduler.config.shift == 3.0
    (warning,) = Z_IMAGE.run_warnings(turbo.noise_scheduler)
    assert warning.startswith("this looks like Z-Image-Turbo") and "train on the base Z-Image" in warning


def test_conditioner_is_the_pipelines_encode_prompt_with_a_mask(z_pipe):
    conditioner = Z_IMAGE.build_conditioner(dict(z_pipe.components), 1, 0)
    prompts = [SHORT, LONG]
    conditioning = conditioner(prompts, {}, CPU)
    assert prompts == [SHORT, LONG]  # the pipeline rewrites its argument; the conditioner hands it a copy
    captions = encode_prompt(z_pipe, [SHORT, LONG])
    lengths = conditioning["cap_mask"].sum(dim=1).tolist()
    assert lengths == [len(caption) for caption in captions] and lengths[0] < lengths[1]
    assert conditioning["cap_feats"].shape[1] == lengths[1]
    for row, mask, caption in zip(conditioning["cap_feats"], conditioning["cap_mask"], captions):
        assert torch.equal(row[mask.bool()], caption) and not bool(row[~mask.bool()].any())
    cut = Z_IMAGE.build_conditioner(dict(z_pipe.components), 1, 0, max_sequence_length=8)([LONG], {}, CPU)
    assert cut["cap_feats"].shape[1] == 8


def test_text_cache_keeps_each_prompts_own_tokens_and_pads_them_per_batch(z_pipe, tmp_path):
    conditioner = Z_IMAGE.build_conditioner(dict(z_pipe.components), 1, 0)
    assert can_cache_text(conditioner)
    cached = CachedConditioner(conditioner, identity="tiny-z-image")
    cached.add([SHORT, LONG], TensorStore(tmp_path / "text_embeds", what="text cache"))
    assert cached.fill(CPU).encoded == 2
    for prompts in ([SHORT], [LONG, SHORT], [SHORT, LONG, SHORT]):
        from_cache, direct = cached(prompts, {}, CPU), conditioner(prompts, {}, CPU)
        assert torch.equal(from_cache["cap_mask"], direct["cap_mask"])
        assert torch.allclose(from_cache["cap_feats"], direct["cap_feats"], atol=1e-5)


def test_text_encoder_lora_trains_through_the_conditioner(tiny_z_image):
    """lora_text_encoder on Qwen3: set_text_encoder routes prompts through the adapted (wrapped) encoder and its LoRA
    gets gradients from the transformer's loss (the last layer is unused: the pipeline reads the penultimate state)."""
    import copy

    from hcpdiff.lora import LoraGroupSpec, attach_lora

    parts = load_model_parts(str(tiny_z_image))
    encoder = copy.deepcopy(parts.text_encoder).requires_grad_(False)
    attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:layers\.[01]\.self_attn$"], rank=2)],
                "text_encoder", "lora_text_encoder")
    generator = torch.Generator().manual_seed(0)
    random_lora_ups(encoder, generator)
    lora_params = [p for name, p in encoder.named_parameters() if "lora_A" in name]
    conditioner = Z_IMAGE.build_conditioner(parts.components, 1, 0)
    conditioner.set_text_encoder(encoder)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    plain = Z_IMAGE.build_conditioner(parts.components, 1, 0)([SHORT, LONG], {}, CPU)
    assert not torch.allclose(conditioning["cap_feats"], plain["cap_feats"])
    prediction = Z_IMAGE.denoise(parts.transformer, torch.randn(2, 16, 4, 4, generator=generator),
                                 torch.tensor([0.5, 0.5]), conditioning)
    prediction.square().mean().backward()
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)


def test_a_batch_of_prompts_of_different_lengths_trains_as_its_samples_one_by_one(z_pipe):
    conditioner = Z_IMAGE.build_conditioner(dict(z_pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 6, generator=generator)
    noise = torch.randn(2, 16, 4, 6, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched_conditioning = conditioner([SHORT, LONG], {}, CPU)
    batched = per_sample_losses(Z_IMAGE, z_pipe.transformer, batched_conditioning, latents, noise, sigmas)
    alone = torch.cat([per_sample_losses(Z_IMAGE, z_pipe.transformer, conditioner([prompt], {}, CPU),
                                         latents[i:i + 1], noise[i:i + 1], sigmas[i:i + 1])
                       for i, prompt in enumerate((SHORT, LONG))])
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)
    # the test can fail: without the mask the short prompt's caption keeps its padding and its loss changes
    unmasked = {**batched_conditioning, "cap_mask": torch.ones_like(batched_conditioning["cap_mask"])}
    unmasked_losses = per_sample_losses(Z_IMAGE, z_pipe.transformer, unmasked, latents, noise, sigmas)
    assert not torch.allclose(unmasked_losses[0], alone[0], rtol=1e-4)
    assert torch.allclose(unmasked_losses[1], alone[1], rtol=1e-5, atol=1e-6)


def test_denoise_is_the_transformer_as_the_sampling_loop_calls_it(z_pipe):
    conditioner = Z_IMAGE.build_conditioner(dict(z_pipe.components), 1, 0)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    z_pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(4))
    t = z_pipe.scheduler.timesteps[1].expand(2)  # sigma * 1000, as the loop's t
    sigmas = t / 1000
    with torch.no_grad():
        ours = Z_IMAGE.denoise(z_pipe.transformer, latents, sigmas, conditioning)
        # ZImagePipeline.__call__: one [C, 1, H, W] frame and one caption per sample, timestep (1000 - t) / 1000 (that
        # is 1 - sigma, up to fp32 rounding), noise_pred = -output
        output = z_pipe.transformer(list(latents.unsqueeze(2).unbind(0)), 1 - sigmas,
                                    encode_prompt(z_pipe, [SHORT, LONG]), return_dict=False)[0]
    assert torch.equal(ours, -torch.stack(output).squeeze(2))
    assert torch.allclose((1000 - t) / 1000, 1 - sigmas, atol=1e-7)


def euler_render(pipe: ZImagePipeline, latents: torch.Tensor, prompts: list[str], steps: int,
                 guidance_scale: float) -> torch.Tensor:
    """The pipeline's sampling, by the family: Euler steps along `denoise` over the scheduler's sigmas, with the usual
    classifier-free guidance (neg + s (pos - neg), against empty prompts) when guidance_scale > 1."""
    conditioner = Z_IMAGE.build_conditioner(dict(pipe.components), 1, 0)
    positive, negative = conditioner(prompts, {}, CPU), conditioner([""] * len(prompts), {}, CPU)
    pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps))
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            velocity = Z_IMAGE.denoise(pipe.transformer, latents, sigma.expand(len(prompts)), positive)
            if guidance_scale > 1:
                unguided = Z_IMAGE.denoise(pipe.transformer, latents, sigma.expand(len(prompts)), negative)
                velocity = unguided + guidance_scale * (velocity - unguided)
            latents = latents + (next_sigma - sigma) * velocity
    return latents


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_euler_steps_along_denoise_are_the_pipelines_sampling(z_pipe, guidance_scale):
    """The sign and the timestep of `denoise` (and guidance_scale's meaning) as ZImagePipeline samples: its latents
    after 3 steps are the family's."""
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    call_args = Z_IMAGE.pipeline_call_args({"height": 32, "width": 32, "num_inference_steps": 3,
                                            "guidance_scale": guidance_scale})
    assert call_args["guidance_scale"] == guidance_scale - 1  # ZImagePipeline's pos + s (pos - neg)
    theirs = z_pipe(prompt=[SHORT, LONG], latents=latents.clone(), output_type="latent", **call_args).images
    ours = euler_render(z_pipe, latents, [SHORT, LONG], 3, guidance_scale)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_objective_shifts_sigmas_as_the_scheduler_samples_them(z_pipe):
    objective = Z_IMAGE.build_objective(z_pipe.scheduler, LossSpec(sigma_sampling="uniform"))
    assert (objective.shift, objective.shift_value) == ("static", 6.0)  # Z-Image's scheduler config
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(torch.zeros(4, 16, 8, 8))
    torch.manual_seed(3)
    assert torch.allclose(drawn, static_shift(sample_sigmas("uniform", 4), 6.0))
    # ZImagePipeline's sampling sigmas are the same shift of linspace(1, 1/n, n)
    z_pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(5))
    assert torch.allclose(z_pipe.scheduler.sigmas[:-1], static_shift(torch.linspace(1, 1 / 5, 5), 6.0), atol=1e-6)


def test_latents_are_scaled_and_shifted_as_the_pipeline_unscales_them(z_pipe):
    vae = z_pipe.vae
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    mean, _ = Z_IMAGE.encode_latent_dist(vae, pixels)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
    # ZImagePipeline.__call__ before vae.decode: latents / scaling_factor + shift_factor
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert torch.allclose(mean / vae.config.scaling_factor + vae.config.shift_factor, raw, atol=1e-5)


def test_prompt_args_are_encode_prompts_and_weight_the_weighted_tokens(z_pipe):
    args = Z_IMAGE.prompt_args(z_pipe, [SHORT, LONG], ["", ""], clip_skip=0, all_prompts=[SHORT, LONG])
    captions, negative = encode_prompt(z_pipe, [SHORT, LONG]), encode_prompt(z_pipe, ["", ""])
    assert all(torch.equal(a, b) for a, b in zip(args["prompt_embeds"], captions))
    assert all(torch.equal(a, b) for a, b in zip(args["negative_prompt_embeds"], negative))
    weighted = Z_IMAGE.prompt_args(z_pipe, ["a (red:1.5) circle", LONG], ["", ""], clip_skip=0, all_prompts=[])
    assert weighted["prompt_embeds"][0].shape == captions[0].shape  # the same tokens
    assert torch.allclose(weighted["prompt_embeds"][1], captions[1], atol=1e-6)  # an unweighted row stays
    # row 0: " red" (token 4 after <|im_start|> user \n a) scaled 1.5 against the others, then rescaled to its mean
    ratio = weighted["prompt_embeds"][0] / captions[0]
    scale = ratio[0].median()
    others = torch.cat([ratio[:4], ratio[5:]])
    assert torch.allclose(others, scale.expand(others.shape), rtol=1e-3)
    assert torch.allclose(ratio[4], 1.5 * scale.expand(ratio.shape[1]), rtol=1e-3)


def test_fp16_is_refused():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows Z-Image"):
        Z_IMAGE.check_run("fp16")
    Z_IMAGE.check_run("bf16")


def train_args(model: Path, data: Path, steps: int) -> list[str]:
    """The documented command on lora_z_image.yaml, fp32 on the CPU, one 64 px bucket, rank 4."""
    return overfit_args("cfgs/train/examples/lora_z_image.yaml", model, data, steps)


STEPS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_z_image, cli_in_process) -> tuple[Path, Path, str]:
    """(model, experiment folder, stderr) of lora_z_image.yaml overfitting one image for STEPS steps on the tiny
    model."""
    exp, stderr = train_in(tmp_path_factory.mktemp("z_image_run"), cli_in_process,
                           lambda data: train_args(tiny_z_image, data, STEPS))
    return tiny_z_image, exp, stderr


@pytest.mark.e2e
def test_shipped_config_overfits_one_image_without_a_distillation_warning(trained):
    _, exp, stderr = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, (first, last)
    assert "distilled" not in stderr


@pytest.mark.e2e
def test_checkpoint_holds_the_matched_layers(trained):
    _, exp, _ = trained
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == [f"transformer-{STEPS}.safetensors"]
    metadata, layers, ups = checkpoint_layers(exp / "ckpts" / f"transformer-{STEPS}.safetensors")
    assert (metadata["family"], metadata["part"]) == ("z_image", "transformer")
    matched = matched_layers(exp)
    assert layers == matched
    assert ups and all(torch.count_nonzero(up) > 0 for up in ups)  # every adapted layer trained
    assert len(matched) == 30 * 7 and {layer.split(".", 2)[2] for layer in matched} == {
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
        "feed_forward.w2", "feed_forward.w3"}


@pytest.mark.e2e
def test_a_turbo_run_says_once_at_start_to_train_on_the_base(tmp_path, cli_in_process):
    model = Z_IMAGE.make_tiny(tmp_path / "turbo", variant="z_image-turbo")
    exp, stderr = train_in(tmp_path, cli_in_process, lambda data: train_args(model, data, 1))
    warnings = [line for line in stderr.splitlines() if "Z-Image-Turbo" in line]
    assert len(warnings) == 1 and "train on the base Z-Image" in warnings[0], stderr[-3000:]
    log = (exp / "train.log").read_text()
    assert log.count("this looks like Z-Image-Turbo") == 1  # beside the model line, in the run's own log too


def render_with_diffusers(pipe: ZImagePipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, its guidance_scale 1.5
    (hcpdiff's 2.5) against the empty negative prompt, seed 42, pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", negative_prompt="", guidance_scale=1.5)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_z_image.yaml",
                                 model, lora, "infer_args.guidance_scale=2.5")

    converted = tmp_path / "pytorch_lora_weights.safetensors"
    to_diffusers(lora, converted)
    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    loaded = quiet_pipeline(ZImagePipeline, model)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers
