"""Qwen-Image 2.1 as a family: detection (neither Qwen-Image 1.x nor 2.1 takes the other's folder), its Qwen3-VL
processor and drop index as QwenImage21Pipeline's, its conditioner as the pipeline's encode_prompt (states and their
text mask), the denoiser call as a recorded pipeline call of the transformer, a batch of prompts of different lengths
training exactly as its samples one by one (where the pipeline's padded call with its text-prefix mask would not),
the RGBA latents and the resolution shift as the pipeline's, (word:1.2) weights, the Turbo warning, and one run of
the shipped config whose loss falls and whose LoRA the visualizer renders as QwenImage21Pipeline.load_lora_weights
renders the --to_diffusers file (and the --to_webui file in ComfyUI's names, but for the fused MLP layers it leaves
out)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift
from safetensors.torch import load_file

from family_data import (CPU, diffusers_render, flag_renders, logged_losses, matched_layers, overfit_args,
                         partial_lora, random_lora_ups, to_diffusers, train_in, visualizer_render)
from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.qwen_image_21 import pack_latents, unpack_latents
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import sample_sigmas
from hcpdiff.train.specs import LossSpec
from hcpdiff.train.text_cache import CachedConditioner, can_cache_text

Q21 = family_named("qwen_image_21")
SHORT, LONG = "a red circle", "a blue square photo of cat, a red circle and more words"


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models("qwen_image_21")


@pytest.fixture(scope="module")
def parts(tiny):
    return load_model_parts(str(tiny))


@pytest.fixture(scope="module")
def pipe(tiny, parts) -> QwenImage21Pipeline:
    """The pipeline's own loader (the processor given: transformers loads a Qwen3VLProcessor only with torchvision,
    for its video processor)."""
    loaded = QwenImage21Pipeline.from_pretrained(tiny, processor=parts.components["processor"])
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_detection_processor_and_pixel_step(tiny, parts, pipe, tmp_path):
    read = folder_config_reader(tiny)
    index = json.loads((tiny / "model_index.json").read_text())
    assert detect_family(index, read, str(tiny), "test") is Q21 and parts.family is Q21
    assert not family_named("qwen_image").matches(index, read)  # Qwen-Image 1.x does not take a 2.1 folder ...
    assert not Q21.matches({"_class_name": "QwenImagePipeline"}, read)  # ... nor 2.1 a 1.x one
    assert not Q21.matches({}, lambda part: {"_class_name": "QwenImageTransformer2DModel"})
    assert Q21.pixel_step(read) == 32 and parts.pixel_step == 32  # VAE 16x, one img_mask slot per 2x2 tokens
    processor = parts.components["processor"]
    assert isinstance(processor, __import__("transformers").Qwen3VLProcessor)
    assert type(parts.text_encoder).__name__ == "Qwen3VLForConditionalGeneration"
    # the drop index is the tokenised system message, as QwenImage21Pipeline strips it
    system = pipe.prompt_template_t2i.split("<|im_start|>user")[0]
    assert len(processor.tokenizer(system).input_ids) == pipe._drop_idx == 12
    try:  # where torchvision is installed, the pipeline's own loader reads the processor folder too
        import torchvision  # noqa: F401
    except ImportError:
        return
    assert QwenImage21Pipeline.from_pretrained(tiny)._drop_idx == pipe._drop_idx


def test_conditioner_is_encode_prompt_and_the_text_cache_keeps_each_prompts_tokens(pipe, tmp_path):
    from hcpdiff.data.tensor_store import TensorStore

    conditioner = Q21.build_conditioner(dict(pipe.components), 1, 0)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    embeds, mask, image_pad_mask = pipe.encode_prompt([SHORT, LONG], device="cpu")
    assert torch.equal(conditioning["encoder_hidden_states"], embeds)
    assert torch.equal(conditioning["encoder_hidden_states_mask"], mask.long())
    assert not image_pad_mask.any()  # a text prompt has no vision slots
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == embeds.shape[1]
    alone = conditioner([SHORT], {}, CPU)
    assert alone["encoder_hidden_states"].shape[1] == lengths[0] and bool(alone["encoder_hidden_states_mask"].all())
    # the pipeline pads on the left for the encoder (its position ids skip the padding): the same states to rounding
    assert torch.allclose(alone["encoder_hidden_states"][0], embeds[0, : lengths[0]], atol=1e-5)
    assert can_cache_text(conditioner)
    cached = CachedConditioner(conditioner, identity="tiny-q21")
    cached.add([SHORT, LONG], TensorStore(tmp_path / "text", what="text cache"))
    cached.fill(CPU)
    for prompts in ([LONG, SHORT], [SHORT]):
        from_cache, direct = cached(prompts, {}, CPU), conditioner(prompts, {}, CPU)
        assert torch.equal(from_cache["encoder_hidden_states_mask"], direct["encoder_hidden_states_mask"])
        assert torch.allclose(from_cache["encoder_hidden_states"], direct["encoder_hidden_states"], atol=1e-5)


def test_denoise_is_the_pipelines_recorded_transformer_call(pipe):
    calls = []

    def record(module, args, kwargs, output):
        calls.append(({key: value for key, value in kwargs.items()}, output[0]))

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1, 64, 4, 8, generator=generator)  # 64 x 128 px: 4 x 8 latent tokens, 8 slots
    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(LONG, height=64, width=128, num_inference_steps=2, latents=pack_latents(start), output_type="latent",
             use_kv_cache=False)
    finally:
        handle.remove()
    conditioning = Q21.build_conditioner(dict(pipe.components), 1, 0)([LONG], {}, CPU)
    kwargs, output = calls[1]  # the second step: sigma < 1
    length = conditioning["encoder_hidden_states"].shape[1]
    assert kwargs["img_shapes"] == [[(1, 4, 8)]] and kwargs["encoder_hidden_states_mask"] is None
    assert kwargs["img_mask"].tolist() == [[False] * length + [True] * 8]
    latents = unpack_latents(kwargs["hidden_states"], 4, 8)
    with torch.no_grad():
        ours = Q21.denoise(pipe.transformer, latents, kwargs["timestep"], conditioning)
    assert torch.equal(ours, unpack_latents(output[:, -32:], 4, 8))  # the pipeline keeps the last 32 tokens
    assert torch.equal(pack_latents(latents), kwargs["hidden_states"])


def test_text_encoder_lora_trains_through_the_pipelines_pre_norm_states(tiny, parts):
    """lora_text_encoder on Qwen3-VL: the conditioner reads the adapted encoder's states through the pipeline's
    final-norm hook, and its LoRA gets gradients from the transformer's loss."""
    import copy

    from hcpdiff.lora import LoraGroupSpec, attach_lora

    encoder = copy.deepcopy(parts.text_encoder).requires_grad_(False)
    attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*language_model\.layers\.\d+\.self_attn$"], rank=2)],
                "text_encoder", "lora_text_encoder")
    generator = torch.Generator().manual_seed(0)
    random_lora_ups(encoder, generator)
    conditioner = Q21.build_conditioner(dict(parts.components), 1, 0)
    plain = conditioner([SHORT, LONG], {}, CPU)
    conditioner.set_text_encoder(encoder)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    assert not torch.allclose(conditioning["encoder_hidden_states"], plain["encoder_hidden_states"])
    prediction = Q21.denoise(parts.transformer, torch.randn(2, 64, 2, 2, generator=generator), torch.tensor([0.5, 0.5]),
                             conditioning)
    prediction.square().mean().backward()
    lora_params = [p for name, p in encoder.named_parameters() if "lora_A" in name]
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)


