"""What is active on this machine (``acf info``): versions, the extension, Triton, the device, the
backend each op's ``"auto"`` runs here, and the rule behind it (``acf.ops.backends`` names the backends)."""
from __future__ import annotations

import platform
from typing import Optional

import torch

from .. import _ext
from .._version import __version__
from .backends import extension_supports
from .l2_attention import auto_backend_summary, auto_rule, triton_available


def backend_info() -> dict:
    """Versions, active backends and the device, as a plain dict (printed by ``acf info``)."""
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
        triton_ok = bool(triton_available())
    except Exception:  # triton broken
        triton_ok = False
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info["triton"] = {"available": triton_ok, "version": triton_version}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["backends"] = {
        "spectral_norms": "extension" if extension_supports(dev, torch.float32, False)[0] else "reference",
        "fixed_point_solve": "extension" if extension_supports(dev, torch.float32, True)[0] else "reference",
        "l2_attention": auto_backend_summary(dev),
    }
    info["auto_rules"] = {"l2_attention": auto_rule()}
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
        *(f"auto rule    {op}: {rule}" for op, rule in info.get("auto_rules", {}).items()),
    ]
    return "\n".join(lines)
