"""How RedisCache speaks about itself: the wq_memo logger, throttled warnings, hidden passwords.

A password given to RedisCache, in whatever form (``redis://user:pw@host``, ``redis://:pw@host``,
``?password=pw``, ``unix://:pw@/path``, or the client's own settings), never reaches a repr, a log
line or an exception message: every text RedisCache writes about a URL or an error goes through
``Secrets.hide`` first.
"""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ("Secrets", "Throttle", "logger", "redact_url")

logger = logging.getLogger("wq_memo")

_HIDDEN = "***"
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;])[^=&;#]*pass[^=&;#]*=)([^&;#]*)")
_USERINFO = re.compile(r"(//)([^/?#]*)@")


def _redact_query(query: str) -> str:
    return _QUERY_SECRET.sub(lambda m: m.group(1) + _HIDDEN, query)


def redact_url(url: str) -> str:
    """Return url with its password (in the user part or the query) replaced by ***."""

    # The user part of a URL may hold a password even without a colon in some clients'
    # spelling, so the whole of it is hidden unless a username can be told from the password.
    def userinfo(match: re.Match[str]) -> str:
        info = match.group(2)
        user, colon, _ = info.partition(":")
        shown = f"{user}:{_HIDDEN}" if colon else _HIDDEN
        return f"{match.group(1)}{shown}@"

    redacted = _USERINFO.sub(userinfo, url, count=1)
    head, question, query = redacted.partition("?")
    return head + question + _redact_query(query) if question else redacted


class Secrets:
    """The passwords of one RedisCache, and how to hide them in any text."""

    __slots__ = ("_words",)

    def __init__(self, *words: object) -> None:
        found = {w for w in words if isinstance(w, str) and w}
        found |= {w.decode("utf-8", "replace") for w in words if isinstance(w, bytes) and w}
        # Longest first, so that a password containing another is hidden whole.
        self._words = tuple(sorted(found, key=len, reverse=True))

    @classmethod
    def of_url(cls, url: str, *more: object) -> Secrets:
        """The passwords a Redis URL carries, as written and percent-decoded."""
        words: list[object] = list(more)
        match = _USERINFO.search(url)
        if match is not None:
            info = match.group(2)
            user, colon, password = info.partition(":")
            raw = password if colon else user
            words += [raw, unquote(raw)]
        query = url.partition("?")[2].partition("#")[0]
        for m in _QUERY_SECRET.finditer(query):
            words += [m.group(2), unquote(m.group(2)), unquote(m.group(2).replace("+", " "))]
        try:
            for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=False):
                if "pass" in name.lower():
                    words.append(value)
        except ValueError:
            pass
        return cls(*words)

    def hide(self, text: str) -> str:
        """Return text with every password replaced by ***."""
        for word in self._words:
            text = text.replace(word, _HIDDEN)
        return text

    def describe(self, exc: BaseException) -> str:
        """Return 'ExceptionType: message' with the passwords hidden."""
        message = str(exc)
        name = type(exc).__name__
        return self.hide(f"{name}: {message}" if message else name)


class Throttle:
    """Lets a topic log at WARNING once per period; in between its lines go to DEBUG.

    Each WARNING says how many lines of its topic went to DEBUG since the previous one, so a
    storm of failures is visible without flooding the log.
    """

    __slots__ = ("_next", "_period", "_quiet")

    def __init__(self, period: float = 1.0) -> None:
        self._period = period
        self._next: dict[object, float] = {}
        self._quiet: dict[object, int] = {}

    def log(self, topic: object, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(topic, 0.0):
            self._quiet[topic] = self._quiet.get(topic, 0) + 1
            logger.debug(message, *args)
            return
        if len(self._next) > 10_000:  # topics are per function or kind; stay bounded anyway
            self._next.clear()
            self._quiet.clear()
        self._next[topic] = now + self._period
        quiet = self._quiet.pop(topic, 0)
        if quiet:
            message += " (%d similar lines logged at DEBUG since the last warning)"
            args = (*args, quiet)
        logger.warning(message, *args)
