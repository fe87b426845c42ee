"""GPU check of issue 4: time L2 attention backends, write $OUT/gpu_check.json and a markdown table.

Rows: {op, backend, dtype, batch, heads, n, d, ms, tflops, peak_mem_bytes}; ops attention_fwd,
attention_vjp, attention_fwd_vjp, logdet_series, matmul_ceiling. A configuration that cannot run
(missing backend, out of memory, over the per-row memory cap) is recorded in "skipped" with the
reason instead of a row. fp32 attention rows run with TF32 matmuls enabled for every backend
(dtype "float32" = fp32 storage, TF32 products); the matmul ceiling has a "tf32" and a
"bfloat16" row.

FLOP counts (per (batch, head), N queries, head dim d, value dim d): forward 4 N^2 d (q q^T and
P v); VJP 8 N^2 d for the fused backward's useful work (dv, dp, and the dq query/key products;
the recomputation of q q^T is not counted); forward + VJP 12 N^2 d; logdet_series: forward +
n VJPs.

Usage: python bench/gpu_check.py --out DIR [--budget-s 300] [--quick]
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

MEM_CAP = 120 * 2**30  # leave headroom on a 139 GiB card
ROWS: list[dict] = []
SKIPPED: list[str] = []


def _sync():
    torch.cuda.synchronize()


def timeit(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        _sync()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def measure(op, backend, dtype_name, batch, heads, n, d, flops, fn, reps=10):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        ms = timeit(fn, reps=reps)
    except torch.cuda.OutOfMemoryError:
        SKIPPED.append(f"{op} {backend} {dtype_name} b{batch} h{heads} n{n} d{d}: out of memory")
        torch.cuda.empty_cache()
        return
    except Exception as e:  # a backend that fails must not stop the others
        SKIPPED.append(f"{op} {backend} {dtype_name} b{batch} h{heads} n{n} d{d}: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
        return
    peak = torch.cuda.max_memory_allocated() - base
    row = dict(op=op, backend=backend, dtype=dtype_name, batch=batch, heads=heads, n=n, d=d,
               ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2), peak_mem_bytes=int(peak))
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def ref_bytes(batch, heads, n, dtype) -> int:
    """Rough memory of the materialised reference forward + VJP: P, logits, grad of P (fp32)."""
    return 4 * batch * heads * n * n * 4


def attention_rows(backends, configs, dtypes, deadline):
    from acf.functional import l2_attention

    for (batch, heads, n, d) in configs:
        for dname, dtype in dtypes:
            for be in backends:
                if time.time() > deadline:
                    SKIPPED.append(f"attention {be} {dname} b{batch} h{heads} n{n} d{d}: time budget spent")
                    continue
                b = batch
                if be == "reference" and ref_bytes(b, heads, n, dtype) > MEM_CAP:
                    # shrink the batch so P fits; the row records the batch actually used
                    while b > 1 and ref_bytes(b, heads, n, dtype) > MEM_CAP:
                        b //= 2
                    SKIPPED.append(f"reference b{batch} h{heads} n{n} {dname}: P would not fit; measured at batch {b}")
                q = torch.randn(b, heads, n, d, device="cuda", dtype=dtype) * 0.5
                v = torch.randn(b, heads, n, d, device="cuda", dtype=dtype)
                g = torch.randn_like(v)
                qg, vg = q.clone().requires_grad_(), v.clone().requires_grad_()
                f4 = 4.0 * b * heads * n * n * d

                def fwd():
                    with torch.no_grad():
                        l2_attention(q, v, backend=be)

                o = l2_attention(qg, vg, backend=be)

                def vjp():
                    torch.autograd.grad(o, (qg, vg), g, retain_graph=True)

                def fwd_vjp():
                    out = l2_attention(qg, vg, backend=be)
                    torch.autograd.grad(out, (qg, vg), g)

                measure("attention_fwd", be, dname, b, heads, n, d, f4, fwd)
                measure("attention_vjp", be, dname, b, heads, n, d, 2 * f4, vjp)
                del o
                measure("attention_fwd_vjp", be, dname, b, heads, n, d, 3 * f4, fwd_vjp)
                del q, v, g, qg, vg
                torch.cuda.empty_cache()


def logdet_rows(backends, configs, dtypes, deadline, n_terms=8):
    """Power series proxy through one attention block: g(x) = l2_attention(x, x M) with
    n_terms VJPs w <- w^T J_g (Hutchinson), no graph kept, as in the estimator's first stage."""
    from acf.functional import l2_attention

    for (batch, heads, n, d) in configs:
        for dname, dtype in dtypes:
            for be in backends:
                if time.time() > deadline:
                    SKIPPED.append(f"logdet_series {be} {dname} n{n}: time budget spent")
                    continue
                b = batch
                while be == "reference" and b > 1 and ref_bytes(b, heads, n, dtype) > MEM_CAP:
                    b //= 2
                x = (torch.randn(b, heads, n, d, device="cuda", dtype=dtype) * 0.5).requires_grad_()
                m = (torch.randn(d, d, device="cuda", dtype=dtype) / d**0.5)
                w0 = torch.randn_like(x)

                def series():
                    gx = l2_attention(x, x @ m, backend=be)
                    w = w0
                    for _ in range(n_terms):
                        (w,) = torch.autograd.grad(gx, x, w, retain_graph=True)

                flops = 4.0 * b * heads * n * n * d * (1 + 2 * n_terms)
                measure("logdet_series", be, dname, b, heads, n, d, flops, series, reps=5)
                del x, m, w0
                torch.cuda.empty_cache()


