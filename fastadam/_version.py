"""The single source of fastadam's version (``pyproject.toml`` reads it)."""
__version__ = "0.1.0"
