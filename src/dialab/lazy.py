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


def lazy_module(name: str):
    """The module ``name``, imported on first attribute access: a module that needs pandas only inside its
    functions does not make every command that imports it (``dialab subtract`` reads configs) pay pandas'
    half-second import."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
