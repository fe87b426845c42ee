"""Compile the GPU code for a GPU target on a machine with no GPU (CI's CPU machines).

Two compilers, one module (used by ``tests/test_cuda_compile.py``, ``tests/test_triton_compile.py``
and ``bench/compile_check.py``):

* **CUDA** (``csrc/*.cu``, the kernels of ``acf._C``): ``nvcc`` from NVIDIA's pip wheels
  (``nvidia-cuda-nvcc``, ``-crt``, ``nvidia-nvvm``, ``nvidia-cuda-cccl``, ``-runtime``: the
  ``test`` extra installs them on Linux x86-64) against torch's headers (a CPU build of torch
  ships ``c10/cuda`` and ``ATen/cuda`` too, all but one generated header), with the flags ``setup.py``'s ``CUDAExtension`` gets
  from torch's ``BuildExtension`` (``compile_cu``), and ``-Xptxas -v``: registers, stack frame
  and spills per kernel and architecture (``parse_ptxas``).
* **Triton** (``kernels/l2_attention.py``): ``triton.compile`` of an ``ASTSource`` for a
  ``GPUTarget``, at exactly the launches a real call makes (the host wrappers run on CPU tensors
  with ``_launch`` replaced by a recorder) and the configurations the launcher tries first
  (``triton_jobs``, ``compile_triton``); ptxas comes with the Triton wheel.

The Triton compile must run in a process where ``TRITON_INTERPRET`` is unset *before Triton is
imported*: with ``TRITON_INTERPRET=1`` (``tests/conftest.py`` sets it on machines without CUDA)
``@triton.jit`` makes ``InterpretedFunction`` objects, which ``triton.compile`` cannot take
(``AttributeError: 'InterpretedFunction' object has no attribute 'cache_key'``), and the launcher's
``_configs`` returns its interpreter tiles. ``compile_triton_in_subprocess`` runs it in a fresh
interpreter with the variable removed; ``compile_triton`` refuses to run where it is set.

Importing this module has no side effects (no torch, Triton or environment changes).
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import dataclasses
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
CUDA_ARCHS = (80, 90)  # A100, H100/H200

# Report sections (title, lines) that the compile tests add; tests/conftest.py prints them at the end
# of the pytest run (terminal summary), so that `pytest -q` shows registers and spills.
REPORT: list[tuple[str, list[str]]] = []


# ----------------------------------------------------------------------------------------------
# CUDA: nvcc from the pip wheels
# ----------------------------------------------------------------------------------------------


def wheel_platform() -> bool:
    """True where the ``test`` extra installs the NVIDIA compiler wheels (pyproject's markers)."""
    return platform.system() == "Linux" and platform.machine() == "x86_64"


def cuda_toolkit() -> Optional[Path]:
    """The CUDA toolkit directory of the ``nvidia-cuda-nvcc`` wheel (``.../nvidia/cu13``, which holds
    ``bin/nvcc``, ``nvvm/bin/cicc`` and the other wheels' ``include``), or None when not installed.

    Found through the installed ``nvidia`` namespace package, never PATH: a system CUDA of another
    version must not be picked up in its place. The newest ``cu*`` wins if several are installed."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = []
    for base in spec.submodule_search_locations:
        for nvcc in glob.glob(os.path.join(base, "cu*", "bin", "nvcc")):
            root = Path(nvcc).parent.parent
            m = re.fullmatch(r"cu(\d+)", root.name)
            if m and os.access(nvcc, os.X_OK):
                found.append((int(m.group(1)), root))
    return max(found)[1] if found else None


def missing_cuda_parts(root: Path) -> list[str]:
    """Files the compile needs that the wheels have not put under ``root`` (the wheel providing each)."""
    need = {"nvidia-nvvm": root / "nvvm" / "bin" / "cicc",
            "nvidia-cuda-crt": root / "include" / "crt" / "host_config.h",
            "nvidia-cuda-runtime": root / "include" / "cuda_runtime.h",
            "nvidia-cuda-cccl": root / "include" / "cccl" / "cuda" / "std" / "type_traits"}
    return [f"{pkg} ({path})" for pkg, path in need.items() if not path.exists()]


def setup_constant(name: str):
    """A module-level constant of ``setup.py`` (``CPU_SOURCES``, ``CUDA_SOURCES``, ``NVCC_FLAGS``), read
    without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"setup.py defines no {name}")


