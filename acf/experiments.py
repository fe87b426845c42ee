"""The paper's claims, each put to a test on data we ship (issue 6): ``acf experiment NAME``.

=================  ===========================================================================
experiment         what it tests (paper)
=================  ===========================================================================
``convergence``    attention improves bits/dim and speeds up convergence: i-ResNet, Residual
                   Flow and invertible DenseNet, each without and with L2 attention (and
                   Residual Flow with LipNorm attention), same steps, several seeds (Table 1, Fig. 3)
``heads``          Residual Flow + L2 attention with 1, 4 and 16 heads (Table 2)
``awgn``           bits/dim and reconstruction error against additive Gaussian noise (the
                   perturbation analysis of the abstract and section 4)
``dot``            plain dot-product attention is not Lipschitz: inversion, log-det and
                   training measured against L2 attention in the same model (section 1, 3)
``classification`` hybrid i-ResNet with and without L2 attention: test accuracy (Table 3)
``interpolation``  latent interpolation between test pairs (Fig. 6)
=================  ===========================================================================

Each writes ``<out>/<name>/<name>.csv`` (one row per run or measurement, with every identifying
column), ``<name>.png``, ``<name>.md`` (a markdown table computed from the CSV as written: mean ± std
over seeds) and ``<name>.json`` (settings, wall time, machine). Training runs live in
``<out>/<owner>/runs/<key>/`` (ordinary ``acf train`` run folders; ``<key>`` names the variant and
hashes the training configuration except ``steps``). A run that already finished with the same
configuration is reused wherever it lies under ``<out>`` (so ``heads``, ``awgn``, ``dot`` and
``interpolation`` reuse ``convergence``'s runs), an interrupted one is resumed (raising ``steps``
extends finished runs), and one that stopped on a non-finite loss is recorded as such and not
retrained. The ``.gitignore`` pattern ``runs/`` keeps run folders (checkpoints) out of git wherever
``--out`` points, so only the tables are committed.

Scales: ``micro`` (seconds; what the tests run), ``reduced`` (a 2-core CPU within a session: the
constants of ``REDUCED`` below, the settings of our published tables) and ``full`` (longer runs,
many hours on a CPU). Re-run everything with::

    acf experiment all --scale reduced --out results/experiments
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .layers.attention import (DotProductAttention, L2MultiheadAttention, L2TightAttention, LipNormAttention,  # noqa: E402
                        l2_tight_constant)
from .layers.block import ContractiveBlock  # noqa: E402
from .data import ImageDataset, to_float  # noqa: E402
from .evaluate import awgn_robustness, count_nonconverged, interpolations, load_run  # noqa: E402
from .figures import image_grid  # noqa: E402
from .layers.flow import bits_per_dim, standard_normal_logprob, uniform_dequantize  # noqa: E402
from .layers.logdet import LogdetEstimator, exact_logdet, logdet_estimate  # noqa: E402
from .models import ACFModel  # noqa: E402
from . import runfolder  # noqa: E402
from .train import NonFiniteLossError, TrainConfig, train  # noqa: E402

PathLike = Union[str, Path]
DEFAULT_OUT = Path("runs") / "experiments"


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale of the experiments (every run of a scale shares the training settings)."""

    name: str
    data: str                    # density experiments (convergence, heads, awgn, dot, interpolation)
    steps: int                   # training steps of every run
    batch_size: int
    eval_every: int              # test bits/dim every ... steps (the convergence curves)
    eval_size: int               # ... on the first ... test images
    n_exact_eval: int            # exact log-det terms in those evaluations (the costly part)
    warmup: int                  # learning-rate warm-up steps
    seeds: int                   # seeds 0 .. seeds-1 (override: --seeds)
    heads: tuple[int, ...]       # heads experiment
    classification_data: tuple[str, ...]
    classification_images: int   # test images for the final accuracy (capped at the test set)
    awgn_sigmas: tuple[float, ...]
    awgn_images: int
    dot_scales: tuple[float, ...]  # input scales of the dot-product probes (x = scale * block input)
    dot_images: int              # images for the inversion and Jacobian-norm probes
    logdet_images: int           # images for the exact log-det (a full Jacobian each)
    logdet_draws: int            # estimator draws per image
    power_iters: int             # power iterations for Jacobian spectral norms
    interp_pairs: int
    interp_steps: int
    long_steps: int = 2000       # long experiment: steps of each run ...
    long_eval_every: int = 500   # ... and its evaluation cadence
    deltas: tuple[float, ...] = (0.5, 1.0, 2.0)  # tight experiment: l2-tight logit ranges
    share_images: int = 64       # test images for the attention's share of a layer's output


MICRO = Scale(name="micro", data="digits", steps=2, batch_size=16, eval_every=1, eval_size=8, n_exact_eval=2,
              warmup=2, seeds=1, heads=(1, 4, 16), classification_data=("digits",), classification_images=16,
              awgn_sigmas=(0.0, 0.1), awgn_images=4, dot_scales=(1.0, 4.0), dot_images=2, logdet_images=1,
              logdet_draws=4, power_iters=3, interp_pairs=2, interp_steps=3, long_steps=3, long_eval_every=3,
              deltas=(0.5, 2.0), share_images=4)

# The settings behind the committed tables: `acf experiment all --scale reduced` on a 2-core CPU.
# Seconds per training step at batch 32 on MNIST-5k, CPU preset (measured 2026-11-28, 1 thread on a
# busy 2-core machine): 0.10 without attention, 0.37 L2 (4 heads), 1.02 L2 (16 heads), 0.68 dot,
# 1.28 LipNorm; a test evaluation of 200 images with 8 exact terms: 0.6 / 2.5 / 7.9 / 3.8 / 7.0 s.
# Estimated whole set, 150 steps: ~50 min at those speeds (convergence ~24, heads ~11, dot ~8,
# classification ~6, awgn ~2, interpolation < 1), ~35 min on an idle machine with 2 threads.
# Cost grows linearly with steps x batch_size and with eval_size x (steps / eval_every).
REDUCED = Scale(name="reduced", data="mnist5k", steps=150, batch_size=32, eval_every=50, eval_size=200,
                n_exact_eval=8, warmup=30, seeds=3, heads=(1, 4, 16), classification_data=("mnist5k", "digits"),
                classification_images=1000, awgn_sigmas=(0.0, 0.01, 0.05, 0.1, 0.2), awgn_images=32,
                dot_scales=(1.0, 4.0, 16.0, 64.0), dot_images=8, logdet_images=2, logdet_draws=16, power_iters=20,
                interp_pairs=4, interp_steps=8)

# Longer runs, closer to converged models and the full test sets: many hours on a 2-core CPU
# (the L2 runs alone are ~45 min each at batch 64), so not a session's job.
FULL = Scale(name="full", data="mnist5k", steps=2000, batch_size=64, eval_every=250, eval_size=1000,
             n_exact_eval=20, warmup=200, seeds=3, heads=(1, 4, 16), classification_data=("mnist5k", "digits"),
             classification_images=1000, awgn_sigmas=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2), awgn_images=256,
             dot_scales=(1.0, 2.0, 4.0, 8.0, 16.0), dot_images=64, logdet_images=4, logdet_draws=128,
             power_iters=30, interp_pairs=8, interp_steps=10)

SCALES: dict[str, Scale] = {s.name: s for s in (MICRO, REDUCED, FULL)}


@dataclass(frozen=True)
class Variant:
    """A model variant: architecture, attention (None, "l2", "l2-tight", "lipnorm", "dot"), heads and,
    for "l2-tight", the logit range (None: the default)."""

    arch: str
    attention: Optional[str]
    heads: int = 4
    delta_max: Optional[float] = None
    gamma_init: Optional[float] = None

    @property
    def label(self) -> str:
        names = {"iresnet": "i-ResNet", "resflow": "ResFlow", "idensenet": "i-DenseNet"}
        att = {None: "", "l2": " + L2 SA", "l2-tight": " + L2-tight SA", "lipnorm": " + LipNorm SA",
               "dot": " + dot SA"}[self.attention]
        options = [f"{name}={value:g}" for name, value in (("Δ", self.delta_max), ("γ₀", self.gamma_init))
                   if value is not None]
        return names.get(self.arch, self.arch) + att + (f" ({', '.join(options)})" if options else "")


