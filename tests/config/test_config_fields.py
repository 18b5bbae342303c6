"""`read_fields`: a mapping read into a dataclass by name; typos, missing keys and wrong types refused."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from hcpdiff.config import ConfigError, read_fields


@dataclass
class GroupSpec:
    lr: float
    layers: list[str]
    rank: int | float = 4
    alpha: float | None = None
    dropout: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)


def test_reads_dictconfig_into_plain_values():
    node = OmegaConf.create({"x": 8, "g": {"lr": 1, "layers": ["re:.*attn.*"], "rank": "${x}", "alpha": 4}})
    spec = read_fields(node.g, "lora_unet.0", GroupSpec)
    assert spec == GroupSpec(lr=1.0, layers=["re:.*attn.*"], rank=8, alpha=4.0)
    assert type(spec.lr) is float and type(spec.layers) is list and type(spec.rank) is int


def test_typo_is_refused_naming_nearest_field():
    with pytest.raises(ConfigError) as info:
        read_fields({"lr": 1e-4, "layers": [""], "rnak": 8}, "lora_unet.0", GroupSpec)
    assert str(info.value) == ("`lora_unet.0.rnak`: unknown key (did you mean 'rank'?); "
                               "known keys: lr, layers, rank, alpha, dropout, tags.")


def test_missing_required_and_bad_types_reported_together():
    with pytest.raises(ConfigError) as info:
        read_fields({"layers": "attn", "rank": True, "dropout": "0.1"}, "lora_text_encoder.1", GroupSpec)
    problems = str(info.value).rstrip(".").split("; ")
    assert "`lora_text_encoder.1.lr`: required key is missing" in problems
    assert "`lora_text_encoder.1.layers`: expected list[str], got str 'attn'" in problems
    assert "`lora_text_encoder.1.rank`: expected int | float, got bool True" in problems
    assert "`lora_text_encoder.1.dropout`: expected float, got str '0.1'" in problems


def test_float_accepted_for_int_or_float_and_none_for_optional():
    spec = read_fields({"lr": 2e-4, "layers": [], "rank": 0.25, "alpha": None}, "g", GroupSpec)
    assert spec.rank == 0.25 and spec.alpha is None


def test_non_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"`g`: expected a mapping with keys lr, layers"):
        read_fields([1, 2], "g", GroupSpec)
