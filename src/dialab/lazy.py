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


class _Deferred:
    """Stands for a module and imports it at the first attribute asked for. It is not placed in ``sys.modules``:
    code that walks the loaded modules (astropy's configuration does, at import) would load it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_module(name: str):
    """The module ``name``, imported on first attribute access: a module that needs pandas only inside its
    functions does not make every command that imports it (``dialab subtract`` reads configs) pay pandas'
    half-second import."""
    return _Deferred(name)
