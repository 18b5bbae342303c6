"""FLUX.1 as a family: detection, packing and ids as FluxPipeline's, its conditioner and prompt encoding as the
pipeline's, the flow-matching objective, fp16 refused, a run that overfits one image, and two processes against
one (resume: tests/families/test_family_resume.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.families.flux import pack_latents, unpack_latents
from hcpdiff.models import load_model_parts
from hcpdiff.objectives.flow_matching import FlowMatchingObjective
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.specs import LossSpec


@pytest.fixture(scope="module")
def tiny_flux(tiny_models) -> Path:
    return tiny_models("flux")


@pytest.fixture(scope="module")
def tiny_schnell(tiny_models) -> Path:
    return tiny_models("flux-schnell")


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux) -> FluxPipeline:
    return FluxPipeline.from_pretrained(tiny_flux)


def test_tiny_models_are_detected_as_flux_with_pixel_step_16(tiny_flux, tiny_schnell):
    import json

    for folder in (tiny_flux, tiny_schnell):
        index = json.loads((folder / "model_index.json").read_text())
        family = detect_family(index, folder_config_reader(folder), str(folder), "test")
        assert family.name == "flux"
        assert family.pixel_step(folder_config_reader(folder)) == 16  # VAE 8x, 2x2 packing
    parts = load_model_parts(str(tiny_schnell))
    assert parts.family.name == "flux" and parts.pixel_step == 16
    assert type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert parts.vae.config.latent_channels == 16 and parts.vae.config.shift_factor


def test_flux_fill_and_control_transformers_are_not_detected_as_text_to_image_flux():
    flux = family_named("flux")
    configs = {"transformer": {"_class_name": "FluxTransformer2DModel", "in_channels": 384}}
    assert not flux.matches({"_class_name": "FluxFillPipeline"}, configs.get)
    configs["transformer"]["in_channels"] = 64
    assert flux.matches({}, configs.get)


def test_packing_and_ids_equal_flux_pipeline(flux_pipe):
    height_px, width_px = 64, 96
    packed, ids = flux_pipe.prepare_latents(2, 16, height_px, width_px, torch.float32, torch.device("cpu"),
                                            torch.Generator().manual_seed(0))
    latents = randn_tensor((2, 16, 8, 12), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    ours, our_ids = pack_latents(latents)
    assert torch.equal(ours, packed) and torch.equal(our_ids, ids)
    assert torch.equal(unpack_latents(ours, 8, 12), latents)
    assert torch.equal(unpack_latents(ours, 8, 12),
                       FluxPipeline._unpack_latents(packed, height_px, width_px, flux_pipe.vae_scale_factor))


def test_denoise_is_the_pipelines_transformer_call(flux_pipe):
    family = family_named("flux")
    components = dict(flux_pipe.components)
    conditioner = family.build_conditioner(components, 1, 0, guidance=3.5)
    prompts = ["a red circle", "a blue square"]
    conditioning = conditioner(prompts, {"prompts": prompts}, torch.device("cpu"))
    embeds, pooled, text_ids = flux_pipe.encode_prompt(prompts, device="cpu", max_sequence_length=512)
    assert torch.equal(conditioning["encoder_hidden_states"], embeds)
    assert torch.equal(conditioning["pooled_projections"], pooled)
    assert torch.equal(conditioning["guidance"], torch.tensor([3.5, 3.5]))
    latents = torch.randn(2, 16, 4, 6)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = family.denoise(flux_pipe.transformer, latents, sigmas, conditioning)
        packed, image_ids = pack_latents(latents)
        # FluxPipeline.__call__'s transformer call, with timestep = t / 1000 = sigma
        theirs = flux_pipe.transformer(hidden_states=packed, timestep=sigmas, guidance=torch.tensor([3.5, 3.5]),
                                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                       img_ids=image_ids, return_dict=False)[0]
    assert ours.shape == latents.shape
    assert torch.allclose(ours, unpack_latents(theirs, 4, 6), atol=1e-6)


def test_only_schnell_is_warned_about_as_distilled(tiny_flux, tiny_schnell):
    warnings = {name: family_named("flux").run_warnings(load_model_parts(str(model)).noise_scheduler)
                for name, model in (("dev", tiny_flux), ("schnell", tiny_schnell))}
    assert warnings["dev"] == [] and "train on FLUX.1-dev" in warnings["schnell"][0]


def test_schnell_has_no_guidance_and_256_t5_tokens(tiny_schnell):
    parts = load_model_parts(str(tiny_schnell))
    conditioner = parts.family.build_conditioner(parts.components, 1, 0, guidance=1.0)
    conditioning = conditioner(["a cat"], {}, torch.device("cpu"))
    assert "guidance" not in conditioning
    assert conditioning["encoder_hidden_states"].shape[1] == 256
    shorter = parts.family.build_conditioner(parts.components, 1, 0, max_sequence_length=64)
    assert shorter(["a cat"], {}, torch.device("cpu"))["encoder_hidden_states"].shape[1] == 64
    objective = parts.family.build_objective(parts.noise_scheduler, LossSpec())
    assert isinstance(objective, FlowMatchingObjective) and (objective.shift, objective.shift_value) == ("static", 1.0)


def test_prompt_args_weight_the_t5_sequence_only(flux_pipe):
    family = family_named("flux")
    plain = family.prompt_args(flux_pipe, ["a red circle"], [""], clip_skip=0, all_prompts=["a red circle"])
    embeds, pooled, _ = flux_pipe.encode_prompt(["a red circle"], device="cpu", max_sequence_length=512)
    # the same tokens as the pipeline's (no_grad vs grad kernels differ in the last bit)
    assert torch.allclose(plain["prompt_embeds"], embeds, atol=1e-5)
    assert torch.allclose(plain["pooled_prompt_embeds"], pooled, atol=1e-5)
    weighted = family.prompt_args(flux_pipe, ["a (red:1.5) circle"], [""], clip_skip=0, all_prompts=["x"])
    assert torch.allclose(weighted["pooled_prompt_embeds"], pooled, atol=1e-5)  # CLIP's pooled text is unweighted
    assert not torch.allclose(weighted["prompt_embeds"], embeds, atol=1e-3)


def test_ddpm_loss_keys_on_flux_are_one_error():
    family = family_named("flux")
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ConfigError, match=r"^train.loss.min_snr_gamma: min_snr_gamma is a DDPM option, but a FLUX"):
        family.build_objective(FlowMatchEulerDiscreteScheduler(), LossSpec(min_snr_gamma=5.0))
    with pytest.raises(ConfigError, match=r"^train.loss.sigma_sampling: sigma_sampling is a flow-matching option"):
        family_named("sd").build_objective(None, LossSpec(sigma_sampling="uniform"))


def train_args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_flux.yaml",
            f"model.pretrained_model_name_or_path={model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}',
            "data.dataset1.bucket.num_bucket=1", *extra]


@pytest.mark.e2e
@pytest.mark.parametrize("override, message", [
    ("mixed_precision=fp16", "error: mixed_precision: fp16 makes FLUX.1 train NaN losses; use bf16"),
    ("train.loss.min_snr_gamma=5", "error: train.loss.min_snr_gamma: min_snr_gamma is a DDPM option, but a FLUX.1"),
])
def test_settings_flux_cannot_train_with_are_one_error_line(workdir, tiny_flux, cli_in_process, override, message):
    data = make_demo_data(workdir / "data", num=1)
    result = cli_in_process(train_args(tiny_flux, data, override, "train.train_steps=1"), cwd=workdir)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "latent cache" not in result.stderr  # refused before any image is read or encoded


@pytest.mark.e2e
def test_schnell_overfits_one_image_through_accelerate_launch(workdir, tiny_schnell, cli):
    """The README's launch command on FLUX.1-schnell (dev trains in the contract, resume and two-process tests)."""
    data = make_demo_data(workdir / "data", num=1)
    launch = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    result = cli([*launch, *train_args(tiny_schnell, data, "mixed_precision=null", "train.train_steps=40",
                                       "train.log_step=1", "train.save_step=1000", "transformer_lr=3e-3",
                                       "data.dataset1.batch_size=1", "train.loss.logit_std=0.3")], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = next((workdir / "exps").iterdir())
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == ["transformer-40.safetensors"]
    log = exp / "train.log"
    losses = [float(value) for value in re.findall(r"step \d+/40 loss ([\d.]+)", log.read_text())]
    assert len(losses) == 40
    assert "text embeddings cached in memory for 1 prompts" in log.read_text()
    # schnell is step-distilled: the run says once what to train on instead
    assert log.read_text().count("this looks like FLUX.1-schnell") == 1
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)


