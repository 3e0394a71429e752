"""RedisCache's counters: one mutable record per cache, and the frozen snapshot stats() returns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final, final

__all__ = ("Counters", "RedisCacheStats")


@final
@dataclass(frozen=True, slots=True)
class RedisCacheStats:
    """Counters of one RedisCache in this process, since it was created."""

    hits: int
    """Values found in Redis by get(), or by get_or_compute() before computing or waiting."""
    misses: int
    """get() lookups that found nothing usable."""
    computed: int
    """compute() calls this cache ran, for whatever reason (including the two below)."""
    waited: int
    """Results another process (or caller) computed while this one waited for them."""
    fallbacks: int
    """Computations run without the lock because Redis failed (their values are not stored)."""
    wait_timeouts: int
    """Computations run after waiting ``wait`` seconds for another holder in vain."""
    redis_errors: int
    """Redis operations that failed or timed out; each was logged."""
    bad_entries: int
    """Entries refused (bad or missing signature, expired, not wq_memo's); never unpickled."""
    unencodable: int
    """Values returned uncached because this cache cannot store them exactly."""
    lock_lost: int
    """Computations whose lock was gone when they renewed it or stored their result (the
    lease ran out, the key was deleted or cleared, Redis restarted); their result was not
    stored."""
    oversized: int = 0
    """Values not stored, or entries not read, because larger than ``max_value_bytes``."""
    refresh_skipped: int = 0
    """Refreshes given up at once because another computation of the key held its lock."""
    round_trips: int = 0
    """Operations sent to Redis on the command connections (a command, a script, or a
    pipeline: each one round trip), retries included; pub/sub and health checks aside."""


@dataclass(slots=True)
class Counters:
    """The live counters of one RedisCache, shared by its parts; see RedisCacheStats."""

    hits: int = 0
    misses: int = 0
    computed: int = 0
    waited: int = 0
    fallbacks: int = 0
    wait_timeouts: int = 0
    redis_errors: int = 0
    bad_entries: int = 0
    unencodable: int = 0
    lock_lost: int = 0
    oversized: int = 0
    refresh_skipped: int = 0
    round_trips: int = 0

    def snapshot(self) -> RedisCacheStats:
        """The counters as they are now."""
        return RedisCacheStats(*[getattr(self, name) for name in _NAMES])


_NAMES: Final = tuple(f.name for f in fields(RedisCacheStats))
assert tuple(f.name for f in fields(Counters)) == _NAMES, "Counters must mirror RedisCacheStats"
