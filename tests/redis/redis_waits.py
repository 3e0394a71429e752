"""Bounded waits for a condition that only Redis (or another process) can make true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(
    condition: Callable[[], object], seconds: float = 10.0, every: float = 0.005
) -> None:
    """Return once condition() is true; fail after seconds."""
    async with asyncio.timeout(seconds):
        while True:
            if condition():
                return
            await asyncio.sleep(every)


def waiting(cache: Any, channel: bytes) -> int:
    """How many of cache's callers wait for news on channel (not those about to look)."""
    sub = cache._subscriptions.current
    if sub is None or sub.dead:
        return 0
    ch = sub._channels.get(channel)
    return 0 if ch is None else sum(w.waiting for w in ch.watches)


def waiting_anywhere(cache: Any) -> int:
    """How many of cache's callers wait for news, on any channel."""
    sub = cache._subscriptions.current
    if sub is None or sub.dead:
        return 0
    return sum(w.waiting for ch in sub._channels.values() for w in ch.watches)
