"""The per-result cache policy: what is kept, for how long, remembered errors and stale values.

``Policy`` holds the decorator's ``cache_if``, ``ttl``, ``cache_errors`` and ``stale_if_error``,
checked at decoration (``make_policy``), and answers the questions ``Store`` asks when it writes:
whether a result is kept and for how long (``lifetime``), whether an exception is remembered
(``error_time``). Only ``Store`` writes; nothing here touches a cache.

With an in-process cache and a ``ttl``, ``cache_errors`` or ``stale_if_error``, the cache holds a
``Kept`` entry per key (``Policy.dated``): the value or the remembered error, when it expires on
the policy's clock, and until when it may still be served stale. The hit path reads it; an
expired entry stays in the cache, where a failing recomputation may still serve it
(``stale_if_error``), until it is overwritten, invalidated, cleared or evicted.

With an async cache and ``cache_errors`` or ``stale_if_error`` (``Policy.wrapped``), the cache
holds such entries too: a remembered error, and with ``stale_if_error`` each value with its
expiry (kept by the cache's own ttl until the end of its stale window). ``unwrap`` reads them.
RedisCache stores them in a format of its own and reads a remembered error back as a
``StoredError``: its type's identifier (``type_id``), which only ``resolve`` turns into a class,
among the ``cache_errors`` types and their subclasses already loaded, importing nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any, Final, NamedTuple, final

from ._errors import QueueShutDown, ShutdownTimeout
from .backends._protocol import MISSING as _MISSING

if TYPE_CHECKING:
    from ._counts import Counts

__all__ = (
    "SKIP",
    "CachedError",
    "Kept",
    "Policy",
    "Raised",
    "StoredError",
    "make_policy",
    "type_id",
)

logger = logging.getLogger("wq_memo")

SKIP: Final = object()
"""What ``Policy.lifetime`` answers for a result that is not to be stored."""


@final
class CachedError(NamedTuple):
    """What ``cache_peek()`` returns for a remembered exception (``cache_errors``): its type
    and arguments. ``rebuild()`` makes the exception a call raises, a new one each time."""

    type: type[Exception]
    args: tuple[Any, ...]

    def rebuild(self) -> Exception:
        """A new exception of the remembered type, with the remembered arguments."""
        return self.type(*self.args)


class Kept:
    """An entry of an in-process cache under a dated policy: ``value``, or the remembered
    ``error`` (its value is then None); it is fresh before ``expires`` and may be served stale
    (``stale_if_error``) before ``until``. ``warned``: its stale value was served already in
    this window (the warning is logged once)."""

    __slots__ = ("error", "expires", "until", "value", "warned")

    def __init__(
        self,
        value: Any,
        expires: float,
        until: float,
        error: CachedError | None = None,
        warned: bool = False,
    ) -> None:
        self.value = value
        self.expires = expires
        self.until = until
        self.error = error
        self.warned = warned

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"value={self.value!r}"
        return f"<Kept {what} expires={self.expires}>"


@final
class StoredError(NamedTuple):
    """A remembered exception as RedisCache reads it back: the identifier of its type
    (``type_id``), its arguments, and when it expires on the writer's policy clock. Only the
    policy turns the identifier into a class, through its own ``cache_errors``: nothing is
    imported or unpickled for it."""

    type_id: str
    args: tuple[Any, ...]
    expires: float


@final
class Raised(NamedTuple):
    """What an async cache's lookup answers for a remembered error: the memoized function
    raises ``error.rebuild()`` (a value of its own is never of this private type)."""

    error: CachedError


def type_id(kind: type[BaseException]) -> str:
    """The identifier a remembered error's type is stored under in a shared cache: its module
    and qualified name. It is only ever looked up among the classes ``cache_errors`` names (and
    their subclasses already loaded), never imported."""
    return f"{kind.__module__}:{kind.__qualname__}"


def _seconds(what: str, value: object, *, none: bool = False) -> float | None:
    """value checked as a number of seconds >= 0 (None allowed if ``none``)."""
    if value is None and none:
        return None
    if isinstance(value, Real) and not isinstance(value, int | float):
        value = float(value)  # a numpy scalar, a Fraction: a number all the same
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"@worker_queue: {what} must be a number of seconds >= 0"
            f"{' or None' if none else ''}, got {value!r}"
        )
    return _float(value)


def _float(seconds: float) -> float:
    """seconds as a float: an int too large for one (10**400) is forever, not OverflowError."""
    try:
        return float(seconds)
    except OverflowError:
        return math.inf


@final
class Policy:
    """What is kept and for how long; see the module's docstring.

    ``clock``: the time of expiries (an in-process cache's). ``backoff``: how long a stale value
    served after a failed recomputation stays before the next attempt (``refresh_backoff``).
    ``dated``: entries are ``Kept`` (an in-process cache with ttl, cache_errors or
    stale_if_error). ``skipped()`` counts a result not stored; ``served_stale()`` a stale value
    served.
    """

    __slots__ = (
        "backoff",
        "cache_if",
        "clock",
        "dated",
        "errors",
        "name",
        "served_stale",
        "skipped",
        "stale",
        "ttl",
        "ttl_of",
        "types",
        "unbuildable",
        "warned_ttl",
        "wrapped",
    )

    def __init__(
        self,
        name: str,
        cache_if: Callable[[Any], object] | None,
        ttl: float | Callable[[Any], object] | None,
        errors: dict[type[Exception], float],
        stale: float | None,
        clock: Callable[[], float],
        backoff: float,
        dated: bool,
        wrapped: bool = False,
    ) -> None:
        self.name = name
        self.cache_if = cache_if
        self.ttl = ttl if not callable(ttl) else None
        self.ttl_of = ttl if callable(ttl) else None
        self.errors = errors
        self.stale = stale
        self.clock = clock
        self.backoff = backoff
        self.dated = dated
        self.wrapped = wrapped
        self.types: dict[str, type[Exception]] = {}
        self.warned_ttl = False
        self.unbuildable: set[type[BaseException]] = set()
        """The exception types found not to rebuild: warned about once (a batch's failure
        reaches every key of it; a type that does not rebuild never will)."""
        self.skipped: Callable[[], None] = _nothing
        self.served_stale: Callable[[], None] = _nothing

    def count_in(self, counts: Counts) -> None:
        """Count the results not stored and the stale values served in counts (cache_info()'s
        ``uncached`` and ``stale``)."""

        def skipped() -> None:
            counts.uncached += 1

        def served_stale() -> None:
            counts.stale += 1

        self.skipped = skipped
        self.served_stale = served_stale

    def lifetime(self, value: Any, primed: bool) -> float | object | None:
        """Seconds value lives (None: the cache's own lifetime), or SKIP: not stored.

        A computation's result for which ``cache_if`` is false is skipped; so is one whose
        ``ttl`` function fails or returns a bad value (logged, the first time at ERROR). A
        prime is stored whatever ``cache_if`` says; a bad ttl for it raises ValueError.
        """
        if (
            not primed
            and self.cache_if is not None
            and not _plain(self.cache_if(value), "cache_if")
        ):
            self.skipped()
            return SKIP
        ttl_of = self.ttl_of
        if ttl_of is None:
            seconds: object = self.ttl
        else:
            try:
                seconds = _plain(ttl_of(value), "ttl")
            except Exception:
                if primed:
                    raise
                logger.exception("%s(): ttl(result) failed; the result was not cached", self.name)
                self.skipped()
                return SKIP
        if seconds is None:
            return None
        if isinstance(seconds, Real) and not isinstance(seconds, int | float):
            seconds = float(seconds)  # a numpy scalar, a Fraction: a number all the same
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
            message = (
                f"{self.name}(): ttl(result) returned {seconds!r}, not a number of seconds >= 0 "
                "or None; the result was returned uncached"
            )
            if primed:
                raise ValueError(message)
            # Once per function: a ttl function that goes wrong goes wrong for many results.
            logger.log(logging.DEBUG if self.warned_ttl else logging.ERROR, message)
            self.warned_ttl = True
            self.skipped()
            return SKIP
        if seconds == 0:
            if not primed:
                self.skipped()
            return SKIP
        return _float(seconds)

    def error_time(self, exc: Exception) -> float | None:
        """How long exc is remembered (None: not at all): the time of the first of the
        ``cache_errors`` types it is an instance of, if ``type(exc)(*exc.args)`` rebuilds it
        with the same arguments; never QueueShutDown, ShutdownTimeout or a CancelledError (a
        subclass may be an Exception too)."""
        if isinstance(exc, QueueShutDown | ShutdownTimeout | asyncio.CancelledError):
            # A queue shutting down (a nested call's, raised through this computation) says
            # nothing of the key: never remembered, as cancellation never is.
            return None
        seconds = next((t for kind, t in self.errors.items() if isinstance(exc, kind)), None)
        if seconds is None or seconds <= 0:
            return None
        try:
            # Rebuilt as it was: a constructor that makes its message from its arguments
            # (super().__init__(f"{id} not found")) would give "a not found not found".
            rebuilt = type(exc)(*exc.args)
            same = type(rebuilt) is type(exc) and bool(rebuilt.args == exc.args)
        except Exception:
            same = False
        if not same:
            kind = type(exc)
            logger.log(
                logging.DEBUG if kind in self.unbuildable else logging.WARNING,
                "%s(): %s cannot be rebuilt from its arguments as it was; it is not remembered",
                self.name,
                kind.__name__,
            )
            self.unbuildable.add(kind)
            return None
        return seconds

    def resolve(self, identifier: str) -> type[Exception] | None:
        """The class a stored type identifier names, if it is one of the ``cache_errors`` types
        or a subclass of one already loaded in this process (None otherwise, and for an
        identifier that two such classes share). Nothing is imported. A class found is
        remembered; an identifier not found is looked for again next time (its class may be
        loaded by then)."""
        types = self.types
        known = types.get(identifier)
        if known is not None:
            return known
        found: dict[str, list[type[Exception]]] = {}
        seen: set[type[Exception]] = set()
        todo = list(self.errors)
        while todo:
            kind = todo.pop()
            if kind in seen:
                continue
            seen.add(kind)
            found.setdefault(type_id(kind), []).append(kind)
            todo.extend(kind.__subclasses__())
        answer = found.get(identifier, [])
        if len(answer) != 1:
            return None
        types[identifier] = answer[0]
        return answer[0]

    def remembered(self, entry: Any) -> CachedError | None:
        """The remembered error a stored entry holds, if it is one this process can rebuild."""
        if type(entry) is StoredError:
            kind = self.resolve(entry.type_id)
            if kind is None:
                logger.debug(
                    "%s(): a remembered %s in the cache is not of a type cache_errors names "
                    "here; treated as a miss",
                    self.name,
                    entry.type_id,
                )
                return None
            try:
                # Checked as the writer checked its own (error_time): another version of the
                # class, or a forged entry naming a loaded subclass, may refuse these arguments.
                rebuilt = kind(*entry.args)
                same = type(rebuilt) is kind and bool(rebuilt.args == entry.args)
            except Exception:
                same = False
            if not same:
                logger.debug(
                    "%s(): a remembered %s in the cache cannot be rebuilt here from its "
                    "arguments; treated as a miss",
                    self.name,
                    entry.type_id,
                )
                return None
            return CachedError(kind, entry.args)
        error: CachedError | None = entry.error
        return error

    def unwrap(self, entry: Any) -> Any:
        """What an async cache's entry means now: its value, ``Raised`` for a fresh remembered
        error, or MISSING (expired, or an error whose type this process does not name)."""
        kind = type(entry)
        if kind is Kept:
            if self.clock() >= entry.expires:
                return _MISSING
            if entry.error is None:
                return entry.value
        elif kind is not StoredError:
            return entry
        elif self.clock() >= entry.expires:
            return _MISSING
        error = self.remembered(entry)
        return _MISSING if error is None else Raised(error)

    def usable(self, entry: Any) -> bool:
        """Whether an entry found in the cache answers a call now (not expired, and not an
        error of a type this process does not name)."""
        return self.unwrap(entry) is not _MISSING


def _nothing() -> None:
    return None


def _plain(answer: object, what: str) -> object:
    """answer, what cache_if or ttl returned; an awaitable (an async function passed where a
    plain one was expected) raises TypeError, closed first so that it is not left unawaited."""
    if inspect.isawaitable(answer):
        close = getattr(answer, "close", None)
        if callable(close):
            close()
        raise TypeError(
            f"{what} returned an awaitable ({type(answer).__name__}); it is called when a result "
            "is stored and must be a plain function, not an async one"
        )
    return answer


def _refuse_async(what: str, function: object) -> None:
    """Refuse an async function (or an object whose __call__ is one) passed as cache_if or ttl:
    its coroutine would be taken for the answer."""
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004  # an object with an async __call__
    ):
        raise TypeError(
            f"@worker_queue: {what} must be a plain function of the result, called as the "
            f"result is stored; got the async function {function!r}"
        )


def make_policy(
    cache_if: object,
    ttl: object,
    cache_errors: object,
    stale_if_error: object,
) -> tuple[
    Callable[[Any], object] | None,
    float | Callable[[Any], object] | None,
    dict[type[Exception], float],
    float | None,
]:
    """The options checked: (cache_if, ttl, cache_errors as a dict, stale_if_error).

    Raises TypeError for a cache_if that is not callable or a cache_errors that is not a
    mapping of exception classes; ValueError for a bad number of seconds.
    """
    if cache_if is not None and not callable(cache_if):
        raise TypeError(
            f"@worker_queue: cache_if must be a function of the result returning whether to "
            f"store it, got {cache_if!r}"
        )
    if cache_if is not None:
        _refuse_async("cache_if", cache_if)
    checked_ttl: float | Callable[[Any], object] | None
    if ttl is None or callable(ttl):
        if ttl is not None:
            _refuse_async("ttl", ttl)
        checked_ttl = ttl
    else:
        checked_ttl = _seconds("ttl (a number, or a function of the result)", ttl)
    errors: dict[type[Exception], float] = {}
    if cache_errors is not None:
        if not isinstance(cache_errors, Mapping):
            raise TypeError(
                "@worker_queue: cache_errors must map exception classes to seconds, "
                f"e.g. {{TimeoutError: 2.0}}; got {cache_errors!r}"
            )
        for kind, seconds in cache_errors.items():
            if not isinstance(kind, type) or not issubclass(kind, BaseException):
                raise TypeError(
                    f"@worker_queue: cache_errors keys must be exception classes, got {kind!r}"
                )
            if not issubclass(kind, Exception) or issubclass(kind, asyncio.CancelledError):
                raise TypeError(
                    f"@worker_queue: cache_errors cannot remember {kind.__name__}, which is not "
                    "an Exception subclass or is a CancelledError (cancellation and exits must "
                    "never be cached); name Exception subclasses only"
                )
            errors[kind] = _seconds(f"cache_errors[{kind.__name__}]", seconds) or 0.0
    stale = _seconds("stale_if_error", stale_if_error, none=True)
    if stale is not None and math.isinf(stale):
        raise ValueError(
            "@worker_queue: stale_if_error must be a finite number of seconds, got inf"
        )
    return cache_if, checked_ttl, errors, stale
