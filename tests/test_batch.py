"""worker_queue.batch: many keys in one call of the batch function, single flight and caching per
key, at most maxsize batches at once (issue 19, points 1 to 6 and 9).

Every value names the call of the batch function that made it ("k#n": key k, call n), so that
an outcome tells which computation it came from.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import cachetools
import pytest

from wq_memo import MISSING, BatchInfo, ShutdownTimeout, disabled, worker_queue
from wq_memo._batch import check as check_batches

WAIT = 5.0

Answer = Callable[[list[int], int], Any]


class GatedBatch:
    """A batch function whose n-th call waits for gate n, then answers {k: "k#n"} (or what the
    answer set for call n returns)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.answers: dict[int, Answer] = {}
        self.cancelled: list[int] = []

    async def __call__(self, keys: list[int]) -> Any:
        n = len(self.calls)
        self.calls.append(list(keys))
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(n)
            raise
        answer = self.answers.get(n)
        if answer is not None:
            return answer(keys, n)
        return {k: f"{k}#{n}" for k in keys}

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < count:  # noqa: ASYNC110 - every step yields to the callers
                await asyncio.sleep(0)

    def release(self, n: int, answer: Answer | None = None) -> None:
        if answer is not None:
            self.answers[n] = answer
        self.gates[n].set()


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


