"""SD3 / SD3.5 LoRAs as kohya / ComfyUI files: `lora_convert --to_webui` writes the original MMDiT layout
(`lora_unet_joint_blocks_<i>_x_block_attn_qkv`, q / k / v fused exactly), `lora_te1_` / `lora_te2_` / `lora_te3_` for
CLIP-L / CLIP-G / T5, and `--from_webui` reads such files back with the same merged weights. The layout table is
checked against diffusers' own single-file converter (the ground truth for which original weight is which diffusers
weight), and, with HCP_COMFYUI_DIR set, against ComfyUI's key map and weight patching."""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hcpdiff.cli import run_cli
from hcpdiff.families import family_named
from hcpdiff.families.sd3_layout import is_pre_only_modulation, mmdit_lookup
from hcpdiff.lora.fused_layout import swap_halves
from hcpdiff.lora.state_io import load_lora, lora_metadata, save_lora
from hcpdiff.tools.lora_convert import main
from hcpdiff.tools.tiny_sd3 import build_sd3_transformer
from lora_states import deltas, random_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from interop_helpers import checkout, comfy_imported  # noqa: E402  (the ComfyUI checkout, as in tests/interop)

pytestmark = pytest.mark.e2e

# left out of the fixture's transformer LoRA, so partial q / k / v sets are fused (a zero block each)
LEFT_OUT = {"transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.attn2.to_q"}
# the original layout's names of the weights no LoRA layer has (norms, the position table), per joint block
ORIGINAL_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                  "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
                  "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
TEXT_PARTS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}


def pre_only_blocks(transformer: torch.nn.Module) -> set[str]:
    """The joint blocks whose context modulation has a pre-only block's shape (the last one)."""
    return {name.split(".")[1] for name, module in transformer.named_modules()
            if name.endswith("norm1_context.linear")
            and is_pre_only_modulation(module.out_features, module.in_features)}


