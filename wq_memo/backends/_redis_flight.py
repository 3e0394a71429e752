"""RedisCache's single-flight protocol: one computation of a key at a time across processes.

A call looks at the key and, if it is missing, tries to take its lease lock (one script, CLAIM):

- it finds the value: done;
- it takes the lock: it *holds* the key. It calls ``compute()``, renews the lease while that
  runs, then stores the value, releases the lock and announces the outcome on the key's channel
  (one script, FINISH, which stores only while this call's token still holds the lock and no
  ``clear()`` has begun since it was taken). That last write is retried until it lands or the
  lease is over, whatever the breaker says;
- another computation holds the lock: it *waits*. It watches the key's channel (through the
  cache's one subscriber), then looks again, then waits for an announcement or the end of the
  holder's lease, and looks again. Waiting takes none of the process's computation slots:
  ``compute()`` is called only by a call that computes.

Announcements: ``d`` (stored; followed by the value itself when it is small), ``u`` (the value
will not be stored: the waiters compute it at once, side by side), ``f`` (the computation
failed) and ``x`` (the lock was released without a value, or a holder found its lock gone and
nobody holding it): after those two the waiters look again, and one of them takes the lock.
A function whose results were found uncacheable is marked for a while: its waiters compute at
once instead of waiting.

A call that cannot use Redis (breaker open, an operation failed or timed out) computes on its
own and stores nothing: only a lock holder stores, so no computed value is written unfenced.
A primed value (``put``) goes through FINISH too: it is stored whoever holds the lock, and
removes the lock, so that no computation that began before it overwrites it.

A refresh (refresh-ahead) tries the lock once, without looking at the value: if it takes it, it
holds the key as above (the entry stays readable meanwhile, and is replaced by FINISH); if
another computation holds it, or Redis fails, it gives up at once, computing nothing.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeAlias, TypeVar

from ._protocol import MISSING, Missing
from ._redis_conn import Connector, Unavailable
from ._redis_keys import KeyNames
from ._redis_log import Throttle
from ._redis_pubsub import Subscriber, Watch
from ._redis_stats import Counters
from ._redis_values import Entries

__all__ = ("Flight",)

V = TypeVar("V")

Reason: TypeAlias = Literal["fallbacks", "wait_timeouts"] | None
"""Why a call computes without the lock, as counted in stats() (None: not counted)."""

_HIT: Final = 1
_TAKEN: Final = 2
_HELD: Final = 3
_TOO_BIG: Final = 4
_NOT_STRING: Final = 5

_INLINE_MAX: Final = 1024
"""Values up to this many bytes travel in the announcement itself: no read afterwards."""
_MARKER_MS: Final = 60_000
"""How long a function stays marked uncacheable after its last uncacheable result."""
_RESUBSCRIBE: Final = 3
"""How many subscriptions in a row may die unconfirmed before a call computes alone. One whose
connection drops after confirming it is watched again, up to the call's ``wait``."""


class _Lease:
    """When this holder's lease ends as far as it knows, whether it was found lost, and
    whether the computation has ended (its renewals stop)."""

    __slots__ = ("ended", "expires", "lost")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.lost = False
        self.ended = False


