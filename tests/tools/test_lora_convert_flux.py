"""A FLUX transformer LoRA converted with --to_diffusers loads in FluxPipeline.load_lora_weights and renders the
image hcpdiff's own merge renders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from hcpdiff.families import family_named
from hcpdiff.lora import LoraGroupSpec, attach_lora
from hcpdiff.lora.merge import merge_lora
from hcpdiff.lora.state_io import load_checkpoint, lora_metadata, lora_state_dict, save_lora

pytestmark = pytest.mark.e2e

# the shipped lora_flux.yaml's patterns: double- and single-block attention and MLP projections
FLUX_LAYERS = [r"re:transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
               r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
               r"re:single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)"]


@pytest.fixture(scope="module")
def flux_and_lora(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny FLUX folder, a trained-looking native transformer LoRA of it)."""
    folder = tmp_path_factory.mktemp("flux_lora")
    model = family_named("flux").make_tiny(folder / "model", seed=0, variant="flux")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    groups = attach_lora(transformer, [LoraGroupSpec(lr=1e-4, layers=FLUX_LAYERS, rank=4, alpha=2.0)], "transformer",
                         "lora_transformer")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    path = folder / "transformer-1.safetensors"
    save_lora(path, lora_state_dict(transformer), lora_metadata("transformer", str(model), groups, 1, family="flux"))
    return model, path


def render(pipe: FluxPipeline) -> np.ndarray:
    """One 64 x 64 image in 2 steps, fixed seed, as float pixels."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_to_diffusers_flux_renders_as_hcpdiff_merge(flux_and_lora, tmp_path, cli):
    model, native = flux_and_lora
    out = tmp_path / "pytorch_lora_weights.safetensors"
    done = cli(["-m", "hcpdiff.tools.lora_convert", "--to_diffusers", "--lora_path", str(native),
                "--dump_path", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    converted = load_file(out)
    state, _, _ = load_checkpoint(native)
    assert converted and all(key.startswith("transformer.") for key in converted)
    assert len(converted) == 2 * len({key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})

    loaded = FluxPipeline.from_pretrained(model)
    loaded.load_lora_weights(str(out))
    merged = FluxPipeline.from_pretrained(model)
    merge_lora(merged.transformer, state, 1.0, source=str(native))
    base = render(FluxPipeline.from_pretrained(model))
    ours, theirs = render(merged), render(loaded)
    assert np.abs(ours - base).mean() > 1e-3  # the LoRA changes the image
    assert np.allclose(ours, theirs, atol=1e-4)

