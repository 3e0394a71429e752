"""Each computation runs in a copy of the contextvars context of the caller that started it,
whether it starts at once or after waiting for a slot."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Hashable
from typing import Any

import pytest

from wq_memo import WorkerQueue, worker_queue

WAIT = 5.0
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


async def as_tenant(name: str, call: Any) -> Any:
    """Run call() in a task of its own whose context says tenant=name."""

    async def run() -> Any:
        tenant.set(name)
        return await call()

    return await asyncio.create_task(run())


@pytest.mark.parametrize("maxsize", [1, 2])
async def test_queued_computations_run_in_their_own_callers_context(maxsize: int) -> None:
    seen: dict[str, str] = {}
    gate = asyncio.Event()

    @worker_queue(maxsize=maxsize, cache={})
    async def load(key: str) -> str:
        seen[key] = tenant.get()
        await gate.wait()
        tenant.set("changed by the computation")
        return key

    names = ["A", "B", "C", "D"]
    tasks = [asyncio.create_task(as_tenant(n, lambda n=n: load(n.lower()))) for n in names]
    async with asyncio.timeout(WAIT):
        while len(seen) < maxsize:  # noqa: ASYNC110
            await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*tasks) == ["a", "b", "c", "d"]
    assert seen == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert tenant.get() == "none"


async def test_equal_concurrent_calls_share_the_first_callers_context() -> None:
    seen: list[str] = []
    gate = asyncio.Event()

    @worker_queue(cache=None)
    async def load(key: str) -> str:
        seen.append(tenant.get())
        await gate.wait()
        return tenant.get()

    first = asyncio.create_task(as_tenant("A", lambda: load("k")))
    async with asyncio.timeout(WAIT):
        while not seen:  # noqa: ASYNC110
            await asyncio.sleep(0)
    second = asyncio.create_task(as_tenant("B", lambda: load("k")))
    await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(WAIT):
        assert list(await asyncio.gather(first, second)) == ["A", "A"]
    assert seen == ["A"]


async def test_a_computation_cannot_change_its_callers_context() -> None:
    @worker_queue(cache={})
    async def load(key: str) -> str:
        tenant.set("leaked")
        return key

    tenant.set("mine")
    assert await load("x") == "x"
    assert tenant.get() == "mine"


async def test_worker_queue_runs_each_item_in_its_requirers_context() -> None:
    seen: dict[int, str] = {}
    gate = asyncio.Event()

    async def worker(item: int) -> str:
        seen[item] = tenant.get()
        await gate.wait()
        return str(item)

    store: dict[Hashable, str] = {}

    async def cache_get(item: int) -> str | None:
        return store.get(item)

    async def cache_set(item: int, value: str) -> None:
        store[item] = value

    queue: WorkerQueue[int, str] = WorkerQueue(worker, cache_get, cache_set, maxsize=1)
    tasks = [
        asyncio.create_task(as_tenant(name, lambda i=i: queue.require(i)))
        for i, name in enumerate(["A", "B", "C"])
    ]
    async with asyncio.timeout(WAIT):
        while not seen:  # noqa: ASYNC110
            await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*tasks) == ["0", "1", "2"]
    assert seen == {0: "A", 1: "B", 2: "C"}