@pytest.mark.e2e
def test_make_tiny_model_cli_builds_schnell_that_flux_pipeline_loads(tmp_path, cli_in_process):
    done = cli_in_process(["-m", "hcpdiff.tools.make_tiny_model", str(tmp_path / "schnell"), "--family",
                           "flux-schnell"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    pipe = FluxPipeline.from_pretrained(tmp_path / "schnell")
    assert not pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.use_dynamic_shifting is False


def assert_same_loras(a: Path, b: Path, atol: float = 0.0) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    worst = max(float((left[key] - right[key]).abs().max()) for key in left)
    assert worst <= atol, f"{a.name}: weights differ by up to {worst}"
    assert any(float(value.abs().max()) > 100 * atol for key, value in left.items() if ".lora_B." in key)  # trained


@pytest.mark.e2e
def test_two_processes_train_what_one_process_with_the_same_total_batch_trains(workdir, tiny_flux, cli, cli_in_process,
                                                                              free_port):
    """torchrun, 2 processes x batch 1, against 1 process x batch 2, with a CLIP LoRA beside the transformer's (under
    DDP FluxPipeline's encode_prompt reads the wrapped encoder's dtype). Each sample draws its noise and sigma from
    its own seed (dataset index, epoch), so both end with the same LoRAs, to float summation order. Two images: every
    step's global batch is both of them in either layout (the sampler splits batches, not samples, among processes)."""
    data = make_demo_data(workdir / "data", num=2)
    args = train_args(tiny_flux, data, "mixed_precision=null", "train.train_steps=2", "transformer_lr=1e-3",
                      "lora_text_encoder=[{lr: 1e-3, rank: 4, alpha: 4, layers: ['re:.*self_attn$']}]")
    one = cli_in_process([*args, "data.dataset1.batch_size=2", "exp_dir=exps/one"], cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "hcpdiff.train_ac"]
    two = cli([*torchrun, *args[2:], "data.dataset1.batch_size=1", "exp_dir=exps/two"], cwd=workdir, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "total batch size 2 (batch 1 x accumulation 1 x processes 2)" in (workdir / "exps/two/train.log").read_text()
    for part in ("transformer", "text_encoder"):
        assert_same_loras(workdir / f"exps/one/ckpts/{part}-2.safetensors",
                          workdir / f"exps/two/ckpts/{part}-2.safetensors", atol=1e-6)