def matmul_rows():
    for dname, dtype, tf32 in (("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        s = 8192
        a = torch.randn(s, s, device="cuda", dtype=dtype)
        b = torch.randn(s, s, device="cuda", dtype=dtype)
        measure("matmul_ceiling", "torch.mm", dname, 1, 1, s, s, 2.0 * s**3, lambda: a @ b, reps=20)
    torch.backends.cuda.matmul.allow_tf32 = True


def markdown() -> str:
    lines = ["| op | backend | dtype | batch | heads | N | d | ms | TFLOP/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        lines.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['heads']} | {r['n']} | "
                     f"{r['d']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} |")
    if SKIPPED:
        lines += ["", "Skipped or changed:"] + [f"- {s}" for s in SKIPPED]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="one small configuration (smoke test)")
    args = ap.parse_args()
    start = time.time()
    deadline = start + args.budget_s
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32 for every backend
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from acf import functional as F

    backends = ["triton", "sdpa", "reference"] if F.triton_available() else ["sdpa", "reference"]
    if "triton" not in backends:
        SKIPPED.append("triton backend: acf.kernels.l2_attention does not import")
    configs = [(64, 16, 256, 32), (64, 16, 1024, 32), (64, 16, 4096, 32), (64, 4, 1024, 16)]
    dtypes = [("bfloat16", torch.bfloat16), ("float32", torch.float32)]
    if args.quick:
        configs, dtypes = [(8, 4, 512, 32)], dtypes[:1]
    parts = [
        ("matmul ceiling", lambda: matmul_rows()),
        ("attention", lambda: attention_rows(backends, configs, dtypes, deadline)),
        ("logdet series", lambda: logdet_rows(backends, [(64, 4, 1024, 16)] if not args.quick else configs,
                                              dtypes, deadline)),
    ]
    for name, part in parts:
        try:
            part()
        except Exception:
            SKIPPED.append(f"{name}: crashed: {traceback.format_exc(limit=3)[-400:]}")
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton_version,
                  date=_dt.date.today().isoformat(), rows=ROWS, skipped=SKIPPED,
                  notes="fp32 rows use TF32 products for all backends; reference rows may use a smaller "
                        "batch where P would not fit (see skipped); wall time %.0f s" % (time.time() - start))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown()
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(f"# GPU check {result['date']}: {result['device']}, torch {result['torch']}, triton {triton_version}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
