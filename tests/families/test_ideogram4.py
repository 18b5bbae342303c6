"""Ideogram 4 as a family: detection (and no other family's folder taken, nor its taken by another), its conditioner
as Ideogram4Pipeline's encode_prompt (left padding cut: a prompt's features do not depend on it), latents that the
pipeline's own decoding turns back into the image, the conditioner and denoiser equal to what a real pipeline call
feeds its conditional transformer (recorded), a batch of prompts of different lengths training as its samples one by
one, the pipeline's resolution-aware schedule mean as the default shift, and one run of the shipped config whose loss
falls and whose LoRA the visualizer renders as Ideogram4Pipeline.load_lora_weights renders the --to_diffusers file
(and the --to_webui file in ComfyUI's names)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Ideogram4Pipeline
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu
from PIL import Image
from safetensors.torch import load_file

from family_data import (CPU, LONG, REPO_ROOT, SHORT, batch_and_alone_losses, diffusers_render, fixed_noise_losses,
                         flag_renders, logged_losses, lora_convert_run, lora_renders, overfit_args, partial_lora,
                         quiet_pipeline, random_lora_ups, to_diffusers, train_in, transformer_calls, visualizer_render)
from hcpdiff.errors import ConfigError
from hcpdiff.families import FAMILIES, detect_family, family_named, folder_config_reader
from hcpdiff.families.ideogram4 import pack, unpack
from hcpdiff.models import load_model_parts
from hcpdiff.train.specs import LossSpec

IDEOGRAM = family_named("ideogram4")


@pytest.fixture(scope="module")
def tiny_ideogram(tiny_models) -> Path:
    return tiny_models("ideogram4")


@pytest.fixture(scope="module")
def ideogram_pipe(tiny_ideogram) -> Ideogram4Pipeline:
    return quiet_pipeline(Ideogram4Pipeline, tiny_ideogram)


def test_tiny_model_is_detected_as_ideogram4_and_no_other_family_takes_it(tiny_ideogram):
    index = json.loads((tiny_ideogram / "model_index.json").read_text())
    read = folder_config_reader(tiny_ideogram)
    assert detect_family(index, read, str(tiny_ideogram), "test") is IDEOGRAM
    assert [f.name for f in FAMILIES if f.matches(index, read)] == ["ideogram4"]
    assert [f.name for f in FAMILIES if f.matches({}, read)] == ["ideogram4"]  # no model_index.json: the transformer
    for other in ("Flux2KleinPipeline", "ZImagePipeline", "QwenImagePipeline", "FluxPipeline"):
        assert not IDEOGRAM.matches({"_class_name": other}, read)
    parts = load_model_parts(str(tiny_ideogram))
    assert parts.family is IDEOGRAM and parts.pixel_step == 16
    assert type(parts.text_encoder).__name__ == "Qwen3VLModel"
    assert parts.components["unconditional_transformer"] is not None and parts.pipeline_settings == {}
    # the vision tower never runs for text to image: a text-encoder LoRA leaves it out
    unused = IDEOGRAM.unused_layers("text_encoder", parts.text_encoder)
    assert unused and all(name.startswith("visual.") for name in unused)
    assert IDEOGRAM.unused_layers("transformer", parts.transformer) == frozenset()


def test_no_other_familys_tiny_model_is_taken_for_ideogram4(tmp_path):
    for name in ("flux2_klein", "z_image"):  # the other Qwen-encoded transformers (klein shares the VAE)
        model = family_named(name).make_tiny(tmp_path / name)
        index = json.loads((model / "model_index.json").read_text())
        assert not IDEOGRAM.matches(index, folder_config_reader(model))
        assert not IDEOGRAM.matches({}, folder_config_reader(model))


def test_conditioner_is_the_pipelines_encode_prompt_without_its_left_padding(ideogram_pipe):
    conditioning = IDEOGRAM.build_conditioner(dict(ideogram_pipe.components), 1, 0)([SHORT, LONG], {}, CPU)
    features, mask = conditioning["llm_features"], conditioning["llm_mask"]
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == features.shape[1] and features.shape[2] == 13 * 16  # 13 tapped layers
    with torch.no_grad():
        theirs, _, _, indicator = ideogram_pipe.encode_prompt([SHORT, LONG], grid_h=1, grid_w=1,
                                                              max_sequence_length=96, device=CPU)
    assert (indicator[:, :96] == 3).sum(dim=1).tolist() == lengths  # LLM_TOKEN_INDICATOR: each prompt's tokens
    for row, n in enumerate(lengths):
        assert torch.allclose(features[row, :n], theirs[row, 96 - n:96], atol=1e-6)
        assert not features[row, n:].any()
    with pytest.raises(ConfigError, match=r"^model.max_sequence_length: a caption has \d+ chat-templated tokens"):
        IDEOGRAM.build_conditioner(dict(ideogram_pipe.components), 1, 0, max_sequence_length=8)([LONG], {}, CPU)


def test_text_encoder_lora_trains_through_the_conditioner(tiny_ideogram):
    """lora_text_encoder on Qwen3-VL: the vision tower is left out of a group's matches, set_text_encoder routes
    prompts through the adapted encoder, and its LoRA gets gradients from the transformer's output; a multi-process
    (wrapped) encoder is refused, since encode_prompt runs its layers past the wrapper."""
    import copy

    from hcpdiff.lora import LoraGroupSpec, attach_lora

    parts = load_model_parts(str(tiny_ideogram))
    encoder = copy.deepcopy(parts.text_encoder).requires_grad_(False)
    (group,) = attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*\.q_proj|.*\.qkv"], rank=2)],
                           "text_encoder", "lora_text_encoder", IDEOGRAM.unused_layers("text_encoder", encoder))
    assert sorted(int(layer.split(".")[2]) for layer in group.layers) == list(range(36))  # no visual.*.qkv
    generator = torch.Generator().manual_seed(0)
    random_lora_ups(encoder, generator)
    conditioner = IDEOGRAM.build_conditioner(parts.components, 1, 0)
    plain = conditioner([SHORT], {}, CPU)["llm_features"].detach()
    conditioner.set_text_encoder(encoder)
    conditioning = conditioner([SHORT], {}, CPU)
    assert not torch.allclose(conditioning["llm_features"], plain)
    prediction = IDEOGRAM.denoise(parts.transformer, torch.randn(1, 128, 2, 2, generator=generator),
                                  torch.tensor([0.5]), conditioning)
    prediction.square().mean().backward()
    lora_params = [p for name, p in encoder.named_parameters() if "lora_A" in name]
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)
    with pytest.raises(ConfigError, match=r"^lora_text_encoder: Ideogram4Pipeline.encode_prompt runs"):
        conditioner.set_text_encoder(torch.nn.DataParallel(encoder))


def test_latents_decode_through_the_pipeline_into_the_image_they_encode(ideogram_pipe):
    """The pipeline, given our latents and transformers that predict zero velocity, decodes what the VAE decodes from
    the posterior mean: the latents are the exact inverse of its unpatchify and batch-norm denormalisation."""
    vae = ideogram_pipe.vae
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    mean, std = IDEOGRAM.encode_latent_dist(vae, pixels)
    assert mean.shape == std.shape == (1, 128, 2, 3)
    assert not torch.allclose(vae.bn.running_mean, torch.zeros(128))  # the tiny VAE's statistics are not 0 / 1
    forwards = ideogram_pipe.transformer.forward, ideogram_pipe.unconditional_transformer.forward
    zero = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states),)  # noqa: E731
    ideogram_pipe.transformer.forward = ideogram_pipe.unconditional_transformer.forward = zero
    try:
        with torch.no_grad():
            theirs = ideogram_pipe(SHORT, height=32, width=48, num_inference_steps=1, guidance_scale=2.0,
                                   guidance_schedule=None, latents=pack(mean), max_sequence_length=16,
                                   output_type="pt").images
            raw = vae.encode(pixels).latent_dist
            expected = ideogram_pipe.image_processor.postprocess(vae.decode(raw.mean).sample, output_type="pt")
    finally:
        ideogram_pipe.transformer.forward, ideogram_pipe.unconditional_transformer.forward = forwards
    assert torch.allclose(theirs, expected, atol=1e-5)


def test_conditioner_and_denoise_are_what_the_pipeline_feeds_its_transformer(ideogram_pipe):
    text_length = 100  # the pipeline's padding; ours is the prompt's own length
    # the conditional transformer's second call (constant guidance: the unconditional one is another module)
    _, seen = transformer_calls(ideogram_pipe, prompt=LONG, height=64, width=48, guidance_scale=2.0,
                                guidance_schedule=None, max_sequence_length=text_length)
    kwargs, sigma = seen["kwargs"], ideogram_pipe.scheduler.sigmas[1]
    conditioning = IDEOGRAM.build_conditioner(dict(ideogram_pipe.components), 1, 0)([LONG], {}, CPU)
    n = int(conditioning["llm_mask"].sum())
    assert torch.allclose(conditioning["llm_features"][0], kwargs["encoder_hidden_states"][0, text_length - n:
                                                                                           text_length], atol=1e-6)
    # the loop's model time is 1 - t / 1000 = 1 - sigma (up to the fp32 rounding of t = sigma * 1000)
    assert torch.allclose(kwargs["timestep"], 1 - sigma.expand(1), atol=1e-6)
    noisy = unpack(kwargs["hidden_states"][:, text_length:], 4, 3)  # 64 x 48 px / 16
    with torch.no_grad():
        prediction = IDEOGRAM.denoise(ideogram_pipe.transformer, noisy, sigma.expand(1), conditioning)
    assert prediction.shape == (1, 128, 4, 3)
    # the transformer predicts x0 - noise; the target noise - x0 is its negation
    assert torch.allclose(pack(prediction), -seen["output"][:, text_length:], atol=1e-5)


def test_a_batch_of_prompts_of_different_lengths_trains_as_its_samples_one_by_one(ideogram_pipe):
    conditioner = IDEOGRAM.build_conditioner(dict(ideogram_pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 2, 3, generator=generator)
    noise = torch.randn(2, 128, 2, 3, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched, alone = batch_and_alone_losses(IDEOGRAM, ideogram_pipe.transformer, conditioner, [SHORT, LONG], latents,
                                            noise, sigmas)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)
    assert not torch.allclose(alone[0], alone[1])


def test_objective_shifts_sigmas_by_the_pipelines_resolution_aware_mean(ideogram_pipe):
    objective = IDEOGRAM.build_objective(ideogram_pipe.scheduler, LossSpec(logit_std=1.5))
    assert objective.shift == "resolution"  # not the scheduler config's static shift 1
    latents = torch.zeros(4, 128, 8, 6)  # 128 x 96 px
    mu = _resolution_aware_mu(128, 96, base_mu=0.0)
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(latents)
    torch.manual_seed(3)
    assert torch.allclose(drawn, torch.sigmoid(mu + 1.5 * torch.randn(4)), atol=1e-6)
    # the same shift moves the pipeline's sampling sigmas at mean 0 onto its sigmas at that resolution's mean
    centred, shifted = _logit_normal_sigmas(8, 0.0, std=1.5), _logit_normal_sigmas(8, mu, std=1.5)
    assert torch.allclose(objective.scheduler.time_shift(mu, 1.0, centred[1:]), shifted[1:], atol=1e-5)
    assert IDEOGRAM.build_objective(ideogram_pipe.scheduler, LossSpec(shift="none")).shift == "none"


def test_prompt_args_are_plain_text_and_a_negative_prompt_is_warned_about(ideogram_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        args = IDEOGRAM.prompt_args(ideogram_pipe, ["a (red:1.3) circle"], ["blurry"], clip_skip=0, all_prompts=[])
    assert args["prompt"] == ["a red circle"]
    assert args["max_sequence_length"] == int(IDEOGRAM.build_conditioner(dict(ideogram_pipe.components), 1, 0)(
        ["a red circle"], {}, CPU)["llm_mask"].sum())
    assert "Ideogram 4 renders without a negative prompt" in caplog.text
    assert IDEOGRAM.pipeline_call_args({"guidance_scale": 3.0}) == {"guidance_scale": 3.0, "guidance_schedule": None}


def test_shipped_config_adapts_the_attention_and_mlp_of_every_block(ideogram_pipe):
    from omegaconf import OmegaConf

    from hcpdiff.lora.layer_select import select_layers

    patterns = OmegaConf.load(REPO_ROOT / IDEOGRAM.train_config).lora_transformer[0].layers
    chosen = set(select_layers(ideogram_pipe.transformer, list(patterns), "lora_transformer[0].layers"))
    assert len(chosen) == 2 * 7  # 2 tiny blocks x (q, k, v, out, w1, w2, w3)
    assert {name.split(".", 2)[2] for name in chosen} == {
        "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
        "feed_forward.w2", "feed_forward.w3"}


def train_args(model: Path, data: Path, steps: int) -> list[str]:
    """The documented command on lora_ideogram4.yaml, fp32 on the CPU, one 64 px bucket, rank 4, a LoRA on every
    Linear of the transformer (`''`): the tiny random model's blocks alone move its output too little in a few
    steps (the final layer's frozen projection holds its size and span); one preview at the end."""
    return overfit_args("cfgs/train/examples/lora_ideogram4.yaml", model, data, steps, "lora_transformer.0.layers=['']",
                        f"previewer={{step: {steps}, prompts: ['a red circle'], width: 64, height: 64, "
                        "num_inference_steps: 2}")


STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ideogram, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, its LoRA by lora_convert --to_diffusers) of lora_ideogram4.yaml overfitting one
    image for STEPS steps on the tiny model."""
    workdir = tmp_path_factory.mktemp("ideogram4_run")
    exp, _ = train_in(workdir, cli_in_process, lambda data: train_args(tiny_ideogram, data, STEPS))
    converted = to_diffusers(exp / "ckpts" / f"transformer-{STEPS}.safetensors",
                             workdir / "pytorch_lora_weights.safetensors")
    return tiny_ideogram, exp, converted


@pytest.mark.e2e
def test_shipped_config_overfits_one_image(trained):
    model, exp, converted = trained
    log = (exp / "train.log").read_text()
    assert len(logged_losses(exp, STEPS)) == STEPS
    # every caption is text-cached, but the pipeline renders previews from prompt text: the encoder stays
    assert "text embeddings cached in memory" in log and "text encoders kept for the previews" in log
    assert "text encoders released" not in log
    assert Image.open(exp / "preview" / f"{STEPS}-0.png").size == (64, 64)
    data = exp.parents[1] / "data"
    image, prompt = Image.open(data / "0.png"), (data / "0.txt").read_text().strip()
    pipe = Ideogram4Pipeline.from_pretrained(model)
    before, after = fixed_noise_losses(IDEOGRAM, pipe, converted, image, prompt)
    assert after < 0.95 * before, (before, after)


def render_with_diffusers(pipe: Ideogram4Pipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own call with more text padding than the visualizer's (64
    tokens, not the prompt's own 11; the default 2048 costs CPU time): 64 px, 2 steps, constant guidance 2.5, seed 42,
    pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", guidance_scale=2.5, guidance_schedule=None,
                            max_sequence_length=64)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, converted = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_ideogram4.yaml",
                                 model, lora, "infer_args.guidance_scale=2.5")

    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    loaded = quiet_pipeline(Ideogram4Pipeline, model)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge (and its shorter text padding) renders alike


@pytest.mark.e2e
def test_to_webui_file_in_comfyuis_names_renders_as_the_to_diffusers_one(trained, tmp_path, cli_in_process):
    """The trained LoRA in ComfyUI's names (all of it: --from_webui gives it back), and its blocks' layers (what
    Ideogram4Pipeline's loader reads of that layout, converting it itself) render as the --to_diffusers file's."""
    model, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    webui = tmp_path / "webui.safetensors"
    lora_convert_run(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(lora), "--dump_path", str(webui))
    assert "diffusion_model.input_proj.alpha" in load_file(webui)
    lora_convert_run(cli_in_process, tmp_path, "--from_webui", "--lora_path", str(webui), "--dump_path",
                     str(tmp_path / "back"))
    (restored,) = (tmp_path / "back").glob("transformer-*.safetensors")
    original, back = load_file(lora), load_file(restored)
    assert back.keys() == original.keys() and all(torch.allclose(back[k], original[k]) for k in original)

    partial = partial_lora(lora, lambda key: key.startswith("layers."), tmp_path / "partial")
    loaded = quiet_pipeline(Ideogram4Pipeline, model)
    base, renders = render_with_diffusers(loaded), flag_renders(partial, loaded, render_with_diffusers)
    out = tmp_path / "partial--to_webui.safetensors"
    assert "diffusion_model.layers.0.attention.qkv.lora_down.weight" in load_file(out)
    assert np.abs(renders[0] - base).mean() > 1  # the blocks' LoRA changes the image
    assert np.abs(renders[0] - renders[1]).max() <= 1