CONVERGENCE_VARIANTS = tuple(Variant(arch, att) for arch, atts in (
    ("iresnet", (None, "l2", "l2-tight")), ("resflow", (None, "l2", "l2-tight", "lipnorm")),
    ("idensenet", (None, "l2", "l2-tight"))) for att in atts)

# Reference numbers printed in the paper (full-scale models, full data sets): context, not our results.
PAPER_TABLE1_MNIST = {("iresnet", None): 1.05, ("iresnet", "l2"): 0.87, ("resflow", None): 0.97,
                      ("resflow", "l2"): 0.90, ("resflow", "lipnorm"): 1.14}
PAPER_TABLE2 = {1: (0.99, 3.45), 4: (0.90, 3.35), 16: (0.94, 3.34)}  # heads: (MNIST, CIFAR10) bits/dim
PAPER_TABLE3_CIFAR10 = {"Residual Flow": 91.78, "iDenseNet": 92.40, "ACF (iResNet + L2 SA)": 93.75}


def get_scale(scale: Union[str, Scale], seeds: Optional[int] = None) -> Scale:
    """A ``Scale`` by name (``micro``, ``reduced``, ``full``) or as given, with ``seeds`` overridden."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        scale = SCALES[scale]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        scale = replace(scale, seeds=seeds)
    return scale


# ---------------------------------------------------------------------------------------------
# Runs: train, resume or reuse
# ---------------------------------------------------------------------------------------------

SIDECAR = "experiment_run.json"  # wall time and outcome of a run trained by an experiment


@dataclass
class RunRecord:
    """A finished (or failed) training run and what the experiment needs from it."""

    path: Path
    cfg: TrainConfig
    history: list[dict]
    status: str          # "ok", or "nonfinite" (the loss or the activations became NaN/inf)
    message: str
    wall_seconds: float  # wall time of training it (all sessions), figures included
    reused: bool         # True: found finished, not trained by this call
    gamma_max_abs: Optional[float] = None  # largest |gamma| of the attention layers (EMA weights)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def steps_done(self) -> int:
        return int(self.final.get("step", 0))


def train_config(scale: Scale, variant: Variant, seed: int, task: str = "density",
                 data: Optional[str] = None) -> TrainConfig:
    """The training configuration of ``variant`` at ``scale`` (every run of a scale shares it)."""
    extra = {k: getattr(variant, k) for k in ("delta_max", "gamma_init") if getattr(variant, k) is not None}
    return TrainConfig(data=data or scale.data, arch=variant.arch, attention=variant.attention, heads=variant.heads,
                       task=task, steps=scale.steps, batch_size=scale.batch_size, warmup=scale.warmup, seed=seed,
                       eval_every=scale.eval_every, eval_size=scale.eval_size, n_exact_eval=scale.n_exact_eval,
                       **extra)


def run_key(cfg: TrainConfig) -> str:
    """Folder name of a run: readable variant fields and a hash of the whole configuration except
    ``steps`` (so that raising the steps of a scale extends its runs instead of starting over)."""
    values = {k: v for k, v in asdict(cfg).items() if k != "steps"}
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.data}-{cfg.task}-{cfg.arch}-{cfg.attention or 'none'}-h{cfg.heads}-s{cfg.seed}-{digest}"


def _checkpoint(path: Path) -> Optional[dict]:
    """The run's checkpoint, loaded safely (``None`` when there is none yet)."""
    ckpt = path / "checkpoint.pt"
    return runfolder.load_checkpoint(ckpt) if ckpt.exists() else None


def attention_gamma(ckpt: Optional[dict]) -> Optional[float]:
    """Largest ``|gamma|`` of the attention layers in a run's checkpoint (EMA weights, what is
    evaluated): how much weight the attention has in ``g`` (0: the layer is the identity)."""
    if ckpt is None:
        return None
    gammas = [float(v.abs().max()) for k, v in (ckpt["ema"] or ckpt["model"]).items() if k.endswith(".gamma")]
    return max(gammas) if gammas else None


