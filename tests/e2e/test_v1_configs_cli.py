"""End-to-end: HCP-Diffusion v1 configs (fixtures in v1's spelling, tests/e2e/v1_configs/) train or render on the tiny
model unchanged or after `migrate_v1`, or stop with one line naming what replaces them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from hcpdiff.config import load_config
from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e
V1_CONFIGS = Path(__file__).parent / "v1_configs"


@pytest.fixture
def v1_dir(workdir: Path) -> Path:
    """The v1 fixtures copied beside the run (their `_base_` paths are relative to them), with a 2-image dataset."""
    folder = workdir / "v1"
    shutil.copytree(V1_CONFIGS, folder)
    make_demo_data(workdir / "imgs", num=2)
    return folder


def v1_overrides(tiny_model: Path, exp_dir: str, *datasets: str) -> list[str]:
    """Two 64 px steps on the tiny model, spelled with keys v1's train_base has (as a v1 user overrides)."""
    data = [f"data.{name}.source.data_source1.img_root=imgs" for name in ("dataset1", *datasets)]
    return [f"model.pretrained_model_name_or_path={tiny_model}", *data, "data.dataset1.batch_size=2",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}', "train.train_steps=2", "train.save_step=2",
            "train.workers=0", "train.scheduler.num_warmup_steps=0", "model.gradient_checkpointing=false",
            "mixed_precision=null", f"exp_dir={exp_dir}"]


def train(cli_in_process, workdir: Path, cfg: Path, overrides: list[str]):
    done = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", str(cfg), *overrides], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_v1_lora_configs_train_unchanged(cli_in_process, workdir, v1_dir, tiny_model):
    """lora_conventional (U-Net + text encoder) and locon run as v1 wrote them; v1's scale alpha / rank is kept."""
    done = train(cli_in_process, workdir, v1_dir / "lora_conventional.yaml", v1_overrides(tiny_model, "exps/lora"))
    assert "HCP-Diffusion v1 config, read as today's" in done.stderr and "migrate_v1" in done.stderr
    exp = workdir / "exps/lora"
    with safe_open(str(exp / "ckpts/unet-2.safetensors"), "pt") as unet:
        alphas = [unet.get_tensor(key).item() for key in unet.keys() if key.endswith("alpha")]
    assert alphas and set(alphas) == {1.0}  # v1's default alpha 1 (scale 1/8), not today's alpha = rank
    assert (exp / "ckpts/text_encoder-2.safetensors").is_file()
    # the saved cfg.yaml is today's spelling and loads on its own (resume reads it)
    saved = (exp / "cfg.yaml").read_text()
    assert "logger" not in saved and "hcpdiff.data.RatioBucket.from_files" in saved and "tokenizer_pt" not in saved
    assert load_config(exp / "cfg.yaml").lora_unet[0].rank == 8

    train(cli_in_process, workdir, v1_dir / "locon.yaml", v1_overrides(tiny_model, "exps/locon"))
    with safe_open(str(workdir / "exps/locon/ckpts/unet-2.safetensors"), "pt") as unet:
        conv = [key for key in unet.keys() if ".resnets." in key and key.endswith("lora_A.weight")]
        assert conv and unet.get_tensor(conv[0]).ndim == 4


def test_v1_fine_tuning_and_dreambooth_train_after_migrate(cli_in_process, workdir, v1_dir, tiny_model):
    """migrate_v1 writes today's config (noob variables resolved, bases merged); the written file trains 2 steps."""
    migrated = cli_in_process(["-m", "hcpdiff.tools.migrate_v1", str(v1_dir / "dreambooth.yaml"), "new/db.yaml"],
                              cwd=workdir)
    assert migrated.returncode == 0, migrated.stderr
    assert "changed: `data.dataset_class.bucket._target_`: -> hcpdiff.data.FixedBucket" in migrated.stderr
    new = yaml.safe_load((workdir / "new/db.yaml").read_text())
    assert "data_cfg" not in new and "lr" not in new["model"] and new["unet"] == [{"lr": 1e-6, "layers": [""]}]
    assert new["exp_dir"] == "exps/${hcp.time:}" and new["train"]["scale_lr"] is True  # v1's defaults, explicit
    assert new["data"]["dataset_class"]["bucket"] == {"_target_": "hcpdiff.data.FixedBucket", "target_size": [512, 512],
                                                      "_partial_": True}
    assert new["data"]["dataset1"]["source"]["data_source1"]["prompt_template"] == "cfgs/prompt_templates/object.txt"
    overrides = v1_overrides(tiny_model, "exps/db", "dataset_class") + ["data.dataset_class.bucket.target_size=[64,64]"]
    train(cli_in_process, workdir, workdir / "new/db.yaml", overrides)
    assert (workdir / "exps/db/ckpts/unet-2.safetensors").is_file()


