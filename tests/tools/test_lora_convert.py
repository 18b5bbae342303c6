"""lora_convert: native <-> webui round trips, kohya-named files, and diffusers consuming what we write."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcpdiff.lora import LoraGroupSpec, attach_lora, load_lora, lora_metadata, lora_state_dict, merge_lora, save_lora

UNET_LAYERS = [r"re:.*\.to_k$", r"re:.*\.to_out\.0$", r"re:.*\.proj_in$", r"re:.*ff\.net\.2$"]
TE_LAYERS = [r"re:.*self_attn\.q_proj$", r"re:.*mlp\.fc1$"]


def make_native_lora(model, part: str, layers: list[str], path: Path, seed: int) -> Path:
    """Attach a rank-4 LoRA (alpha 2) to `model`, fill it with random nonzero weights, save it natively."""
    groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=layers, rank=4, alpha=2.0)], part, f"lora_{part}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    save_lora(path, lora_state_dict(model), lora_metadata(part, "tiny", groups, 1))
    return path


@pytest.fixture(scope="module")
def native_files(tmp_path_factory, tiny_model: Path) -> tuple[Path, Path]:
    """(unet-1.safetensors, text_encoder-1.safetensors) trained-looking native LoRAs for the tiny model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path_factory.mktemp("native")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    return (
        make_native_lora(unet, "unet", UNET_LAYERS, folder / "unet-1.safetensors", 1),
        make_native_lora(text_encoder, "text_encoder", TE_LAYERS, folder / "text_encoder-1.safetensors", 2),
    )


def convert(cli, tmp_path: Path, *args: str):
    """Run the converter as a user would."""
    return cli(["-m", "hcpdiff.tools.lora_convert", *args], cwd=tmp_path)


def test_round_trip_native_webui_native(cli, tmp_path, tiny_model, native_files):
    unet_file, te_file = native_files
    webui = tmp_path / "lora-1.safetensors"
    done = convert(cli, tmp_path, "--to_webui", "--lora_path", str(unet_file), "--lora_path_TE", str(te_file),
                   "--dump_path", str(webui), "--auto_scale_alpha")
    assert done.returncode == 0, done.stderr
    keys = set(load_file(webui))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in keys
    back = convert(cli, tmp_path, "--from_webui", "--lora_path", str(webui), "--dump_path", str(tmp_path / "back"),
                   "--model", str(tiny_model))
    assert back.returncode == 0, back.stderr
    for original, name in ((unet_file, "unet-lora-1"), (te_file, "text_encoder-lora-1")):
        want, _ = load_lora(original)
        got, metadata = load_lora(tmp_path / "back" / f"{name}.safetensors")
        assert set(got) == set(want)
        assert all(torch.equal(got[key], want[key]) for key in want)
        assert metadata["part"] == name.split("-")[0]


def test_kohya_named_file_converts_with_default_layout(cli_in_process, tmp_path):
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    te_stem = "lora_te_text_model_encoder_layers_11_mlp_fc2"
    tensors = {
        f"{stem}.lora_down.weight": torch.randn(4, 640), f"{stem}.lora_up.weight": torch.randn(640, 4),
        f"{stem}.alpha": torch.tensor(4.0),
        f"{te_stem}.lora_down.weight": torch.randn(8, 3072), f"{te_stem}.lora_up.weight": torch.randn(768, 8),
    }
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    done = convert(cli_in_process, tmp_path, "--from_webui", "--lora_path", str(tmp_path / "kohya.safetensors"), "--dump_path", "out")
    assert done.returncode == 0, done.stderr
    unet_state, _ = load_lora(tmp_path / "out" / "unet-kohya.safetensors")
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(unet_state[f"{layer}.lora_A.weight"], tensors[f"{stem}.lora_down.weight"])
    te_state, _ = load_lora(tmp_path / "out" / "text_encoder-kohya.safetensors")
    assert float(te_state["encoder.layers.11.mlp.fc2.alpha"]) == 8.0  # no alpha in the file means alpha = rank


