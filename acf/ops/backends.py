"""One backend vocabulary for every op of ``acf.ops`` (what is active: ``acf.ops.info``, ``acf info``).

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

from typing import Sequence

import torch

from .. import _ext

BACKENDS = ("auto", "reference", "extension", "triton", "sdpa")
EXTENSION_DTYPES = (torch.float32, torch.float64)  # what acf._C's kernels take
# What the Triton kernels take (kernels/l2_attention.py checks its inputs against these; ``auto``
# dispatches on them).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_MAX_HEAD_DIM = 128


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
