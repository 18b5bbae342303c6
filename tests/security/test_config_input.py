"""Config input that used to be silently wrong or end in a traceback: one line naming the key or file, status 2."""
from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest

from hcpdiff.config import Bound, load_config, read_fields
from hcpdiff.config.yaml_io import MAX_EXPANDED_NODES
from hcpdiff.data.builders import DatasetSpec
from hcpdiff.errors import ConfigError
from hcpdiff.lora import LoraGroupSpec
from hcpdiff.train.finetune import FinetuneGroupSpec
from hcpdiff.train.specs import RunSpec, TrainSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


def demo_args(tiny_model: Path) -> list[str]:
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}"]


# --- item 3: values that trained wrongly without a word --------------------------------------------------------

@pytest.mark.parametrize("key, value, needle", [
    ("max_grad_norm", -1.0, "must be >= 0"), ("max_grad_norm", float("inf"), "finite"),
    ("train_steps", -5, "must be >= 1"), ("train_steps", 0, "must be >= 1"), ("train_epochs", 0, "must be >= 1"),
    ("save_step", 0, "must be >= 1"), ("log_step", 0, "must be >= 1"), ("gradient_accumulation_steps", 0, ">= 1"),
    ("workers", -1, "must be >= 0"),
])
def test_train_fields_refuse_bad_values(key, value, needle):
    with pytest.raises(ConfigError) as info:
        read_fields({key: value}, "train", TrainSpec)
    assert str(info.value).startswith(f"`train.{key}`: ") and needle in str(info.value)


@pytest.mark.parametrize("key, value", [("max_grad_norm", 0), ("max_grad_norm", None), ("workers", 0),
                                        ("train_epochs", None), ("train_steps", 1)])
def test_train_fields_keep_their_documented_boundaries(key, value):
    read_fields({key: value}, "train", TrainSpec)


@pytest.mark.parametrize("fields, needle", [
    ({"lr": -1.0}, "`lora_unet[0].lr`: must be >= 0"), ({"lr": float("nan")}, "`lora_unet[0].lr`"),
    ({"lr": 1e-4, "rank": 0}, "`lora_unet[0].rank`: must be > 0"), ({"lr": 1e-4, "rank": -0.5}, "rank"),
    ({"lr": 1e-4, "alpha": float("nan")}, "`lora_unet[0].alpha`: must be finite"),
    ({"lr": 1e-4, "dropout": 1.0}, "`lora_unet[0].dropout`: must be >= 0 and < 1"),
])
def test_lora_group_fields_refuse_bad_values(fields, needle):
    with pytest.raises(ConfigError) as info:
        read_fields({"layers": ["x"], **fields}, "lora_unet[0]", LoraGroupSpec)
    assert needle in str(info.value)


def test_lora_and_full_finetuning_groups_share_one_lr_rule():
    for spec in (LoraGroupSpec, FinetuneGroupSpec):
        with pytest.raises(ConfigError, match=r"^`g.lr`: must be >= 0"):
            read_fields({"lr": -1e-4, "layers": ["x"]}, "g", spec)
        assert read_fields({"lr": 0, "layers": ["x"]}, "g", spec).lr == 0.0  # 0: a frozen group, as documented


@pytest.mark.parametrize("value", ["fp8", "fp32", "FP16"])
def test_mixed_precision_is_one_of_the_tested_modes(value):
    with pytest.raises(ConfigError, match=r"`mixed_precision`: expected one of 'no', 'fp16', 'bf16' or null"):
        read_fields({"mixed_precision": value}, "", RunSpec)
    for good in ("no", "fp16", "bf16", None):
        read_fields({"mixed_precision": good}, "", RunSpec)


def test_batch_size_must_be_positive():
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=r"`data.dataset1.batch_size`: must be >= 1"):
            read_fields({"source": {}, "bucket": {}, "batch_size": bad}, "data.dataset1", DatasetSpec)


def test_bound_is_declarative_for_any_spec():
    @dataclass
    class Spec:
        steps: Annotated[int, Bound(ge=1, note="optimizer steps")] = 1
        scale: Annotated[float | None, Bound(gt=0, finite=True)] = None

    assert read_fields({"steps": 3, "scale": None}, "x", Spec).steps == 3
    with pytest.raises(ConfigError) as info:
        read_fields({"steps": 0, "scale": float("-inf")}, "x", Spec)
    assert str(info.value) == ("`x.steps`: must be >= 1 (optimizer steps), got 0; "
                               "`x.scale`: must be > 0 and finite, got -inf.")


def test_visualizer_counts_must_be_positive():
    from hcpdiff.infer.specs import InferArgs, VisualizerSpec

    with pytest.raises(ConfigError) as info:
        read_fields({"pretrained_model": "m", "prompt": "p", "num": 0, "bs": -1}, "", VisualizerSpec)
    assert "`num`: must be >= 1" in str(info.value) and "`bs`: must be >= 1" in str(info.value)
    with pytest.raises(ConfigError, match=r"`infer_args.num_inference_steps`: must be >= 1"):
        read_fields({"num_inference_steps": 0}, "infer_args", InferArgs)


