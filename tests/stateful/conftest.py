"""Hypothesis profiles for the stateful and property tests.

``ci`` (the default) is derandomized, so every run tries the same examples, and small enough to
run on every submission. ``thorough`` tries thousands of examples with fresh randomness; select
it with ``WQ_MEMO_HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=3000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("WQ_MEMO_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if PROFILE == "thorough":
        # Thousands of examples take minutes, longer than the suite's per-test timeout.
        for item in items:
            item.add_marker(pytest.mark.timeout(0))
