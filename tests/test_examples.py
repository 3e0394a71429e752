"""The examples run, and so do their tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=50
    )


def test_the_web_service_example_runs_and_prints_its_metrics() -> None:
    done = _run("examples/web_service.py")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "apple: 630 cents" in lines
    assert "wq_memo.calls {'function': 'price', 'outcome': 'miss'} 6" in lines
    assert "wq_memo.calls {'function': 'price', 'outcome': 'joined'} 195" in lines
    assert "wq_memo.calls {'function': 'price', 'outcome': 'hit'} 5" in lines
    failures = "wq_memo.computation.failures {'function': 'price', 'error.type': 'ValueError'} 1"
    assert failures in lines


def test_the_examples_own_tests_pass() -> None:
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/test_web_service.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_prometheus_example_counts_every_call() -> None:
    pytest.importorskip("prometheus_client")
    done = _run("examples/prometheus_listener.py")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert 'wq_memo_calls_total{function="square",outcome="miss"} 3.0' in lines
    assert 'wq_memo_calls_total{function="square",outcome="joined"} 7.0' in lines
    assert 'wq_memo_calls_total{function="square",outcome="hit"} 1.0' in lines
    assert 'wq_memo_computation_seconds_count{error="",function="square"} 3.0' in lines
