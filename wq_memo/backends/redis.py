"""RedisCache: an AsyncCache kept in Redis, computing each key once across processes and hosts.

Needs the ``redis`` package: ``pip install 'wq_memo[redis]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets as _secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, final
from urllib.parse import urlsplit, urlunsplit

try:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.connection import parse_url
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without redis
    raise ImportError(
        "wq_memo.backends.redis needs the redis package; install it with "
        "pip install 'wq_memo[redis]'"
    ) from exc

from ._protocol import MISSING, CallKey
from ._redis_keys import KeyNames, key_names, value_pattern
from ._redis_scripts import CLAIM, FINISH, RENEW
from ._redis_values import BadEntry, Unencodable, ValueCodec

__all__ = ("RedisCache", "RedisCacheStats")

V = TypeVar("V")
T = TypeVar("T")

logger = logging.getLogger("wq_memo")

_CLAIM_HIT: Final = 1
_CLAIM_TAKEN: Final = 2
_CLAIM_HELD: Final = 3


class _Unavailable(Exception):
    """Redis failed (or is being skipped after a failure); the caller falls back."""


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
    """Computations run without the lock because Redis failed."""
    wait_timeouts: int
    """Computations run after waiting ``wait`` seconds for another holder in vain."""
    redis_errors: int
    """Redis operations that failed or timed out; each was logged."""
    bad_entries: int
    """Entries refused (bad or missing signature, not wq_memo's format); never unpickled."""
    unencodable: int
    """Values returned uncached because this cache cannot store them exactly."""
    lock_lost: int
    """Computations whose lease lock was gone when renewed (Redis restarted, or too slow)."""


_COUNTERS: Final = tuple(RedisCacheStats.__dataclass_fields__)


class _Conn:
    """One redis-py client and its scripts, bound to the event loop it was made on."""

    __slots__ = ("claim", "client", "finish", "loop", "renew")

    def __init__(self, client: Redis, loop: asyncio.AbstractEventLoop | None) -> None:
        self.client = client
        self.loop = loop
        self.claim = client.register_script(CLAIM)
        self.renew = client.register_script(RENEW)
        self.finish = client.register_script(FINISH)


def _redacted(url: str) -> str:
    """Return url without its password, fit for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _seconds(name: str, value: object, *, allow_none: bool = False, zero: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
    )
    if not ok:
        what = "a number of seconds " + (">= 0" if zero else "> 0")
        raise ValueError(f"RedisCache: {name} must be {what}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@final
class RedisCache:
    """An AsyncCache kept in Redis; with ``single_flight`` also a SingleFlightCache.

    Give it to ``@worker_queue(cache=RedisCache("redis://..."))``: every process (on every host)
    using the same Redis and namespace then shares the results, and a key missing everywhere is
    computed by one process while the others wait for its result.

    Args:
        url_or_client: a Redis URL (``redis://host:6379/0``), or a ``redis.asyncio.Redis`` made
            with ``decode_responses=False``. From a URL the cache makes its own client on each
            event loop it is used from and closes it in ``aclose()``; a client you pass is used
            as is (on its own event loop) and never closed by the cache.
        namespace: prefix of every Redis name this cache uses.
        ttl: seconds an entry lives (Redis's own expiry); None keeps entries until evicted.
        secret: a key (str or bytes) to store values as pickle signed with HMAC-SHA256. Without
            it values are stored as JSON, and only values JSON gives back exactly are stored
            (None, bool, int, finite float, str, list, dict with str keys; not tuples or sets);
            any other value is returned to its callers uncached, and logged. Entries whose
            signature is wrong or missing are treated as misses, logged, and never unpickled.
        single_flight: take a lease lock in Redis so that one process computes a missing key
            while the others wait for its result (through pub/sub).
        timeout: the bound, in seconds, on each Redis operation. A failed or timed-out operation
            is logged and counted, and the call goes on without Redis (computing locally).
        lease: seconds the lock lives without renewal. The holder renews it every lease/3
            seconds while it computes; if the holder dies, one waiter takes over after at most
            ``lease`` seconds.
        wait: the most seconds a caller waits for another process's computation before
            computing the value itself.
        retry_interval: after a Redis failure, seconds during which this cache does not try
            Redis at all (calls compute locally at once); the first call after that tries again.

    Keys are ``{namespace}:v:{function}:{sha256 of the key's canonical encoding}``; the
    encoding tags every component with its type, so ``1``, ``1.0``, ``True`` and ``"1"``, or
    two objects with equal ``repr()``, never share an entry. A key with a component other than
    None, bool, int, float, str, bytes, tuple, frozenset or an importable class raises TypeError.

    Exceptions from compute() propagate to the caller and are never cached; Redis errors never
    propagate from any method (they are logged and counted in ``stats()``).
    """

    __slots__ = (
        "_codec",
        "_conn",
        "_counts",
        "_down_until",
        "_given",
        "_lease",
        "_namespace",
        "_retry_interval",
        "_single_flight",
        "_timeout",
        "_ttl",
        "_url",
        "_wait",
        "_warned_unencodable",
    )

    def __init__(
        self,
        url_or_client: str | Redis,
        *,
        namespace: str = "wq_memo",
        ttl: float | None = None,
        secret: str | bytes | None = None,
        single_flight: bool = True,
        timeout: float = 1.0,
        lease: float = 10.0,
        wait: float = 60.0,
        retry_interval: float = 1.0,
    ) -> None:
        if isinstance(url_or_client, str):
            try:
                parse_url(url_or_client)
            except ValueError as exc:
                raise ValueError(f"RedisCache: bad Redis URL {url_or_client!r}: {exc}") from exc
            self._url: str | None = url_or_client
            self._given: Redis | None = None
        elif isinstance(url_or_client, Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "RedisCache: the Redis client decodes responses; pass one made with "
                    "decode_responses=False (the default), or a URL"
                )
            self._url, self._given = None, url_or_client
        else:
            raise TypeError(
                f"RedisCache: expected a Redis URL or a redis.asyncio.Redis client, "
                f"got {url_or_client!r}"
            )
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"RedisCache: namespace must be a non-empty str, got {namespace!r}")
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError(
                "RedisCache: secret must be a str or bytes of at least 16 bytes (for instance "
                "secrets.token_hex(32)), shared by every process using this namespace"
            )
        self._namespace = namespace
        self._ttl: float | None = _seconds("ttl", ttl, allow_none=True)
        self._codec = ValueCodec(secret)
        self._single_flight = bool(single_flight)
        self._timeout: float = _seconds("timeout", timeout)
        self._lease: float = _seconds("lease", lease)
        if self._lease < 0.03:
            raise ValueError(f"RedisCache: lease must be at least 0.03 seconds, got {lease!r}")
        self._wait: float = _seconds("wait", wait, zero=True)
        self._retry_interval: float = _seconds("retry_interval", retry_interval, zero=True)
        self._conn: _Conn | None = None
        self._down_until = 0.0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._warned_unencodable: set[str] = set()

    def __repr__(self) -> str:
        where = _redacted(self._url) if self._url is not None else self._given
        return f"RedisCache({where!r}, namespace={self._namespace!r})"

    @property
    def namespace(self) -> str:
        """The prefix of every Redis name this cache uses."""
        return self._namespace

    def stats(self) -> RedisCacheStats:
        """Return this cache's counters (this process only)."""
        return RedisCacheStats(**self._counts)

    # -- connection and error handling ---------------------------------------------------------

    def _connection(self) -> _Conn:
        conn = self._conn
        if self._given is not None:
            if conn is None:
                conn = self._conn = _Conn(self._given, None)
            return conn
        loop = asyncio.get_running_loop()
        if conn is None or conn.loop is not loop:
            # A client's connections belong to the loop they were opened on; a later
            # asyncio.run() gets a client of its own. The old loop is gone, so its sockets are
            # dropped rather than closed politely.
            if conn is not None:
                _drop(conn)
            assert self._url is not None
            client = Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            conn = self._conn = _Conn(client, loop)
        return conn

    async def _call(
        self, what: str, op: Callable[[_Conn], Awaitable[T]], seconds: float | None = None
    ) -> T:
        """Run one Redis operation within the timeout; on any failure log, count, and raise
        _Unavailable. While Redis is marked down, raise _Unavailable at once."""
        if self._down_until and time.monotonic() < self._down_until:
            raise _Unavailable(what)
        try:
            conn = self._connection()
            async with asyncio.timeout(self._timeout if seconds is None else seconds):
                result = await op(conn)
        except Exception as exc:
            self._counts["redis_errors"] += 1
            self._down_until = time.monotonic() + self._retry_interval
            logger.warning(
                "RedisCache %s: Redis %s failed (%s: %s); computing without Redis for %.3g s",
                self._namespace,
                what,
                type(exc).__name__,
                exc,
                self._retry_interval,
            )
            raise _Unavailable(what) from exc
        if self._down_until:
            self._down_until = 0.0
            logger.info("RedisCache %s: Redis answers again", self._namespace)
        return result

    def _px(self, ttl: float | None) -> int | None:
        ttl = self._ttl if ttl is None else _seconds("ttl", ttl)
        return None if ttl is None else max(1, round(ttl * 1000))

    def _decode(self, names: KeyNames, data: bytes) -> Any:
        """Return the value data holds, or MISSING (logged and counted) when it is refused."""
        try:
            return self._codec.loads(names.value, data)
        except BadEntry as exc:
            self._counts["bad_entries"] += 1
            logger.warning("RedisCache: entry %s treated as a miss: %s", names.value, exc)
            return MISSING

    def _encode(self, names: KeyNames, key: Hashable, value: Any) -> bytes | None:
        """Return the bytes to store for value, or None (logged and counted) if it cannot be."""
        try:
            return self._codec.dumps(names.value, value)
        except Unencodable as exc:
            self._counts["unencodable"] += 1
            function = key.function if isinstance(key, CallKey) else ""
            first = function not in self._warned_unencodable
            self._warned_unencodable.add(function)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "RedisCache: result for %s returned uncached: %s",
                names.value,
                exc,
            )
            return None

    # -- AsyncCache ----------------------------------------------------------------------------

    async def get(self, key: Hashable) -> Any:
        """Return the value stored under key, or MISSING (also when Redis fails).

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        names = key_names(self._namespace, key)
        try:
            data = await self._call("GET", lambda c: c.client.get(names.value))
        except _Unavailable:
            return MISSING
        value = MISSING if data is None else self._decode(names, data)  # type: ignore[arg-type]
        self._counts["misses" if value is MISSING else "hits"] += 1
        return value

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store value under key for ttl seconds (None: the cache's ttl).

        A value this cache cannot store exactly is not stored (logged and counted).

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        names = key_names(self._namespace, key)
        px = self._px(ttl)
        data = self._encode(names, key, value)
        if data is None:
            return
        with contextlib.suppress(_Unavailable):
            await self._call("SET", lambda c: c.client.set(names.value, data, px=px))

    async def delete(self, key: Hashable) -> bool:
        """Remove key's entry; return whether one was removed (False also when Redis fails)."""
        names = key_names(self._namespace, key)
        try:
            removed = await self._call("DEL", lambda c: c.client.delete(names.value))
        except _Unavailable:
            return False
        return bool(removed)

    async def clear(self) -> None:
        """Remove every entry of this namespace (not the locks of running computations).

        On a Redis failure the clear stops where it is (logged and counted).
        """
        pattern = value_pattern(self._namespace)
        cursor: int = 0
        try:
            while True:
                cursor, names = await self._call(
                    "SCAN",
                    lambda c, at=cursor: c.client.scan(at, match=pattern, count=1000),  # type: ignore[misc]
                )
                if names:
                    await self._call("UNLINK", lambda c, n=names: c.client.unlink(*n))  # type: ignore[misc]
                if not cursor:
                    break
        except _Unavailable:
            pass

    async def aclose(self) -> None:
        """Close the client this cache made from a URL (a client you passed stays open)."""
        conn, self._conn = self._conn, None
        if conn is None or self._given is not None:
            return
        try:
            loop = asyncio.get_running_loop()
            if conn.loop is loop:
                await conn.client.aclose()
            else:
                _drop(conn)
        except Exception as exc:
            logger.debug("RedisCache: closing the Redis client failed: %r", exc)

    # -- single flight -------------------------------------------------------------------------

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        """Return the value under key, computing and storing it with compute() if absent.

        With ``single_flight``, at most one compute() for a key runs at a time across every
        process sharing the Redis namespace (while Redis works): the others wait for its result
        and read it. If the holder fails, the waiters take the lock one after another; if it
        dies, one of them takes over when its lease expires.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
            Exception: whatever compute() raises (nothing is stored then).
        """
        names = key_names(self._namespace, key)
        if not self._single_flight:
            value = await self.get(key)
            if value is not MISSING:
                return value  # type: ignore[no-any-return]
            return await self._compute_and_store(names, key, compute, None)
        token = _secrets.token_hex(16)
        try:
            kind, payload = await self._claim(names, token)
        except _Unavailable:
            return await self._compute_and_store(names, key, compute, "fallbacks")
        if kind == _CLAIM_HIT:
            self._counts["hits"] += 1
            return payload  # type: ignore[no-any-return]
        if kind == _CLAIM_TAKEN:
            return await self._compute_holding(names, key, token, compute)
        return await self._wait_then_compute(names, key, token, compute)

    async def _claim(self, names: KeyNames, token: str) -> tuple[int, Any]:
        """Read the value, or take the lock, or learn the holder's remaining lease (ms)."""
        lease_ms = max(1, round(self._lease * 1000))
        check = "1"
        while True:
            reply = await self._call(
                "lock",
                lambda c, look=check: c.claim(  # type: ignore[misc]
                    keys=[names.value, names.lock], args=[token, lease_ms, look]
                ),
            )
            try:
                kind = int(reply[0])
                payload: Any = reply[1] if kind != _CLAIM_TAKEN else None
                if kind == _CLAIM_HELD:
                    payload = int(payload)
                elif kind not in (_CLAIM_HIT, _CLAIM_TAKEN):
                    raise ValueError(kind)
            except (TypeError, ValueError, IndexError, KeyError) as exc:
                self._counts["redis_errors"] += 1
                logger.warning("RedisCache: unexpected reply from Redis: %r", reply)
                raise _Unavailable("lock") from exc
            if kind == _CLAIM_HELD:
                return kind, payload
            if kind == _CLAIM_HIT:
                value = self._decode(names, payload)
                if value is MISSING:
                    check = "0"  # a refused entry: compute over it, through the lock
                    continue
                return kind, value
            return kind, None

    async def _compute_and_store(
        self,
        names: KeyNames,
        key: Hashable,
        compute: Callable[[], Awaitable[V]],
        reason: str | None,
    ) -> V:
        """Compute without the lock, then store the value if Redis takes it."""
        if reason is not None:
            self._counts[reason] += 1
        self._counts["computed"] += 1
        value = await compute()
        data = self._encode(names, key, value)
        if data is not None:
            px = self._px(None)
            with contextlib.suppress(_Unavailable):
                await self._call("SET", lambda c: c.client.set(names.value, data, px=px))
        return value

    async def _compute_holding(
        self, names: KeyNames, key: Hashable, token: str, compute: Callable[[], Awaitable[V]]
    ) -> V:
        """Compute while holding the lock and renewing its lease; store, release, announce."""
        self._counts["computed"] += 1
        # The lease is renewed every lease/3 seconds; a timer (cheaper than a task) starts the
        # renewing task only for computations that last that long.
        loop = asyncio.get_running_loop()
        renewer: asyncio.Task[None] | None = None

        def start_renewing() -> None:
            nonlocal renewer
            renewer = loop.create_task(self._renew(names, token))

        timer = loop.call_later(self._lease / 3, start_renewing)
        data: bytes | None = None
        try:
            value = await compute()
            data = self._encode(names, key, value)
        finally:
            timer.cancel()
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            await self._finish(names, token, data)
        return value

    async def _renew(self, names: KeyNames, token: str) -> None:
        lease_ms = max(1, round(self._lease * 1000))
        while True:
            try:
                held = await self._call(
                    "lease renewal",
                    lambda c: c.renew(keys=[names.lock], args=[token, lease_ms]),
                )
            except _Unavailable:
                held = True  # Redis failed (logged); try again at the next period
            if not held:
                self._counts["lock_lost"] += 1
                logger.warning(
                    "RedisCache: lost the lock on %s while computing (Redis restarted or the "
                    "lease of %.3g s ran out); another process may compute it too",
                    names.value,
                    self._lease,
                )
                return
            await asyncio.sleep(self._lease / 3)

    async def _finish(self, names: KeyNames, token: str, data: bytes | None) -> None:
        px = self._px(None) or 0
        stored = data is not None
        args = [token, "1" if stored else "0", data or b"", px, names.channel]
        args.append("done" if stored else "failed")
        with contextlib.suppress(_Unavailable):
            await self._call(
                "store and unlock",
                lambda c: c.finish(keys=[names.value, names.lock], args=args),
            )

    async def _wait_then_compute(
        self, names: KeyNames, key: Hashable, token: str, compute: Callable[[], Awaitable[V]]
    ) -> V:
        """Wait for the holder's announcement; then read the value or take the lock in turn."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        try:
            pubsub = await self._call("SUBSCRIBE", lambda c: _subscribe(c, names.channel))
        except _Unavailable:
            return await self._compute_and_store(names, key, compute, "fallbacks")
        outcome: tuple[int, Any] | str
        try:
            while True:
                # Subscribed first, then looked: an announcement cannot slip in between.
                try:
                    kind, payload = await self._claim(names, token)
                except _Unavailable:
                    outcome = "fallbacks"
                    break
                if kind != _CLAIM_HELD:
                    outcome = (kind, payload)
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    outcome = "wait_timeouts"
                    break
                # No announcement may come if the holder died: look again when its lease ends.
                nap = remaining if payload < 0 else min(remaining, payload / 1000 + 0.01)
                try:
                    await self._call(
                        "pub/sub wait",
                        lambda c, t=nap: pubsub.get_message(  # type: ignore[misc]
                            ignore_subscribe_messages=True, timeout=t
                        ),
                        seconds=nap + self._timeout,
                    )
                except _Unavailable:
                    outcome = "fallbacks"
                    break
        finally:
            await _close_pubsub(pubsub, self._timeout)
        if outcome == "wait_timeouts":
            logger.warning(
                "RedisCache: waited %.3g s for another process to compute %s; computing it here",
                self._wait,
                names.value,
            )
        if isinstance(outcome, str):
            return await self._compute_and_store(names, key, compute, outcome)
        kind, payload = outcome
        if kind == _CLAIM_HIT:
            self._counts["waited"] += 1
            return payload  # type: ignore[no-any-return]
        return await self._compute_holding(names, key, token, compute)


async def _subscribe(conn: _Conn, channel: str) -> PubSub:
    """Subscribe to channel and return once Redis has confirmed the subscription."""
    pubsub = conn.client.pubsub()
    try:
        await pubsub.subscribe(channel)
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message.get("type") in ("subscribe", b"subscribe"):
                return pubsub
    except BaseException:
        await _close_pubsub(pubsub, 0.5)
        raise


async def _close_pubsub(pubsub: PubSub, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
    except Exception as exc:
        logger.debug("RedisCache: closing a pub/sub connection failed: %r", exc)


def _drop(conn: _Conn) -> None:
    """Forget a client made on another event loop, closing its sockets without awaiting.

    On a loop that is still open the transports are aborted from that loop. On a closed loop
    they cannot be closed the usual way (that schedules a callback on the dead loop), so their
    sockets are closed directly; left alone they would warn when collected.
    """
    try:
        pool = conn.client.connection_pool
        connections = (*pool._available_connections, *pool._in_use_connections)
    except Exception as exc:
        logger.debug("RedisCache: cannot list the connections of an old client: %r", exc)
        return
    old_loop = conn.loop
    for connection in connections:
        try:
            writer = getattr(connection, "_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is None:
                continue
            if old_loop is not None and not old_loop.is_closed():
                # The callback keeps the writer alive until it is closed, so it never warns.
                old_loop.call_soon_threadsafe(writer.close)  # type: ignore[union-attr]
                connection._reader = connection._writer = None
                continue
            sock = getattr(transport, "_sock", None)
            # abort() marks the transport closing, then fails to schedule on the dead loop.
            with contextlib.suppress(RuntimeError):
                transport.abort()
            if sock is not None:
                sock.close()
                transport._sock = None
            connection._reader = connection._writer = None
        except Exception as exc:
            logger.debug("RedisCache: dropping a connection of an old loop failed: %r", exc)
