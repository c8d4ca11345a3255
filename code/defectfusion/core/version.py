"""The package's version, in the core layer so that any module can record it without
importing the package root (whose `load` reaches up to serving)."""

__version__ = "0.1.0"
