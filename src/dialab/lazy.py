"""Packages whose public names load on first use (PEP 562), so that importing them stays cheap."""

from __future__ import annotations

from importlib import import_module


def lazy_names(package: str, names: dict[str, str], namespace: dict):
    """``__getattr__`` and ``__dir__`` for ``package``: each of ``names`` is imported from its submodule
    (relative to the package) when first asked for, then kept in ``namespace``."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{names[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", names))

    return __getattr__, __dir__
