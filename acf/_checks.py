"""Input validation shared by the public API: every error names the problem."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional, Sequence

import torch

from .errors import ACFError

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


class NonFiniteError(ACFError, ValueError):
    """A tensor that must be finite holds NaN or infinity (``check_finite``)."""


def _count_non_finite(x: torch.Tensor) -> str:
    return f"{int(torch.isnan(x).sum())} NaN, {int(torch.isinf(x).sum())} inf"


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` (a ``ValueError``) if ``x`` holds NaN or infinity (one host sync;
    skipped inside a compiled graph, where a data-dependent check would split the graph)."""
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{name} contains non-finite values ({_count_non_finite(x)})")


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[tuple[str, str]]:
    """``(name, "k NaN, m inf")`` of the first floating-point tensor of ``named`` that holds NaN or
    infinity, or None (one host sync when all are finite)."""
    tensors = [(n, t.detach()) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return None
    name, t = next((n, t) for n, t in tensors if not bool(torch.isfinite(t).all()))
    return name, _count_non_finite(t)


def check_finite_parameter(module: torch.nn.Module, name: str) -> None:
    """Raise ``NonFiniteError`` naming ``<Module>.<name>`` if that parameter of ``module`` holds NaN or
    infinity. Checked once per change of the parameter (its version counter: an optimizer step,
    ``load_state_dict``, an in-place edit), so a forward pays no host sync between changes."""
    if torch.compiler.is_compiling():
        return
    p = getattr(module, name)
    try:
        key = (p._version, p.data_ptr())
    except RuntimeError:  # a torch.func transform's wrapper (no storage): its values are not ours to check
        return
    checked = module.__dict__.setdefault("_finite_checked", {})
    if checked.get(name) == key:
        return
    if not bool(torch.isfinite(p.detach()).all()):
        raise NonFiniteError(f"{type(module).__name__}.{name} is not finite ({_count_non_finite(p.detach())}): "
                             f"the layer would output NaN; load finite weights")
    checked[name] = key


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
        var = name if name.isidentifier() else "x"
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {reference.dtype}; convert "
                        f"the input ({var}.to({reference.dtype})) or the model (model.to({x.dtype}))")


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


def parse_device(device: object, name: str = "device") -> torch.device:
    """The device ``device`` names (``"auto"``: CUDA when available, else the CPU; any other string or
    ``torch.device`` as torch reads it), whether or not this machine has it: a setting stored by a run
    trained elsewhere stays valid. Errors name ``name`` and say what a device looks like."""
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


def _use_instead(name: str) -> str:
    return f"use {name} cpu or auto" if name.startswith("--") else f"use {name}='cpu' or 'auto'"


def resolve_device(device: object, name: str = "device") -> torch.device:
    """``parse_device``, and a device this machine has: a CUDA device without CUDA (torch built without
    it, or no GPU found) or past the last GPU raises one ``ValueError`` naming ``name`` and what to use
    instead (``name`` ``"--device"`` for a command's option)."""
    dev = parse_device(device, name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) found no CUDA device")
            raise ValueError(f"{name} {str(device)!r}: CUDA is not available on this machine ({why}); "
                             f"{_use_instead(name)}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}; choose one of them, or {_use_instead(name)[4:]}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {str(device)!r}: MPS is not available on this machine; {_use_instead(name)}")
    return dev


# Attention layers start at gamma = gamma_init. The layer computes (X + gamma F / L) / (1 + |gamma|):
# beyond |gamma| = 1e6 its identity share 1 / (1 + |gamma|) falls below float32's resolution of its
# output, and at 1e308 the parameter itself overflows float32. The accepted range is therefore
# |gamma_init| <= GAMMA_INIT_MAX.
GAMMA_INIT_MAX = 1e6


def check_gamma_init(value: object, name: str = "gamma_init") -> float:
    """``value`` if it is a finite number with ``|value| <= GAMMA_INIT_MAX``, else an error naming
    ``name`` and the range."""
    return check_real(value, name, low=-GAMMA_INIT_MAX, high=GAMMA_INIT_MAX)
