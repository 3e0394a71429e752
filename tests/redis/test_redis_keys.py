"""The canonical key encoding: equal only for equal keys of equal types, TypeError otherwise."""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any

import cachetools.keys
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import Namespace, encode_key, key_names


class _SameRepr:
    def __init__(self, tag: int) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return "same"

    def __hash__(self) -> int:
        return 0


def test_scalars_of_different_types_differ() -> None:
    keys: list[Hashable] = [1, 1.0, True, "1", b"1", None, "None", 0, False, 0.0, -0.0, ""]
    assert len({encode_key(k) for k in keys}) == len(keys)


def test_repr_and_str_colliding_keys_differ() -> None:
    keys: list[Hashable] = [
        ("a,b",),
        ("a", "b"),
        ("1", 1),
        ("1", "1"),
        ((1, 2),),
        (1, 2),
        ("(1, 2)",),
        ("a", ("b",)),
        (("a", "b"),),
        ("ab",),
        (b"ab",),
        ("a\x00b",),
        ("",),
        ((),),
        (),
        (None,),
        ("None",),
    ]
    assert len({encode_key(k) for k in keys}) == len(keys)


def test_frozenset_order_does_not_matter_but_content_does() -> None:
    a = frozenset(["x", "y", 3])
    b = frozenset([3, "y", "x"])
    assert encode_key(a) == encode_key(b)
    assert encode_key(a) != encode_key(frozenset(["x", "y", 3.0]))
    assert encode_key(frozenset()) != encode_key(())


def test_tuple_subclasses_encode_as_the_equal_plain_tuple() -> None:
    point = collections.namedtuple("point", "x y")
    assert encode_key(point(1, 2)) == encode_key((1, 2))


def test_cachetools_keys_are_encodable_and_distinct() -> None:
    plain = cachetools.keys.hashkey(1, 2)
    with_kwargs = cachetools.keys.hashkey(1, y=2)
    typed = cachetools.keys.typedkey(1, y=2)
    typed_float = cachetools.keys.typedkey(1.0, y=2)
    encoded = {encode_key(k) for k in (plain, with_kwargs, typed, typed_float)}
    assert len(encoded) == 4
    assert encode_key(with_kwargs) == encode_key(cachetools.keys.hashkey(1, y=2))


@pytest.mark.parametrize(
    "key",
    [
        [1, 2],
        (1, [2]),
        {"a": 1},
        _SameRepr(1),
        (1, _SameRepr(2)),
        frozenset([_SameRepr(3)]),
        object(),
    ],
    ids=["list", "nested-list", "dict", "object", "nested-object", "in-frozenset", "bare-object"],
)
def test_unencodable_key_raises_type_error_that_says_what_to_do(key: Any) -> None:
    with pytest.raises(TypeError, match=r"pass key= to @worker_queue"):
        encode_key(key)


def test_ints_are_encoded_whatever_their_length() -> None:
    keys: list[Hashable] = [10**10_000, -(10**10_000), 10**10_000 + 1, 0, -1, 255, -256, 2**63]
    assert len({encode_key(k) for k in keys}) == len(keys)
    assert encode_key(10**10_000) != encode_key(str(10**100))


def test_a_call_key_whose_function_is_not_a_str_is_refused() -> None:
    with pytest.raises(TypeError, match="function must be a str"):
        key_names("ns", CallKey(1, ()))  # type: ignore[arg-type]


def test_namespaces_never_share_a_prefix() -> None:
    from wq_memo.backends._redis_keys import Namespace

    names = ["X", "X:", "X:v", "X:v:sub", "X::v", "X:l:", "X*", "X?"]
    prefixes = [Namespace(n).prefix for n in names]
    for a, name_a in zip(prefixes, names, strict=True):
        for kind in (b"v", b"l", b"u"):
            own = a + b":" + kind + b":"
            others = [b for b, name_b in zip(prefixes, names, strict=True) if name_b != name_a]
            assert not any((b + b":" + kind + b":").startswith(own) for b in others)


def test_subclass_of_a_scalar_is_refused() -> None:
    class Flag(int):
        pass

    with pytest.raises(TypeError, match="Flag"):
        encode_key((Flag(1),))


def test_local_classes_are_refused_importable_ones_accepted() -> None:
    class Local:
        pass

    with pytest.raises(TypeError, match="cannot be found again"):
        encode_key((Local,))
    assert encode_key((int,)) != encode_key((float,))
    assert encode_key((int,)) != encode_key(("builtins:int",))


def test_too_deep_key_is_refused() -> None:
    key: Any = ()
    for _ in range(150):
        key = (key,)
    with pytest.raises(TypeError, match="nested"):
        encode_key(key)


def test_names_separate_functions_and_namespaces() -> None:
    a = key_names("ns", CallKey("m.f", (1,)))
    b = key_names("ns", CallKey("m.g", (1,)))
    c = key_names("other", CallKey("m.f", (1,)))
    assert len({a.value, b.value, c.value}) == 3
    assert a.value.startswith(b"ns:v:m.f:")
    assert a.lock.startswith(b"ns:l:m.f:")
    assert a.channel.startswith(b"ns:c:m.f:")
    assert a.marker == b"ns:u:m.f"
    assert key_names("ns", CallKey("m.f", (1,))) == a


def test_pattern_escapes_glob_characters() -> None:
    assert Namespace("a*b?[c]\\").pattern() == b"a\\*b\\?\\[c\\]\\\\:[vlu]:*"


def _canon(obj: Any) -> Any:
    """A structural description that is equal exactly when two keys must share an entry."""
    kind = type(obj)
    if kind is float:
        return ("float", obj.hex())
    if kind is tuple:
        return ("tuple", tuple(_canon(x) for x in obj))
    if kind is frozenset:
        return ("frozenset", tuple(sorted((_canon(x) for x in obj), key=repr)))
    return (kind.__name__, obj)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-(10**5000), 10**5000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
    | st.binary(max_size=5)
)
_keys = st.recursive(
    _scalars,
    lambda inner: (
        st.tuples(inner, inner)
        | st.lists(inner, max_size=3).map(tuple)
        # frozensets of mixed numbers collapse 1 and True; that is Python's equality, not ours.
        | st.frozensets(st.text(max_size=3) | st.binary(max_size=3), max_size=3)
    ),
    max_leaves=8,
)


@given(_keys, _keys)
def test_encoding_is_injective_on_typed_structure(a: Any, b: Any) -> None:
    assert (encode_key(a) == encode_key(b)) == (_canon(a) == _canon(b))


@given(st.sampled_from(["ns", "X:v", "a*b", "é:"]), st.text(max_size=4), _keys)
def test_the_value_name_alone_is_the_value_of_all_the_names(
    namespace: str, function: str, key: Any
) -> None:
    ns = Namespace(namespace)
    for k in (CallKey(function, key), key):
        assert ns.value_name(k) == ns.names(k).value


def test_the_value_name_alone_refuses_what_the_names_refuse() -> None:
    ns = Namespace("ns")
    for bad in (CallKey(1, ()), CallKey("f", (object(),))):  # type: ignore[arg-type]
        with pytest.raises(TypeError) as names_error:
            ns.names(bad)
        with pytest.raises(TypeError) as value_error:
            ns.value_name(bad)
        assert str(value_error.value) == str(names_error.value)
