"""PSF-matched image subtraction (Alard & Lupton) in four flavors, with noise decorrelation."""

from .config import FLAVORS, SubtractConfig
from .result import SubtractionDiagnostics, SubtractionResult
from .steps import subtract

__all__ = ["FLAVORS", "SubtractConfig", "SubtractionDiagnostics", "SubtractionResult", "subtract"]