def torch_cxx_std() -> str:
    """The ``-std=c++NN`` torch's ``BuildExtension`` appends when the flags name none (c++17 in older
    torch, c++20 in 2.13); it is not exported, so it is read from its source."""
    import inspect

    from torch.utils import cpp_extension

    try:
        found = re.findall(r"'c\+\+(\d\d)'", inspect.getsource(cpp_extension.BuildExtension.build_extensions))
    except (OSError, TypeError):
        found = []
    return f"-std=c++{found[0] if found else '17'}"


def nvcc_command(src: Path, archs=CUDA_ARCHS, out: Optional[Path] = None, root: Optional[Path] = None) -> list[str]:
    """The nvcc command that ``pip install`` of this package runs for ``src`` with CUDA, as torch's
    ``BuildExtension`` builds it (ninja, Linux), plus ``-Xptxas -v``:

    ``nvcc <includes> -DWITH_CUDA -c SRC -o OBJ <setup.NVCC_FLAGS> -DTORCH_API_INCLUDE_EXTENSION_H
    -DTORCH_EXTENSION_NAME=_C <COMMON_NVCC_FLAGS> --compiler-options -fPIC <-gencode per arch> -std=...``

    Includes: torch's (``include_paths()``), the toolkit's ``include`` (``CUDA_HOME/include`` in a
    CUDA build: ``cuda_runtime.h`` and ``crt/`` from the runtime and crt wheels) and Python's; nvcc
    adds CCCL (``include/cccl``) itself, from its ``nvcc.profile``, as in a full toolkit.
    ``-gencode=arch=compute_XX,code=sm_XX`` is what ``TORCH_CUDA_ARCH_LIST="8.0 9.0"`` makes."""
    from torch.utils import cpp_extension

    root = root or cuda_toolkit()
    if root is None:
        raise FileNotFoundError("nvcc wheel (nvidia-cuda-nvcc) not installed")
    includes = [*cpp_extension.include_paths(), str(root / "include"), sysconfig.get_paths()["include"]]
    cmd = [str(root / "bin" / "nvcc"), *(f"-I{p}" for p in includes), "-DWITH_CUDA",
           "-c", str(src), "-o", str(out) if out else os.devnull,
           *setup_constant("NVCC_FLAGS"), "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC"]
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd += [torch_cxx_std(), "-Xptxas", "-v"]
    return cmd


@dataclasses.dataclass
class KernelUsage:
    """What ``ptxas -v`` reports for one kernel (entry function) on one architecture."""
    kernel: str
    arch: str
    registers: int = -1
    stack: int = 0  # bytes of stack frame per thread (local memory)
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory per block

    @property
    def local_memory(self) -> bool:
        return bool(self.stack or self.spill_stores or self.spill_loads)


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short names (``anderson_kernel<float>``) via c++filt, where it is installed."""
    short = {n: n for n in names}
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return short
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    for mangled, full in zip(names, r.stdout.splitlines()):
        # "void ns::(anonymous namespace)::name<T>(args)" -> "name<T>"
        m = re.match(r"(?:[\w:<>, *&]+ )?(?:[\w]+::|\(anonymous namespace\)::)*(\w+(?:<[^()]*>)?)\(", full)
        if m:
            short[mangled] = m.group(1)
    return short


def parse_ptxas(output: str) -> list[KernelUsage]:
    """Per-kernel resource use from nvcc's ``-Xptxas -v`` output (any number of architectures)."""
    rows: list[KernelUsage] = []
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            rows.append(KernelUsage(m.group(1), m.group(2)))
            continue
        if not rows:
            continue
        cur = rows[-1]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(s.group(1)) if s else 0
    names = _demangle(sorted({r.kernel for r in rows}))
    for r in rows:
        r.kernel = names[r.kernel]
    return rows


