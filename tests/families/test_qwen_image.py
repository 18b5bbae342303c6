"""Qwen-Image as a family: detection, its conditioner as QwenImagePipeline's encode_prompt (variable-length states
with their mask), a batch of prompts of different lengths training exactly as its samples one by one, packing and
the per-channel VAE latents as the pipeline's, the resolution shift as the pipeline's calculate_shift, fp16 refused,
(word:1.2) weights, a Qwen2.5-VL LoRA's gradients, ComfyUI / kohya conversions both ways, and one run of the shipped
config whose loss falls, whose checkpoint holds the matched layers, and whose LoRA the visualizer renders as
QwenImagePipeline.load_lora_weights renders the --to_diffusers file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from safetensors import safe_open
from safetensors.torch import load_file

from family_data import (CPU, LONG, SHORT, checkpoint_layers, diffusers_render, logged_losses, lora_renders,
                         matched_layers, overfit_args, per_sample_losses, quiet_pipeline, random_lora_ups,
                         to_diffusers, train_in, visualizer_render)
from hcpdiff.errors import ConfigError, ModelError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.qwen_image import KOHYA_PREFIX, pack_latents, unpack_latents
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import sample_sigmas
from hcpdiff.data.tensor_store import TensorStore
from hcpdiff.train.specs import LossSpec
from hcpdiff.train.text_cache import CachedConditioner, can_cache_text

QWEN = family_named("qwen_image")


@pytest.fixture(scope="module")
def tiny_qwen(tiny_models) -> Path:
    return tiny_models("qwen_image")


@pytest.fixture(scope="module")
def qwen_pipe(tiny_qwen) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(tiny_qwen)


def test_tiny_model_is_detected_as_qwen_image_with_pixel_step_16(tiny_qwen, qwen_pipe):
    index = json.loads((tiny_qwen / "model_index.json").read_text())
    assert detect_family(index, folder_config_reader(tiny_qwen), str(tiny_qwen), "test") is QWEN
    assert QWEN.pixel_step(folder_config_reader(tiny_qwen)) == 16  # VAE 8x, 2x2 packing
    assert not QWEN.matches({"_class_name": "QwenImageEditPipeline"}, folder_config_reader(tiny_qwen))
    parts = load_model_parts(str(tiny_qwen))
    assert parts.family is QWEN and parts.pixel_step == 16 and parts.vae_scale_factor == qwen_pipe.vae_scale_factor
    assert type(parts.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # the template's system prefix is exactly the pipeline's drop index, as with the real tokenizer
    prefix = qwen_pipe.prompt_template_encode.split("{}")[0]
    assert len(qwen_pipe.tokenizer(prefix).input_ids) == qwen_pipe.prompt_template_encode_start_idx == 34


def test_conditioner_is_the_pipelines_encode_prompt_with_its_mask(qwen_pipe):
    conditioner = QWEN.build_conditioner(dict(qwen_pipe.components), 1, 0)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    embeds, mask = qwen_pipe.encode_prompt([SHORT, LONG], device="cpu", max_sequence_length=512)
    assert torch.equal(conditioning["encoder_hidden_states"], embeds)
    assert torch.equal(conditioning["encoder_hidden_states_mask"], mask)
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == embeds.shape[1]  # the short prompt is padded, and its padding masked
    alone = conditioner([SHORT], {}, CPU)
    assert alone["encoder_hidden_states"].shape[1] == lengths[0] and bool(alone["encoder_hidden_states_mask"].all())
    cut = QWEN.build_conditioner(dict(qwen_pipe.components), 1, 0, max_sequence_length=8)([LONG], {}, CPU)
    assert cut["encoder_hidden_states"].shape[1] == 8


def test_text_cache_keeps_each_prompts_own_tokens_and_pads_them_per_batch(qwen_pipe, tmp_path):
    conditioner = QWEN.build_conditioner(dict(qwen_pipe.components), 1, 0)
    assert can_cache_text(conditioner)
    cached = CachedConditioner(conditioner, identity="tiny-qwen")
    cached.add([SHORT, LONG], TensorStore(tmp_path / "text_embeds", what="text cache"))  # on disk, as cache_dir does
    report = cached.fill(CPU)  # one batch of both: the short prompt comes back padded, and is stored without it
    assert report.encoded == 2
    alone = cached([SHORT], {}, CPU)
    assert bool(alone["encoder_hidden_states_mask"].all())
    for prompts in ([LONG, SHORT], [SHORT, SHORT], [SHORT, LONG, SHORT]):
        from_cache, direct = cached(prompts, {}, CPU), conditioner(prompts, {}, CPU)
        assert torch.equal(from_cache["encoder_hidden_states_mask"], direct["encoder_hidden_states_mask"])
        assert torch.allclose(from_cache["encoder_hidden_states"], direct["encoder_hidden_states"], atol=1e-5)


def test_prompt_args_are_encode_prompts_and_weight_the_weighted_tokens(qwen_pipe):
    args = QWEN.prompt_args(qwen_pipe, [SHORT, LONG], [" ", " "], clip_skip=0, all_prompts=[SHORT, LONG])
    embeds, mask = qwen_pipe.encode_prompt([SHORT, LONG], device="cpu")
    neg_embeds, neg_mask = qwen_pipe.encode_prompt([" ", " "], device="cpu")
    assert torch.allclose(args["prompt_embeds"], embeds, atol=1e-5) and torch.equal(args["prompt_embeds_mask"], mask)
    assert torch.allclose(args["negative_prompt_embeds"], neg_embeds, atol=1e-5)
    assert args["negative_prompt_embeds_mask"].shape == neg_embeds.shape[:2]
    weighted = QWEN.prompt_args(qwen_pipe, ["a (red:1.5) circle", LONG], [" ", " "], clip_skip=0, all_prompts=[])
    assert torch.equal(weighted["prompt_embeds_mask"], mask)  # the same tokens: "a", " red", " circle"
    assert torch.allclose(weighted["prompt_embeds"][1], embeds[1], atol=1e-5)  # an unweighted row stays
    # row 0: " red" (token 1 after the prefix) scaled 1.5 against the others, then the row rescaled to its mean
    ratio = weighted["prompt_embeds"][0, :3] / embeds[0, :3]
    scale = ratio[0].median()
    assert torch.allclose(ratio[0], scale.expand(ratio.shape[1]), rtol=1e-3)
    assert torch.allclose(ratio[1], 1.5 * scale.expand(ratio.shape[1]), rtol=1e-3)
    assert not torch.isclose(scale, torch.tensor(1.0))


def test_text_encoder_lora_trains_through_the_conditioner(tiny_qwen):
    """lora_text_encoder on Qwen2.5-VL: set_text_encoder routes prompts through the adapted (wrapped) encoder and its
    LoRA gets gradients from the transformer's loss."""
    import copy

    from hcpdiff.lora import LoraGroupSpec, attach_lora

    parts = load_model_parts(str(tiny_qwen))
    conditioner = QWEN.build_conditioner(parts.components, 1, 0)
    encoder = copy.deepcopy(parts.text_encoder).requires_grad_(False)
    attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*language_model\.layers\.\d+\.self_attn$"], rank=2)],
                "text_encoder", "lora_text_encoder")
    generator = torch.Generator().manual_seed(0)
    random_lora_ups(encoder, generator)
    lora_params = [p for name, p in encoder.named_parameters() if "lora_A" in name]
    conditioner.set_text_encoder(encoder)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    plain = QWEN.build_conditioner(parts.components, 1, 0)([SHORT, LONG], {}, CPU)
    assert not torch.allclose(conditioning["encoder_hidden_states"], plain["encoder_hidden_states"])
    prediction = QWEN.denoise(parts.transformer, torch.randn(2, 16, 4, 4, generator=generator),
                              torch.tensor([0.5, 0.5]), conditioning)
    prediction.square().mean().backward()
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params)


