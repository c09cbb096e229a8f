"""The package version, in one place: pyproject.toml reads it (a metadata lookup at import would cost ~0.1 s of
every command's start-up)."""

__version__ = "0.2.0"
