"""lora_convert --sdxl: kohya SDXL names that diffusers' StableDiffusionXLPipeline loads with our merge's effect."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.lora import LoraGroupSpec, attach_lora, load_lora, lora_metadata, lora_state_dict, merge_lora, save_lora

UNET_LAYERS = [r"re:.*\.attn.?$", r"re:.*\.ff$", r"re:.*\.proj_in$"]
TE_LAYERS = [r"re:.*mlp\.fc1$"]


@pytest.fixture
def cli(cli_in_process):
    """lora_convert runs in-process here (same argv, exit status and output); test_lora_convert.py starts a process."""
    return cli_in_process


def make_native(model, part: str, layers: list[str], path: Path, base_model: Path, seed: int) -> Path:
    """A rank-4 (alpha 2) LoRA with random nonzero weights, saved natively with `base_model` in its metadata."""
    groups = attach_lora(model, [LoraGroupSpec(lr=1e-4, layers=layers, rank=4, alpha=2.0)], part, f"lora_{part}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    save_lora(path, lora_state_dict(model), lora_metadata(part, str(base_model), groups, 1))
    return path


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory, tiny_sdxl: Path) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tmp_path_factory.mktemp("native_xl")
    return {
        "unet": make_native(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"), "unet", UNET_LAYERS,
                            folder / "unet-1.safetensors", tiny_sdxl, 1),
        "text_encoder": make_native(CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"), "text_encoder",
                                    TE_LAYERS, folder / "text_encoder-1.safetensors", tiny_sdxl, 2),
        "text_encoder_2": make_native(
            CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"), "text_encoder_2",
            TE_LAYERS, folder / "text_encoder_2-1.safetensors", tiny_sdxl, 3),
    }


def convert(cli, cwd: Path, *args: str):
    return cli(["-m", "hcpdiff.tools.lora_convert", *args], cwd=cwd)


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=states, added_cond_kwargs=added).sample


def test_sdxl_webui_file_loads_in_diffusers_with_our_merge_effect(cli, tmp_path, tiny_sdxl, sdxl_files):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    webui = tmp_path / "xl.safetensors"
    done = convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(sdxl_files["unet"]),
                   "--lora_path_TE", str(sdxl_files["text_encoder"]), "--lora_path_TE2", str(sdxl_files["text_encoder_2"]),
                   "--dump_path", str(webui))
    assert done.returncode == 0, done.stderr
    keys = set(load_file(webui))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys  # kohya's SDXL layout
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(webui))
    native_unet_layers = {key.rsplit(".lora_", 1)[0] for key in load_lora(sdxl_files["unet"])[0] if ".lora_A." in key}
    loaded = {name for name, module in pipe.unet.named_modules() if isinstance(module, BaseTunerLayer)}
    assert loaded == native_unet_layers  # every U-Net key was consumed, none dropped

    ours = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    base = unet_output(ours)
    merge_lora(ours, load_lora(sdxl_files["unet"])[0])
    want, got = unet_output(ours), unet_output(pipe.unet)
    assert (want - base).abs().mean() > 1e-3
    assert torch.allclose(got, want, atol=1e-5)


def test_sdxl_round_trip_through_webui(cli, tmp_path, tiny_sdxl, sdxl_files):
    webui = tmp_path / "xl.safetensors"
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(sdxl_files["unet"]),
                   "--lora_path_TE2", str(sdxl_files["text_encoder_2"]), "--dump_path", str(webui)).returncode == 0
    back = convert(cli, tmp_path, "--from_webui", "--sdxl", "--lora_path", str(webui), "--dump_path",
                   str(tmp_path / "back"), "--model", str(tiny_sdxl))
    assert back.returncode == 0, back.stderr
    for part in ("unet", "text_encoder_2"):
        original = load_lora(sdxl_files[part])[0]
        restored = load_lora(tmp_path / "back" / f"{part}-xl.safetensors")[0]
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) for k in original)


def test_sdxl_files_need_no_flag(cli, tmp_path, sdxl_files, tiny_sdxl):
    """A file that tells it is SDXL's (its family, a second CLIP, its SDXL base model folder) converts without --sdxl
    to the same kohya file; the kohya file reads back without --sdxl too (its lora_te1_ / lora_te2_ keys tell)."""
    args = ["--lora_path", str(sdxl_files["unet"]), "--lora_path_TE2", str(sdxl_files["text_encoder_2"])]
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", *args, "--dump_path", str(tmp_path / "flag.safetensors")
                   ).returncode == 0
    done = convert(cli, tmp_path, "--to_webui", *args, "--dump_path", str(tmp_path / "told.safetensors"))
    assert done.returncode == 0, done.stderr
    flagged, told = load_file(tmp_path / "flag.safetensors"), load_file(tmp_path / "told.safetensors")
    assert flagged.keys() == told.keys() and all(torch.equal(flagged[k], told[k]) for k in flagged)
    back = convert(cli, tmp_path, "--from_webui", "--lora_path", str(tmp_path / "told.safetensors"), "--dump_path",
                   str(tmp_path / "back"), "--model", str(tiny_sdxl))
    assert back.returncode == 0, back.stderr
    restored = load_lora(tmp_path / "back" / "text_encoder_2-told.safetensors")[0]
    original = load_lora(sdxl_files["text_encoder_2"])[0]
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    no_model = convert(cli, tmp_path, "--from_webui", "--lora_path", str(tmp_path / "told.safetensors"),
                       "--dump_path", str(tmp_path / "back2"))
    assert no_model.returncode == 2 and len(no_model.stderr.strip().splitlines()) == 1
    assert "--model" in no_model.stderr


@pytest.fixture(scope="module")
def whole_unet_file(tmp_path_factory, tiny_sdxl: Path) -> Path:
    """A LoRA on every Linear / Conv2d of the tiny SDXL U-Net (upsamplers, add_embedding and time_embedding too)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    return make_native(unet, "unet", [""], tmp_path_factory.mktemp("whole") / "unet-1.safetensors", tiny_sdxl, 4)


