"""kohya sd-scripts' own FLUX LoRA network (networks/lora_flux.py on library/flux_models.py), read from the checkout
named by HCP_SDSCRIPTS_DIR: it merges hcpdiff's --to_webui FLUX file into its BFL-layout transformer with the weight
changes hcpdiff's LoRA makes, and a file it saves reads back through --from_webui with the same changes."""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interop_helpers import checkout, restore_modules, stub_modules

pytestmark = pytest.mark.e2e

WIDTH = 32  # the tiny FLUX's hidden width: 2 heads of 16, MLP 128, 2 double and 2 single blocks


@pytest.fixture(scope="module")
def kohya():
    """(flux_models, lora_flux) from the checkout; its image-side imports (torchvision, cv2) are stand-ins."""
    import diffusers  # noqa: F401  (imported first: they must see torchvision as absent, not as the stand-in)
    import transformers  # noqa: F401

    root = checkout("HCP_SDSCRIPTS_DIR", "networks/lora_flux.py")
    stand_ins = {name: {"__spec__": importlib.machinery.ModuleSpec(name, None)}
                 for name in ("torchvision", "torchvision.transforms", "cv2")}
    before = stub_modules(stand_ins)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in ("library", "networks")}
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("library.flux_models"), importlib.import_module("networks.lora_flux")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in ("library", "networks")]:
            sys.modules.pop(name)
        sys.modules.update(ours)
        restore_modules(before)


def kohya_tiny_flux(flux_models):
    """kohya's BFL-layout Flux at the tiny FLUX's sizes (make_tiny_model --family flux)."""
    params = flux_models.FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=WIDTH, mlp_ratio=4.0,
                                    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
                                    qkv_bias=True, guidance_embed=True)
    return flux_models.Flux(params)


def native_flux_lora(tmp_path: Path) -> Path:
    """A native transformer LoRA on every Linear of the tiny FLUX but block 0's to_v and single block 1's to_k (so
    partial q / k / v sets fuse), ranks 2-4 and scales varying by layer."""
    from hcpdiff.lora.state_io import lora_metadata, save_lora
    from hcpdiff.tools.tiny_flux import build_flux_transformer

    generator = torch.Generator().manual_seed(0)
    state = {}
    linears = [(n, m) for n, m in build_flux_transformer(True).named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, module) in enumerate(linears):
        if name in ("transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.attn.to_k"):
            continue
        rank = 2 + i % 3
        state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator)
        state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(float(1 + i % 4))
    path = tmp_path / "transformer-1.safetensors"
    save_lora(path, state, lora_metadata("transformer", "", [], 1, family="flux"))
    return path


def bfl_deltas(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{BFL weight name: the change hcpdiff's LoRA makes to it}: piece changes stacked (zeros for pieces without a
    LoRA), final_layer's halves swapped."""
    from hcpdiff.families.flux import bfl_layer
    from hcpdiff.lora.state_io import layer_states

    pieces: dict[str, tuple] = {}
    for layer, parts in layer_states(native).items():
        fused, index = bfl_layer(layer)
        scale = float(parts[".alpha"]) / parts[".lora_A.weight"].shape[0]
        change = scale * parts[".lora_B.weight"] @ parts[".lora_A.weight"]
        pieces.setdefault(fused.name, (fused, {}))[1][index] = change
    out = {}
    for name, (fused, changes) in pieces.items():
        width = next(iter(changes.values())).shape[1]
        stacked = torch.cat([changes.get(i, torch.zeros(ratio * width, width))
                             for i, ratio in enumerate(fused.width_ratios)]) if len(fused.pieces) > 1 else changes[0]
        if fused.swap_halves:
            stacked = torch.cat(stacked.chunk(2)[::-1])
        out[f"{name}.weight"] = stacked
    return out


def test_kohya_merges_the_webui_file_as_hcpdiff(kohya, tmp_path):
    from hcpdiff.tools.lora_convert import main

    flux_models, lora_flux = kohya
    native = native_flux_lora(tmp_path)
    webui_path = tmp_path / "kohya.safetensors"
    assert main(["--to_webui", "--lora_path", str(native), "--dump_path", str(webui_path)]) == 0
    webui = load_file(webui_path)

    model = kohya_tiny_flux(flux_models)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    network, weights = lora_flux.create_network_from_weights(1.0, None, None, [None, None], model, weights_sd=webui,
                                                             for_inference=True)
    loaded = {lora.lora_name for lora in network.unet_loras}
    written = {key.split(".")[0] for key in webui}
    # kohya builds LoRA modules for the blocks and the input layers; final_layer it leaves out (--to_webui says so)
    assert written - loaded == {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"}
    assert loaded <= written
    network.merge_to([None, None], model, weights)
    after = model.state_dict()
    for key, change in bfl_deltas(load_file(native)).items():
        if key.startswith("final_layer."):
            continue
        assert torch.allclose(after[key] - before[key], change, atol=1e-5), key


def test_a_file_kohya_saves_reads_back_with_kohyas_weight_changes(kohya, tmp_path):
    """kohya's own network (qkv and linear1 trained whole: dense, not block-diagonal) saved as kohya saves it."""
    from hcpdiff.families.flux import bfl_layer_of_webui_name
    from hcpdiff.lora.state_io import layer_states, load_lora
    from hcpdiff.tools.lora_convert import main

    flux_models, lora_flux = kohya
    network = lora_flux.create_network(1.0, 4, 2.0, None, [None, None], kohya_tiny_flux(flux_models))
    network.apply_to([None, None], None, apply_text_encoder=False, apply_unet=True)  # registers its modules
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in network.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)  # kohya initialises lora_up to 0
    kohya_state = {key: value.contiguous() for key, value in network.state_dict().items()}
    path = tmp_path / "trained_by_kohya.safetensors"
    save_file(kohya_state, str(path))
    assert main(["--from_webui", "--lora_path", str(path), "--dump_path", str(tmp_path / "native")]) == 0
    ours = bfl_deltas(load_lora(tmp_path / "native" / "transformer-trained_by_kohya.safetensors")[0])

    model = kohya_tiny_flux(flux_models)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    merged, weights = lora_flux.create_network_from_weights(1.0, None, None, [None, None], model,
                                                            weights_sd=kohya_state, for_inference=True)
    merged.merge_to([None, None], model, weights)
    after = model.state_dict()
    assert set(ours) == {f"{bfl_layer_of_webui_name(lora.lora_name.removeprefix('lora_unet_')).name}.weight"
                         for lora in network.unet_loras}  # every layer kohya trains, nothing dropped
    for key, change in ours.items():
        assert torch.allclose(after[key] - before[key], change, atol=1e-5), key
    assert len(layer_states(load_lora(tmp_path / "native" / "transformer-trained_by_kohya.safetensors")[0])) \
        == 2 * (3 + 3 + 8) + 2 * (4 + 2)  # double: q, k, v x2 + 8 more; single: q, k, v, mlp + proj_out + norm
