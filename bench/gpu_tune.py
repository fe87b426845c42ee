"""Launch configurations of the Triton L2-attention kernels on a GPU, and the TF32 error budget.

Two measurements for the lent GPU machine (``bench/gpu_check.sh`` runs the standard check; this one
looks at why the bf16 VJP trails SDPA and at the TF32 forward's error):

* ``--warm i/n``: compile shard ``i`` of ``n`` of the candidate configurations (Triton compiles on
  the CPU; run the shards side by side, the on-disk cache serves the timing run).
* ``--time``: for each kernel kind ("fwd", "col", "row" of the VJP) and each candidate
  (BLOCK_M, BLOCK_N, num_warps, num_stages), the median time at the benchmark shape (bf16, batch 64,
  16 heads, N 4096 and 1024, head dim 32) of the forward ("fwd") or of the whole VJP (both passes,
  the other one as shipped), with its output compared to the shipped configuration's (max abs
  difference: tiles change the summation order only); and the kernel's TF32 forward errors
  against float64 beside the PyTorch reference's (``tests/attention_rule.py``'s rule) for
  ``input_precision`` "tf32" and "tf32x3".

Writes ``OUT/gpu_tune.json`` (rewritten after every row). Usage, from the repository root:
    python bench/gpu_tune.py --warm 0/4 & ... ; python bench/gpu_tune.py --time --out DIR --budget-s 120
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from acf.kernels import l2_attention as K  # noqa: E402
from gpu_check import timeit  # noqa: E402 (bench/ is on the path when this file runs)
from acf.ops.l2_attention import l2_attention_reference  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kind; the shipped first choice is measured too.
CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)],
    "col": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (16, 128, 4, 3), (64, 128, 4, 2), (32, 64, 4, 4)],
    "row": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4), (128, 16, 4, 3), (64, 128, 8, 3)],
}
SHAPES = [(64, 16, 4096, 32), (64, 16, 1024, 32)]
DTYPE = torch.bfloat16
ORIGINAL = K._configs


def shipped(kind: str, n: int, d: int) -> tuple:
    c = ORIGINAL(kind, n, K._pow2(d), K._pow2(d), DTYPE, "ieee")[0]
    return (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])


def use(kind: str, cfg: tuple) -> None:
    """Make ``kind`` launch with ``cfg`` only (the others as shipped)."""
    m, n, w, s = cfg
    K._configs = lambda k, *a, **kw: ([dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)] if k == kind
                                      else ORIGINAL(k, *a, **kw))
    K._CHOSEN.clear()


def inputs(b: int, h: int, n: int, d: int, dtype=DTYPE):
    g = torch.Generator(device="cuda").manual_seed(n + d)
    mk = lambda: torch.randn(b, h, n, d, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    return mk(), mk(), mk()


def run_kind(kind: str, q, v, g, scale: float):
    """The output of ``kind``'s kernel(s): o (fwd), dv (col), dq (row)."""
    o, lse, sq = K._fwd(q, v, scale, "ieee")
    if kind == "fwd":
        return o
    dq, dv, _ = K._bwd(q, v, sq, o, lse, g, scale, "ieee")
    return dv if kind == "col" else dq


def all_configs() -> list[tuple[str, tuple, tuple]]:
    out = []
    for shape in SHAPES:
        for kind, cands in CANDIDATES.items():
            for cfg in [shipped(kind, shape[2], shape[3])] + [c for c in cands if c != shipped(kind, shape[2], shape[3])]:
                out.append((kind, cfg, shape))
    return out


def warm(shard: int, shards: int) -> None:
    for i, (kind, cfg, (_, _, n, d)) in enumerate(all_configs()):
        if i % shards != shard:
            continue
        use(kind, cfg)
        t = time.time()
        try:
            run_kind(kind, *inputs(1, 16, n, d), d ** -0.5)  # the timed shape's integer specialisation
            torch.cuda.synchronize()
            print(f"{kind} {cfg} n{n}: {time.time() - t:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is a result
            print(f"{kind} {cfg} n{n}: FAILED {type(exc).__name__}: {exc}"[:300], flush=True)


def tf32_rows() -> list[dict]:
    """Forward errors against float64: the kernel at "tf32" and "tf32x3", the TF32 PyTorch reference."""
    rows = []
    gen = torch.Generator().manual_seed(1000 * 1000 + 10 * 32 + 32)  # tests/attention_rule.py's draw
    q64, v64 = (torch.randn(2, 2, 1000, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    q, v = q64.float().cuda(), v64.float().cuda()
    scale = 32 ** -0.5
    exact = l2_attention_reference(q64.cuda(), v64.cuda(), scale)
    torch.backends.cuda.matmul.allow_tf32 = True
    ref = l2_attention_reference(q, v, scale)
    rows.append(dict(what="reference tf32", err=(ref.double() - exact).abs().max().item()))
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = l2_attention_reference(q, v, scale)
    rows.append(dict(what="reference ieee", err=(ref.double() - exact).abs().max().item()))
    for prec in ("tf32", "tf32x3", "ieee"):
        K._configs = ORIGINAL
        K._CHOSEN.clear()
        try:
            o, _, _ = K._fwd(q, v, scale, prec)
            rows.append(dict(what=f"kernel {prec}", err=(o.double() - exact).abs().max().item()))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(what=f"kernel {prec}", error=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", help="compile shard i/n of the candidates")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=120.0)
    args = ap.parse_args()
    if args.warm:
        i, n = map(int, args.warm.split("/"))
        warm(i, n)
        return 0
    result = {"device": torch.cuda.get_device_name(), "dtype": str(DTYPE), "rows": [], "tf32": []}
    path = os.path.join(args.out, "gpu_tune.json")
    save = lambda: open(path, "w").write(json.dumps(result, indent=1))
    result["tf32"] = tf32_rows()
    save()
    deadline = time.time() + args.budget_s
    base: dict = {}
    for kind, cfg, (b, h, n, d) in all_configs():
        if time.time() > deadline:
            result.setdefault("skipped", []).append(f"{kind} {cfg} n{n}")
            continue
        use(kind, cfg)
        q, v, g = inputs(b, h, n, d)
        row = dict(kind=kind, cfg=list(cfg), n=n, d=d, shipped=cfg == shipped(kind, n, d))
        try:
            out = run_kind(kind, q, v, g, d ** -0.5).float()
            key = (kind, n)
            base.setdefault(key, out)
            row["max_diff_vs_shipped"] = (out - base[key]).abs().max().item()
            o, lse, sq = K._fwd(q, v, d ** -0.5, "ieee")
            fn = (lambda: K._fwd(q, v, d ** -0.5, "ieee")) if kind == "fwd" else \
                (lambda: K._bwd(q, v, sq, o, lse, g, d ** -0.5, "ieee"))
            row["ms"] = timeit(fn)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["rows"].append(row)
        print(row, flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
