"""cache_prime(value, ...) and acache_prime: the value is positional-only, so that a function
whose own parameter is named ``value`` (positional or keyword-only) can be primed."""

from __future__ import annotations

from typing import Any

import pytest
from test_decorator_async_cache import MemoryAsyncCache, SingleFlightMemoryCache

from wq_memo import MISSING, worker_queue


def caches() -> dict[str, Any]:
    return {
        "dict": {},
        "async": MemoryAsyncCache(),
        "single-flight": SingleFlightMemoryCache(),
    }


@pytest.mark.parametrize("kind", caches().keys())
async def test_a_parameter_named_value_can_be_primed(kind: str) -> None:
    cache = caches()[kind]
    computed: list[tuple[int, int]] = []

    @worker_queue(cache=cache, name=f"positional-value-{kind}")
    async def f(value: int, *, times: int = 1) -> int:
        computed.append((value, times))
        return value * times

    @worker_queue(cache=cache, name=f"keyword-only-value-{kind}")
    async def g(*, value: int) -> int:
        computed.append((value, 0))
        return value

    await f.acache_prime(100, value=3)
    await f.acache_prime(200, 4, times=2)
    await g.acache_prime(300, value=5)
    assert await f.acache_peek(value=3) == 100
    assert await f(4, times=2) == 200
    assert await g(value=5) == 300
    assert await g.acache_peek(value=6) is MISSING
    if kind == "dict":
        f.cache_prime(-1, value=7)
        g.cache_prime(-2, value=8)
        assert f.cache_peek(value=7) == -1
        assert await g(value=8) == -2
    assert computed == []


async def test_a_method_with_a_parameter_named_value_can_be_primed() -> None:
    class Prices:
        def __init__(self) -> None:
            self.computed: list[int] = []

        @worker_queue(cache={})
        async def price(self, value: int) -> int:
            self.computed.append(value)
            return value

        @worker_queue(cache={})
        async def scaled(self, *, value: int) -> int:
            self.computed.append(value)
            return value

    prices = Prices()
    prices.price.cache_prime(10, value=1)
    await prices.price.acache_prime(20, value=2)
    prices.scaled.cache_prime(30, value=3)
    await prices.scaled.acache_prime(40, value=4)
    Prices.price.cache_prime(50, prices, value=5)
    found = [await prices.price(value=1), await prices.price(value=2), await prices.price(value=5)]
    assert found == [10, 20, 50]
    assert [await prices.scaled(value=3), await prices.scaled(value=4)] == [30, 40]
    assert prices.computed == []


async def test_the_value_is_still_given_first_and_only_by_position() -> None:
    @worker_queue(cache={})
    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        f.cache_prime(value=1, x=2)  # type: ignore[call-arg]
    f.cache_prime(9, x=2)
    assert f.cache_peek(x=2) == 9
