"""The interop tests' fixture: each family x adapter type, its LoRA files and hcpdiff's merge (interop_helpers)."""
from __future__ import annotations

from pathlib import Path

import pytest

from interop_helpers import KINDS, Case, build_case


@pytest.fixture(scope="module", params=[(f, k) for f in ("sd", "sdxl") for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory, tiny_model: Path, tiny_sdxl: Path) -> Case:
    """Each family x adapter type, built once per test module."""
    family, kind = request.param
    folder = tmp_path_factory.mktemp(f"interop-{family}-{kind}")
    return build_case(family, kind, tiny_sdxl if family == "sdxl" else tiny_model, folder)
