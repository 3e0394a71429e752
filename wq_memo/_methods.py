"""Memoized methods: binding to instances, and keys that stand for an instance by identity."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from ._controls import BoundMethod

__all__ = ("InstanceKeys", "MemoizedClassMethod", "MemoizedMethod", "MethodState")


class _Instance:
    """Stands for one live instance in cache keys: equal only to itself, holding no reference."""

    __slots__ = ("__weakref__", "keys", "limit")

    def __init__(self) -> None:
        self.keys: set[Hashable] = set()
        """Its keys that may be stored (a superset: evictions are not reported)."""
        self.limit = 16
        """Beyond this many keys, those evicted meanwhile are forgotten."""

    def __repr__(self) -> str:
        return f"<instance #{id(self):x}>"


class InstanceKeys:
    """One stand-in per live instance, so that equal instances never share entries and the
    cache never keeps an instance alive; once an instance is garbage-collected, its entries are
    dropped (at the function's next store, invalidation, clear or cache_info())."""

    __slots__ = ("_contains", "_dead", "_drop", "_instances")

    def __init__(
        self, drop: Callable[[Hashable], None], contains: Callable[[Hashable], bool]
    ) -> None:
        self._instances: dict[int, tuple[weakref.ref[Any], _Instance]] = {}
        self._dead: list[_Instance] = []
        self._drop = drop
        self._contains = contains

    def of(self, obj: Any) -> _Instance:
        """The stand-in of obj, made on first use."""
        ident = id(obj)
        entry = self._instances.get(ident)
        if entry is not None and entry[0]() is obj:
            return entry[1]
        stand_in = _Instance()
        try:
            ref = weakref.ref(obj, functools.partial(self._gone, ident, stand_in))
        except TypeError:
            raise TypeError(
                f"a memoized method's instance of {type(obj).__qualname__} cannot be weakly "
                "referenced, so the cache could not let it go; add '__weakref__' to its "
                "__slots__, or pass key= to build the key from the instance's values"
            ) from None
        self._instances[ident] = (ref, stand_in)
        return stand_in

    def stored(self, key: Hashable) -> None:
        """Remember that key, stored now, belongs to the instance it names."""
        if self._dead:
            self.purge()
        if isinstance(key, tuple) and key and isinstance(key[0], _Instance):
            stand_in = key[0]
            keys = stand_in.keys
            keys.add(key)
            if len(keys) > stand_in.limit:
                # A long-lived instance whose entries the cache evicts: keep only those stored.
                stand_in.keys = keys = {k for k in keys if self._contains(k)}
                stand_in.limit = max(16, 2 * len(keys))

    def forget(self, key: Hashable) -> None:
        """key is no longer stored (invalidated)."""
        if isinstance(key, tuple) and key and isinstance(key[0], _Instance):
            key[0].keys.discard(key)

    def clear(self) -> None:
        """Nothing is stored any more (the cache was cleared)."""
        self._dead.clear()
        for _, stand_in in self._instances.values():
            stand_in.keys.clear()

    def _gone(self, ident: int, stand_in: _Instance, _ref: object) -> None:
        # Called by the garbage collector, maybe in the middle of a cache operation: the
        # entries are dropped later, from the function's own code.
        entry = self._instances.get(ident)
        if entry is not None and entry[1] is stand_in:
            del self._instances[ident]
        if stand_in.keys:
            self._dead.append(stand_in)

    def purge(self) -> None:
        """Drop the entries of instances that have been garbage-collected."""
        while self._dead:
            stand_in = self._dead.pop()
            for key in stand_in.keys:
                self._drop(key)
            stand_in.keys.clear()


class MemoizedMethod:
    """A memoized function defined in a class body: it binds to the instance it is looked up on.

    Placed in a class (``__set_name__``), a direct call ``Class.method(obj, ...)`` is the same as
    ``obj.method(...)``; wrapped by ``staticmethod`` it stays a plain function.
    """

    def __init__(self, memoized: Any, state: MethodState) -> None:
        self._memoized = memoized
        self._state = state
        _take_names(self, memoized)

    def __set_name__(self, owner: type, name: str) -> None:
        self._state.method = True

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        self._state.method = True  # classmethod above it binds through here (up to 3.12)
        return BoundMethod(self._memoized, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._memoized(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._memoized, name)

    def __repr__(self) -> str:
        return f"<memoized method {self.__qualname__}>"


class MemoizedClassMethod:
    """``@worker_queue`` above ``@classmethod``: binds the class, looked up on it or an instance."""

    def __init__(self, memoized: Any) -> None:
        self._memoized = memoized
        _take_names(self, memoized)

    def __get__(self, obj: Any, owner: type | None = None) -> BoundMethod:
        cls = type(obj) if owner is None else owner
        return BoundMethod(self._memoized, cls)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._memoized, name)


def _take_names(descriptor: Any, memoized: Any) -> None:
    for name in ("__module__", "__name__", "__qualname__", "__doc__", "__wrapped__"):
        setattr(descriptor, name, getattr(memoized, name))


class MethodState:
    """Whether a class-body function is used as a method (its first argument is the instance)."""

    __slots__ = ("method",)

    def __init__(self, method: bool = False) -> None:
        self.method = method
