"""Wan as a family: detection (Wan2.1, Wan2.2 TI2V and A14B layouts; the image-to-video and VACE pipelines are not
it), its conditioner as WanPipeline's encode_prompt, latents (images as 1-frame clips, clips of 4k + 1 frames) as the
pipeline normalises them, the denoiser call equal to what a real pipeline call feeds its transformer (recorded), a batch
training as its samples one by one, the sampler's flow shift, fp16 refused (Wan2.2 A14B's experts:
test_wan_a14b.py), and one run of the shipped config whose
loss falls and whose LoRA the visualizer renders (an .mp4 with its settings in the tags) as WanPipeline's
load_lora_weights renders the --to_diffusers file (and the --to_webui file in ComfyUI's names, which --from_webui
reads back)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from PIL import Image

from family_data import (CPU, LONG, REPO_ROOT, SHORT, batch_and_alone_losses, fixed_noise_losses, logged_losses,
                         partial_lora, quiet_pipeline, to_diffusers, transformer_calls, visualizer_output)
from hcpdiff.errors import ConfigError
from hcpdiff.families import detect_family, family_named, folder_config_reader
from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.specs import LossSpec

WAN = family_named("wan")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    return WAN.make_tiny(tmp_path_factory.mktemp("wan") / "wan", seed=0)


@pytest.fixture(scope="module")
def wan_pipe(tiny_wan) -> WanPipeline:
    return quiet_pipeline(WanPipeline, tiny_wan)


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory) -> WanPipeline:
    return quiet_pipeline(WanPipeline, WAN.make_tiny(tmp_path_factory.mktemp("ti2v") / "m", variant="wan2.2-ti2v"))


def test_tiny_models_are_detected_as_wan(tiny_wan, wan_pipe, ti2v_pipe):
    index = json.loads((tiny_wan / "model_index.json").read_text())
    read = folder_config_reader(tiny_wan)
    assert detect_family(index, read, str(tiny_wan), "test") is WAN
    for other in ("WanImageToVideoPipeline", "WanVACEPipeline", "WanVideoToVideoPipeline", "WanAnimatePipeline"):
        assert not WAN.matches({"_class_name": other}, read)
    assert WAN.matches({}, read)  # no model_index.json: the transformer config (no image embedder)
    parts = load_model_parts(str(tiny_wan))
    assert parts.family is WAN and parts.pixel_step == 16 == wan_pipe.vae_scale_factor_spatial * 2
    assert type(parts.text_encoder).__name__ == "UMT5EncoderModel"
    assert WAN.pixel_step(folder_config_reader(Path(ti2v_pipe.transformer.config._name_or_path).parent)) == 32
    assert ti2v_pipe.config.expand_timesteps and ti2v_pipe.vae_scale_factor_spatial == 16


def test_training_scheduler_shifts_by_the_samplers_flow_shift(wan_pipe):
    scheduler = WAN.training_scheduler(dict(wan_pipe.scheduler.config))
    objective = WAN.build_objective(scheduler, LossSpec(sigma_sampling="uniform"))
    assert (objective.shift, objective.shift_value) == ("static", 3.0)
    assert wan_pipe.scheduler.config.flow_shift == 3.0
    # UniPC's flow sigmas at 4 steps are the same static shift of its unshifted ones
    wan_pipe.scheduler.set_timesteps(4)
    plain = torch.linspace(1, 0, 1000 + 1)[:-1]
    shifted = 3.0 * plain / (1 + 2.0 * plain)
    assert torch.allclose(wan_pipe.scheduler.sigmas[0], shifted[0], atol=1e-3)


def test_fp16_is_refused():
    with pytest.raises(ConfigError, match=r"^mixed_precision: fp16 overflows Wan"):
        WAN.check_run("fp16")
    WAN.check_run("bf16")


def test_conditioner_is_the_pipelines_encode_prompt(wan_pipe):
    conditioner = WAN.build_conditioner(dict(wan_pipe.components), 1, 0)
    conditioning = conditioner([SHORT, LONG], {}, CPU)
    expected, _ = wan_pipe.encode_prompt([SHORT, LONG], do_classifier_free_guidance=False, device=CPU,
                                         max_sequence_length=512)
    assert conditioning.keys() == {"encoder_hidden_states"} and expected.shape == (2, 512, 32)
    assert torch.equal(conditioning["encoder_hidden_states"], expected)
    plain = WAN.prompt_args(wan_pipe, [SHORT], [""], clip_skip=0, all_prompts=[])
    with torch.no_grad():  # as the visualizer encodes
        alone, _ = wan_pipe.encode_prompt([SHORT], do_classifier_free_guidance=False, device=CPU,
                                          max_sequence_length=512)
    assert torch.equal(plain["prompt_embeds"], alone)  # unweighted: the pipeline's own states
    weighted = WAN.prompt_args(wan_pipe, [SHORT, "a (red:1.5) circle"], [""] * 2, clip_skip=0, all_prompts=[])
    assert torch.allclose(weighted["prompt_embeds"][0], expected[0], atol=1e-5)  # tokenised span by span alike
    assert not torch.allclose(weighted["prompt_embeds"][1], expected[0])
    assert torch.count_nonzero(weighted["prompt_embeds"][1][20:]) == 0  # zero past its tokens, as the pipeline


def test_latents_are_normalised_as_the_pipeline_denormalises_them(wan_pipe):
    vae = wan_pipe.vae
    image, clip = torch.rand(2, 3, 32, 48) * 2 - 1, torch.rand(1, 3, 5, 32, 48) * 2 - 1
    mean, std = WAN.encode_latent_dist(vae, image)
    assert mean.shape == std.shape == (2, 16, 1, 4, 6)  # an image is a 1-frame clip
    clip_mean, _ = WAN.encode_latent_dist(vae, clip)
    assert clip_mean.shape == (1, 16, 2, 4, 6)  # 4k + 1 frames -> k + 1 latent frames
    with torch.no_grad():
        raw = vae.encode(image.unsqueeze(2)).latent_dist
    # WanPipeline.__call__ before vae.decode: latents / (1 / latents_std) + latents_mean
    stats = [torch.tensor(v).view(1, -1, 1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std)]
    assert torch.allclose(mean * stats[1] + stats[0], raw.mean, atol=1e-5)
    assert torch.allclose(std * stats[1], raw.std, atol=1e-5)


@pytest.mark.parametrize("variant", ["wan", "wan2.2-ti2v"])
def test_conditioner_and_denoise_are_what_the_pipeline_feeds_its_transformer(variant, wan_pipe, ti2v_pipe):
    pipe = wan_pipe if variant == "wan" else ti2v_pipe
    # the transformer's second call rendering 5 frames of 64 x 48 px without guidance
    _, seen = transformer_calls(pipe, prompt=LONG, height=64, width=48, num_frames=5, guidance_scale=1.0)
    kwargs = seen["kwargs"]
    with torch.no_grad():  # as the pipeline runs
        conditioning = WAN.build_conditioner(dict(pipe.components), 1, 0)([LONG], {}, CPU)
    assert torch.equal(conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
    noisy = kwargs["hidden_states"]
    assert noisy.shape[2] == 2  # 5 frames
    timestep = kwargs["timestep"]
    if variant == "wan2.2-ti2v":  # expand_timesteps: one per latent token, all the step's t in text to video
        assert timestep.shape == (1, 2 * 2 * 1) and torch.all(timestep == timestep[0, 0])
        timestep = timestep[:, 0]
    # UniPC's timesteps are the step's sigma x 1000 rounded to an integer
    assert torch.allclose(timestep / 1000, pipe.scheduler.sigmas[1].expand(1), atol=1e-3)
    with torch.no_grad():
        prediction = WAN.denoise(pipe.transformer, noisy, timestep / 1000, conditioning)
    if variant == "wan":
        assert torch.equal(prediction, seen["output"])
    else:  # the per-sample timestep reads as the per-token one, to float rounding
        assert torch.allclose(prediction, seen["output"], atol=1e-5)


def test_a_batch_trains_as_its_samples_one_by_one(wan_pipe):
    conditioner = WAN.build_conditioner(dict(wan_pipe.components), 1, 0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = (torch.randn(2, 16, 2, 4, 6, generator=generator) for _ in range(2))
    sigmas = torch.tensor([0.4, 0.8])
    batched, alone = batch_and_alone_losses(WAN, wan_pipe.transformer, conditioner, [SHORT, LONG], latents, noise,
                                            sigmas)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-6), (batched, alone)
    assert not torch.allclose(alone[0], alone[1])


def test_num_frames_is_4k_plus_1_and_refused_for_an_image_family():
    from hcpdiff.infer.video import sampling_args

    assert sampling_args(WAN, {"num_frames": None, "width": 64}, "k") == {"num_frames": 1, "width": 64}
    with pytest.raises(ConfigError, match=r"^num_frames: 6 is not 4k \+ 1 .* use 5$"):
        sampling_args(WAN, {"num_frames": 6}, "k")
    with pytest.raises(ConfigError, match=r"^infer_args.num_frames: a Stable Diffusion 1.x / 2.x model renders images"):
        sampling_args(family_named("sd"), {"num_frames": 5}, "infer_args.num_frames")
    assert sampling_args(family_named("sd"), {"num_frames": None, "width": 64}, "k") == {"width": 64}


def train_args(model: Path, data: Path, steps: int) -> list[str]:
    """The documented command on lora_wan_t2v.yaml, fp32 on the CPU, one 64 x 48 bucket, rank 4, prompts padded to 64
    tokens instead of 512 (CPU time), a LoRA on every Linear of the transformer (`''`: the tiny random model's blocks
    alone move its output too little in a few steps); the source's videos train as 5-frame clips."""
    return ["-m", "hcpdiff.train_ac_single", "--cfg", WAN.train_config, f"model.pretrained_model_name_or_path={model}",
            "mixed_precision=null", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}/metadata.jsonl",
            "+data.dataset1.source.data_source1.num_frames=5", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*48"}',
            "data.dataset1.bucket.num_bucket=1", f"train.train_steps={steps}", "train.log_step=1",
            "train.save_step=1000", "transformer_lr=1e-2", "train.loss.logit_std=0.3", "lora_transformer.0.rank=4",
            "lora_transformer.0.alpha=4", "model.max_sequence_length=64", "lora_transformer.0.layers=['']"]


