"""PSF-matched image subtraction (Alard & Lupton) in four flavors with noise decorrelation, and ZOGY.

Names load on first use, so that ``dialab.subtraction.config`` (the flavor names, the settings) is cheap
to import, e.g. for the command line's ``--help``.
"""

from importlib import import_module

_NAMES = {"FLAVORS": "config", "SubtractConfig": "config", "SubtractionDiagnostics": "result",
          "SubtractionResult": "result", "subtract": "api"}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'dialab.subtraction' has no attribute {name!r}")
    value = getattr(import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
