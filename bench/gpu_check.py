"""GPU check of L2 attention: time its backends, write $OUT/gpu_check.json and a markdown table.

JSON: ``{"device", "torch", "triton", "date", "rows": [...], "skipped": [...], "notes": ...}``,
each row ``{op, backend, dtype, batch, heads, n, d, ms, tflops, peak_mem_bytes}`` with op one of
``attention_fwd``, ``attention_vjp``, ``attention_fwd_vjp``, ``logdet_series``, ``matmul_ceiling``.
The JSON and markdown files are rewritten after every row, so a run cut short (timeout, crash,
out of memory) still leaves every row measured so far. A configuration that cannot run (missing
backend, out of memory, time budget spent) is listed in ``skipped`` with the reason.

Precision: fp32 rows run with TF32 matmuls for every backend (``dtype`` "float32" = fp32 storage,
TF32 products; the Triton backend follows ``torch.backends.cuda.matmul.allow_tf32``); bf16 rows
are bf16 end to end (attention) or under ``torch.autocast(bfloat16)`` (log-det block: the
library's spectral norms and attention bound need fp32 weights). The matmul ceiling has a "tf32"
and a "bfloat16" row (8192^3 torch.mm).

FLOPs (per (batch, head), N queries, head dim d = value dim): forward 4 N^2 d (q q^T, P v);
VJP 8 N^2 d of useful work (dv, dP and both roles of dq; the recomputed q q^T not counted);
forward + VJP 12 N^2 d. logdet_series: one real ACF block (bench/logdet_block.py: Residual-Flow
branch with L2 attention, heads x d hidden channels, 16 image channels, h x w = N) with the
8-term power series under no_grad: g forward + 8 VJPs, FLOPs counted for attention, projections
and convolutions (``logdet_block.flops``). peak_mem_bytes: peak allocated during the timed calls
minus what was allocated before (inputs, model).

Order: the comparisons the speed-ups need come first (N = 1024, then 4096; both dtypes;
triton / sdpa / reference side by side), so a budget cut loses the least important rows.

Usage: python bench/gpu_check.py --out DIR [--budget-s 300] [--quick]
       python bench/gpu_check.py --warm I/K     # compile this shard of the Triton kernels only
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import logdet_block as LB  # noqa: E402

MEM_CAP = 110 * 2**30  # leave headroom on a 139 GiB card
ROWS: list[dict] = []
SKIPPED: list[str] = []
META: dict = {}
OUTDIR = "."
DEV = "cuda"
BACKENDS_ALL = ("triton", "sdpa", "reference")
DTYPES = (("bfloat16", torch.bfloat16), ("float32", torch.float32))
# attention (batch, heads, N, d), in priority order
ATTN_CONFIGS = [(64, 16, 1024, 32), (64, 16, 4096, 32), (64, 4, 1024, 16), (64, 16, 256, 32)]
# log-det block (batch, heads, N, d): attention width heads*d, 16 image channels
LOGDET_CONFIGS = [(64, 4, 1024, 16), (64, 4, 4096, 16)]
LOGDET_CHANNELS = 16


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _install_cpu_fakes() -> None:
    """--dry-run-cpu: run the script's logic on CPU with tiny shapes (checks the plumbing, the
    JSON and the table; the numbers mean nothing). CUDA events and memory stats are faked."""
    class _Event:
        def __init__(self, enable_timing=True):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    torch.cuda.Event = _Event
    torch.cuda.empty_cache = lambda: None
    torch.cuda.reset_peak_memory_stats = lambda: None
    torch.cuda.memory_allocated = lambda: 0
    torch.cuda.max_memory_allocated = lambda: 0
    torch.cuda.get_device_name = lambda i=0: "cpu (dry run)"


def save() -> None:
    """Write gpu_check.json and gpu_check.md (atomically: a kill mid-write keeps the old file)."""
    result = dict(META, rows=ROWS, skipped=SKIPPED)
    os.makedirs(OUTDIR, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(result, indent=1)),
                       ("gpu_check.md", f"# GPU check {META.get('date')}: {META.get('device')}, torch "
                                        f"{META.get('torch')}, triton {META.get('triton')}\n\n{markdown()}\n")):
        tmp = os.path.join(OUTDIR, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(OUTDIR, name))


def skip(msg: str) -> None:
    SKIPPED.append(msg)
    print("skipped:", msg, flush=True)
    save()


def timeit(fn, reps: int = 10, warmup: int = 2, slow_s: float = 0.5) -> float:
    """Median milliseconds of fn() with CUDA events; fewer repetitions when one call is slow."""
    t = time.time()
    fn()
    _sync()
    if time.time() - t > slow_s:  # the first call includes compilation; time a second one
        t = time.time()
        fn()
        _sync()
        if time.time() - t > slow_s:
            reps, warmup = 3, 0
    for _ in range(warmup - 1):
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
    tag = f"{op} {backend} {dtype_name} b{batch} h{heads} n{n} d{d}"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        ms = timeit(fn, reps=reps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return skip(f"{tag}: out of memory")
    except Exception as e:  # a backend that fails must not stop the others
        torch.cuda.empty_cache()
        return skip(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    peak = torch.cuda.max_memory_allocated() - base
    row = dict(op=op, backend=backend, dtype=dtype_name, batch=batch, heads=heads, n=n, d=d,
               ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2), peak_mem_bytes=int(peak))
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    save()


def ref_bytes(batch, heads, n) -> int:
    """Rough memory of the materialised reference forward + VJP: ~4 fp32 N x N matrices."""
    return 4 * batch * heads * n * n * 4


def fitting_batch(backend, batch, heads, n) -> int:
    b = batch
    while backend == "reference" and b > 1 and ref_bytes(b, heads, n) > MEM_CAP:
        b //= 2
    return b


def attention_rows(backends, cfg, dtypes, deadline, ops=("fwd", "vjp", "fwd_vjp")):
    from acf.ops.l2_attention import l2_attention

    batch, heads, n, d = cfg
    for dname, dtype in dtypes:
        for be in backends:
            if time.time() > deadline:
                skip(f"attention {be} {dname} b{batch} h{heads} n{n} d{d}: time budget spent")
                continue
            b = fitting_batch(be, batch, heads, n)
            if b != batch:
                skip(f"attention reference {dname} b{batch} h{heads} n{n}: P would not fit; measured at batch {b}")
            try:
                q = torch.randn(b, heads, n, d, device=DEV, dtype=dtype) * 0.5
                v = torch.randn(b, heads, n, d, device=DEV, dtype=dtype)
                g = torch.randn_like(v)
                qg, vg = q.clone().requires_grad_(), v.clone().requires_grad_()
            except torch.cuda.OutOfMemoryError:
                skip(f"attention {be} {dname} b{b} n{n}: inputs out of memory")
                continue
            f4 = 4.0 * b * heads * n * n * d

            def fwd():
                with torch.no_grad():
                    l2_attention(q, v, backend=be)

            def fwd_vjp():
                out = l2_attention(qg, vg, backend=be)
                torch.autograd.grad(out, (qg, vg), g)

            if "fwd" in ops:
                measure("attention_fwd", be, dname, b, heads, n, d, f4, fwd)
            if "vjp" in ops:
                try:
                    o = l2_attention(qg, vg, backend=be)

                    def vjp():
                        torch.autograd.grad(o, (qg, vg), g, retain_graph=True)

                    measure("attention_vjp", be, dname, b, heads, n, d, 2 * f4, vjp)
                    del o
                except torch.cuda.OutOfMemoryError:
                    skip(f"attention_vjp {be} {dname} b{b} n{n}: out of memory")
                except Exception as e:  # noqa: BLE001
                    skip(f"attention_vjp {be} {dname} b{b} n{n}: {type(e).__name__}: {str(e)[:300]}")
            if "fwd_vjp" in ops:
                measure("attention_fwd_vjp", be, dname, b, heads, n, d, 3 * f4, fwd_vjp)
            del q, v, g, qg, vg
            torch.cuda.empty_cache()


def _autocast(dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(DEV, dtype=dtype)


def logdet_rows(backends, cfg, dtypes, deadline):
    """One ACF block (bench/logdet_block.py), 8-term log-det series, attention backend forced."""
    batch, heads, n, d = cfg
    hw = LB.side(n)
    for dname, dtype in dtypes:
        for be in backends:
            if time.time() > deadline:
                skip(f"logdet_series {be} {dname} n{n}: time budget spent")
                continue
            b = fitting_batch(be, batch, heads, n)
            if b != batch:
                skip(f"logdet_series reference {dname} b{batch} n{n}: P would not fit; measured at batch {b}")
            try:
                block = LB.make_block(LOGDET_CHANNELS, hw, heads, d, torch.float32, DEV, be)
                x = torch.randn(b, LOGDET_CHANNELS, *hw, device=DEV)
            except Exception as e:  # noqa: BLE001
                skip(f"logdet_series {be} {dname} n{n}: block construction failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            run = LB.series_call(block, x)

            def series():
                with _autocast(dtype):
                    run()

            measure("logdet_series", be, dname, b, heads, n, d,
                    LB.flops(b, LOGDET_CHANNELS, hw, heads, d), series, reps=5)
            del block, x, run
            torch.cuda.empty_cache()


def matmul_rows():
    for dname, dtype, tf32 in (("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        s = 8192 if DEV == "cuda" else 256
        a = torch.randn(s, s, device=DEV, dtype=dtype)
        b = torch.randn(s, s, device=DEV, dtype=dtype)
        measure("matmul_ceiling", "torch.mm", dname, 1, 1, s, s, 2.0 * s**3, lambda: a @ b, reps=20)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = True


def markdown() -> str:
    lines = ["| op | backend | dtype | batch | heads | N | d | ms | TFLOP/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        lines.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['heads']} | {r['n']} | "
                     f"{r['d']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} |")
    speed = speedups()
    if speed:
        lines += ["", "Speed-ups (same op, dtype, shape; ms ratio; memory ratio reference/triton):"]
        lines += [f"- {s}" for s in speed]
    if SKIPPED:
        lines += ["", "Skipped or changed:"] + [f"- {s}" for s in SKIPPED]
    return "\n".join(lines)


def speedups() -> list[str]:
    """triton vs sdpa / reference for the rows measured at the same shape (the speed-ups of the report)."""
    by = {}
    for r in ROWS:
        by[(r["op"], r["backend"], r["dtype"], r["batch"], r["heads"], r["n"], r["d"])] = r
    out = []
    for (op, be, dt, b, h, n, d), r in by.items():
        if be != "triton":
            continue
        parts = []
        for other in ("sdpa", "reference"):
            o = by.get((op, other, dt, b, h, n, d))
            if o:
                parts.append(f"{o['ms'] / r['ms']:.2f}x vs {other}")
                if other == "reference" and r["peak_mem_bytes"] > 0:
                    parts.append(f"memory 1/{o['peak_mem_bytes'] / r['peak_mem_bytes']:.1f} of reference")
        if parts:
            out.append(f"{op} {dt} b{b} h{h} n{n} d{d}: " + ", ".join(parts))
    return out


def warm(shard: int, shards: int) -> int:
    """Compile (by running tiny versions of) this shard's Triton workloads: fills Triton's disk
    cache so that the timed run does not compile. Tiny inputs keep the same specialisation:
    every N, stride and head count used is a multiple of 16 or the same value."""
    from acf.ops.l2_attention import l2_attention

    torch.backends.cuda.matmul.allow_tf32 = True
    jobs = []
    for (_, heads, n, d) in ATTN_CONFIGS:
        for dname, dtype in DTYPES:
            jobs.append(("attention", heads, d, dtype))
    for (_, heads, n, d) in LOGDET_CONFIGS:
        for dname, dtype in DTYPES:
            jobs.append(("logdet", heads, d, dtype))
    jobs = list(dict.fromkeys(jobs))[shard::shards]
    for kind, heads, d, dtype in jobs:
        t = time.time()
        try:
            if kind == "attention":
                q = (torch.randn(1, heads, 256, d, device=DEV) * 0.5).to(dtype).requires_grad_()
                v = torch.randn(1, heads, 256, d, device=DEV).to(dtype).requires_grad_()
                with torch.no_grad():
                    l2_attention(q, v, backend="triton")
                torch.autograd.grad(l2_attention(q, v, backend="triton"), (q, v), torch.randn_like(v))
            else:
                block = LB.make_block(LOGDET_CHANNELS, (16, 16), heads, d, torch.float32, DEV, "triton")
                x = torch.randn(1, LOGDET_CHANNELS, 16, 16, device=DEV)
                with _autocast(dtype):
                    LB.series_call(block, x)()
            _sync()
            print(f"warm {kind} h{heads} d{d} {dtype}: {time.time() - t:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"warm {kind} h{heads} d{d} {dtype}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


def main() -> int:
    global OUTDIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="small configurations (smoke test)")
    ap.add_argument("--warm", default=None, help="I/K: only compile shard I of K of the Triton workloads")
    ap.add_argument("--dry-run-cpu", action="store_true", help="plumbing test on CPU, tiny shapes")
    args = ap.parse_args()
    if args.dry_run_cpu:
        global DEV
        DEV = "cpu"
        args.quick = True
        _install_cpu_fakes()
    elif not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device", file=sys.stderr)
        return 1
    if args.warm:
        i, k = (int(x) for x in args.warm.split("/"))
        return warm(i, k)
    start = time.time()
    deadline = start + args.budget_s
    OUTDIR = args.out
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32 for every backend
    torch.backends.cudnn.allow_tf32 = True
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    META.update(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton_version,
                date=_dt.date.today().isoformat(),
                notes="fp32 rows: TF32 products for all backends; bf16 log-det rows under autocast; "
                      "reference rows may use a smaller batch where P would not fit (see skipped); "
                      f"logdet_series: ACF block, {LOGDET_CHANNELS} image channels, hidden = heads*d, "
                      f"8-term series, attention backend forced")
    save()
    from acf.ops import l2_attention as F

    backends = list(BACKENDS_ALL) if F.triton_available() else ["sdpa", "reference"]
    if "triton" not in backends:
        skip("triton backend: acf.kernels.l2_attention does not import")
    attn, logdet = ATTN_CONFIGS, LOGDET_CONFIGS
    if args.quick:
        attn, logdet = [(8, 4, 512, 32)], [(8, 4, 256, 16)]
    if args.dry_run_cpu:
        attn, logdet = [(1, 2, 64, 16), (1, 2, 128, 16)], [(1, 2, 64, 16)]
        backends = [b for b in backends if b != "triton"]
    parts = [("matmul ceiling", matmul_rows),
             ("attention N=1024", lambda: attention_rows(backends, attn[0], DTYPES, deadline))]
    parts += [(f"logdet N={logdet[0][2]}", lambda: logdet_rows(backends, logdet[0], DTYPES, deadline))]
    for cfg in attn[1:2]:
        parts.append((f"attention {cfg}", lambda cfg=cfg: attention_rows(backends, cfg, DTYPES, deadline)))
    for cfg in logdet[1:]:
        parts.append((f"logdet {cfg}", lambda cfg=cfg: logdet_rows(backends, cfg, DTYPES, deadline)))
    for cfg in attn[2:]:
        parts.append((f"attention {cfg}", lambda cfg=cfg: attention_rows(backends, cfg, DTYPES, deadline)))
    for name, part in parts:
        try:
            part()
        except Exception:  # noqa: BLE001
            skip(f"{name}: crashed: {traceback.format_exc(limit=3)[-400:]}")
    META["notes"] += f"; wall time {time.time() - start:.0f} s"
    save()
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
