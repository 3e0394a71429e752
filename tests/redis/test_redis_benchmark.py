"""The Redis benchmark still runs and prints its table (quick mode)."""

from __future__ import annotations

import importlib.util
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

pytest_plugins = ("redis_fixtures",)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "redis_backends.py"


def _known_run_id(module: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make module's run id known, so that only this run's keys are looked for afterwards
    (other runs of the benchmark may share the server meanwhile)."""
    fixed = uuid.uuid4()
    monkeypatch.setattr(module, "uuid", types.SimpleNamespace(uuid4=lambda: fixed))
    return fixed.hex[:10]


async def test_quick_benchmark_prints_a_row_per_contender(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, sync_redis: Any
) -> None:
    monkeypatch.setenv("WQ_MEMO_REDIS_URL", redis_url)
    spec = importlib.util.spec_from_file_location("wq_memo_redis_benchmark", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    run_id = _known_run_id(module, monkeypatch)
    table = await module.measure(quick=True)
    rows = table.splitlines()
    assert rows[2].startswith("wq_memo RedisCache ")
    assert rows[2].split()[3] == "1.00"  # the baseline's hit ratio
    assert len(rows) == 2 + 6
    assert not list(sync_redis.scan_iter(match=f"wq_memo_bench:{run_id}*", count=1000))
    assert not list(sync_redis.scan_iter(match=f"wq_memo_bench::{run_id}*", count=1000))


async def test_processes_benchmark_computes_each_key_once_and_cleans_up(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, sync_redis: Any
) -> None:
    from benchmarks import redis_processes
    from benchmarks._harness import Config

    monkeypatch.setenv("WQ_MEMO_REDIS_URL", redis_url)
    run_id = _known_run_id(redis_processes, monkeypatch)
    table = await redis_processes.measure(Config.quick_run().scaled(callers=20, keys=60))
    assert [row[0] for row in table.rows] == list(redis_processes.CONTENDERS)
    wq = table.data["medians"]["wq_memo RedisCache"]
    assert (wq["computations"], wq["failed"]) == (60, 0)
    assert table.targets[0].met
    assert not list(sync_redis.scan_iter(match=f"wq_memo_bench_procs_{run_id}*", count=1000))
