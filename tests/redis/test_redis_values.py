"""Stored values: exact JSON without a secret, signed pickle with one, unsigned never unpickled."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from wq_memo.backends._redis_values import BadEntry, Unencodable, ValueCodec

SECRET = b"k" * 32
NAME = b"ns:v:m.f:abc"
UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Trap:
    """Unpickling this calls _record_unpickling: a stand-in for a malicious payload."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_unpickling, ("trap",))


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**80), 1.5, -0.0, "", "é\u2028", [], [1, [2.5, None]], {"a": {"b": [1]}}],
)
def test_json_round_trips_exactly(value: Any) -> None:
    codec = ValueCodec(None)
    back = codec.loads(NAME, codec.dumps(NAME, value))
    assert back == value
    assert repr(back) == repr(value)  # same types: 1.0 stays a float, True stays a bool


@pytest.mark.parametrize(
    "value",
    [(1, 2), [1, (2,)], {1: "a"}, {"a": {2}}, float("nan"), float("inf"), b"x", object()],
    ids=["tuple", "nested-tuple", "int-key", "set", "nan", "inf", "bytes", "object"],
)
def test_json_refuses_values_it_cannot_give_back(value: Any) -> None:
    with pytest.raises(Unencodable, match="secret="):
        ValueCodec(None).dumps(NAME, value)


def test_json_refuses_int_too_long_for_str_conversion() -> None:
    with pytest.raises(Unencodable):
        ValueCodec(None).dumps(NAME, 10**5000)


def test_signed_pickle_round_trips_any_picklable_value() -> None:
    codec = ValueCodec(SECRET)
    value = {"t": (1, 2.0), "s": frozenset({b"x"}), "n": None}
    assert codec.loads(NAME, codec.dumps(NAME, value)) == value


def test_unpicklable_value_is_unencodable() -> None:
    with pytest.raises(Unencodable, match="pickled"):
        ValueCodec(SECRET).dumps(NAME, lambda: 1)


def _signed_trap(codec: ValueCodec) -> bytes:
    return codec.dumps(NAME, _Trap())


def test_tampered_entry_is_refused_and_never_unpickled() -> None:
    codec = ValueCodec(SECRET)
    good = _signed_trap(codec)
    assert codec.loads(NAME, good) == "trap"
    UNPICKLED.clear()
    body = good[4 + 32 :]  # the expiry, then the pickle
    forged = good[:4] + bytes(32) + body
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    for data in (forged, flipped, good[:20], good[:4]):
        with pytest.raises(BadEntry):
            codec.loads(NAME, data)
    assert UNPICKLED == []


def test_entry_signed_with_another_secret_or_for_another_name_is_refused() -> None:
    data = ValueCodec(b"o" * 32).dumps(NAME, _Trap())
    UNPICKLED.clear()
    with pytest.raises(BadEntry, match="signature"):
        ValueCodec(SECRET).loads(NAME, data)
    moved = ValueCodec(SECRET).dumps(b"ns:v:m.f:other", _Trap())
    with pytest.raises(BadEntry, match="signature"):
        ValueCodec(SECRET).loads(NAME, moved)
    assert UNPICKLED == []


def test_unsigned_pickle_and_json_are_refused_with_a_secret() -> None:
    UNPICKLED.clear()
    codec = ValueCodec(SECRET)
    for data in (pickle.dumps(_Trap()), ValueCodec(None).dumps(NAME, 1), b"wq1j1"):
        with pytest.raises(BadEntry):
            codec.loads(NAME, data)
    assert UNPICKLED == []


def test_without_secret_signed_and_foreign_entries_are_refused() -> None:
    UNPICKLED.clear()
    codec = ValueCodec(None)
    signed = ValueCodec(SECRET).dumps(NAME, _Trap())
    for data in (signed, pickle.dumps(_Trap()), b"1", b"wq1j{not json", b"wq1j\xff"):
        with pytest.raises(BadEntry):
            codec.loads(NAME, data)
    assert UNPICKLED == []


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_signed_entries_carry_their_expiry() -> None:
    clock = Clock()
    codec = ValueCodec(SECRET, clock)
    data = codec.dumps(NAME, ("v",), ttl=10)
    clock.now += 9.9
    assert codec.loads(NAME, data) == ("v",)
    clock.now += 0.1
    with pytest.raises(BadEntry, match="expired"):
        codec.loads(NAME, data)
    forever = codec.dumps(NAME, "kept", ttl=None)
    clock.now += 10**9
    assert codec.loads(NAME, forever) == "kept"


def test_entries_of_the_older_signed_format_are_refused_unread() -> None:
    UNPICKLED.clear()
    old = b"wq1p" + bytes(32) + pickle.dumps(_Trap())
    with pytest.raises(BadEntry, match="older signed format"):
        ValueCodec(SECRET).loads(NAME, old)
    with pytest.raises(BadEntry, match="no secret"):
        ValueCodec(None).loads(NAME, old)
    assert UNPICKLED == []


@pytest.mark.parametrize("secret", [None, SECRET])
def test_entries_carry_their_write_time(secret: bytes | None) -> None:
    clock = Clock()
    codec = ValueCodec(secret, clock)
    data = codec.dumps(NAME, [1, "a"], ttl=60)
    clock.now += 7.5
    assert codec.loads_dated(NAME, data) == ([1, "a"], 1_000_000.0)
    assert codec.loads(NAME, data) == [1, "a"]


def test_a_signed_write_time_cannot_be_altered() -> None:
    clock = Clock()
    codec = ValueCodec(SECRET, clock)
    data = codec.dumps(NAME, "v", ttl=60)
    at = 4 + 32 + 8  # tag, MAC, expiry: then the write time
    younger = data[:at] + (int(clock.now * 1000) + 30_000).to_bytes(8, "big") + data[at + 8 :]
    with pytest.raises(BadEntry, match="signature"):
        codec.loads_dated(NAME, younger)


def _undated_signed(name: bytes, value: Any, expires_ms: int) -> bytes:
    """An entry of the previous signed format (wq2p: no write time), as that version wrote it."""
    import hashlib
    import hmac

    body = pickle.dumps(value, protocol=5)
    expiry = expires_ms.to_bytes(8, "big")
    mac = hmac.new(SECRET, b"wq2p", hashlib.sha256)
    for part in (len(name).to_bytes(8, "big"), name, expiry, body):
        mac.update(part)
    return b"wq2p" + mac.digest() + expiry + body


def test_entries_of_the_previous_formats_are_read_as_written_at_the_epoch() -> None:
    clock = Clock()
    assert ValueCodec(None, clock).loads_dated(NAME, b'wq1j{"a":1}') == ({"a": 1}, 0.0)
    old = _undated_signed(NAME, ("t",), int((clock.now + 60) * 1000))
    assert ValueCodec(SECRET, clock).loads_dated(NAME, old) == (("t",), 0.0)
    # Their signature and expiry are still checked.
    with pytest.raises(BadEntry, match="signature"):
        ValueCodec(b"o" * 32, clock).loads_dated(NAME, old)
    clock.now += 60
    with pytest.raises(BadEntry, match="expired"):
        ValueCodec(SECRET, clock).loads_dated(NAME, old)