def test_sdxl_unet_names_are_kohyas_original_layout_and_both_layouts_read_back(cli, tmp_path, tiny_sdxl,
                                                                               whole_unet_file):
    """kohya's create_network names (lora_unet_input_blocks_4_1_...) are written and read; so are diffusers-style names."""
    from safetensors.torch import save_file

    from hcpdiff.lora.webui_format import SDXL_WEBUI_PREFIX, native_to_webui

    webui = tmp_path / "xl.safetensors"
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(whole_unet_file),
                   "--dump_path", str(webui)).returncode == 0
    layers = {key.split(".")[0] for key in load_file(webui)}
    # the layers A1111 drops under diffusers-style names: its index formula assumes SD1.5's blocks
    assert {"lora_unet_output_blocks_2_2_conv", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2",
            "lora_unet_time_embed_0", "lora_unet_input_blocks_0_0", "lora_unet_out_2",
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
            "lora_unet_middle_block_2_emb_layers_1"} <= layers
    assert not any("down_blocks" in layer or "up_blocks" in layer for layer in layers)
    diffusers_style = tmp_path / "diffusers_style.safetensors"
    save_file(native_to_webui(load_lora(whole_unet_file)[0], "unet", SDXL_WEBUI_PREFIX), str(diffusers_style))
    original = load_lora(whole_unet_file)[0]
    for name, path in (("xl", webui), ("diffusers_style", diffusers_style)):
        done = convert(cli, tmp_path, "--from_webui", "--sdxl", "--lora_path", str(path), "--dump_path",
                       str(tmp_path / "back"), "--model", str(tiny_sdxl))
        assert done.returncode == 0, done.stderr
        restored = load_lora(tmp_path / "back" / f"unet-{name}.safetensors")[0]
        assert restored.keys() == original.keys() and all(torch.equal(original[k], restored[k]) for k in original)


def test_text_projection_of_te2_is_named_as_comfyui_reads_it(cli, tmp_path, tiny_sdxl):
    from transformers import CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    native = make_native(te2, "text_encoder_2", ["text_projection", r"re:.*layers\.0\.mlp\.fc1$"],
                         tmp_path / "text_encoder_2-1.safetensors", tiny_sdxl, 5)
    webui = tmp_path / "te2.safetensors"
    done = convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path_TE2", str(native), "--dump_path", str(webui))
    assert done.returncode == 0, done.stderr  # a text-encoder-only file converts: no --lora_path needed
    keys = set(load_file(webui))
    assert "lora_te2_text_projection.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    back = convert(cli, tmp_path, "--from_webui", "--sdxl", "--lora_path", str(webui), "--dump_path",
                   str(tmp_path / "back"), "--model", str(tiny_sdxl))
    assert back.returncode == 0, back.stderr
    assert load_lora(tmp_path / "back" / "text_encoder_2-te2.safetensors")[0].keys() == load_lora(native)[0].keys()


def test_metadata_files_the_lora_under_sdxl_for_the_uis(cli, tmp_path, sdxl_files):
    from safetensors import safe_open

    webui = tmp_path / "xl.safetensors"
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(sdxl_files["unet"]),
                   "--lora_path_TE", str(sdxl_files["text_encoder"]), "--dump_path", str(webui)).returncode == 0
    with safe_open(str(webui), "pt") as opened:
        metadata = opened.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == \
        ("networks.lora", "4", "2")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_te2_attention_without_out_proj_notes_that_a1111_and_diffusers_skip_it(cli, tmp_path, tiny_sdxl):
    from transformers import CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    native = make_native(te2, "text_encoder_2", [r"re:.*self_attn\.[qkv]_proj$"],
                         tmp_path / "text_encoder_2-1.safetensors", tiny_sdxl, 6)
    done = convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path_TE2", str(native),
                   "--dump_path", str(tmp_path / "x.safetensors"))
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "A1111" in notes[0] and "diffusers" in notes[0] and "ComfyUI loads them" in notes[0]
    assert "so does A1111" not in notes[0]


def test_diffusers_places_every_original_layout_layer_as_our_merge(cli, tmp_path, tiny_sdxl, whole_unet_file):
    """diffusers' kohya loader maps the original-layout names back (upsamplers, label_emb, time_embed included)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    webui = tmp_path / "xl.safetensors"
    assert convert(cli, tmp_path, "--to_webui", "--sdxl", "--lora_path", str(whole_unet_file),
                   "--dump_path", str(webui)).returncode == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(webui))
    loaded = {name for name, module in pipe.unet.named_modules() if isinstance(module, BaseTunerLayer)}
    assert loaded == {key.rsplit(".lora_", 1)[0] for key in load_lora(whole_unet_file)[0] if ".lora_A." in key}
    ours = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    merge_lora(ours, load_lora(whole_unet_file)[0])
    assert torch.allclose(unet_output(pipe.unet), unet_output(ours), atol=1e-4)
