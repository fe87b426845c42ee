"""What every experiment shares: the scales, the model variants, the training runs (train, resume or
reuse), and an experiment's start and finish (its CSV, markdown, figure and JSON)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from ..runfolder import CHECKPOINT
from .. import runfolder
from ..layers.attention import ATTENTIONS
from ..train import NonFiniteLossError, TrainConfig, train
from .tables import read_csv, write_csv

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
    dot_scales: tuple[float, ...]  # input scales of the dot-product measurements (x = scale * block input)
    dot_images: int              # images for the inversion and Jacobian-norm measurements
    logdet_images: int           # images for the exact log-det (a full Jacobian each)
    logdet_draws: int            # estimator draws per image
    power_iters: int             # power iterations for Jacobian spectral norms
    interp_pairs: int
    interp_steps: int
    long_steps: int = 2000       # long experiment: steps of each run ...
    long_eval_every: int = 500   # ... and its evaluation cadence
    deltas: tuple[float, ...] = (0.5, 1.0, 2.0)  # tight experiment: l2-tight logit ranges
    share_images: int = 64       # test images for the attention's share of a layer's output
    protocol_steps: tuple[int, ...] = (150, 500, 1000, 2000)  # attention: the evaluated checkpoints
    protocol_seeds: tuple[int, int] = (10, 6)  # attention: seeds of stage A and stage B
    protocol_images: int = 359   # attention: test images of stage A (the digits' whole test set) ...
    protocol_images_b: int = 500  # ... and of stage B
    timing_steps: int = 12       # attention: steps timed per arm (side by side) for the equal wall-clock


MICRO = Scale(name="micro", data="digits", steps=2, batch_size=16, eval_every=1, eval_size=8, n_exact_eval=2,
              warmup=2, seeds=1, heads=(1, 4, 16), classification_data=("digits",), classification_images=16,
              awgn_sigmas=(0.0, 0.1), awgn_images=4, dot_scales=(1.0, 4.0), dot_images=2, logdet_images=1,
              logdet_draws=4, power_iters=3, interp_pairs=2, interp_steps=3, long_steps=3, long_eval_every=3,
              deltas=(0.5, 2.0), share_images=4, protocol_steps=(1, 2), protocol_seeds=(1, 1), protocol_images=8,
              protocol_images_b=8, timing_steps=1)

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
    """A model variant: architecture, attention (a kind of ``acf.layers.attention.ATTENTIONS``, or None),
    heads and, for "l2-tight", the logit range (None: the default)."""

    arch: str
    attention: Optional[str]
    heads: int = 4
    delta_max: Optional[float] = None
    gamma_init: Optional[float] = None

    @property
    def label(self) -> str:
        names = {"iresnet": "i-ResNet", "resflow": "ResFlow", "idensenet": "i-DenseNet"}
        att = "" if self.attention is None else f" + {ATTENTIONS[self.attention].label} SA"
        options = [f"{name}={value:g}" for name, value in (("Δ", self.delta_max), ("γ₀", self.gamma_init))
                   if value is not None]
        return names.get(self.arch, self.arch) + att + (f" ({', '.join(options)})" if options else "")


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


# The optimisation and model settings of every experiment, fixed here rather than taken from
# TrainConfig's defaults (those are `acf train`'s default run, tuned for its own budget), so that the
# published tables and their runs stay reproducible when the default run changes.
# Attention joins as in the paper (eq. 13, "residual").
EXPERIMENT_SETTINGS = {"preset": "cpu", "lr": 1e-3, "lr_schedule": "constant", "max_grad_norm": None, "ema_decay": 0.999,
                       "logit_alpha": 1e-6, "attention_form": "residual", "n_exact": 2}


def train_config(scale: Scale, variant: Variant, seed: int, task: str = "density",
                 data: Optional[str] = None) -> TrainConfig:
    """The training configuration of ``variant`` at ``scale`` (every run of a scale shares it)."""
    extra = {k: getattr(variant, k) for k in ("delta_max", "gamma_init") if getattr(variant, k) is not None}
    return TrainConfig(data=data or scale.data, arch=variant.arch, attention=variant.attention, heads=variant.heads,
                       task=task, steps=scale.steps, batch_size=scale.batch_size, warmup=scale.warmup, seed=seed,
                       eval_every=scale.eval_every, eval_size=scale.eval_size, n_exact_eval=scale.n_exact_eval,
                       **EXPERIMENT_SETTINGS, **extra)


# Settings added after runs were keyed, left out of the key at the value those runs used, so that
# existing run folders keep their names.
KEY_OMITS = {"lr_schedule": "constant", "max_grad_norm": None}


def run_key(cfg: TrainConfig) -> str:
    """Folder name of a run: readable variant fields and a hash of the whole configuration except
    ``steps`` (so that raising the steps of a scale extends its runs instead of starting over)."""
    values = {k: v for k, v in asdict(cfg).items() if k != "steps" and KEY_OMITS.get(k, ()) != v}
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.data}-{cfg.task}-{cfg.arch}-{cfg.attention or 'none'}-h{cfg.heads}-s{cfg.seed}-{digest}"


def _checkpoint(path: Path) -> Optional[dict]:
    """The run's checkpoint, loaded safely (``None`` when there is none yet)."""
    ckpt = path / CHECKPOINT
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


