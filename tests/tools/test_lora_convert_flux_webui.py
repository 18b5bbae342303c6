"""FLUX LoRAs as kohya / ComfyUI / Forge files: `lora_convert --to_webui` writes BFL's original layout (q / k / v and a
single block's MLP input fused exactly), diffusers' kohya-FLUX reader loads it as it loads the --to_diffusers file,
and `--from_webui` reads kohya FLUX files back with the same merged weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hcpdiff.cli import run_cli
from hcpdiff.families import family_named
from hcpdiff.lora.merge import merge_lora
from hcpdiff.lora.state_io import layer_states, load_lora, lora_metadata, save_lora
from hcpdiff.tools.lora_convert import main
from lora_states import deltas, random_lora

pytestmark = pytest.mark.e2e

# layers left out of the fixture's transformer LoRA, so partial q / k / v sets are fused: block 0's to_v and
# add_k_proj, single block 1's to_q and to_k
LEFT_OUT = {"transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
            "single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k"}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny FLUX folder ("model") and native LoRA files of it: "transformer" (every Linear but LEFT_OUT),
    "double" (its double-block layers only), "text_encoder" (CLIP self_attn and MLP), "text_encoder_2" (T5)."""
    from transformers import CLIPTextModel, T5EncoderModel

    folder = tmp_path_factory.mktemp("flux_webui")
    model = family_named("flux").make_tiny(folder / "model", seed=0, variant="flux")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    states = {
        "transformer": random_lora(transformer, lambda name: name not in LEFT_OUT, 1),
        "text_encoder": random_lora(CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                                    lambda name: ".self_attn." in name or ".mlp." in name, 2),
        "text_encoder_2": random_lora(T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2"),
                                      lambda name: name.endswith(("SelfAttention.q", "SelfAttention.o", "wi_0")), 3),
    }
    states["double"] = {k: v for k, v in states["transformer"].items() if k.startswith("transformer_blocks.")}
    files = {"model": model}
    for name, state in states.items():
        part = "transformer" if name == "double" else name
        files[name] = folder / f"{name}-1.safetensors"
        save_lora(files[name], state, lora_metadata(part, str(model), [], 1, family="flux"))
    return files


def render(pipe: FluxPipeline) -> np.ndarray:
    """One 64 x 64 image in 2 steps, fixed seed, as float pixels."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def adapted(model: torch.nn.Module) -> set[str]:
    """Layers diffusers attached a LoRA to."""
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_diffusers_kohya_reader_renders_webui_file_as_the_diffusers_file(flux_files, tmp_path):
    # double blocks only: diffusers' reader splits single blocks' linear1 at FLUX.1's full widths (3072 / 12288),
    # which the tiny model does not have; the next test checks single blocks at those widths
    webui, diffusers_file = tmp_path / "webui.safetensors", tmp_path / "diffusers.safetensors"
    lora_args = ["--lora_path", str(flux_files["double"]), "--lora_path_TE", str(flux_files["text_encoder"])]
    assert main(["--to_webui", *lora_args, "--dump_path", str(webui)]) == 0
    assert main(["--to_diffusers", *lora_args, "--dump_path", str(diffusers_file)]) == 0
    keys = {key.split(".")[0] for key in load_file(webui)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_1_img_mod_lin", "lora_unet_double_blocks_1_txt_mlp_2",
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj"} <= keys
    assert not any("to_q" in key or "add_k_proj" in key for key in keys)

    images = []
    for lora_file in (webui, diffusers_file):
        pipe = FluxPipeline.from_pretrained(flux_files["model"])
        pipe.load_lora_weights(str(lora_file))
        # nothing dropped: block 0's to_v has a LoRA of zeros (its block in the fused qkv), the rest are the native's
        native = set(layer_states(load_lora(flux_files["double"])[0]))
        assert adapted(pipe.transformer) - {"transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj"} \
            == native
        assert adapted(pipe.text_encoder) == set(layer_states(load_lora(flux_files["text_encoder"])[0]))
        images.append(render(pipe))
    assert np.allclose(images[0], images[1], atol=1e-4)


def test_diffusers_kohya_reader_splits_full_size_single_blocks_as_the_native_lora():
    """A single block's q, k, v and MLP LoRAs at FLUX.1's widths (3072 wide, MLP 12288) fuse into linear1 and
    diffusers' reader splits them back to the same weight changes (to_v had none: a zero LoRA)."""
    width, generator = 3072, torch.Generator().manual_seed(0)
    native = {}
    for layer, out_features, rank, alpha in (("attn.to_q", width, 4, 4.0), ("attn.to_k", width, 2, 1.0),
                                             ("proj_mlp", 4 * width, 4, 2.0)):
        name = f"single_transformer_blocks.0.{layer}"
        native[f"{name}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        native[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
        native[f"{name}.alpha"] = torch.tensor(alpha)
    (layers,) = family_named("flux").native_to_webui({"transformer": native}).values()
    from hcpdiff.lora.lycoris_format import webui_tensors

    webui = {layer + suffix: t for layer, parts in layers.items() for suffix, t in webui_tensors(parts).items()}
    assert set(layers) == {"lora_unet_single_blocks_0_linear1"}
    theirs = FluxPipeline.lora_state_dict(webui)
    probe = torch.randn(width, 3, generator=generator)  # weight changes compared on probe inputs (12288 x 3072 is big)
    ours = layer_states(native)
    for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        name = f"single_transformer_blocks.0.{layer}"
        lora_a, lora_b = theirs[f"transformer.{name}.lora_A.weight"], theirs[f"transformer.{name}.lora_B.weight"]
        got = lora_b @ (lora_a @ probe)
        if name in ours:
            parts = ours[name]
            want = float(parts[".alpha"]) / parts[".lora_A.weight"].shape[0] * parts[".lora_B.weight"] @ (
                parts[".lora_A.weight"] @ probe)
        else:
            want = torch.zeros_like(got)
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-4), layer


