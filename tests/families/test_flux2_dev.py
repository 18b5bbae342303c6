"""FLUX.2 [dev] as a family beside FLUX.2 [klein] (flux2.py's Flux2Dev): detection both ways, its conditioner as
Flux2Pipeline's encode_prompt (Mistral 3, the system message, hidden states 10 / 20 / 30, the fixed 512 tokens) with
the embedded guidance, the denoiser equal to what a real pipeline call feeds its transformer (recorded, guidance
included), a batch of two training as its samples, and one run of the shipped config (its int8 base and
checkpointing switched off for the CPU) whose loss falls and whose LoRA the visualizer renders as
Flux2Pipeline.load_lora_weights renders the --to_diffusers file, and whose --to_webui file reads back as [dev]'s."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image
from safetensors.torch import load_file

from family_data import (CPU, LONG, REPO_ROOT, SHORT, batch_and_alone_losses, diffusers_render, fixed_noise_loss,
                         logged_losses, lora_renders, overfit_args, quiet_pipeline, to_diffusers, train_in,
                         transformer_calls, visualizer_render)
from hcpdiff.families import FAMILIES, detect_family, family_named, folder_config_reader
from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_demo_data import make_demo_data

DEV = family_named("flux2_dev")
KLEIN = family_named("flux2_klein")


@pytest.fixture(scope="module")
def tiny_dev(tmp_path_factory) -> Path:
    return DEV.make_tiny(tmp_path_factory.mktemp("flux2_dev") / "dev", seed=0)


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev) -> Flux2Pipeline:
    return quiet_pipeline(Flux2Pipeline, tiny_dev)


def test_dev_and_klein_detect_only_their_own_folders(tiny_dev, tmp_path):
    index = json.loads((tiny_dev / "model_index.json").read_text())
    read = folder_config_reader(tiny_dev)
    assert index["_class_name"] == "Flux2Pipeline"
    assert detect_family(index, read, str(tiny_dev), "test") is DEV
    assert DEV.matches({}, read) and not KLEIN.matches({}, read)  # no model_index.json: the guidance embedding
    assert not KLEIN.matches(index, read)
    klein = KLEIN.make_tiny(tmp_path / "klein", seed=0)
    klein_index = json.loads((klein / "model_index.json").read_text())
    klein_read = folder_config_reader(klein)
    assert not DEV.matches(klein_index, klein_read) and not DEV.matches({}, klein_read)
    assert detect_family(klein_index, klein_read, str(klein), "test") is KLEIN
    assert [f for f in FAMILIES if f.matches(index, read)] == [DEV]
    parts = load_model_parts(str(tiny_dev))
    assert parts.family is DEV and parts.pixel_step == 16
    assert type(parts.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert DEV.pipeline_warnings(parts.pipeline_settings) == []
    # the text model's layers from hidden state 30 on, the LM head and the vision side never reach the transformer
    unused = DEV.unused_layers("text_encoder", parts.text_encoder)
    assert {"lm_head", "model.language_model.layers.30.mlp.down_proj", "model.multi_modal_projector.linear_1",
            "model.vision_tower.transformer.layers.0.feed_forward.up_proj"} <= unused
    assert not any(name.startswith("model.language_model.layers.29.") for name in unused)
    assert DEV.unused_layers("transformer", parts.transformer) == frozenset()
    assert len(DEV.swappable_blocks(parts.transformer)) == 2 + 4


def test_conditioner_is_the_pipelines_encode_prompt_with_the_guidance(dev_pipe):
    conditioner = DEV.build_conditioner(dict(dev_pipe.components), 1, 0, guidance=2.5)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    expected, _ = dev_pipe.encode_prompt([SHORT, LONG], device=CPU)
    assert conditioning.keys() == {"encoder_hidden_states", "guidance"}
    assert torch.equal(conditioning["encoder_hidden_states"], expected)
    assert expected.shape == (2, 512, 3 * dev_pipe.text_encoder.config.text_config.hidden_size)
    assert torch.equal(conditioning["guidance"], torch.tensor([2.5, 2.5]))
    assert conditioner.cache_settings() == {"max_sequence_length": 512, "guidance": 2.5}
    cut = DEV.build_conditioner(dict(dev_pipe.components), 1, 0, max_sequence_length=64)([LONG], {}, CPU)
    assert cut["encoder_hidden_states"].shape[1] == 64 and torch.equal(cut["guidance"], torch.tensor([1.0]))


def test_denoise_is_what_the_pipeline_feeds_its_transformer_and_a_batch_trains_as_its_samples(dev_pipe):
    _, seen = transformer_calls(dev_pipe, prompt=LONG, height=64, width=48, guidance_scale=4.0)
    kwargs = seen["kwargs"]
    conditioning = DEV.build_conditioner(dict(dev_pipe.components), 1, 0, guidance=4.0)([LONG], {}, CPU)
    assert torch.equal(conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    assert torch.equal(conditioning["guidance"], kwargs["guidance"])
    assert torch.allclose(kwargs["timestep"], dev_pipe.scheduler.sigmas[1].expand(1), atol=1e-6)
    ids = kwargs["img_ids"]
    noisy = Flux2Pipeline._unpack_latents_with_ids(kwargs["hidden_states"], ids)  # 64 x 48 px / 16
    with torch.no_grad():
        prediction = DEV.denoise(dev_pipe.transformer, noisy, kwargs["timestep"], conditioning)
        other = DEV.denoise(dev_pipe.transformer, noisy, kwargs["timestep"], {**conditioning,
                                                                              "guidance": torch.tensor([1.0])})
    assert prediction.shape == (1, 128, 4, 3)
    assert torch.equal(Flux2Pipeline._pack_latents(prediction), seen["output"])
    assert not torch.allclose(prediction, other)  # the guidance embedding is read

    conditioner = DEV.build_conditioner(dict(dev_pipe.components), 1, 0, max_sequence_length=64)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 2, 128, 2, 3, generator=generator)
    sigmas = torch.tensor([0.4, 0.8])
    batched, alone = batch_and_alone_losses(DEV, dev_pipe.transformer, conditioner, [SHORT, LONG], latents, noise,
                                            sigmas)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)


def train_args(model: Path, data: Path, steps: int) -> list[str]:
    """The documented command on lora_flux2_dev.yaml, fp32 on the CPU without its int8 base and checkpointing, one 64
    px bucket, rank 4, prompts padded to 64 tokens, a LoRA on every Linear of the transformer (as klein's test: a
    blocks-only LoRA on the tiny random model shows no progress in a few steps)."""
    return overfit_args("cfgs/train/examples/lora_flux2_dev.yaml", model, data, steps, "model.quantize={}",
                        "model.gradient_checkpointing=false", "model.max_sequence_length=64",
                        "lora_transformer.0.layers=['']")


STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dev, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, its LoRA by lora_convert --to_diffusers) of lora_flux2_dev.yaml overfitting one
    image for STEPS steps on the tiny model."""
    workdir = tmp_path_factory.mktemp("dev_run")
    exp, _ = train_in(workdir, cli_in_process, lambda data: train_args(tiny_dev, data, STEPS))
    converted = to_diffusers(exp / "ckpts" / f"transformer-{STEPS}.safetensors",
                             workdir / "pytorch_lora_weights.safetensors")
    return tiny_dev, exp, converted