@dataclasses.dataclass
class CudaCompile:
    source: str
    returncode: int
    output: str  # nvcc's stdout + stderr
    command: list[str]
    seconds: float
    kernels: list[KernelUsage]


def compile_cu(src, archs=CUDA_ARCHS, timeout: float = 300) -> CudaCompile:
    """Compile one ``.cu`` file for ``archs`` (object file discarded); never raises on a compile error."""
    src = Path(src)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = nvcc_command(src, archs, out=Path(tmp) / (src.stem + ".o"))
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    out = r.stdout + r.stderr
    return CudaCompile(str(src.relative_to(REPO) if src.is_absolute() and REPO in src.parents else src),
                       r.returncode, out, cmd, time.time() - t0, parse_ptxas(out) if r.returncode == 0 else [])


def cuda_table(results: list[CudaCompile]) -> list[str]:
    """Markdown rows: one per kernel and architecture."""
    lines = ["| source | kernel | arch | registers | stack B | spill stores B | spill loads B | smem B |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for k in res.kernels:
            lines.append(f"| {Path(res.source).name} | {k.kernel} | {k.arch} | {k.registers} | {k.stack} | "
                         f"{k.spill_stores} | {k.spill_loads} | {k.smem} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Triton: ahead-of-time compile for a GPU target
# ----------------------------------------------------------------------------------------------

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}  # max dynamic smem per block (bytes)
# dtype name -> (torch dtype name, fp32 input_precision). fp32 launches use "ieee" unless PyTorch's
# TF32 switch for matmuls is on (acf.kernels.l2_attention.precision_of).
DTYPES = {"fp32-ieee": ("float32", "ieee"), "fp32-tf32": ("float32", "tf32"), "bf16": ("bfloat16", "ieee"),
          "fp16": ("float16", "ieee"), "fp64": ("float64", "ieee")}
TT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _no_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: @triton.jit makes interpreter functions, which cannot be "
                           "compiled ahead of time; use compile_triton_in_subprocess")


