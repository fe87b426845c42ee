"""Side-by-side timings of builds of the CPU L2 attention kernels (``torch.ops.acf.l2_attention_*``).

    python bench/bench_cpu_isa.py                       # the built extension (acf/_C*.so), one table
    python bench/bench_cpu_isa.py --build portable=acf/_C.cpython-311-x86_64-linux-gnu.so \\
        --build avx2=acf/_C.cpython-311-x86_64-linux-gnu.so@avx2 \\
        --build native=/tmp/acf_native/acf/_C.cpython-311-x86_64-linux-gnu.so \\
        --reference native --rounds 7 --out bench/results/DATE-cpu-isa-dispatch.md

A build is ``NAME=PATH[@ISA]``: a compiled ``acf._C`` shared library and, optionally, the
``ACF_CPU_ISA`` it runs under (``avx2``, ``baseline``: a narrower variant of a portable build). To
build a ``-march=native`` extension beside the portable one:
``ACF_NATIVE=1 python setup.py build_ext --build-lib /tmp/acf_native --build-temp /tmp/acf_native_tmp``.

Two libraries that register the same torch operators cannot be loaded into one process, and
``ACF_CPU_ISA`` is read once per process, so every build is loaded by its own worker subprocess,
which times shapes on request. A round goes through the shapes and times each on every build, one
after the other in an order that rotates, so that the runs compared are neighbours in time (the
noise of a busy machine hits them alike). A run is forward, VJP (``l2_attention_bwd``) and double
VJP (``l2_attention_bwd2``) of float32 heads, ``--repeats`` times, keeping the fastest of each.
The table gives per build the median over rounds of each stage, and per shape the median over
rounds of the ratio of the sums fwd + vjp + vjp2 to those of the other build in the same round,
with the ratio of the fastest sums over all rounds in brackets.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (B*H, N, d): the layer's head dims at the CPU preset's N = 196 (14 x 14) and at N = 784 (28 x 28).
SHAPES = [(8, 196, 8), (32, 196, 8), (32, 196, 16), (32, 196, 32),
          (8, 784, 8), (8, 784, 16), (8, 784, 32), (32, 784, 16)]


def worker(so_path: str, threads: int) -> None:
    """Loads the library at ``so_path``, then answers requests on stdin, one JSON line each:
    ``[B*H, N, d, repeats]`` -> the fastest ``[fwd, vjp, vjp2]`` seconds of ``repeats`` timed calls."""
    import torch

    torch.set_num_threads(threads)
    torch.ops.load_library(so_path)
    ops = torch.ops.acf
    try:
        isa = ops.cpu_isa()
    except (AttributeError, RuntimeError):  # a build from before the variants
        isa = "?"
    print(json.dumps({"isa": isa}), flush=True)
    inputs = {}
    for line in sys.stdin:
        bh, n, d, repeats = json.loads(line)
        if (bh, n, d) not in inputs:
            gen = torch.Generator().manual_seed(0)
            inputs[bh, n, d] = [torch.randn(bh, n, d, generator=gen) for _ in range(5)]
        q, v, g, u, w = inputs[bh, n, d]
        scale = d ** -0.5
        o, lse = ops.l2_attention_fwd(q, v, scale)  # warm up: workspaces, page faults
        ops.l2_attention_bwd(q, v, o, lse, g, scale)
        ops.l2_attention_bwd2(q, v, o, lse, g, u, w, scale)
        best = [float("inf")] * 3
        for _ in range(repeats):
            t0 = time.perf_counter()
            o, lse = ops.l2_attention_fwd(q, v, scale)
            t1 = time.perf_counter()
            ops.l2_attention_bwd(q, v, o, lse, g, scale)
            t2 = time.perf_counter()
            ops.l2_attention_bwd2(q, v, o, lse, g, u, w, scale)
            t3 = time.perf_counter()
            best = [min(b, t) for b, t in zip(best, (t1 - t0, t2 - t1, t3 - t2))]
        print(json.dumps(best), flush=True)


def parse_build(spec: str) -> tuple[str, str, str | None]:
    name, _, rest = spec.partition("=")
    path, _, isa = rest.partition("@")
    if not name or not path:
        raise SystemExit(f"--build wants NAME=PATH[@ISA], got {spec!r}")
    if not Path(path).is_file():
        raise SystemExit(f"--build {name}: no file {path}")
    return name, str(Path(path).resolve()), isa or None


class Worker:
    """A subprocess that has loaded one build (under its ACF_CPU_ISA) and times shapes on request."""

    def __init__(self, path: str, isa: str | None, threads: int) -> None:
        env = {k: val for k, val in os.environ.items() if k != "ACF_CPU_ISA"}
        if isa:
            env["ACF_CPU_ISA"] = isa
        env["OMP_NUM_THREADS"] = str(threads)
        self.what = f"{path} (ACF_CPU_ISA={isa})"
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", path, "--threads", str(threads)],
                                     env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.isa = self._read()["isa"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.what} failed (exit code {self.proc.wait()})")
        return json.loads(line)

    def time(self, shape, repeats: int) -> list[float]:
        self.proc.stdin.write(json.dumps([*shape, repeats]) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="append", default=[], help="NAME=PATH[@ISA] (repeatable)")
    ap.add_argument("--reference", help="the build the others are divided by (default: the last)")
    ap.add_argument("--ratio", action="append", default=[], help="an extra ratio column A/B (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per shape and run (fastest kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", help="JSON list of [B*H, N, d] (default: the module's SHAPES)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [tuple(s) for s in json.loads(args.shapes)] if args.shapes else SHAPES
    if args.worker:
        worker(args.worker, args.threads)
        return

    builds = [parse_build(s) for s in args.build]
    if not builds:
        found = sorted(glob.glob(str(ROOT / "acf" / "_C*.so")))
        if not found:
            raise SystemExit("no acf/_C*.so: build it with `python setup.py build_ext --inplace`")
        builds = [("built", found[0], None)]
    names = [b[0] for b in builds]
    ref = args.reference or names[-1]
    pairs = [(n, ref) for n in names if n != ref] + [tuple(p.split("/", 1)) for p in args.ratio]
    if any(a not in names or b not in names for a, b in pairs):
        raise SystemExit(f"--reference / --ratio must name builds: {names}")

    workers = {name: Worker(path, isa, args.threads) for name, path, isa in builds}
    isas = {name: w.isa for name, w in workers.items()}
    runs: dict[str, list[dict]] = {name: [{} for _ in range(args.rounds)] for name in names}
    for r in range(args.rounds):
        for k, shape in enumerate(shapes):  # the builds one after the other, in a rotating order
            key = "x".join(map(str, shape))
            for name in names[(r + k) % len(names):] + names[:(r + k) % len(names)]:
                runs[name][r][key] = workers[name].time(shape, args.repeats)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for w in workers.values():
        w.close()

    keys = [f"{bh}x{n}x{d}" for bh, n, d in shapes]

    def med_ms(name, key, stage=None):
        vals = [sum(t[key]) if stage is None else t[key][stage] for t in runs[name]]
        return 1e3 * statistics.median(vals)

    def ratio(name, other, key):  # per round: the two runs of a shape in a round are neighbours in time
        return statistics.median(sum(a[key]) / sum(b[key]) for a, b in zip(runs[name], runs[other]))

    def ratio_of_minima(name, other, key):
        return min(sum(t[key]) for t in runs[name]) / min(sum(t[key]) for t in runs[other])

    import torch

    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else argv))
    lines = [f"Command: `{command}`", "", f"Machine: {platform.processor() or platform.machine()}, {_cpu_model()}, {os.cpu_count()} cores; "
             f"torch {torch.__version__}; {args.threads} thread(s); {args.rounds} rounds x {args.repeats} "
             f"repeats (fastest per run). Ratios of fwd + vjp + vjp2: median over rounds of the per-round "
             f"ratio (ratio of the fastest over all rounds).", "",
             "Builds: " + "; ".join(f"`{n}` = {Path(p).name}{f' with ACF_CPU_ISA={i}' if i else ''} "
                                    f"(cpu_isa: {isas[n]})" for n, p, i in builds), "",
             "| B*H x N x d | " + " | ".join(f"{n} fwd / vjp / vjp2 (ms)" for n in names) + " | "
             + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
             "|---" * (1 + len(names) + len(pairs)) + "|"]
    for key in keys:
        cells = [" / ".join(f"{med_ms(n, key, s):.2f}" for s in range(3)) for n in names]
        cells += [f"{ratio(a, b, key):.3f} ({ratio_of_minima(a, b, key):.3f})" for a, b in pairs]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    geo = [(statistics.geometric_mean(ratio(a, b, k) for k in keys),
            statistics.geometric_mean(ratio_of_minima(a, b, k) for k in keys)) for a, b in pairs]
    lines.append("| geometric mean | " + " | ".join("" for _ in names) + " | "
                 + " | ".join(f"{g:.3f} ({m:.3f})" for g, m in geo) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
