"""Wan2.2 A14B's two experts through the Wan family: the experts split the sigmas where WanPipeline switches its
transformers (recorded), `model.expert` picks the one to train (missing, unknown or on a one-denoiser model: one error
line), that expert alone loads for training and receives timesteps of its range only (recorded inside the runs of the
shipped config), previews render with both experts, the checkpoint says its expert, and the visualizer merges each
expert's LoRA into its own transformer as WanPipeline.load_lora_weights(..., load_into_transformer_2=True) does."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from PIL import Image
from safetensors import safe_open

from hcpdiff.families import family_named
from hcpdiff.families.base import Expert
from hcpdiff.tools.make_demo_data import make_demo_data

WAN = family_named("wan")
REPO_ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = 0.875  # the tiny A14B's boundary_ratio, as the real model_index.json
STEPS = 2
EXPERTS = ("high_noise", "low_noise")


@pytest.fixture(scope="module")
def a14b(tiny_models) -> Path:
    return tiny_models("wan2.2-a14b")


def test_the_experts_split_the_steps_where_the_pipeline_switches_transformers(a14b):
    pipe = WanPipeline.from_pretrained(a14b)
    pipe.set_progress_bar_config(disable=True)
    experts = WAN.experts({"boundary_ratio": pipe.config.boundary_ratio})
    assert experts == (Expert("high_noise", "transformer", BOUNDARY, 1.0),
                       Expert("low_noise", "transformer_2", 0.0, BOUNDARY))
    assert WAN.experts({}) == ()
    calls = []
    for folder in ("transformer", "transformer_2"):
        getattr(pipe, folder).register_forward_pre_hook(
            lambda module, args, kwargs, folder=folder: calls.append((folder, float(kwargs["timestep"][0]))),
            with_kwargs=True)
    with torch.no_grad():
        pipe(prompt="a red circle", height=32, width=32, num_frames=1, num_inference_steps=6, guidance_scale=1.0,
             max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert {folder for folder, _ in calls} == {"transformer", "transformer_2"}
    for folder, timestep in calls:  # the transformer told t = 1000 sigma: the expert whose range holds sigma
        (holder,) = [e for e in experts if e.holds(torch.tensor([timestep / 1000.0]))[0]]
        assert holder.folder == folder, (folder, timestep)


def test_a_render_loads_both_experts_and_training_the_chosen_one_alone(a14b):
    from hcpdiff.models import load_model_parts

    parts = load_model_parts(str(a14b))  # the visualizer's: each expert in its own folder's place
    assert parts.expert is None and parts.expert_loaders == {}
    assert {"transformer", "transformer_2"} <= parts.components.keys()
    low = load_model_parts(str(a14b), expert="low_noise", expert_key="model.expert")
    assert low.expert.name == "low_noise" and "transformer_2" not in low.components
    assert set(low.expert_loaders) == {"transformer"}
    assert torch.equal(low.denoiser.proj_out.weight, parts.components["transformer_2"].proj_out.weight)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_an_experts_sigmas_are_the_distribution_within_its_range_sample_by_sample(sampling):
    """Uniform and logit-normal sampling draw the truncated distribution exactly (by its inverse CDF), mode sampling
    by redrawing: each as the full distribution's draws that fall in the range, a batch as its samples one by one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hcpdiff.errors import ConfigError
    from hcpdiff.objectives.flow_matching import FlowMatchingObjective, restricted_to_sigmas

    torch.manual_seed(0)
    full = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=12.0), sigma_sampling=sampling,
                                 logit_mean=0.3, shift="static", shift_value=12.0)
    latents = torch.zeros(20000, 1, 1, 1)
    reference = full.sample_sigmas(latents)
    for low, high in ((BOUNDARY, 1.0), (0.0, BOUNDARY)):
        objective = restricted_to_sigmas(full, low, high, "model.expert")
        sigmas = objective.sample_sigmas(latents)
        assert sigmas.min() >= low and (sigmas.max() < high or high == 1.0)
        kept = reference[(reference >= low) & ((reference < high) | (high >= 1.0))]
        for q in (0.1, 0.5, 0.9):
            assert abs(torch.quantile(sigmas, q) - torch.quantile(kept, q)) < 0.01, (low, q)
        if sampling == "uniform":  # uniform over the range's unshifted values, as DiffSynth-Studio draws
            unshifted, edges = sigmas / (12.0 - 11.0 * sigmas), [s / (12.0 - 11.0 * s) for s in (low, high)]
            assert abs(unshifted.mean().item() - sum(edges) / 2) < 0.01
        generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
        both = objective.sample_sigmas(latents[:2], generators)
        alone = [objective.sample_sigmas(latents[:1], [torch.Generator().manual_seed(seed)]) for seed in (3, 4)]
        assert torch.equal(both, torch.cat(alone))
    with pytest.raises(ConfigError, match=r"^model.expert: only a flow-matching objective"):
        restricted_to_sigmas(object(), 0.0, 0.5, "model.expert")


