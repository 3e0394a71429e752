"""A run of failing tests is reported test by test, on every Python (see quiet_gc_reports.py).

The inner suite fails tests that leave behind, as a failing test often does, objects whose
finalizers parse Python source, and makes the collector run often, so that on CPython 3.11 a
collection lands inside pytest's own parsing of the failure's source files.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent

FAILING = textwrap.dedent("""
    import ast
    import gc

    import pytest


    class Unclosed:
        # A finalizer that parses, as 3.11 does when it prints an ignored exception's traceback.
        def __del__(self):
            ast.parse("answer = (6 * 7) if True else None")


    def leave_garbage():
        gc.set_threshold(20)  # collections land anywhere, pytest's parsing included
        for _ in range(200):
            o = Unclosed()
            o.me = o


    @pytest.mark.parametrize("n", range(8))
    def test_fails_and_leaves_garbage(n):
        leave_garbage()
        assert n == -1, "deliberately failing"
""")


def _run(pytester: pytest.Pytester, *plugins: str) -> pytest.RunResult:
    pytester.makepyfile(test_failing=FAILING)
    args = [a for p in plugins for a in ("-p", p)]
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-rf", *args, timeout=60)


def test_failures_are_reported_by_name(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    result = _run(pytester, "quiet_gc_reports")
    result.assert_outcomes(failed=8)
    assert "INTERNALERROR" not in result.stdout.str()
    for n in range(8):
        result.stdout.fnmatch_lines(
            [f"FAILED test_failing.py::test_fails_and_leaves_garbage[[]{n}[]]*"]
        )


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython 3.12 fixed the AST counter")
def test_without_the_pause_3_11_loses_the_report(pytester: pytest.Pytester) -> None:
    """The same suite without the plugin: what the plugin prevents still happens on 3.11."""
    result = _run(pytester)
    assert "AST constructor recursion depth mismatch" in result.stdout.str()
