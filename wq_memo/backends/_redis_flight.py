"""RedisCache's single-flight protocol: one computation of a key at a time across processes.

A call looks at the key and, if it is missing, tries to take its lease lock (one script, CLAIM):

- it finds the value: done;
- it takes the lock: it *holds* the key. It calls ``compute()``, renews the lease while that
  runs (RENEW), then stores the value, releases the lock and announces the outcome on the key's
  channel (one script, FINISH, which stores only while this call's token still holds the lock
  and no ``clear()`` has begun since it was taken). That last write is retried until it lands
  or the lease is over, whatever the breaker says;
- another computation holds the lock: it *waits*. It watches the key's channel (through the
  cache's one subscriber), then looks again, then waits for an announcement or the end of the
  holder's lease, and looks again. Waiting takes none of the process's computation slots:
  ``compute()`` is called only by a call that computes.

Announcements (``News``, defined with the subscriber): STORED (followed by the entry itself
when it is small), UNCACHEABLE (the waiters compute it at once, side by side), FAILED and
LOOK_AGAIN (the lock was released without a value, or a holder found its lock gone and nobody
holding it): after those two the waiters look again, and one of them takes the lock. A function
whose results were found uncacheable is marked for a while: its waiters compute at once
instead of waiting.

A call that cannot use Redis (breaker open, an operation failed or timed out) computes on its
own and stores nothing: only a lock holder stores, so no computed value is written unfenced.
A primed value (``put``) goes through FINISH too: it is stored whoever holds the lock, and
removes the lock, so that no computation that began before it overwrites it.

A refresh (refresh-ahead) tries the lock once, without looking at the value: if it takes it, it
holds the key as above (the entry stays readable meanwhile, and is replaced by FINISH); if
another computation holds it, or Redis fails, it gives up at once, computing nothing.

Fencing. Every write of a value goes through FINISH. A computed value is tied to the lock it
was computed under: FINISH stores it only while the computation's token still holds the lock, so
a holder whose lease ran out or whose key was deleted (DELETE removes the lock too) never
overwrites a later value. A clear cannot remove every lock at once (it scans): while it runs,
the namespace's epoch is set, and FINISH stores only a computation that took its lock under
that very epoch; once the clear has ended (and removed the epoch, CLEARED), every lock taken
before it is gone.

The scripts are registered on each client the protocol runs on (redis-py sends EVALSHA, and the
script itself when Redis does not know it); each one runs atomically in Redis. Their texts, keys
and replies are the wire format shared with every other process using the namespace.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, NamedTuple, TypeAlias, TypeVar

from redis.asyncio import Redis

from ._protocol import MISSING, Lifetime, Missing
from ._redis_conn import Connector, Link, Unavailable
from ._redis_keys import KeyNames, Namespace
from ._redis_log import Throttle, logger
from ._redis_pubsub import News, Subscriber, Subscriptions, Watch, hear
from ._redis_stats import Counters
from ._redis_values import Entries

__all__ = ("MAX_EXPIRY", "Alone", "Held", "Hit", "Lease", "Outcome", "SingleFlight", "Taken")

V = TypeVar("V")

Reason: TypeAlias = Literal["fallbacks", "wait_timeouts"] | None
"""Why a call computes without the lock, as counted in stats() (None: not counted)."""

MAX_EXPIRY: Final = 9.2e15
"""The most seconds a ttl or a lease may last (about 290 million years).

Redis keeps a key's expiry as milliseconds since the epoch in a signed 64-bit integer: it
refuses a SET PX or PEXPIRE that would take it past 2**63 - 1 ms, about 9.2234e15 s after the
epoch ("invalid expire time"). Signed entries carry their expiry as 8 unsigned bytes of ms since
the epoch, which holds twice that. This bound stays below Redis's for some 700,000 years. A
per-entry lifetime past it (``lifetime``, the policy's ttl: inf, 1e300) is an entry without
expiry, as it is in a dict."""

_INLINE_MAX: Final = 1024
"""Values up to this many bytes travel in the announcement itself: no read afterwards."""
_MARKER_MS: Final = 60_000
"""How long a function stays marked uncacheable after its last uncacheable result."""
_EPOCH_MS: Final = 600_000
"""How long a clear's epoch lives unless the clear removes it first (each batch the clear
removes renews it). A clear that outlives it would no longer fence the computations under way."""
_RESUBSCRIBE: Final = 3
"""How many subscriptions in a row may die unconfirmed before a call computes alone. One whose
connection drops after confirming it is watched again, up to the call's ``wait``."""


