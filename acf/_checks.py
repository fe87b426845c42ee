"""Input validation shared by the public API: every error names the problem."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    x: torch.Tensor,
    name: str,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    finite: bool = False,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` if ``x`` is not what is expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {allowed}")
    if finite:
        check_finite(x, name)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity (one host sync; skipped inside a compiled
    graph, where a data-dependent check would split the graph)."""
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def check_coefficient(c: float, name: str = "coeff") -> float:
    """A Lipschitz coefficient must lie in (0, 1) for the residual block to stay invertible."""
    c = float(c)
    if not 0.0 < c < 1.0:
        raise ValueError(
            f"{name}={c} is not in (0, 1): a residual block x + g(x) is only guaranteed "
            f"invertible with Lip(g) < 1"
        )
    return c


def check_image(x: torch.Tensor, channels: int, name: str = "input") -> None:
    """Check a non-empty NCHW image batch with the expected channel count."""
    check_tensor(x, name, ndim=4)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass at least one image")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}); this layer expects {channels}"
        )


def check_unit_interval(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds non-finite values or values outside ``[0, 1]`` (one host sync;
    skipped inside a compiled graph)."""
    check_finite(x, name)
    if x.numel() and not torch.compiler.is_compiling():
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name} has values outside [0, 1] (min {low:.4g}, max {high:.4g}); "
                             f"expected images scaled to [0, 1]")


def check_same_dtype(x: torch.Tensor, reference: torch.Tensor, name: str = "input") -> None:
    """Raise ``TypeError`` if ``x`` does not have the dtype of the parameters ``reference`` stands for."""
    if x.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {reference.dtype}; convert "
                        f"the input (x.to({reference.dtype})) or the model (model.to({x.dtype}))")


def check_int(value: object, name: str, minimum: Optional[int] = None) -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum``, else a ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(value: object, name: str, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` if it is a finite real number (not a bool) in the interval ``low .. high`` (bounds included
    unless ``low_open`` / ``high_open``), else a ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low}"
        right = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    """Raise ``ValueError`` naming ``name`` and the choices if ``value`` is not one of them."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_optional_str(value: object, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` is a string or None."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or null, got {value!r} ({type(value).__name__})")


def resolve_device(device: object, name: str = "device") -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other string or ``torch.device`` as torch
    reads it. Errors name ``name`` and say what a device looks like."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"{name} must be a string, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} {device!r} is not a torch device (e.g. 'auto', 'cpu', 'cuda', 'cuda:1')") from None