def render_with_diffusers(pipe: Flux2Pipeline) -> np.ndarray:
    """The visualizer's render below, by the pipeline's own prompt encoding: 64 px, 2 steps, guidance 4, seed 42."""
    return diffusers_render(pipe, prompt="a red circle", guidance_scale=4.0)


@pytest.mark.e2e
def test_shipped_config_overfits_one_image_and_renders_as_diffusers_loads_it(trained, tmp_path, cli_in_process):
    model, exp, converted = trained
    assert len(logged_losses(exp, STEPS)) == STEPS
    data = exp.parents[1] / "data"
    image, prompt = Image.open(data / "0.png"), (data / "0.txt").read_text().strip()
    pipe = quiet_pipeline(Flux2Pipeline, model)
    # the loss of a fixed draw of noise at guidance 1, as trained, before and after the LoRA
    before = fixed_noise_loss(DEV, pipe, image, prompt, max_sequence_length=64)
    base, with_lora = lora_renders(pipe, converted, render_with_diffusers)
    assert {key.split(".")[0] for key in load_file(converted)} == {"transformer"}
    assert len(pipe.get_list_adapters()["transformer"]) == 1
    after = fixed_noise_loss(DEV, pipe, image, prompt, max_sequence_length=64)
    assert after < 0.95 * before, (before, after)

    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    rendered = visualizer_render(cli_in_process, tmp_path, "cfgs/infer/text2img_flux2_dev.yaml", model, lora)
    assert np.abs(with_lora - base).mean() > 1  # the LoRA changes the image
    assert np.abs(with_lora - rendered).max() <= 2  # hcpdiff's merge renders as diffusers' peft layers


