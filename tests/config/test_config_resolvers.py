"""`hcp.eval` (arithmetic only), `hcp.time` (one timestamp per run) and v1's `hcp.from_memory` (refused)."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from hcpdiff.config import ConfigError, RunClock, load_config, register_resolvers
from hcpdiff.config.arith import eval_arithmetic


@pytest.mark.parametrize("expression, expected", [
    ("512*768", 393216),
    ("1/2", 0.5),
    ("7//2", 3),
    ("7 % 4", 3),
    ("-(2+3)*+2", -10),
    ("2**10", 1024),
    ("1e-4*2", 2e-4),
    ("max(1, 2, 3) + min(4, 5)", 7),
    ("round(2.6) + abs(-1) + floor(1.5) + ceil(1.2)", 7),
    ("sqrt(16)", 4.0),
    ("int(512*1.5)", 768),
    ("round(pi, 2)", 3.14),
    ("log(exp(2))", 2.0),
])
def test_eval_arithmetic(expression, expected):
    result = eval_arithmetic(expression)
    assert result == pytest.approx(expected)
    assert type(result) is type(expected)


@pytest.mark.parametrize("expression", [
    "__import__('os').system('x')",
    '__import__("os")',
    "a",
    '"x"*3',
    "(1).real",
    "lambda: 1",
    "[1, 2]",
    "max(key=abs)",
    "True + 1",
    "1 if 1 else 2",
    "1 < 2",
])
def test_eval_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ConfigError) as info:
        eval_arithmetic(expression)
    assert str(info.value).startswith(f"hcp.eval: only arithmetic is allowed, got '{expression}'")


@pytest.mark.parametrize("expression", ["2**10**10", "(9**999)**999", "10**-20000"])
def test_eval_refuses_huge_powers(expression):
    with pytest.raises(ConfigError, match="too large"):
        eval_arithmetic(expression)


@pytest.mark.parametrize("expression", ["1/0", "sqrt(-1)", "(-8)**0.5", "1e308*10**400"])
def test_eval_math_errors_are_config_errors(expression):
    with pytest.raises(ConfigError, match=re.escape(expression)):
        eval_arithmetic(expression)


def test_eval_in_config_keeps_ints_and_names_key(write):
    write("top.yaml", """
        width: 512
        area: ${hcp.eval:"512*768"}
        ratio: ${hcp.eval:"${width}/1024"}
        bad: ${hcp.eval:"__import__('os').system('x')"}
    """)
    with pytest.raises(ConfigError) as info:
        load_config("top.yaml")
    assert str(info.value).startswith("`bad` (in top.yaml): hcp.eval: only arithmetic is allowed, got '__import__(")
    cfg = load_config("top.yaml", ["~bad"])
    assert cfg.area == 393216 and type(cfg.area) is int
    assert cfg.ratio == 0.5


def test_time_is_one_stamp_for_every_key(write):
    write("top.yaml", """
        exp_dir: exps/${hcp.time:}
        log_dir: ${exp_dir}/logs
        again: ${hcp.time:}
        day: ${hcp.time:"%Y%m%d"}
    """)
    cfg = load_config("top.yaml")
    stamp = cfg.again
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", stamp)
    assert cfg.exp_dir == f"exps/{stamp}" and cfg.log_dir == f"exps/{stamp}/logs"
    assert cfg.day == stamp[:10].replace("-", "")
    # a second load in the same process names the same run
    assert load_config("top.yaml").again == stamp


def test_time_uses_given_clock(write):
    write("top.yaml", "a: ${hcp.time:}\nb: ${hcp.time:\"%H%M\"}\n")
    cfg = load_config("top.yaml", clock=RunClock("2024-05-06-07-08-09"))
    assert (cfg.a, cfg.b) == ("2024-05-06-07-08-09", "0708")


def test_time_from_environment_verbatim(write, monkeypatch):
    write("top.yaml", "a: ${hcp.time:}\nb: ${hcp.time:\"%Y\"}\n")
    monkeypatch.setenv("HCP_RUN_TIME", "2023-01-02-03-04-05")
    cfg = load_config("top.yaml")
    assert (cfg.a, cfg.b) == ("2023-01-02-03-04-05", "2023")
    monkeypatch.setenv("HCP_RUN_TIME", "launch-7")
    assert load_config("top.yaml", ["~b"]).a == "launch-7"
    with pytest.raises(ConfigError, match=r"`b` .*'launch-7'.*HCP_RUN_TIME"):
        load_config("top.yaml")


def test_register_resolvers_is_idempotent_and_works_outside_load_config():
    register_resolvers()
    register_resolvers()
    cfg = OmegaConf.create({"a": "${hcp.time:}", "b": "${hcp.time:}", "c": '${hcp.eval:"2**8"}'})
    assert cfg.a == cfg.b and cfg.c == 256


def test_v1_from_memory_is_refused_naming_the_visualizer(write):
    """HCP-Diffusion v1's workflow configs read objects with `${hcp.from_memory:name}`: one line saying what renders."""
    write("v1.yaml", """
        model: ${hcp.from_memory:pipe}
    """)
    with pytest.raises(ConfigError) as info:
        load_config("v1.yaml")
    message = str(info.value)
    assert message.startswith("`model` (in v1.yaml): hcp.from_memory:pipe: HCP-Diffusion v1's workflow memory")
    assert "hcpdiff.visualizer" in message and "\n" not in message
