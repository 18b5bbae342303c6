"""Helpers for config tests: write YAML files under a temporary working directory."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, made the current one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HCP_RUN_TIME", raising=False)
    return tmp_path


@pytest.fixture
def write(workdir: Path) -> Callable[[str, str], Path]:
    """write(relative_path, yaml_text) -> the written file (dedented, folders created)."""
    def _write(relative_path: str, text: str) -> Path:
        path = workdir / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path
    return _write
