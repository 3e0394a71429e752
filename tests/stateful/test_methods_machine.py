"""Model-based test of a memoized method called on two instances that compare equal and hash
alike (as ORM rows with the same primary key would), with a TTLCache on a fake clock.

The model's keys name an instance and an argument: "a" is ``rows[0].load("x")``, "b" is
``rows[1].load("x")``, "c" and "d" the same with "y". A computation is the model's computation of
the key its own instance and argument make, so the decorator machine's invariants (each caller
gets the outcome of a computation of its key; one computation per key and generation) become
instance isolation: no instance ever gets a value computed for the other.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from wq_memo import MISSING, BoundMemoized, CacheInfo, Memoized, WorkerQueue, worker_queue

from ._machinery import FINISH_TIMEOUT, KEYS, Value
from .test_decorator_machine import BYPASSING, DecoratorMachine, Driven

CALLS: dict[str, tuple[int, str]] = {"a": (0, "x"), "b": (1, "x"), "c": (0, "y"), "d": (1, "y")}
"""Each model key's instance and argument."""
KEY_OF = {call: key for key, call in CALLS.items()}
assert set(CALLS) == set(KEYS)


class Row:
    """Every Row equals every other and hashes alike."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row)

    def __hash__(self) -> int:
        return 0


class EqualRows:
    """f(key) and its controls, as the decorator machine drives them, on two equal rows."""

    def __init__(self, rows: tuple[Any, Any], method: Memoized[Any, Value | None]) -> None:
        self.rows = rows
        self.method = method

    @property
    def queue(self) -> WorkerQueue[Any, Any]:
        return self.method.queue

    def bound(self, key: str) -> tuple[BoundMemoized[[str], Value | None], str]:
        """The method bound to key's row, and key's argument."""
        index, arg = CALLS[key]
        load: BoundMemoized[[str], Value | None] = self.rows[index].load
        return load, arg

    def __call__(self, key: str, /) -> Coroutine[Any, Any, Value | None]:
        load, arg = self.bound(key)
        return load(arg)

    def cache_info(self) -> CacheInfo:
        return self.method.cache_info()

    def cache_clear(self) -> None:
        self.rows[0].load.cache_clear()  # bound to one row, it clears every row's entries

    async def acache_clear(self) -> None:
        await self.method.acache_clear()

    def cache_invalidate(self, key: str, /) -> bool:
        load, arg = self.bound(key)
        return load.cache_invalidate(arg)

    async def acache_invalidate(self, key: str, /) -> bool:
        load, arg = self.bound(key)
        return await load.acache_invalidate(arg)

    def peek(self, key: str) -> Any:
        load, arg = self.bound(key)
        return load.cache_peek(arg)


class MethodMachine(DecoratorMachine):
    """Drives rows[i].load(arg) for two equal rows, memoized by @worker_queue."""

    def memoize(self) -> Driven:
        machine = self

        class MemoRow(Row):
            @worker_queue(
                maxsize=self.maxsize, cache=self.cache, finish_timeout=FINISH_TIMEOUT, name="f"
            )
            async def load(self, arg: str) -> Value | None:
                if BYPASSING.get():
                    return machine.computed_directly(KEY_OF[self.index, arg])
                return await machine.work(KEY_OF[self.index, arg])

        self.rows = EqualRows((MemoRow(0), MemoRow(1)), MemoRow.load)
        return self.rows

    def flight_key(self, key: str) -> None:
        return None  # keyed by the instance: its first callers are not followed

    def memoized(self) -> Any:
        return self.rows.method

    def real_cache(self) -> dict[str, Any]:
        found = {}
        for key in KEYS:
            value = self.rows.peek(key)
            if value is not MISSING:
                found[key] = value
        return found


def test_method_machine() -> None:
    run_state_machine_as_test(
        MethodMachine, settings=settings(max_examples=150, stateful_step_count=30)
    )
