"""How RedisCache turns values into stored bytes and back: JSON, or pickle signed with HMAC-SHA256.

Without a secret only JSON is written and read, and only values JSON gives back exactly: None,
bool, int, finite float, str, and lists and str-keyed dicts of those. A tuple would come back as
a list and a set not at all, so such values are refused (the caller gets them uncached) rather
than silently changed.

With a secret, values are pickled and signed. The signature covers the entry's Redis name and
its expiry time, both carried in the entry: a signed entry copied under another key is refused
like a forged one, and one read after its expiry is refused whatever Redis's own TTL says (an
entry whose TTL was removed, or an old entry written back). An entry is unpickled only after
its signature has been checked with ``hmac.compare_digest``; an entry without a valid signature
is never unpickled.

Every entry carries its write time (8 bytes: ms since the epoch, wall clock, under the signature
when signed), so that any process can tell its age in the read that fetches it. Entries of the
previous formats (``wq1j``, ``wq2p``) carry none: they are read as before, as if written at the
epoch, so refresh-ahead refreshes them at their first read and rewrites them in this format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import pickle
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from .._policy import Kept, StoredError, type_id
from ._protocol import MISSING
from ._redis_log import Throttle
from ._redis_stats import Counters

__all__ = ("BadEntry", "Entries", "Unencodable", "ValueCodec", "json_args")

_JSON: Final = b"wq2j"
"""JSON: tag, write time (8 bytes: ms since the epoch), JSON text."""
_SIGNED: Final = b"wq3p"
"""Signed pickle: tag, MAC (32 bytes), expiry (8 bytes: ms since the epoch, 0 for none), write
time (8 bytes: ms since the epoch), body."""
_UNDATED_JSON: Final = b"wq1j"
"""The previous JSON format: tag, JSON text (no write time)."""
_UNDATED_SIGNED: Final = b"wq2p"
"""The previous signed format: tag, MAC, expiry, body (no write time)."""
_OLD_SIGNED: Final = b"wq1p"
_KEPT: Final = b"wq4k"
"""A value kept for a stale window (stale_if_error): tag, expiry and end of the window (two
big-endian doubles: seconds on the policy's clock), warned (1 byte), then the value's own
entry in this codec's format."""
_SIGNED_KEPT: Final = b"wq4K"
"""The same with a secret: tag, MAC (over the tag, the name, the dates and the inner entry),
dates, warned, inner entry."""
_ERROR: Final = b"wq4e"
"""A remembered error (cache_errors): tag, expiry (a big-endian double, on the policy's clock),
write time (8 bytes: ms since the epoch), JSON ``[type identifier, [args...]]``. Never pickle,
secret or not: reading one imports and unpickles nothing."""
_SIGNED_ERROR: Final = b"wq4E"
"""The same with a secret: tag, MAC, then as ``wq4e``."""
_KEPT_HEAD: Final = 17
_ERROR_HEAD: Final = 16
_MAC_SIZE: Final = hashlib.sha256().digest_size
_JSON_HEAD: Final = len(_JSON) + 8
_HEAD: Final = len(_SIGNED) + _MAC_SIZE + 16
_UNDATED_HEAD: Final = len(_UNDATED_SIGNED) + _MAC_SIZE + 8


class Unencodable(ValueError):
    """The value cannot be stored exactly; it is handed to its callers without being cached."""


class BadEntry(ValueError):
    """A stored entry is refused (bad or missing signature, or not written by wq_memo)."""


def _json_exact(value: object, depth: int = 0) -> bool:
    """Return whether JSON gives back exactly value, with the same types all the way down."""
    if depth > 200:
        return False
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return True
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is list:
        return all(_json_exact(item, depth + 1) for item in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            type(k) is str and _json_exact(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


def json_args(args: tuple[Any, ...]) -> bool:
    """Whether a remembered error's arguments can be stored as JSON and read back exactly
    (an int longer than ``sys.get_int_max_str_digits()`` is an int, yet JSON refuses it)."""
    if type(args) is not tuple or not _json_exact(list(args)):
        return False
    try:
        json.dumps(list(args), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


class ValueCodec:
    """Encodes and decodes stored values; see the module docstring for the formats."""

    __slots__ = ("_clock", "_secret")

    def __init__(self, secret: bytes | None, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock
        """Wall-clock seconds since the epoch: expiry times are shared between hosts."""

    def now(self) -> float:
        """This codec's wall clock, in seconds since the epoch."""
        return self._clock()

    @property
    def signed(self) -> bool:
        """Whether values are stored as signed pickle (True) or JSON (False)."""
        return self._secret is not None

    def _mac(self, tag: bytes, name: bytes, head: bytes, body: bytes) -> bytes:
        assert self._secret is not None
        mac = hmac.new(self._secret, tag, hashlib.sha256)
        mac.update(len(name).to_bytes(8, "big"))
        mac.update(name)
        mac.update(head)
        mac.update(body)
        return mac.digest()

    def dumps(self, name: bytes, value: Any, ttl: float | None = None) -> bytes:
        """Return the bytes to store under the Redis name ``name`` for ``ttl`` seconds.

        A ``Kept`` entry (a policy's: a value with its expiry and stale window, or a remembered
        error) is stored in a format of its own (see ``_KEPT``, ``_ERROR``).

        Raises:
            Unencodable: the value cannot be stored exactly in this codec's format.
        """
        if type(value) is Kept:
            if value.error is not None:
                return self._dump_error(name, value)
            head = struct.pack(">dd", value.expires, value.until) + (
                b"\x01" if value.warned else b"\x00"
            )
            inner = self.dumps(name, value.value, ttl)
            if self._secret is None:
                return _KEPT + head + inner
            return _SIGNED_KEPT + self._mac(_SIGNED_KEPT, name, head, inner) + head + inner
        if self._secret is None:
            if not _json_exact(value):
                raise Unencodable(
                    f"a {type(value).__qualname__} value is not stored: without secret= "
                    "RedisCache stores only values JSON gives back exactly (None, bool, int, "
                    "finite float, str, list, dict with str keys); return such a value, or "
                    "pass secret= to store signed pickle"
                )
            try:
                text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            except (ValueError, TypeError, RecursionError) as exc:
                raise Unencodable(f"value is not stored: JSON cannot encode it ({exc})") from exc
            written = int(self._clock() * 1000).to_bytes(8, "big")
            return _JSON + written + text.encode("utf-8", "surrogatepass")
        try:
            body = pickle.dumps(value, protocol=5)
        except Exception as exc:  # pickling can fail with about any exception type
            raise Unencodable(
                f"a {type(value).__qualname__} value is not stored: it cannot be pickled ({exc!r})"
            ) from exc
        now = self._clock()
        expires_ms = 0 if ttl is None else max(1, int((now + ttl) * 1000))
        head = expires_ms.to_bytes(8, "big") + int(now * 1000).to_bytes(8, "big")
        return _SIGNED + self._mac(_SIGNED, name, head, body) + head + body

    def _dump_error(self, name: bytes, entry: Kept) -> bytes:
        error = entry.error
        assert error is not None
        if not _json_exact(list(error.args)):
            raise Unencodable("a remembered error's arguments cannot be stored as JSON")
        try:
            text = json.dumps(
                [type_id(error.type), list(error.args)],
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            ).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError, RecursionError) as exc:
            raise Unencodable(f"a remembered error's arguments cannot be stored ({exc})") from exc
        head = struct.pack(">d", entry.expires) + int(self._clock() * 1000).to_bytes(8, "big")
        if self._secret is None:
            return _ERROR + head + text
        return _SIGNED_ERROR + self._mac(_SIGNED_ERROR, name, head, text) + head + text

    def _load_kept(self, name: bytes, data: bytes) -> tuple[Any, float]:
        """A policy's entry (``_KEPT``, ``_ERROR`` and their signed forms) read back: a
        ``Kept`` value or a ``StoredError``, checked (signature first) before anything in it
        is decoded."""
        tag = data[:4]
        signed = tag in (_SIGNED_KEPT, _SIGNED_ERROR)
        if signed != (self._secret is not None):
            raise BadEntry(
                "entry is signed but this RedisCache has no secret="
                if signed
                else "entry is not signed (this RedisCache has secret= and reads only signed)"
            )
        at = 4 + (_MAC_SIZE if signed else 0)
        size = _KEPT_HEAD if tag in (_KEPT, _SIGNED_KEPT) else _ERROR_HEAD
        if len(data) < at + size:
            raise BadEntry("entry is cut short")
        head, body = data[at : at + size], data[at + size :]
        if signed and not hmac.compare_digest(data[4:at], self._mac(tag, name, head, body)):
            raise BadEntry("entry's signature does not match (tampered, or another secret)")
        if size == _KEPT_HEAD:
            expires, until = struct.unpack(">dd", head[:16])
            if body[:4] in (_KEPT, _SIGNED_KEPT, _ERROR, _SIGNED_ERROR):
                raise BadEntry("a kept entry holds another kept entry")
            value, written = self.loads_dated(name, body)
            return Kept(value, expires, until, None, head[16:] != b"\x00"), written
        (expires,) = struct.unpack(">d", head[:8])
        written = int.from_bytes(head[8:], "big") / 1000
        try:
            kind, args = json.loads(body.decode("utf-8", "surrogatepass"))
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadEntry(f"remembered error is not [type, [args]] in JSON ({exc})") from exc
        if type(kind) is not str or type(args) is not list:
            raise BadEntry("remembered error is not [type, [args]] in JSON")
        return StoredError(kind, tuple(args), expires), written

    def loads(self, name: bytes, data: bytes) -> Any:
        """Return the value stored as data under the Redis name ``name``.

        Raises:
            BadEntry: the entry is refused; it was not unpickled.
        """
        return self.loads_dated(name, data)[0]

    def loads_dated(self, name: bytes, data: bytes) -> tuple[Any, float]:
        """Return (the value stored as data under ``name``, its write time in epoch seconds).

        An entry of a previous format, which carries no write time, is dated at the epoch (0).

        Raises:
            BadEntry: the entry is refused; it was not unpickled.
        """
        head = data[:4]
        if head in (_KEPT, _SIGNED_KEPT, _ERROR, _SIGNED_ERROR):
            return self._load_kept(name, data)
        if self._secret is None:
            if head == _JSON and len(data) >= _JSON_HEAD:
                text, written = data[_JSON_HEAD:], int.from_bytes(data[4:_JSON_HEAD], "big")
            elif head == _UNDATED_JSON:
                text, written = data[4:], 0
            elif head in (_SIGNED, _UNDATED_SIGNED, _OLD_SIGNED):
                raise BadEntry("entry is signed pickle but this RedisCache has no secret=")
            else:
                raise BadEntry("entry was not written by wq_memo")
            try:
                return json.loads(text.decode("utf-8", "surrogatepass")), written / 1000
            except (ValueError, RecursionError) as exc:
                raise BadEntry(f"entry is not valid JSON ({exc})") from exc
        if head == _SIGNED:
            end = _HEAD
        elif head == _UNDATED_SIGNED:
            end = _UNDATED_HEAD
        elif head == _OLD_SIGNED:
            raise BadEntry(
                "entry is in an older signed format that carries no expiry of its own; "
                "it will be computed again and stored in the current format"
            )
        else:
            raise BadEntry(
                "entry is not signed (this RedisCache has secret= and reads only signed)"
            )
        mac = data[4 : 4 + _MAC_SIZE]
        dates, body = data[4 + _MAC_SIZE : end], data[end:]
        if len(data) < end or not hmac.compare_digest(mac, self._mac(head, name, dates, body)):
            raise BadEntry("entry's signature does not match (tampered, or another secret)")
        expires_ms = int.from_bytes(dates[:8], "big")
        if expires_ms:
            late = self._clock() - expires_ms / 1000
            if late >= 0:
                raise BadEntry(
                    f"signed entry expired {late:.3f} s ago, yet Redis still holds it (its "
                    "TTL was removed or the entry was written back)"
                )
        try:
            value = pickle.loads(body)
        except Exception as exc:  # a validly signed entry whose classes are gone, for instance
            raise BadEntry(f"signed entry cannot be unpickled ({exc!r})") from exc
        return value, int.from_bytes(dates[8:], "big") / 1000


Refusal = Literal["unencodable", "oversized"]


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class Entries:
    """A RedisCache's values and stored entries: the codec, the size bound, counters and logs."""

    __slots__ = ("_codec", "_counts", "_label", "_throttle", "max_bytes")

    def __init__(self, codec: ValueCodec, max_bytes: int, counts: Counters, label: str) -> None:
        self._codec = codec
        self.max_bytes = max_bytes
        self._counts = counts
        self._label = label
        self._throttle = Throttle()

    def encode(self, name: bytes, function: str, value: Any, ttl: float | None) -> bytes | Refusal:
        """Return the bytes to store for value, or why it is not stored (logged and counted)."""
        try:
            data = self._codec.dumps(name, value, ttl)
        except Unencodable as exc:
            self._counts.unencodable += 1
            self._throttle.log(
                ("unencodable", function),
                "RedisCache %s: result for %s returned uncached: %s",
                self._label,
                _show(name),
                exc,
            )
            return "unencodable"
        if len(data) > self.max_bytes:
            self._counts.oversized += 1
            self._throttle.log(
                ("oversized", function),
                "RedisCache %s: result for %s returned uncached: it takes %d bytes, more than "
                "max_value_bytes=%d; raise max_value_bytes to store such values",
                self._label,
                _show(name),
                len(data),
                self.max_bytes,
            )
            return "oversized"
        return data

    def decode(self, name: bytes, data: bytes) -> Any:
        """Return the value data holds, or MISSING (logged and counted) when it is refused."""
        try:
            return self._codec.loads(name, data)
        except BadEntry as exc:
            self.refused(name, str(exc))
            return MISSING

    def decode_dated(self, name: bytes, data: bytes) -> tuple[Any, float]:
        """Return (the value data holds, its write time in epoch seconds), or (MISSING, 0)."""
        try:
            return self._codec.loads_dated(name, data)
        except BadEntry as exc:
            self.refused(name, str(exc))
            return MISSING, 0.0

    def now(self) -> float:
        """The codec's wall clock, in seconds since the epoch."""
        return self._codec.now()

    def age(self, written: float) -> float:
        """Seconds since the wall-clock time written (0 if that is ahead of this host's clock)."""
        return max(0.0, self._codec.now() - written)

    def refused(self, name: bytes, why: str) -> None:
        """Count and log an entry read from Redis and treated as a miss."""
        self._counts.bad_entries += 1
        self._throttle.log(
            ("bad", name),
            "RedisCache %s: entry %s treated as a miss: %s",
            self._label,
            _show(name),
            why,
        )

    def too_big(self, name: bytes, size: int | None) -> None:
        """Count and log an entry left unread because it is larger than max_value_bytes."""
        self._counts.oversized += 1
        self._throttle.log(
            ("too big", name),
            "RedisCache %s: entry %s treated as a miss without reading it: it takes %s bytes, "
            "more than max_value_bytes=%d",
            self._label,
            _show(name),
            "more than that" if size is None else size,
            self.max_bytes,
        )
