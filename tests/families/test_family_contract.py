"""The contract every registered model family passes, run as a user runs it: its tiny model, its shipped training
config for two steps with a preview, a checkpoint of its denoiser, and its shipped visualizer config rendering the
LoRA. A family that is registered without a tiny builder or shipped configs fails here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from family_data import family_dataset
from hcpdiff.families import FAMILIES, family_named, folder_config_reader

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES])
def family_model(request, tiny_models) -> tuple:
    """(family, its tiny model folder), built by the family's own tiny builder."""
    family = family_named(request.param)
    return family, tiny_models(family.tiny_variants[0])


def render(run, workdir: Path, family, model: Path, lora: Path, alpha: float, size: int,
           condition: list[str]) -> np.ndarray:
    """One image from the family's shipped visualizer config with the LoRA at `alpha`."""
    out = workdir / f"render-{alpha}"
    done = run(["-m", "hcpdiff.visualizer", "--cfg", family.infer_config, f"pretrained_model={model}",
                f"lora_path={lora}", f"lora_alpha={alpha}", "prompt='a red circle'", f"save.out_dir={out}",
                f"infer_args.width={size}", f"infer_args.height={size}", "infer_args.num_inference_steps=2",
                *(["infer_args.num_frames=5"] if family.renders_video else []), *condition], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    if family.renders_video:  # a clip: its frames, one after another
        (clip,) = sorted(out.glob("*.mp4"))
        return np.concatenate(read_frames(clip)).astype(np.int16)
    (image,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)


def read_frames(path: Path) -> list[np.ndarray]:
    """A video file's frames [H, W, 3] (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_family_trains_checkpoints_previews_and_renders(family_model, workdir, cli, cli_in_process):
    family, model = family_model
    size = max(64, family.pixel_step(folder_config_reader(model)))
    # an editing family trains on (input image, instruction, image) rows, at a small input area (family_dataset)
    edits = family.condition_images > 0
    data, data_args = family_dataset(family, workdir / "data", num=2)
    condition = {"preview": f", condition_images: ['{data}/input/0.png']",
                 "render": [f"condition_image={data}/input/0.png"]} if edits else {"preview": "", "render": []}
    frames = ", num_frames: 5" if family.renders_video else ""  # a video family renders clips (.mp4) of 5 frames
    lora_key = f"lora_{family.denoiser}"
    # the first family trains in a process of its own, as the user's launch does (tests/e2e launch the rest of the
    # ways); the others run the same entry point in-process, sparing ~6 s of imports each
    train = cli if family is FAMILIES[0] else cli_in_process
    result = train(["-m", "hcpdiff.train_ac_single", "--cfg", family.train_config,
                  f"model.pretrained_model_name_or_path={model}", *data_args,
                  "data.dataset1.batch_size=2", "train.train_steps=2", "train.workers=0",
                  "train.scheduler.num_warmup_steps=0", f"{lora_key}.0.lr=1e-2",
                  f'data.dataset1.bucket.target_area=${{hcp.eval:"{size}*{size}"}}', "data.dataset1.bucket.num_bucket=1",
                  f"previewer={{step: 2, prompts: ['a red circle'], width: {size}, height: {size}, "
                  f"num_inference_steps: 2{condition['preview']}{frames}}}"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = next((workdir / "exps").iterdir())

    ckpt = exp / "ckpts" / f"{family.denoiser}-2.safetensors"
    assert sorted(p.name for p in (exp / "ckpts").iterdir()) == [ckpt.name]
    with safe_open(ckpt, "pt") as file:
        metadata = file.metadata()
        state = {key: file.get_tensor(key) for key in file.keys()}
    assert (metadata["family"], metadata["part"], metadata["step"]) == (family.name, family.denoiser, "2")
    assert json.loads(metadata["groups"])[0]["name"] == f"{lora_key}[0]"
    matched = {layer for group in json.loads((exp / "lora_layers.json").read_text())[lora_key] for layer in group["layers"]}
    assert {key.split(".lora_")[0] for key in state if ".lora_" in key} == matched
    ups = [value for key, value in state.items() if ".lora_B." in key]
    assert ups and all(torch.count_nonzero(up) > 0 for up in ups)  # lora_B starts at 0: every layer trained

    if family.renders_video:
        preview = read_frames(exp / "preview" / "2-0.mp4")
        assert len(preview) == 5 and preview[0].shape == (size, size, 3)
    else:
        preview = Image.open(exp / "preview" / "2-0.png")
        assert preview.size == (size, size)

    # the renders run the visualizer's entry point in-process
    base, adapted = (render(cli_in_process, workdir, family, model, ckpt, alpha, size, condition["render"])
                     for alpha in (0.0, 1.0))
    assert base.shape == adapted.shape == ((5 if family.renders_video else 1) * size, size, 3)
    assert np.abs(base - adapted).mean() > 0  # the LoRA changes the render
