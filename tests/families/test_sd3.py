"""Stable Diffusion 3 / 3.5 as a family: detection, its conditioner and prompt encoding as StableDiffusion3Pipeline's,
SD3's objective conventions (t = sigma * 1000, the scheduler's static shift, precondition_outputs), drop_t5, fp16's
warning, and one run of the shipped config (SD3.5 layout, without T5, a CLIP-G LoRA beside the transformer's) whose
loss falls, whose checkpoints hold the matched layers, whose LoRA the visualizer renders, and whose --to_diffusers
file StableDiffusion3Pipeline.load_lora_weights renders to the same image."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from family_data import (checkpoint_layers, diffusers_render, logged_losses, lora_renders, matched_layers,
                         quiet_pipeline, train_in, visualizer_render)
from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import FlowMatchingObjective, sample_sigmas, static_shift
from hcpdiff.train.specs import LossSpec

SD3 = family_named("sd3")


@pytest.fixture(scope="module")
def tiny_sd3(tiny_models) -> Path:
    return tiny_models("sd3")


@pytest.fixture(scope="module")
def tiny_sd35(tiny_models) -> Path:
    return tiny_models("sd3.5")


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


def test_tiny_models_are_detected_as_sd3_with_pixel_step_16(tiny_sd3, tiny_sd35):
    for folder in (tiny_sd3, tiny_sd35):
        index = json.loads((folder / "model_index.json").read_text())
        assert detect_family(index, folder_config_reader(folder), str(folder), "test") is SD3
        assert SD3.pixel_step(folder_config_reader(folder)) == 16  # VAE 8x, 2x2 patches inside the transformer
    parts = load_model_parts(str(tiny_sd35))
    assert parts.family is SD3 and parts.pixel_step == 16
    assert parts.transformer.config.qk_norm == "rms_norm" and parts.transformer.config.dual_attention_layers == [0]
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert SD3.latent_scale_shift(parts.vae) == (1.5305, 0.0609)  # SD3's VAE: scale and shift from its config


def test_conditioner_is_the_pipelines_encode_prompt(sd3_pipe):
    components = dict(sd3_pipe.components)
    prompts = ["a red circle", "a blue square on a long long table"]
    for clip_skip in (0, 1):
        conditioning = SD3.build_conditioner(components, 1, clip_skip)(prompts, {}, torch.device("cpu"))
        embeds, _, pooled, _ = sd3_pipe.encode_prompt(prompts, None, None, device="cpu",
                                                      do_classifier_free_guidance=False, clip_skip=clip_skip)
        assert torch.equal(conditioning["encoder_hidden_states"], embeds)
        assert torch.equal(conditioning["pooled_projections"], pooled)
    # 77 CLIP tokens (CLIP-L and CLIP-G side by side, zero-padded to T5's width) then 256 T5 tokens; both pooled
    assert embeds.shape == (2, 77 + 256, 96) and pooled.shape == (2, 32 + 48)
    assert torch.count_nonzero(embeds[:, :77, 80:]) == 0
    shorter = SD3.build_conditioner(components, 1, 0, max_sequence_length=64)
    assert shorter(prompts, {}, torch.device("cpu"))["encoder_hidden_states"].shape[1] == 77 + 64


def test_prompt_args_weight_clip_and_t5_states(sd3_pipe):
    plain = SD3.prompt_args(sd3_pipe, ["a red circle"], [""], clip_skip=0, all_prompts=["a red circle"])
    embeds, neg_embeds, pooled, neg_pooled = sd3_pipe.encode_prompt("a red circle", None, None, device="cpu",
                                                                    negative_prompt="")
    for ours, theirs in ((plain["prompt_embeds"], embeds), (plain["negative_prompt_embeds"], neg_embeds),
                         (plain["pooled_prompt_embeds"], pooled), (plain["negative_pooled_prompt_embeds"], neg_pooled)):
        assert torch.allclose(ours, theirs, atol=1e-5)  # the same tokens (no_grad vs grad kernels: the last bit)
    weighted = SD3.prompt_args(sd3_pipe, ["a (red:1.5) circle"], [""], clip_skip=0, all_prompts=["x"])
    assert torch.allclose(weighted["pooled_prompt_embeds"], pooled, atol=1e-5)  # pooled text is unweighted
    changed = (weighted["prompt_embeds"] - embeds).abs().amax(dim=-1)[0]
    assert changed[:77].max() > 1e-3 and changed[77:].max() > 1e-3  # both the CLIP and the T5 rows are weighted


def test_text_encoder_loras_train_through_the_conditioner(tiny_sd3):
    """lora_text_encoder / _2 / _3 (T5, when a config asks): each set_text_encoder index reaches its encoder."""
    from hcpdiff.lora import LoraGroupSpec, attach_lora

    parts = load_model_parts(str(tiny_sd3))
    conditioner = SD3.build_conditioner(parts.components, 1, 0)
    patterns = {"text_encoder": r"re:.*self_attn$", "text_encoder_2": r"re:.*self_attn$",
                "text_encoder_3": r"re:.*SelfAttention\.(q|v)$"}
    params, copies = {}, {}
    generator = torch.Generator().manual_seed(0)
    for index, (part, pattern) in enumerate(patterns.items()):
        # a copy stands in for the prepared (wrapped) module: only set_text_encoder can route prompts through it
        encoder = copy.deepcopy(parts.components[part]).requires_grad_(False)
        attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[pattern], rank=2)], part, f"lora_{part}")
        params[part] = [p for name, p in encoder.named_parameters() if "lora_A" in name]
        conditioner.set_text_encoder(encoder, index)
        copies[part] = encoder
        with torch.no_grad():  # lora_B starts at 0, which blocks lora_A's gradient; random, not constant: a
            # constant B adds the same value to every channel, which the next LayerNorm cancels exactly
            for name, param in encoder.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    conditioning = conditioner(["a red circle"], {}, torch.device("cpu"))
    adapted = StableDiffusion3Pipeline(**{**parts.components, **copies, "scheduler": parts.noise_scheduler})
    embeds, _, pooled, _ = adapted.encode_prompt("a red circle", None, None, device="cpu",
                                                 do_classifier_free_guidance=False)
    assert torch.equal(conditioning["encoder_hidden_states"], embeds)  # each copy sits in its own encoder's place
    assert torch.equal(conditioning["pooled_projections"], pooled)
    latents = torch.randn(1, 16, 4, 4, generator=generator)
    prediction = SD3.denoise(parts.transformer, latents, torch.tensor([0.5]), conditioning)
    prediction.square().mean().backward()
    for part, lora_params in params.items():
        assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params), part


def test_denoise_is_the_pipelines_transformer_call_at_sigma_times_1000(sd3_pipe):
    conditioning = SD3.build_conditioner(dict(sd3_pipe.components), 1, 0)(["a cat"] * 2, {}, torch.device("cpu"))
    latents = torch.randn(2, 16, 8, 6)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = SD3.denoise(sd3_pipe.transformer, latents, sigmas, conditioning)
        # StableDiffusion3Pipeline.__call__: timestep = the scheduler's timesteps = sigmas * num_train_timesteps
        theirs = sd3_pipe.transformer(hidden_states=latents, timestep=torch.tensor([300.0, 900.0]),
                                      encoder_hidden_states=conditioning["encoder_hidden_states"],
                                      pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
        at_sigma = sd3_pipe.transformer(hidden_states=latents, timestep=sigmas,
                                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
    assert ours.shape == latents.shape  # unpacked: the transformer patchifies itself
    assert torch.equal(ours, theirs) and not torch.allclose(ours, at_sigma, atol=1e-3)


def test_objective_shifts_statically_as_the_scheduler_does(sd3_pipe):
    scheduler = sd3_pipe.scheduler
    objective = SD3.build_objective(scheduler, LossSpec())
    assert isinstance(objective, FlowMatchingObjective)
    assert (objective.sigma_sampling, objective.shift, objective.shift_value) == ("logit_normal", "static", 3.0)
    # the shift formula is the one the scheduler applies when it sets its inference sigmas
    scheduler.set_timesteps(10)
    unshifted = torch.linspace(1.0, scheduler.sigma_min, 10)  # set_timesteps' sigmas before it shifts them
    assert torch.allclose(scheduler.sigmas[:-1], static_shift(unshifted, objective.shift_value), atol=1e-6)
    objective_uniform = FlowMatchingObjective.from_spec(scheduler, LossSpec(sigma_sampling="uniform"))
    torch.manual_seed(5)
    drawn = objective_uniform.sample_sigmas(torch.zeros(4, 16, 8, 8))
    torch.manual_seed(5)
    plain = sample_sigmas("uniform", 4)
    assert torch.allclose(drawn, 3.0 * plain / (1 + 2.0 * plain))
    # DDPM keys are refused in one error naming the family
    with pytest.raises(ConfigError, match=r"^train.loss.min_snr_gamma: .* but a Stable Diffusion 3 / 3.5 model"):
        SD3.build_objective(scheduler, LossSpec(min_snr_gamma=5.0))


def test_precondition_outputs_scores_the_implied_clean_latents():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatchingObjective.from_spec(scheduler, LossSpec(precondition_outputs=True, weighting="sigma_sqrt"))
    torch.manual_seed(0)
    latents = torch.randn(3, 16, 4, 4)
    noised = objective.noised(latents)
    sigmas = noised.timesteps
    assert torch.equal(noised.target, latents)
    prediction = torch.randn_like(latents)
    # diffusers' train_dreambooth_lora_sd3.py with --precondition_outputs, written out by hand
    s = sigmas.view(-1, 1, 1, 1)
    model_pred = prediction * (-s) + noised.noisy_latents
    weighting = (s ** -2.0).float()  # compute_loss_weighting_for_sd3("sigma_sqrt")
    expected = torch.mean((weighting * (model_pred - latents) ** 2).reshape(3, -1), 1).mean()
    assert torch.allclose(objective.loss(prediction, noised), expected, rtol=1e-5)
    # per sample, sigma^2 times the velocity loss (x0 error = sigma * velocity error): the same minimum
    plain = FlowMatchingObjective.from_spec(scheduler, LossSpec(precondition_outputs=True))
    velocity = FlowMatchingObjective.from_spec(scheduler, LossSpec())
    for row in range(3):
        one = slice(row, row + 1)
        x0_noised = type(noised)(noised.noisy_latents[one], sigmas[one], latents[one], None)
        v_noised = type(noised)(noised.noisy_latents[one], sigmas[one], (noised.noisy_latents[one] - latents[one]) / s[one],
                                None)  # noise - x0 = (x_t - x0) / sigma
        assert torch.allclose(plain.loss(prediction[one], x0_noised),
                              sigmas[row] ** 2 * velocity.loss(prediction[one], v_noised), rtol=1e-4)


def test_drop_t5_leaves_t5_out_and_fills_its_place_with_zeros(tiny_sd3, sd3_pipe):
    parts = load_model_parts(str(tiny_sd3), drop_t5=True)
    assert parts.text_encoder_3 is None and parts.tokenizer_3 is None and parts.text_encoder_2 is not None
    conditioning = SD3.build_conditioner(parts.components, 1, 0)(["a cat"], {}, torch.device("cpu"))
    without_t5 = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = without_t5.encode_prompt("a cat", None, None, device="cpu",
                                                    do_classifier_free_guidance=False)
    assert torch.equal(conditioning["encoder_hidden_states"], embeds)
    assert torch.count_nonzero(embeds[:, 77:]) == 0
    pipe = SD3.build_pipeline(parts.components, parts.noise_scheduler)
    args = SD3.prompt_args(pipe, ["a (cat:1.2)"], [""], clip_skip=0, all_prompts=["a cat"])
    assert torch.count_nonzero(args["prompt_embeds"][:, 77:]) == 0
    image = pipe(**args, height=32, width=32, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_drop_t5_on_a_family_without_an_optional_t5_is_one_error(tiny_model):
    with pytest.raises(ConfigError, match=r"^model.drop_t5: a Stable Diffusion 1.x / 2.x model has no T5"):
        load_model_parts(str(tiny_model), drop_t5=True)
    with pytest.raises(ConfigError, match=r"^drop_t5: a Stable Diffusion"):  # the visualizer's key
        load_model_parts(str(tiny_model), drop_t5=True, where="pretrained_model")


def test_fp16_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hcpdiff.train"):
        SD3.check_run("bf16")
        assert not caplog.records
        SD3.check_run("fp16")
    assert len(caplog.records) == 1 and "fp16" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------------------- one run of the shipped config
STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd35, cli_in_process) -> tuple[Path, Path]:
    """(model, experiment folder) of lora_sd3.yaml overfitting one image for 40 steps on the tiny SD3.5, without T5,
    with a CLIP-G LoRA beside the transformer's, run through the documented command (its entry point in-process)."""
    exp, _ = train_in(tmp_path_factory.mktemp("sd3_run"), cli_in_process, lambda data: [
        "-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_sd3.yaml",
        f"model.pretrained_model_name_or_path={tiny_sd35}", "model.drop_t5=true", "mixed_precision=null",
        f"data.dataset1.source.data_source1.img_root={data}", f"data.dataset1.source.data_source1.caption_file={data}",
        "train.workers=0", "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
        "data.dataset1.bucket.num_bucket=1", f"train.train_steps={STEPS}", "train.log_step=1", "train.save_step=1000",
        "transformer_lr=1e-2", "train.loss.logit_std=0.3",
        "lora_text_encoder_2=[{lr: 1e-3, rank: 4, layers: ['re:.*self_attn$']}]",
    ])
    return tiny_sd35, exp


