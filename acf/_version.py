"""The version of ACF: the one place it is written (``pyproject.toml`` reads it, ``acf.__version__``)."""
__version__ = "0.1.0"
