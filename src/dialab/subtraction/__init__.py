"""PSF-matched image subtraction (Alard & Lupton) in four flavors, with noise decorrelation."""

from .api import subtract
from .config import FLAVORS, SubtractConfig
from .result import SubtractionDiagnostics, SubtractionResult

__all__ = ["FLAVORS", "SubtractConfig", "SubtractionDiagnostics", "SubtractionResult", "subtract"]