STEPS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_wan, cli_in_process) -> tuple[Path, Path, Path]:
    """(model, experiment folder, its LoRA by lora_convert --to_diffusers) of lora_wan_t2v.yaml for STEPS steps on a
    dataset of one PyAV-written clip and one image."""
    from hcpdiff.infer.video import save_clip

    workdir = tmp_path_factory.mktemp("wan_run")
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(workdir / "data", num=1)
    image = Image.open(data / "0.png").convert("RGB").resize((64, 48))
    frames = [Image.fromarray(np.roll(np.asarray(image), 4 * i, axis=1)) for i in range(5)]  # the image, panning
    save_clip(frames, data / "pan.mp4", 16)
    rows = [{"video": "pan.mp4", "text": "a panning shot"}, {"image": "0.png", "text": (data / "0.txt").read_text()}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = cli_in_process(train_args(tiny_wan, data, STEPS), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = next((workdir / "exps").iterdir())
    converted = to_diffusers(exp / "ckpts" / f"transformer-{STEPS}.safetensors",
                             workdir / "pytorch_lora_weights.safetensors")
    return tiny_wan, exp, converted


@pytest.mark.e2e
def test_shipped_config_trains_a_clip_and_an_image_and_overfits(trained):
    model, exp, converted = trained
    log = (exp / "train.log").read_text()
    assert len(logged_losses(exp, STEPS)) == STEPS
    assert re.search(r"64 x 48 .*\s5\s+1", log)  # the clip's bucket: 64 x 48, 5 frames, 1 item
    data = exp.parents[1] / "data"
    image, prompt = Image.open(data / "0.png"), (data / "0.txt").read_text()
    pipe = WanPipeline.from_pretrained(model)
    # the loss of one image (a 1-frame clip) at 64 x 48 over fixed noise draws, before and after the LoRA
    before, after = fixed_noise_losses(WAN, pipe, converted, image, prompt, (64, 48), max_sequence_length=64)
    assert after < 0.95 * before, (before, after)


@pytest.mark.e2e
def test_visualizer_writes_the_clip_the_pipeline_renders_with_the_lora(trained, tmp_path, cli_in_process):
    """The visualizer's .mp4 (its settings in the file's tags) has the frames WanPipeline renders with the
    --to_diffusers file loaded by load_lora_weights (to H.264's rounding)."""
    from hcpdiff.infer.video import read_clip_metadata

    model, exp, converted = trained
    lora = exp / "ckpts" / f"transformer-{STEPS}.safetensors"
    clip_file = visualizer_output(cli_in_process, tmp_path, WAN.infer_config, model, lora, "infer_args.num_frames=5",
                                  "infer_args.guidance_scale=2.5", height=48, suffix=".mp4")
    tags = read_clip_metadata(clip_file)
    assert tags["comment"].startswith("a red circle\nNegative prompt: \nSteps: 2")
    info = json.loads(tags["description"])
    assert (info["num_frames"], info["fps"], info["seed"], info["lora"]) == (5, 16, 42, [str(lora)])
    import av

    with av.open(str(clip_file)) as container:
        rendered = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)

    loaded = quiet_pipeline(WanPipeline, model)

    def render() -> np.ndarray:
        with torch.no_grad():
            frames = loaded(prompt="a red circle", negative_prompt="", guidance_scale=2.5, height=48, width=64,
                            num_frames=5, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(42),
                            output_type="np").frames[0]
        return (frames * 255).round().astype(np.int16)

    base = render()
    loaded.load_lora_weights(str(converted))
    with_lora = render()
    # ComfyUI's names (`diffusion_model.` + Wan's original layout), which WanPipeline's loader converts itself: the
    # same clip; --from_webui gives the native file's tensors back
    from safetensors.torch import load_file

    from hcpdiff.tools.lora_convert import main as lora_convert

    webui, back = tmp_path / "webui.safetensors", tmp_path / "back"
    assert lora_convert(["--to_webui", "--lora_path", str(lora), "--dump_path", str(webui)]) == 0
    keys = load_file(webui)
    assert all(key.startswith("diffusion_model.") for key in keys)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys and "diffusion_model.head.head.alpha" in keys
    assert "diffusion_model.blocks.1.cross_attn.o.lora_up.weight" in keys
    assert "diffusion_model.blocks.0.ffn.2.alpha" in keys
    assert lora_convert(["--from_webui", "--lora_path", str(webui), "--dump_path", str(back)]) == 0
    (restored_file,) = sorted(back.glob("transformer-*.safetensors"))
    restored, original = load_file(restored_file), load_file(lora)
    assert restored.keys() == original.keys()
    assert all(torch.allclose(restored[key], original[key]) for key in original)
    # diffusers' converter reads the blocks' alphas only: the blocks' LoRA, both ways, renders alike
    blocks = partial_lora(lora, lambda key: key.startswith("blocks."), tmp_path / "blocks")
    renders = []
    for flag in ("--to_diffusers", "--to_webui"):
        out = tmp_path / f"blocks{flag}.safetensors"
        assert lora_convert([flag, "--lora_path", str(blocks), "--dump_path", str(out)]) == 0
        loaded = quiet_pipeline(WanPipeline, model)
        loaded.load_lora_weights(str(out))
        renders.append(render())
    assert np.abs(renders[0] - renders[1]).max() <= 1 and np.abs(renders[0] - base).mean() > 1
    assert rendered.shape == with_lora.shape == (5, 48, 64, 3)
    assert np.abs(with_lora - base).mean() > 2  # the LoRA changes the clip
    # hcpdiff's merge renders as diffusers' peft layers: the same frames, through the same H.264 encoding
    from hcpdiff.infer.video import save_clip

    save_clip([Image.fromarray(frame.astype(np.uint8)) for frame in with_lora], tmp_path / "theirs.mp4", 16)
    with av.open(str(tmp_path / "theirs.mp4")) as container:
        theirs = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)
    assert np.abs(theirs - rendered).mean() < 1, np.abs(theirs - rendered).mean()
