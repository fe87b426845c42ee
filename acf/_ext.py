"""Loader of the compiled extension ``acf._C`` (``csrc/``).

``load()`` imports it once. If it is missing or fails to load, ONE warning says so and every
caller falls back to the pure-PyTorch reference. ``ACF_DISABLE_EXTENSION=1`` skips it on purpose
(no warning), e.g. to compare against the reference.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (libtorch must be loaded before the extension's shared library)

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """``acf._C`` (its operators are ``torch.ops.acf.*``), or None with one warning."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("ACF_DISABLE_EXTENSION", "").strip() in ("1", "true", "yes"):
        _error = "disabled by ACF_DISABLE_EXTENSION=1"
        return None
    try:
        _module = importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # not built, built against another torch, missing symbols, ...
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"acf: the compiled extension acf._C is not available ({_error}); using the pure-PyTorch "
            f"references of its ops (L2 attention on CPU, power iteration, fixed-point inversion: slower, same "
            f"results). "
            f"Rebuild with `pip install --no-build-isolation -e .` after installing torch.",
            RuntimeWarning, stacklevel=2)
    return _module


def available() -> bool:
    """True if ``acf._C`` loaded (CPU kernels)."""
    return load() is not None


def cuda_available() -> bool:
    """True if ``acf._C`` was built with its CUDA kernels."""
    mod = load()
    return mod is not None and bool(getattr(mod, "WITH_CUDA", 0))


def error() -> Optional[str]:
    """Why the extension is not loaded (None if it is, or if ``load()`` was not called yet)."""
    return _error


def max_anderson_memory() -> int:
    mod = load()
    return int(getattr(mod, "MAX_ANDERSON_MEMORY", 16)) if mod is not None else 16