@pytest.mark.parametrize("name, words", [
    ("controlnet", ["`plugin_unet`", "TextImageCondPairDataset", "Text2ImageCondSource",
                    "ControlNet plugin does not migrate"]),
])
def test_v1_unsupported_train_configs_stop_in_one_line(cli_in_process, workdir, v1_dir, one_error_line, name, words):
    """ControlNet stops before any model loads, in training and migration."""
    trained = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", str(v1_dir / f"{name}.yaml")], cwd=workdir)
    migrated = cli_in_process(["-m", "hcpdiff.tools.migrate_v1", str(v1_dir / f"{name}.yaml"), "new.yaml"],
                              cwd=workdir)
    for result in (trained, migrated):
        line = one_error_line(result)
        assert "is an HCP-Diffusion v1 config that cannot run here" in line and all(word in line for word in words)
    assert not (workdir / "new.yaml").exists()


def test_v1_infer_configs_render_or_stop(cli_in_process, workdir, v1_dir, tiny_model, one_error_line):
    """v1's text2img renders unchanged; img2img + LoRA merge groups migrate to init_image / merge; ControlNet stops."""
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", str(v1_dir / "text2img.yaml"),
                           f"pretrained_model={tiny_model}", "prompt=a red square", "infer_args.width=64",
                           "infer_args.height=64", "infer_args.num_inference_steps=2", "dtype=fp32", "bs=1",
                           "save.out_dir=out"], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HCP-Diffusion v1 config" in done.stderr
    images = sorted((workdir / "out").glob("*.png"))
    assert [image.name for image in images] == ["0000-42.png"] and Image.open(images[0]).size == (64, 64)

    migrated = cli_in_process(["-m", "hcpdiff.tools.migrate_v1", str(v1_dir / "img2img_lora.yaml"), "i2i.yaml"],
                              cwd=workdir)
    assert migrated.returncode == 0, migrated.stderr
    new = yaml.safe_load((workdir / "i2i.yaml").read_text())
    assert new["init_image"] == "cond_img.png" and new["save"]["out_dir"] == "output/" and "exp_dir" not in new
    assert new["merge"] == {
        "group1": {"type": "unet", "base_model_alpha": 1.0, "lora": [
            {"path": "exps/run/ckpts/unet-2.safetensors", "alpha": 0.8, "layers": "all"}]},
        "group2": {"type": "TE", "base_model_alpha": 1.0, "lora": [
            {"path": "exps/run/ckpts/text_encoder-2.safetensors", "alpha": 0.8, "layers": "all"}]}}

    refused = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", str(v1_dir / "img2img_controlnet.yaml")],
                             cwd=workdir)
    line = one_error_line(refused)
    assert "`ex_input`" in line and "`merge.group1.plugin`" in line and "ControlNet plugin does not migrate" in line


def test_v1_textual_inversion_migrates_to_embeddings(cli_in_process, workdir, v1_dir, one_error_line):
    """v1's tokenizer_pt becomes `embeddings:` (its optimizer_pt / scheduler_pt dropped: embeddings train in
    train.optimizer at their own lr); run as v1 wrote it, the one line left names the embedding to create."""
    import yaml

    migrated = cli_in_process(["-m", "hcpdiff.tools.migrate_v1", str(v1_dir / "textual_inversion.yaml"), "new.yaml"],
                              cwd=workdir)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    written = yaml.safe_load((workdir / "new.yaml").read_text())
    assert written["embeddings"]["train"] == [{"name": "pt-catgirl1", "lr": 0.003}] and "tokenizer_pt" not in written
    assert not {"optimizer_pt", "scheduler_pt", "scale_lr_pt"} & set(written["train"])
    line = one_error_line(cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg",
                                          str(v1_dir / "textual_inversion.yaml")], cwd=workdir))
    assert "embedding 'pt-catgirl1' not found" in line and "create_embedding" in line