# -- CLAIM: look at the value, or take the lock -------------------------------------------------

_CLAIM: Final = """
-- KEYS: value, lock, marker, epoch.
-- ARGV: token, lease in ms, max value bytes, '1' to look at the value first,
--       '1' to take the lock only if it is free (single flight), '0' to take it anyway.
-- Replies:
--   {1, value}          the value is stored (and no larger than max value bytes)
--   {2, replaced, epoch} token now holds the lock; replaced = 1 if a foreign lock was removed;
--                       epoch: the namespace's epoch now ('' when no clear runs)
--   {3, pttl, marked}   another computation holds the lock for pttl more ms; marked = 1 if
--                       the function's results were lately found uncacheable
--   {4, size}           the stored value is larger than max value bytes (it was not read)
--   {5}                 the value's name holds something that is not a string
if ARGV[4] == '1' then
  local size = redis.pcall('STRLEN', KEYS[1])
  if type(size) == 'table' then return {5} end
  if size > tonumber(ARGV[3]) then return {4, size} end
  if size > 0 then return {1, redis.call('GET', KEYS[1])} end
end
local replaced = 0
local ttl = redis.call('PTTL', KEYS[2])
-- A lock never lives without expiry, and always holds a string: anything else was written by
-- something else, and would block every caller for ever.
if ttl == -1 or (ttl > 0 and redis.call('TYPE', KEYS[2])['ok'] ~= 'string') then
  redis.call('DEL', KEYS[2])
  replaced = 1
end
local epoch = redis.call('GET', KEYS[4]) or ''
if ARGV[5] == '1' then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, replaced, epoch} end
  return {3, redis.call('PTTL', KEYS[2]), redis.call('EXISTS', KEYS[3])}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {2, replaced, epoch}
"""


class Claimed(enum.IntEnum):
    """The first element of CLAIM's reply (see the script)."""

    HIT = 1
    TAKEN = 2
    HELD = 3
    TOO_BIG = 4
    NOT_STRING = 5


class Hit(NamedTuple):
    """The value was found (by CLAIM, or in an announcement)."""

    value: Any


class Taken(NamedTuple):
    """This call's token holds the lock."""

    sent: float
    """When the CLAIM that took it was sent (loop time): the lease runs from then."""
    epoch: bytes
    """The namespace's epoch then (b"" when no clear ran), which FINISH is given back."""


class Held(NamedTuple):
    """Another computation holds the lock."""

    pttl: int
    """Milliseconds its lease has left (negative: the lock went meanwhile)."""
    marked: bool
    """Whether the function's results were lately found uncacheable (nobody waits then)."""


# -- RENEW: extend the lease of a lock still held -------------------------------------------------

_RENEW: Final = """
-- KEYS: lock. ARGV: token, lease in ms. Extends the lease only if token still holds the lock;
-- returns 1 if it did, else 0.
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# -- FINISH: store (fenced), release the lock, announce -------------------------------------------

_FINISH: Final = """
-- KEYS: value, lock, marker, epoch.
-- ARGV: token, outcome ('s': store the computed value; 'u': uncacheable, mark the function;
--       'n': nothing to store; 'p': store a primed value), value, ttl in ms (0: none), channel,
--       message, marker lifetime in ms, the namespace's epoch when the lock was taken,
--       '1' if an earlier attempt of this same finish may have run already.
-- 'p' stores whoever holds the lock, deletes the lock (so that the computation under way does
-- not overwrite the primed value), announces message and returns 1.
-- Otherwise, if token holds the lock and no clear runs that began after the lock was taken (the
-- epoch is unset, or the one the lock was taken under): stores per outcome, deletes the lock,
-- announces message on channel and returns 1. If token holds the lock but such a clear runs:
-- stores nothing, deletes the lock, announces 'x' (the waiters look again) and returns 0. If
-- token does not hold it: stores nothing and returns 2 if the value stored is this very value
-- (an earlier attempt ran), else 0 (the lock was lost); a lost lock that nobody holds now
-- (flushed, evicted, expired) is announced as 'x', so that the waiters look again at once
-- instead of sleeping out the lease they last saw.
local store = ARGV[2] == 's' or ARGV[2] == 'p'
if ARGV[2] == 'u' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[7])
end
if ARGV[2] ~= 'p' then
  if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then
    if ARGV[9] == '1' and store and redis.pcall('GET', KEYS[1]) == ARGV[3] then
      return 2
    end
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('PUBLISH', ARGV[5], 'x')
    end
    return 0
  end
  local epoch = redis.call('GET', KEYS[4])
  if epoch and epoch ~= ARGV[8] then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[5], 'x')
    return 0
  end
