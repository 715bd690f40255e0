"""Name -> balancer class registry, with lazy plug-ins.

Built-in balancers register themselves with :func:`register`. Outside packages add theirs
through the entry-point group ``mtrl.balancers`` (loaded only when asked for, so a broken
plug-in never breaks ``import mtrl``), or are named directly as ``"package.module:Class"``.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from importlib.metadata import entry_points
from typing import Any

from mtrl.balancers.base import Balancer

ENTRY_POINT_GROUP = "mtrl.balancers"
_BUILTIN: dict[str, type[Balancer]] = {}


def register(cls: type[Balancer]) -> type[Balancer]:
    """Class decorator registering a built-in balancer under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    if cls.name in _BUILTIN and _BUILTIN[cls.name] is not cls:
        raise ValueError(f"balancer name {cls.name!r} is already registered")
    _BUILTIN[cls.name] = cls
    return cls


def _origin(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value!r}" + (f" from {dist.name}" if dist is not None else "")


def _plugin_entry_points() -> dict[str, Any]:
    """Plug-in entry points by name. A name taken by a built-in balancer, or offered by
    two installed packages, is left out with a warning naming them (a plug-in never
    replaces a built-in; two different classes under one name would be a guess)."""
    found: dict[str, list[Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    usable = {}
    for name, eps in found.items():
        if name in _BUILTIN:
            warnings.warn(
                f"balancer plug-in {name!r} ({', '.join(map(_origin, eps))}) is ignored: "
                f"{name!r} is a built-in balancer; register the plug-in under another "
                "name", stacklevel=3)
        elif len({ep.value for ep in eps}) > 1:
            warnings.warn(
                f"balancer plug-in name {name!r} is offered by {len(eps)} entry points "
                f"({', '.join(map(_origin, eps))}); it is ignored until one is uninstalled "
                "or renamed (a 'package.module:Class' path still names either)", stacklevel=3)
        else:
            usable[name] = eps[0]
    return usable


def names() -> list[str]:
    """Sorted names of all registered balancers, plug-ins from entry points included."""
    return sorted(set(_BUILTIN) | set(_plugin_entry_points()))


def _check_class(obj: Any, origin: str) -> type[Balancer]:
    if not (inspect.isclass(obj) and issubclass(obj, Balancer)):
        raise ValueError(f"{origin} does not name a subclass of mtrl.balancers.Balancer: {obj!r}")
    if obj is Balancer:
        raise ValueError(
            f"{origin} names the abstract base class; give a subclass that implements "
            "weights() (or combine_rows())"
        )
    return obj


def get_class(name: str) -> type[Balancer]:
    """Resolve a name, an entry-point plug-in, or a ``module:Class`` path to a class."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"balancer name must be a non-empty string, got {name!r}")
    if name in _BUILTIN:
        return _BUILTIN[name]
    eps = _plugin_entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as exc:  # a broken plug-in: say which one
            raise ValueError(
                f"balancer plug-in {name!r} (entry point {eps[name].value!r}) failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return _check_class(obj, f"plug-in {name!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj = getattr(module, attr)
        except Exception as exc:
            raise ValueError(
                f"cannot load balancer {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return _check_class(obj, repr(name))
    raise ValueError(
        f"unknown balancer {name!r}; valid choices: {', '.join(names())} "
        "(or a 'package.module:Class' path)"
    )


def hparam_defaults(cls: type[Balancer]) -> dict[str, Any]:
    """Hyper-parameter names of ``cls`` mapped to their defaults (``inspect._empty`` if none).

    An ``__init__`` that takes ``**kwargs`` (a subclass passing them on to its parent,
    ``class Mine(CAGrad): def __init__(self, **kw)``) also accepts the parent's."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    own = {p.name: p.default for p in params
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        parent = next((c for c in cls.__mro__[1:] if issubclass(c, Balancer)), None)
        if parent is not None and parent is not Balancer:
            return {**hparam_defaults(parent), **own}
    return own


def build(name: str, **hparams: Any) -> Balancer:
    """Build a balancer by name with keyword hyper-parameters.

    Unknown names and unknown hyper-parameters raise ``ValueError`` naming the valid
    choices; out-of-range values raise ``ValueError`` from the class itself.
    """
    cls = get_class(name)
    valid = hparam_defaults(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for balancer {name!r}; "
            f"valid hyper-parameters: {choices}"
        )
    try:
        return cls(**hparams)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid hyper-parameters for balancer {name!r}: {exc}") from exc
