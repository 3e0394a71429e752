"""Tests of the example web service (tests/test_examples.py runs them)."""

from __future__ import annotations

import asyncio

import web_service
from web_service import app, call, price


async def test_a_price_and_an_unknown_sku() -> None:
    async with asyncio.timeout(5):
        status, body = await call(app, "/price/apple")
        assert (status, body["sku"]) == (200, "apple")
        assert (await call(app, "/price/no-such-sku"))[0] == 404
        assert (await call(app, "/nowhere"))[0] == 404
    await price.queue.aclose()


async def test_concurrent_requests_look_a_sku_up_once() -> None:
    web_service.lookups.clear()
    await price.acache_clear()
    before = price.cache_info()
    async with asyncio.timeout(5):
        answers = await asyncio.gather(*(call(app, "/price/pear") for _ in range(50)))
    assert {status for status, _ in answers} == {200}
    assert web_service.lookups == {"pear": 1}
    info = price.cache_info()
    assert (info.misses - before.misses, info.joined - before.joined) == (1, 49)
    await price.queue.aclose()