def original_layout(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the transformer's, or weight changes of its shapes) in the original MMDiT layout, by inverting
    hcpdiff's table: each original layer stacks its diffusers pieces' rows (halves swapped where the table says)."""
    lookup = mmdit_lookup(pre_only_blocks(transformer))
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found = lookup(name)
            assert found is not None, f"{name} has no place in the table"
            layers[found[0].name] = found[0]
    original, used = {}, set()
    for layer in layers.values():
        for suffix in (".weight", ".bias"):
            stacked = torch.cat([state[piece + suffix] for piece in layer.pieces])
            original[layer.name + suffix] = swap_halves(stacked) if layer.swap_halves else stacked
            used.update(piece + suffix for piece in layer.pieces)
    for key, tensor in state.items():
        if key == "pos_embed.pos_embed":
            original["pos_embed"] = tensor
        elif key.startswith("transformer_blocks.") and key not in used:
            _, block, rest = key.split(".", 2)
            original[f"joint_blocks.{block}.{ORIGINAL_NORMS[rest.removesuffix('.weight')]}.weight"] = tensor
            used.add(key)
    assert used | {"pos_embed.pos_embed"} == set(state)
    return original


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3-medium", "sd3.5-medium"])
def test_layout_table_is_the_inverse_of_diffusers_single_file_converter(sd35):
    """The table proven against diffusers' own converter: the tiny transformer's weights, put into the original
    layout by the table, convert back to exactly its state dict (q / k / v splits, the last block's pre-only context
    modulation and the final layer's swapped halves, SD3.5's q / k norms and attn2)."""
    transformer = build_sd3_transformer(sd35)
    state = transformer.state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original_layout(transformer, state))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[key], state[key]) for key in state)


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD3.5-medium folder ("model") and native LoRA files of it: "transformer" (every Linear but
    LEFT_OUT), "text_encoder" (CLIP-L self_attn and MLP), "text_encoder_2" (CLIP-G self_attn, text_projection),
    "text_encoder_3" (T5 attention and MLP layers)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = tmp_path_factory.mktemp("sd3_webui")
    model = family_named("sd3").make_tiny(folder / "model", seed=0, variant="sd3.5")
    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    states = {
        "transformer": random_lora(transformer, lambda name: name not in LEFT_OUT, 1),
        "text_encoder": random_lora(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder"),
                                    lambda name: ".self_attn." in name or ".mlp." in name, 2),
        "text_encoder_2": random_lora(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2"),
                                      lambda name: ".self_attn." in name or name == "text_projection", 3),
        "text_encoder_3": random_lora(T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3"),
                                      lambda name: name.endswith(("SelfAttention.q", "SelfAttention.o", "wi_0")), 4),
    }
    files = {"model": model}
    for part, state in states.items():
        files[part] = folder / f"{part}-1.safetensors"
        save_lora(files[part], state, lora_metadata(part, str(model), [], 1, family="sd3"))
    return files


def lora_args(files: dict[str, Path]) -> list[str]:
    """The --to_webui arguments of all four native files."""
    return ["--lora_path", str(files["transformer"]), "--lora_path_TE", str(files["text_encoder"]),
            "--lora_path_TE2", str(files["text_encoder_2"]), "--lora_path_TE3", str(files["text_encoder_3"])]


@pytest.fixture(scope="module")
def webui_file(sd3_files, tmp_path_factory) -> Path:
    """The kohya file --to_webui writes of all four native files."""
    out = tmp_path_factory.mktemp("sd3_webui_out") / "sd3_lora-1.safetensors"
    assert main(["--to_webui", *lora_args(sd3_files), "--dump_path", str(out)]) == 0
    return out


def test_to_webui_unfused_by_diffusers_converter_gives_the_native_weight_changes(sd3_files, webui_file):
    """Each kohya layer's weight change, placed in the original layout (zeros elsewhere) and converted by diffusers'
    single-file converter, is each diffusers layer's native change: nothing dropped, nothing misplaced."""
    transformer = SD3Transformer2DModel.from_pretrained(sd3_files["model"], subfolder="transformer")
    base = original_layout(transformer, transformer.state_dict())
    by_kohya_name = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key
                     for key in base if key.endswith(".weight")}  # ComfyUI's own lora_unet_ rule
    webui = load_file(webui_file)
    unet_layers = {key.split(".")[0] for key in webui if key.startswith("lora_unet_")}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_t_embedder_mlp_0"} <= unet_layers
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in unet_layers  # the last block is pre-only
    assert unet_layers <= set(by_kohya_name), sorted(unet_layers - set(by_kohya_name))
    changes = {key: torch.zeros_like(tensor) for key, tensor in base.items()}
    for layer in unet_layers:
        down, up = webui[f"{layer}.lora_down.weight"], webui[f"{layer}.lora_up.weight"]
        changes[by_kohya_name[layer]] = float(webui[f"{layer}.alpha"]) / down.shape[0] * up @ down
    converted = convert_sd3_transformer_checkpoint_to_diffusers(changes)
    native = deltas(load_lora(sd3_files["transformer"])[0])
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            want = native.get(name, torch.zeros_like(module.weight))
            assert torch.allclose(converted[f"{name}.weight"], want, atol=1e-5), name

    for part, prefix in TEXT_PARTS.items():  # text encoders: prefix + the module path, deltas as they were
        native = deltas(load_lora(sd3_files[part])[0])
        written = {layer[len(prefix):]: change for layer, change in
                   deltas({k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
                           for k, v in webui.items() if k.startswith(prefix)}).items()}
        assert set(written) == {layer.replace(".", "_") for layer in native}
        assert all(torch.allclose(written[layer.replace(".", "_")], change) for layer, change in native.items())


def test_to_webui_writes_kohya_sd3_metadata(webui_file):
    with safe_open(webui_file, framework="pt") as opened:
        metadata = opened.metadata()
    assert metadata["ss_base_model_version"] == "5-medium"  # kohya's SD3 model type of a dual-attention SD3.5
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert metadata["ss_network_module"] == "networks.lora_sd3"


def test_from_webui_round_trip_merges_the_same_weights(sd3_files, webui_file, tmp_path):
    assert main(["--from_webui", "--lora_path", str(webui_file), "--model", str(sd3_files["model"]),
                 "--dump_path", str(tmp_path)]) == 0
    for part in ("transformer", *TEXT_PARTS):
        back, metadata = load_lora(tmp_path / f"{part}-{webui_file.stem}.safetensors")
        assert metadata["family"] == "sd3" and metadata["part"] == part
        want, got = deltas(load_lora(sd3_files[part])[0]), deltas(back)
        assert set(got) == set(want), part  # a fused piece without a LoRA (LEFT_OUT) comes back as none
        assert all(torch.allclose(got[layer], want[layer], atol=1e-5) for layer in want), part
    # and back again: the same kohya file
    again = tmp_path / "again.safetensors"
    native_back = {part: str(tmp_path / f"{part}-{webui_file.stem}.safetensors")
                   for part in ("transformer", *TEXT_PARTS)}
    assert main(["--to_webui", *lora_args(native_back), "--dump_path", str(again)]) == 0
    first, second = load_file(webui_file), load_file(again)
    assert set(first) == set(second)


