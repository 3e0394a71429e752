"""RedisCache's connections, the bound on them, and the circuit breaker.

Per RedisCache and event loop there is one client whose pool holds at most
``max_connections + 2`` connections: ``max_connections`` for commands, one for the pub/sub
subscriber (shared by every key being waited for; ``_redis_pubsub``) and one for the health
probe. Commands wait
their turn for a connection in this process (``Lanes``); a wait for a local connection is never
taken for a failure of Redis. The writes that end a computation (store, unlock, announce) and
renew its lease go first.

Failures are told apart:

- a connection-level failure (refused, reset, too many clients, authentication) means Redis is
  down: the breaker opens and, for ``retry_interval`` seconds, calls skip Redis;
- an operation that times out may be this key's own problem (a big value) or Redis stalling:
  the call gives up on Redis, and a probe (PING on its own connection, given at least a
  second) decides; only if the probe fails too does the breaker open;
- anything else (an error reply, a garbled answer) fails that operation only.

Every failure is counted and logged. The writes that end a computation ignore the breaker.

What else lives on a loop's client (the pub/sub subscriber) is attached to the connector
(``attach``): it is told when the client is dropped for another loop's, and closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._slots import Slots
from ._redis_log import Secrets, Throttle, logger
from ._redis_stats import Counters

__all__ = ("Attached", "Connector", "Link", "Unavailable", "kind_of_failure")

T = TypeVar("T")

_POOL_EXHAUSTED: Final = ("No connection available", "Too many connections")
_PROBE_PATIENCE: Final = 1.0
"""The least time the health PING is given before Redis is taken for down."""


class Unavailable(Exception):
    """Redis failed (or is being skipped after a failure); the caller goes on without it."""


class Lanes:
    """At most ``size`` operations at once, first come first served; urgent ones go first.

    A waiter that is cancelled after being handed a lane passes it on to the next one. The
    library's one fair primitive (``Slots``) does the work: its tasks waiting in ``acquire()``,
    urgent ones first; it has no line of items.
    """

    __slots__ = ("_slots",)

    def __init__(self, size: int) -> None:
        self._slots: Slots[object] = Slots(size, _no_items)

    def acquire(self, urgent: bool) -> Coroutine[Any, Any, bool]:
        """Wait for a lane (await it); the caller must ``release()`` it after."""
        return self._slots.acquire(None, urgent)

    def release(self) -> None:
        self._slots.release()


def _no_items(item: object, spare: bool) -> None:
    raise AssertionError("Lanes never put items in line")


class Link:
    """One redis-py client and its lanes, bound to one event loop."""

    __slots__ = ("client", "lanes", "loop", "owned")

    def __init__(
        self, client: Redis, loop: asyncio.AbstractEventLoop, lanes: int, owned: bool
    ) -> None:
        self.client = client
        self.loop = loop
        self.owned = owned
        """Whether the cache made this client (and closes it)."""
        self.lanes = Lanes(lanes)


class Attached(Protocol):
    """Something kept per client besides the client itself (the pub/sub subscriber)."""

    def forget(self, link: Link) -> None:
        """The client of link is dropped for another loop's: let go of what belongs to it,
        touching nothing of its loop."""

    async def aclose(self, link: Link) -> None:
        """The client of link is being closed on its own loop: close what belongs to it."""


def kind_of_failure(exc: BaseException) -> str:
    """'pool' (local pool exhausted), 'timeout', 'down' (connection level) or 'reply'."""
    if isinstance(exc, RedisConnectionError) and any(s in str(exc) for s in _POOL_EXHAUSTED):
        return "pool"
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "down"
    return "reply"


class Connector:
    """Runs Redis operations for one RedisCache: connections per loop, lanes, breaker, probe."""

    __slots__ = (
        "_attached",
        "_background",
        "_counts",
        "_down_until",
        "_given",
        "_label",
        "_link",
        "_probe",
        "_throttle",
        "_url",
        "max_connections",
        "retry_interval",
        "secrets",
        "shown",
        "timeout",
    )

    def __init__(
        self,
        url: str | None,
        given: Redis | None,
        *,
        timeout: float,
        retry_interval: float,
        max_connections: int,
        counts: Counters,
        label: str,
        secrets: Secrets,
        shown: str,
    ) -> None:
        self._url = url
        self.shown = shown
        """Where Redis is, as logs may show it (without its password)."""
        self._given = given
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.max_connections = max_connections
        self._counts = counts
        self._label = label
        self.secrets = secrets
        self._link: Link | None = None
        self._down_until = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._throttle = Throttle()
        self._attached: list[Attached] = []

    def attach(self, part: Attached) -> None:
        """Have part told when a client is dropped or closed (see Attached)."""
        self._attached.append(part)

    # -- the client of the running loop ------------------------------------------------------

    def link(self) -> Link:
        """The client of the running event loop, made on first use on that loop."""
        loop = asyncio.get_running_loop()
        link = self._link
        if link is not None and link.loop is loop:
            return link
        if link is not None:
            # A client's connections belong to the loop they were opened on; a later
            # asyncio.run() gets a client of its own, and the old one is dropped.
            self._forget(link)
        if self._given is not None:
            link = Link(self._given, loop, self.max_connections, owned=False)
        else:
            assert self._url is not None
            # The URL's own settings go first, then ours over them: a URL's max_connections or
            # timeout= (the pool's wait for a connection) must not lift the bound.
            options: dict[str, Any] = dict(parse_url(self._url))
            for lifted in ("max_connections", "timeout", "connection_pool_class"):
                options.pop(lifted, None)
            # Every operation is bounded by asyncio.timeout(timeout); redis-py's own socket
            # timeouts are only a backstop, long enough for the probe's more patient PING.
            backstop = 2 * max(self.timeout, _PROBE_PATIENCE)
            options.update(
                socket_timeout=backstop,
                socket_connect_timeout=backstop,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            pool = ConnectionPool(max_connections=self.max_connections + 2, **options)
            link = Link(Redis(connection_pool=pool), loop, self.max_connections, owned=True)
        self._link = link
        return link

    @property
    def down(self) -> bool:
        """Whether the breaker is open (Redis failed lately and is being skipped)."""
        return bool(self._down_until) and time.monotonic() < self._down_until

    async def call(
        self,
        what: str,
        op: Callable[[Link], Awaitable[T]],
        *,
        name: bytes | None = None,
        urgent: bool = False,
    ) -> T:
        """Run one Redis operation within the timeout, once a lane is free.

        Raises:
            Unavailable: the breaker is open (unless urgent), or the operation failed (logged
                and counted).
        """
        if not urgent and self.down:
            raise Unavailable(what)
        link = self.link()
        lanes = link.lanes
        await lanes.acquire(urgent)
        try:
            if not urgent and self.down:  # opened while this call waited for a lane
                raise Unavailable(what)
            self._counts.round_trips += 1
            try:
                async with asyncio.timeout(self.timeout):
                    result = await op(link)
            except Exception as exc:
                self.failed(what, name, exc)
                raise Unavailable(what) from exc
        finally:
            lanes.release()
        if self._down_until:
            self._down_until = 0.0
            logger.info("RedisCache %s: Redis answers again", self._label)
        return result

    def failed(self, what: str, name: bytes | None, exc: BaseException) -> None:
        """Count and log a failed operation; open the breaker or start a probe as it calls for."""
        self._counts.redis_errors += 1
        kind = kind_of_failure(exc)
        where = f" of {name.decode('utf-8', 'backslashreplace')}" if name is not None else ""
        detail = self.secrets.describe(exc)
        if kind == "down":
            self._open(f"{what}{where} failed: {detail}")
        elif kind == "timeout":
            self._throttle.log(
                "timeout",
                "RedisCache %s: %s%s took more than timeout=%.3g s (%s); going on without "
                "Redis for this call, and checking whether Redis itself answers",
                self._label,
                what,
                where,
                self.timeout,
                detail,
            )
            self.start_probe()
        elif kind == "pool":
            self._throttle.log(
                "pool",
                "RedisCache %s: %s%s found no free connection in the client's pool (%s); give "
                "the client a pool of at least max_connections + 2 = %d connections",
                self._label,
                what,
                where,
                detail,
                self.max_connections + 2,
            )
        else:
            self._throttle.log(
                ("reply", what),
                "RedisCache %s: %s%s failed: %s; going on without Redis for this call",
                self._label,
                what,
                where,
                detail,
            )

    def _open(self, why: str) -> None:
        """Open the breaker: skip Redis for retry_interval seconds."""
        self._down_until = time.monotonic() + self.retry_interval
        self._throttle.log(
            "down",
            "RedisCache %s: %s; computing without Redis for %.3g s, then trying it again "
            "(check that Redis answers at %s, and the password)",
            self._label,
            why,
            self.retry_interval,
            self.shown,
        )

    def start_probe(self) -> None:
        """Check in the background (PING on the probe's own connection) whether Redis answers;
        open the breaker if it does not. One probe at a time."""
        if self._probe is not None and not self._probe.done():
            return
        self._probe = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> None:
        """PING on the probe's own connection: if Redis does not answer either, open the
        breaker; if it does, the failures were those operations' or connections' own."""
        link = self.link()
        # At least a second: this process's own loop may be busy (reading a big value, say),
        # and a late answer must not be taken for a silent Redis.
        patience = max(self.timeout, _PROBE_PATIENCE)
        try:
            async with asyncio.timeout(patience):
                await link.client.ping()
        except Exception as exc:
            self._counts.redis_errors += 1
            self._open(
                f"Redis did not answer PING within {patience:.3g} s ({self.secrets.describe(exc)})"
            )
            return
        logger.debug(
            "RedisCache %s: Redis answers PING; the operations that failed were slow on "
            "their own (a big value, say), or their connection was dropped",
            self._label,
        )

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run work in the background; aclose() gives it timeout seconds to end, then cancels
        it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close what is attached to this loop's client and, if the cache made it, the client.

        Stores still being retried in the background get one more timeout to land first.
        """
        link = self._link
        if link is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if link.loop is not loop:
            self._link = None
            self._forget(link)
            return
        background = [t for t in self._background if not t.done()]
        if background:
            await asyncio.wait(background, timeout=self.timeout)
        link, self._link = self._link, None
        probe, self._probe = self._probe, None
        tasks = [t for t in (probe, *self._background) if t is not None and not t.done()]
        self._background.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if link is None:
            return  # closed meanwhile by a concurrent aclose()
        for part in self._attached:
            await part.aclose(link)
        if not link.owned:
            return
        try:
            await link.client.aclose()
            await link.client.connection_pool.disconnect()
        except Exception as exc:
            logger.debug(
                "RedisCache %s: closing the Redis client failed: %s",
                self._label,
                self.secrets.describe(exc),
            )

    def _forget(self, link: Link) -> None:
        self._background.clear()
        self._probe = None
        for part in self._attached:
            part.forget(link)
        if link.owned:
            _drop(link)


def _drop(link: Link) -> None:
    """Forget a client made on another event loop, closing its sockets without awaiting.

    On a loop that is still open the transports are closed from that loop. On a closed loop
    they cannot be closed the usual way (that schedules a callback on the dead loop), so their
    sockets are closed directly; left alone they would warn when collected.
    """
    try:
        pool: Any = link.client.connection_pool
        connections = (*pool._available_connections, *pool._in_use_connections)
    except Exception as exc:
        logger.debug("RedisCache: cannot list the connections of an old client: %r", exc)
        return
    old_loop = link.loop
    for connection in connections:
        try:
            writer = getattr(connection, "_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is None:
                continue
            if not old_loop.is_closed():
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