@pytest.mark.e2e
def test_to_webui_kohya_file_is_a_dev_file_and_reads_back(trained, tmp_path):
    """The trained LoRA (guidance embedding included) as a kohya / ComfyUI file in BFL's FLUX.2 names, named [dev] in
    its metadata, which --from_webui reads back as a flux2_dev LoRA with the same tensors."""
    from safetensors import safe_open

    from hcpdiff.tools.lora_convert import main as lora_convert
    from hcpdiff.tools.lora_convert import webui_file_family

    _, exp, _ = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    webui, back = tmp_path / "webui.safetensors", tmp_path / "back"
    assert lora_convert(["--to_webui", "--lora_path", str(lora), "--dump_path", str(webui)]) == 0
    written = load_file(webui)
    with safe_open(webui, "pt") as file:
        metadata = file.metadata()
    assert metadata["modelspec.architecture"] == "flux-2-dev/lora" and "lora_unet_guidance_in_in_layer.alpha" in written
    assert webui_file_family(written, metadata) is DEV and webui_file_family(written, {}) is DEV  # guidance_in
    assert lora_convert(["--from_webui", "--lora_path", str(webui), "--dump_path", str(back)]) == 0
    (restored,) = back.glob("transformer-*.safetensors")
    with safe_open(restored, "pt") as file:
        assert file.metadata()["family"] == "flux2_dev"
    original, got = load_file(lora), load_file(restored)
    assert got.keys() == original.keys() and all(torch.allclose(got[k], original[k], atol=1e-6) for k in original)


def test_a_processor_that_needs_torchvision_is_one_error(monkeypatch):
    """The real tokenizer/ is a PixtralProcessor, which transformers builds only with torchvision: without it, one
    line saying so (the bare tokenizer's chat template is not the processor's, so it is not loaded instead)."""
    import transformers

    from hcpdiff.errors import ModelError

    def needs_torchvision(*args, **kwargs):
        raise ImportError("PixtralProcessor requires the Torchvision library but it was not found.\nmore")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    load = DEV.part_loaders("black-forest-labs/FLUX.2-dev", {})["tokenizer"]
    with pytest.raises(ModelError, match=r"^black-forest-labs/FLUX.2-dev/tokenizer: FLUX.2 \[dev\]'s "
                                         r"PixtralProcessor needs torchvision \(pip install torchvision\)") as error:
        load()
    assert "\n" not in str(error.value)


@pytest.mark.e2e
def test_block_swap_trains_exactly_the_plain_run(tiny_dev, tmp_path, cli_in_process):
    """FLUX.2's block lists (double- then single-stream blocks, shared with klein): the shipped config (its
    checkpointing on, the base unquantized) with model.blocks_to_swap=3 logs the plain run's losses and saves its LoRA,
    bit for bit (bf16: the frozen weights are fresh aligned tensors in both runs, as in tests/train/test_memory.py)."""
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(tmp_path / "data", num=2)
    for name, extra in (("plain", []), ("swap", ["model.blocks_to_swap=3"])):
        args = [arg for arg in train_args(tiny_dev, data, 2) if not arg.startswith(("mixed_precision", "model.grad",
                                                                                     "data.dataset1.bucket.target"))]
        result = cli_in_process([*args, "mixed_precision=bf16", 'data.dataset1.bucket.target_area=${hcp.eval:"32*32"}',
                                 f"exp_dir=exps/{name}", *extra], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    plain, swap = (tmp_path / "exps" / name for name in ("plain", "swap"))
    losses = [re.findall(r"step \d+/2 loss ([\d.]+)", (exp / "train.log").read_text()) for exp in (plain, swap)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    assert "3 denoiser blocks swap in from CPU" in (swap / "train.log").read_text()
    left, right = (load_file(exp / "ckpts" / "transformer-2.safetensors") for exp in (plain, swap))
    assert left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)
