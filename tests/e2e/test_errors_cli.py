"""Bad input: one line naming the key, file or pattern; exit status 2; no traceback.

The first and last tests start the command as a user does (a new process); the cases between run the same entry point
in-process (`cli_in_process`), which stops at the same error without paying the imports again.
"""
from __future__ import annotations

import time

import pytest

from hcpdiff.tools.make_demo_data import make_demo_data

pytestmark = pytest.mark.e2e


def assert_one_line_error(result, *needles: str) -> str:
    """The process failed with status 2 and one `error:` line that contains every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def demo_args(workdir, tiny_model):
    """demo_tiny.yaml pointed at the tiny model and a two-image dataset."""
    data = make_demo_data(workdir / "data", num=2)
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}", "train.train_steps=1"]


def test_unknown_override_key_suggests_nearest(workdir, demo_args, cli):
    result = cli([*demo_args, "train.train_epoch=3"], cwd=workdir)
    assert_one_line_error(result, "train.train_epoch", "train.train_epochs")
    assert not (workdir / "exps").exists()


def test_missing_img_root_names_key_and_path(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "data.dataset1.source.data_source1.img_root=no/such/folder"], cwd=workdir)
    assert_one_line_error(result, "data.dataset1.source.data_source1.img_root", "no/such/folder")


def test_caption_file_that_does_not_parse_names_file(workdir, demo_args, cli_in_process):
    bad = workdir / "captions.json"
    bad.write_text('{"0": "a red circle",,}')
    result = cli_in_process([*demo_args, f"data.dataset1.source.data_source1.caption_file={bad}"], cwd=workdir)
    assert_one_line_error(result, "captions.json")


def test_lora_pattern_matching_no_layer_names_pattern(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "lora_unet=[{lr: 1e-4, layers: ['re:.*\\.to_kk$']}]"], cwd=workdir)
    assert_one_line_error(result, "lora_unet", "to_kk")


def test_typo_in_lora_group_field_is_refused(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "lora_unet=[{lr: 1e-4, rnak: 8, layers: ['re:.*\\.to_k$']}]"], cwd=workdir)
    assert_one_line_error(result, "rnak", "rank")


def test_unreachable_model_id_is_one_sentence_and_quick(workdir, demo_args, cli_in_process):
    start = time.perf_counter()
    result = cli_in_process([*demo_args, "model.pretrained_model_name_or_path=someone/not-cached-model"], cwd=workdir)
    assert_one_line_error(result, "someone/not-cached-model")
    assert time.perf_counter() - start < 60  # no minutes of download retries


def test_hcp_eval_refuses_code(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "data.dataset1.bucket.target_area=${hcp.eval:\"__import__('os').getcwd()\"}"],
                            cwd=workdir)
    assert_one_line_error(result, "hcp.eval")


def test_bad_optimizer_argument_is_caught_before_loading_the_model(workdir, demo_args, cli_in_process):
    result = cli_in_process([*demo_args, "+train.optimizer.weight_decy=0.1"], cwd=workdir)
    assert_one_line_error(result, "weight_decy", "train.optimizer")


def test_debug_flag_shows_the_traceback(workdir, demo_args, cli):
    result = cli([*demo_args, "train.train_epoch=3", "--debug"], cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
