"""RedisCache: an AsyncCache kept in Redis, computing each key once across processes and hosts.

Needs the ``redis`` package: ``pip install 'wq_memo[redis]'``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, TypeVar, final

try:
    from redis.asyncio import Redis
    from redis.asyncio.connection import parse_url
    from redis.exceptions import ResponseError
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without redis
    raise ImportError(
        "wq_memo.backends.redis needs the redis package; install it with "
        "pip install 'wq_memo[redis]'"
    ) from exc

from .._policy import Kept, StoredError
from ._protocol import MISSING, CallKey, Lifetime, Missing
from ._redis_batch import BatchFlight
from ._redis_conn import Connector, Link, Unavailable
from ._redis_flight import MAX_EXPIRY, SingleFlight
from ._redis_keys import KeyNames, Namespace
from ._redis_log import Secrets, redact_url
from ._redis_pubsub import Subscriptions
from ._redis_stats import Counters, RedisCacheStats
from ._redis_values import Entries, ValueCodec, json_args

__all__ = ("RedisCache", "RedisCacheStats")

V = TypeVar("V")

DEFAULT_MAX_VALUE_BYTES: Final = 8 * 1024 * 1024


_MAX_EXPIRY: Final = MAX_EXPIRY
"""The most seconds a ttl or a lease may last (see ``_redis_flight.MAX_EXPIRY``)."""


def _seconds(
    name: str,
    value: object,
    *,
    allow_none: bool = False,
    zero: bool = False,
    expiry: str | None = None,
) -> Any:
    """Check a number of seconds; with ``expiry`` (what to do instead) it becomes a Redis
    expiry, and must not be past _MAX_EXPIRY."""
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
    if expiry is not None and value > _MAX_EXPIRY:  # type: ignore[operator]
        raise ValueError(
            f"RedisCache: {name} must be at most {_MAX_EXPIRY:.2g} seconds (about 290 million "
            f"years), got {value!r}: Redis keeps expiry times as milliseconds since the epoch "
            f"in a signed 64-bit integer, and refuses one past 2**63 - 1 ms; {expiry}"
        )
    return float(value)  # type: ignore[arg-type]


_KEEP: Final = "pass ttl=None to keep entries until Redis evicts them"


def _count(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"RedisCache: {name} must be an int >= {low}, got {value!r}")
    return value


def _client_text(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    return f"<redis client {where} db={kwargs.get('db', 0)}>"


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
            as is (on its own event loop) and never closed by the cache; give its pool room
            for ``max_connections + 2`` connections.
        namespace: prefix of every Redis name this cache uses (any characters).
        ttl: seconds an entry lives (Redis's own expiry; signed entries also carry it);
            None keeps entries until evicted. At most 9.2e15 s (about 290 million years):
            Redis refuses an expiry past that.
        secret: a key (str or bytes) to store values as pickle signed with HMAC-SHA256. Without
            it values are stored as JSON, and only values JSON gives back exactly are stored
            (None, bool, int, finite float, str, list, dict with str keys; not tuples or sets);
            any other value is returned to its callers uncached, and logged. Entries whose
            signature is wrong or missing, or that are past their expiry, are treated as
            misses, logged, and never unpickled.
        single_flight: take a lease lock in Redis so that one process computes a missing key
            while the others wait for its result (through pub/sub).
        timeout: the bound, in seconds, on each Redis operation. A failed or timed-out operation
            is logged and counted, and the call goes on without Redis (computing locally).
        lease: seconds the lock lives without renewal. The holder renews it every lease/3
            seconds while it computes; if the holder dies, one waiter takes over after at most
            ``lease`` seconds.
        wait: the most seconds a caller waits for another process's computation before
            computing the value itself.
        retry_interval: after Redis is found down, seconds during which this cache does not try
            Redis at all (calls compute locally at once); the first call after that tries again.
        max_connections: connections for commands, per event loop; the cache opens at most
            ``max_connections + 2`` in all (one more for pub/sub, one for health checks),
            however many keys are in flight. Commands beyond that wait for a connection.
        max_value_bytes: values that take more bytes than this once encoded are returned
            uncached (logged, counted in ``stats().oversized``); stored entries larger than
            this are misses, found without reading them.

    Keys are ``{namespace}:v:{function}:{sha256 of the key's canonical encoding}`` (with each
    ``:`` of the namespace doubled); the encoding tags every component with its type, so ``1``,
    ``1.0``, ``True`` and ``"1"``, or two objects with equal ``repr()``, never share an entry. A
    key with a component other than None, bool, int, float, str, bytes, tuple, frozenset or an
    importable class raises TypeError.

    Exceptions from compute() propagate to the caller and are never cached; Redis errors never
    propagate from any method (they are logged and counted in ``stats()``).
    """

    __slots__ = (
        "_batch",
        "_conn",
        "_counts",
        "_entries",
        "_flight",
        "_given",
        "_ns",
        "_repr",
        "_subscriptions",
        "_ttl",
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
        max_connections: int = 8,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        url: str | None
        if isinstance(url_or_client, str):
            url, given = url_or_client, None
            secrets = Secrets.of_url(url)
            try:
                password = parse_url(url).get("password")
            except Exception as exc:
                # From None: the original message, or its traceback, could quote the password.
                raise ValueError(
                    f"RedisCache: bad Redis URL {redact_url(url)!r}: {secrets.describe(exc)}"
                ) from None
            secrets = Secrets.of_url(url, password)
            shown = redact_url(url)
        elif isinstance(url_or_client, Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "RedisCache: the Redis client decodes responses; pass one made with "
                    "decode_responses=False (the default), or a URL"
                )
            url, given = None, url_or_client
            secrets = Secrets(kwargs.get("password"))
            shown = _client_text(url_or_client)
        else:
            raise TypeError(
                f"RedisCache: expected a Redis URL or a redis.asyncio.Redis client, "
                f"got a {type(url_or_client).__qualname__}"
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
        self._ttl: float | None = _seconds("ttl", ttl, allow_none=True, expiry=_KEEP)
        timeout = _seconds("timeout", timeout)
        lease = _seconds(
            "lease",
            lease,
            expiry="a lease of seconds is enough, renewed every lease/3 while the holder computes",
        )
        if lease < 0.03:
            raise ValueError(f"RedisCache: lease must be at least 0.03 seconds, got {lease!r}")
        wait = _seconds("wait", wait, zero=True)
        retry_interval = _seconds("retry_interval", retry_interval, zero=True)
        max_connections = _count("max_connections", max_connections, 1)
        max_value_bytes = _count("max_value_bytes", max_value_bytes, 64)
        self._ns = Namespace(namespace)
        self._given = given
        self._repr = f"RedisCache({shown!r}, namespace={namespace!r})"
        label = repr(namespace)
        self._counts = Counters()
        self._conn = Connector(
            url,
            given,
            timeout=timeout,
            retry_interval=retry_interval,
            max_connections=max_connections,
            counts=self._counts,
            label=label,
            secrets=secrets,
            shown=shown,
        )
        self._entries = Entries(ValueCodec(secret), max_value_bytes, self._counts, label)
        self._subscriptions = Subscriptions(self._conn, self._counts, label)
        self._flight = SingleFlight(
            self._conn,
            self._subscriptions,
            self._entries,
            self._counts,
            lease=lease,
            wait=wait,
            ttl=self._ttl,
            single_flight=bool(single_flight),
            label=label,
            namespace=self._ns,
        )
        self._batch = BatchFlight(self._flight, self._ns)

    def __repr__(self) -> str:
        return self._repr

    @property
    def ttl(self) -> float | None:
        """Seconds an entry lives (None: until evicted); @worker_queue checks refresh_after
        against it."""
        return self._ttl

    @property
    def namespace(self) -> str:
        """The prefix of every Redis name this cache uses."""
        return self._ns.name

    def stats(self) -> RedisCacheStats:
        """Return this cache's counters (this process only)."""
        return self._counts.snapshot()

    def _names(self, key: Hashable) -> tuple[KeyNames, str]:
        names = self._ns.names(key)
        return names, key.function if isinstance(key, CallKey) else ""

    # -- AsyncCache ----------------------------------------------------------------------------

    async def get(self, key: Hashable) -> Any:
        """Return the value stored under key, or MISSING (also when Redis fails).

        An entry @worker_queue keeps for ``cache_errors`` or ``stale_if_error`` reads as its
        value while it has not expired (on the wall clock), and a remembered error as MISSING.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        return self._plain((await self._read(key))[0])

    async def peek(self, key: Hashable) -> Any:
        """Return the value stored under key, or MISSING, as get() does, counting nothing in
        stats() hits and misses (what @worker_queue's acache_peek reads through).

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        return self._plain((await self._read(key, count=False))[0])

    async def get_kept(self, key: Hashable, usable: Callable[[Any], bool] | None = None) -> Any:
        """get(), an entry kept for @worker_queue's ``cache_errors`` or ``stale_if_error``
        returned as it is stored: a ``Kept`` value with its expiry and stale window, or a
        ``StoredError`` (a type's name and JSON arguments, nothing imported). ``usable(entry)``,
        if given, says whether it answers the call: one that does not (past its expiry) counts
        as a miss in stats()."""
        value, _ = await self._read(key, count=usable is None)
        if usable is not None:
            if value is not MISSING and usable(value):
                self._counts.hits += 1
            else:
                self._counts.misses += 1
        return value

    async def peek_kept(self, key: Hashable) -> Any:
        """peek(), as get_kept() answers."""
        return (await self._read(key, count=False))[0]

    def _plain(self, value: Any) -> Any:
        """value, or for an entry kept for a policy: its value while fresh, else MISSING."""
        kind = type(value)
        if kind is Kept:
            if value.error is None and self._entries.now() < value.expires:
                return value.value
            return MISSING
        if kind is StoredError:
            return MISSING
        return value

    def _usable(self, value: Any) -> bool:
        return self._plain(value) is not MISSING or value is MISSING

    async def _read(
        self, key: Hashable, count: bool = True, expiry: list[int] | None = None
    ) -> tuple[Any, float]:
        """(the value under key or MISSING, its write time in epoch seconds): one GETRANGE.
        ``count``: count it in stats() as a hit or a miss. ``expiry``: the entry's PTTL is
        appended to it, read in the same round trip (a pipeline of GETRANGE and PTTL)."""
        name = self._ns.value_name(key)
        limit = self._entries.max_bytes

        async def read(link: Link) -> bytes | None:
            try:
                if expiry is None:
                    data = await link.client.getrange(name, 0, limit)
                else:
                    pipe = link.client.pipeline(transaction=False)
                    pipe.getrange(name, 0, limit)
                    pipe.pttl(name)
                    data, pttl = await pipe.execute()
                    expiry.append(int(pttl))
            except ResponseError as exc:
                if "WRONGTYPE" in str(exc):
                    return None
                raise
            if not isinstance(data, bytes):
                raise TypeError(f"GETRANGE answered a {type(data).__qualname__}, not bytes")
            return data

        try:
            data = await self._conn.call("GET", read, name=name)
        except Unavailable:
            return MISSING, 0.0
        found: tuple[Any, float] = (MISSING, 0.0)
        if data is None:
            self._entries.refused(name, "it is not a string")
        elif len(data) > limit:
            self._entries.too_big(name, None)
        elif data:
            found = self._entries.decode_dated(name, data)
        if count:
            if found[0] is MISSING:
                self._counts.misses += 1
            else:
                self._counts.hits += 1
        return found

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store value under key for ttl seconds (None: the cache's ttl).

        The value wins over a computation of key under way in any process: that computation's
        result is not stored over it (its lock is removed), and the callers waiting for it get
        this value. A value this cache cannot store exactly, or larger than max_value_bytes, is
        not stored (logged and counted).

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        names, function = self._names(key)
        seconds: float | None = self._ttl if ttl is None else _seconds("ttl", ttl, expiry=_KEEP)
        with contextlib.suppress(Unavailable):  # logged and counted
            await self._flight.put(names, function, value, seconds)

    async def delete(self, key: Hashable) -> bool:
        """Remove key's entry; return whether one was removed (False also when Redis fails).

        A computation of key under way in any process then does not store its result (its
        lock is removed with the entry), and the callers waiting for it compute afresh.
        """
        names, _ = self._names(key)
        try:
            return await self._flight.delete(names)
        except Unavailable:
            return False

    async def clear(self) -> None:
        """Remove every entry of this namespace, and no other's.

        The computations under way in the namespace, in every process, do not store their
        results, however their stores interleave with this clear: it first sets the
        namespace's epoch, and while it is set a computation stores only if it took its lock
        under it; then the clear removes the values and the locks, and at last the epoch
        (unless a later clear has set another), since every lock taken before it is gone by
        then. On a Redis failure the clear stops where it is, logs at WARNING that it did not
        complete (call it again), and the epoch expires on its own (after 10 minutes).
        """
        await self._flight.clear()

    async def aclose(self) -> None:
        """Close the connections this cache opened on the running loop (a client you passed
        stays open)."""
        await self._conn.aclose()

    # -- single flight -------------------------------------------------------------------------

    async def get_or_compute(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[V]],
        lifetime: Lifetime | None = None,
        usable: Callable[[Any], bool] | None = None,
    ) -> V:
        """Return the value under key, computing and storing it with compute() if absent.

        ``usable(value)``, if given, says whether a value found answers the call; one that
        does not (an entry past the expiry it carries) is computed over, through the lock.

        ``lifetime(value)``, if given, says whether a computed value is stored and for how long
        (None: the cache's ttl); one not stored goes to this call, and the calls waiting for it
        in other processes compute it themselves.

        With ``single_flight``, at most one compute() for a key runs at a time across every
        process sharing the Redis namespace (while Redis works): the others wait for its result
        without calling compute(). compute() is called only by a call that computes: the one
        holding the lock, or one that goes on without Redis.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
            Exception: whatever compute() raises (nothing is stored then).
        """
        names, function = self._names(key)
        if usable is not None:
            return await self._flight.get_or_compute(names, function, compute, lifetime, usable)
        value = await self._flight.get_or_compute(names, function, compute, lifetime, self._usable)
        return self._plain(value)  # type: ignore[no-any-return]

    def can_remember(self, args: tuple[Any, ...]) -> bool:
        """Whether a remembered error with these arguments can be stored (as JSON)."""
        return json_args(args)

    def batch_flight(self) -> BatchFlight:
        """The single flight of many keys at once that ``@worker_queue.batch`` drives: the
        claims of a batch's keys in one round trip (a value found, a lock taken, or a holder
        elsewhere to wait for), their leases renewed together, and their fenced stores in one
        round trip (see ``_redis_batch``)."""
        return self._batch

    # -- refresh-ahead -------------------------------------------------------------------------

    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        """Return (the value under key or MISSING, seconds since it was written), in one read.

        The age is this host's wall clock minus the writer's (0 if the writer's is ahead); an
        entry of the format written before entries carried their write time counts as written
        at the epoch, so it is due for a refresh at once. A miss has age None.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        value, written = await self._read(key)
        value = self._plain(value)
        if value is MISSING:
            return MISSING, None
        return value, self._entries.age(written)

    async def get_with_lifetime(self, key: Hashable) -> tuple[Any, float | None, float | None]:
        """Return (the value under key or MISSING, seconds since it was written, seconds it
        lives in all), in one round trip: as get_with_age, with the entry's lifetime, its age
        plus what its expiry in Redis leaves (None: no expiry, or a miss). What @worker_queue
        reads with refresh_after and a ttl function, whose entries' lifetimes differ.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        expiry: list[int] = []
        found, written = await self._read(key, expiry=expiry)
        value = self._plain(found)
        if value is MISSING:
            return MISSING, None, None
        age = self._entries.age(written)
        if type(found) is Kept:
            # Kept in Redis past its expiry for a stale window: its lifetime ends at its own
            # expiry, not at the Redis key's.
            left_s = found.expires - self._entries.now()
            return value, age, (age + left_s if math.isfinite(left_s) else None)
        left = expiry[-1] if expiry else -1
        return value, age, (age + left / 1000 if left >= 0 else None)

    async def get_kept_with_lifetime(
        self, key: Hashable, usable: Callable[[Any], bool] | None = None
    ) -> tuple[Any, float | None, float | None]:
        """get_with_lifetime() as get_kept() answers: (the entry as stored, a ``Kept`` value or
        a ``StoredError`` included, or MISSING; seconds since it was written; seconds its Redis
        key lives in all, stale window included, None: no expiry, or a miss), in one round
        trip. What @worker_queue reads with refresh_after under ``cache_errors`` or
        ``stale_if_error``: it dates a kept entry by the expiry the entry carries.
        ``usable``: as for get_kept (an entry it refuses counts as a miss in stats()).

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        expiry: list[int] = []
        found, written = await self._read(key, count=usable is None, expiry=expiry)
        if usable is not None:
            if found is not MISSING and usable(found):
                self._counts.hits += 1
            else:
                self._counts.misses += 1
        if found is MISSING:
            return MISSING, None, None
        age = self._entries.age(written)
        left = expiry[-1] if expiry else -1
        return found, age, (age + left / 1000 if left >= 0 else None)

    async def refresh(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[V]],
        lifetime: Lifetime | None = None,
    ) -> tuple[bool, V | Missing]:
        """Compute key anew and store it, unless another computation of it holds its lock
        (``lifetime``: as for get_or_compute).

        One attempt to take the key's lease lock, never a wait: if another process (or caller)
        computes or refreshes the key, returns ``(False, MISSING)`` at once without calling
        compute(); so it does when Redis fails (logged and counted). Otherwise compute() runs
        under the lock, and its value is stored as get_or_compute stores it (renewing the
        lease, not after a ``delete(key)`` or ``clear()``, never over a newer value), announced
        to the callers waiting for the key, and returned as ``(True, value)``. Until then the
        entry stays as it was, and every reader gets it. Without ``single_flight`` the lock is
        not taken and every call computes.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
            Exception: whatever compute() raises (nothing is stored then; the entry stays).
        """
        names, function = self._names(key)
        return await self._flight.refresh(names, function, compute, lifetime)
