"""dialab: difference image analysis (DIA) and the evaluation of its flavors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dialab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
