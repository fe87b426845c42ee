"""Run a pytest selection split over several processes (pytest-xdist may not be installed).

Why: on a fresh GPU machine the GPU tests spend most of their time compiling Triton kernels
(one compile per kernel x dtype x head-dim x integer specialisation, seconds each, on one core
when serial). Shards compile in parallel on the machine's cores and share Triton's on-disk
cache; the GPU itself is barely loaded by the small test shapes.

    python bench/pytest_shards.py --shards 8 --timeout 200 --out DIR -- -m gpu tests/

Collects the node ids once, deals them round-robin (in collection order: neighbouring
parametrisations, which share kernels, land in different shards, but a shard's later tests
hit the cache its siblings filled), runs each shard as its own ``pytest -q`` with a hard
timeout, writes ``DIR/pytest_shard_<i>.log`` and ``DIR/pytest_summary.txt``, and prints the
summary. Exit status: 0 if every shard passed, 1 otherwise (failures, errors or a timeout).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time


def collect(pytest_args: list[str], timeout: float) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds, for the whole run")
    ap.add_argument("--out", default=".")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    extra = [a for a in args.pytest_args if a != "--"]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.timeout
    try:
        ids = collect(extra, timeout=max(10.0, min(90.0, args.timeout / 3)))
    except subprocess.TimeoutExpired:
        print("pytest_shards: collection timed out")
        return 1
    # the ids already reflect the selection; -m / -k are forwarded again (harmless, and they keep
    # deselection identical), every other argument (paths, flags such as -x) is not
    select = []
    for flag in ("-m", "-k"):
        if flag in extra and extra.index(flag) + 1 < len(extra):
            select += [flag, extra[extra.index(flag) + 1]]
    if not ids:
        print("pytest_shards: no tests collected")
        return 0
    n = max(1, min(args.shards, len(ids)))
    shards = [ids[i::n] for i in range(n)]
    procs = []
    for i, shard in enumerate(shards):
        log = open(os.path.join(args.out, f"pytest_shard_{i}.log"), "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, *shard]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, shard))
    status = []
    for i, (p, log, shard) in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        log.close()
        status.append(rc)
    lines = []
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failing = []
    for i, rc in enumerate(status):
        text = open(os.path.join(args.out, f"pytest_shard_{i}.log")).read()
        tail = [l for l in text.strip().splitlines() if l.strip()][-1:] or [""]
        for key in totals:
            m = re.search(rf"(\d+) {key}", tail[0])
            if m:
                totals[key] += int(m.group(1))
        failing += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        lines.append(f"shard {i}: {len(shards[i])} tests, exit {rc}: {tail[0]}")
    ok = all(rc == 0 for rc in status)
    lines.append(f"total: {totals} in {time.time() - t0:.0f} s over {n} shards; "
                 f"{'all passed' if ok else 'NOT all passed'}")
    lines += [f"FAILED {f}" for f in failing]
    if any(rc == "timeout" for rc in status):
        lines.append("some shards timed out: their unfinished tests are not counted (see the shard logs)")
    summary = "\n".join(lines)
    with open(os.path.join(args.out, "pytest_summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