def test_a_batch_of_prompts_of_different_lengths_trains_as_its_samples_one_by_one(qwen_pipe):
    conditioner = QWEN.build_conditioner(dict(qwen_pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 6, generator=generator)
    noise = torch.randn(2, 16, 4, 6, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched_conditioning = conditioner([SHORT, LONG], {}, CPU)
    batched = per_sample_losses(QWEN, qwen_pipe.transformer, batched_conditioning, latents, noise, sigmas)
    alone = torch.cat([per_sample_losses(QWEN, qwen_pipe.transformer, conditioner([prompt], {}, CPU),
                                         latents[i:i + 1], noise[i:i + 1], sigmas[i:i + 1])
                       for i, prompt in enumerate((SHORT, LONG))])
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)
    # the test can fail: without the mask the short prompt attends to its padding and its loss changes
    unmasked = {**batched_conditioning,
                "encoder_hidden_states_mask": torch.ones_like(batched_conditioning["encoder_hidden_states_mask"])}
    unmasked_losses = per_sample_losses(QWEN, qwen_pipe.transformer, unmasked, latents, noise, sigmas)
    assert not torch.allclose(unmasked_losses[0], alone[0], rtol=1e-4)
    assert torch.allclose(unmasked_losses[1], alone[1], rtol=1e-5, atol=1e-6)


def test_packing_and_denoise_are_the_pipelines(qwen_pipe):
    latents = torch.randn(2, 16, 4, 6)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 2 * 3, 64)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(latents.unsqueeze(2), 2, 16, 4, 6))
    # QwenImagePipeline unpacks to the VAE's 5-D layout from pixel sizes (latent cells x 8)
    assert torch.equal(QwenImagePipeline._unpack_latents(tokens, 32, 48, 8), latents.unsqueeze(2))
    assert torch.equal(unpack_latents(tokens, 4, 6), latents)
    conditioning = QWEN.build_conditioner(dict(qwen_pipe.components), 1, 0)([SHORT, LONG], {}, CPU)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = QWEN.denoise(qwen_pipe.transformer, latents, sigmas, conditioning)
        # QwenImagePipeline.__call__: timestep / 1000 (sigma), img_shapes per sample, the prompts' mask
        theirs = qwen_pipe.transformer(hidden_states=tokens, timestep=sigmas * 1000 / 1000,
                                       encoder_hidden_states=conditioning["encoder_hidden_states"],
                                       encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"],
                                       img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)[0]
    assert torch.equal(ours, unpack_latents(theirs, 4, 6))