async def settle() -> None:
    """Let every task ready to run take its steps (a few turns of the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


def batched(g: GatedBatch, **options: Any) -> Any:
    return worker_queue.batch(**options)(g)


# -- 1. coalescing ---------------------------------------------------------------------------------


async def test_keys_asked_for_in_one_turn_go_in_one_batch_each_once() -> None:
    g = GatedBatch()
    load = batched(g, maxsize=4)
    callers = [asyncio.create_task(load(i % 10)) for i in range(100)]
    await g.wait_calls(1)
    await settle()
    assert len(g.calls) == 1
    assert sorted(g.calls[0]) == list(range(10))
    g.release(0)
    assert await bounded(asyncio.gather(*callers)) == [f"{i % 10}#0" for i in range(100)]
    info = load.cache_info()
    assert isinstance(info, BatchInfo)
    assert (info.misses, info.joined, info.hits, info.batches) == (10, 90, 0, 1)


async def test_keys_asked_for_in_a_later_turn_go_in_a_later_batch_without_max_wait() -> None:
    g = GatedBatch()
    load = batched(g)
    first = asyncio.create_task(load(1))
    await g.wait_calls(1)
    second = asyncio.create_task(load(2))
    await g.wait_calls(2)
    assert g.calls == [[1], [2]]
    g.release(0)
    g.release(1)
    assert await bounded(asyncio.gather(first, second)) == ["1#0", "2#1"]


async def test_a_batch_never_holds_more_than_max_batch_keys() -> None:
    g = GatedBatch()
    load = batched(g, maxsize=10, max_batch=10)
    callers = [asyncio.create_task(load(i)) for i in range(25)]
    await g.wait_calls(3)
    await settle()
    assert [len(keys) for keys in g.calls] == [10, 10, 5]
    assert sorted(k for keys in g.calls for k in keys) == list(range(25))
    for n in range(3):
        g.release(n)
    results = await bounded(asyncio.gather(*callers))
    assert {r.split("#")[1] for r in results} == {"0", "1", "2"}
    assert load.cache_info().batches == 3


async def test_max_wait_gathers_keys_from_later_turns_into_one_batch() -> None:
    g = GatedBatch()
    load = batched(g, max_wait=0.2)
    first = asyncio.create_task(load(1))
    await settle()
    second = asyncio.create_task(load(2))
    await g.wait_calls(1)
    await settle()
    assert g.calls == [[1, 2]]
    g.release(0)
    assert await bounded(asyncio.gather(first, second)) == ["1#0", "2#0"]


async def test_a_batch_with_max_batch_keys_leaves_without_waiting_for_max_wait() -> None:
    g = GatedBatch()
    load = batched(g, max_wait=3600.0, max_batch=3)
    callers = [asyncio.create_task(load(1))]
    await settle()
    callers += [asyncio.create_task(load(2)), asyncio.create_task(load(3))]
    await g.wait_calls(1)  # within WAIT, not an hour
    assert g.calls == [[1, 2, 3]]
    fourth = asyncio.create_task(load(4))  # a new batch, which waits for its max_wait
    await settle()
    assert len(g.calls) == 1
    g.release(0)
    assert await bounded(asyncio.gather(*callers)) == ["1#0", "2#0", "3#0"]
    fourth.cancel()
    await asyncio.gather(fourth, return_exceptions=True)
    await bounded(load.queue.aclose())


# -- 2. single flight and caching per key ----------------------------------------------------------


async def test_a_cached_key_is_answered_at_once_and_never_sent() -> None:
    g = GatedBatch()
    load = batched(g)
    load.cache_prime("primed", 1)
    many = asyncio.create_task(load.many([1, 2]))
    await g.wait_calls(1)
    assert g.calls == [[2]]
    assert await load(1) == "primed"  # while the batch runs
    g.release(0)
    assert await bounded(many) == ["primed", "2#0"]
    info = load.cache_info()
    assert (info.hits, info.misses) == (2, 1)


async def test_a_key_under_way_is_joined_never_sent_again() -> None:
    g = GatedBatch()
    load = batched(g)
    first = asyncio.create_task(load.many([1, 2]))
    await g.wait_calls(1)
    again = asyncio.create_task(load.many([1, 3]))
    await g.wait_calls(2)
    assert g.calls == [[1, 2], [3]]
    g.release(1)
    g.release(0)
    assert await bounded(first) == ["1#0", "2#0"]
    assert await bounded(again) == ["1#0", "3#1"]
    assert load.cache_info().joined == 1


async def test_each_result_is_stored_under_its_own_key() -> None:
    g = GatedBatch()
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(10)
    load = batched(g, cache=cache)
    many = asyncio.create_task(load.many([1, 2, 3]))
    await g.wait_calls(1)
    g.release(0)
    await bounded(many)
    assert dict(cache) == {1: "1#0", 2: "2#0", 3: "3#0"}
    assert await load.many([3, 2, 1]) == ["3#0", "2#0", "1#0"]
    assert len(g.calls) == 1


async def test_many_keeps_the_order_and_the_duplicates() -> None:
    g = GatedBatch()
    load = batched(g)
    load.cache_prime("one", 1)
    many = asyncio.create_task(load.many([3, 1, 3, 9]))
    await g.wait_calls(1)
    assert g.calls == [[3, 9]]
    g.release(0)
    assert await bounded(many) == ["3#0", "one", "3#0", "9#0"]
    assert await load.many([]) == []


async def test_key_maps_keys_to_cache_keys() -> None:
    calls: list[list[str]] = []

    @worker_queue.batch(key=str.lower)
    async def load(names: list[str]) -> dict[str, str]:
        calls.append(names)
        return {n: n.upper() for n in names}

    assert await bounded(load.many(["a", "A", "b"])) == ["A", "A", "B"]
    assert calls == [["a", "b"]]
    assert load.cache_peek("A") == "A"
    assert isinstance(load.cache, MutableMapping)
    assert dict(load.cache) == {"a": "A", "b": "B"}


async def test_without_a_cache_keys_are_batched_and_deduplicated_only() -> None:
    g = GatedBatch()
    load = batched(g, cache=None)
    callers = [asyncio.create_task(load(i % 2)) for i in range(4)]
    await g.wait_calls(1)
    g.release(0)
    assert await bounded(asyncio.gather(*callers)) == ["0#0", "1#0", "0#0", "1#0"]
    assert load.cache_peek(0) is MISSING
    again = asyncio.create_task(load(0))
    await g.wait_calls(2)
    g.release(1)
    assert await bounded(again) == "0#1"
    assert load.cache_info().currsize == 0


# -- 3. results ------------------------------------------------------------------------------------


async def test_a_sequence_aligned_with_the_keys_is_split_among_them() -> None:
    g = GatedBatch()
    load = batched(g)
    many = asyncio.create_task(load.many([5, 6]))
    await g.wait_calls(1)
    g.release(0, lambda keys, n: [f"{k}:{n}" for k in keys])
    assert await bounded(many) == ["5:0", "6:0"]
    assert load.cache_peek(6) == "6:0"


async def test_a_sequence_of_the_wrong_length_fails_every_caller_naming_the_function() -> None:
    g = GatedBatch()
    load = batched(g)
    callers = [asyncio.create_task(load(k)) for k in (1, 2)]
    await g.wait_calls(1)
    g.release(0, lambda keys, n: ["only one"])
    outcomes = await bounded(asyncio.gather(*callers, return_exceptions=True))
    for outcome in outcomes:
        assert isinstance(outcome, ValueError)
        assert "GatedBatch" in str(outcome)
        assert "1 values for 2 keys" in str(outcome)
    assert len(load.cache) == 0


async def test_an_answer_that_is_neither_a_mapping_nor_a_sequence_fails_every_caller() -> None:
    g = GatedBatch()
    load = batched(g)
    caller = asyncio.create_task(load(1))
    await g.wait_calls(1)
    g.release(0, lambda keys, n: "1")  # a str is no sequence of values
    with pytest.raises(TypeError, match="mapping from key to value"):
        await bounded(caller)


async def test_a_key_missing_from_the_mapping_raises_key_error_to_its_callers_only() -> None:
    g = GatedBatch()
    load = batched(g)
    callers = [asyncio.create_task(load(k)) for k in (1, 2, 1)]
    await g.wait_calls(1)
    g.release(0, lambda keys, n: {2: "two"})
    one, two, one_again = await bounded(asyncio.gather(*callers, return_exceptions=True))
    assert isinstance(one, KeyError)
    assert one is one_again
    assert "no value for key 1" in str(one)
    assert two == "two"
    assert load.cache_peek(1) is MISSING  # not cached: a later call loads it again
    later = asyncio.create_task(load(1))
    await g.wait_calls(2)
    assert g.calls[1] == [1]
    g.release(1)
    assert await bounded(later) == "1#1"


async def test_an_exception_as_a_value_is_raised_to_that_key_only_and_not_cached() -> None:
    g = GatedBatch()
    load = batched(g)
    failure = LookupError("no such user")
    callers = [asyncio.create_task(load(k)) for k in (1, 2)]
    await g.wait_calls(1)
    g.release(0, lambda keys, n: {1: failure, 2: "two"})
    one, two = await bounded(asyncio.gather(*callers, return_exceptions=True))
    assert one is failure
    assert two == "two"
    assert load.cache_peek(1) is MISSING
    assert load.cache_peek(2) == "two"


async def test_a_failing_batch_fails_every_caller_with_its_exception_and_caches_nothing() -> None:
    g = GatedBatch()
    load = batched(g)
    failure = RuntimeError("database down")

    def fail(keys: list[int], n: int) -> Any:
        raise failure

    many = asyncio.create_task(load.many([1, 2]))
    single = asyncio.create_task(load(2))
    await g.wait_calls(1)
    g.release(0, fail)
    outcomes = await bounded(asyncio.gather(many, single, return_exceptions=True))
    assert outcomes[0] is failure
    assert outcomes[1] is failure
    assert len(load.cache) == 0
    retry = asyncio.create_task(load(1))
    await g.wait_calls(2)
    g.release(1)
    assert await bounded(retry) == "1#1"


# -- 4. the bound and the order --------------------------------------------------------------------


async def test_at_most_maxsize_batches_run_and_they_start_in_order() -> None:
    g = GatedBatch()
    load = batched(g, maxsize=2)
    callers = []
    for k in range(4):
        callers.append(asyncio.create_task(load(k)))
        await settle()  # each key in a batch of its own, in this order
    await g.wait_calls(2)
    await settle()
    assert g.calls == [[0], [1]]
    g.release(1)
    await g.wait_calls(3)
    await settle()
    assert g.calls == [[0], [1], [2]]
    g.release(0)
    await g.wait_calls(4)
    assert g.calls == [[0], [1], [2], [3]]
    g.release(2)
    g.release(3)
    assert await bounded(asyncio.gather(*callers)) == ["0#0", "1#1", "2#2", "3#3"]
    check_batches(load)


async def test_a_key_whose_callers_all_left_before_its_batch_started_is_left_out() -> None:
    g = GatedBatch()
    load = batched(g, maxsize=1, finish_timeout=2 * WAIT)
    running = asyncio.create_task(load(0))
    await g.wait_calls(1)
    kept = asyncio.create_task(load(1))
    left = [asyncio.create_task(load(2)), asyncio.create_task(load(2))]
    await settle()  # that batch waits in line
    for caller in left:
        caller.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    g.release(0)
    await g.wait_calls(2)
    assert g.calls[1] == [1]
    g.release(1)
    assert await bounded(kept) == "1#1"
    assert load.cache_peek(2) is MISSING
    later = asyncio.create_task(load(2))  # starts afresh
    await g.wait_calls(3)
    assert g.calls[2] == [2]
    g.release(2)
    assert await bounded(later) == "2#2"
    assert await bounded(running) == "0#0"
    await bounded(load.queue.aclose())  # no item is left: it drains at once


async def test_a_batch_whose_keys_all_left_is_not_sent_at_all() -> None:
    g = GatedBatch()
    load = batched(g, maxsize=1)
    running = asyncio.create_task(load(0))
    await g.wait_calls(1)
    left = asyncio.create_task(load(1))
    await settle()
    left.cancel()
    await asyncio.gather(left, return_exceptions=True)
    g.release(0)
    assert await bounded(running) == "0#0"
    await settle()
    assert g.calls == [[0]]
    assert load.cache_info().batches == 1


async def test_a_caller_leaving_never_cancels_a_batch_others_wait_for() -> None:
    g = GatedBatch()
    load = batched(g)
    leaving = asyncio.create_task(load.many([1, 2]))
    staying = asyncio.create_task(load(2))
    alone = asyncio.create_task(load(3))
    await g.wait_calls(1)
    leaving.cancel()
    alone.cancel()  # every caller of 3 left once its batch had started
    await asyncio.gather(leaving, alone, return_exceptions=True)
    g.release(0)
    assert await bounded(staying) == "2#0"
    assert g.cancelled == []
    await settle()
    assert load.cache_peek(3) == "3#0"  # the batch ran and stored every key
    assert load.cache_peek(1) == "1#0"


# -- 5. invalidation wins per key ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["invalidate", "ainvalidate", "clear", "aclear", "prime", "aprime"])
async def test_an_invalidation_while_a_batch_runs_wins_for_its_key_only(how: str) -> None:
    g = GatedBatch()
    load = batched(g)
    early = asyncio.create_task(load.many([1, 2]))
    await g.wait_calls(1)
    if how == "invalidate":
        assert load.cache_invalidate(1) is False
    elif how == "ainvalidate":
        assert await load.acache_invalidate(1) is False
    elif how == "clear":
        load.cache_clear()
    elif how == "aclear":
        await load.acache_clear()
    elif how == "prime":
        load.cache_prime("primed", 1)
    else:
        await load.acache_prime("primed", 1)
    late = asyncio.create_task(load(1))
    if how in ("prime", "aprime"):
        assert await bounded(late) == "primed"
    else:
        await g.wait_calls(2)  # a new batch, not a join of the old one
        assert g.calls[1] == [1]
    g.release(0)
    assert await bounded(early) == ["1#0", "2#0"]  # its callers get the old result
    await settle()
    if how in ("prime", "aprime"):
        assert load.cache_peek(1) == "primed"  # not overwritten by the old batch
    else:
        assert load.cache_peek(1) is MISSING  # never stored
        g.release(1)
        assert await bounded(late) == "1#1"
        assert load.cache_peek(1) == "1#1"
    if how in ("clear", "aclear"):
        assert load.cache_peek(2) is MISSING  # a clear forgets every key
    else:
        assert load.cache_peek(2) == "2#0"  # the other keys of that batch are unaffected


async def test_a_key_invalidated_while_gathered_is_sent_once_for_both_items() -> None:
    g = GatedBatch()
    load = batched(g, max_wait=3600.0, max_batch=2)
    early = asyncio.create_task(load(1))
    await settle()
    load.cache_invalidate(1)
    late = asyncio.create_task(load(1))
    await settle()
    assert g.calls == []  # still gathered: one key, twice
    other = asyncio.create_task(load(2))
    await g.wait_calls(1)
    assert g.calls == [[1, 2]]
    g.release(0)
    assert await bounded(asyncio.gather(early, late, other)) == ["1#0", "1#0", "2#0"]
    assert load.cache_peek(1) == "1#0"  # computed after the invalidation: stored


# -- 6. context ------------------------------------------------------------------------------------

TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


async def test_a_batch_runs_in_a_copy_of_the_context_of_the_caller_whose_key_opened_it() -> None:
    seen: list[str] = []

    @worker_queue.batch
    async def load(keys: list[int]) -> dict[int, str]:
        seen.append(TENANT.get())
        TENANT.set("inside")
        return {k: TENANT.get() for k in keys}

    async def call(tenant: str, k: int) -> str:
        TENANT.set(tenant)
        value = await load(k)
        assert TENANT.get() == tenant  # the batch's changes stay in its copy
        return value

    results = await bounded(asyncio.gather(call("first", 1), call("second", 2)))
    assert seen == ["first"]
    assert results == ["inside", "inside"]
    assert TENANT.get() == "none"


# -- controls --------------------------------------------------------------------------------------


async def test_the_controls_per_key() -> None:
    g = GatedBatch()
    load = batched(g, cache=cachetools.LRUCache(10))
    assert load.cache_peek(1) is MISSING
    assert await load.acache_peek(1) is MISSING
    load.cache_prime("one", 1)
    await load.acache_prime("two", 2)
    assert load.cache_peek(1) == "one"
    assert await load.acache_peek(2) == "two"
    assert load.cache_invalidate(1) is True
    assert await load.acache_invalidate(2) is True
    assert load.cache_invalidate(2) is False
    refreshing = asyncio.create_task(load.refresh(3))
    await g.wait_calls(1)
    g.release(0)
    assert await bounded(refreshing) == "3#0"
    refreshing = asyncio.create_task(load.refresh(3))  # computed anew, cached or not
    await g.wait_calls(2)
    g.release(1)
    assert await bounded(refreshing) == "3#1"
    assert await load(3) == "3#1"
    assert load.cache_info() == BatchInfo(1, 2, 0, 10, 1, batches=2)
    load.cache_clear()
    assert load.cache_info() == BatchInfo(0, 0, 0, 10, 0)
    await load.acache_clear()
    assert load.queue is load.queue
    assert load.__name__ == "GatedBatch" or load.__wrapped__ is g


async def test_disabled_calls_the_batch_function_directly_and_caches_nothing() -> None:
    calls: list[list[int]] = []

    @worker_queue.batch
    async def load(keys: list[int]) -> Mapping[int, str]:
        calls.append(keys)
        return {k: str(k) for k in keys}

    with disabled():
        assert await load(1) == "1"
        assert await load.many([2, 2, 3]) == ["2", "2", "3"]
    assert calls == [[1], [2, 3]]
    assert load.cache_peek(1) is MISSING
    assert load.cache_info().bypassed == 4


async def test_a_shutdown_that_aborts_cancels_the_batch_nobody_waits_for_any_more() -> None:
    g = GatedBatch()
    load = batched(g, finish_timeout=0.05)
    caller = asyncio.create_task(load.many([1, 2]))
    await g.wait_calls(1)
    await bounded(load.queue.aclose())
    with pytest.raises(ShutdownTimeout):
        await bounded(caller)
    await settle()
    assert g.cancelled == [0]


async def test_a_graceful_shutdown_waits_for_the_batch_under_way() -> None:
    g = GatedBatch()
    load = batched(g)
    caller = asyncio.create_task(load.many([1, 2]))
    await g.wait_calls(1)
    closing = asyncio.create_task(load.queue.aclose())
    await settle()
    assert not closing.done()
    g.release(0)
    await bounded(closing)
    assert await bounded(caller) == ["1#0", "2#0"]


# -- 9. errors on bad input ------------------------------------------------------------------------


async def test_an_unhashable_key_is_refused_at_the_call() -> None:
    g = GatedBatch()
    load = batched(g)
    with pytest.raises(TypeError, match=r"cannot be a cache key.*pass key="):
        await load([1])
    with pytest.raises(TypeError, match=r"cannot be a cache key"):
        await load.many([1, [2]])
    assert g.calls == []
    with pytest.raises(TypeError, match=r"cannot be a cache key"):
        load.cache_invalidate({})


def test_a_function_that_is_not_async_is_refused_at_decoration() -> None:
    def load(keys: list[int]) -> dict[int, int]:
        return {}

    with pytest.raises(TypeError, match="needs an async function"):
        worker_queue.batch(load)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs an async function"):
        worker_queue.batch(max_batch=2)(load)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_batch", [0, -1, True, 1.5, "10"])
def test_a_max_batch_below_one_is_refused(max_batch: Any) -> None:
    with pytest.raises(ValueError, match="max_batch must be an int of at least 1"):
        worker_queue.batch(max_batch=max_batch)


@pytest.mark.parametrize("max_wait", [-0.1, float("nan"), float("inf"), True, "0"])
def test_a_negative_max_wait_is_refused(max_wait: Any) -> None:
    with pytest.raises(ValueError, match="max_wait must be a number of seconds >= 0"):
        worker_queue.batch(max_wait=max_wait)


def test_other_bad_options_are_refused_at_decoration() -> None:
    async def load(keys: list[int]) -> dict[int, int]:
        return {}

    with pytest.raises(ValueError, match="maxsize"):
        worker_queue.batch(maxsize=0)(load)
    with pytest.raises(TypeError, match="key must be a function"):
        worker_queue.batch(key="id")(load)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="cache must be a MutableMapping"):
        worker_queue.batch(cache=[])(load)  # type: ignore[call-overload]


def test_an_async_cache_other_than_redis_is_refused_naming_what_works() -> None:
    class PlainAsyncCache:
        async def get(self, key: Any) -> Any:
            return MISSING

        async def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
            return None

        async def delete(self, key: Any) -> bool:
            return False

        async def clear(self) -> None:
            return None

        async def aclose(self) -> None:
            return None

    async def load(keys: list[int]) -> dict[int, int]:
        return {}

    with pytest.raises(TypeError, match="cannot load many keys at once; pass a RedisCache"):
        worker_queue.batch(cache=PlainAsyncCache())(load)  # type: ignore[call-overload]


def test_a_method_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="does not decorate methods"):

        class Repo:
            @worker_queue.batch  # type: ignore[arg-type]
            async def load(self, keys: list[int]) -> dict[int, int]:
                return {}


async def test_a_shutdown_sends_the_batch_being_gathered_at_once() -> None:
    g = GatedBatch()
    load = batched(g, max_wait=3600.0)
    caller = asyncio.create_task(load(1))
    await settle()
    assert g.calls == []
    closing = asyncio.create_task(load.queue.aclose())
    await g.wait_calls(1)  # within WAIT, not an hour
    g.release(0)
    await bounded(closing)
    assert await bounded(caller) == "1#0"


async def test_a_bound_method_may_be_the_batch_function() -> None:
    class Repo:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        async def fetch(self, ids: list[int]) -> dict[int, int]:
            self.calls.append(ids)
            return {i: -i for i in ids}

    repo = Repo()
    load = worker_queue.batch(repo.fetch)
    assert await bounded(load.many([1, 2])) == [-1, -2]
    assert repo.calls == [[1, 2]]
