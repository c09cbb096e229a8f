"""The names a run compares: flavors and kernel bases, and ``flavor.basis`` method names. Plain Python (no numpy,
no pydantic): the command line builds its choices from them without loading the subtraction."""

from __future__ import annotations

from typing import Literal

Flavor = Literal["convolveTemplate", "convolveScience", "auto", "preconvolution", "zogy"]
FLAVORS: tuple[str, ...] = ("convolveTemplate", "convolveScience", "auto", "preconvolution", "zogy")
BasisName = Literal["alard-lupton", "delta", "psf-models"]
BASES: tuple[str, ...] = ("alard-lupton", "delta", "psf-models")


def parse_method(name: str) -> tuple[str, str | None]:
    """A run's method name, ``flavor`` or ``flavor.basis`` (e.g. ``preconvolution.delta``), as (flavor, basis or
    None for the configured one): a run compares kernel bases as it compares flavors."""
    flavor, _, basis = str(name).partition(".")
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} in {name!r} (flavors: {', '.join(FLAVORS)})")
    if not basis:
        return flavor, None
    if basis not in BASES:
        raise ValueError(f"unknown kernel basis {basis!r} in {name!r} (bases: {', '.join(BASES)})")
    if flavor == "zogy":
        raise ValueError(f"{name!r}: zogy has no matching kernel, so no kernel basis")
    return flavor, basis
