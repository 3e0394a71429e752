"""No garbage collection while pytest renders a failure (a plugin that tests/conftest.py loads).

CPython 3.11 keeps one counter per interpreter for the depth of the AST it converts, and
``ast.parse`` sets it afresh on entry. A collection that runs during a parse can run a finalizer
that parses too (3.11's traceback printing parses the failing line to place its carets, so an
"Exception ignored in ..." from a ``__del__`` does); the inner parse leaves the counter where it
ended, and the outer one then fails with ``SystemError: AST constructor recursion depth mismatch``.
pytest parses each source file of a failure's traceback while it builds the report, and a failing
test is just what leaves objects with finalizers behind (unclosed clients, pending tasks), so a
run of failures could end in an INTERNALERROR that named none of them. CPython 3.12 fixed the
counter; on 3.11 the report is built with the collector paused, and it runs right after.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Generator
from typing import Any

import pytest

_PAUSE = sys.version_info < (3, 12)


def _paused() -> Generator[None, Any, Any]:
    if not _PAUSE or not gc.isenabled():
        return (yield)
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport() -> Generator[None, Any, Any]:
    report = yield from _paused()
    if _PAUSE and report.failed:
        # What the failure left behind is finalized now, while nothing is being parsed, rather
        # than in whatever parse the next collection happens to land in.
        gc.collect()
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report() -> Generator[None, Any, Any]:
    return (yield from _paused())


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary() -> Generator[None, Any, Any]:
    # Plugins import modules here (each parsed by pytest's assertion rewriting).
    return (yield from _paused())