def test_from_webui_round_trip_merges_the_same_weights(flux_files, tmp_path):
    webui = tmp_path / "lora-1.safetensors"
    natives = {part: flux_files[part] for part in ("transformer", "text_encoder", "text_encoder_2")}
    assert main(["--to_webui", "--lora_path", str(natives["transformer"]), "--lora_path_TE",
                 str(natives["text_encoder"]), "--lora_path_TE2", str(natives["text_encoder_2"]),
                 "--dump_path", str(webui)]) == 0
    with safe_open(webui, framework="pt") as opened:
        metadata = opened.metadata()
        assert any(key.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for key in opened.keys())
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_network_module"] == "networks.lora_flux"

    assert main(["--from_webui", "--lora_path", str(webui), "--dump_path", str(tmp_path / "back")]) == 0
    for part, native in natives.items():
        want, _ = load_lora(native)
        got, got_metadata = load_lora(tmp_path / "back" / f"{part}-lora-1.safetensors")
        assert got_metadata["family"] == "flux" and got_metadata["part"] == part
        assert set(layer_states(got)) == set(layer_states(want))  # split back into the layers that were fused
        got_deltas, want_deltas = deltas(got), deltas(want)
        assert all(torch.allclose(got_deltas[layer], want_deltas[layer], atol=1e-6) for layer in want_deltas)

    # merged into the transformer, both give the same weights
    model = flux_files["model"]
    merged = []
    for path in (natives["transformer"], tmp_path / "back" / "transformer-lora-1.safetensors"):
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
        merge_lora(transformer, load_lora(path)[0], 1.0, source=str(path))
        merged.append(transformer.state_dict())
    assert all(torch.allclose(merged[0][key], merged[1][key], atol=1e-6) for key in merged[0])

    # and the converted-back files convert to the same kohya file again
    again = tmp_path / "again.safetensors"
    assert main(["--to_webui", "--lora_path", str(tmp_path / "back" / "transformer-lora-1.safetensors"),
                 "--lora_path_TE", str(tmp_path / "back" / "text_encoder-lora-1.safetensors"),
                 "--lora_path_TE2", str(tmp_path / "back" / "text_encoder_2-lora-1.safetensors"),
                 "--dump_path", str(again)]) == 0
    first, second = load_file(webui), load_file(again)
    assert set(first) == set(second)
    assert all(torch.allclose(first[key], second[key], atol=1e-6) for key in first)