end
if store then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


class Outcome(bytes, enum.Enum):
    """What FINISH is asked to store (its second argument)."""

    STORE = b"s"
    """Store the computed value, if the lock is still this computation's."""
    UNCACHEABLE = b"u"
    """Store nothing; mark the function uncacheable for a while."""
    NOTHING = b"n"
    """Store nothing (the computation failed, or its value is not stored)."""
    PRIME = b"p"
    """Store a primed value whoever holds the lock, and remove the lock."""


class Finished(enum.IntEnum):
    """FINISH's reply (see the script)."""

    LOST = 0
    """Nothing stored: the lock was not this token's, or a later clear runs."""
    DONE = 1
    """Stored per the outcome, lock released, message announced."""
    REPEATED = 2
    """An earlier attempt of this very finish had landed already."""


# -- DELETE and CLEARED: a deletion and a clear fence the computations under way ------------------

_DELETE: Final = """
-- KEYS: value, lock. ARGV: channel. Removes the value and the lock, so that a computation under
-- way cannot store its result, and wakes the waiters (to compute afresh). Returns whether a
-- value was removed.
local removed = redis.call('DEL', KEYS[1])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[1], 'x')
end
return removed
"""

_CLEARED: Final = """
-- KEYS: epoch. ARGV: the epoch a clear set as it began. At its end, the clear removes the epoch
-- (every lock taken before it is gone by then), unless a later clear has set another. Returns
-- whether it removed it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Scripts:
    """The protocol's scripts, registered on one client."""

    __slots__ = ("claim", "cleared", "client", "delete", "finish", "renew")

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.claim = client.register_script(_CLAIM)
        self.renew = client.register_script(_RENEW)
        self.finish = client.register_script(_FINISH)
        self.delete = client.register_script(_DELETE)
        self.cleared = client.register_script(_CLEARED)


class Lease:
    """When this holder's lease ends as far as it knows, whether it was found lost, and
    whether the computation has ended (its renewals stop)."""

    __slots__ = ("ended", "expires", "lost")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.lost = False
        self.ended = False


class Alone(NamedTuple):
    """Compute without the lock, storing nothing (and count why: ``counted``)."""

    reason: Reason


class _Again(NamedTuple):
    """The subscriber died: watch through a new one."""

    confirmed: bool
    """Whether the subscription had been confirmed (a working connection that dropped)."""


def _announce_stored(data: bytes) -> bytes:
    """The STORED message for an entry: the entry goes along when it is small."""
    return News.STORED.with_entry(data) if len(data) <= _INLINE_MAX else News.STORED.value