def test_a_lora_of_an_expert_the_model_lacks_is_one_error():
    from hcpdiff.errors import ConfigError
    from hcpdiff.infer.pipeline import expert_target

    pipe, denoiser = type("Pipe", (), {"transformer_2": "low"})(), "high"
    experts = WAN.experts({"boundary_ratio": BOUNDARY})
    assert expert_target(pipe, denoiser, "low_noise", experts, "k", "x.safetensors") == "low"
    assert expert_target(pipe, denoiser, None, experts, "k", "x.safetensors") == "high"
    with pytest.raises(ConfigError, match=r"^`merge.g.lora.0.path`: 'x.safetensors' was trained on the low_noise "
                                          r"expert .* \(it has one denoiser\); render it with that model.$"):
        expert_target(pipe, denoiser, "low_noise", (), "merge.g.lora.0.path", "x.safetensors")


def train_args(model: Path, data: Path, expert: str | None, *extra: str) -> list[str]:
    """The shipped A14B config, fp32 on the CPU, one 64 x 48 bucket of 1-frame clips, rank 4 on every Linear of the
    expert, prompts padded to 64 tokens."""
    chosen = [f"model.expert={expert}"] if expert else ["model.expert=null"]
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/lora_wan_a14b.yaml",
            f"model.pretrained_model_name_or_path={model}", "mixed_precision=null", *chosen,
            "model.gradient_checkpointing=false", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.workers=0",
            "train.scheduler.num_warmup_steps=0", 'data.dataset1.bucket.target_area=${hcp.eval:"64*48"}',
            "data.dataset1.bucket.num_bucket=1", "data.dataset1.batch_size=2", f"train.train_steps={STEPS}",
            "train.log_step=1", "transformer_lr=3e-2", "lora_transformer.0.rank=4", "lora_transformer.0.alpha=4",
            "model.max_sequence_length=64", "lora_transformer.0.layers=['']", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, a14b, cli_in_process) -> dict[str, dict]:
    """Each expert's run of the shipped config (the low-noise one with a preview at its last step): its experiment
    folder, the transformer folders loaded in it, and the timesteps its training steps gave the transformer."""
    workdir = tmp_path_factory.mktemp("a14b_run")
    (workdir / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(workdir / "data", num=2)
    runs: dict[str, dict] = {}
    load = WanTransformer3DModel.from_pretrained.__func__
    forward = WanTransformer3DModel.forward
    for expert in EXPERTS:
        run = runs[expert] = {"loads": [], "timesteps": [], "rendered_by": set()}

        def loading(cls, *args, run=run, **kwargs):
            run["loads"].append(kwargs.get("subfolder"))
            return load(cls, *args, **kwargs)

        def recording(self, *args, run=run, **kwargs):
            if torch.is_grad_enabled():  # a training step (previews render without grad)
                run["timesteps"] += kwargs["timestep"].tolist()
            else:
                run["rendered_by"].add(id(self))
            return forward(self, *args, **kwargs)

        preview = [f"previewer={{step: {STEPS}, prompts: ['a red circle'], width: 64, height: 48, "
                   "num_inference_steps: 4, guidance_scale: 1.0}"] if expert == "low_noise" else []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(WanTransformer3DModel, "from_pretrained", classmethod(loading))
            patch.setattr(WanTransformer3DModel, "forward", recording)
            result = cli_in_process(train_args(a14b, data, expert, f"exp_dir=exps/{expert}", *preview), cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        run["exp"] = workdir / "exps" / expert
    return runs


@pytest.mark.e2e
@pytest.mark.parametrize("expert", EXPERTS)
def test_one_expert_loads_and_trains_on_its_own_timesteps(trained, expert):
    run = trained[expert]
    folder, other = ("transformer", "transformer_2") if expert == "high_noise" else ("transformer_2", "transformer")
    timesteps = torch.tensor(run["timesteps"])
    assert len(timesteps) == 2 * STEPS  # batch of 2, every step
    if expert == "high_noise":
        assert (timesteps >= BOUNDARY * 1000).all(), timesteps
    else:
        assert (timesteps < BOUNDARY * 1000).all(), timesteps
    ckpt = run["exp"] / "ckpts" / f"transformer-{STEPS}.safetensors"
    with safe_open(ckpt, "pt") as file:
        metadata = file.metadata()
    assert (metadata["part"], metadata["expert"], metadata["expert_folder"]) == ("transformer", expert, folder)
    span = "[0.875, 1]" if expert == "high_noise" else "[0, 0.875)"
    assert (f"model.expert: the {expert} expert ({folder}) trains on sigmas {span}; the other expert ({other}) is not "
            "loaded") in (run["exp"] / "train.log").read_text()
    if expert == "high_noise":  # the other expert is never loaded
        assert run["loads"] == [folder]
    else:  # ... until a preview renders with both experts
        assert run["loads"] == [folder, other] and len(run["rendered_by"]) == 2
        assert (run["exp"] / "preview" / f"{STEPS}-0.mp4").is_file()


def read_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


@pytest.mark.e2e
def test_the_visualizer_merges_each_experts_lora_as_load_lora_weights_loads_it(trained, a14b, tmp_path,
                                                                             cli_in_process):
    """Both experts' LoRAs in the shipped config's merge group (lora_path, lora_path_expert): the visualizer's clip is WanPipeline's with the high-noise file loaded
    and the low-noise file loaded with load_into_transformer_2=True (to H.264's rounding); the webui file keeps the
    expert, and --from_webui reads it back."""
    from safetensors.torch import load_file

    from hcpdiff.infer.video import save_clip
    from hcpdiff.tools.lora_convert import main as lora_convert

    loras = {expert: trained[expert]["exp"] / "ckpts" / f"transformer-{STEPS}.safetensors" for expert in EXPERTS}
    converted = {expert: tmp_path / f"{expert}.safetensors" for expert in EXPERTS}
    for expert in EXPERTS:
        assert lora_convert(["--to_diffusers", "--lora_path", str(loras[expert]),
                             "--dump_path", str(converted[expert])]) == 0
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", WAN.infer_config, f"pretrained_model={a14b}",
                           "dtype=fp32", "prompt='a red circle'", f"save.out_dir={tmp_path / 'out'}",
                           f"lora_path={loras['low_noise']}", f"lora_path_expert={loras['high_noise']}",
                           "infer_args.width=64",
                           "infer_args.height=48", "infer_args.num_frames=1", "infer_args.num_inference_steps=4",
                           "infer_args.guidance_scale=1.0"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (clip_file,) = sorted((tmp_path / "out").glob("*.mp4"))
    rendered = read_frames(clip_file)

    def render(into_transformer_2: dict[str, bool]) -> np.ndarray:
        pipe = WanPipeline.from_pretrained(a14b)
        pipe.set_progress_bar_config(disable=True)
        for expert, into_2 in into_transformer_2.items():
            pipe.load_lora_weights(str(converted[expert]), adapter_name=expert, load_into_transformer_2=into_2)
        with torch.no_grad():
            frames = pipe(prompt="a red circle", negative_prompt="", guidance_scale=1.0, height=48, width=64,
                          num_frames=1, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(42),
                          output_type="np").frames[0]
        out = tmp_path / f"theirs-{len(list(tmp_path.glob('theirs-*')))}.mp4"
        save_clip([Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in frames], out, 16)
        return read_frames(out)

    theirs = render({"high_noise": False, "low_noise": True})
    assert np.abs(theirs - rendered).mean() < 1, np.abs(theirs - rendered).mean()
    base = render({})
    assert np.abs(base - rendered).mean() > 2  # the LoRAs change the clip
    high_only = render({"high_noise": False})
    assert np.abs(high_only - rendered).mean() > 1  # ... the low-noise one too, through transformer_2
    # ComfyUI loads each expert as its own model with Wan2.1's names: the webui file is Wan's, and says its expert
    webui, back = tmp_path / "webui.safetensors", tmp_path / "back"
    assert lora_convert(["--to_webui", "--lora_path", str(loras["low_noise"]), "--dump_path", str(webui)]) == 0
    with safe_open(webui, "pt") as file:
        assert file.metadata()["expert"] == "low_noise"
        assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in file.keys()
    assert lora_convert(["--from_webui", "--lora_path", str(webui), "--dump_path", str(back)]) == 0
    (restored,) = back.glob("transformer-*.safetensors")
    with safe_open(restored, "pt") as file:
        assert file.metadata()["expert"] == "low_noise"
    assert load_file(restored).keys() == load_file(loras["low_noise"]).keys()


@pytest.mark.parametrize("expert, wan21, message", [
    pytest.param(None, False, r"model.expert: '.*' has 2 denoising experts, trained one at a time, and model.expert "
                 r"is not set; set model.expert to high_noise \(transformer, sigmas 0.875 to 1\) or low_noise "
                 r"\(transformer_2, sigmas 0 to 0.875\)$", id="missing"),
    pytest.param("middle", False, r"model.expert: '.*' has 2 denoising experts, trained one at a time, and "
                 r"model.expert 'middle' is not an expert of it; set model.expert to high_noise", id="unknown"),
    pytest.param("low_noise", True, r"model.expert: '.*' is a Wan model with one transformer, not several denoising "
                 r"experts; remove model.expert$", id="one_denoiser"),
])
def test_model_expert_missing_unknown_or_needless_is_one_line(expert, wan21, message, a14b, tiny_models, tmp_path,
                                                              cli_in_process, one_error_line):
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(tmp_path / "data", num=1)
    model = tiny_models("wan") if wan21 else a14b
    line = one_error_line(cli_in_process(train_args(model, data, expert), cwd=tmp_path))
    assert re.search(message, line), line
    assert not (tmp_path / "exps").exists() or not any((tmp_path / "exps").iterdir())


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["init_lora", "preset_lora"])
def test_starting_from_the_other_experts_lora_is_one_line(key, trained, a14b, tmp_path, cli_in_process,
                                                         one_error_line):
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(tmp_path / "data", num=1)
    low = trained["low_noise"]["exp"] / "ckpts" / f"transformer-{STEPS}.safetensors"
    value = f"{{transformer: {low}}}" if key == "init_lora" else f"[{{path: {low}}}]"
    line = one_error_line(cli_in_process(train_args(a14b, data, "high_noise", f"model.{key}={value}"), cwd=tmp_path))
    where = "model.init_lora.transformer" if key == "init_lora" else r"model.preset_lora\[0\].path"
    assert re.search(rf"{where}: '.*' is a LoRA of the low_noise expert, and this run trains the high_noise expert "
                     r"\(model.expert\)$", line), line