def test_latents_are_normalised_per_channel_as_the_pipeline_denormalises(qwen_pipe):
    vae = qwen_pipe.vae
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    mean, std = QWEN.encode_latent_dist(vae, pixels)
    assert mean.shape == std.shape == (1, 16, 4, 6)
    with torch.no_grad():
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean
    # QwenImagePipeline.__call__ before vae.decode: latents / (1 / latents_std) + latents_mean
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(mean.unsqueeze(2) / latents_std + latents_mean, raw, atol=1e-5)


def test_resolution_shift_is_the_pipelines_calculate_shift(qwen_pipe):
    scheduler = qwen_pipe.scheduler
    objective = QWEN.build_objective(scheduler, LossSpec(sigma_sampling="uniform"))
    assert objective.shift == "resolution"  # the scheduler shifts dynamically: unset shift takes it
    latents = torch.zeros(4, 16, 8, 12)  # 4 x 6 = 24 packed tokens, as QwenImagePipeline's image_seq_len
    torch.manual_seed(3)
    drawn = objective.sample_sigmas(latents)
    torch.manual_seed(3)
    plain = sample_sigmas("uniform", 4)
    config = scheduler.config
    mu = calculate_shift(24, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    assert (config["max_image_seq_len"], config["max_shift"], config["time_shift_type"]) == (8192, 0.9, "exponential")
    # the shift set_timesteps(mu=...) applies at inference (before its terminal stretch)
    assert torch.allclose(drawn, scheduler.time_shift(mu, 1.0, plain), atol=1e-6)
    assert not torch.allclose(drawn, plain)


def test_fp16_is_refused_and_guidance_scale_is_true_cfg_scale():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows Qwen-Image"):
        QWEN.check_run("fp16")
    QWEN.check_run("bf16")
    assert QWEN.pipeline_call_args({"width": 64, "guidance_scale": 4.0}) == {"width": 64, "true_cfg_scale": 4.0}


def small_lora_files(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], list[str]]:
    """(transformer LoRA file, text-encoder LoRA file, the transformer's native state, its model keys): a rank-2
    LoRA with random up weights and alpha 1 on some of the shipped config's layers of the tiny transformer."""
    from hcpdiff.lora import LoraGroupSpec, attach_lora
    from hcpdiff.lora.state_io import lora_metadata, lora_state_dict, save_lora
    from hcpdiff.tools.tiny_qwen_image import build_qwen_text_encoder, build_qwen_transformer

    torch.manual_seed(0)
    model = build_qwen_transformer()
    model_keys = list(model.state_dict())
    pattern = r"re:transformer_blocks\.(0|1)\.(attn\.(to_q|add_k_proj|to_out\.0|to_add_out)|img_mod\.1|txt_mlp\.net\.2)"
    groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=[pattern], rank=2, alpha=1.0)], "transformer",
                         "lora_transformer")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = lora_state_dict(model)
    transformer_file = tmp_path / "transformer-1.safetensors"
    save_lora(transformer_file, state, lora_metadata("transformer", "", groups, 1, family="qwen_image"))
    encoder = build_qwen_text_encoder(400, 0)
    groups = attach_lora(encoder, [LoraGroupSpec(lr=1e-4, layers=[r"re:.*self_attn\.q_proj"], rank=2)],
                         "text_encoder", "lora_text_encoder")
    te_file = tmp_path / "text_encoder-1.safetensors"
    save_lora(te_file, lora_state_dict(encoder), lora_metadata("text_encoder", "", groups, 1, family="qwen_image"))
    return transformer_file, te_file, state, model_keys


