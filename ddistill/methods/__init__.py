"""Registry of training methods. A method is one module in this package that decorates its class with `register`.

    get_method("mdlm")      -> the class      available_methods() -> sorted names
"""

from __future__ import annotations

import importlib
import pkgutil

from ddistill.methods.base import Method, NetworkControl, NetworkSpec, Phase, StepContext, StepOutput

__all__ = [
    "Method",
    "NetworkControl",
    "NetworkSpec",
    "Phase",
    "StepContext",
    "StepOutput",
    "register",
    "get_method",
    "available_methods",
]

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must define a non-empty class attribute `name`")
    if not hasattr(cls, "Config"):
        raise TypeError(f"method {name!r} must define a `Config` dataclass")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once so that their @register decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> type[Method]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}") from None


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
