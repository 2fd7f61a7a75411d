"""The ``wsi-lymph`` command line, thin over the library."""

from wsi_lymph.cli.main import main

__all__ = ["main"]