def noisy_and_target(latents, noise, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    expanded = sigmas.view(-1, 1, 1, 1)
    return (1 - expanded) * latents + expanded * noise, noise - latents


def test_a_batch_of_prompts_of_different_lengths_trains_as_its_samples_one_by_one(pipe):
    conditioner = Q21.build_conditioner(dict(pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 64, 2, 2, generator=generator), torch.randn(3, 64, 2, 2, generator=generator)
    sigmas = torch.tensor([0.4, 0.8, 0.6])
    noisy, target = noisy_and_target(latents, noise, sigmas)
    prompts = (SHORT, LONG, SHORT)
    batched_conditioning = conditioner(list(prompts), {}, CPU)
    with torch.no_grad():
        batched = Q21.denoise(pipe.transformer, noisy, sigmas, batched_conditioning)
        alone = torch.cat([Q21.denoise(pipe.transformer, noisy[i:i + 1], sigmas[i:i + 1], conditioner([p], {}, CPU))
                           for i, p in enumerate(prompts)])
    batched_losses, alone_losses = ((x - target).square().mean(dim=(1, 2, 3)) for x in (batched, alone))
    assert torch.allclose(batched_losses, alone_losses, rtol=1e-5, atol=1e-6), (batched_losses, alone_losses)
    assert (batched - alone).abs().max() < 1e-5
    # the test can fail: the pipeline's padded batch call (its text mask; the image block, and so its rotary
    # positions, after the padding) computes the short prompts' samples otherwise
    embeds, mask = batched_conditioning["encoder_hidden_states"], batched_conditioning["encoder_hidden_states_mask"]
    img_mask = torch.cat([torch.zeros_like(mask, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        padded = pipe.transformer(hidden_states=pack_latents(noisy), timestep=sigmas, encoder_hidden_states=embeds,
                                  encoder_hidden_states_mask=mask, img_shapes=[[(1, 2, 2)]] * 3, img_mask=img_mask,
                                  return_dict=False)[0][:, -4:]
    difference = (unpack_latents(padded, 2, 2) - alone).abs().amax(dim=(1, 2, 3))
    assert difference[0] > 1e-3 and difference[2] > 1e-3, difference
    assert difference[1] < 1e-5  # the longest prompt is not padded


def test_rgba_latents_and_resolution_shift_are_the_pipelines(pipe):
    pixels = torch.rand(1, 3, 32, 64) * 2 - 1
    mean, std = Q21.encode_latent_dist(pipe.vae, pixels)
    assert mean.shape == std.shape == (1, 64, 2, 4)
    # QwenImage21Pipeline: the image made RGBA (opaque: alpha 1 in [-1, 1]), argmax latents normalised per channel
    rgba = torch.cat([pixels, torch.ones(1, 1, 32, 64)], dim=1).unsqueeze(2)
    with torch.no_grad():
        theirs = pipe._encode_vae_image(rgba, generator=None)
    assert torch.allclose(mean, theirs.squeeze(2), atol=1e-5)

    scheduler = pipe.scheduler
    objective = Q21.build_objective(scheduler, LossSpec(sigma_sampling="uniform"))
    assert objective.shift == "resolution"
    latents = torch.zeros(4, 64, 4, 6)  # 24 tokens: the pipeline's latents.shape[1], unpatched
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(latents)
    torch.manual_seed(3)
    plain = sample_sigmas("uniform", 4)
    config = scheduler.config
    mu = calculate_shift(24, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    assert torch.allclose(drawn, scheduler.time_shift(mu, 1.0, plain), atol=1e-6)


def test_prompt_args_weights_and_turbo_warning(pipe, tmp_path):
    args = Q21.prompt_args(pipe, [SHORT, LONG], [" ", " "], clip_skip=0, all_prompts=[])
    embeds, mask, _ = pipe.encode_prompt([SHORT, LONG], device="cpu")
    assert torch.equal(args["prompt_embeds"], embeds) and torch.equal(args["prompt_embeds_mask"], mask.long())
    weighted = Q21.prompt_args(pipe, ["a (red:1.5) circle", LONG], [" ", " "], clip_skip=0, all_prompts=[])
    assert torch.equal(weighted["prompt_embeds"][1], embeds[1])  # an unweighted row stays
    # after the dropped system prefix: "<|im_start|>", "user", "\n", "a", " red", " circle", ...
    ratio = weighted["prompt_embeds"][0, 3:6] / embeds[0, 3:6]
    scale = ratio[0].median()
    assert torch.allclose(ratio[1], 1.5 * scale.expand(ratio.shape[1]), rtol=1e-3)
    assert torch.allclose(ratio[2], scale.expand(ratio.shape[1]), rtol=1e-3)
    assert Q21.pipeline_call_args({"guidance_scale": 1.0}) == {"true_cfg_scale": 1.0}
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows Qwen-Image 2.1's transformer"):
        Q21.check_run("fp16")

    assert Q21.pipeline_warnings({}) == [] and Q21.pipeline_warnings({"sample_sigmas": None}) == []
    (line,) = Q21.pipeline_warnings({"sample_sigmas": [1.0, 0.9, 0.75, 0.5]})
    assert "Turbo" in line and "Qwen/Qwen-Image-2.1" in line and "\n" not in line


def test_turbo_tiny_model_warns_once_at_start_and_renders_on_its_grid(tmp_path, tiny):
    from hcpdiff.infer.pipeline import build_pipeline
    from hcpdiff.models.loading import pipeline_settings

    turbo = Q21.make_tiny(tmp_path / "turbo", variant="qwen_image_21-turbo")
    settings = pipeline_settings(str(turbo), {"local_files_only": True})
    assert settings["sample_sigmas"] == [1.0, 0.9, 0.75, 0.5]
    assert len(Q21.pipeline_warnings(settings)) == 1
    # previews and the visualizer build this pipeline: Turbo's sampling grid, the base's evenly spaced sigmas
    assert build_pipeline(load_model_parts(str(turbo)), {}).config.sample_sigmas == [1.0, 0.9, 0.75, 0.5]
    assert build_pipeline(load_model_parts(str(tiny)), {}).config.sample_sigmas is None


STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, cli_in_process) -> tuple[Path, Path]:
    """(model, experiment folder) of lora_qwen_image_21.yaml overfitting one image on the tiny model (fp32, rank 4)."""
    exp, _ = train_in(tmp_path_factory.mktemp("q21_run"), cli_in_process, lambda data: overfit_args(
        "cfgs/train/examples/lora_qwen_image_21.yaml", tiny, data, STEPS, lr="1e-1"))
    return tiny, exp


@pytest.mark.e2e
def test_shipped_config_overfits_one_image(trained):
    _, exp = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, (first, last)
    assert {layer.split(".", 2)[2] for layer in matched_layers(exp)} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"}


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, pipe, tmp_path, cli_in_process):
    model, exp = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_qwen_image_21.yaml",
                                 model, lora, "infer_args.guidance_scale=2.5")

    converted = to_diffusers(lora, tmp_path / "pytorch_lora_weights.safetensors")

    def render(loaded: QwenImage21Pipeline) -> np.ndarray:
        return diffusers_render(loaded, prompt="a red circle", negative_prompt=" ", true_cfg_scale=2.5)

    base = render(pipe)
    pipe.load_lora_weights(str(converted))
    try:
        assert len(pipe.get_list_adapters()["transformer"]) == 1
        with_lora = render(pipe)
    finally:
        pipe.unload_lora_weights()
    assert rendered.shape == with_lora.shape == (64, 64, 4)  # RGBA, as the VAE decodes
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers
    assert load_file(converted).keys() and all(key.startswith("transformer.") for key in load_file(converted))

    # in ComfyUI's names, which QwenImage21Pipeline's loader reads but for the fused gate_up layers (its transformer
    # has none): the LoRA without its MLP gate / up layers renders as the --to_diffusers file of the same
    partial = partial_lora(lora, lambda key: ".gate_layer." not in key and ".img_mlp.proj." not in key,
                           tmp_path / "partial")
    renders = flag_renders(partial, pipe, render)
    out = tmp_path / "partial--to_webui.safetensors"
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight" in load_file(out)
    assert np.abs(renders[0] - base).mean() > 1 and np.abs(renders[0] - renders[1]).max() <= 1
