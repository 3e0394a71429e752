"""A canonical, type-tagged encoding of call keys, and the Redis key names derived from it.

Two keys share a Redis entry only when they encode to the same bytes, and they encode to the same
bytes only when they are equal *and* of the same types all the way down: ``1``, ``1.0``, ``True``
and ``"1"`` are four entries, and so are two objects whose ``repr()`` happen to agree. Every
component is written as a one-byte type tag, then its length, then its payload, so that no
concatenation of components can be mistaken for another. Integers are written in binary, so
they have no length limit (``str()`` of an int refuses more than 4,300 digits).

Redis names are bytes: ``{namespace}:{kind}:{function}:{digest}``, with every ``:`` of the
namespace doubled, so that no namespace's names start like another's: ``clear()`` of namespace
``X`` matches ``X:v:*`` and never reaches namespace ``X:v:sub`` (whose names start
``X::v::sub:``).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Hashable
from typing import NamedTuple

from ._protocol import CallKey

__all__ = (
    "KeyNames",
    "Namespace",
    "encode_key",
    "glob_escape",
    "key_digest",
    "key_names",
)

_SCALARS = frozenset({type(None), bool, int, float, str, bytes})

_HOW_TO_FIX = (
    "RedisCache encodes keys made of None, bool, int, float, str, bytes, tuples and frozensets "
    "of those, and importable classes (as cachetools.keys.typedkey adds); pass key= to "
    "@worker_queue to build such a key from the call's arguments"
)


class KeyNames(NamedTuple):
    """The Redis names used for one call key."""

    value: bytes
    """Where the value is stored."""
    lock: bytes
    """The single-flight lease lock; it holds the token of the computation under way."""
    channel: bytes
    """The pub/sub channel on which the lock holder announces that it is done."""
    marker: bytes
    """Set (for a while) when the function's results were found uncacheable: nobody waits."""


def _length(n: int) -> bytes:
    return b"%d:" % n


def _class_name(cls: type) -> str:
    """Return module:qualname for a class that can be found again by that name, else raise."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<locals>" not in qualname:
        try:
            found: object = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        if found is cls:
            return f"{module}:{qualname}"
    raise TypeError(
        f"cannot encode the class {cls!r} in a cache key: it cannot be found again by its module "
        f"and qualified name, so two such classes could share an entry; {_HOW_TO_FIX}"
    )


def _encode(obj: object, out: list[bytes], depth: int) -> None:
    if depth > 100:
        raise TypeError(
            f"cannot encode a cache key nested more than 100 levels deep; {_HOW_TO_FIX}"
        )
    kind = type(obj)
    if kind in _SCALARS:
        if obj is None:
            out.append(b"N")
        elif kind is bool:
            out.append(b"T" if obj else b"F")
        elif kind is int:
            data = obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)  # type: ignore[attr-defined]
            out.extend((b"i", _length(len(data)), data))
        elif kind is float:
            # float.hex() is exact, and tells -0.0 from 0.0 and one NaN payload from another.
            text = obj.hex().encode()  # type: ignore[attr-defined]
            out.extend((b"f", _length(len(text)), text))
        elif kind is str:
            data = obj.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
            out.extend((b"s", _length(len(data)), data))
        else:
            out.extend((b"b", _length(len(obj)), obj))  # type: ignore[arg-type]
    elif isinstance(obj, tuple):
        # Any tuple subclass (a named tuple, cachetools' former _HashedTuple) compares equal to
        # the plain tuple, so it encodes as one.
        out.extend((b"t", _length(len(obj))))
        for item in obj:
            _encode(item, out, depth + 1)
    elif kind is frozenset:
        parts = []
        for item in obj:  # type: ignore[attr-defined]
            sub: list[bytes] = []
            _encode(item, sub, depth + 1)
            parts.append(b"".join(sub))
        parts.sort()
        out.extend((b"z", _length(len(parts)), *parts))
    elif isinstance(obj, type):
        name = _class_name(obj).encode()
        out.extend((b"c", _length(len(name)), name))
    else:
        raise TypeError(
            f"cannot encode a {kind.__module__}.{kind.__qualname__} in a cache key: {_HOW_TO_FIX}"
        )


def encode_key(key: Hashable) -> bytes:
    """Return the canonical bytes of key.

    Raises:
        TypeError: key holds a component that has no canonical encoding.
    """
    out: list[bytes] = []
    _encode(key, out, 0)
    return b"".join(out)


def key_digest(key: Hashable) -> str:
    """Return the hex SHA-256 of the canonical encoding of key."""
    return hashlib.sha256(encode_key(key)).hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def glob_escape(name: bytes) -> bytes:
    """Return name with the characters special to Redis's glob patterns escaped."""
    out = bytearray()
    for byte in name:
        if byte in b"*?[]\\^-":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class Namespace:
    """The Redis names of one namespace."""

    __slots__ = ("epoch", "name", "prefix")

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = _utf8(name).replace(b":", b"::")
        """The namespace as it starts every name: with each ``:`` doubled."""
        self.epoch = self.prefix + b":e"
        """Set by each clear() as it begins, removed as it ends: while it is set, a computation
        stores its result only if it took its lock under it. Outside the pattern clear() scans."""

    def names(self, key: Hashable) -> KeyNames:
        """Return the Redis names for key, a CallKey or (used directly) any encodable key.

        Raises:
            TypeError: key has a component that has no canonical encoding.
        """
        fn, digest = _parts(key)
        tail = b"%s:%s" % (fn, digest)
        p = self.prefix
        return KeyNames(p + b":v:" + tail, p + b":l:" + tail, p + b":c:" + tail, p + b":u:" + fn)

    def value_name(self, key: Hashable) -> bytes:
        """Return the name of key's value alone (``names(key).value``), all that a read needs.

        Raises:
            TypeError: key has a component that has no canonical encoding.
        """
        fn, digest = _parts(key)
        return b"%s:v:%s:%s" % (self.prefix, fn, digest)

    def pattern(self) -> bytes:
        """The SCAN pattern of every key of this namespace (values, locks, markers), only."""
        return glob_escape(self.prefix) + b":[vlu]:*"

    def channel_of_lock(self, lock: bytes) -> bytes:
        """The channel on which the waiters of a lock's computation listen."""
        cut = len(self.prefix) + 1
        return lock[:cut] + b"c" + lock[cut + 1 :]


def _parts(key: Hashable) -> tuple[bytes, bytes]:
    """(the function's name, the hex digest of the call key) of a CallKey or any key."""
    if isinstance(key, CallKey):
        function, call_key = key.function, key.key
        if type(function) is not str:
            raise TypeError(f"CallKey.function must be a str, got {type(function).__qualname__}")
    else:
        function, call_key = "", key
    return _utf8(function), key_digest(call_key).encode()


def key_names(namespace: str, key: Hashable) -> KeyNames:
    """Return the Redis names for key in namespace (see Namespace.names)."""
    return Namespace(namespace).names(key)
