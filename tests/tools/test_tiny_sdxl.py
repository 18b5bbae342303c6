"""make_tiny_model --family sdxl: a tiny SDXL folder that diffusers' SDXL pipeline loads and runs."""
from __future__ import annotations

import json
from pathlib import Path


def test_sdxl_family_writes_a_loadable_sdxl_pipeline(tmp_path: Path, cli_in_process) -> None:
    out = tmp_path / "xl"
    result = cli_in_process(["-m", "hcpdiff.tools.make_tiny_model", str(out), "--family", "sdxl"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((out / "unet/config.json").read_text())
    text_2 = json.loads((out / "text_encoder_2/config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    # pooled embeds of encoder 2 plus six embedded time ids feed the U-Net's add embedding
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + text_2["projection_dim"]
    vae = json.loads((out / "vae/config.json").read_text())
    assert len(vae["block_out_channels"]) == 4

    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
