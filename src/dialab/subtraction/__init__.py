"""PSF-matched image subtraction (Alard & Lupton) in four flavors with noise decorrelation, and ZOGY.

Names load on first use, so that ``dialab.subtraction.config`` (the flavor names, the settings) is cheap
to import, e.g. for the command line's ``--help``.
"""

from ..lazy import lazy_names

_NAMES = {"FLAVORS": "config", "SubtractConfig": "config", "SubtractionDiagnostics": "result",
          "SubtractionResult": "result", "subtract": "api"}

__all__ = list(_NAMES)

__getattr__, __dir__ = lazy_names(__name__, _NAMES, globals())
