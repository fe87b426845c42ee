"""Compile the fused L2-attention kernels for a GPU target without a GPU (ahead-of-time).

Catches Triton compile errors (type mismatches, layout/shape errors, ptxas failures) and reports
each kernel's shared memory, registers and spills for the configurations the launcher would try
first, on a machine with no CUDA device: ``triton.compile`` with an ``ASTSource`` and a
``GPUTarget``; ptxas comes with the Triton wheel (``triton/backends/nvidia/bin``). pytest runs a
subset (``tests/test_triton_compile.py``: sm_90, float32 and bfloat16, head dims 16 and 64, first
configurations, about 40 s on two cores); this script checks the rest (the whole default set takes
minutes on two cores; results are cached in ~/.triton/cache, reruns are fast). ``--cuda`` also
compiles ``csrc/*.cu`` with nvcc from the pip wheels and prints ptxas's report per kernel (the
same as ``tests/test_cuda_compile.py``). The code is shared with those tests: ``tests/gpu_compile.py``.

    python bench/compile_check.py                     # sm_90 (H100/H200), main configurations
    python bench/compile_check.py --all-configs       # also the smaller fallback configurations
    python bench/compile_check.py --arch 80 --dims 32 --dtypes bf16
    python bench/compile_check.py --cuda --dtypes ''                # only the CUDA sources (nvcc)

How the launches are found (``gpu_compile.triton_jobs``): the host wrappers (``_fwd``, ``_bwd``,
``_double_bwd``) run on CPU tensors with ``_launch`` replaced by a recorder, so the kernels,
argument lists and candidate configurations checked are exactly those a real call makes. Scalars
are specialised the way the JIT does (an int equal to 1 becomes a constexpr; ints and pointers
divisible by 16 get the divisibility hint), so the code compiled is the code a real launch compiles.

Limits: this compiles with the local Triton (3.9 here); the GPU machine runs Triton 3.6, whose
code generation (shared memory use in particular) may differ somewhat. A configuration whose
shared memory exceeds the device limit is not an error: ``_launch`` catches OutOfResources and
falls back to the next configuration (``--all-configs`` checks those compile too).
Exit status 1 if any compile fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: the kernels must be JIT functions
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's acf, and the shared compile code

import gpu_compile as G  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--dims", default="16,32,64,128", help="head dims d (= e) to check")
    ap.add_argument("--dtypes", default="fp32-ieee,fp32-tf32,bf16,fp16", help=f"of {list(G.DTYPES)} ('' for none)")
    ap.add_argument("--n", type=int, default=1024, help="sequence length used for the int hints")
    ap.add_argument("--all-configs", action="store_true", help="also the fallback configurations")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--cuda", action="store_true", help="also compile csrc/*.cu with nvcc (sm_80 and sm_90)")
    args = ap.parse_args(argv)

    failed = 0
    if args.cuda:
        if G.cuda_toolkit() is None:
            print("nvcc wheel not installed (pip install -e \".[test]\" on Linux x86-64)")
            failed += 1
        else:
            results = [G.compile_cu(p) for p in sorted((ROOT / "csrc").glob("*.cu"))]
            for res in results:
                if res.returncode != 0:
                    failed += 1
                    print(f"FAIL nvcc {res.source}:\n{res.output}")
            print("\n".join(G.cuda_table(results)) + "\n")

    dtypes = [x for x in args.dtypes.split(",") if x]
    if not dtypes:
        return 1 if failed else 0
    jobs = G.triton_jobs(dtypes=dtypes, dims=[int(x) for x in args.dims.split(",")], arch=args.arch,
                         n=args.n, all_configs=args.all_configs)
    print(f"compiling {len(jobs)} kernels for sm_{args.arch} with {args.jobs} processes ...", flush=True)
    t0 = time.time()
    rows = G.compile_triton(jobs, workers=args.jobs)
    for row in rows:
        if row["status"] != "ok":
            print(f"FAIL {row['kernel']} {row['dtype']} d={row['d']} {row['tile']}: {row['error']}", flush=True)
    print("\n".join(G.triton_table(rows)))
    bad = [r for r in rows if r["status"] != "ok"]
    over = [r for r in rows if r["status"] == "ok" and not r["fits"]]
    spills = [r for r in rows if r["status"] == "ok" and r["spill"] > 0]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} compiled in {time.time() - t0:.0f} s; "
          f"{len(over)} over the shared-memory limit (launcher falls back); {len(spills)} with register spills")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
