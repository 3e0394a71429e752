"""Hypothesis profiles for the stateful and property tests.

``ci`` (the default) is derandomized, so every run tries the same examples, and small enough to
run on every submission. ``thorough`` tries thousands of examples with fresh randomness; select
it with ``WQ_MEMO_HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    print_blob=False,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=3000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
HERE = Path(__file__).parent
PROFILE = os.environ.get("WQ_MEMO_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A passing run takes seconds; a failing one also shrinks its example, which takes longer
    # than the suite's per-test timeout. Thousands of examples take many minutes.
    timeout = 3600 if PROFILE == "thorough" else 600
    for item in items:
        if item.path.parent == HERE:
            item.add_marker(pytest.mark.timeout(timeout))
