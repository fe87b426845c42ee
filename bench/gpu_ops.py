"""GPU timings of power_iteration (spectral-norm refresh) and fixed_point (fixed-point inversion).

Writes ``OUT/gpu_ops.json`` (rewritten after every row, so a run cut short keeps what it measured):
``{"device", "torch", "extension", "date", "rows": [...], "skipped": [...], "notes"}``, each row
``{op, backend, dtype, batch, heads, n, d, ms, tflops, peak_mem_bytes}`` plus extra keys:

* op ``spectral_norms``: one refresh (1 power-iteration step) of every spectrally normalised layer
  of a CIFAR-10 Residual Flow; backend ``python`` (per-layer ``layer.refresh``) or ``extension``
  (``acf.layers.spectral_norm.refresh_spectral_norms``); batch = number of layers, heads = blocks per scale,
  n = hidden channels, d = 1 (steps); extra ``speedup`` on the extension row.
* op ``fixed_point_solve``: inverting a 4-block stack at tol 1e-6; backend
  ``<method>-<impl>`` with method banach/anderson and impl reference/extension;
  batch = samples, heads = blocks, n = features per sample, d = Anderson memory (0: Banach);
  extra ``g_evals`` (total over the stack), ``max_err`` (max |x_rec - x|), ``workload``.
tflops is null (these ops are latency-bound). peak_mem_bytes: peak allocated during the timed
calls minus what was allocated before.

Build the CUDA extension first (no network needed), from the repository root:
    TORCH_CUDA_ARCH_LIST=9.0 ACF_BUILD_CUDA=1 ACF_REQUIRE_EXTENSION=1 python setup.py build_ext --inplace
Usage: python bench/gpu_ops.py --out DIR [--budget-s 240] [--device cuda|cpu] [--quick]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

from acf import _ext  # noqa: E402
from acf.ops.info import backend_info  # noqa: E402

ROWS: list = []
SKIPPED: list = []
META: dict = {}


def _write(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_ops.json"), "w") as f:
        json.dump({**META, "rows": ROWS, "skipped": SKIPPED}, f, indent=1)


def _time_ms(fn, device: str, reps: int) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` (CUDA events on GPU) and the peak extra memory."""
    fn()  # warm-up
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    times.sort()
    return times[len(times) // 2], int(peak)


def _row(out, **kw) -> dict:
    row = {"op": kw.pop("op"), "backend": kw.pop("backend"), "dtype": kw.pop("dtype", "float32"),
           "batch": kw.pop("batch"), "heads": kw.pop("heads"), "n": kw.pop("n"), "d": kw.pop("d"),
           "ms": round(kw.pop("ms"), 4), "tflops": None, "peak_mem_bytes": kw.pop("peak_mem_bytes")}
    row.update(kw)
    ROWS.append(row)
    _write(out)
    print(json.dumps(row), flush=True)
    return row


def run(out: str, device: str, budget_s: float, quick: bool) -> None:
    t_start = time.time()

    def left() -> float:
        return budget_s - (time.time() - t_start)

    ext_ok = _ext.available() and (device == "cpu" or _ext.cuda_available())
    if not ext_ok:
        SKIPPED.append(f"extension rows: acf._C not usable on {device} ({_ext.error() or 'built without CUDA'})")

    # 1. spectral norm refresh, ResFlow CIFAR-10 (4 blocks per scale, then the paper's 16)
    for blocks in ((4,) if quick else (4, 16)):
        if left() < 30:
            SKIPPED.append(f"spectral_norms blocks={blocks}: time budget spent")
            continue
        try:
            model = W.resflow_stack(blocks, 512, device)
            n_layers = sum(1 for m in model.modules() if hasattr(m, "u"))
            ms_py, mem_py = _time_ms(lambda: W.python_refresh(model), device, 10)
            _row(out, op="spectral_norms", backend="python", batch=n_layers, heads=blocks, n=512, d=1, ms=ms_py,
                 peak_mem_bytes=mem_py)
            if ext_ok:
                ms_ext, mem_ext = _time_ms(lambda: W.extension_refresh(model), device, 10)
                _row(out, op="spectral_norms", backend="extension", batch=n_layers, heads=blocks, n=512, d=1,
                     ms=ms_ext, peak_mem_bytes=mem_ext, speedup=round(ms_py / ms_ext, 3))
            del model
        except Exception as exc:  # noqa: BLE001
            SKIPPED.append(f"spectral_norms blocks={blocks}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        _write(out)

    # 2. fixed-point inversion of block stacks at tol 1e-6
    workloads = [("dense", lambda: W.dense_contractive_blocks(features=1024, batch=64, device=device)),
                 ("resflow", lambda: W.trained_like_blocks(hidden=128, batch=64, device=device))]
    for name, make in workloads:
        if left() < 30:
            SKIPPED.append(f"fixed_point_solve {name}: time budget spent")
            continue
        try:
            blocks, y, x = make()
            feats = y[0].numel()
            configs = [("banach", "reference"), ("banach", "extension"), ("anderson", "extension")]
            if not ext_ok:
                configs = [("banach", "reference"), ("anderson", "reference")]
            base_ms = None
            for method, impl in configs:
                meth = "reference" if (method, impl) == ("banach", "reference") else method
                backend = "reference" if impl == "reference" else "extension"
                res = {}

                def call():
                    res["x"], res["evals"], _ = W.invert_stack(blocks, y, meth, memory=5, backend=backend)

                ms, mem = _time_ms(call, device, 3)
                base_ms = ms if base_ms is None else base_ms
                _row(out, op="fixed_point_solve", backend=f"{method}-{impl}", batch=y.shape[0], heads=len(blocks),
                     n=feats, d=5 if method == "anderson" else 0, ms=ms, peak_mem_bytes=mem, g_evals=res["evals"],
                     max_err=float((res["x"] - x).abs().max()), workload=name,
                     time_vs_banach_reference=round(ms / base_ms, 3))
        except Exception as exc:  # noqa: BLE001
            SKIPPED.append(f"fixed_point_solve {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        _write(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="4 blocks per scale only")
    args = ap.parse_args()
    torch.manual_seed(0)
    META.update(device=(torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"), torch=torch.__version__,
                extension=backend_info()["extension"], date=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                notes="power_iteration and fixed_point: see bench/gpu_ops.py docstring for the meaning of each field")
    _write(args.out)
    run(args.out, args.device, args.budget_s, args.quick)
    _write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