def _read_json(path: Path) -> dict:
    doc = runfolder.read_json(path) if path.exists() else {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _locate(root: Path, owner: str, key: str) -> Path:
    """The run folder ``key`` under ``root``: the owner's if it holds a checkpoint, else any other
    experiment's that does, else the owner's (new)."""
    own = root / owner / "runs" / key
    found = [own] + sorted(p for p in root.glob(f"*/runs/{key}") if p != own)
    return next((p for p in found if (p / "checkpoint.pt").exists() or (p / SIDECAR).exists()), own)


def _is_numeric_blowup(exc: Exception) -> bool:
    return isinstance(exc, NonFiniteLossError) or (isinstance(exc, ValueError) and "non-finite" in str(exc))


def ensure_run(root: Path, owner: str, cfg: TrainConfig, progress: bool = True) -> RunRecord:
    """Train the run ``cfg`` under ``root/owner/runs/`` unless a run with the same configuration
    already finished anywhere under ``root``; resume it if it was interrupted. A non-finite loss
    (or non-finite activations) ends the run with ``status="nonfinite"``: recorded, not raised.
    The run folder's lock is held throughout (another process working on the same run is refused),
    and the history is the checkpoint's (which the metrics files never run ahead of)."""
    path = _locate(Path(root), owner, run_key(cfg))
    path.mkdir(parents=True, exist_ok=True)
    with runfolder.lock(path, "acf experiment"):
        side = _read_json(path / SIDECAR)
        ckpt = _checkpoint(path)
        step = None if ckpt is None else ckpt["step"]
        if step is not None and step > cfg.steps:
            raise ValueError(f"{path} holds a run of {step} steps, more than the {cfg.steps} requested; "
                             f"remove it or choose another --out")
        failed_before = side.get("status") == "nonfinite" and side.get("steps") == cfg.steps
        reused = step == cfg.steps or failed_before
        if not reused:
            t0 = time.perf_counter()
            status, message = "ok", ""
            try:
                train(cfg, path, resume=step is not None, progress=progress)
            except (NonFiniteLossError, ValueError) as exc:
                if not _is_numeric_blowup(exc):
                    raise
                status, message = "nonfinite", str(exc)
            ckpt = _checkpoint(path)
            if status == "nonfinite" and ckpt is not None and ckpt["step"] == cfg.steps:
                status = "ok"  # a blow-up after the last step (in the run's figures) leaves a finished run
            side = {"status": status, "message": message, "steps": cfg.steps,
                    "wall_seconds": side.get("wall_seconds", 0.0) + time.perf_counter() - t0}
            runfolder.write_text(path / SIDECAR, json.dumps(side, indent=1))
    return RunRecord(path=path, cfg=cfg, history=ckpt["history"] if ckpt else [], status=side.get("status", "ok"),
                     message=side.get("message", ""), wall_seconds=float(side.get("wall_seconds", float("nan"))),
                     reused=reused, gamma_max_abs=attention_gamma(ckpt))


# ---------------------------------------------------------------------------------------------
# Tables: CSV, markdown, JSON
# ---------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Rows to CSV; the columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def _parse(value: str) -> Union[str, int, float, None]:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_csv(path: PathLike) -> list[dict]:
    """A CSV written by ``write_csv``, with numbers parsed (empty cells are ``None``)."""
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _finite(values: Iterable) -> tuple[list[float], int]:
    vals = [float(v) for v in values if v is not None]
    return [v for v in vals if math.isfinite(v)], len(vals)


def mean_std(values: Iterable, spec: str = ".4f") -> str:
    """``"mean ± std"`` (sample std) of the finite values, ``"mean"`` for one, noting any non-finite."""
    finite, total = _finite(values)
    if not finite:
        return "non-finite" if total else "n/a"
    text = format(statistics.fmean(finite), spec)
    if len(finite) > 1:
        text += " ± " + format(statistics.stdev(finite), spec.lstrip("+"))  # a sign on the mean only
    return text + (f" ({len(finite)}/{total} finite)" if len(finite) < total else "")


def mean_se(values: Iterable, spec: str = "+.4f") -> str:
    """``"mean ± standard error (n)"`` of the finite values: how a paired difference is reported."""
    finite, total = _finite(values)
    if not finite:
        return "non-finite" if total else "n/a"
    text = format(statistics.fmean(finite), spec)
    if len(finite) > 1:
        text += " ± " + format(statistics.stdev(finite) / math.sqrt(len(finite)), spec.lstrip("+"))
    return text + f" (n={len(finite)}" + (f" of {total})" if len(finite) < total else ")")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; ``|`` inside a cell is escaped."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def group(rows: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``keys``, groups in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def final_rows(rows: Iterable[dict], *run_keys: str) -> list[dict]:
    """The last-step row of every run (runs identified by ``run_keys``)."""
    return [max(g, key=lambda r: r["step"] if r["step"] is not None else -1) for g in group(rows, *run_keys).values()]


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine_info() -> dict:
    """Where a result was measured: platform, CPUs, torch, date."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "git_commit": _git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


@dataclass
class _Context:
    name: str
    root: Path
    scale: Scale
    progress: bool
    started: float
    runs: list[RunRecord]

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def run(self, owner: str, cfg: TrainConfig) -> RunRecord:
        if self.progress:
            tqdm.write(f"[{self.name}] {cfg.arch} + {cfg.attention or 'no'} attention ({cfg.heads} heads), "
                       f"{cfg.task} on {cfg.data}, seed {cfg.seed}")
        rec = ensure_run(self.root, owner, cfg, self.progress)
        self.runs.append(rec)
        return rec

    def header(self, title: str, claim: str, data: Optional[str] = None) -> str:
        s = self.scale
        return (f"# {title}\n\n{claim}\n\nScale `{s.name}`: {data or s.data}, {s.steps} steps of batch {s.batch_size}, "
                f"{s.seeds} seed(s), test bits/dim of the EMA weights on {s.eval_size} test images with "
                f"{s.n_exact_eval} exact log-det terms (unbiased roulette). Generated by "
                f"`acf experiment {self.name} --scale {s.name}` from `{self.name}.csv` "
                f"({datetime.date.today().isoformat()}).\n\n")


def _start(name: str, out: PathLike, scale: Union[str, Scale], seeds: Optional[int], progress: bool) -> _Context:
    ctx = _Context(name, Path(out), get_scale(scale, seeds), progress, time.perf_counter(), [])
    ctx.folder.mkdir(parents=True, exist_ok=True)
    return ctx


def _finish(ctx: _Context, rows: list[dict], markdown: Callable[[_Context, list[dict]], str],
            plot: Callable[[list[dict], Path], None]) -> Path:
    """Write ``<name>.csv``, then the markdown and the figure from the CSV as read back, and the JSON."""
    if not rows:
        raise RuntimeError(f"experiment {ctx.name} produced no rows")
    csv_path = write_csv(ctx.folder / f"{ctx.name}.csv", rows)
    table = read_csv(csv_path)
    (ctx.folder / f"{ctx.name}.md").write_text(markdown(ctx, table) + "\n")
    png = ctx.folder / f"{ctx.name}.png"
    plot(table, png)
    plt.close("all")
    meta = {"experiment": ctx.name, "scale": asdict(ctx.scale),
            "wall_seconds": round(time.perf_counter() - ctx.started, 2),
            "runs_trained": sum(not r.reused for r in ctx.runs), "runs_reused": sum(r.reused for r in ctx.runs),
            "command": f"acf experiment {ctx.name} --scale {ctx.scale.name} --seeds {ctx.scale.seeds} --out {ctx.root}",
            "machine": machine_info()}
    (ctx.folder / f"{ctx.name}.json").write_text(json.dumps(meta, indent=1))
    if ctx.progress:
        tqdm.write(f"[{ctx.name}] {meta['wall_seconds']:.0f} s; wrote {csv_path}, {png} and the .md / .json")
    return ctx.folder


def _run_path(rec: RunRecord, root: Path) -> str:
    """The run folder, relative to the experiments' root when inside it."""
    return str(rec.path.relative_to(root)) if rec.path.is_relative_to(root) else str(rec.path)


def _run_columns(rec: RunRecord, root: Path) -> dict:
    return {"gamma_max_abs": rec.gamma_max_abs, "status": rec.status, "run_wall_seconds": round(rec.wall_seconds, 2),
            "reused": int(rec.reused), "run": _run_path(rec, root)}


def _summary_row(rec: RunRecord, root: Path, ident: dict) -> dict:
    """One row per run: its identity, final metrics and bookkeeping."""
    last = rec.final
    return {**ident, "seed": rec.cfg.seed, "steps": rec.steps_done, "train_bpd": last.get("train_bpd"),
            "test_bpd": last.get("test_bpd"), "test_acc": last.get("test_acc"),
            "train_seconds": last.get("seconds"), **_run_columns(rec, root)}


def _plot_series(ax, xs: Sequence[float], groups: Sequence[Sequence[float]], label: str, **kw) -> None:
    """Mean line with a shaded min-max band over seeds."""
    arr = np.array(groups, dtype=float)  # (seeds, points)
    with warnings.catch_warnings():  # a point where every seed failed stays a gap
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=0)
    line, = ax.plot(xs, mean, label=label, **kw)
    if arr.shape[0] > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)


# ---------------------------------------------------------------------------------------------
# Model probes
# ---------------------------------------------------------------------------------------------

ATTENTION_TYPES = (L2MultiheadAttention, L2TightAttention, LipNormAttention, DotProductAttention)