def checkout_kernels():
    """``acf.kernels.l2_attention`` from this checkout's ``kernels/``.

    An editable install maps ``acf.kernels`` to the ``kernels/`` folder of the checkout it was made
    from, which is not this one in a second work tree of the repository (then ``acf`` itself comes
    from the current directory, but ``acf.kernels`` would not). Call before anything imports
    ``acf.kernels``; raises if another copy was imported already."""
    import acf

    want = REPO / "kernels"
    mod = sys.modules.get("acf.kernels")
    if mod is None:
        spec = importlib.util.spec_from_file_location("acf.kernels", want / "__init__.py",
                                                      submodule_search_locations=[str(want)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["acf.kernels"] = mod
        spec.loader.exec_module(mod)
        acf.kernels = mod
    if Path(list(mod.__path__)[0]).resolve() != want.resolve():
        raise RuntimeError(f"acf.kernels was imported from {list(mod.__path__)[0]}, not from {want}")
    import acf.kernels.l2_attention as K

    return K


def record_launches(dtype, prec: str, d: int, e: int, n: int, b: int = 2, h: int = 2) -> list[dict]:
    """Run the host wrappers (forward, VJP, double VJP) on CPU with a recording ``_launch``; return
    the launches a real call makes (kernel, arguments, constexprs, block dims)."""
    import torch

    K = checkout_kernels()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
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
    """(signature, constexprs, attrs) as the JIT builds them for these arguments: an int equal to 1
    becomes a constexpr; ints and pointers divisible by 16 get the divisibility hint."""
    import torch

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
            sig[name] = "*" + TT[str(a.dtype).replace("torch.", "")]
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


def triton_jobs(dtypes=("fp32-ieee", "bf16"), dims=(16, 64), arch: int = 90, n: int = 1024,
                all_configs: bool = False) -> list[dict]:
    """One job per (kernel launch, configuration): the first configuration the launcher tries
    (``_configs(...)[0]``), or all of them with ``all_configs``."""
    _no_interpreter()
    import torch

    K = checkout_kernels()
    jobs = []
    for dname in dtypes:
        dtype, prec = DTYPES[dname]
        for d in dims:
            for call in record_launches(dtype, prec, d, d, n):
                cfgs = K._configs(call["kind"], call["n"], call["bd"], call["be"], getattr(torch, dtype),
                                  call["consts"].get("PRECISION"))
                for ci, cfg in enumerate(cfgs if all_configs else cfgs[:1]):
                    sig, constexprs, attrs = signature_of(call, cfg)
                    label = dict(kernel=call["kernel"], dtype=dname, d=d, cfg=ci,
                                 tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}")
                    jobs.append(dict(kernel=call["kernel"], cfg=cfg, sig=sig, constexprs=constexprs,
                                     attrs=attrs, arch=arch, label=label))
    return jobs


def triton_ptxas_usage(ptx: str, arch: int):
    """(registers, spill bytes) from ``ptxas -v`` on a kernel's PTX, with the ptxas Triton uses."""
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


def compile_triton_job(job: dict) -> dict:
    """Compile one (kernel, configuration) for its target; a result row (status "ok" or "FAIL")."""
    os.environ.pop("TRITON_INTERPRET", None)  # pool workers: Triton is imported here, after this
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(checkout_kernels(), job["kernel"])
    cfg = job["cfg"]
    row = dict(job["label"])
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=job["sig"], constexprs=job["constexprs"], attrs=job["attrs"])
        ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        regs, spill = triton_ptxas_usage(ck.asm["ptx"], job["arch"])
        smem = int(ck.metadata.shared)
        row.update(status="ok", smem=smem, regs=regs, spill=spill,
                   fits=smem <= SMEM_LIMIT.get(job["arch"], 232448))
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        row.update(status="FAIL", error=" | ".join(msg[:6])[:2000])
    row["secs"] = round(time.time() - t0, 1)
    return row


def compile_triton(jobs: Optional[list[dict]] = None, workers: int = 0, **job_args) -> list[dict]:
    """Compile ``jobs`` (default: ``triton_jobs(**job_args)``) with ``workers`` processes (0: up to 8,
    one per core). Must run where ``TRITON_INTERPRET`` is unset (see the module's docstring)."""
    _no_interpreter()
    jobs = triton_jobs(**job_args) if jobs is None else jobs
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with cf.ProcessPoolExecutor(workers) as ex:
        return list(ex.map(compile_triton_job, jobs))


def compile_triton_in_subprocess(timeout: float = 600, **kwargs) -> list[dict]:
    """``compile_triton(**kwargs)`` in a fresh Python with ``TRITON_INTERPRET`` removed from its
    environment (the test process has it set on CPU machines, and Triton is already imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        code = ("import json, sys, gpu_compile\n"
                f"rows = gpu_compile.compile_triton(**json.loads(sys.argv[1]))\n"
                f"json.dump(rows, open(sys.argv[2], 'w'))\n")
        r = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs), out], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"Triton compile process failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-8000:]}")
        with open(out) as f:
            return json.load(f)


def triton_table(rows: list[dict]) -> list[str]:
    lines = ["| kernel | dtype | d | config | tile | status | smem KiB | regs | spill B | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            note = "" if r["fits"] else " (over smem limit: falls back)"
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['d']} | {r['cfg']} | {r['tile']} | ok{note} | "
                         f"{r['smem'] / 1024:.1f} | {r['regs']} | {r['spill']} | {r['secs']} |")
        else:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['d']} | {r['cfg']} | {r['tile']} | FAIL | | | | "
                         f"{r['secs']} |")
    return lines
