"""One pub/sub connection per RedisCache and event loop, shared by every key being waited for.

A waiter watches its key's channel: the first watcher of a channel has it subscribed, the last
one to leave has it unsubscribed, and the messages of every channel are read by one task and
handed to that channel's watchers. Subscriptions and unsubscriptions queued together go out as
one command, so thousands of keys cost one connection and few round trips.

A waiter must know that its subscription is in place before it looks at the key again (else an
announcement could slip in between): ``watch()`` returns a future that the reader resolves when
Redis confirms that very SUBSCRIBE. Redis confirms the SUBSCRIBEs of a channel in the order they
were sent, so each channel keeps the futures of its unconfirmed ones in a queue.

When the connection fails, the subscriber dies: every watcher is woken with ``lost`` set, and
the cache makes a new subscriber for the next waiter. A connection that drops is not Redis being
down (Redis itself drops a subscriber that falls behind its ``client-output-buffer-limit
pubsub``, and CLIENT KILL drops any): the waiters watch again through the new subscriber, which
first lets the dead one give its connection back, so that the bound on connections holds.
Such a failure opens no breaker: a probe decides whether Redis is down. A SUBSCRIBE that goes
unconfirmed for ``timeout`` seconds gets its caller computing alone, and the subscriber is given
up if Redis answers a PING meanwhile (its connection is dead without having said so).

What is said on a key's channel (``News``) is defined here, once; the Lua scripts that announce
write the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from ._redis_conn import Connector, Link, Unavailable, kind_of_failure
from ._redis_log import Throttle, logger
from ._redis_stats import Counters

__all__ = ("Heard", "News", "Subscriber", "Subscriptions", "Watch", "hear")


class News(bytes, enum.Enum):
    """What a key's channel says: the first byte of every message published on it."""

    STORED = b"d"
    """The value is stored; the rest of the message, if any, is the stored entry itself."""
    UNCACHEABLE = b"u"
    """The value will not be stored: the waiters compute it at once, side by side."""
    FAILED = b"f"
    """The computation failed: the waiters look again, and one of them takes the lock."""
    LOOK_AGAIN = b"x"
    """The lock was released without a value (cancelled, deleted, cleared, lost): the waiters
    look again, and one of them takes the lock."""

    def with_entry(self, entry: bytes) -> bytes:
        """The message announcing STORED with the entry inline (waiters need not read it)."""
        return self.value + entry


class Heard(NamedTuple):
    """A message heard on a key's channel."""

    news: News
    entry: bytes
    """The stored entry sent along with STORED (b"" when it was too big to send)."""


def hear(payload: bytes | None) -> Heard | None:
    """Read a channel's message; None if it says nothing known."""
    if not payload:
        return None
    try:
        news = News(payload[:1])
    except ValueError:
        return None
    return Heard(news, payload[1:])


_SUBSCRIBE: Final = "SUBSCRIBE"
_UNSUBSCRIBE: Final = "UNSUBSCRIBE"
_READ_PERIOD: Final = 5.0
"""Seconds one read waits before the reader loops (older redis-py time out blocking reads)."""


class Watch:
    """One waiter's view of its channel: the latest message, and whether the connection died."""

    __slots__ = ("channel", "event", "lost", "payload", "waiting")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.event = asyncio.Event()
        """Set when a message arrives on the channel or the subscriber dies."""
        self.payload: bytes | None = None
        self.lost = False
        self.waiting = False
        """Whether the waiter found the key held and waits for news (rather than looking)."""

    def reset(self) -> None:
        """Forget the messages received so far (before looking at the key again)."""
        self.event.clear()
        self.payload = None


class _Channel:
    __slots__ = ("pending", "ready", "wanted", "watches")

    def __init__(self) -> None:
        self.watches: set[Watch] = set()
        self.pending: deque[asyncio.Future[bool]] = deque()
        """One future per SUBSCRIBE sent and not yet confirmed, oldest first."""
        self.ready: asyncio.Future[bool] | None = None
        """The confirmation of the SUBSCRIBE that the current watchers rely on."""
        self.wanted = False
        """Whether the last command queued for this channel is a SUBSCRIBE."""


