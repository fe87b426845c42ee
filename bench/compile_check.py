"""Compile the fused L2-attention kernels for a GPU target without a GPU (ahead-of-time).

Catches Triton compile errors (type mismatches, layout/shape errors, ptxas failures) and reports
each kernel's shared memory, registers and spills for the configurations the launcher would try
first, on a machine with no CUDA device: ``triton.compile`` with an ``ASTSource`` and a
``GPUTarget``; ptxas comes with the Triton wheel (``triton/backends/nvidia/bin``). Not part of
pytest (it takes minutes on two cores; results are cached in ~/.triton/cache, reruns are fast).

    python bench/compile_check.py                     # sm_90 (H100/H200), main configurations
    python bench/compile_check.py --all-configs       # also the smaller fallback configurations
    python bench/compile_check.py --arch 80 --dims 32 --dtypes bf16

How the launches are found: the host wrappers (``_fwd``, ``_bwd``, ``_double_bwd``) run on CPU
tensors with ``_launch`` replaced by a recorder, so the kernels, argument lists and candidate
configurations checked are exactly those a real call makes. Scalars are specialised the way the
JIT does (an int equal to 1 becomes a constexpr; ints and pointers divisible by 16 get the
divisibility hint), so the code compiled is the code a real launch compiles.

Limits: this compiles with the local Triton (3.9 here); the GPU machine runs Triton 3.6, whose
code generation (shared memory use in particular) may differ somewhat. A configuration whose
shared memory exceeds the device limit is not an error: ``_launch`` catches OutOfResources and
falls back to the next configuration (``--all-configs`` checks those compile too).
Exit status 1 if any compile fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the kernels must be JIT functions

import torch  # noqa: E402

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # max dynamic smem per block (bytes)
DTYPES = {"fp32-ieee": (torch.float32, "ieee"), "fp32-tf32": (torch.float32, "tf32"),
          "bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "fp64": (torch.float64, "ieee")}
TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def record_launches(dtype: torch.dtype, prec: str, d: int, e: int, n: int, b: int = 2, h: int = 2):
    """Run the host wrappers on CPU with a recording ``_launch``; return the recorded launches."""
    import acf.kernels.l2_attention as K

    calls = []

    def recorder(kernel, kind, rows_of, bh, n_, bd, be, dt, args, **consts):
        calls.append(dict(kernel=kernel.fn.__name__, kind=kind, n=n_, bd=bd, be=be, dtype=dt,
                          args=args, consts=consts, arg_names=list(kernel.arg_names)))

    saved = K._launch
    K._launch = recorder
    try:
        q = torch.randn(b, h, n, d, dtype=dtype)
        v = torch.randn(b, h, n, e, dtype=dtype)
        g = torch.randn_like(v)
        o, lse, sq = K._fwd(q, v, 0.25, prec)
        _, _, delta = K._bwd(q, v, sq, o, lse, g, 0.25, prec)
        K._double_bwd(q, v, sq, o, lse, g, delta, torch.randn_like(q), torch.randn_like(v), 0.25, prec)
    finally:
        K._launch = saved
    return calls


def signature_of(call: dict, cfg: dict):
    """(signature, constexprs, attrs) as the JIT would build them for these arguments."""
    names = call["arg_names"]
    consts = dict(call["consts"], BLOCK_D=call["bd"], BLOCK_E=call["be"],
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
            continue
        a = call["args"][i]
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TT[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh torch allocations are 16-byte aligned
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                sig[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(a).__name__}")
    return sig, constexprs, attrs


def ptxas_usage(ptx: str, arch: int):
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX."""
    import triton

    try:  # the ptxas Triton itself uses for this arch (the wheel bundles two)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - older Triton: the bundled default
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                           capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return (int(regs.group(1)) if regs else -1), (max(spill) if spill else 0)


def compile_one(job: dict):
    """Worker: compile one (kernel, config) for the target; return a result row."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import acf.kernels.l2_attention as K

    fn = getattr(K, job["kernel"])
    cfg = job["cfg"]
    row = dict(job["label"])
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=job["sig"], constexprs=job["constexprs"], attrs=job["attrs"])
        ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        regs, spill = ptxas_usage(ck.asm["ptx"], job["arch"])
        smem = int(ck.metadata.shared)
        row.update(status="ok", smem=smem, regs=regs, spill=spill,
                   fits=smem <= SMEM_LIMIT.get(job["arch"], 232448))
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        row.update(status="FAIL", error=" | ".join(msg[:3])[:400])
    row["secs"] = round(time.time() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--dims", default="16,32,64,128", help="head dims d (= e) to check")
    ap.add_argument("--dtypes", default="fp32-ieee,fp32-tf32,bf16,fp16", help=f"of {list(DTYPES)}")
    ap.add_argument("--n", type=int, default=1024, help="sequence length used for the int hints")
    ap.add_argument("--all-configs", action="store_true", help="also the fallback configurations")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    args = ap.parse_args(argv)

    import acf.kernels.l2_attention as K

    jobs = []
    for dname in args.dtypes.split(","):
        dtype, prec = DTYPES[dname]
        for d in (int(x) for x in args.dims.split(",")):
            for call in record_launches(dtype, prec, d, d, args.n):
                cfgs = K._configs(call["kind"], call["n"], call["bd"], call["be"], dtype, call["consts"].get("PRECISION"))
                for ci, cfg in enumerate(cfgs if args.all_configs else cfgs[:1]):
                    sig, constexprs, attrs = signature_of(call, cfg)
                    label = dict(kernel=call["kernel"], dtype=dname, d=d, cfg=ci,
                                 tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}")
                    jobs.append(dict(kernel=call["kernel"], cfg=cfg, sig=sig, constexprs=constexprs,
                                     attrs=attrs, arch=args.arch, label=label))
    print(f"compiling {len(jobs)} kernels for sm_{args.arch} with {args.jobs} processes ...", flush=True)
    rows = []
    t0 = time.time()
    with cf.ProcessPoolExecutor(args.jobs) as ex:
        for row in ex.map(compile_one, jobs):
            rows.append(row)
            if row["status"] != "ok":
                print(f"FAIL {row['kernel']} {row['dtype']} d={row['d']} {row['tile']}: {row['error']}", flush=True)
    print(f"| kernel | dtype | d | config | tile | status | smem KiB | regs | spill B | s |")
    print(f"|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            note = "" if r["fits"] else " (over smem limit: falls back)"
            print(f"| {r['kernel']} | {r['dtype']} | {r['d']} | {r['cfg']} | {r['tile']} | ok{note} | "
                  f"{r['smem'] / 1024:.1f} | {r['regs']} | {r['spill']} | {r['secs']} |")
        else:
            print(f"| {r['kernel']} | {r['dtype']} | {r['d']} | {r['cfg']} | {r['tile']} | FAIL | | | | {r['secs']} |")
    bad = [r for r in rows if r["status"] != "ok"]
    over = [r for r in rows if r["status"] == "ok" and not r["fits"]]
    spills = [r for r in rows if r["status"] == "ok" and r["spill"] > 0]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} compiled in {time.time() - t0:.0f} s; "
          f"{len(over)} over the shared-memory limit (launcher falls back); {len(spills)} with register spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
