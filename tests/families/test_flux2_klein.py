"""FLUX.2 [klein] as a family: detection (base and distilled layouts; FLUX.2 [dev] and the inpaint pipeline are not
it), its conditioner as Flux2KleinPipeline's encode_prompt (every prompt padded to the same fixed length), latents as
the pipeline patchifies and batch-normalises them, the conditioner and denoiser equal to what a real pipeline call feeds
its transformer (recorded), a batch of prompts of different lengths training as its samples one by one, the
pipeline's empirical shift, fp16 refused, and one run of the shipped config whose loss falls and whose LoRA the
visualizer renders as Flux2KleinPipeline.load_lora_weights renders the --to_diffusers file (and the --to_webui kohya
file, but for the layers diffusers' kohya reader leaves out)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from safetensors.torch import load_file

from family_data import (CPU, LONG, REPO_ROOT, SHORT, batch_and_alone_losses, diffusers_render, fixed_noise_losses,
                         flag_renders, logged_losses, lora_convert_run, lora_renders, overfit_args, partial_lora,
                         quiet_pipeline, random_lora_ups, to_diffusers, train_in, transformer_calls, visualizer_render)
from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import sample_sigmas
from hcpdiff.train.specs import LossSpec

KLEIN = family_named("flux2_klein")


@pytest.fixture(scope="module")
def tiny_klein(tiny_models) -> Path:
    return tiny_models("flux2_klein")


@pytest.fixture(scope="module")
def klein_pipe(tiny_klein) -> Flux2KleinPipeline:
    return quiet_pipeline(Flux2KleinPipeline, tiny_klein)


def test_tiny_models_are_detected_as_klein_and_a_distilled_one_is_warned_about(tiny_klein, klein_pipe, tmp_path):
    index = json.loads((tiny_klein / "model_index.json").read_text())
    read = folder_config_reader(tiny_klein)
    assert detect_family(index, read, str(tiny_klein), "test") is KLEIN
    for other in ("Flux2Pipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"):
        assert not KLEIN.matches({"_class_name": other}, read)
    assert KLEIN.matches({}, read)  # no model_index.json: the transformer config without a guidance embedding
    parts = load_model_parts(str(tiny_klein))
    assert parts.family is KLEIN and parts.pixel_step == 16 == klein_pipe.vae_scale_factor * 2
    assert type(parts.text_encoder).__name__ == "Qwen3ForCausalLM" and index["is_distilled"] is False
    assert parts.pipeline_settings == {"is_distilled": False} and KLEIN.pipeline_warnings(parts.pipeline_settings) == []
    distilled = load_model_parts(str(KLEIN.make_tiny(tmp_path / "distilled", variant="flux2_klein-distilled")))
    assert distilled.pipeline_settings == {"is_distilled": True}  # model_index.json's; nothing else tells them apart
    assert dict(distilled.noise_scheduler.config) == dict(parts.noise_scheduler.config)
    (warning,) = KLEIN.pipeline_warnings(distilled.pipeline_settings)
    assert warning.startswith("this looks like a step-distilled FLUX.2 [klein]")
    assert "train on the base klein" in warning
    # Qwen3's layers after the deepest state the pipeline reads (27) and the LM head never reach the transformer
    unused = KLEIN.unused_layers("text_encoder", parts.text_encoder)
    assert "lm_head" in unused and "model.layers.27.mlp.down_proj" in unused
    assert not any(name.startswith("model.layers.26.") for name in unused)
    assert KLEIN.unused_layers("transformer", parts.transformer) == frozenset()


def test_conditioner_is_the_pipelines_encode_prompt_at_a_fixed_length(klein_pipe):
    conditioner = KLEIN.build_conditioner(dict(klein_pipe.components), 1, 0)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    expected, _ = klein_pipe.encode_prompt([SHORT, LONG], device=CPU)
    assert conditioning.keys() == {"encoder_hidden_states"}
    assert torch.equal(conditioning["encoder_hidden_states"], expected)
    assert expected.shape == (2, 512, 3 * klein_pipe.text_encoder.config.hidden_size)  # layers 9, 18, 27 side by side
    cut = KLEIN.build_conditioner(dict(klein_pipe.components), 1, 0, max_sequence_length=64)([LONG], {}, CPU)
    assert cut["encoder_hidden_states"].shape[1] == 64


def test_text_encoder_lora_trains_through_the_conditioner(tiny_klein):
    """lora_text_encoder on Qwen3: the layers after hidden state 27 are left out of a group's matches, set_text_encoder
    routes prompts through the adapted (wrapped) encoder, and its LoRA gets gradients from the transformer's output."""
    import copy

    from hcpdiff.lora import LoraGroupSpec, attach_lora

    parts = load_model_parts(str(tiny_klein))
    encoder = copy.deepcopy(parts.text_encoder).requires_grad_(False)
    (group,) = attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:model\.layers\.\d+\.self_attn\.q_proj"],
                                                   rank=2)],
                           "text_encoder", "lora_text_encoder", KLEIN.unused_layers("text_encoder", encoder))
    assert sorted(int(layer.split(".")[2]) for layer in group.layers) == list(range(27))
    generator = torch.Generator().manual_seed(0)
    random_lora_ups(encoder, generator)
    conditioner = KLEIN.build_conditioner(parts.components, 1, 0, max_sequence_length=32)
    conditioner.set_text_encoder(encoder)
    conditioning = conditioner([SHORT], {}, CPU)
    plain = KLEIN.build_conditioner(parts.components, 1, 0, max_sequence_length=32)([SHORT], {}, CPU)
    assert not torch.allclose(conditioning["encoder_hidden_states"], plain["encoder_hidden_states"])
    prediction = KLEIN.denoise(parts.transformer, torch.randn(1, 128, 2, 2, generator=generator), torch.tensor([0.5]),
                               conditioning)
    prediction.square().mean().backward()
    lora_params = [p for name, p in encoder.named_parameters() if "lora_A" in name]
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)