@pytest.mark.e2e
def test_every_bad_value_is_reported_together_in_one_line(cli_in_process, workdir, tiny_model, one_error_line):
    (workdir / "bad.yaml").write_text(textwrap.dedent("""\
        _base_: [cfgs/train/examples/demo_tiny.yaml]
        train:
          max_grad_norm: -1
          save_step: 0
        """))
    result = cli_in_process(["-m", "hcpdiff.train_ac_single", "--cfg", "bad.yaml",
                             f"model.pretrained_model_name_or_path={tiny_model}", "unet_lr=-1",
                             "train.train_steps=-5", "train.log_step=0", "train.gradient_accumulation_steps=0", "train.workers=-1",
                             "mixed_precision=fp8", "data.dataset1.batch_size=0", "lora_unet.0.rank=0",
                             "lora_unet.0.alpha=.nan"], cwd=workdir)
    error = one_error_line(result)
    for key in ("train.max_grad_norm", "train.save_step", "lora_unet[0].lr", "train.train_steps", "train.log_step",
                "train.gradient_accumulation_steps", "train.workers", "mixed_precision",
                "data.dataset1.batch_size", "lora_unet[0].rank", "lora_unet[0].alpha"):
        assert f"`{key}`" in error, key
    assert ".;" not in error
    assert not (workdir / "exps").exists()


# --- item 4: YAML that expands without bound ---------------------------------------------------------------------

def billion_laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        name, prev = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, needle", [
    (billion_laughs(), f"more than {MAX_EXPANDED_NODES}"),
    ("a: &a [*a]\n", "recursive"),
    ("a: &a {b: *a}\n", "recursive"),
])
def test_alias_bombs_are_one_line_naming_the_file(cli, tmp_path, text, needle, one_error_line):
    (tmp_path / "bomb.yaml").write_text(text)
    result = cli(["-m", "hcpdiff.tools.show_config", "--cfg", "bomb.yaml"], cwd=tmp_path, timeout=120)
    error = one_error_line(result)
    assert "bomb.yaml" in error and needle in error


def test_alias_bomb_in_a_base_file_and_an_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "user.yaml").write_text("_base_: [bomb.yaml]\nx: 1\n")
    with pytest.raises(ConfigError, match=r"^bomb.yaml line \d+: its aliases expand"):
        load_config("user.yaml")
    (tmp_path / "plain.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match=r"override 'x=&b \[\*b\]'.*recursive"):
        load_config("plain.yaml", ["x=&b [*b]"])


def test_ordinary_aliases_still_work(tmp_path):
    (tmp_path / "ok.yaml").write_text("common: &c {lr: 0.1, rank: 4}\ngroups: [*c, *c]\n")
    assert load_config(tmp_path / "ok.yaml").groups[1].rank == 4


def test_alias_bomb_in_a_yaml_caption_file(tmp_path):
    from hcpdiff.data.captions import load_caption_entries
    from hcpdiff.errors import DataError

    (tmp_path / "captions.yaml").write_text(billion_laughs())
    with pytest.raises(DataError, match=r"captions.yaml.*expand to more than"):
        load_caption_entries(tmp_path / "captions.yaml", tmp_path, "data.dataset1.source.s1.caption_file")
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match=r"deep.json.*too deeply"):
        load_caption_entries(tmp_path / "deep.json", tmp_path, "data.dataset1.source.s1.caption_file")


# --- item 7: messages --------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_type_error_in_a_group_is_the_only_line(cli_in_process, workdir, tiny_model, one_error_line):
    error = one_error_line(cli_in_process([*demo_args(tiny_model), "unet_lr=abc"], cwd=workdir))
    assert "`lora_unet[0].lr`: expected float, got str 'abc'" in error
    assert "no LoRA group" not in error


def test_hcp_eval_error_names_the_file_that_wrote_the_expression(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text('train:\n  lr: ${unet_lr}\n  area: ${hcp.eval:${expr}}\nunet_lr: 1e-4\nexpr: "2*3"\n')
    (tmp_path / "user.yaml").write_text('_base_: [base.yaml]\nunet_lr: ${hcp.eval:"1e-4*abc"}\n')
    with pytest.raises(ConfigError, match=r"^`unet_lr` \(in user.yaml\): hcp.eval"):
        load_config("user.yaml")
    (tmp_path / "user2.yaml").write_text('_base_: [base.yaml]\nexpr: "2*abc"\n')
    with pytest.raises(ConfigError, match=r"^`train.area` \(in base.yaml\) using `expr` \(in user2.yaml\): hcp.eval"):
        load_config("user2.yaml")


@pytest.mark.e2e
def test_shipped_configs_load_from_any_working_directory(cli_in_process, tmp_path):
    for cfg in ("cfgs/train/examples/lora_conventional.yaml", "cfgs/infer/t2i_dpmpp_vae.yaml"):
        result = cli_in_process(["-m", "hcpdiff.tools.show_config", "--cfg", str(REPO_ROOT / cfg)], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr


def test_base_paths_resolve_against_the_folder_holding_cfgs(tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(REPO_ROOT / "cfgs" / "train", project / "cfgs" / "train")
    (project / "cfgs" / "train" / "mine.yaml").write_text("_base_: [cfgs/train/examples/lora_conventional.yaml]\n"
                                                          "unet_lr: 0.001\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(project / "cfgs" / "train" / "mine.yaml")
    assert cfg.lora_unet[0].lr == 0.001
    (project / "cfgs" / "train" / "broken.yaml").write_text("_base_: [cfgs/nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"'cfgs/nope.yaml' not found \(looked in the working directory and in "):
        load_config(project / "cfgs" / "train" / "broken.yaml")
