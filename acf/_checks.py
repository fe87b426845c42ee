"""Input validation shared by the public API: every error names the problem."""
from __future__ import annotations

from typing import Sequence

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
    """Raise ``ValueError`` if ``x`` holds NaN or infinity (one host sync)."""
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
    """Check an NCHW image batch with the expected channel count."""
    check_tensor(x, name, ndim=4)
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}); this layer expects {channels}"
        )
