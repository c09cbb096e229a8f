"""PSF-matched image subtraction (Alard & Lupton) in four flavors, with noise decorrelation."""

from .flavors import FLAVORS, SubtractConfig, SubtractionResult, subtract

__all__ = ["FLAVORS", "SubtractConfig", "SubtractionResult", "subtract"]