@pytest.mark.parametrize(
    "args, words",
    [
        (["--to_webui", "--lora_path", "WEBUI"], "webui/kohya LoRA"),
        (["--to_webui", "--lora_path", "missing.safetensors"], "does not exist"),
        (["--from_webui", "--lora_path", "NATIVE"], "is not a webui LoRA"),
        (["--to_webui", "--lora_path", "TE"], "text_encoder LoRA"),
    ],
)
def test_wrong_input_is_one_error_line(cli_in_process, tmp_path, native_files, args, words):
    webui = tmp_path / "w.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(webui))
    names = {"WEBUI": str(webui), "NATIVE": str(native_files[0]), "TE": str(native_files[1])}
    args = [names.get(a, a) for a in args]
    done = convert(cli_in_process, tmp_path, *args, "--dump_path", str(tmp_path / "o.safetensors"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def unet_output(unet) -> torch.Tensor:
    """The U-Net's noise prediction on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=text).sample


def merged_parts(tiny_model: Path, native_files: tuple[Path, Path]):
    """A pipeline with our merge_lora applied to U-Net and text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    merge_lora(pipe.unet, load_lora(native_files[0])[0])
    merge_lora(pipe.text_encoder, load_lora(native_files[1])[0])
    return pipe


def load_in_diffusers(tiny_model: Path, lora_file: Path):
    """diffusers' own pipeline with `load_lora_weights(lora_file)`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(lora_file))
    return pipe


def adapted_layers(model) -> set[str]:
    """Names of the modules diffusers/peft put an adapter on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def native_layers(native_file: Path) -> set[str]:
    """Names of the layers a native LoRA file adapts."""
    return {key.rsplit(".lora_", 1)[0] for key in load_lora(native_file)[0] if ".lora_A." in key}


def test_diffusers_loads_webui_file_exactly(cli_in_process, tmp_path, tiny_model, native_files):
    webui = tmp_path / "lora.safetensors"
    assert convert(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(native_files[0]), "--dump_path", str(webui)).returncode == 0
    theirs = load_in_diffusers(tiny_model, webui)
    assert adapted_layers(theirs.unet) == native_layers(native_files[0])  # every layer loaded, none dropped
    ours = merged_parts(tiny_model, native_files)
    want, got = unet_output(ours.unet), unet_output(theirs.unet)
    from diffusers import UNet2DConditionModel

    base_out = unet_output(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"))
    assert (want - base_out).abs().mean() > 1e-3  # the LoRA does something
    assert torch.allclose(got, want, atol=1e-5)


def test_diffusers_format_carries_text_encoder(cli_in_process, tmp_path, tiny_model, native_files):
    out = tmp_path / "pytorch_lora_weights.safetensors"
    done = convert(cli_in_process, tmp_path, "--to_diffusers", "--lora_path", str(native_files[0]),
                   "--lora_path_TE", str(native_files[1]), "--dump_path", str(out))
    assert done.returncode == 0, done.stderr
    theirs = load_in_diffusers(tiny_model, out)
    assert adapted_layers(theirs.unet) == native_layers(native_files[0])
    assert adapted_layers(theirs.text_encoder) == native_layers(native_files[1])
    ours = merged_parts(tiny_model, native_files)
    assert torch.allclose(unet_output(theirs.unet), unet_output(ours.unet), atol=1e-5)
    ids = ours.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0]
    from transformers import CLIPTextModel

    with torch.no_grad():
        base = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")(ids)[0]
    assert (want - base).abs().mean() > 1e-4
    assert torch.allclose(got, want, atol=1e-5)


def text_encoder_output(text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_diffusers_loads_guide_text_encoder_lora_from_webui_file(cli_in_process, tmp_path, tiny_model, native_files):
    """The guide's text-encoder group (every self_attn projection and the mlp) reaches diffusers whole."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    te_file = make_native_lora(CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder"), "text_encoder",
                               [r"re:.*self_attn$", r"re:.*mlp$"], tmp_path / "text_encoder-1.safetensors", 3)
    webui = tmp_path / "lora.safetensors"
    done = convert(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(native_files[0]), "--lora_path_TE", str(te_file),
                   "--dump_path", str(webui))
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr
    ours = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = text_encoder_output(ours.text_encoder, ours.tokenizer)
    merge_lora(ours.text_encoder, load_lora(te_file)[0])
    want = text_encoder_output(ours.text_encoder, ours.tokenizer)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    theirs.load_lora_weights(str(webui))
    trained = {n.removesuffix(".lora_A") for n, _ in theirs.text_encoder.named_modules() if n.endswith(".lora_A")}
    assert len(trained) == 2 * 6  # two encoder layers: q, k, v, out_proj, fc1, fc2
    got = text_encoder_output(theirs.text_encoder, theirs.tokenizer)
    assert (want - base).abs().mean() > 1e-4
    assert torch.allclose(got, want, atol=1e-5)


def test_to_webui_notes_attention_lora_diffusers_would_drop(cli_in_process, tmp_path, native_files):
    """A text-encoder LoRA on q_proj without out_proj: diffusers' kohya loader leaves it out, so the user is told."""
    done = convert(cli_in_process, tmp_path, "--to_webui", "--lora_path", str(native_files[0]),
                   "--lora_path_TE", str(native_files[1]), "--dump_path", str(tmp_path / "lora.safetensors"))
    assert done.returncode == 0, done.stderr
    note = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "--to_diffusers" in note[0] and "out_proj" in note[0], done.stderr
    # SD1's CLIP-L is a transformers CLIP in A1111 too: each projection merges alone there, and in ComfyUI
    assert "ComfyUI loads them, and so does A1111" in note[0], done.stderr


def test_text_encoder_only_lora_converts_and_carries_sd1_metadata(cli_in_process, tmp_path, native_files):
    from safetensors import safe_open

    webui = tmp_path / "te.safetensors"
    done = convert(cli_in_process, tmp_path, "--to_webui", "--lora_path_TE", str(native_files[1]), "--dump_path", str(webui))
    assert done.returncode == 0, done.stderr
    assert all(key.startswith("lora_te_text_model_") for key in load_file(webui))
    with safe_open(str(webui), "pt") as opened:
        metadata = opened.metadata()
    assert (metadata["ss_base_model_version"], metadata["ss_v2"], metadata["ss_network_dim"]) == ("sd_v1", "False", "4")
    assert metadata["ss_network_train_text_encoder_only"] == "True"


@pytest.mark.parametrize("mode", ["--to_webui", "--to_diffusers", "--from_webui"])
def test_no_lora_given_is_one_error_line(cli_in_process, tmp_path, mode):
    done = convert(cli_in_process, tmp_path, mode, "--dump_path", str(tmp_path / "o.safetensors"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--lora_path" in lines[0], done.stderr