def test_latents_are_patchified_and_batch_normed_as_the_pipeline_makes_them(klein_pipe):
    vae = klein_pipe.vae
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    mean, std = KLEIN.encode_latent_dist(vae, pixels)
    with torch.no_grad():
        theirs = klein_pipe._encode_vae_image(pixels, generator=None)  # the mode (= mean), as for reference images
        raw = vae.encode(pixels).latent_dist
    assert mean.shape == std.shape == (1, 128, 2, 3)
    assert torch.allclose(mean, theirs, atol=1e-6)
    assert not torch.allclose(vae.bn.running_mean, torch.zeros(128))  # the tiny VAE's statistics are not 0 / 1
    # Flux2KleinPipeline.__call__ before vae.decode: latents * bn_std + bn_mean, then _unpatchify_latents
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    decoded_side = klein_pipe._unpatchify_latents(mean * bn_std + vae.bn.running_mean.view(1, -1, 1, 1))
    assert torch.allclose(decoded_side, raw.mean, atol=1e-5)
    assert torch.allclose(klein_pipe._unpatchify_latents(std * bn_std), raw.std, atol=1e-5)


def test_conditioner_and_denoise_are_what_the_pipeline_feeds_its_transformer(klein_pipe):
    _, seen = transformer_calls(klein_pipe, prompt=LONG, height=64, width=48, guidance_scale=1.0)  # no guidance
    kwargs, sigma = seen["kwargs"], klein_pipe.scheduler.sigmas[1]
    conditioning = KLEIN.build_conditioner(dict(klein_pipe.components), 1, 0)([LONG], {}, CPU)
    assert torch.equal(conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    assert kwargs["guidance"] is None
    # the loop's timestep is t / 1000: the step's sigma (up to the fp32 rounding of t = sigma * 1000)
    assert torch.allclose(kwargs["timestep"], sigma.expand(1), atol=1e-6)
    ids = kwargs["img_ids"]
    noisy = Flux2KleinPipeline._unpack_latents_with_ids(kwargs["hidden_states"], ids, 4, 3)  # 64 x 48 px / 16
    with torch.no_grad():
        prediction = KLEIN.denoise(klein_pipe.transformer, noisy, kwargs["timestep"], conditioning)
    assert prediction.shape == (1, 128, 4, 3)
    assert torch.equal(Flux2KleinPipeline._pack_latents(prediction), seen["output"])
    assert torch.equal(Flux2KleinPipeline._prepare_latent_ids(noisy), ids)


def test_a_batch_of_prompts_of_different_lengths_trains_as_its_samples_one_by_one(klein_pipe):
    """Every prompt is padded to the same 512 tokens (the pipeline's own padding, which the transformer attends to
    unmasked, at inference too): a batch is its rows side by side, so its losses are the samples' alone."""
    conditioner = KLEIN.build_conditioner(dict(klein_pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 2, 3, generator=generator)
    noise = torch.randn(2, 128, 2, 3, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched, alone = batch_and_alone_losses(KLEIN, klein_pipe.transformer, conditioner, [SHORT, LONG], latents, noise,
                                            sigmas)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)
    assert not torch.allclose(alone[0], alone[1])


def test_objective_shifts_sigmas_by_the_pipelines_empirical_mu(klein_pipe):
    objective = KLEIN.build_objective(klein_pipe.scheduler, LossSpec(sigma_sampling="uniform"))
    assert objective.shift == "resolution"  # the scheduler shifts dynamically
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(torch.zeros(4, 128, 8, 6))
    torch.manual_seed(3)
    mu = compute_empirical_mu(image_seq_len=48, num_steps=50)
    assert torch.allclose(drawn, klein_pipe.scheduler.time_shift(mu, 1.0, sample_sigmas("uniform", 4)))
    # Flux2KleinPipeline's sampling sigmas at its default 50 steps are the same shift of linspace(1, 1/n, n)
    plain = np.linspace(1.0, 1 / 50, 50)
    klein_pipe.scheduler.set_timesteps(sigmas=plain, mu=mu)
    assert torch.allclose(klein_pipe.scheduler.sigmas[:-1],
                          objective.scheduler.time_shift(mu, 1.0, torch.tensor(plain, dtype=torch.float32)), atol=1e-6)


def test_fp16_is_refused():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows FLUX.2"):
        KLEIN.check_run("fp16")
    KLEIN.check_run("bf16")


def test_shipped_config_adapts_every_block_linear_of_the_transformer(klein_pipe):
    """lora_flux2_klein.yaml's patterns, on the real module names: every Linear of the double- and single-stream
    blocks (attention and MLPs; the single blocks' fused qkv + MLP input), nothing outside them."""
    from omegaconf import OmegaConf

    from hcpdiff.lora.layer_select import select_layers

    patterns = OmegaConf.load(REPO_ROOT / KLEIN.train_config).lora_transformer[0].layers
    chosen = set(select_layers(klein_pipe.transformer, list(patterns), "lora_transformer[0].layers"))
    block_linears = {name for name, module in klein_pipe.transformer.named_modules()
                     if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name}
    assert chosen == block_linears and len(chosen) == 2 * 12 + 4 * 2
    assert {name.split(".", 2)[2] for name in chosen if name.startswith("single_")} == {
        "attn.to_qkv_mlp_proj", "attn.to_out"}


def train_args(model: Path, data: Path, steps: int) -> list[str]:
    """The documented command on lora_flux2_klein.yaml, fp32 on the CPU, one 64 px bucket, rank 4, prompts padded to 64
    tokens instead of 512 (CPU time), a LoRA on every Linear of the transformer (`''`): the tiny random model's blocks
    alone cannot move its output in a few steps (the final LayerNorm and the frozen output projection hold its size and
    span), so a blocks-only LoRA would show no progress."""
    return overfit_args("cfgs/train/examples/lora_flux2_klein.yaml", model, data, steps, "model.max_sequence_length=64",
                        "lora_transformer.0.layers=['']")


STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_klein, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, its LoRA by lora_convert --to_diffusers) of lora_flux2_klein.yaml overfitting one
    image for STEPS steps on the tiny model."""
    workdir = tmp_path_factory.mktemp("klein_run")
    exp, _ = train_in(workdir, cli_in_process, lambda data: train_args(tiny_klein, data, STEPS))
    converted = to_diffusers(exp / "ckpts" / f"transformer-{STEPS}.safetensors",
                             workdir / "pytorch_lora_weights.safetensors")
    return tiny_klein, exp, converted


@pytest.mark.e2e
def test_shipped_config_overfits_one_image(trained):
    model, exp, converted = trained
    assert "distilled" not in (exp / "train.log").read_text()
    assert len(logged_losses(exp, STEPS)) == STEPS
    data = exp.parents[1] / "data"
    image, prompt = Image.open(data / "0.png"), (data / "0.txt").read_text().strip()
    pipe = Flux2KleinPipeline.from_pretrained(model)
    before, after = fixed_noise_losses(KLEIN, pipe, converted, image, prompt, max_sequence_length=64)
    assert after < 0.95 * before, (before, after)


def render_with_diffusers(pipe: Flux2KleinPipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, guidance 2.5 against the
    empty prompt, seed 42, pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", guidance_scale=2.5)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, converted = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_flux2_klein.yaml",
                                 model, lora, "infer_args.guidance_scale=2.5")

    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    loaded = quiet_pipeline(Flux2KleinPipeline, model)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers


@pytest.mark.e2e
def test_to_webui_kohya_file_renders_as_the_to_diffusers_one(trained, tmp_path, cli_in_process):
    """The trained LoRA as a kohya / ComfyUI file (all of it: --from_webui gives it back), and its layers that
    diffusers' kohya FLUX.2 reader takes (all but the global modulation and the final adaLN) render as the
    --to_diffusers file of the same."""
    model, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    webui = tmp_path / "webui.safetensors"
    note = lora_convert_run(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(lora), "--dump_path", str(webui))
    assert "leaves out double_stream_modulation_img.lin" in note
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in load_file(webui)
    lora_convert_run(cli_in_process, tmp_path, "--from_webui", "--lora_path", str(webui), "--dump_path",
                     str(tmp_path / "back"))
    (restored,) = (tmp_path / "back").glob("transformer-*.safetensors")
    original, back = load_file(lora), load_file(restored)
    assert back.keys() == original.keys() and all(torch.allclose(back[k], original[k], atol=1e-6) for k in original)

    partial = partial_lora(lora, lambda key: "modulation" not in key and "norm_out" not in key, tmp_path / "partial")
    loaded = quiet_pipeline(Flux2KleinPipeline, model)
    base, renders = render_with_diffusers(loaded), flag_renders(partial, loaded, render_with_diffusers)
    assert np.abs(renders[0] - base).mean() > 1  # the LoRA changes the image
    assert np.abs(renders[0] - renders[1]).max() <= 1


@pytest.mark.e2e
def test_a_distilled_run_says_once_at_start_to_train_on_the_base(tmp_path, cli_in_process):
    model = KLEIN.make_tiny(tmp_path / "distilled", variant="flux2_klein-distilled")
    exp, stderr = train_in(tmp_path, cli_in_process, lambda data: train_args(model, data, 1))
    warnings = [line for line in stderr.splitlines() if "step-distilled FLUX.2 [klein]" in line]
    assert len(warnings) == 1 and "train on the base klein" in warnings[0], stderr[-3000:]
    log = (exp / "train.log").read_text()
    assert log.count("step-distilled FLUX.2 [klein]") == 1
