"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest

# A failure's report is built with the garbage collector paused on 3.11 (see the module).
from quiet_gc_reports import (
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)

__all__ = (
    "loop_errors",
    "pytest_make_collect_report",
    "pytest_runtest_makereport",
    "pytest_terminal_summary",
)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the test's event loop reports to its exception handler, collected in a list.

    asyncio reports "Future exception was never retrieved", "Task was destroyed but it is
    pending" and the like there; call ``gc.collect()`` before looking, as they are reported
    when the object is destroyed.
    """
    loop = asyncio.get_running_loop()
    contexts: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: contexts.append(context))
    try:
        yield contexts
    finally:
        gc.collect()
        loop.set_exception_handler(previous)
