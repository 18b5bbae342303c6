"""Shared pieces of the security tests: the demo training command on the tiny model, and its one error line."""
from __future__ import annotations

import pytest

from hcpdiff.tools.make_demo_data import make_demo_data


@pytest.fixture
def demo_args(workdir, tiny_model):
    """demo_tiny.yaml on the tiny model and three images."""
    data = make_demo_data(workdir / "data", num=3)
    return ["-m", "hcpdiff.train_ac_single", "--cfg", "cfgs/train/examples/demo_tiny.yaml",
            f"model.pretrained_model_name_or_path={tiny_model}",
            f"data.dataset1.source.data_source1.img_root={data}",
            f"data.dataset1.source.data_source1.caption_file={data}",
            'data.dataset1.bucket.target_area=${hcp.eval:"64*64"}']


@pytest.fixture
def error_line():
    """stderr -> its only `error:` line, checked to come without a traceback."""
    def only_error_line(stderr: str) -> str:
        assert "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr[-3000:]
        return errors[0]
    return only_error_line
