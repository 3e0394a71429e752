"""The README's Metrics snippet runs, and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- metrics-snippet"


def snippet() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(MARKER)
    block = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, "no python block after the metrics-snippet marker"
    return block.group(1)


def test_the_metrics_snippet_runs(tmp_path: Path) -> None:
    # A fresh interpreter, as for a reader who pastes it: counts by name start from zero.
    script = tmp_path / "metrics_snippet.py"
    script.write_text(snippet(), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "wq_memo.calls {'function': 'square', 'outcome': 'miss'} 3" in lines
    assert "wq_memo.calls {'function': 'square', 'outcome': 'joined'} 7" in lines
    assert "wq_memo.calls {'function': 'square', 'outcome': 'hit'} 1" in lines


@pytest.mark.parametrize("extra", ["otel"])
def test_the_extra_the_readme_names_exists(extra: str) -> None:
    pyproject = (README.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE)
