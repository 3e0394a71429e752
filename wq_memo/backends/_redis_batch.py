"""RedisCache's single-flight protocol for many keys at once (what @worker_queue.batch drives).

The same scripts as one key's (CLAIM, RENEW, FINISH in _redis_flight), sent for many keys in one
pipeline, one round trip each:

- ``claim``: per key, its value (a hit), its lock taken with a token of its own (``Holding``:
  this process computes it), another computation holding it (``Waiting``), or a reason to
  compute it here without storing it (``Alone``: Redis failed, or the function's results were
  lately found uncacheable);
- ``wait``: a key held elsewhere is waited for as one key is (the announcement, the end of the
  holder's lease), and ends as its value, its lock taken here (the holder gave up: it goes in a
  later batch), or a reason to compute it alone;
- ``renewing``: the leases of the keys of a running batch, renewed every lease/3 seconds while
  it runs, all in one pipeline;
- ``finish``: every key of a batch stored (fenced by its own token and the clear epoch it was
  taken under, as FINISH fences one key), released and announced, in one pipeline. A pipeline
  that fails is retried key by key in the background, as one key's FINISH is, until each lands
  or its lease ends.

redis-py's pipelines would ask Redis whether each script exists before every pipeline (one more
round trip); the scripts are sent by digest instead, and loaded once when Redis does not know
them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeAlias, final

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from ._protocol import CallKey
from ._redis_conn import Link, Unavailable
from ._redis_flight import Alone, Held, Hit, Lease, Outcome, Scripts, SingleFlight, Taken
from ._redis_keys import KeyNames, Namespace
from ._redis_pubsub import News

__all__ = ("BatchFlight", "Claim", "Holding", "Waiting")


@final
class Holding:
    """A key whose lock this process holds: it computes the key, and stores it fenced by
    ``token`` (and the clear ``epoch`` the lock was taken under)."""

    __slots__ = ("epoch", "function", "lease", "names", "token")

    def __init__(
        self, names: KeyNames, function: str, token: bytes, taken: Taken, seconds: float
    ) -> None:
        self.names = names
        self.function = function
        self.token = token
        self.epoch = taken.epoch
        self.lease = Lease(taken.sent + seconds)

    def __repr__(self) -> str:
        return f"<holding {self.names.value!r}>"


class Waiting(NamedTuple):
    """A key another computation holds: wait for it (``BatchFlight.wait``)."""

    names: KeyNames
    function: str
    token: bytes


Claim: TypeAlias = Hit | Holding | Waiting | Alone
"""What a claim of one key found (see the module docstring)."""


class _Ending(NamedTuple):
    holding: Holding
    args: list[bytes | int]


@final
class BatchFlight:
    """The multi-key single-flight operations of one RedisCache (see the module docstring)."""

    __slots__ = ("_flight", "_ns")

    def __init__(self, flight: SingleFlight, namespace: Namespace) -> None:
        self._flight = flight
        self._ns = namespace

    def names(self, key: Hashable) -> tuple[KeyNames, str]:
        """key's Redis names and function name.

        Raises:
            TypeError: key has a component RedisCache cannot encode.
        """
        return self._ns.names(key), key.function if isinstance(key, CallKey) else ""

    # -- one pipeline ----------------------------------------------------------------------------

    async def _pipeline(
        self,
        what: str,
        pick: Callable[[Scripts], AsyncScript],
        calls: Sequence[tuple[list[bytes], list[bytes | int]]],
    ) -> list[Any]:
        """Run the script once per (keys, args) in one pipeline; the replies, in order.

        Raises Unavailable when Redis fails (logged and counted)."""
        flight = self._flight

        async def run(link: Link) -> list[Any]:
            script = pick(flight.scripts(link))
            for attempt in (1, 2):
                pipe = link.client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
                if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                    # Redis does not know the script (restarted, flushed): load it, and again.
                    script.sha = await link.client.script_load(script.script)
                    continue
                for reply in replies:
                    if isinstance(reply, ResponseError):
                        raise reply
                return replies
            raise AssertionError("unreachable")

        return await flight.conn.call(what, run, urgent=what != "lock")

    # -- claiming --------------------------------------------------------------------------------

    async def claim(self, keys: Sequence[tuple[KeyNames, str, bool]]) -> list[Claim]:
        """Claim each (names, function, look) in one round trip: ``look`` False (a refresh)
        takes the lock without looking at the value. Redis failing makes every key Alone."""
        flight = self._flight
        tokens = [secrets.token_hex(16).encode() for _ in keys]
        calls = [
            (flight.claim_keys(names), flight.claim_args(token, look))
            for (names, _, look), token in zip(keys, tokens, strict=True)
        ]
        sent = asyncio.get_running_loop().time()
        try:
            replies = await self._pipeline("lock", _claim, calls)
        except Unavailable:
            flight.computes_alone("fallbacks", len(keys))
            return [Alone("fallbacks") for _ in keys]
        claims: list[Claim] = []
        for (names, function, _), token, reply in zip(keys, tokens, replies, strict=True):
            try:
                found = flight.claimed(names, reply, sent)
            except (TypeError, ValueError, IndexError, KeyError):
                flight.conn.failed("lock", names.value, ValueError(f"unexpected reply {reply!r}"))
                flight.computes_alone("fallbacks")
                claims.append(Alone("fallbacks"))
                continue
            if found is None:  # an entry refused: claimed again over it, on its own (rare)
                try:
                    found = await flight.claim(names, token, False)
                except Unavailable:
                    flight.computes_alone("fallbacks")
                    claims.append(Alone("fallbacks"))
                    continue
            claims.append(self._claimed(names, function, token, found))
        return claims

    def _claimed(
        self, names: KeyNames, function: str, token: bytes, found: Hit | Taken | Held
    ) -> Claim:
        flight = self._flight
        if isinstance(found, Hit):
            flight.counts.hits += 1
            return found
        if isinstance(found, Taken):
            flight.counts.computed += 1
            return Holding(names, function, token, found, flight.lease)
        if found.marked:  # the function's results are not stored these days: nobody waits
            flight.computes_alone(None)
            return Alone(None)
        return Waiting(names, function, token)

    async def wait(self, waiting: Waiting) -> Hit | Holding | Alone:
        """Wait for the holder of a key to finish: its value, its lock (the holder gave up),
        or a reason to compute it alone."""
        flight = self._flight
        turn = await flight.wait_turn(waiting.names, waiting.token)
        if isinstance(turn, Taken):
            flight.counts.computed += 1
            return Holding(waiting.names, waiting.function, waiting.token, turn, flight.lease)
        if isinstance(turn, Alone):
            flight.computes_alone(turn.reason)
        return turn

    # -- holding ---------------------------------------------------------------------------------

    @property
    def period(self) -> float:
        """Seconds between two renewals of the leases of a running batch."""
        return self._flight.lease / 3

    def renewing(self, holdings: list[Holding]) -> _Renewal:
        """Renew the leases of holdings while a batch computes them; ``stop()`` after."""
        return _Renewal(self, holdings)

    async def renew(self, holdings: list[Holding]) -> None:
        """Renew every lease still held, in one round trip; a lock found gone is counted."""
        flight = self._flight
        live = [h for h in holdings if not h.lease.lost and not h.lease.ended]
        if not live:
            return
        sent = asyncio.get_running_loop().time()
        calls: list[tuple[list[bytes], list[bytes | int]]] = [
            ([h.names.lock], [h.token, flight.lease_ms]) for h in live
        ]
        try:
            replies = await self._pipeline("lease renewal", _renew, calls)
        except Unavailable:
            return  # logged and counted; again at the next period
        for holding, held in zip(live, replies, strict=True):
            if holding.lease.ended:
                continue
            if int(held):
                holding.lease.expires = sent + flight.lease
            else:
                flight.lost(holding.names, holding.lease, "renewing its lease")

    async def finish(self, ends: Sequence[tuple[Holding, Any]]) -> None:
        """End each holding in one round trip: ``(holding, (True, value))`` stores value
        (fenced; one that cannot be stored is announced as uncacheable); ``(holding, (False,
        exc))`` stores nothing, and the waiters look again (one of them computes it)."""
        flight = self._flight
        endings: list[_Ending] = []
        for holding, (ok, what) in ends:
            holding.lease.ended = True
            names = holding.names
            if ok:
                outcome, data, announce, ttl = flight.ending(names, holding.function, what, None)
            else:
                outcome, data, ttl = Outcome.NOTHING, b"", None
                news = News.LOOK_AGAIN if isinstance(what, asyncio.CancelledError) else News.FAILED
                announce = news.value
            args = flight.finish_args(
                names, holding.token, holding.epoch, outcome, data, announce, ttl if ok else None
            )
            endings.append(_Ending(holding, args))
        if not endings:
            return
        calls = [(flight.claim_keys(e.holding.names), [*e.args, b"0"]) for e in endings]
        try:
            replies = await self._pipeline("store and unlock", _finish, calls)
        except Unavailable:
            for ending in endings:
                flight.finish_later(ending.holding.names, ending.args, ending.holding.lease)
            return
        for ending, reply in zip(endings, replies, strict=True):
            flight.finished(ending.holding.names, ending.args, reply, ending.holding.lease)

    def release(self, holding: Holding) -> None:
        """Give a held key up without computing it (nobody wants it any more): in the
        background, its waiters look again at once."""
        self._flight.conn.spawn(self.finish([(holding, (False, asyncio.CancelledError()))]))


class _Renewal:
    """The renewing of one batch's leases (see BatchFlight.renewing)."""

    __slots__ = ("_batch", "_holdings", "_task", "_timer")

    def __init__(self, batch: BatchFlight, holdings: list[Holding]) -> None:
        self._batch = batch
        self._holdings = holdings
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if holdings:
            # A timer (cheaper than a task) starts the renewing only for batches that last a
            # third of the lease.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(batch.period, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        holdings = self._holdings
        period = self._batch.period
        while not all(h.lease.ended for h in holdings):
            await self._batch.renew(holdings)
            await asyncio.sleep(period)

    async def stop(self) -> None:
        for holding in self._holdings:
            holding.lease.ended = True
        if self._timer is not None:
            self._timer.cancel()
        task = self._task
        if task is not None:
            task.cancel()
            # Waited for, not awaited: a cancellation of the batch still propagates.
            await asyncio.wait([task])
            if not task.cancelled():
                task.result()


def _claim(scripts: Scripts) -> AsyncScript:
    return scripts.claim


def _renew(scripts: Scripts) -> AsyncScript:
    return scripts.renew


def _finish(scripts: Scripts) -> AsyncScript:
    return scripts.finish
