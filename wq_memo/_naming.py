"""Names of memoized functions: for messages, and in the keys of caches shared by processes."""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any

__all__ = ("claim", "describe", "in_class_body", "shared_name")

_MAIN_MODULES = ("__main__", "__mp_main__")


def describe(func: Any) -> str:
    """A readable name for any callable: its qualified name, or what it wraps."""
    if isinstance(func, functools.partial):
        return f"functools.partial({describe(func.func)})"
    qualname = getattr(func, "__qualname__", None)
    if isinstance(qualname, str):
        return qualname
    return f"{type(func).__qualname__} instance"


def in_class_body(func: Any) -> bool:
    """Whether func is a function defined directly in a class body (PEP 3155 qualified names)."""
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str) or not hasattr(func, "__code__"):
        return False
    parts = qualname.split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def _module_name(module: str) -> str:
    """The module's import name, also for a script's functions and under ``python -m``.

    A script's functions live in ``__main__`` in the parent and in ``__mp_main__`` in processes
    that multiprocessing spawns; under ``python -m pkg.mod`` they live in ``__main__`` while
    ``import pkg.mod`` puts them in ``pkg.mod``.
    """
    if module not in _MAIN_MODULES:
        return module
    spec = getattr(sys.modules.get(module), "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name not in _MAIN_MODULES:
        return name
    return "__main__"


def shared_name(func: Any, name: str | None) -> str:
    """The name that stands for func in an async cache's keys, the same in every process.

    Raises TypeError when func's qualified name is not unique (a function made in another
    function, a lambda, a partial or a callable object) and no ``name`` is given.
    """
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"@worker_queue: name must be a non-empty str, got {name!r}")
        return name
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        why = "it has no qualified name"
    elif "<locals>" in qualname or "<lambda>" in qualname:
        why = f"its qualified name {qualname!r} is shared by every function made the same way"
    else:
        return f"{_module_name(module)}.{qualname}"
    raise TypeError(
        f"@worker_queue: {describe(func)} needs name='...' to use an async cache: {why}, and "
        "the name keys its entries in a cache other functions and processes share. Pass a "
        "name unique to this function, the same in every process (for a factory, include "
        "what the function depends on, e.g. name=f'scale-by-{factor}')"
    )


# Per async cache object: the names claimed on it, each by a weak reference to its function
# (removed when the function is collected, so that functions made at run time leave nothing).
_claims: dict[int, tuple[Any, dict[str, weakref.ref[Any]]]] = {}


def claim(cache: Any, name: str, memoized: Any) -> None:
    """Record that memoized uses name on cache; raise TypeError if another live one does."""
    ident = id(cache)
    entry = _claims.get(ident)
    if entry is None or _deref(entry[0]) is not cache:
        try:
            holder: Any = weakref.ref(cache, lambda _ref: _claims.pop(ident, None))
        except TypeError:
            holder = cache  # not weakly referable: kept, as its functions keep it anyway
        entry = _claims[ident] = (holder, {})
    names = entry[1]
    ref = names.get(name)
    other = ref() if ref is not None else None
    if other is not None and other is not memoized:
        raise TypeError(
            f"@worker_queue: two functions use the name {name!r} on the same cache "
            f"({describe(other)} and {describe(memoized)}); they would share entries. "
            "Give each a distinct name="
        )
    names[name] = weakref.ref(memoized, functools.partial(_unclaim, names, name))


def _unclaim(names: dict[str, weakref.ref[Any]], name: str, ref: weakref.ref[Any]) -> None:
    """A function that claimed name is gone: its entry goes, unless another claims it now."""
    if names.get(name) is ref:
        del names[name]


def _deref(holder: Any) -> Any:
    return holder() if isinstance(holder, weakref.ref) else holder
