"""`python -m hcpdiff.tools.inspect_data`: run as a user would on generated images and a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data_helpers import write_image, write_truncated_jpeg

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hcpdiff.tools.inspect_data", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def make_config(tmp_path: Path, model_path: str | None = None) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir(parents=True)
    write_image(folder / "a.png", (128, 64))
    write_image(folder / "b.png", (64, 128))
    write_image(folder / "c.png", (32, 32))
    write_truncated_jpeg(folder / "broken.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "a.txt").write_text("cat, red, sitting")
    (folder / "b.txt").write_text("dog, blue")
    template = tmp_path / "tmpl.txt"
    template.write_text("a photo of {pt1}, {caption}\n")
    config = {
        "seed": 1,
        "model": {"pretrained_model_name_or_path": model_path},
        "data": {"dataset1": {
            "batch_size": 2,
            "source": {"s1": {"img_root": str(folder), "caption_file": str(folder), "prompt_template": str(template),
                              "word_names": {"pt1": "sks"}, "tag_shuffle": True, "keep_tokens": 1}},
            "bucket": {"_target_": "hcpdiff.data.FixedBucket", "_partial_": True, "target_size": 64},
        }},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_reports_sources_buckets_and_prompts(tmp_path):
    result = run_tool("--cfg", str(make_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dataset data.dataset1: 3 images" in out
    assert "source s1" in out and "3 images, 2 with captions, 1 missing, 1 unreadable" in out
    assert "unreadable: broken.jpg" in out and "missing captions: c.png" in out
    assert "pixel step 64 (assumed 64" in out
    assert "   64 x 64      1.00  3" in out
    prompts = [line for line in out.splitlines() if line.startswith("    [s1/")]
    assert len(prompts) == 3 and any("a photo of sks, cat, " in p for p in prompts)
    assert "1 image(s) are smaller than their bucket" in out
    assert "cannot be read" in result.stderr


def test_pixel_step_from_local_model_folder_and_overrides(tmp_path):
    model = tmp_path / "model"
    for part, cfg in (("vae", {"block_out_channels": [8, 8]}), ("unet", {"block_out_channels": [8, 8, 8], "down_block_types": ["A", "B", "C"]})):
        (model / part).mkdir(parents=True)
        (model / part / "config.json").write_text(json.dumps(cfg))
    result = run_tool("--cfg", str(make_config(tmp_path, str(model))), "data.dataset1.bucket.target_size=48")
    assert result.returncode == 0, result.stderr
    assert f"pixel step 8 (the config.json files of {model})" in result.stdout and "   48 x 48 " in result.stdout
    result = run_tool("--cfg", str(make_config(tmp_path / "x", str(model))), "data.dataset1.bucket.target_size=60")
    assert result.returncode == 2 and "error:" in result.stderr and "multiples of the pixel step 8" in result.stderr


def test_bad_key_is_one_error_line(tmp_path):
    result = run_tool("--cfg", str(make_config(tmp_path)), "+data.dataset1.source.s1.tag_shufle=true")
    assert result.returncode == 2 and "tag_shuffle" in result.stderr and "Traceback" not in result.stderr