def _load(rec: RunRecord) -> tuple[ACFModel, ImageDataset]:
    """The run's EMA model and test set (without the construction warning of uncertified branches)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="residual branch is not certified")
        _, model, test = load_run(rec.path)
    return model, test


def first_attention_block(model: ACFModel) -> ContractiveBlock:
    """The first residual block whose branch carries attention."""
    for m in model.modules():
        if isinstance(m, ContractiveBlock) and any(isinstance(a, ATTENTION_TYPES) for a in m.g.modules()):
            return m
    raise ValueError("the model has no attention layer")


@torch.no_grad()
def attention_shares(model: ACFModel, x: torch.Tensor) -> list[float]:
    """For each attention layer, on the inputs it actually receives when ``model`` runs on ``x``: the
    attention's share of the layer's output before normalisation, ``||gamma F / L|| / ||X||`` (0: the
    layer is the identity; ``(X + gamma F / L) / (1 + |gamma|)`` is what it returns)."""
    shares: list[float] = []

    def measure(layer: torch.nn.Module, inputs: tuple) -> None:
        xt = inputs[0].flatten(2)
        f = layer.attend(xt)
        shares.append(float(layer.gamma.abs() * f.norm() / xt.norm().clamp_min(1e-30)))

    handles = [m.register_forward_pre_hook(measure) for m in model.modules() if isinstance(m, ATTENTION_TYPES)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shares


def _attention_columns(rec: RunRecord, scale: Scale) -> dict:
    """Mean and largest attention share (``attention_shares``) of a finished run on test images."""
    if rec.cfg.attention is None or not (rec.path / "checkpoint.pt").exists():
        return {}
    model, test = _load(rec)
    torch.manual_seed(0)
    shares = attention_shares(model, uniform_dequantize(_test_batch(test, scale.share_images)))
    return {"attention_share": statistics.fmean(shares), "attention_share_max": max(shares)}


class _Captured(Exception):
    """Stops a forward pass once a hook has what it needs."""


@torch.no_grad()
def block_input(model: ACFModel, block: ContractiveBlock, x: torch.Tensor) -> torch.Tensor:
    """What ``block`` receives when the model maps the images ``x`` (a forward hook)."""
    seen: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, inputs: tuple) -> None:
        seen.append(inputs[0].detach().clone())
        raise _Captured  # the rest of the forward is not needed

    handle = block.register_forward_pre_hook(grab)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the block was not reached by the model's forward pass")
    return seen[0]


def jacobian_norm(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 20,
                  seed: int = 0) -> torch.Tensor:
    """Per-sample ``||J_g(x)||_2`` by power iteration on ``J^T J`` (J v by the double-VJP trick);
    a lower bound on ``Lip(g)``, and on the contraction the inverse and the log-det series need."""
    gen = torch.Generator().manual_seed(seed)
    view = (-1,) + (1,) * (x.dim() - 1)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)

    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        gx = g(x)
        u = torch.zeros_like(gx, requires_grad=True)
        (jt_u,) = torch.autograd.grad(gx, x, u, create_graph=True)  # J^T u, linear in u
        v = unit(torch.randn(x.shape, generator=gen).to(x))
        for _ in range(max(iters, 1)):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (jtjv,) = torch.autograd.grad(gx, x, jv, retain_graph=True)
            v = unit(jtjv)
        (jv,) = torch.autograd.grad(jt_u, u, v)
    return jv.flatten(1).norm(dim=1).detach()


def logdet_error(g: torch.nn.Module, x: torch.Tensor, est: LogdetEstimator, draws: int) -> dict:
    """The estimator (``draws`` independent draws per sample) against the exact log-det of the full
    Jacobian: max absolute error of the mean, the same in standard errors, non-finite draws, and
    whether ``det(I + J_g) <= 0`` (then no log-det exists: the block is not invertible there)."""
    try:
        _, exact = exact_logdet(g, x.detach().requires_grad_(True))
    except ValueError as exc:
        if "det(I + J_g) <= 0" not in str(exc):
            raise
        return {"logdet_exact": float("nan"), "det_nonpositive": 1, "logdet_abs_error": float("nan"),
                "logdet_error_se": float("nan"), "logdet_nonfinite_draws": float("nan")}
    with torch.no_grad():
        est_draws = torch.stack([logdet_estimate(g, x, est, training=False)[1] for _ in range(draws)])
    ok = torch.isfinite(est_draws)
    mean = torch.where(ok, est_draws, 0.0).sum(0) / ok.sum(0).clamp_min(1)
    se = est_draws.std(0) / math.sqrt(draws) if draws > 1 else torch.full_like(mean, float("nan"))
    err = (mean - exact.detach()).abs()
    return {"logdet_exact": float(exact.mean()), "det_nonpositive": 0, "logdet_abs_error": float(err.max()),
            "logdet_error_se": float((err / se).max()), "logdet_nonfinite_draws": float((~ok).float().mean())}


@torch.no_grad()
def block_inversion(block: ContractiveBlock, x: torch.Tensor) -> dict:
    """Map ``x`` through the block and solve back (Banach, the block's tolerance and cap); the error is
    relative, ``max |x_rec - x| / max(1, max |x|)`` per sample, like the solver's stopping rule."""
    y = x + block.g(x)
    if not bool(torch.isfinite(y).all()):
        return {"block_inversion_error": float("inf"), "block_converged_fraction": 0.0,
                "block_iterations": float("nan")}
    x_rec, info = block.inverse(y, on_fail="ignore", return_info=True)
    size = x.flatten(1).abs().amax(1).clamp_min(1.0)  # the solver's tolerance is relative to this scale
    return {"block_inversion_error": float(((x_rec - x).flatten(1).abs().amax(1) / size).max()),
            "block_converged_fraction": float(info.converged.float().mean()), "block_iterations": info.iterations}


def _test_batch(test: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    images, _ = test[slice(0, min(n, len(test)))]
    return uniform_dequantize(to_float(images))


# ---------------------------------------------------------------------------------------------
# 1. convergence (Table 1, Fig. 3)
# ---------------------------------------------------------------------------------------------

def convergence_runs(ctx: _Context) -> list[tuple[Variant, RunRecord]]:
    """Every convergence variant x seed (owned by ``convergence``; other experiments reuse them)."""
    return [(v, ctx.run("convergence", train_config(ctx.scale, v, seed)))
            for v in CONVERGENCE_VARIANTS for seed in range(ctx.scale.seeds)]


def _variant_columns(v: Variant) -> dict:
    return {"variant": v.label, "arch": v.arch, "attention": v.attention or "none", "heads": v.heads}


def convergence(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
                progress: bool = True) -> Path:
    """Paper Table 1 and Fig. 3 at our scale: does attention lower bits/dim and speed up convergence?
    Seven variants (three flows without / with L2 attention, Residual Flow with LipNorm) trained for
    the same steps on the same data order per seed; test bits/dim curves and final values."""
    ctx = _start("convergence", out, scale, seeds, progress)
    rows = []
    for v, rec in convergence_runs(ctx):
        rows += _curve_rows(ctx, v, rec)
    return _finish(ctx, rows, _convergence_md, _convergence_png)


def _curve_rows(ctx: _Context, v: Variant, rec: RunRecord) -> list[dict]:
    """One row per evaluation of a run (its test bits/dim curve), with the run's attention share."""
    ident = {**_variant_columns(v), "seed": rec.cfg.seed, **_attention_columns(rec, ctx.scale)}
    return [{**ident, "step": h.get("step"), "train_bpd": h.get("train_bpd"), "test_bpd": h.get("test_bpd"),
             "train_seconds": h.get("seconds"), "lipschitz_max": h.get("lipschitz_max"), **_run_columns(rec, ctx.root)}
            for h in rec.history or [{}]]


def _paired_delta(finals: list[dict], row: dict) -> list[float]:
    """Final test bits/dim minus that of the same architecture without attention, per seed."""
    base = {r["seed"]: r["test_bpd"] for r in finals if r["arch"] == row["arch"] and r["attention"] == "none"}
    return [r["test_bpd"] - base[r["seed"]] for r in finals
            if r["variant"] == row["variant"] and r["seed"] in base and None not in (r["test_bpd"], base[r["seed"]])]


def _attention_cells(runs: list[dict]) -> list[str]:
    """``max |gamma|`` and the attention's share of its layer's output, mean ± std over seeds."""
    if runs[0]["attention"] == "none":
        return ["", ""]
    return [mean_std((r["gamma_max_abs"] for r in runs), ".1e"),
            mean_std((r.get("attention_share") for r in runs), ".1e")]


ATTENTION_HEADER = ["attention max |gamma|", "attention share"]
ATTENTION_NOTE = ("Attention max |gamma|: the largest learnt weight of an attention layer, out = (X + gamma F / L) "
                  "/ (1 + |gamma|); near 0 the layer is the identity. Attention share: ||gamma F / L|| / ||X|| on "
                  "test images at the layer's actual input, averaged over the model's attention layers.")


def _curves_table(rows: list[dict], paper: bool) -> str:
    """Per variant: bits/dim at the first evaluation and at the end, the paired difference to the same
    architecture without attention, the attention's weight and share, time (and the paper's number)."""
    finals = final_rows(rows, "variant", "seed")
    first_step = min(r["step"] for r in rows if r["step"] is not None)
    body = []
    for (variant,), runs in group(finals, "variant").items():
        r0 = runs[0]
        firsts = [r["test_bpd"] for r in rows if r["variant"] == variant and r["step"] == first_step]
        delta = "" if r0["attention"] == "none" else mean_se(_paired_delta(finals, r0))
        number = PAPER_TABLE1_MNIST.get((r0["arch"], None if r0["attention"] == "none" else r0["attention"]))
        body.append([variant, len(runs), sum(r["status"] != "ok" for r in runs), mean_std(firsts),
                     mean_std(r["test_bpd"] for r in runs), delta, *_attention_cells(runs),
                     mean_std(r["train_bpd"] for r in runs), mean_std((r["train_seconds"] for r in runs), ".0f")]
                    + (["-" if number is None else f"{number:.2f}"] if paper else []))
    header = ["variant", "seeds", "failed", f"test bpd @ step {first_step}", "final test bpd",
              "Δ vs no attention (paired by seed, ± SE)", *ATTENTION_HEADER, "final train bpd",
              "train seconds / run"] + (["paper MNIST (Table 1)"] if paper else [])
    return markdown_table(header, body)


def _convergence_md(ctx: _Context, rows: list[dict]) -> str:
    return (ctx.header("Convergence with and without attention (paper Table 1, Fig. 3)",
                       "Claim: attention improves bits/dim of every contractive flow and converges faster.")
            + _curves_table(rows, paper=True)
            + "\n\nΔ < 0: attention lowers bits/dim (mean of the per-seed differences ± its standard error). "
            + ATTENTION_NOTE + " Spread elsewhere: sample std over seeds. The paper's numbers are for "
              "full-size models trained to convergence on full MNIST; ours are small CPU models after a few "
              "hundred steps on MNIST-5k, so only the comparison within a row group is meaningful.")


def _convergence_png(rows: list[dict], path: Path) -> None:
    archs = list(group(rows, "arch"))
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, (arch,) in zip(axes[0], archs):
        for (variant,), vrows in group([r for r in rows if r["arch"] == arch], "variant").items():
            runs = [g for g in group(vrows, "seed").values() if g[0]["step"] is not None]
            if not runs:
                continue
            steps = sorted({r["step"] for g in runs for r in g})
            series = [[next((r["test_bpd"] for r in g if r["step"] == s), float("nan")) for s in steps] for g in runs]
            _plot_series(ax, steps, series, variant, marker="o")
        ax.set_title(arch)
        ax.set_xlabel("step")
        ax.set_ylabel("test bits/dim (EMA)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("convergence: mean over seeds, band = min..max")
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 2. heads (Table 2)
# ---------------------------------------------------------------------------------------------

def heads(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
          progress: bool = True) -> Path:
    """Paper Table 2 at our scale: Residual Flow + L2 attention with 1, 4 and 16 heads (the 4-head runs
    are the convergence runs). The paper finds 4 heads best on MNIST (0.90 vs 0.99 for one head)."""
    ctx = _start("heads", out, scale, seeds, progress)
    rows = []
    for att in ("l2", "l2-tight"):
        for h in ctx.scale.heads:
            v = Variant("resflow", att, h)
            for seed in range(ctx.scale.seeds):
                owner = "convergence" if v in CONVERGENCE_VARIANTS else "heads"
                rec = ctx.run(owner, train_config(ctx.scale, v, seed))
                rows.append(_summary_row(rec, ctx.root, {"attention": att, "heads": h,
                                                         **_attention_columns(rec, ctx.scale)}))
    return _finish(ctx, rows, _heads_md, _heads_png)


def _heads_md(ctx: _Context, rows: list[dict]) -> str:
    body = []
    for (att, h), runs in group(rows, "attention", "heads").items():
        paper = [f"{x:.2f}" for x in PAPER_TABLE2[h]] if h in PAPER_TABLE2 and att == "l2" else ["-", "-"]
        body.append([att, h, len(runs), sum(r["status"] != "ok" for r in runs), mean_std(r["test_bpd"] for r in runs),
                     *_attention_cells(runs), mean_std(r["train_bpd"] for r in runs),
                     mean_std((r["train_seconds"] for r in runs), ".0f"), *paper])
    header = ["attention", "heads", "seeds", "failed", "final test bpd", *ATTENTION_HEADER, "final train bpd",
              "train seconds / run", "paper MNIST", "paper CIFAR10"]
    return (ctx.header("Number of attention heads (paper Table 2)",
                       "Claim: multi-head L2 attention beats a single head (best: 4 heads on MNIST).")
            + markdown_table(header, body)
            + "\n\nResidual Flow + L2 attention (Kim et al.'s bound) or L2-tight attention (grouped heads: "
              "each head attends over its own channels; one head is one map over all of them). "
            + ATTENTION_NOTE + " The paper's columns are full-scale results for L2 attention.")


def _heads_png(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    hs = sorted({r["heads"] for r in rows})
    for i, (att,) in enumerate(group(rows, "attention")):
        vals = [[r["test_bpd"] for r in rows if r["heads"] == h and r["attention"] == att
                 and r["test_bpd"] is not None] for h in hs]
        means = [statistics.fmean(v) if v else float("nan") for v in vals]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(hs, means, yerr=stds, marker="o", capsize=4, label=f"{att}: mean ± std", color=f"C{i}")
        for h, v in zip(hs, vals):
            ax.scatter([h] * len(v), v, color=f"C{i}", s=12, zorder=3, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(hs, [str(h) for h in hs])
    ax.set_xlabel("heads")
    ax.set_ylabel("final test bits/dim")
    ax.set_title("ResFlow + attention: heads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 3. awgn (perturbation analysis)
# ---------------------------------------------------------------------------------------------

def awgn(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
         progress: bool = True) -> Path:
    """The paper's perturbation analysis: test images plus Gaussian noise of growing sigma; bits/dim
    and reconstruction error ``max |f^-1(f(x)) - x|`` of every convergence run. Claim: ACF models
    (especially the normalised dot-product, i.e. LipNorm, variant) are more resilient to the noise."""
    ctx = _start("awgn", out, scale, seeds, progress)
    rows = []
    for v, rec in tqdm(convergence_runs(ctx), desc="awgn", disable=not progress):
        if not (rec.path / "checkpoint.pt").exists():
            continue
        model, test = _load(rec)
        for r in awgn_robustness(model, test, ctx.scale.awgn_sigmas, ctx.scale.awgn_images, seed=0):
            rows.append({**_variant_columns(v), "seed": rec.cfg.seed, **r, "images": ctx.scale.awgn_images,
                         "status": rec.status, "run": _run_path(rec, ctx.root)})
    return _finish(ctx, rows, _awgn_md, _awgn_png)


def _awgn_md(ctx: _Context, rows: list[dict]) -> str:
    clean = {(r["variant"], r["seed"]): r["bits_per_dim"] for r in rows if r["sigma"] == 0}
    body = []
    for (variant, sigma), runs in group(rows, "variant", "sigma").items():
        deltas = [r["bits_per_dim"] - clean[(variant, r["seed"])] for r in runs if (variant, r["seed"]) in clean]
        body.append([variant, sigma, mean_std(r["bits_per_dim"] for r in runs), mean_std(deltas, "+.4f"),
                     mean_std((r["reconstruction_error"] for r in runs), ".2e")])
    header = ["variant", "sigma", "bits/dim", "Δ bits/dim vs sigma 0", "max reconstruction error"]
    return (ctx.header("Robustness to additive white Gaussian noise (paper section 4)",
                       "Claim: ACF models show better and more consistent resilience to additive noise.")
            + markdown_table(header, body)
            + f"\n\n{ctx.scale.awgn_images} test images per run; noise N(0, sigma^2) on the [0, 1] scale is added "
              "to the 8-bit images, which are re-quantised to 8 bits (clipped to 0..255) and dequantised, so "
              "bits/dim stays a likelihood of valid images. Smaller Δ = more resilient; the reconstruction "
              "error is the fixed-point inverse's max |f^-1(f(x)) - x| (tolerance 1e-6).")


def _awgn_png(rows: list[dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (variant,), vrows in group(rows, "variant").items():
        sig = sorted({r["sigma"] for r in vrows})
        for ax, key in ((a, "bits_per_dim"), (b, "reconstruction_error")):
            series = [[next((r[key] for r in g if r["sigma"] == s), float("nan")) for s in sig]
                      for g in group(vrows, "seed").values()]
            _plot_series(ax, sig, series, variant, marker="o")
    b.set_yscale("log")
    for ax, label in ((a, "bits/dim"), (b, "max |f^-1(f(x)) - x|")):
        ax.set_xlabel("noise sigma")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle("additive white Gaussian noise (mean over seeds, band = min..max)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 4. dot (plain dot-product attention: what breaks)
# ---------------------------------------------------------------------------------------------

def _training_facts(rec: RunRecord, model: Optional[ACFModel]) -> dict:
    """Outcome of the run; the certificate is the evaluated (EMA, eval-mode) model's, for the map a
    forward pass applies (its power iterations converge for the loaded weights on that pass)."""
    bound = None
    if model is not None:
        with torch.no_grad():
            model(torch.rand(2, *model.cfg.input_shape))
        bound = max(model.lipschitz_bounds())
    return {"nonfinite_loss": int(rec.status == "nonfinite"), "steps_completed": rec.steps_done,
            "final_test_bpd": rec.final.get("test_bpd"), "certified_bound_max": bound,
            "gamma_max_abs": rec.gamma_max_abs}


def _probe_model(model: ACFModel, test: ImageDataset, scale: Scale) -> list[tuple[Optional[float], str, float]]:
    """``(input scale, measurement, value)`` of the whole-model inverse and of the first attention
    block at growing input scale."""
    x = _test_batch(test, scale.dot_images)
    try:
        with torch.no_grad():
            z, _ = model(x)
        x_rec, bad = count_nonconverged(lambda: model.inverse(z))
        err = float((x_rec - x).abs().max())
    except ValueError as exc:  # a layer met non-finite values: no inverse to speak of
        if not _is_numeric_blowup(exc):
            raise
        err, bad = float("inf"), float("nan")
    out = [(None, "model_inversion_error", err), (None, "model_nonconverged_blocks", bad)]
    block = first_attention_block(model)
    h = block_input(model, block, x)
    est = block.estimator.evaluation()
    for s in scale.dot_scales:
        xs = h * s
        facts = {**block_inversion(block, xs),
                 "jacobian_norm_max": float(jacobian_norm(block.g, xs, scale.power_iters).max()),
                 **logdet_error(block.g, xs[:scale.logdet_images], est, scale.logdet_draws)}
        out += [(s, k, float(v)) for k, v in facts.items()]
    return out


# Probe the weights as trained, then with the attention at full weight.
DOT_GAMMAS = (("trained", None), ("set to 1", 1.0))


def _set_gamma(model: ACFModel, value: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ATTENTION_TYPES):
                m.gamma.fill_(value)


def dot(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Plain dot-product attention in Residual Flow against L2 attention in the same model (the paper's
    premise: dot-product self-attention is not Lipschitz, so it cannot be used naively). Measured:
    training stability, inversion error and fixed-point convergence, the log-det estimator against the
    exact log-det, and the Jacobian norm of the branch, at the data's scale and scaled up; on the
    trained weights, then with every attention gamma set to 1 (the attention at full weight: with the
    trained gamma, usually small after a short run, the attention barely enters g)."""
    ctx = _start("dot", out, scale, seeds, progress)
    rows = []
    for att in ("l2", "dot"):
        v = Variant("resflow", att)
        for seed in range(ctx.scale.seeds):
            rec = ctx.run("convergence" if v in CONVERGENCE_VARIANTS else "dot", train_config(ctx.scale, v, seed))
            ident = {"attention": att, "seed": seed, "status": rec.status, "run": _run_path(rec, ctx.root)}
            loaded = _load(rec) if (rec.path / "checkpoint.pt").exists() else None
            facts = _training_facts(rec, loaded[0] if loaded else None)
            rows += [{**ident, "gamma": "trained", "measurement": k, "input_scale": None, "value": val}
                     for k, val in facts.items()]
            for label, value in DOT_GAMMAS if loaded else ():
                if value is not None:
                    _set_gamma(loaded[0], value)
                torch.manual_seed(seed)
                rows += [{**ident, "gamma": label, "measurement": k, "input_scale": s, "value": val}
                         for s, k, val in _probe_model(*loaded, ctx.scale)]
    return _finish(ctx, rows, _dot_md, _dot_png)


DOT_MEASUREMENTS = {
    "nonfinite_loss": ("training hit a non-finite loss (1 = yes)", ".0f"),
    "steps_completed": ("steps completed", ".0f"),
    "final_test_bpd": ("final test bits/dim", ".4f"),
    "certified_bound_max": ("largest certified Lip(g) (inf: none)", ".3f"),
    "gamma_max_abs": ("largest attention |gamma|", ".3g"),
    "model_inversion_error": ("model: max |f^-1(f(x)) - x| on test images", ".2e"),
    "model_nonconverged_blocks": ("model: block inversions that did not converge", ".0f"),
    "block_inversion_error": ("block: max |x - g^-1(x + g(x))| / max(1, max |x|)", ".2e"),
    "block_converged_fraction": ("block: fraction of samples converged", ".2f"),
    "block_iterations": ("block: fixed-point iterations", ".0f"),
    "jacobian_norm_max": ("block: max ||J_g(x)||_2 (>= 1: not contractive)", ".3f"),
    "logdet_exact": ("block: exact log det(I + J_g) (mean)", ".3f"),
    "det_nonpositive": ("block: det(I + J_g) <= 0 (1 = yes)", ".0f"),
    "logdet_abs_error": ("block: max |estimate - exact| of the log-det", ".3e"),
    "logdet_error_se": ("block: log-det error in standard errors", ".2f"),
    "logdet_nonfinite_draws": ("block: fraction of non-finite estimator draws", ".2f"),
}


def _dot_md(ctx: _Context, rows: list[dict]) -> str:
    columns = list(group(rows, "gamma", "attention"))
    body = []
    for (meas, s), mrows in group(rows, "measurement", "input_scale").items():
        text, spec = DOT_MEASUREMENTS.get(meas, (meas, ".4g"))
        cells = [mean_std((r["value"] for r in mrows if (r["gamma"], r["attention"]) == c), spec)
                 if any((r["gamma"], r["attention"]) == c for r in mrows) else "" for c in columns]
        body.append([text, "data" if s is None else f"x{s:g}", *cells])
    s = ctx.scale
    return (ctx.header("Plain dot-product attention: what breaks (paper sections 1 and 3)",
                       "Claim: dot-product self-attention is not Lipschitz, so a contractive flow cannot use it "
                       "naively; L2 attention (or LipNorm) restores the guarantees.")
            + markdown_table(["measurement", "input scale", *[f"{a}, gamma {g}" for g, a in columns]], body)
            + "\n\nColumns: ResFlow + L2 or + plain dot-product attention; gamma `trained` = the weights as "
              "trained, gamma `set to 1` = the same weights with every attention gamma set to 1 (the layer computes "
              "(X + gamma F) / (1 + |gamma|); L2 divides F by its certified bound, dot does not). "
              f"Block measurements use the first residual block with attention, fed its actual input on "
              f"{s.dot_images} test images multiplied by the input scale; the exact log-det uses the full "
              f"Jacobian of {s.logdet_images} of them and the estimator {s.logdet_draws} draws each (the "
              "model's evaluation settings). The Jacobian norm is a lower bound on Lip(g) "
              f"({s.power_iters} power iterations). Values: mean ± std over seeds.")


def _dot_png(rows: list[dict], path: Path) -> None:
    panels = (("block_inversion_error", "block inversion error (relative)", True),
              ("jacobian_norm_max", "max ||J_g||_2", True), ("logdet_abs_error", "log-det |estimate - exact|", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (meas, label, log) in zip(axes, panels):
        for (gamma, att), arows in group([r for r in rows if r["measurement"] == meas], "gamma", "attention").items():
            scales = sorted({r["input_scale"] for r in arows})
            series = [[next((r["value"] for r in g if r["input_scale"] == s), float("nan")) for s in scales]
                      for g in group(arows, "seed").values()]
            _plot_series(ax, scales, series, f"{att}, gamma {gamma}", marker="o",
                         ls="-" if gamma == "trained" else "--")
        if meas == "jacobian_norm_max":
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="1 (contraction limit)")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("input scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("dot-product vs L2 attention in the first attention block")
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 5. classification (Table 3)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(model: ACFModel, test: ImageDataset, n: int, batch_size: int = 128) -> float:
    """Test accuracy of a hybrid model's linear head on ``z`` over the first ``n`` test images.

    ``z`` does not depend on the log-det estimator, so the cheapest one (one series term) is used."""
    blocks = [m for m in model.modules() if isinstance(m, ContractiveBlock)]
    saved = [b.estimator for b in blocks]
    for b in blocks:
        b.estimator = LogdetEstimator(method="series", n_terms=1)
    try:
        n, correct = min(n, len(test)), 0
        for start in range(0, n, batch_size):
            images, labels = test[slice(start, min(start + batch_size, n))]
            z, _ = model(uniform_dequantize(to_float(images)))
            correct += int((model.classify(z).argmax(1) == labels).sum())
    finally:
        for b, est in zip(blocks, saved):
            b.estimator = est
    return correct / n


def classification(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
                   progress: bool = True) -> Path:
    """Paper Table 3 at our scale: hybrid i-ResNet (bits/dim + cross-entropy of a linear head on z)
    with and without L2 attention; test accuracy on the labelled embedded data sets."""
    ctx = _start("classification", out, scale, seeds, progress)
    rows = []
    for data in ctx.scale.classification_data:
        for att in (None, "l2", "l2-tight"):
            for seed in range(ctx.scale.seeds):
                rec = ctx.run("classification", train_config(ctx.scale, Variant("iresnet", att), seed, "hybrid", data))
                acc, n = None, None
                if (rec.path / "checkpoint.pt").exists():
                    model, test = _load(rec)
                    torch.manual_seed(seed)
                    n = min(ctx.scale.classification_images, len(test))
                    acc = accuracy(model, test, n)
                row = _summary_row(rec, ctx.root, {"data": data, "attention": att or "none"})
                rows.append({**row, "accuracy": acc, "accuracy_images": n})
    return _finish(ctx, rows, _classification_md, _classification_png)


def _classification_md(ctx: _Context, rows: list[dict]) -> str:
    body = []
    for (data, att), runs in group(rows, "data", "attention").items():
        base = {r["seed"]: r["accuracy"] for r in rows if r["data"] == data and r["attention"] == "none"}
        paired = [100 * (r["accuracy"] - base[r["seed"]]) for r in runs
                  if att != "none" and None not in (r["accuracy"], base.get(r["seed"]))]
        body.append([data, Variant("iresnet", None if att == "none" else att).label, len(runs),
                     mean_std((100 * r["accuracy"] for r in runs if r["accuracy"] is not None), ".2f"),
                     "" if att == "none" else mean_se(paired, "+.2f"), mean_std(r["test_bpd"] for r in runs),
                     "" if att == "none" else mean_std((r["gamma_max_abs"] for r in runs), ".1e"),
                     mean_std((r["train_seconds"] for r in runs), ".0f")])
    paper = ", ".join(f"{k} {v:.2f}%" for k, v in PAPER_TABLE3_CIFAR10.items())
    return (ctx.header("Hybrid classification (paper Table 3)",
                       "Claim: ACF (i-ResNet + L2 attention) classifies better than contractive flows without "
                       "attention.", ", ".join(ctx.scale.classification_data))
            + markdown_table(["data", "model", "seeds", "test accuracy (%)",
                              "Δ accuracy vs no attention (paired, ± SE)", "final test bpd",
                              "attention max |gamma|", "train seconds / run"], body)
            + f"\n\nAccuracy of the EMA weights on the first {ctx.scale.classification_images} test images "
              f"(at most the whole test set). Paper, CIFAR10 at full scale: {paper}.")


def _classification_png(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = group(rows, "data", "attention")
    for i, ((data, att), runs) in enumerate(groups.items()):
        vals = [100 * r["accuracy"] for r in runs if r["accuracy"] is not None]
        ax.bar(i, statistics.fmean(vals) if vals else 0, yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
               capsize=4, color={"none": "C0", "l2": "C1"}.get(att, "C2"))
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(groups)), [f"{d}\n{a}" for d, a in groups])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("hybrid i-ResNet: without attention, L2, L2-tight")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 6. interpolation (Fig. 6)
# ---------------------------------------------------------------------------------------------

def interpolation(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
                  progress: bool = True) -> Path:
    """Paper Fig. 6 at our scale: decode ``z = (1 - t) z_a + t z_b`` between test pairs for every
    convergence variant (seed 0). Measured: endpoint error (decoding returns the test images),
    pixel path length over the straight-line distance, and inversions that did not converge."""
    ctx = _start("interpolation", out, scale, seeds, progress)
    s = ctx.scale
    rows, grids = [], {}
    for v, rec in convergence_runs(ctx):
        if rec.cfg.seed != 0 or not (rec.path / "checkpoint.pt").exists():
            continue
        model, test = _load(rec)
        torch.manual_seed(0)
        imgs, bad = count_nonconverged(lambda: interpolations(model, test, s.interp_pairs, s.interp_steps))
        grids[v.label] = imgs
        ends = to_float(test[slice(0, 2 * s.interp_pairs)][0])
        rows += [{**_variant_columns(v), "seed": 0, "pair": p, **m, "nonconverged_blocks": bad, "status": rec.status,
                  "run": _run_path(rec, ctx.root)} for p, m in enumerate(path_metrics(imgs, ends, s.interp_steps))]
    return _finish(ctx, rows, _interpolation_md, lambda rows, path: _save_interpolation_grids(grids, s, path))


def path_metrics(images: torch.Tensor, ends: torch.Tensor, steps: int) -> list[dict]:
    """Per interpolation path (``images``: pairs x steps decoded images, ``ends``: the 2 x pairs test
    images): the largest distance of its ends from the test images, its length in pixel space, the
    straight distance between its ends and their ratio (1: a straight line)."""
    paths = images.reshape(-1, steps, images[0].numel())
    ends = ends.reshape(-1, 2, images[0].numel())
    out = []
    for path, (a, b) in zip(paths, ends):
        length = float((path[1:] - path[:-1]).norm(dim=1).sum())
        direct = float((path[-1] - path[0]).norm())
        out.append({"endpoint_error": max(float((path[0] - a).abs().max()), float((path[-1] - b).abs().max())),
                    "path_length": length, "direct_distance": direct,
                    "path_ratio": length / direct if direct > 0 else float("nan")})
    return out


def _save_interpolation_grids(grids: dict[str, torch.Tensor], s: Scale, path: Path) -> None:
    fig, axes = plt.subplots(len(grids), 1, figsize=(s.interp_steps * 0.9, len(grids) * s.interp_pairs * 0.95 + 0.3),
                             squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], grids.items()):
        grid = image_grid(imgs.detach().float().cpu(), s.interp_pairs).numpy()
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _interpolation_md(ctx: _Context, rows: list[dict]) -> str:
    body = [[variant, len(runs), mean_std((r["endpoint_error"] for r in runs), ".2e"),
             mean_std(r["path_ratio"] for r in runs), mean_std(r["direct_distance"] for r in runs),
             runs[0]["nonconverged_blocks"]] for (variant,), runs in group(rows, "variant").items()]
    return (ctx.header("Latent interpolation between test pairs (paper Fig. 6)",
                       "Claim: ACF interpolates smoothly between unseen test images.")
            + markdown_table(["variant", "pairs", "endpoint error", "path length / straight distance",
                              "straight distance", "non-converged block inversions"], body)
            + f"\n\nSeed 0 of each convergence run; {ctx.scale.interp_steps} equally spaced points per pair "
              "(t = 0 ... 1). Path ratio 1 = the decoded path is a straight line in pixel space; larger = it "
              "detours through other images. Endpoint error: max |decoded - test image| (a dequantisation "
              "bin is 1/256 = 3.9e-03). The figure is `interpolation.png`.")


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 7. tight: the logit range of L2-tight attention
# ---------------------------------------------------------------------------------------------

def tight(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
          progress: bool = True) -> Path:
    """The logit range ``Delta`` of L2-tight attention, swept once: Residual Flow + L2-tight at each
    ``Delta`` of the scale against Residual Flow without attention, same seeds (the default ``Delta``'s
    runs are the convergence runs). A larger ``Delta`` allows sharper attention but costs certificate
    (``L`` grows with ``f(Delta, N)``)."""
    ctx = _start("tight", out, scale, seeds, progress)
    default = TrainConfig().delta_max
    rows = []
    for seed in range(ctx.scale.seeds):
        rec = ctx.run("convergence", train_config(ctx.scale, Variant("resflow", None), seed))
        rows.append(_summary_row(rec, ctx.root, {"attention": "none", "delta_max": None}))
    sweep = [(delta, None) for delta in ctx.scale.deltas] + [(default, 1.0)]  # and gamma starting at 1
    for delta, gamma_init in sweep:
        for seed in range(ctx.scale.seeds):
            owner = "convergence" if (delta, gamma_init) == (default, None) else "tight"
            v = Variant("resflow", "l2-tight", delta_max=delta, gamma_init=gamma_init)
            rec = ctx.run(owner, train_config(ctx.scale, v, seed))
            rows.append(_summary_row(rec, ctx.root, {"attention": "l2-tight", "delta_max": delta,
                                                     "gamma_init": gamma_init or 0.0,
                                                     "f_196": l2_tight_constant(delta, 196),
                                                     **_attention_columns(rec, ctx.scale)}))
    return _finish(ctx, rows, _tight_md, _tight_png)


def _tight_md(ctx: _Context, rows: list[dict]) -> str:
    base = {r["seed"]: r["test_bpd"] for r in rows if r["attention"] == "none"}
    body = []
    for (delta, gamma_init), runs in group([r for r in rows if r["attention"] != "none"], "delta_max",
                                           "gamma_init").items():
        paired = [r["test_bpd"] - base[r["seed"]] for r in runs if None not in (r["test_bpd"], base.get(r["seed"]))]
        body.append([f"{delta:g}", f"{gamma_init:g}", f"{runs[0]['f_196']:.2f}", len(runs),
                     mean_std(r["test_bpd"] for r in runs), mean_se(paired), *_attention_cells(runs),
                     mean_std((r["train_seconds"] for r in runs), ".0f")])
    return (ctx.header("The logit range of L2-tight attention",
                       "Question: does a wider logit range (sharper attention, a looser certificate) help, and "
                       "what does attention that starts switched on (gamma = 1) do?")
            + markdown_table(["Δ_max", "initial gamma", "f(Δ, 196)", "seeds", "final test bpd",
                              "Δ bpd vs no attention (paired, ± SE)", *ATTENTION_HEADER, "train seconds / run"], body)
            + f"\n\nResidual Flow + L2-tight attention (4 grouped heads); no attention: "
              f"{mean_std(base.values())}. f(Δ, N): the certificate's factor, L = f ||M||, at the first "
              f"scale's N = 196. " + ATTENTION_NOTE)


def _tight_png(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    runs = [r for r in rows if r["attention"] != "none" and not r["gamma_init"]]
    deltas = sorted({r["delta_max"] for r in runs})
    for ax, key, label in ((axes[0], "test_bpd", "final test bits/dim"), (axes[1], "attention_share", "attention share")):
        vals = [[r[key] for r in runs if r["delta_max"] == d and r.get(key) is not None] for d in deltas]
        ax.errorbar(deltas, [statistics.fmean(v) if v else float("nan") for v in vals],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals], marker="o", capsize=4,
                    label="ResFlow + L2-tight")
        if key == "test_bpd":
            none = [r["test_bpd"] for r in rows if r["attention"] == "none" and r["test_bpd"] is not None]
            if none:
                ax.axhline(statistics.fmean(none), color="gray", linestyle="--", label="no attention")
        ax.set_xlabel("Δ_max")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("L2-tight attention: logit range")
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# 8. long: the comparison beyond one epoch
# ---------------------------------------------------------------------------------------------

def long(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
         progress: bool = True) -> Path:
    """Each architecture without and with L2-tight attention for the scale's ``long_steps`` (13 epochs
    of MNIST-5k at the reduced scale), so that the comparison is not made after one epoch."""
    s = get_scale(scale, seeds)
    ctx = _start("long", out, replace(s, steps=s.long_steps, eval_every=s.long_eval_every), seeds, progress)
    rows = []
    for arch in ("iresnet", "resflow", "idensenet"):
        for att in (None, "l2-tight"):
            for seed in range(ctx.scale.seeds):
                v = Variant(arch, att)
                rows += _curve_rows(ctx, v, ctx.run("long", train_config(ctx.scale, v, seed)))
    return _finish(ctx, rows, _long_md, _convergence_png)


def _long_md(ctx: _Context, rows: list[dict]) -> str:
    return (ctx.header("Longer runs: with and without L2-tight attention",
                       "Question: does attention that can act (L2-tight) change bits/dim once training is "
                       "past its first epoch?")
            + _curves_table(rows, paper=False)
            + "\n\nΔ < 0: attention lowers bits/dim (mean of the per-seed differences ± its standard error). "
            + ATTENTION_NOTE)


EXPERIMENTS: dict[str, Callable[..., Path]] = {
    "convergence": convergence, "heads": heads, "awgn": awgn, "dot": dot, "classification": classification,
    "interpolation": interpolation, "tight": tight, "long": long,
}


def run_experiment(name: str, out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced",
                   seeds: Optional[int] = None, progress: bool = True) -> list[Path]:
    """Run experiment ``name`` (or ``"all"``, in registry order) and return the output folders."""
    if name != "all" and name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}, all")
    names = list(EXPERIMENTS) if name == "all" else [name]
    s = get_scale(scale, seeds)  # fail on a bad scale before any work
    return [EXPERIMENTS[n](out, s, None, progress) for n in names]


# ---------------------------------------------------------------------------------------------
# The results page
# ---------------------------------------------------------------------------------------------

def _marker(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} (generated by `acf experiment report`) -->", f"<!-- END {name} -->"


TABLES: dict[str, Callable[[_Context, list[dict]], str]] = {
    "convergence": _convergence_md, "heads": _heads_md, "awgn": _awgn_md, "dot": _dot_md,
    "classification": _classification_md, "interpolation": _interpolation_md, "tight": _tight_md, "long": _long_md,
}


def rewrite_table(out: PathLike, name: str) -> Path:
    """Regenerate experiment ``name``'s markdown table from its CSV and JSON (no training, no
    measuring: the numbers are the CSV's; the JSON's wall time and machine stay)."""
    folder = Path(out) / name
    meta = json.loads((folder / f"{name}.json").read_text())
    scale = Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["scale"].items()})
    ctx = _Context(name, Path(out), scale, False, 0.0, [])
    path = folder / f"{name}.md"
    path.write_text(TABLES[name](ctx, read_csv(folder / f"{name}.csv")) + "\n")
    return path


def generated_section(out: PathLike, name: str) -> str:
    """Experiment ``name``'s table (regenerated from its CSV) under ``out``, headings demoted below the
    page's sections, with the wall time and machine of its JSON and links to its CSV and figure."""
    folder = Path(out) / name
    for suffix in (".csv", ".json"):
        if not (folder / f"{name}{suffix}").exists():
            raise FileNotFoundError(f"{folder / (name + suffix)}: not found; run `acf experiment {name} --out {out}` first")
    meta = json.loads((folder / f"{name}.json").read_text())
    text = rewrite_table(out, name).read_text().strip()
    text = "\n".join("###" + line[1:] if line.startswith("#") else line for line in text.splitlines())
    m = meta["machine"]
    return (f"{text}\n\nWall time {meta['wall_seconds'] / 60:.1f} min ({meta['runs_trained']} runs trained, "
            f"{meta['runs_reused']} reused) on {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, commit {m['git_commit'] or '?'} ({m['date']}). "
            f"Data: [`{name}.csv`](results/{name}/{name}.csv); figure:\n\n![{name}](results/{name}/{name}.png)")


def fill_results_page(page: PathLike, out: PathLike) -> Path:
    """Replace every ``<!-- BEGIN name ... -->`` ... ``<!-- END name -->`` block of ``page`` with the
    generated section of experiment ``name`` (so the page's numbers come from the runs)."""
    page = Path(page)
    if not page.exists():
        raise FileNotFoundError(f"{page}: results page not found")
    text = page.read_text()
    for name in EXPERIMENTS:
        begin, end = _marker(name)
        if begin in text:
            if end not in text:
                raise ValueError(f"{page}: '{begin}' has no matching '{end}'")
            head, rest = text.split(begin, 1)
            text = head + begin + "\n" + generated_section(out, name) + "\n" + end + rest.split(end, 1)[1]
    page.write_text(text)
    return page