class Subscriber:
    """The pub/sub connection of one RedisCache on one event loop."""

    __slots__ = (
        "_channels",
        "_closing",
        "_on_error",
        "_outbox",
        "_previous",
        "_pubsub",
        "_reader",
        "_sender",
        "_wake",
        "dead",
        "heard",
    )

    def __init__(
        self,
        pubsub: Any,
        on_error: Callable[[str, BaseException], None],
        previous: Subscriber | None = None,
    ) -> None:
        self._pubsub = pubsub
        self._previous = None if previous is None else previous._closing
        """The closing of the subscriber this one replaces: awaited before connecting."""
        self._on_error = on_error
        self._channels: dict[bytes, _Channel] = {}
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.dead = False
        self.heard = asyncio.get_running_loop().time()
        """When the connection last delivered something (loop time): a busy reader is alive."""
        self._sender: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._send()
        )

    @property
    def channels(self) -> int:
        """How many channels have watchers or unconfirmed subscriptions (for the tests)."""
        return len(self._channels)

    async def subscribed(self, ready: asyncio.Future[bool], seconds: float) -> bool | None:
        """Wait for a subscription's confirmation: True once in place, False if the subscriber
        died, None if the connection delivered nothing at all for seconds (Redis stalls, or the
        connection is dead). While the connection delivers, however slowly, this waits on."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not ready.done():
            quiet_since = max(self.heard, start)
            await asyncio.wait([ready], timeout=max(0.0, quiet_since + seconds - loop.time()))
            if not ready.done() and loop.time() - max(self.heard, start) >= seconds:
                return None
        return ready.result()

    def watch(self, channel: bytes) -> tuple[Watch, asyncio.Future[bool]]:
        """Start watching channel; the future resolves to True once the subscription is in
        place, or to False if the subscriber dies first."""
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
        watch = Watch(channel)
        ch.watches.add(watch)
        if self.dead:
            watch.lost = True
            watch.event.set()
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(False)
            return watch, done
        if not ch.wanted:
            ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            ch.pending.append(ready)
            ch.ready, ch.wanted = ready, True
            self._queue(_SUBSCRIBE, channel)
        assert ch.ready is not None
        return watch, ch.ready

    def unwatch(self, watch: Watch) -> None:
        """Stop watching; the last watcher of a channel has it unsubscribed."""
        ch = self._channels.get(watch.channel)
        if ch is None:
            return
        ch.watches.discard(watch)
        if ch.watches:
            return
        if ch.wanted and not self.dead:
            ch.wanted, ch.ready = False, None
            self._queue(_UNSUBSCRIBE, watch.channel)
        if not ch.pending:
            del self._channels[watch.channel]

    def _queue(self, command: str, channel: bytes) -> None:
        self._outbox.append((command, channel))
        self._wake.set()

    async def _send(self) -> None:
        """Send the queued commands in order, each run of one command as one command."""
        pubsub = self._pubsub
        try:
            previous, self._previous = self._previous, None
            if previous is not None:
                # Bounded by the previous subscriber's own timeouts (about 2 s at most). The
                # connection is quiet from now on only: the wait was this process's own.
                await asyncio.wait([previous])
                self.heard = asyncio.get_running_loop().time()
            # The dead flag is checked after every await: redis-py may swallow a cancellation.
            while not self.dead:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox and not self.dead:
                    command, channel = self._outbox.popleft()
                    batch = [channel]
                    while self._outbox and self._outbox[0][0] == command and len(batch) < 1000:
                        batch.append(self._outbox.popleft()[1])
                    if command == _SUBSCRIBE:
                        await pubsub.subscribe(*batch)
                    else:
                        await pubsub.unsubscribe(*batch)
                    if self._reader is None and not self.dead:
                        loop = asyncio.get_running_loop()
                        self._reader = loop.create_task(self._read())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._die("pub/sub SUBSCRIBE", exc)

    async def _read(self) -> None:
        """Hand every message to the watchers of its channel; resolve confirmations."""
        pubsub = self._pubsub
        channels = self._channels
        loop = asyncio.get_running_loop()
        try:
            while not self.dead:
                message = await pubsub.get_message(timeout=_READ_PERIOD)
                if message is None:
                    continue
                self.heard = loop.time()
                kind = message.get("type")
                if isinstance(kind, bytes):
                    kind = kind.decode()
                ch = channels.get(message.get("channel"))
                if ch is None:
                    continue
                if kind == "message":
                    data = message.get("data")
                    for watch in ch.watches:
                        watch.payload = data if isinstance(data, bytes) else None
                        watch.event.set()
                elif kind == "subscribe" and ch.pending:
                    ready = ch.pending.popleft()
                    if not ready.done():
                        ready.set_result(True)
                    if not ch.watches and not ch.pending:
                        del channels[message["channel"]]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._die("pub/sub read", exc)

    def _die(self, what: str, exc: BaseException | None) -> None:
        """Wake every watcher with ``lost`` set and close the connection in the background."""
        if self.dead:
            return
        self.dead = True
        for ch in self._channels.values():
            for watch in ch.watches:
                watch.lost = True
                watch.event.set()
            for ready in ch.pending:
                if not ready.done():
                    ready.set_result(False)
            ch.pending.clear()
        self._channels.clear()
        self._outbox.clear()
        if exc is not None:
            self._on_error(what, exc)
        self._closing = asyncio.get_running_loop().create_task(self._close())

    def kill(self) -> None:
        """Give up this subscriber (it no longer answers); the next waiter makes a new one."""
        self._die("pub/sub", None)

    async def _close(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in (self._sender, self._reader) if t is not None and t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task whose cancellation redis-py swallowed ends at its next check.
            await asyncio.wait(tasks, timeout=1.0)
        try:
            async with asyncio.timeout(1.0):
                await self._pubsub.aclose()
        except Exception as exc:
            logger.debug("RedisCache: closing a pub/sub connection failed: %r", exc)

    async def aclose(self) -> None:
        """Close the connection and end the tasks (watchers still waiting are woken)."""
        self._die("pub/sub", None)
        closing = self._closing
        if closing is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)

    def forget(self) -> None:
        """Drop this subscriber of an event loop that is gone, touching nothing of that loop."""
        self.dead = True
        self._channels.clear()
        self._outbox.clear()
        self._sender = self._reader = self._previous = None


class Subscriptions:
    """The subscriber of one RedisCache on the running loop, and its health: made when a
    waiter needs one, made anew after the last one died, given up when it stops answering."""

    __slots__ = ("_conn", "_counts", "_label", "_link", "_sub", "_throttle")

    def __init__(self, conn: Connector, counts: Counters, label: str) -> None:
        self._conn = conn
        self._counts = counts
        self._label = label
        self._throttle = Throttle()
        self._link: Link | None = None
        self._sub: Subscriber | None = None
        conn.attach(self)

    @property
    def current(self) -> Subscriber | None:
        """The latest subscriber made (maybe dead), or None (for the tests)."""
        return self._sub

    def subscriber(self) -> Subscriber:
        """This loop's subscriber, made if there is none (or the last one died).

        Raises:
            Unavailable: the breaker is open.
        """
        if self._conn.down:
            raise Unavailable("SUBSCRIBE")
        link = self._conn.link()
        sub = self._sub if self._link is link else None
        if sub is None or sub.dead:
            sub = Subscriber(link.client.pubsub(), self._failed, sub)
            self._link, self._sub = link, sub
        return sub

    def _failed(self, what: str, exc: BaseException) -> None:
        """The subscriber's connection failed: count and log it; a failure of the connection
        itself opens the breaker only if the probe finds Redis silent too."""
        kind = kind_of_failure(exc)
        if kind not in ("down", "timeout"):
            self._conn.failed(what, None, exc)
            return
        self._counts.redis_errors += 1
        self._throttle.log(
            "subscriber",
            "RedisCache %s: %s failed: %s; the callers waiting for other processes' "
            "computations subscribe again and wait on, and a PING checks that Redis answers",
            self._label,
            what,
            self._conn.secrets.describe(exc),
        )
        self._conn.start_probe()

    def timed_out(self, sub: Subscriber) -> None:
        """A SUBSCRIBE went unconfirmed for timeout seconds: Redis stalls, or the subscriber's
        connection is dead without having said so. Give it up only if Redis answers."""
        self._counts.redis_errors += 1
        self._throttle.log(
            "subscribe timeout",
            "RedisCache %s: Redis did not confirm a subscription within timeout=%.3g s; "
            "computing without waiting for this call",
            self._label,
            self._conn.timeout,
        )
        self._conn.spawn(self._check(sub))

    async def _check(self, sub: Subscriber) -> None:
        asked = asyncio.get_running_loop().time()
        try:
            await self._conn.call("PING", lambda link: link.client.ping(), urgent=True)
        except Unavailable:
            return  # Redis itself stalls; the subscriber may well recover with it
        if sub.heard < asked:
            sub.kill()  # Redis answers, but not on the subscriber's connection

    def forget(self, link: Link) -> None:
        """Drop the subscriber of a client made on another loop, touching nothing of it."""
        if self._link is link:
            sub, self._link, self._sub = self._sub, None, None
            if sub is not None:
                sub.forget()

    async def aclose(self, link: Link) -> None:
        """Close the subscriber of a client being closed (its waiters are woken)."""
        if self._link is link:
            sub, self._link, self._sub = self._sub, None, None
            if sub is not None:
                await sub.aclose()
