"""How RedisCache turns values into stored bytes and back: JSON, or pickle signed with HMAC-SHA256.

Without a secret only JSON is written and read, and only values JSON gives back exactly: None,
bool, int, finite float, str, and lists and str-keyed dicts of those. A tuple would come back as
a list and a set not at all, so such values are refused (the caller gets them uncached) rather
than silently changed.

With a secret, values are pickled and signed; the signature covers the entry's Redis name too, so
a signed entry copied under another key is refused like a forged one. An entry is unpickled only
after its signature has been checked with ``hmac.compare_digest``; an entry without a valid
signature is never unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import pickle
from typing import Any, Final

__all__ = ("BadEntry", "Unencodable", "ValueCodec")

_JSON: Final = b"wq1j"
_SIGNED: Final = b"wq1p"
_MAC_SIZE: Final = hashlib.sha256().digest_size


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


class ValueCodec:
    """Encodes and decodes stored values; see the module docstring for the formats."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret

    @property
    def signed(self) -> bool:
        """Whether values are stored as signed pickle (True) or JSON (False)."""
        return self._secret is not None

    def _mac(self, name: str, body: bytes) -> bytes:
        assert self._secret is not None
        mac = hmac.new(self._secret, _SIGNED, hashlib.sha256)
        mac.update(name.encode("utf-8", "surrogatepass"))
        mac.update(b"\0")
        mac.update(body)
        return mac.digest()

    def dumps(self, name: str, value: Any) -> bytes:
        """Return the bytes to store under the Redis name ``name``.

        Raises:
            Unencodable: the value cannot be stored exactly in this codec's format.
        """
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
            return _JSON + text.encode("utf-8", "surrogatepass")
        try:
            body = pickle.dumps(value, protocol=5)
        except Exception as exc:  # pickling can fail with about any exception type
            raise Unencodable(
                f"a {type(value).__qualname__} value is not stored: it cannot be pickled ({exc!r})"
            ) from exc
        return _SIGNED + self._mac(name, body) + body

    def loads(self, name: str, data: bytes) -> Any:
        """Return the value stored as data under the Redis name ``name``.

        Raises:
            BadEntry: the entry is refused; it was not unpickled.
        """
        head = data[:4]
        if self._secret is None:
            if head == _SIGNED:
                raise BadEntry("entry is signed pickle but this RedisCache has no secret=")
            if head != _JSON:
                raise BadEntry("entry was not written by wq_memo")
            try:
                return json.loads(data[4:].decode("utf-8", "surrogatepass"))
            except (ValueError, RecursionError) as exc:
                raise BadEntry(f"entry is not valid JSON ({exc})") from exc
        if head != _SIGNED:
            raise BadEntry(
                "entry is not signed (this RedisCache has secret= and reads only signed)"
            )
        mac, body = data[4 : 4 + _MAC_SIZE], data[4 + _MAC_SIZE :]
        if len(mac) != _MAC_SIZE or not hmac.compare_digest(mac, self._mac(name, body)):
            raise BadEntry("entry's signature does not match (tampered, or another secret)")
        try:
            return pickle.loads(body)
        except Exception as exc:  # a validly signed entry whose classes are gone, for instance
            raise BadEntry(f"signed entry cannot be unpickled ({exc!r})") from exc
