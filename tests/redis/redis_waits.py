"""Bounded waits for a condition that only Redis (or another process) can make true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(
    condition: Callable[[], object], seconds: float = 10.0, every: float = 0.005
) -> None:
    """Return once condition() is true; fail after seconds."""
    async with asyncio.timeout(seconds):
        while True:
            if condition():
                return
            await asyncio.sleep(every)
