"""Krea 2 as a family: detection (base and Turbo, and no other family's folder taken or given), its conditioner as
Krea2Pipeline's encode_prompt (twelve tapped layers at a fixed length with a mask, text-cached), latents normalised as
the pipeline denormalises them, the denoiser called exactly as a recorded pipeline call of the transformer, Euler steps
along it (with guidance_scale as the pipeline's minus one) sampling as the pipeline samples, the resolution shift as
the pipeline's mu, a batch of two training as its samples one by one, (word:1.2) weights, fp16 refused, Turbo's one
warning line, and one run of the shipped config whose loss falls and whose LoRA the visualizer renders as
Krea2Pipeline.load_lora_weights renders the --to_diffusers file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Krea2Pipeline
from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift
from safetensors.torch import load_file

from family_data import (CPU, LONG, SHORT, batch_and_alone_losses, checkpoint_layers, diffusers_render, logged_losses,
                         lora_renders, matched_layers, overfit_args, quiet_pipeline, to_diffusers, train_in,
                         visualizer_render)
from hcpdiff.data.tensor_store import TensorStore
from hcpdiff.errors import ConfigError
from hcpdiff.families import FAMILIES, detect_family, family_named, folder_config_reader
from hcpdiff.infer.pipeline import build_pipeline
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import sample_sigmas
from hcpdiff.train.specs import LossSpec
from hcpdiff.train.text_cache import CachedConditioner, can_cache_text

KREA2 = family_named("krea2")
TOKENS = 32  # prompt tokens in the unit tests (the pipeline's 512 in the runs)


@pytest.fixture(scope="module")
def tiny_krea2(tiny_models) -> Path:
    return tiny_models("krea2")


@pytest.fixture(scope="module")
def krea2_pipe(tiny_krea2) -> Krea2Pipeline:
    return quiet_pipeline(Krea2Pipeline, tiny_krea2)


def conditioner(pipe: Krea2Pipeline, tokens: int = TOKENS):
    return KREA2.build_conditioner(dict(pipe.components), 1, 0, max_sequence_length=tokens)


def test_detection_takes_krea2_folders_only_and_turbo_warns_once(tiny_krea2, krea2_pipe, tmp_path):
    index = json.loads((tiny_krea2 / "model_index.json").read_text())
    read = folder_config_reader(tiny_krea2)
    assert detect_family(index, read, str(tiny_krea2), "test") is KREA2
    # no family before or after it in the registry takes a Krea 2 folder, with or without its model_index.json ...
    assert [f.name for f in FAMILIES if f.matches(index, read) or f.matches({}, read)] == ["krea2"]
    # ... and Krea 2 takes no other pipeline's folder, by class name or by a transformer of another class
    for other in ("QwenImagePipeline", "ZImagePipeline", "Flux2KleinPipeline", "FluxPipeline"):
        assert not KREA2.matches({"_class_name": other}, read)
    assert not KREA2.matches({}, lambda part: {"_class_name": "QwenImageTransformer2DModel"})
    parts = load_model_parts(str(tiny_krea2))
    assert parts.family is KREA2 and parts.pixel_step == 16 == krea2_pipe.vae_scale_factor * krea2_pipe.patch_size
    assert type(parts.text_encoder).__name__ == "Qwen3VLModel" and index["is_distilled"] is False
    assert KREA2.pipeline_warnings(parts.pipeline_settings) == []
    # Turbo: model_index.json's is_distilled is all that tells it apart (Krea2TurboAutoBlocks: fixed mu, no guidance)
    turbo = Path(shutil.copytree(tiny_krea2, tmp_path / "turbo"))
    turbo_index = {**index, "is_distilled": True}
    (turbo / "model_index.json").write_text(json.dumps(turbo_index))
    assert Krea2Pipeline.load_config(turbo)["is_distilled"] is True
    turbo_parts = load_model_parts(str(turbo))
    settings = turbo_parts.pipeline_settings
    (warning,) = KREA2.pipeline_warnings(settings)
    # renders (previews and the visualizer build the same pipeline) take Turbo's fixed shift, the base its own
    assert build_pipeline(turbo_parts, {}).config.is_distilled is True
    assert build_pipeline(parts, {}).config.is_distilled is False
    assert warning.startswith("this looks like Krea 2 Turbo") and "train on the base Krea 2" in warning
    (taps,) = KREA2.pipeline_warnings({**settings, "is_distilled": False, "text_encoder_select_layers": [1, 2]})
    assert "text_encoder_select_layers [1, 2]" in taps
    # Qwen3-VL's vision tower and its layers from the last tap (35) on never reach the transformer
    unused = KREA2.unused_layers("text_encoder", parts.text_encoder)
    assert "language_model.layers.35.mlp.down_proj" in unused and "visual.blocks.0.attn.qkv" in unused
    assert not any(name.startswith("language_model.layers.34.") for name in unused)
    assert KREA2.unused_layers("transformer", parts.transformer) == frozenset()


def test_conditioner_is_the_pipelines_encode_prompt_and_caches(krea2_pipe, tmp_path):
    cond = conditioner(krea2_pipe)
    conditioning = cond([SHORT, LONG], {}, CPU)
    states, mask = krea2_pipe.encode_prompt([SHORT, LONG], device="cpu", max_sequence_length=TOKENS)
    assert torch.equal(conditioning["encoder_hidden_states"], states)
    assert torch.equal(conditioning["encoder_attention_mask"], mask)
    assert states.shape == (2, TOKENS, 12, 16) and mask.dtype == torch.bool
    assert 0 < mask[0].sum() < mask[1].sum() < TOKENS  # each prompt's own tokens; the suffix after the padding
    assert can_cache_text(cond)
    cached = CachedConditioner(cond, identity="tiny-krea2")
    cached.add([SHORT, LONG], TensorStore(tmp_path / "text_embeds", what="text cache"))
    assert cached.fill(CPU).encoded == 2
    from_cache = cached([LONG, SHORT], {}, CPU)
    assert torch.equal(from_cache["encoder_attention_mask"], mask.flip(0))
    assert torch.allclose(from_cache["encoder_hidden_states"], states.flip(0), atol=1e-6)


def test_latents_are_normalised_as_the_pipeline_denormalises_them(krea2_pipe):
    vae = krea2_pipe.vae
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    mean, _ = KREA2.encode_latent_dist(vae, pixels)
    with torch.no_grad():
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean.squeeze(2)
    # Krea2Pipeline.__call__ before vae.decode: latents / (1 / latents_std) + latents_mean
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose(mean / std + torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1), raw, atol=1e-5)


def record_transformer_calls(pipe: Krea2Pipeline, **call) -> tuple[list[tuple[dict, torch.Tensor]], torch.Tensor]:
    """([(the transformer's keyword arguments, its output)] of every call in one pipeline run, the final latents)."""
    calls: list[tuple[dict, torch.Tensor]] = []
    pre = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append((dict(kwargs), None)),
                                                     with_kwargs=True)
    post = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.__setitem__(-1, (calls[-1][0], output[0])), with_kwargs=True)
    try:
        latents = pipe(output_type="latent", max_sequence_length=TOKENS, **call).images
    finally:
        pre.remove()
        post.remove()
    return calls, latents


def unpack(pipe: Krea2Pipeline, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens of a height x width pixel render -> latents [B, 16, H/8, W/8], by the pipeline's helper."""
    return pipe._unpack_latents(tokens, height, width).squeeze(2)


def euler_render(pipe: Krea2Pipeline, latents: torch.Tensor, prompts: list[str], guidance_scale: float
                 ) -> torch.Tensor:
    """The pipeline's sampling by the family: Euler steps along `denoise` over the scheduler's last sigmas, with the
    usual classifier-free guidance (neg + s (pos - neg), against empty prompts) when guidance_scale > 1."""
    cond = conditioner(pipe)
    positive, negative = cond(prompts, {}, CPU), cond([""] * len(prompts), {}, CPU)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            velocity = KREA2.denoise(pipe.transformer, latents, sigma.expand(len(prompts)), positive)
            if guidance_scale > 1:
                unguided = KREA2.denoise(pipe.transformer, latents, sigma.expand(len(prompts)), negative)
                velocity = unguided + guidance_scale * (velocity - unguided)
            latents = latents + (next_sigma - sigma) * velocity
    return latents


def test_denoise_is_the_recorded_transformer_call_and_euler_steps_along_it_are_the_pipelines_sampling(krea2_pipe):
    """Every transformer call of a guided 2-step render (positive and negative prompts) is `denoise` exactly on the
    unpacked latents at sigma = the recorded timestep, and the family's Euler sampling with hcpdiff's guidance_scale 3
    ends on the pipeline's latents (its guidance_scale 2: pos + 2 (pos - neg))."""
    size, steps = 32, 2
    start = torch.randn(2, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    call = KREA2.pipeline_call_args({"height": size, "width": size, "num_inference_steps": steps,
                                     "guidance_scale": 3.0})
    assert call["guidance_scale"] == 2.0 and KREA2.pipeline_call_args({"guidance_scale": 1.0})["guidance_scale"] == 0
    packed = krea2_pipe._pack_latents(start, 2, 16, size // 8, size // 8)
    calls, final = record_transformer_calls(krea2_pipe, prompt=[SHORT, LONG], latents=packed.clone(), **call)
    assert len(calls) == 2 * steps
    cond = conditioner(krea2_pipe)
    prompts = {True: cond([SHORT, LONG], {}, CPU), False: cond(["", ""], {}, CPU)}
    sigmas = krea2_pipe.scheduler.sigmas
    for i, (kwargs, output) in enumerate(calls):
        assert torch.allclose(kwargs["timestep"], sigmas[i // 2].expand(2))  # t / 1000 = sigma
        with torch.no_grad():
            ours = KREA2.denoise(krea2_pipe.transformer, unpack(krea2_pipe, kwargs["hidden_states"], size, size),
                                 kwargs["timestep"], prompts[i % 2 == 0])
        assert torch.equal(ours, unpack(krea2_pipe, output, size, size))
    ours = euler_render(krea2_pipe, start, [SHORT, LONG], 3.0)
    theirs = unpack(krea2_pipe, final, size, size)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_objective_shifts_sigmas_with_the_pipelines_mu(krea2_pipe):
    objective = KREA2.build_objective(krea2_pipe.scheduler, LossSpec(sigma_sampling="uniform"))
    assert objective.shift == "resolution"
    latents = torch.zeros(3, 16, 16, 24)  # 8 x 12 packed tokens
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(latents)
    torch.manual_seed(3)
    config = krea2_pipe.scheduler.config
    mu = calculate_shift(8 * 12, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 6400),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # as Krea2Pipeline.__call__
    assert torch.allclose(drawn, krea2_pipe.scheduler.time_shift(mu, 1.0, sample_sigmas("uniform", 3)))


def test_a_batch_of_two_trains_as_its_samples_one_by_one(krea2_pipe):
    cond = conditioner(krea2_pipe)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 4, 6, generator=generator), torch.randn(2, 16, 4, 6, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched, alone = batch_and_alone_losses(KREA2, krea2_pipe.transformer, cond, [SHORT, LONG], latents, noise, sigmas)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)


def test_prompt_args_are_encode_prompt_and_weight_the_weighted_tokens(krea2_pipe):
    args = KREA2.prompt_args(krea2_pipe, [SHORT, LONG], ["", ""], clip_skip=0, all_prompts=[])
    states, mask = krea2_pipe.encode_prompt([SHORT, LONG], device="cpu")
    assert torch.equal(args["prompt_embeds"], states) and torch.equal(args["prompt_embeds_mask"], mask)
    assert args["negative_prompt_embeds"].shape == states.shape and args["max_sequence_length"] == 512
    weighted = KREA2.prompt_args(krea2_pipe, ["a (red:1.5) circle", LONG], [""], clip_skip=0, all_prompts=[])
    assert torch.equal(weighted["prompt_embeds_mask"], mask)  # the same tokens
    assert torch.equal(weighted["prompt_embeds"][1], states[1])  # an unweighted row stays
    # row 0's own tokens: a, " red", " circle", then the 5 suffix tokens; " red" scaled 1.5 against the others (all
    # twelve layers), then the row rescaled to its mean; the padding is left as it was
    own = mask[0]
    ratio = weighted["prompt_embeds"][0][own] / states[0][own]
    scale = ratio[0].median()
    others = torch.cat([ratio[:1], ratio[2:]])
    assert own.sum() == 8 and torch.allclose(others, scale.expand(others.shape), rtol=1e-4)
    assert torch.allclose(ratio[1], 1.5 * scale.expand(ratio.shape[1:]), rtol=1e-4)
    assert torch.equal(weighted["prompt_embeds"][0][~own], states[0][~own])


def test_fp16_is_refused():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows Krea 2"):
        KREA2.check_run("fp16")
    KREA2.check_run("bf16")


STEPS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_krea2, cli_in_process) -> tuple[Path, Path, str]:
    """(model, experiment folder, stderr) of lora_krea2.yaml overfitting one image for STEPS steps on the tiny model
    (fp32, one 64 px bucket, rank 4, 64 prompt tokens)."""
    exp, stderr = train_in(tmp_path_factory.mktemp("krea2_run"), cli_in_process, lambda data: overfit_args(
        "cfgs/train/examples/lora_krea2.yaml", tiny_krea2, data, STEPS, "model.max_sequence_length=64"))
    return tiny_krea2, exp, stderr


@pytest.mark.e2e
def test_shipped_config_overfits_one_image_on_the_matched_layers(trained):
    _, exp, stderr = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, (first, last)
    assert "distilled" not in stderr
    metadata, layers, _ = checkpoint_layers(exp / "ckpts" / f"transformer-{STEPS}.safetensors")
    assert (metadata["family"], metadata["part"]) == ("krea2", "transformer")
    matched = matched_layers(exp)
    assert layers == matched
    assert len(matched) == 4 * 8 and {layer.split(".", 2)[2] for layer in matched} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down"}


def render_with_diffusers(pipe: Krea2Pipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, its guidance_scale 1.5
    (hcpdiff's 2.5) against the empty negative prompt, seed 42, pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", negative_prompt="", guidance_scale=1.5)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_krea2.yaml",
                                 model, lora, "infer_args.guidance_scale=2.5")

    converted = tmp_path / "pytorch_lora_weights.safetensors"
    to_diffusers(lora, converted)
    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    loaded = quiet_pipeline(Krea2Pipeline, model)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers
