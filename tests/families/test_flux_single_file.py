"""A FLUX.1 base model given as Black Forest Labs' single transformer file (`double_blocks.0.img_attn.qkv.weight`,
...) plus a local diffusers config folder, as FLUX.1 is downloaded from BFL and civitai.

diffusers' reader of that layout assumes FLUX.1's width (3072 = 24 heads x 128) when it splits the single blocks'
fused projections, so the file here has the real width at reduced depth (1 double + 1 single block, ~530M
parameters, written in bf16); the text encoders and VAE stay tiny."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from bfl_layout import diffusers_to_bfl
from hcpdiff.errors import ModelError
from hcpdiff.families import tiny_variant_family
from hcpdiff.models import load_model_parts

FULL_WIDTH = {"attention_head_dim": 128, "num_attention_heads": 24, "axes_dims_rope": [16, 56, 56],
              "num_layers": 1, "num_single_layers": 1}


def patterned_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 weights for every tensor of `model` (built on the meta device): windows of one random sequence at
    different offsets, so every tensor (and every q / k / v part of a fused one) differs, without drawing 530M
    random numbers."""
    period = 1_000_003
    base = (torch.randn(period, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    state = {}
    for i, (name, meta) in enumerate(model.state_dict().items()):
        flat = torch.empty(meta.numel(), dtype=torch.bfloat16)
        offset, filled = (i * 7919) % period, 0
        while filled < flat.numel():
            piece = base[offset: offset + flat.numel() - filled]
            flat[filled: filled + piece.numel()] = piece
            filled, offset = filled + piece.numel(), 0
        state[name] = flat.view(meta.shape)
    return state


@pytest.fixture(scope="module")
def bfl_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """(config folder, the BFL-layout file, the tiny folder it was copied from, the transformer's diffusers weights).

    The config folder is the tiny FLUX-dev folder with a full-width transformer config and no transformer weights."""
    root = tmp_path_factory.mktemp("flux_single")
    tiny = tiny_variant_family("flux").make_tiny(root / "tiny", seed=0, variant="flux")
    folder = root / "config"
    shutil.copytree(tiny, folder)
    config_file = folder / "transformer" / "config.json"
    config = {**json.loads(config_file.read_text()), **FULL_WIDTH}
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()  # configs only: the file brings the weights
    config_file.write_text(json.dumps(config))
    with init_empty_weights():
        meta_model = FluxTransformer2DModel.from_config(config)
    state = patterned_weights(meta_model)
    path = root / "flux1-tiny-depth.safetensors"
    save_file(diffusers_to_bfl(state), str(path))
    return folder, path, tiny, state


def test_bfl_single_file_loads_the_same_transformer_and_the_folders_other_parts(bfl_checkpoint):
    folder, path, tiny, state = bfl_checkpoint
    parts = load_model_parts(str(path), single_file_config=str(folder))
    assert parts.family.name == "flux" and parts.name_or_path == str(path)
    transformer = parts.transformer
    assert transformer.dtype == torch.float32  # as from a folder; the trainer casts to the run's precision
    assert {k: v for k, v in transformer.config.items() if k in FULL_WIDTH} == FULL_WIDTH
    loaded = transformer.state_dict()
    assert loaded.keys() == state.keys()
    # every weight where the original has it (so, with the same config, the same outputs; a forward pass of the
    # 530M parameters in both would only add seconds)
    assert all(torch.equal(loaded[key], state[key].float()) for key in state), "a weight landed in the wrong place"
    from_folder = load_model_parts(str(tiny))  # every other part comes from the config folder, unchanged
    for part in ("vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(parts, part).state_dict(), getattr(from_folder, part).state_dict()
        assert all(torch.equal(got[key], want[key]) for key in want), part
    assert parts.tokenizer_2("a cat").input_ids == from_folder.tokenizer_2("a cat").input_ids
    assert parts.noise_scheduler.config == from_folder.noise_scheduler.config


def test_bfl_file_without_config_folder_names_the_key(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(path))
    with pytest.raises(ModelError, match=r"^model\.pretrained_model_name_or_path: '.*flux1-dev\.safetensors' is a "
                                         r"FLUX\.1 \(dev / schnell\) transformer in its original single-file layout; "
                                         r"set model\.single_file_config to a local diffusers FLUX\.1"):
        load_model_parts(str(path))
