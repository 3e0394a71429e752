"""Switching caching off: disabled() scopes, WQ_MEMO_DISABLE, and the one flag the hit path reads.

A memoized call reads ``SWITCH.watch`` first. While it is False, which is always the case in a
process that never switches caching off, nothing else is checked. It is True while a disabled()
scope is open anywhere in the process, while the pytest marker forces caching off, or while
WQ_MEMO_DISABLE is on; a call then asks ``SWITCH.off()`` whether it is itself affected.

WQ_MEMO_DISABLE is read once, when wq_memo is imported. Following later changes would take
either a read of os.environ on every call (the hit path's cost, several times over) or a
process-wide audit hook, which slows every sys._getframe() and logging call of the process;
disabled() and the pytest marker switch caching at run time instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from types import TracebackType
from typing import Final, final

__all__ = ("ENV_VAR", "SWITCH", "disabled")

logger = logging.getLogger("wq_memo")

ENV_VAR: Final = "WQ_MEMO_DISABLE"
_ON: Final = frozenset({"1", "true", "yes", "on"})
_OFF: Final = frozenset({"", "0", "false", "no", "off"})


def _env_says_off(raw: str | None) -> bool:
    """Whether a value of WQ_MEMO_DISABLE switches caching off (None: the variable is unset)."""
    if raw is None:
        return False
    word = raw.strip().lower()
    if word in _ON:
        return True
    if word not in _OFF:
        logger.warning(
            "%s=%r is not understood; caching stays on. Set it to 1 (or true, yes, on) to "
            "switch caching off, or to 0 (or unset it) to keep it on",
            ENV_VAR,
            raw,
        )
    return False


class _Scope:
    """One disabled() scope: open from its entry to its exit, whatever context refers to it."""

    __slots__ = ("open", "outer")

    def __init__(self, outer: _Scope | None) -> None:
        self.open = True
        self.outer = outer


# The innermost scope the current context was entered in (or was copied from, for a task).
_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "wq_memo_disabled", default=None
)


@final
class _Switch:
    """Whether caching is off, for the process and for the current context."""

    __slots__ = ("_lock", "env_off", "forced", "open_scopes", "watch")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open_scopes = 0
        self.forced = 0
        self.env_off = _env_says_off(os.environ.get(ENV_VAR))
        """WQ_MEMO_DISABLE as it was when wq_memo was imported."""
        self.watch = True
        """What the hit path reads: False only when no call can be affected."""
        self._update()

    def _update(self) -> None:
        self.watch = bool(self.open_scopes or self.forced or self.env_off)

    def off(self) -> bool:
        """Whether a call made now, in the current context, must bypass the cache."""
        if self.forced or self.env_off:
            return True
        scope = _scope.get()
        while scope is not None:
            if scope.open:
                return True
            scope = scope.outer
        return False

    def scopes(self, delta: int) -> None:
        with self._lock:
            self.open_scopes += delta
            self._update()

    def force(self, delta: int) -> None:
        """Switch caching off for the whole process (+1), or take that back (-1)."""
        with self._lock:
            self.forced += delta
            self._update()


SWITCH: Final = _Switch()


@final
class disabled:
    """Switch caching off for the calls made inside this block (``with`` or ``async with``).

    Only the current context is affected: calls made in the block, and in tasks started from
    it while it is open, run the function directly (no lookup, no store, no deduplication) and
    count as ``bypassed`` in cache_info(). Other tasks keep caching. Scopes nest. Each
    ``disabled()`` object is one scope: enter it once.
    """

    __slots__ = ("_scope", "_token")

    def __init__(self) -> None:
        self._scope: _Scope | None = None
        self._token: contextvars.Token[_Scope | None] | None = None

    def __enter__(self) -> None:
        if self._scope is not None:
            raise RuntimeError(
                "wq_memo.disabled(): this scope was already entered; "
                "call disabled() again for another block"
            )
        scope = self._scope = _Scope(_scope.get())
        self._token = _scope.set(scope)
        SWITCH.scopes(+1)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, token = self._scope, self._token
        if scope is None or token is None or not scope.open:
            return
        scope.open = False
        SWITCH.scopes(-1)
        # Left in another context than it was entered in: closed all the same.
        with contextlib.suppress(ValueError):
            _scope.reset(token)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