class Flight:
    """The single-flight protocol of one RedisCache (see the module docstring)."""

    __slots__ = (
        "_conn",
        "_counts",
        "_entries",
        "_epoch",
        "_exclusive",
        "_label",
        "_lease",
        "_lease_ms",
        "_throttle",
        "_ttl",
        "_wait",
    )

    def __init__(
        self,
        conn: Connector,
        entries: Entries,
        counts: Counters,
        *,
        lease: float,
        wait: float,
        ttl: float | None,
        single_flight: bool,
        label: str,
        epoch: bytes,
    ) -> None:
        self._conn = conn
        self._epoch = epoch
        self._entries = entries
        self._counts = counts
        self._lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._wait = wait
        self._ttl = ttl
        self._exclusive = single_flight
        self._label = label
        self._throttle = Throttle()

    async def get_or_compute(
        self, names: KeyNames, function: str, compute: Callable[[], Awaitable[V]]
    ) -> V:
        token = secrets.token_hex(16).encode()
        try:
            kind, payload, sent = await self._claim(names, token, True)
        except Unavailable:
            return await self._alone(compute, "fallbacks")
        if kind == _HIT:
            self._counts.hits += 1
            return payload  # type: ignore[no-any-return]
        if kind == _TAKEN:
            return await self._hold(names, function, token, compute, sent, payload)
        if payload[1]:  # the function's results are not stored these days: nobody waits
            return await self._alone(compute, None)
        return await self._wait_then_compute(names, function, token, compute)

    async def refresh(
        self, names: KeyNames, function: str, compute: Callable[[], Awaitable[V]]
    ) -> tuple[bool, V | Missing]:
        """Compute and store the key if its lock is free; never wait for another holder."""
        token = secrets.token_hex(16).encode()
        try:
            kind, epoch, sent = await self._claim(names, token, False)
        except Unavailable:
            return False, MISSING
        if kind != _TAKEN:
            self._counts.refresh_skipped += 1
            return False, MISSING
        return True, await self._hold(names, function, token, compute, sent, epoch)

    async def put(self, names: KeyNames, function: str, value: Any, ttl: float | None) -> None:
        """Store a primed value whoever holds the key's lock, release the lock and announce the
        value to the waiters: a computation under way, in any process, does not overwrite it.

        Raises Unavailable when Redis fails (logged and counted)."""
        data = self._entries.encode(names.value, function, value, ttl)
        if not isinstance(data, bytes):
            return  # logged and counted
        announce = b"d" + data if len(data) <= _INLINE_MAX else b"d"
        px = 0 if ttl is None else max(1, round(ttl * 1000))
        args: list[bytes | int] = [b"", b"p", data, px, names.channel, announce, _MARKER_MS, b""]
        keys = [names.value, names.lock, names.marker, self._epoch]
        await self._conn.call(
            "SET", lambda link: link.finish(keys=keys, args=[*args, b"0"]), name=names.value
        )

    # -- looking and claiming ----------------------------------------------------------------

    async def _claim(self, names: KeyNames, token: bytes, look: bool) -> tuple[int, Any, float]:
        """Read the value, or take the lock, or learn the holder's remaining lease.

        Returns (kind, payload, when sent): (_HIT, value), (_TAKEN, the namespace's epoch) or
        (_HELD, (pttl in ms, marked)). An entry that is refused is computed over.
        """
        loop = asyncio.get_running_loop()
        keys = [names.value, names.lock, names.marker, self._epoch]
        limit = self._entries.max_bytes
        exclusive = b"1" if self._exclusive else b"0"
        while True:
            args = [token, self._lease_ms, limit, b"1" if look else b"0", exclusive]
            sent = loop.time()
            reply = await self._conn.call(
                "lock",
                lambda link, a=args: link.claim(keys=keys, args=a),  # type: ignore[misc]
                name=names.value,
            )
            try:
                kind = int(reply[0])
                if kind == _HIT:
                    data = reply[1]
                    if not isinstance(data, bytes):
                        raise TypeError(data)
                    value = self._entries.decode(names.value, data)
                    if value is MISSING:
                        look = False  # a refused entry: compute over it, through the lock
                        continue
                    return kind, value, sent
                if kind == _TAKEN:
                    if int(reply[1]):
                        self._entries.refused(
                            names.lock, "a lock without expiry (or not a string) was replaced"
                        )
                    epoch = reply[2]
                    if not isinstance(epoch, bytes):
                        raise TypeError(epoch)
                    return kind, epoch, sent
                if kind == _HELD:
                    return kind, (int(reply[1]), bool(int(reply[2]))), sent
                if kind == _TOO_BIG:
                    self._entries.too_big(names.value, int(reply[1]))
                elif kind == _NOT_STRING:
                    self._entries.refused(names.value, "it is not a string")
                else:
                    raise ValueError(kind)
                look = False
            except (TypeError, ValueError, IndexError, KeyError) as exc:
                self._conn.failed("lock", names.value, ValueError(f"unexpected reply {reply!r}"))
                raise Unavailable("lock") from exc

    async def _alone(self, compute: Callable[[], Awaitable[V]], reason: Reason) -> V:
        """Compute without the lock; the value is not stored."""
        if reason == "fallbacks":
            self._counts.fallbacks += 1
        elif reason == "wait_timeouts":
            self._counts.wait_timeouts += 1
        self._counts.computed += 1
        return await compute()

    # -- holding -----------------------------------------------------------------------------

    async def _hold(
        self,
        names: KeyNames,
        function: str,
        token: bytes,
        compute: Callable[[], Awaitable[V]],
        sent: float,
        epoch: bytes,
    ) -> V:
        """Compute while holding the lock and renewing its lease; store, release, announce.

        ``epoch``: the namespace's epoch when the lock was taken; while a clear() that began
        later runs, the value is not stored."""
        self._counts.computed += 1
        loop = asyncio.get_running_loop()
        lease = _Lease(sent + self._lease)
        # A timer (cheaper than a task) starts the renewing task only for computations that
        # last a third of the lease.
        renewer: asyncio.Task[None] | None = None

        def start_renewing() -> None:
            nonlocal renewer
            renewer = loop.create_task(self._renew(names, token, lease))

        timer = loop.call_later(self._lease / 3, start_renewing)

        async def stop_renewing() -> None:
            timer.cancel()
            lease.ended = True
            if renewer is not None:
                renewer.cancel()
                # Waited for, not awaited: a cancellation of this caller still propagates,
                # where suppressing the renewer's CancelledError would swallow it too. (Then
                # nothing is stored and the waiters take over once the lease runs out.)
                await asyncio.wait([renewer])
                if not renewer.cancelled():
                    renewer.result()

        try:
            value = await compute()
        except BaseException as exc:
            await stop_renewing()
            cancelled = isinstance(exc, asyncio.CancelledError)
            # Waiters look again at once: one of them takes the lock.
            announce = b"x" if cancelled else b"f"
            await self._finish(names, token, epoch, b"n", b"", announce, lease)
            raise
        await stop_renewing()
        data = self._entries.encode(names.value, function, value, self._ttl)
        if isinstance(data, bytes):
            announce = b"d" + data if len(data) <= _INLINE_MAX else b"d"
            await self._finish(names, token, epoch, b"s", data, announce, lease)
        else:
            # Not stored: the waiters compute it themselves, at once and side by side. A value
            # of a type that cannot be stored marks the function, so that nobody waits next time.
            outcome = b"u" if data == "unencodable" else b"n"
            await self._finish(names, token, epoch, outcome, b"", b"u", lease)
        return value

    async def _renew(self, names: KeyNames, token: bytes, lease: _Lease) -> None:
        loop = asyncio.get_running_loop()
        # The flag is checked after every await: redis-py may swallow the cancellation that
        # stops this loop, which would then renew the lease of a finished computation forever.
        while not lease.ended:
            sent = loop.time()
            try:
                held = await self._conn.call(
                    "lease renewal",
                    lambda link: link.renew(keys=[names.lock], args=[token, self._lease_ms]),
                    name=names.value,
                    urgent=True,
                )
            except Unavailable:
                pass  # logged and counted; try again at the next period
            else:
                if lease.ended:
                    return
                if not int(held):
                    self._lost(names, lease, "renewing its lease")
                    return
                lease.expires = sent + self._lease
            await asyncio.sleep(self._lease / 3)

    def _lost(self, names: KeyNames, lease: _Lease, when: str) -> None:
        if not self._exclusive:
            return  # without single flight, the last computation to start is the one stored
        if not lease.lost:
            lease.lost = True
            self._counts.lock_lost += 1
        self._throttle.log(
            "lost",
            "RedisCache %s: the lock on %s was gone when %s (the lease of %.3g s ran out, the "
            "key was deleted or cleared, or Redis lost it); its result is not stored",
            self._label,
            names.value.decode("utf-8", "backslashreplace"),
            when,
            self._lease,
        )

    async def _finish(
        self,
        names: KeyNames,
        token: bytes,
        epoch: bytes,
        outcome: bytes,
        data: bytes,
        announce: bytes,
        lease: _Lease,
    ) -> None:
        """Store (per outcome), release the lock and announce.

        The first attempt is made here. If it fails, the caller gets its value (or exception)
        at once, and the attempts go on in the background until one lands or the lease ends;
        they ignore the breaker. An attempt that timed out may still run in Redis later; the
        script tells such a repeat from a lost lock.
        """
        px = 0 if self._ttl is None else max(1, round(self._ttl * 1000))
        args: list[bytes | int] = [token, outcome, data, px, names.channel, announce, _MARKER_MS]
        args.append(epoch)
        if await self._finish_once(names, args, b"0", lease) or announce == b"x":
            return  # done, or a cancelled computation: its lock simply runs out
        self._conn.spawn(self._finish_later(names, args, lease))

    async def _finish_once(
        self, names: KeyNames, args: list[bytes | int], again: bytes, lease: _Lease
    ) -> bool:
        """One attempt of FINISH; return whether it landed (lost lock included)."""
        keys = [names.value, names.lock, names.marker, self._epoch]
        storing = args[1] == b"s"
        try:
            result = await self._conn.call(
                "store and unlock" if storing else "unlock",
                lambda link: link.finish(keys=keys, args=[*args, again]),
                name=names.value,
                urgent=True,
            )
        except Unavailable:
            return False
        if storing and result == 0:
            self._lost(names, lease, "storing its result")
        return True

    async def _finish_later(self, names: KeyNames, args: list[bytes | int], lease: _Lease) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.02
        while loop.time() + delay < lease.expires:
            await asyncio.sleep(delay)
            if await self._finish_once(names, args, b"1", lease):
                return
            delay = min(delay * 2, self._conn.timeout / 2)
        self._throttle.log(
            "finish",
            "RedisCache %s: Redis did not take the result of %s before its lease ran out; it is "
            "not stored, and the waiters compute it again",
            self._label,
            names.value.decode("utf-8", "backslashreplace"),
        )

    # -- waiting -----------------------------------------------------------------------------

    async def _wait_then_compute(
        self, names: KeyNames, function: str, token: bytes, compute: Callable[[], Awaitable[V]]
    ) -> V:
        """Wait for the holder's announcement; then take the value, or compute it."""
        deadline = asyncio.get_running_loop().time() + self._wait
        unconfirmed = 0
        while unconfirmed < _RESUBSCRIBE:
            try:
                sub = self._conn.subscriber()
            except Unavailable:
                break
            watch, ready = sub.watch(names.channel)
            try:
                what, detail = await self._watch(names, token, sub, watch, ready, deadline)
            finally:
                sub.unwatch(watch)
            if what == "value":
                self._counts.waited += 1
                return detail  # type: ignore[no-any-return]
            if what == "hold":
                sent, epoch = detail
                return await self._hold(names, function, token, compute, sent, epoch)
            if what == "alone":
                return await self._alone(compute, detail)
            # "again": the subscriber died; watch through a new one. A connection that dropped
            # after it had worked is no reason to stop waiting (the holder computes on).
            unconfirmed = 0 if detail else unconfirmed + 1
        return await self._alone(compute, "fallbacks")

    async def _watch(
        self,
        names: KeyNames,
        token: bytes,
        sub: Subscriber,
        watch: Watch,
        ready: asyncio.Future[bool],
        deadline: float,
    ) -> tuple[str, Any]:
        """Wait through one subscriber. Returns ("value", value), ("hold", (when the lock was
        taken, the epoch then)), ("alone", the counter to count) or ("again", whether the
        subscription had been confirmed) if the subscriber died."""
        loop = asyncio.get_running_loop()
        confirmed = await sub.subscribed(ready, self._conn.timeout)
        if confirmed is None:
            self._conn.subscription_timed_out(sub)
            return "alone", "fallbacks"
        if not confirmed:
            return "again", False
        # Subscribed first, then looked: an announcement cannot slip in between.
        while True:
            watch.reset()
            try:
                kind, payload, sent = await self._claim(names, token, True)
            except Unavailable:
                return "alone", "fallbacks"
            if kind == _HIT:
                return "value", payload
            if kind == _TAKEN:
                return "hold", (sent, payload)
            pttl, marked = payload
            if marked:
                return "alone", None
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._throttle.log(
                    "wait",
                    "RedisCache %s: waited %.3g s for another process to compute %s; computing "
                    "it here (raise wait= if computations take that long)",
                    self._label,
                    self._wait,
                    names.value.decode("utf-8", "backslashreplace"),
                )
                return "alone", "wait_timeouts"
            # No announcement comes if the holder died: look again when its lease ends.
            nap = remaining if pttl < 0 else min(remaining, pttl / 1000 + 0.01)
            watch.waiting = True
            try:
                async with asyncio.timeout(nap):
                    await watch.event.wait()
            except TimeoutError:
                pass
            finally:
                watch.waiting = False
            if watch.lost:
                return "again", True
            news = watch.payload
            if news is not None and news[:1] == b"d" and len(news) > 1:
                value = self._entries.decode(names.value, news[1:])
                if value is not MISSING:
                    return "value", value
            elif news == b"u":
                return "alone", None
