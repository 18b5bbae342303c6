"""Textual inversion as a user runs it: create an embedding, train it (alone, or with a LoRA), render it by name,
convert it for a1111 / ComfyUI / diffusers, and the one-line errors for a missing name."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcpdiff.config import load_config
from hcpdiff.infer import generate
from hcpdiff.tools.create_embedding import create_embedding
from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=2", "neg_prompt=ugly",
         "infer_args.guidance_scale=7.5"]
TRAIN = ['data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "data.dataset1.batch_size=1", "train.workers=0",
         "train.log_step=1", "train.scheduler.num_warmup_steps=0"]


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, tiny_model):
    """cfgs/train/examples/textual_inversion.yaml for 10 steps on one image, run in-process through the Trainer so
    the text encoder and U-Net it trained with can be compared with the saved model afterwards."""
    from accelerate.state import AcceleratorState, PartialState

    from hcpdiff.families import TRAINABLE_PARTS
    from hcpdiff.train.specs import top_level_keys
    from hcpdiff.train.trainer import Trainer

    root = tmp_path_factory.mktemp("ti")
    (root / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    data = make_demo_data(root / "data", num=1)
    old_cwd = os.getcwd()
    os.chdir(root)
    try:
        create_embedding(str(tiny_model), "pt-cat1", 4, "cat", "embs")
        cfg = load_config("cfgs/train/examples/textual_inversion.yaml",
                          [f"model.pretrained_model_name_or_path={tiny_model}",
                           f"data.dataset1.source.data_source1.img_root={data}", *TRAIN, "train.train_steps=10",
                           "train.save_step=5", "exp_dir=exps/ti", "embeddings.train=[{name: pt-cat1, lr: 0.05}]"],
                          top_level=top_level_keys(TRAINABLE_PARTS))
        trainer = Trainer(cfg, single_process=True)
        trainer.setup()
        trainer.train()
        trained = {part: {name: p.detach().clone() for name, p in trainer.parts.components[part].named_parameters()}
                   for part in ("text_encoder", "unet")}
        trainer.cleanup()
    finally:
        os.chdir(old_cwd)
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    return root, trained


def render(root: Path, cfg: str, *overrides: str) -> np.ndarray:
    out_dir = root / f"out{len(list(root.glob('out*')))}"
    paths = generate(load_config(str(REPO_ROOT / cfg), [*SMALL, f"save.out_dir={out_dir}", *overrides]))
    return np.asarray(Image.open(paths[0]).convert("RGB")).astype(np.int16)


def test_textual_inversion_trains_only_the_embedding_rows(ti_run, tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root, trained = ti_run
    ckpts = root / "exps/ti/ckpts"
    assert sorted(p.name for p in ckpts.iterdir()) == ["pt-cat1-10.safetensors", "pt-cat1-5.safetensors"]
    with safe_open(str(ckpts / "pt-cat1-10.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["text_encoder"] and handle.metadata()["format"] == "hcpdiff-embedding"
        assert handle.metadata()["step"] == "10"
    init = load_file(root / "embs/pt-cat1.safetensors")["text_encoder"]
    final = load_file(ckpts / "pt-cat1-10.safetensors")["text_encoder"]
    assert final.shape == init.shape == (4, 32) and (final - init).abs().min() > 0  # every vector moved
    vectors = [param for name, param in trained["text_encoder"].items() if name.endswith("token_embedding.vectors.0")]
    assert len(vectors) == 1 and torch.equal(vectors[0], final)

    base_te = dict(CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").named_parameters())
    compared = 0
    for name, param in trained["text_encoder"].items():
        if name.endswith("token_embedding.vectors.0"):
            continue
        plain = base_te[name.replace("token_embedding.base.", "token_embedding.")]
        # the base model's token rows; the rows added for the new tokens are never read (the vectors are)
        assert torch.equal(param[: plain.shape[0]], plain), name
        compared += 1
    assert compared == len(base_te)
    base_unet = dict(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").named_parameters())
    assert all(torch.equal(param, base_unet[name]) for name, param in trained["unet"].items())
    log = (root / "exps/ti/train.log").read_text()
    assert "embeddings[pt-cat1]=0.0488" in log and "step 10/10" in log  # its own param group, cosine from 0.05


def test_the_visualizer_renders_a_trained_embedding_by_name(ti_run, tiny_model, cli_in_process, one_error_line):
    root, _ = ti_run
    model = f"pretrained_model={tiny_model}"
    ckpts = f"emb_dir={root / 'exps/ti/ckpts'}"
    trained = render(root, "cfgs/infer/text2img.yaml", model, ckpts, "prompt='a photo of {pt-cat1-10:1.2}'")
    unweighted = render(root, "cfgs/infer/text2img.yaml", model, ckpts, "prompt='a photo of pt-cat1-10'")
    initial = render(root, "cfgs/infer/text2img.yaml", model, f"emb_dir={root / 'embs'}",
                     "prompt='a photo of {pt-cat1:1.2}'")
    assert np.abs(trained - initial).mean() > 0.5  # training changed the image
    assert np.abs(trained - unweighted).mean() > 0  # the weight applies to the embedding's vectors
    missing = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml", model, ckpts, *SMALL,
                              "prompt='masterpiece, {surtr_arknights-1000:1.2}'", f"save.out_dir={root / 'none'}"],
                             cwd=REPO_ROOT)
    line = one_error_line(missing)
    assert "embedding 'surtr_arknights-1000' not found" in line and "pt-cat1-10" in line


def test_webui_file_renders_the_same_image_in_diffusers(ti_run, tiny_model, tiny_sdxl, cli_in_process):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root, _ = ti_run
    webui = root / "webui" / "pt-cat1.safetensors"
    done = cli_in_process(["-m", "hcpdiff.tools.embedding_convert", "--to_webui",
                           str(root / "exps/ti/ckpts/pt-cat1-10.safetensors"), "--dump_path", str(webui)], cwd=root)
    assert done.returncode == 0, done.stderr
    assert list(load_file(webui)) == ["emb_params"]
    # the webui file in emb_dir renders as hcpdiff's own file does
    ours = render(root, "cfgs/infer/text2img.yaml", f"pretrained_model={tiny_model}", f"emb_dir={webui.parent}",
                  "prompt='a photo of pt-cat1'")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion(str(webui), token="pt-cat1")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of pt-cat1", negative_prompt="ugly", width=64, height=64, num_inference_steps=2,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(42), output_type="np").images[0]
    assert np.array_equal(ours, (theirs * 255).round().astype(np.int16))
    back = root / "back" / "pt-cat1.safetensors"
    assert cli_in_process(["-m", "hcpdiff.tools.embedding_convert", "--from_webui", str(webui), "--dump_path",
                           str(back)], cwd=root).returncode == 0
    trained = load_file(root / "exps/ti/ckpts/pt-cat1-10.safetensors")["text_encoder"]
    assert torch.equal(load_file(back)["text_encoder"], trained)

    # SDXL: clip_l / clip_g, loaded into each encoder as diffusers' docs say
    xl_emb = create_embedding(str(tiny_sdxl), "pt-cat1", 3, "dog", str(root / "embs_xl"))
    xl_webui = root / "webui_xl" / "pt-cat1.safetensors"
    assert cli_in_process(["-m", "hcpdiff.tools.embedding_convert", "--to_webui", str(xl_emb), "--dump_path",
                           str(xl_webui)], cwd=root).returncode == 0
    state = load_file(xl_webui)
    assert sorted(state) == ["clip_g", "clip_l"]
    ours = render(root, "cfgs/infer/text2img_sdxl.yaml", f"pretrained_model={tiny_sdxl}", f"emb_dir={xl_emb.parent}",
                  "prompt='a photo of {pt-cat1:1.0}'")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_textual_inversion(state["clip_l"], token="pt-cat1", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="pt-cat1", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of pt-cat1", negative_prompt="ugly", width=64, height=64, num_inference_steps=2,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(42), output_type="np").images[0]
    assert np.array_equal(ours, (theirs * 255).round().astype(np.int16))


def test_pivotal_tuning_in_v1_spelling_writes_both_checkpoints(workdir, tiny_model, cli_in_process, one_error_line):
    data = make_demo_data(workdir / "data", num=1)
    create_embedding(str(tiny_model), "pt-cat1", 2, "cat", str(workdir / "embs"))
    (workdir / "pivotal.yaml").write_text(
        "_base_: [cfgs/train/examples/lora_conventional.yaml]\n"
        "tokenizer_pt:  # HCP-Diffusion v1's spelling\n"
        "  emb_dir: embs/\n  replace: false\n  train: [{name: pt-cat1, lr: 0.01}]\n"
        "data:\n  dataset1:\n    source:\n      data_source1:\n"
        "        caption_file: null\n        prompt_template: cfgs/prompt_templates/object.txt\n"
        "        word_names: {pt1: pt-cat1}\n")
    args = ["-m", "hcpdiff.train_ac_single", "--cfg", "pivotal.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}", *TRAIN, "train.train_steps=2", "exp_dir=exps/piv"]
    result = cli_in_process(args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = sorted(p.name for p in (workdir / "exps/piv/ckpts").iterdir())
    assert ckpts == ["pt-cat1-2.safetensors", "unet-2.safetensors"]
    assert "`tokenizer_pt`: -> embeddings" in result.stderr  # read as today's embeddings: (the v1 translation says so)

    missing = cli_in_process([*args, "tokenizer_pt.train=[{name: pt-dog9, lr: 0.01}]", "exp_dir=exps/none"],
                             cwd=workdir)
    line = one_error_line(missing)
    assert "embeddings.train[0].name: embedding 'pt-dog9' not found" in line and "holds pt-cat1" in line
    assert not (workdir / "exps/none").exists()


def test_resume_is_bit_exact_and_sdxl_trains_both_encoders(workdir, tiny_model, tiny_sdxl, cli_in_process):
    data = make_demo_data(workdir / "data", num=1)
    base = ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/textual_inversion.yaml",
            f"data.dataset1.source.data_source1.img_root={data}", *TRAIN, "train.save_step=2",
            "train.scheduler.name=constant"]
    sd = [*base, f"model.pretrained_model_name_or_path={tiny_model}"]
    create_embedding(str(tiny_model), "pt-cat1", 2, "cat", str(workdir / "embs"))
    for args in (["train.train_steps=2", "exp_dir=exps/r"], ["train.train_steps=4", "train.resume=exps/r"],
                 ["train.train_steps=4", "exp_dir=exps/straight"]):
        run = cli_in_process([*sd, *args], cwd=workdir)
        assert run.returncode == 0, run.stderr[-3000:]
    resumed, straight = (load_file(workdir / f"exps/{name}/ckpts/pt-cat1-4.safetensors")["text_encoder"]
                         for name in ("r", "straight"))
    assert torch.equal(resumed, straight)

    create_embedding(str(tiny_sdxl), "pt-cat1", 2, "cat", str(workdir / "embs_xl"))
    run = cli_in_process([*base, f"model.pretrained_model_name_or_path={tiny_sdxl}", "embeddings.emb_dir=embs_xl",
                          "train.train_steps=2", "exp_dir=exps/xl"], cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    init, final = (load_file(path) for path in (workdir / "embs_xl/pt-cat1.safetensors",
                                                 workdir / "exps/xl/ckpts/pt-cat1-2.safetensors"))
    assert sorted(final) == ["text_encoder", "text_encoder_2"]
    assert all(not torch.equal(final[part], init[part]) for part in final)
