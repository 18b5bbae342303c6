"""What the family seam promises a user at the config level: typo'd top-level keys in a file are refused, and a group
for a part the model's family lacks is one error naming the parts it has, before anything trains."""
from __future__ import annotations

from pathlib import Path

import pytest

from hcpdiff.config import load_config
from hcpdiff.families import TRAINABLE_PARTS
from hcpdiff.tools.make_demo_data import make_demo_data
from hcpdiff.train.specs import top_level_keys

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TRAIN = sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "cfgs" / "train").rglob("*.yaml"))


@pytest.fixture
def demo_args(workdir, tiny_model):
    data = make_demo_data(workdir / "data", num=2)
    return [f"model.pretrained_model_name_or_path={tiny_model}", f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=1"]


def test_top_level_typo_in_a_file_names_the_file_and_the_key(workdir, demo_args, cli_in_process, one_error_line):
    config = workdir / "my_run.yaml"
    config.write_text("_base_: cfgs/train/examples/demo_tiny.yaml\nmixed_precison: bf16\n")
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", str(config), *demo_args], cwd=workdir)
    line = one_error_line(result)
    assert "`mixed_precison`" in line and "my_run.yaml" in line and "'mixed_precision'" in line
    assert not (workdir / "exps").exists()


def test_variables_that_values_interpolate_stay_allowed(workdir, demo_args, cli_in_process):
    config = workdir / "vars.yaml"
    config.write_text("_base_: cfgs/train/examples/demo_tiny.yaml\nmy_rank: 2\n"
                      "lora_unet:\n  - {lr: 1e-4, rank: '${my_rank}', layers: ['re:.*\\.to_k$']}\n")
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", str(config), *demo_args], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]


def test_group_for_a_part_the_model_lacks_names_the_parts_it_has(workdir, demo_args, cli_in_process, one_error_line):
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
                             *demo_args, "lora_text_encoder_2=[{lr: 1e-4, layers: ['re:.*q_proj$']}]"], cwd=workdir)
    line = one_error_line(result)
    assert "lora_text_encoder_2" in line and "has no text_encoder_2" in line and "unet, text_encoder" in line


@pytest.mark.parametrize("path", SHIPPED_TRAIN, ids=str)
def test_shipped_training_configs_use_only_known_top_level_keys(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    load_config(path, top_level=top_level_keys(TRAINABLE_PARTS))


@pytest.mark.parametrize("family_name, overrides, words", [
    ("flux", ["mixed_precision=fp16"], "fp16 makes FLUX.1 train NaN"),
    ("flux", ["train.loss.min_snr_gamma=5"], "min_snr_gamma is a DDPM option"),
    ("sd", ["lora_text_encoder_2=[{lr: 1e-4, layers: ['re:.*q_proj$']}]"], "has no text_encoder_2"),
    ("sd", ["model.drop_t5=true"], "no T5 encoder it can run without"),
])
def test_family_checks_come_before_any_weights_load(workdir, cli_in_process, one_error_line, family_name, overrides,
                                                    words):
    """A local model's family is read from its configs, so settings it refuses are one error before a multi-GB
    load: the folder here has no denoiser weights at all, and the error is still the setting's."""
    from hcpdiff.families import family_named

    family = family_named(family_name)
    model = family.make_tiny(workdir / "model", seed=0)
    for weights in (model / family.denoiser).glob("*.safetensors"):
        weights.unlink()
    data = make_demo_data(workdir / "data", num=1)
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", family.train_config,
                             f"model.pretrained_model_name_or_path={model}",
                             f"data.dataset1.source.data_source1.img_root={data}",
                             f"data.dataset1.source.data_source1.caption_file={data}", *overrides], cwd=workdir)
    assert words in one_error_line(result)