@pytest.mark.e2e
def test_shipped_config_overfits_one_image_without_t5(trained):
    _, exp = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)


@pytest.mark.e2e
def test_checkpoints_hold_the_matched_layers(trained):
    _, exp = trained
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == [f"text_encoder_2-{STEPS}.safetensors",
                                                                  f"transformer-{STEPS}.safetensors"]
    for part in ("transformer", "text_encoder_2"):
        metadata, layers, ups = checkpoint_layers(exp / "ckpts" / f"{part}-{STEPS}.safetensors")
        assert (metadata["family"], metadata["part"]) == ("sd3", part)
        assert layers == matched_layers(exp, part)
        assert ups and all(torch.count_nonzero(up) > 0 for up in ups)  # every adapted layer trained
    transformer_layers = matched_layers(exp)
    assert "transformer_blocks.0.attn2.to_q" in transformer_layers  # SD3.5's dual attention
    assert "transformer_blocks.1.attn.add_k_proj" in transformer_layers
    assert not any("add_q_proj" in layer for layer in transformer_layers)


def render_with_diffusers(pipe: StableDiffusion3Pipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, seed 42, pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", negative_prompt="", guidance_scale=7.0)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    from hcpdiff.tools.lora_convert import main as lora_convert

    model, exp = trained
    transformer_lora, clip_g_lora = (exp / "ckpts" / f"{part}-{STEPS}.safetensors"
                                     for part in ("transformer", "text_encoder_2"))
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_sd3.yaml", model, transformer_lora,
                                 "drop_t5=true", f"lora_path_TE2={clip_g_lora}")

    converted = tmp_path / "pytorch_lora_weights.safetensors"
    assert lora_convert(["--to_diffusers", "--lora_path", str(transformer_lora), "--lora_path_TE2", str(clip_g_lora),
                         "--dump_path", str(converted)]) == 0
    keys = load_file(converted).keys()
    assert {key.split(".")[0] for key in keys} == {"transformer", "text_encoder_2"}
    loaded = quiet_pipeline(StableDiffusion3Pipeline, model, text_encoder_3=None, tokenizer_3=None)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1 and "text_encoder_2" in loaded.get_list_adapters()
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers


def test_to_webui_of_trainer_sd3_files_writes_kohya_sd3_names(tmp_path):
    """Files as the trainer writes them (peft's layers, the groups in the metadata) convert to kohya's SD3 names:
    the transformer in the original MMDiT layout (to_q alone fuses into x_block.attn.qkv), CLIP-G as lora_te2_."""
    from safetensors import safe_open

    from hcpdiff.lora import LoraGroupSpec, attach_lora
    from hcpdiff.lora.state_io import lora_metadata, lora_state_dict, save_lora
    from hcpdiff.tools.lora_convert import main as lora_convert
    from hcpdiff.tools.tiny_sd3 import CLIP_G_WIDTH, build_clip, build_sd3_transformer

    models = {"transformer": (build_sd3_transformer(sd35=False), r"re:.*\.attn\.to_q"),
              "text_encoder_2": (build_clip(CLIP_G_WIDTH, 600, 0, 1, 1), r"re:.*self_attn$")}
    for part, (model, pattern) in models.items():
        groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=[pattern], rank=2)], part, f"lora_{part}")
        save_lora(tmp_path / f"{part}-1.safetensors", lora_state_dict(model),
                  lora_metadata(part, "", groups, 1, family="sd3"))
    out = tmp_path / "webui.safetensors"
    # CLIP-G is text_encoder_2 as in SDXL, but the file says sd3: no "add --sdxl" detour
    assert lora_convert(["--to_webui", "--lora_path", str(tmp_path / "transformer-1.safetensors"), "--lora_path_TE2",
                         str(tmp_path / "text_encoder_2-1.safetensors"), "--dump_path", str(out)]) == 0
    with safe_open(out, framework="pt") as opened:
        layers, metadata = {key.split(".")[0] for key in opened.keys()}, opened.metadata()
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_x_block_attn_qkv",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"} <= layers
    assert not any("to_q" in layer for layer in layers)
    assert metadata["modelspec.architecture"] == "stable-diffusion-3/lora"  # no base model folder to tell the type