class SingleFlight:
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
        "_ns",
        "_scripts",
        "_subs",
        "_throttle",
        "_ttl",
        "_wait",
    )

    def __init__(
        self,
        conn: Connector,
        subs: Subscriptions,
        entries: Entries,
        counts: Counters,
        *,
        lease: float,
        wait: float,
        ttl: float | None,
        single_flight: bool,
        label: str,
        namespace: Namespace,
    ) -> None:
        self._conn = conn
        self._subs = subs
        self._ns = namespace
        self._epoch = namespace.epoch
        self._entries = entries
        self._counts = counts
        self._lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._wait = wait
        self._ttl = ttl
        self._exclusive = single_flight
        self._label = label
        self._throttle = Throttle()
        self._scripts: Scripts | None = None

    @property
    def conn(self) -> Connector:
        return self._conn

    @property
    def counts(self) -> Counters:
        return self._counts

    @property
    def lease(self) -> float:
        """Seconds a lock lives without renewal."""
        return self._lease

    @property
    def lease_ms(self) -> int:
        return self._lease_ms

    def scripts(self, link: Link) -> Scripts:
        """The scripts registered on link's client (registered on first use)."""
        scripts = self._scripts
        if scripts is None or scripts.client is not link.client:
            scripts = self._scripts = Scripts(link.client)
        return scripts

    async def get_or_compute(
        self,
        names: KeyNames,
        function: str,
        compute: Callable[[], Awaitable[V]],
        lifetime: Lifetime | None = None,
        usable: Callable[[Any], bool] | None = None,
    ) -> V:
        """``usable(value)``: whether a value found answers the call (a policy's entry past
        its expiry does not: the key is computed through its lock as if missing)."""
        token = secrets.token_hex(16).encode()
        try:
            claimed = await self.claim(names, token, True, usable)
        except Unavailable:
            return await self._alone(compute, "fallbacks")
        if isinstance(claimed, Hit):
            self._counts.hits += 1
            return claimed.value  # type: ignore[no-any-return]
        if isinstance(claimed, Taken):
            return await self._hold(names, function, token, compute, claimed, lifetime)
        if claimed.marked:  # the function's results are not stored these days: nobody waits
            return await self._alone(compute, None)
        return await self._wait_then_compute(names, function, token, compute, lifetime, usable)

    async def refresh(
        self,
        names: KeyNames,
        function: str,
        compute: Callable[[], Awaitable[V]],
        lifetime: Lifetime | None = None,
    ) -> tuple[bool, V | Missing]:
        """Compute and store the key if its lock is free; never wait for another holder."""
        token = secrets.token_hex(16).encode()
        try:
            claimed = await self.claim(names, token, False)
        except Unavailable:
            return False, MISSING
        if not isinstance(claimed, Taken):
            self._counts.refresh_skipped += 1
            return False, MISSING
        return True, await self._hold(names, function, token, compute, claimed, lifetime)

    async def put(self, names: KeyNames, function: str, value: Any, ttl: float | None) -> None:
        """Store a primed value whoever holds the key's lock, release the lock and announce the
        value to the waiters: a computation under way, in any process, does not overwrite it.

        Raises Unavailable when Redis fails (logged and counted)."""
        data = self._entries.encode(names.value, function, value, ttl)
        if not isinstance(data, bytes):
            return  # logged and counted
        px = 0 if ttl is None else max(1, round(ttl * 1000))
        args: list[bytes | int] = [
            b"",
            Outcome.PRIME.value,
            data,
            px,
            names.channel,
            _announce_stored(data),
            _MARKER_MS,
            b"",
            b"0",
        ]
        keys = [names.value, names.lock, names.marker, self._epoch]
        await self._conn.call(
            "SET",
            lambda link: self.scripts(link).finish(keys=keys, args=args),
            name=names.value,
        )

    async def delete(self, names: KeyNames) -> bool:
        """Remove the key's value and lock (a computation under way stores nothing), wake its
        waiters; return whether a value was removed.

        Raises Unavailable when Redis fails (logged and counted)."""
        removed = await self._conn.call(
            "DELETE",
            lambda link: self.scripts(link).delete(
                keys=[names.value, names.lock], args=[names.channel]
            ),
            name=names.value,
        )
        return bool(removed)

    async def clear(self) -> None:
        """Remove every value and lock of the namespace, fencing the computations under way:
        set the epoch, scan and unlink (waking each lock's waiters), remove the epoch.

        When Redis fails the clear stops there, and says so at WARNING (the failure itself is
        logged and counted too); the epoch it set expires on its own.
        """
        try:
            await self._clear()
        except Unavailable as exc:
            logger.warning(
                "RedisCache %s: clear() did not complete (%s failed): entries of the namespace "
                "may remain, and computations that began before it may still store their "
                "results; call clear() again once Redis answers",
                self._label,
                exc,
            )

    async def _clear(self) -> None:
        ns = self._ns
        epoch = secrets.token_hex(8).encode()
        # The epoch expires, so that a clear that Redis stops midway leaves nothing for ever;
        # each batch the clear removes gives it its full lifetime again.
        await self._conn.call(
            "SET",
            lambda link: link.client.set(ns.epoch, epoch, px=_EPOCH_MS),
            name=ns.epoch,
        )
        pattern = ns.pattern()
        lock_kind = ns.prefix + b":l:"
        cursor: int = 0

        async def batch(link: Link, names: list[bytes]) -> None:
            pipe = link.client.pipeline(transaction=False)
            pipe.unlink(*names)
            pipe.pexpire(ns.epoch, _EPOCH_MS)
            for name in names:
                if name.startswith(lock_kind):
                    pipe.publish(ns.channel_of_lock(name), News.LOOK_AGAIN.value)
            await pipe.execute()

        while True:
            cursor, names = await self._conn.call(
                "SCAN",
                lambda link, at=cursor: link.client.scan(at, match=pattern, count=1000),  # type: ignore[misc]
            )
            if names:
                await self._conn.call("UNLINK", lambda link, n=names: batch(link, n))  # type: ignore[misc]
            if not cursor:
                break
        await self._conn.call(
            "DELETE",
            lambda link: self.scripts(link).cleared(keys=[ns.epoch], args=[epoch]),
            name=ns.epoch,
        )

    # -- looking and claiming ----------------------------------------------------------------

    async def claim(
        self,
        names: KeyNames,
        token: bytes,
        look: bool,
        usable: Callable[[Any], bool] | None = None,
    ) -> Hit | Taken | Held:
        """Read the value, or take the lock, or learn the holder's remaining lease.

        An entry that is refused, or that is not ``usable``, is computed over.
        """
        loop = asyncio.get_running_loop()
        keys = self.claim_keys(names)
        while True:
            args = self.claim_args(token, look)
            sent = loop.time()
            reply = await self._conn.call(
                "lock",
                lambda link, a=args: self.scripts(link).claim(keys=keys, args=a),  # type: ignore[misc]
                name=names.value,
            )
            try:
                claimed = self.claimed(names, reply, sent, usable)
            except (TypeError, ValueError, IndexError, KeyError) as exc:
                self._conn.failed("lock", names.value, ValueError(f"unexpected reply {reply!r}"))
                raise Unavailable("lock") from exc
            if claimed is not None:
                return claimed
            look = False  # a refused entry: compute over it, through the lock

    def claim_args(self, token: bytes, look: bool) -> list[bytes | int]:
        """CLAIM's arguments after the keys (see the script)."""
        exclusive = b"1" if self._exclusive else b"0"
        limit = self._entries.max_bytes
        return [token, self._lease_ms, limit, b"1" if look else b"0", exclusive]

    def claim_keys(self, names: KeyNames) -> list[bytes]:
        """CLAIM's and FINISH's keys."""
        return [names.value, names.lock, names.marker, self._epoch]

    def claimed(
        self,
        names: KeyNames,
        reply: Any,
        sent: float,
        usable: Callable[[Any], bool] | None = None,
    ) -> Hit | Taken | Held | None:
        """What CLAIM's reply says (``sent``: when it was sent, loop time); None: the entry
        found was refused (logged and counted), or is not ``usable``: claim again without
        looking at it (it is computed over, through the lock).

        Raises TypeError, ValueError, IndexError or KeyError on a reply of another shape."""
        kind = Claimed(int(reply[0]))
        if kind is Claimed.HIT:
            data = reply[1]
            if not isinstance(data, bytes):
                raise TypeError(data)
            value = self._entries.decode(names.value, data)
            if value is MISSING or (usable is not None and not usable(value)):
                return None
            return Hit(value)
        if kind is Claimed.TAKEN:
            if int(reply[1]):
                self._entries.refused(
                    names.lock, "a lock without expiry (or not a string) was replaced"
                )
            epoch = reply[2]
            if not isinstance(epoch, bytes):
                raise TypeError(epoch)
            return Taken(sent, epoch)
        if kind is Claimed.HELD:
            return Held(int(reply[1]), bool(int(reply[2])))
        if kind is Claimed.TOO_BIG:
            self._entries.too_big(names.value, int(reply[1]))
        else:
            self._entries.refused(names.value, "it is not a string")
        return None

    async def _alone(self, compute: Callable[[], Awaitable[V]], reason: Reason) -> V:
        """Compute without the lock; the value is not stored."""
        self.computes_alone(reason)
        return await compute()

    def computes_alone(self, reason: Reason, keys: int = 1) -> None:
        """Count keys computed without the lock, and why."""
        if reason == "fallbacks":
            self._counts.fallbacks += keys
        elif reason == "wait_timeouts":
            self._counts.wait_timeouts += keys
        self._counts.computed += keys

    # -- holding -----------------------------------------------------------------------------

    async def _hold(
        self,
        names: KeyNames,
        function: str,
        token: bytes,
        compute: Callable[[], Awaitable[V]],
        taken: Taken,
        lifetime: Lifetime | None = None,
    ) -> V:
        """Compute while holding the lock and renewing its lease; store, release, announce.

        ``taken.epoch``: the namespace's epoch when the lock was taken; while a clear() that
        began later runs, the value is not stored. ``lifetime(value)``: whether to store the
        value, and for how long (None: the cache's ttl); a value not to be stored is handed to
        the waiters as one that cannot be stored is (they compute it themselves)."""
        self._counts.computed += 1
        loop = asyncio.get_running_loop()
        epoch = taken.epoch
        lease = Lease(taken.sent + self._lease)
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
            news = News.LOOK_AGAIN if cancelled else News.FAILED
            await self._finish(names, token, epoch, Outcome.NOTHING, b"", news.value, lease)
            raise
        await stop_renewing()
        outcome, data, announce, ttl = self.ending(names, function, value, lifetime)
        await self._finish(names, token, epoch, outcome, data, announce, lease, ttl)
        return value

    def ending(
        self, names: KeyNames, function: str, value: Any, lifetime: Lifetime | None
    ) -> tuple[Outcome, bytes, bytes, float | None]:
        """How FINISH ends a computation of the key that gave value: (outcome, the entry,
        the announcement, its ttl). A value not to be stored (``lifetime``) or that cannot be
        stored is handed to the waiters as uncacheable (they compute it themselves)."""
        ttl = self._ttl
        if lifetime is not None:
            try:
                keep, seconds = lifetime(value)
            except Exception:
                logger.exception("RedisCache %s: lifetime(result) failed", self._label)
                keep, seconds = False, None
            if not keep:
                return Outcome.NOTHING, b"", News.UNCACHEABLE.value, ttl
            if seconds is not None:
                # Past what Redis keeps (inf included): kept until Redis evicts it.
                ttl = seconds if seconds <= MAX_EXPIRY else None
        data = self._entries.encode(names.value, function, value, ttl)
        if isinstance(data, bytes):
            return Outcome.STORE, data, _announce_stored(data), ttl
        # Not stored: the waiters compute it themselves, at once and side by side. A value of a
        # type that cannot be stored marks the function, so that nobody waits next time.
        outcome = Outcome.UNCACHEABLE if data == "unencodable" else Outcome.NOTHING
        return outcome, b"", News.UNCACHEABLE.value, ttl

    async def _renew(self, names: KeyNames, token: bytes, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        # The flag is checked after every await: redis-py may swallow the cancellation that
        # stops this loop, which would then renew the lease of a finished computation forever.
        while not lease.ended:
            sent = loop.time()
            try:
                held = await self._conn.call(
                    "lease renewal",
                    lambda link: self.scripts(link).renew(
                        keys=[names.lock], args=[token, self._lease_ms]
                    ),
                    name=names.value,
                    urgent=True,
                )
            except Unavailable:
                pass  # logged and counted; try again at the next period
            else:
                if lease.ended:
                    return
                if not int(held):
                    self.lost(names, lease, "renewing its lease")
                    return
                lease.expires = sent + self._lease
            await asyncio.sleep(self._lease / 3)

    def lost(self, names: KeyNames, lease: Lease, when: str) -> None:
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
        outcome: Outcome,
        data: bytes,
        announce: bytes,
        lease: Lease,
        ttl: float | Missing | None = MISSING,
    ) -> None:
        """Store (per outcome) for ttl seconds (None: no expiry; default: the cache's ttl),
        release the lock and announce.

        The first attempt is made here. If it fails, the caller gets its value (or exception)
        at once, and the attempts go on in the background until one lands or the lease ends;
        they ignore the breaker. An attempt that timed out may still run in Redis later; the
        script tells such a repeat from a lost lock.
        """
        args = self.finish_args(names, token, epoch, outcome, data, announce, ttl)
        if await self._finish_once(names, args, b"0", lease) or announce == News.LOOK_AGAIN:
            return  # done, or a cancelled computation: its lock simply runs out
        self.finish_later(names, args, lease)

    def finish_args(
        self,
        names: KeyNames,
        token: bytes,
        epoch: bytes,
        outcome: Outcome,
        data: bytes,
        announce: bytes,
        ttl: float | Missing | None = MISSING,
    ) -> list[bytes | int]:
        """FINISH's arguments after the keys, but the last (whether it is a repeat)."""
        if ttl is MISSING:
            ttl = self._ttl
        px = 0 if ttl is None else max(1, round(ttl * 1000))
        return [token, outcome.value, data, px, names.channel, announce, _MARKER_MS, epoch]

    def finish_later(self, names: KeyNames, args: list[bytes | int], lease: Lease) -> None:
        """A FINISH that did not land: retried in the background until it lands or the lease
        ends, whatever the breaker says."""
        self._conn.spawn(self._finish_later(names, args, lease))

    def finished(self, names: KeyNames, args: list[bytes | int], result: Any, lease: Lease) -> None:
        """FINISH's reply to a store: a lost lock is counted and logged."""
        if args[1] == Outcome.STORE.value and result == Finished.LOST:
            self.lost(names, lease, "storing its result")

    async def _finish_once(
        self, names: KeyNames, args: list[bytes | int], again: bytes, lease: Lease
    ) -> bool:
        """One attempt of FINISH; return whether it landed (lost lock included)."""
        keys = [names.value, names.lock, names.marker, self._epoch]
        storing = args[1] == Outcome.STORE
        try:
            result = await self._conn.call(
                "store and unlock" if storing else "unlock",
                lambda link: self.scripts(link).finish(keys=keys, args=[*args, again]),
                name=names.value,
                urgent=True,
            )
        except Unavailable:
            return False
        if storing:
            self.finished(names, args, result, lease)
        return True

    async def _finish_later(self, names: KeyNames, args: list[bytes | int], lease: Lease) -> None:
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
        self,
        names: KeyNames,
        function: str,
        token: bytes,
        compute: Callable[[], Awaitable[V]],
        lifetime: Lifetime | None,
        usable: Callable[[Any], bool] | None = None,
    ) -> V:
        """Wait for the holder's announcement; then take the value, or compute it."""
        turn = await self.wait_turn(names, token, usable)
        if isinstance(turn, Hit):
            return turn.value  # type: ignore[no-any-return]
        if isinstance(turn, Taken):
            return await self._hold(names, function, token, compute, turn, lifetime)
        return await self._alone(compute, turn.reason)

    async def wait_turn(
        self, names: KeyNames, token: bytes, usable: Callable[[Any], bool] | None = None
    ) -> Hit | Taken | Alone:
        """Wait for the holder of the key's lock to finish: its value (counted as waited
        for), the lock taken with token (the holder gave up), or a reason to compute alone."""
        deadline = asyncio.get_running_loop().time() + self._wait
        unconfirmed = 0
        while unconfirmed < _RESUBSCRIBE:
            try:
                sub = self._subs.subscriber()
            except Unavailable:
                break
            watch, ready = sub.watch(names.channel)
            try:
                outcome = await self._watch(names, token, sub, watch, ready, deadline, usable)
            finally:
                sub.unwatch(watch)
            if isinstance(outcome, Hit):
                self._counts.waited += 1
                return outcome
            if not isinstance(outcome, _Again):
                return outcome
            # The subscriber died; watch through a new one. A connection that dropped after it
            # had worked is no reason to stop waiting (the holder computes on).
            unconfirmed = 0 if outcome.confirmed else unconfirmed + 1
        return Alone("fallbacks")

    async def _watch(
        self,
        names: KeyNames,
        token: bytes,
        sub: Subscriber,
        watch: Watch,
        ready: asyncio.Future[bool],
        deadline: float,
        usable: Callable[[Any], bool] | None = None,
    ) -> Hit | Taken | Alone | _Again:
        """Wait through one subscriber: for the value, the lock, a reason to compute alone, or
        (_Again) the subscriber's death."""
        loop = asyncio.get_running_loop()
        confirmed = await sub.subscribed(ready, self._conn.timeout)
        if confirmed is None:
            self._subs.timed_out(sub)
            return Alone("fallbacks")
        if not confirmed:
            return _Again(False)
        # Subscribed first, then looked: an announcement cannot slip in between.
        while True:
            watch.reset()
            try:
                claimed = await self.claim(names, token, True, usable)
            except Unavailable:
                return Alone("fallbacks")
            if not isinstance(claimed, Held):
                return claimed
            if claimed.marked:
                return Alone(None)
            pttl = claimed.pttl
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
                return Alone("wait_timeouts")
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
                return _Again(True)
            heard = hear(watch.payload)
            if heard is None:
                continue
            if heard.news is News.STORED and heard.entry:
                value = self._entries.decode(names.value, heard.entry)
                if value is not MISSING and (usable is None or usable(value)):
                    return Hit(value)
            elif heard.news is News.UNCACHEABLE and not heard.entry:
                return Alone(None)
