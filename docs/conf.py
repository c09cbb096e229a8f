"""Sphinx configuration of dialab's reference documentation (built with warnings as errors in the tests)."""

from importlib import metadata

project = "dialab"
author = "the dialab developers"
release = version = metadata.version("dialab")
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"exclude-members": "model_config, model_fields, model_computed_fields"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