def test_from_webui_splits_a_kohya_trained_file_exactly(flux_files, tmp_path):
    """A LoRA trained on BFL's stacked layers (dense, not block-diagonal; one without alpha) reads back into
    per-projection LoRAs whose weight changes are the stacked change's rows; diffusers' reader splits the double
    blocks' qkv the same way."""
    generator = torch.Generator().manual_seed(4)
    width = 32  # the tiny FLUX's hidden width (MLP 128)
    shapes = {"double_blocks_0_img_attn_qkv": 3 * width, "double_blocks_1_txt_attn_qkv": 3 * width,
              "double_blocks_0_img_mod_lin": 6 * width, "single_blocks_0_linear1": 7 * width,
              "single_blocks_1_linear2": width, "final_layer_adaLN_modulation_1": 2 * width}
    kohya, bfl_deltas = {}, {}
    for i, (name, out_features) in enumerate(shapes.items()):
        in_features = 5 * width if name.endswith("linear2") else width
        down = torch.randn(4, in_features, generator=generator)
        up = torch.randn(out_features, 4, generator=generator)
        kohya[f"lora_unet_{name}.lora_down.weight"], kohya[f"lora_unet_{name}.lora_up.weight"] = down, up
        alpha = None if i == 1 else float(i + 1)
        if alpha is not None:
            kohya[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        bfl_deltas[name] = (alpha or 4.0) / 4 * up @ down  # no alpha: the readers' scale 1
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    assert main(["--from_webui", "--lora_path", str(path), "--dump_path", str(tmp_path / "native")]) == 0
    ours = deltas(load_lora(tmp_path / "native" / "transformer-kohya.safetensors")[0])

    def rows(name: str, start: int, stop: int) -> torch.Tensor:
        return bfl_deltas[name][start * width: stop * width]

    want = {
        "transformer_blocks.0.attn.to_q": rows("double_blocks_0_img_attn_qkv", 0, 1),
        "transformer_blocks.0.attn.to_k": rows("double_blocks_0_img_attn_qkv", 1, 2),
        "transformer_blocks.0.attn.to_v": rows("double_blocks_0_img_attn_qkv", 2, 3),
        "transformer_blocks.1.attn.add_q_proj": rows("double_blocks_1_txt_attn_qkv", 0, 1),
        "transformer_blocks.1.attn.add_k_proj": rows("double_blocks_1_txt_attn_qkv", 1, 2),
        "transformer_blocks.1.attn.add_v_proj": rows("double_blocks_1_txt_attn_qkv", 2, 3),
        "transformer_blocks.0.norm1.linear": bfl_deltas["double_blocks_0_img_mod_lin"],
        "single_transformer_blocks.0.attn.to_q": rows("single_blocks_0_linear1", 0, 1),
        "single_transformer_blocks.0.attn.to_k": rows("single_blocks_0_linear1", 1, 2),
        "single_transformer_blocks.0.attn.to_v": rows("single_blocks_0_linear1", 2, 3),
        "single_transformer_blocks.0.proj_mlp": rows("single_blocks_0_linear1", 3, 7),
        "single_transformer_blocks.1.proj_out": bfl_deltas["single_blocks_1_linear2"],
        # BFL's (shift, scale) is diffusers' (scale, shift)
        "norm_out.linear": torch.cat([rows("final_layer_adaLN_modulation_1", 1, 2),
                                      rows("final_layer_adaLN_modulation_1", 0, 1)]),
    }
    assert set(ours) == set(want)
    assert all(torch.allclose(ours[layer], want[layer], atol=1e-5) for layer in want)

    double_only = {k: v for k, v in kohya.items() if "double_blocks" in k}
    theirs = FluxPipeline.lora_state_dict(double_only)
    for layer in (layer for layer in want if layer.startswith("transformer_blocks.")):
        lora_a, lora_b = theirs[f"transformer.{layer}.lora_A.weight"], theirs[f"transformer.{layer}.lora_B.weight"]
        assert torch.allclose(lora_b @ lora_a, ours[layer], atol=1e-5), layer


def test_unexpressible_layer_is_one_error_line_and_nothing_written(flux_files, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    state, _ = load_lora(flux_files["double"])
    state = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.1.attn.to_q.")}
    for suffix, shape in ((".hada_w1_a", (32, 2)), (".hada_w1_b", (2, 32)), (".hada_w2_a", (32, 2)),
                          (".hada_w2_b", (2, 32))):
        state["transformer_blocks.1.attn.to_q" + suffix] = torch.randn(shape, generator=generator)
    state["transformer_blocks.1.attn.to_q.alpha"] = torch.tensor(2.0)
    native = tmp_path / "transformer-loha.safetensors"
    save_lora(native, state, lora_metadata("transformer", str(flux_files["model"]), [], 1, family="flux"))
    out = tmp_path / "webui.safetensors"
    with pytest.raises(SystemExit) as exited:
        run_cli(main, ["--to_webui", "--lora_path", str(native), "--dump_path", str(out)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: transformer layer 'transformer_blocks.1.attn.to_q' is a LoHa")
    assert "double_blocks.1.img_attn.qkv" in err and not out.exists()


def test_cli_writes_a_kohya_flux_file_as_a_user_would(flux_files, tmp_path, cli):
    out = tmp_path / "flux_lora_kohya.safetensors"
    done = cli(["-m", "hcpdiff.tools.lora_convert", "--to_webui", "--lora_path", str(flux_files["transformer"]),
                "--lora_path_TE", str(flux_files["text_encoder"]), "--dump_path", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    tensors = load_file(out)
    assert f"wrote {len(tensors)} tensors to {out}" in done.stdout
    assert "Traceback" not in done.stderr
    # diffusers' and kohya's readers leave some layers out without an error: the user is told which
    assert "note: diffusers' load_lora_weights leaves out the top-level transformer layers" in done.stderr
    assert "note: kohya's lora_flux leaves out final_layer.adaLN_modulation.1, final_layer.linear" in done.stderr
    layers = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_img_in",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_te1_text_model_encoder_layers_1_mlp_fc2"} <= layers
    # block 0's partial qkv (to_q, to_k): ranks stacked, to_v's rows zero
    qkv_up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert qkv_up.shape[0] == 3 * 32 and not qkv_up[64:].any()
