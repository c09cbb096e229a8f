"""PSF-matched image subtraction (Alard & Lupton) in four flavors, with noise decorrelation."""

from .config import FLAVORS, SubtractConfig
from .flavors import subtract
from .result import SubtractionDiagnostics, SubtractionResult

__all__ = ["FLAVORS", "SubtractConfig", "SubtractionDiagnostics", "SubtractionResult", "subtract"]