def test_kohya_file_with_a_layer_outside_the_layout_is_one_error_line(webui_file, tmp_path, capsys):
    state = load_file(webui_file)
    state["lora_unet_joint_blocks_0_x_block_attn_qkvx.alpha"] = torch.tensor(1.0)
    state["lora_unet_joint_blocks_0_x_block_attn_qkvx.lora_down.weight"] = torch.zeros(2, 32)
    state["lora_unet_joint_blocks_0_x_block_attn_qkvx.lora_up.weight"] = torch.zeros(96, 2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata={"modelspec.architecture": "stable-diffusion-3-5-medium/lora"})
    with pytest.raises(SystemExit) as exited:
        run_cli(main, ["--from_webui", "--lora_path", str(bad), "--dump_path", str(tmp_path / "out")])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: webui LoRA layer 'lora_unet_joint_blocks_0_x_block_attn_qkvx' is no layer of SD3's")
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def comfy():
    """comfy.lora from the ComfyUI checkout named by HCP_COMFYUI_DIR (model_management / model_base stand in for
    ComfyUI's heavy modules, as in tests/interop); skipped without one."""
    root = checkout("HCP_COMFYUI_DIR", "comfy/lora.py")
    with comfy_imported(root):
        yield importlib.import_module("comfy.lora")


class ComfyModel:
    """What ComfyUI's model_lora_keys_* read of a model: its state dict keys and its config."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.model_config = type("ModelConfig", (), {"unet_config": {}})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def test_comfyui_maps_every_key_and_merges_as_hcpdiff(comfy, sd3_files, webui_file, caplog):
    """ComfyUI's SD3 model in its original layout (`diffusion_model.joint_blocks...`, `clip_l.` / `clip_g.` /
    `t5xxl.transformer.`): every key of the file maps to a weight, and calculate_weight patches each as hcpdiff's
    native LoRA changes it (the fused layers in the original layout)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    transformer = SD3Transformer2DModel.from_pretrained(sd3_files["model"], subfolder="transformer")
    unet_state = {f"diffusion_model.{k}": v for k, v in original_layout(transformer, transformer.state_dict()).items()}
    native = deltas(load_lora(sd3_files["transformer"])[0])
    changes = {key: torch.zeros_like(tensor) for key, tensor in transformer.state_dict().items()}
    changes.update({f"{layer}.weight": change for layer, change in native.items()})
    want_change = original_layout(transformer, changes)
    clip_state, text_changes = {}, {}
    for part, prefix, cls in (("text_encoder", "clip_l.transformer.", CLIPTextModelWithProjection),
                              ("text_encoder_2", "clip_g.transformer.", CLIPTextModelWithProjection),
                              ("text_encoder_3", "t5xxl.transformer.", T5EncoderModel)):
        model = cls.from_pretrained(sd3_files["model"], subfolder=part)
        clip_state.update({prefix + k: v for k, v in model.state_dict().items()})
        text_changes.update({f"{prefix}{layer}.weight": change
                             for layer, change in deltas(load_lora(sd3_files[part])[0]).items()})
    key_map: dict[str, str] = {}
    comfy.model_lora_keys_unet(ComfyModel(unet_state), key_map)
    comfy.model_lora_keys_clip(ComfyModel(clip_state), key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.load_lora(load_file(webui_file), key_map)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]
    assert set(patches) == {f"diffusion_model.{k}" for k, v in want_change.items() if v.any()} | set(text_changes)
    for key, patch in patches.items():
        base = (unet_state | clip_state)[key].float()
        got = comfy.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), key)
        change = text_changes.get(key)
        if change is None:
            change = want_change[key.removeprefix("diffusion_model.")]
        assert torch.allclose(got, base + change, atol=1e-5), key


def test_to_diffusers_refuses_a_t5_lora_in_one_sentence(sd3_files, tmp_path):
    """diffusers' SD3 loader takes the transformer and the two CLIPs only: a T5 file is refused, not dropped."""
    from hcpdiff.errors import ModelError

    out = tmp_path / "diffusers.safetensors"
    with pytest.raises(ModelError, match="loads no text_encoder_3 LoRA; convert it with --to_webui"):
        main(["--to_diffusers", "--lora_path_TE3", str(sd3_files["text_encoder_3"]), "--dump_path", str(out)])
    assert not out.exists()