def test_to_webui_writes_comfyui_names_and_from_webui_reads_them_and_kohya_names_back(tmp_path, tiny_qwen):
    from safetensors.torch import save_file

    from hcpdiff.lora.webui_format import split_webui_key
    from hcpdiff.tools.lora_convert import main as lora_convert

    transformer_file, te_file, state, model_keys = small_lora_files(tmp_path)
    webui = tmp_path / "comfy.safetensors"
    assert lora_convert(["--to_webui", "--lora_path", str(transformer_file), "--dump_path", str(webui)]) == 0
    written = load_file(webui)
    with safe_open(webui, "pt") as file:
        assert file.metadata()["ss_base_model_version"] == "qwen_image"
    # ComfyUI's model keys are `diffusion_model.` + diffusers' state-dict keys; its loader finds a layer's LoRA
    # under `diffusion_model.<module>` (+ .lora_down.weight / .lora_up.weight / .alpha)
    layers = {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in written}
    assert len(layers) == 12 and all(layer.startswith("diffusion_model.") for layer in layers)
    assert all(layer.removeprefix("diffusion_model.") + ".weight" in model_keys for layer in layers)
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight" in written
    assert float(written["diffusion_model.transformer_blocks.0.attn.to_q.alpha"]) == 1.0

    back = tmp_path / "back"
    assert lora_convert(["--from_webui", "--lora_path", str(webui), "--dump_path", str(back)]) == 0
    (native_file,) = back.glob("transformer-*.safetensors")
    assert load_file(native_file).keys() == state.keys()
    assert all(torch.equal(load_file(native_file)[key], state[key]) for key in state)

    # kohya / musubi-tuner names (the module path with underscores), decoded by the model's module names
    kohya = {}
    for key, tensor in written.items():
        layer, suffix = split_webui_key(key)
        kohya[KOHYA_PREFIX + layer.removeprefix("diffusion_model.").replace(".", "_") + suffix] = tensor
    assert "lora_unet_transformer_blocks_0_attn_to_out_0.lora_up.weight" in kohya
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(kohya, kohya_file)
    back_kohya = tmp_path / "back_kohya"
    assert lora_convert(["--from_webui", "--lora_path", str(kohya_file), "--model", str(tiny_qwen),
                         "--dump_path", str(back_kohya)]) == 0
    (native_file,) = back_kohya.glob("transformer-*.safetensors")
    assert all(torch.equal(load_file(native_file)[key], state[key]) for key in state)

    with pytest.raises(ModelError, match=r"^--to_webui: a Qwen-Image text_encoder LoRA has no ComfyUI layout"):
        lora_convert(["--to_webui", "--lora_path_TE", str(te_file), "--dump_path", str(tmp_path / "te.safetensors")])


STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen, cli_in_process) -> tuple[Path, Path]:
    """(model, experiment folder) of lora_qwen_image.yaml overfitting one image for STEPS steps on the tiny model,
    run through the documented command (its entry point in-process) (fp32 on the CPU, rank 4 to keep it quick)."""
    exp, _ = train_in(tmp_path_factory.mktemp("qwen_run"), cli_in_process, lambda data: overfit_args(
        "cfgs/train/examples/lora_qwen_image.yaml", tiny_qwen, data, STEPS))
    return tiny_qwen, exp


@pytest.mark.e2e
def test_shipped_config_overfits_one_image(trained):
    _, exp = trained
    losses = logged_losses(exp, STEPS)
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, (first, last)


@pytest.mark.e2e
def test_checkpoint_holds_the_matched_layers(trained):
    _, exp = trained
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == [f"transformer-{STEPS}.safetensors"]
    metadata, layers, ups = checkpoint_layers(exp / "ckpts" / f"transformer-{STEPS}.safetensors")
    assert (metadata["family"], metadata["part"]) == ("qwen_image", "transformer")
    matched = matched_layers(exp)
    assert layers == matched
    assert ups and all(torch.count_nonzero(up) > 0 for up in ups)  # every adapted layer trained
    suffixes = {layer.split(".", 2)[2] for layer in matched}
    assert suffixes == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1",
                        "txt_mlp.net.2", "txt_mod.1"}  # the reference system's target modules
    assert "transformer_blocks.58.attn.to_add_out" in matched
    assert not any(layer.startswith("transformer_blocks.59.") and ("add_q" in layer or "add_out" in layer
                                                                   or "txt_mlp" in layer) for layer in matched)


def render_with_diffusers(pipe: QwenImagePipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, true CFG 2.5 against
    the shipped negative prompt, seed 42, pixels 0-255."""
    return diffusers_render(pipe, prompt="a red circle", negative_prompt=" ", true_cfg_scale=2.5)


@pytest.mark.e2e
def test_visualizer_and_to_diffusers_render_the_trained_lora_alike(trained, tmp_path, cli_in_process):
    model, exp = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_qwen_image.yaml", model, lora,
                                 "infer_args.guidance_scale=2.5")  # the pipeline's true_cfg_scale (default 4)

    converted = to_diffusers(lora, tmp_path / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    loaded = quiet_pipeline(QwenImagePipeline, model)
    base, with_lora = lora_renders(loaded, converted, render_with_diffusers)
    assert len(loaded.get_list_adapters()["transformer"]) == 1
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers


def test_unused_layers_are_exactly_those_without_gradient():
    """The layers the family leaves out of LoRA groups are the Linear layers a backward pass gives no gradient (the
    last block's text stream after its attention), and a group matching only those is one error."""
    from hcpdiff.lora import attach_lora
    from hcpdiff.lora.spec import LoraGroupSpec
    from hcpdiff.tools.tiny_qwen_image import build_qwen_transformer

    model = build_qwen_transformer(3)
    tokens, text = torch.randn(1, 16, 64), torch.randn(1, 5, 32)
    out = model(hidden_states=tokens, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), img_shapes=[[(1, 4, 4)]],
                return_dict=False)[0]
    out.square().sum().backward()
    no_gradient = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                   and (module.weight.grad is None or not module.weight.grad.any())}
    assert QWEN.unused_layers("transformer", model) == no_gradient
    assert QWEN.unused_layers("text_encoder", model) == frozenset()
    with pytest.raises(ConfigError, match=r"lora_transformer\[0\].layers: matches only layers whose outputs"):
        attach_lora(model, [LoraGroupSpec(lr=1e-4, rank=2, layers=[r"re:transformer_blocks\.2\.txt_mlp.*"])],
                    "transformer", "lora_transformer", QWEN.unused_layers("transformer", model))
