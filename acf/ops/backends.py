"""One backend vocabulary for every op of ``acf.ops``, and what is active (``acf info``).

``backend=`` takes, for every op:

* ``"auto"``: the fastest implementation that supports the inputs (each op states its rule);
* ``"reference"``: the pure-PyTorch implementation every fast path is tested against;
* ``"extension"``: the compiled extension ``acf._C`` (CPU kernels, and CUDA kernels where built);
* ``"triton"``: Triton kernels (``l2_attention`` only; CUDA, or CPU under ``TRITON_INTERPRET=1``);
* ``"sdpa"``: PyTorch's ``scaled_dot_product_attention`` on augmented vectors (``l2_attention``
  only; first order).

An op given a backend it does not implement raises a ``ValueError`` naming the ones it does.
"""
from __future__ import annotations

import platform
from typing import Optional, Sequence

import torch

from .. import _ext

BACKENDS = ("auto", "reference", "extension", "triton", "sdpa")
EXTENSION_DTYPES = (torch.float32, torch.float64)


def check_backend(backend: object, op: str, supported: Sequence[str]) -> str:
    """``backend`` if ``op`` implements it, else a ``ValueError`` naming the ones it does."""
    if backend not in supported:
        known = "" if backend in BACKENDS else f" (the backends are {', '.join(map(repr, BACKENDS))})"
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, supported))}, got {backend!r}{known}")
    return backend


def extension_supports(device: torch.device, dtype: torch.dtype, needs_device_kernels: bool) -> tuple[bool, str]:
    """``(True, "")`` if ``acf._C`` can run an op on ``device`` and ``dtype`` (``needs_device_kernels``:
    the op has CUDA kernels of its own, not only ATen calls), else ``(False, why)``."""
    if not _ext.available():
        return False, f"the extension acf._C is not loaded ({_ext.error()})"
    if dtype not in EXTENSION_DTYPES:
        return False, f"the extension supports float32 and float64, not {dtype}"
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if needs_device_kernels and not _ext.cuda_available():
            return False, "acf._C was built without its CUDA kernels"
        return True, ""
    return False, f"the extension does not support device {device}"


def use_extension(backend: str, device: torch.device, dtype: torch.dtype, needs_device_kernels: bool,
                  what: str) -> bool:
    """Whether op ``what`` runs on ``acf._C`` for ``backend`` ("auto", "extension" or "reference");
    ``"extension"`` that cannot run raises, naming why."""
    if backend == "reference":
        return False
    ok, why = extension_supports(device, dtype, needs_device_kernels)
    if backend == "extension" and not ok:
        raise RuntimeError(f"{what}: backend='extension' requested but {why}")
    return ok


def backend_info() -> dict:
    """Versions, active backends and the device, as a plain dict (printed by ``acf info``)."""
    from .. import __version__

    ext = _ext.load()
    info: dict = {
        "acf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
        "extension": {
            "loaded": ext is not None,
            "cpu": ext is not None,
            "cuda": bool(ext is not None and getattr(ext, "WITH_CUDA", 0)),
            "path": getattr(ext, "__file__", None),
            "error": _ext.error(),
            # the CPU attention kernels' instruction set, picked at run time (ACF_CPU_ISA overrides)
            "cpu_isa": torch.ops.acf.cpu_isa() if ext is not None and hasattr(torch.ops.acf, "cpu_isa") else None,
        },
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        info["device"] = f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    try:
        from .l2_attention import triton_available
        triton_ok = bool(triton_available())
    except Exception:  # no such helper, or triton broken
        triton_ok = False
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info["triton"] = {"available": triton_ok, "version": triton_version}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .l2_attention import auto_backend_summary

    info["backends"] = {
        "spectral_norms": "extension" if extension_supports(dev, torch.float32, False)[0] else "reference",
        "fixed_point_solve": "extension" if extension_supports(dev, torch.float32, True)[0] else "reference",
        "l2_attention": auto_backend_summary(dev),
    }
    return info


def format_backend_info(info: Optional[dict] = None) -> str:
    """``backend_info()`` as the lines ``acf info`` prints."""
    info = backend_info() if info is None else info
    ext = info["extension"]
    ext_state = ("not loaded" + (f" ({ext['error']})" if ext["error"] else "")) if not ext["loaded"] else \
        "loaded: CPU" + (f" ({ext['cpu_isa']} attention kernels)" if ext.get("cpu_isa") else "") + \
        (" + CUDA" if ext["cuda"] else " (no CUDA kernels)")
    lines = [
        f"acf          {info['acf']}",
        f"python       {info['python']}",
        f"torch        {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"device       {info['device']}",
        f"extension    acf._C {ext_state}",
        f"triton       {'available ' + str(info['triton']['version']) if info['triton']['available'] else 'not available'}",
        "backends     " + ", ".join(f"{k}={v}" for k, v in info["backends"].items()),
    ]
    return "\n".join(lines)
