"""The README's Metrics snippet runs, and prints what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from wq_memo import _listeners

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- metrics-snippet"


def snippet() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(MARKER)
    block = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, "no python block after the metrics-snippet marker"
    return block.group(1)


def test_the_metrics_snippet_runs() -> None:
    before = _listeners.listeners
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(snippet(), str(README), "exec"), {"__name__": "readme_metrics"})
    finally:
        for listener in _listeners.listeners:
            if listener not in before:
                _listeners.remove_listener(listener)
    lines = out.getvalue().splitlines()
    assert "wq_memo.calls {'function': 'square', 'outcome': 'miss'} 3" in lines
    assert "wq_memo.calls {'function': 'square', 'outcome': 'joined'} 7" in lines
    assert "wq_memo.calls {'function': 'square', 'outcome': 'hit'} 1" in lines


@pytest.mark.parametrize("extra", ["otel"])
def test_the_extra_the_readme_names_exists(extra: str) -> None:
    pyproject = (README.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE)
