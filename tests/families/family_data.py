"""The dataset a family's shipped training config trains on in the tests that run every registered family (the contract,
resume): hcpdiff.tools.make_demo_data.family_dataset (shared with tools/bench_train_step.py). Test helper, imported as
`from family_data import ...` (a plain module, not conftest)."""
from __future__ import annotations

from hcpdiff.tools.make_demo_data import family_dataset

__all__ = ["family_dataset"]