def locate(root: Path, owner: str, key: str) -> Path:
    """The run folder ``key`` under ``root``: the owner's if it holds a checkpoint, else any other
    experiment's that does, else the owner's (new)."""
    own = root / owner / "runs" / key
    found = [own] + sorted(p for p in root.glob(f"*/runs/{key}") if p != own)
    return next((p for p in found if (p / CHECKPOINT).exists() or (p / SIDECAR).exists()), own)


def is_numeric_blowup(exc: Exception) -> bool:
    return isinstance(exc, NonFiniteLossError) or (isinstance(exc, ValueError) and "non-finite" in str(exc))


def ensure_run(root: Path, owner: str, cfg: TrainConfig, progress: bool = True) -> RunRecord:
    """Train the run ``cfg`` under ``root/owner/runs/`` unless a run with the same configuration
    already finished anywhere under ``root``; resume it if it was interrupted. A non-finite loss
    (or non-finite activations) ends the run with ``status="nonfinite"``: recorded, not raised.
    The run folder's lock is held throughout (another process working on the same run is refused),
    and the history is the checkpoint's (which the metrics files never run ahead of)."""
    path = locate(Path(root), owner, run_key(cfg))
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
                if not is_numeric_blowup(exc):
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
# An experiment: start, its runs, finish with its outputs
# ---------------------------------------------------------------------------------------------

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
class Context:
    """One experiment under way: its name, output root, scale and the runs it used."""

    name: str
    root: Path
    scale: Scale
    progress: bool
    started: float
    runs: list[RunRecord]
    date: Optional[str] = None  # when its results were measured (ISO); None: today


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
                f"({(self.date or datetime.date.today().isoformat())[:10]}).\n\n")


@dataclass(frozen=True)
class Experiment:
    """An entry of the registry: ``run(out, scale, seeds, progress)`` trains and measures, writes
    ``<out>/<name>/<name>.{csv,md,png,json}`` and returns the folder; ``markdown(ctx, rows)`` is its
    table from the CSV's rows (what ``acf experiment report`` regenerates)."""

    name: str
    run: Callable[..., Path]
    markdown: Callable[[Context, list[dict]], str]
    parallel: bool = False  # its run() takes ``jobs``: training processes side by side


def start(name: str, out: PathLike, scale: Union[str, Scale], seeds: Optional[int], progress: bool) -> Context:
    ctx = Context(name, Path(out), get_scale(scale, seeds), progress, time.perf_counter(), [])
    ctx.folder.mkdir(parents=True, exist_ok=True)
    return ctx


def finish(ctx: Context, rows: list[dict], markdown: Callable[[Context, list[dict]], str],
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


def run_path(rec: RunRecord, root: Path) -> str:
    """The run folder, relative to the experiments' root when inside it."""
    return str(rec.path.relative_to(root)) if rec.path.is_relative_to(root) else str(rec.path)


def run_columns(rec: RunRecord, root: Path) -> dict:
    return {"gamma_max_abs": rec.gamma_max_abs, "status": rec.status, "run_wall_seconds": round(rec.wall_seconds, 2),
            "reused": int(rec.reused), "run": run_path(rec, root)}


def summary_row(rec: RunRecord, root: Path, ident: dict) -> dict:
    """One row per run: its identity, final metrics and bookkeeping."""
    last = rec.final
    return {**ident, "seed": rec.cfg.seed, "steps": rec.steps_done, "train_bpd": last.get("train_bpd"),
            "test_bpd": last.get("test_bpd"), "test_acc": last.get("test_acc"),
            "train_seconds": last.get("seconds"), **run_columns(rec, root)}


def variant_columns(v: Variant) -> dict:
    return {"variant": v.label, "arch": v.arch, "attention": v.attention or "none", "heads": v.heads}
