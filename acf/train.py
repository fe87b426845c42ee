"""Training loop of the main job: ``acf train`` (density or hybrid), with resumable run folders.

A run folder holds ``config.json``, ``checkpoint.pt``, ``metrics.csv`` / ``metrics.json`` and PNG
figures, each written atomically (``acf.runfolder``), by one process at a time (the folder's lock). The
checkpoint holds the history and is written first; the metrics files are then rewritten from it (and
again when the run is resumed), so a run killed at any point never lists a step its checkpoint does
not have, and a resumed run never duplicates or loses rows. Everything random
(batch order: a ``DataLoader`` over ``acf.data.EpochBatchSampler``, a permutation per epoch from
``epoch_seed(seed, epoch)``, restarted mid-epoch on resume; dequantisation noise, roulette draws and
probes: the global torch generator, saved in the checkpoint) is reproducible, so a run resumed from a
checkpoint ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed, runfolder
from ._checks import (NonFiniteError, check_choice, check_int, check_optional_str, check_real, first_non_finite,
                      parse_device, resolve_device)
from .layers.block import CertificateError, certified_bounds, uncertified_warning
from .data import DATASETS, endless_batches, load_dataset, make_loader, to_float
from .layers.flow import bits_per_dim, standard_normal_logprob, uniform_dequantize
from .layers.logdet import DEFAULT_MAX_TERMS, GRADS, LogdetEstimator
from .models import ARCHS, ATTENTION_CHOICES, PRESETS, ACFModel, ModelConfig, model_config

METRIC_FIELDS = ("step", "train_bpd", "test_bpd", "test_acc", "seconds", "lipschitz_max")
CONFIG, CHECKPOINT = "config.json", "checkpoint.pt"
LR_SCHEDULES = ("constant", "cosine")
CONFIG_SECTIONS = ("train", "model", "world_size", "warning")  # of config.json; "train" is read back, the rest a record
SAMPLE_TEMPERATURES = (0.5, 0.7, 0.85, 1.0)  # samples.png (`acf train`, `acf sample`): a row block per temperature


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (``acf train --help`` lists them). The defaults are ``acf train``'s
    default run, chosen by a measured sweep for a 2-core CPU and a budget of about 10 minutes
    (``bench/results/2026-11-30-default-run.md``); the experiments fix their own settings."""

    data: str = "mnist5k"
    data_root: Optional[str] = None
    arch: str = "resflow"
    attention: Optional[str] = None  # "l2", "l2-tight", "lipnorm" or "dot": see docs/RESULTS.md
    heads: int = 4
    preset: str = "cpu-fc"
    task: str = "density"            # or "hybrid": bits/dim + cross-entropy of a linear head on z
    steps: int = 3000
    batch_size: int = 32
    lr: float = 5e-3
    warmup: int = 100
    lr_schedule: str = "constant"     # after the warm-up: "constant", or a "cosine" decay towards 0 at the end
    ema_decay: float = 0.99
    seed: int = 0
    device: str = "cpu"              # or "auto": CUDA when available (what `acf train` uses unless told)
    eval_every: int = 500
    eval_size: int = 200             # test images per evaluation (n_exact_eval terms: costly)
    n_exact: int = 2                 # roulette: exact terms in training
    n_exact_eval: int = 20           # ... and in evaluation
    lam: float = 2.0                 # Poisson rate of the roulette
    grad: str = "neumann"            # log-det gradient: neumann, memory_efficient, backprop
    logit_alpha: float = 1e-6
    attention_form: str = "residual"  # how attention joins the flow: residual, quadrature or gated
    attention_scales: Optional[tuple[int, ...]] = None  # stages (0 = first) with attention; None: all
    gamma_init: Optional[float] = None  # initial weight of the attention path; None: the form's default
    delta_max: float = 0.5           # "l2-tight" attention: logit range, ball radius, head layout
    ball_radius: float = 1.0
    head_layout: str = "grouped"
    model: dict = field(default_factory=dict)  # other settings of the model (ModelConfig fields) over the preset's

    def __post_init__(self) -> None:
        """Check every field's type and range; errors name the field."""
        if not isinstance(self.data, str) or self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        check_optional_str(self.data_root, "data_root")
        check_choice(self.task, "task", ("density", "hybrid"))
        check_choice(self.arch, "arch", ARCHS)
        check_choice(self.attention, "attention", ATTENTION_CHOICES)
        check_choice(self.preset, "preset", tuple(PRESETS))
        check_choice(self.grad, "grad", GRADS)
        check_choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        for name in ("heads", "steps", "batch_size", "eval_every", "eval_size"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("warmup", "seed", "n_exact", "n_exact_eval"):
            check_int(getattr(self, name), name, minimum=0)
        check_real(self.lr, "lr", low=0.0, low_open=True)
        check_real(self.ema_decay, "ema_decay", low=0.0, high=1.0, high_open=True)
        check_real(self.lam, "lam", low=0.0, high=DEFAULT_MAX_TERMS, low_open=True)  # mean draw <= the roulette's cap
        check_real(self.logit_alpha, "logit_alpha", low=0.0, high=0.5, high_open=True)
        if isinstance(self.attention_scales, list):  # from JSON
            object.__setattr__(self, "attention_scales", tuple(self.attention_scales))
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be an object of model settings, got {self.model!r}")
        unknown = sorted(set(self.model) - {f.name for f in fields(ModelConfig)})
        if unknown:
            raise ValueError(f"model: unknown model setting(s) {unknown}; known: {sorted(f.name for f in fields(ModelConfig))}")
        taken = sorted(set(self.model) & set(MODEL_SETTINGS_OF_TRAINING))
        if taken:
            raise ValueError(f"model settings {taken} are training settings of their own: set them directly")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string, got {self.device!r}")
        parse_device(self.device)  # "auto", and whether this machine has the device, are resolved where the run starts
        if self.task == "hybrid" and DATASETS[self.data].n_classes == 0:
            raise ValueError(f"data set {self.data!r} has no labels: it cannot train a hybrid model")
        model_config_of(self)  # every model setting checked now, each error naming its field


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) over ``cfg.lr``: a linear warm-up over
    ``cfg.warmup`` steps, then 1 (``"constant"``) or ``(1 + cos(pi t)) / 2`` with ``t`` the fraction of
    the remaining steps done (``"cosine"``; a run extended by ``--resume --steps`` continues on the
    schedule of its new length)."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup:
        return warm
    t = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * t))


# The model settings (ModelConfig fields) a TrainConfig sets itself; ``TrainConfig.model`` holds the others.
MODEL_SETTINGS_OF_TRAINING = ("arch", "attention", "heads", "input_shape", "n_classes", "estimator", "logit_alpha",
                              "attention_form", "attention_scales", "gamma_init", "delta_max", "ball_radius",
                              "head_layout")


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    """The checked model configuration a training config describes (its preset, ``cfg.model`` over it,
    then the model settings of the training config itself)."""
    info = DATASETS[cfg.data]
    est = LogdetEstimator(method="roulette", n_exact=cfg.n_exact, n_exact_eval=cfg.n_exact_eval, lam=cfg.lam,
                          grad=cfg.grad)
    return model_config(cfg.arch, cfg.attention, cfg.heads, info.input_shape, preset=cfg.preset, **cfg.model,
                        n_classes=info.n_classes if cfg.task == "hybrid" else None, estimator=est,
                        logit_alpha=cfg.logit_alpha, attention_form=cfg.attention_form,
                        attention_scales=cfg.attention_scales, gamma_init=cfg.gamma_init, delta_max=cfg.delta_max,
                        ball_radius=cfg.ball_radius, head_layout=cfg.head_layout)


def build_for(cfg: TrainConfig) -> ACFModel:
    """The model a training config describes."""
    return ACFModel(model_config_of(cfg))


def _write_metrics(run: Path, history: list[dict]) -> None:
    """``metrics.csv`` and ``metrics.json`` from the history the checkpoint holds (written after it)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")  # per-block bounds: JSON only
    writer.writeheader()
    writer.writerows(history)
    runfolder.write_text(run / "metrics.csv", text.getvalue())
    runfolder.write_text(run / "metrics.json", json.dumps(history, indent=1))


# Settings that runs written before they existed do not store, and the values that reproduce those runs.
SETTINGS_ADDED_LATER = {"gamma_init": None, "delta_max": 0.5, "ball_radius": 1.0, "head_layout": "grouped",
                        "lr_schedule": "constant", "attention_form": "residual", "attention_scales": None, "model": {}}

# Settings a run may change when it continues: it may be extended, and moved to another device (on
# the same device it continues bit for bit).
CONTINUATION_SETTINGS = ("steps", "device")


def config_diff(stored: dict, cfg: TrainConfig) -> dict:
    """``{field: (stored, requested)}`` for the settings of ``cfg`` that differ from ``stored`` (a run's
    ``asdict(TrainConfig)``), ``CONTINUATION_SETTINGS`` excepted."""
    stored = {**SETTINGS_ADDED_LATER, **stored}  # a run older than a setting ran with its old value
    return {k: (stored.get(k), v) for k, v in asdict(cfg).items()
            if k not in CONTINUATION_SETTINGS and stored.get(k) != v}


def config_from_dict(values: object, source: str = "config", complete: bool = True) -> TrainConfig:
    """A ``TrainConfig`` from a dict of every setting (e.g. a run's config.json; with ``complete=False``
    missing settings take their defaults): unknown or missing settings, wrong types and values out of
    range raise an error naming the setting and ``source``."""
    if not isinstance(values, dict):
        raise TypeError(f"{source}: the training settings must be a JSON object, got {type(values).__name__}")
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if complete and n not in values and n not in SETTINGS_ADDED_LATER]
    if unknown or missing:
        raise ValueError(f"{source}: " + "; ".join(
            [f"unknown training setting(s) {unknown}"] * bool(unknown) + [f"missing setting(s) {missing}"] * bool(missing)))
    if complete:
        values = {**SETTINGS_ADDED_LATER, **values}
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{source}: {exc}") from None


def read_run_config(run: Path) -> TrainConfig:
    """The training configuration in ``run/config.json``, validated (errors name the file and field)."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {run} is not a run folder written by `acf train`")
    doc = runfolder.read_json(path)
    if not isinstance(doc, dict) or "train" not in doc:
        raise ValueError(f"{path}: no \"train\" section (the run's training settings)")
    return _train_section(doc, path)


def _train_section(doc: dict, path: Path) -> TrainConfig:
    """The validated "train" section of a run's config.json ``doc``, read from ``path``."""
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; a run's config.json holds {list(CONFIG_SECTIONS)}")
    return config_from_dict(doc["train"], f"{path} (train)")


def read_config_file(path: Path, defaults: Optional[dict] = None) -> TrainConfig:
    """Training settings from the JSON file ``path`` (``acf train --config``): a run's ``config.json``
    (its "train" section, complete, as ``read_run_config`` reads it) or a JSON object of ``TrainConfig``
    fields, where a missing field takes its value from ``defaults``, else ``TrainConfig``'s default.
    Errors name the file and the field."""
    path = Path(path)
    doc = runfolder.read_json(path)
    if isinstance(doc, dict) and "train" in doc:
        return _train_section(doc, path)
    return config_from_dict({**(defaults or {}), **doc} if isinstance(doc, dict) else doc, str(path), complete=False)


class Trainer:
    """State of one run: model, EMA copy, optimizer, step, history; ``run()`` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, workers: int = 0) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = distributed.local_device(resolve_device(cfg.device))
        self.rank, self.world = distributed.init(self.device)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.train_set = load_dataset(cfg.data, cfg.data_root, "train")
        self.test_set = load_dataset(cfg.data, cfg.data_root, "test")
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(self.train_set)} training images")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {self.world} data-parallel "
                             f"processes (each takes an equal share of the global batch)")
        check_int(workers, "workers", minimum=0)
        # Rank r's share of global batch i is its rows r::world: the sampler's per-rank batch i.
        self.loader = make_loader(self.train_set, cfg.batch_size // self.world, seed=cfg.seed, rank=self.rank,
                                  world_size=self.world, num_workers=workers, pin_memory=self.device.type == "cuda")
        self._batches: Optional[Iterator[tuple[int, int, Any]]] = None  # from self.step on; reset by load()
        self.model = build_for(cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, self.cfg))
        self.step, self.history, self.seconds = 0, [], 0.0
        self.ema: Optional[ACFModel] = None
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # own dequantisation noise and probes per rank

    # ---- data ---------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of batch ``self.step`` from the loader (epoch ``e`` visits the training set
        in the order of ``epoch_seed(seed, e)``), started mid-epoch where the run stands."""
        if self._batches is None:
            self._batches = endless_batches(self.loader, *divmod(self.step, self.loader.sampler.batches_per_epoch))
        _, _, (images, labels) = next(self._batches)
        copy_async = self.device.type == "cuda"  # from pinned memory
        return to_float(images.to(self.device, non_blocking=copy_async)), labels.to(self.device, non_blocking=copy_async)

    # ---- one step -----------------------------------------------------------------------------
    def objective(self, model: ACFModel, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, bits/dim per sample, z)`` on a batch of ``[0, 1]`` images (dequantised here)."""
        z, logdet = model(uniform_dequantize(x))
        bpd = bits_per_dim(standard_normal_logprob(z) + logdet, model.dims)
        loss = bpd.mean()
        if self.cfg.task == "hybrid":
            loss = loss + F.cross_entropy(model.classify(z), y)
        return loss, bpd, z

    def train_step(self) -> float:
        self.model.train()
        x, y = self.next_batch()
        if self.ema is None:  # data-dependent ActNorm initialisation on the first batch, then the EMA copy
            with torch.no_grad():
                self.model(uniform_dequantize(x))
            distributed.broadcast_state(self.model)
            self.ema = copy.deepcopy(self.model).eval()
        try:
            loss, bpd, _ = self.objective(self.model, x, y)
        except NonFiniteError as exc:  # activations blew up: the weights, not the (8-bit) data
            raise self.diverged(f"the model produced non-finite values ({exc})") from None
        if not distributed.all_ranks(bool(torch.isfinite(loss))):
            raise self.diverged(f"non-finite loss ({float(loss.detach())})")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.model)
        self.opt.step()
        bad = first_non_finite(self.model.named_parameters())
        if bad is not None:
            raise self.diverged(f"parameter {bad[0]!r} is not finite after the optimizer step ({bad[1]})")
        self.sched.step()
        distributed.broadcast_state(self.model)  # keeps the spectral-norm u/v identical across ranks
        self._update_ema()
        self.step += 1
        return float(bpd.detach().mean())

    def diverged(self, what: str, after: bool = False) -> NonFiniteLossError:
        """The error of a training that went non-finite (``what``) at step ``self.step + 1`` (or, with
        ``after``, by step ``self.step``), with its likely cause."""
        if self.step == 0:
            cause = "before any optimizer step, so the data or the initialisation (e.g. gamma_init) is the likely cause"
        else:
            cause = f"the learning rate (lr={self.cfg.lr:g}) is the likely cause: lower it (--lr)" + (
                "; so is the uncertified --attention dot" if self.cfg.attention == "dot" else "")
        where = f"by step {self.step}" if after else f"at step {self.step + 1}"
        return NonFiniteLossError(f"training diverged {where}: {what}; {cause}. The last good checkpoint in "
                                  f"{self.run_dir} (if any) is unchanged")

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of the weights with the usual warm-up ``min(decay, (1 + t) / (10 + t))``, so that short
        runs are not evaluated on weights that barely left their initialisation."""
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluated_model(self) -> ACFModel:
        """The model evaluations use: the EMA copy (the training model before the first step), in eval mode."""
        return (self.ema if self.ema is not None else self.model).eval()

    @torch.no_grad()
    def evaluate(self, n: Optional[int] = None) -> tuple[float, Optional[float]]:
        """Test bits/dim (and accuracy for hybrid models) of the EMA model on the first ``n`` test images."""
        model = self.evaluated_model()
        n = len(self.test_set) if n is None else min(n, len(self.test_set))
        bpds, correct = [], 0
        for start in range(0, n, self.cfg.batch_size):
            images, labels = self.test_set[slice(start, min(start + self.cfg.batch_size, n))]
            x, y = to_float(images).to(self.device), labels.to(self.device)
            _, bpd, z = self.objective(model, x, y)
            bpds.append(bpd)
            if self.cfg.task == "hybrid":
                correct += int((model.classify(z).argmax(1) == y).sum())
        acc = correct / n if self.cfg.task == "hybrid" else None
        return float(torch.cat(bpds).mean()), acc

    @torch.no_grad()
    def certified_lipschitz(self) -> dict[str, float]:
        """Certified ``Lip(g)`` of every residual block of the evaluated model (EMA, eval mode), by
        name: the exact (Lanczos) norms of the maps it applies. Raises ``CertificateError`` naming the
        block if one reaches 1 (the run then stops, its last checkpoint intact)."""
        try:
            return certified_bounds(self.evaluated_model())
        except CertificateError as exc:
            raise CertificateError(f"{exc} at step {self.step}; the last checkpoint in {self.run_dir} is "
                                   f"unchanged") from None

    # ---- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": asdict(self.cfg), "step": self.step, "seconds": self.seconds, "history": self.history,
                "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "world_size": self.world,
                "rng": distributed.gather_objects(torch.get_rng_state())}

    def save(self) -> None:
        """The checkpoint (with the history), then the metrics files rewritten from that history."""
        state = self.state()  # collective: every rank takes part
        if distributed.is_main():
            runfolder.atomic_write(self.run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))
            _write_metrics(self.run_dir, self.history)
        distributed.barrier()

    def load(self, path: Path) -> None:
        runfolder.check_model_section(path.parent / CONFIG, self.model.cfg.to_dict())  # "train" defines the model
        ckpt = runfolder.load_checkpoint(path, self.device)
        diff = config_diff(ckpt["config"] if isinstance(ckpt["config"], dict) else {}, self.cfg)
        if diff:
            raise ValueError(f"{path} was written by a run with another configuration (stored, requested): {diff}")
        if ckpt["step"] > self.cfg.steps:
            raise ValueError(f"{path} is at step {ckpt['step']}, past the {self.cfg.steps} steps requested; "
                             f"give --steps {ckpt['step']} or more")
        self.model.load_state_dict(ckpt["model"])
        if ckpt["ema"] is not None:
            self.ema = copy.deepcopy(self.model).eval()
            self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["sched"])
        self.step, self.seconds, self.history = ckpt["step"], ckpt["seconds"], ckpt["history"]
        self._batches = None  # the loader restarts at the loaded step
        if ckpt.get("world_size", 1) == self.world:  # exact continuation needs every rank's generator
            torch.set_rng_state(ckpt["rng"][self.rank])

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        main = distributed.is_main()
        recent: list[float] = []
        with tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step",
                  disable=not (progress and main)) as bar:  # closed (its line ended) on any exit
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                recent.append(self.train_step())
                self.seconds += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(bpd=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}")
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    if main:  # rank 0 evaluates and writes; the others wait in save()
                        try:
                            test_bpd, acc = self.evaluate(self.cfg.eval_size)
                        except NonFiniteError as exc:
                            raise self.diverged(f"the evaluated (EMA) model produced non-finite values ({exc})",
                                                after=True) from None
                        bounds = self.certified_lipschitz()
                        self.history.append({"step": self.step, "train_bpd": sum(recent) / len(recent),
                                             "test_bpd": test_bpd, "test_acc": acc, "seconds": round(self.seconds, 2),
                                             "lipschitz_max": max(bounds.values(), default=None), "lipschitz_blocks": bounds})
                        if progress:
                            bar.write(f"step {self.step}: test bits/dim {test_bpd:.4f}"
                                      + (f", accuracy {acc:.4f}" if acc is not None else ""))
                    recent = []
                    self.save()
        if not distributed.parameters_agree(self.model):
            raise RuntimeError("data-parallel ranks ended with different parameters")
        return self.history[-1] if self.history else {}


def _check_folder(run: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse a folder ``train`` must not write into: in use by another writer; no checkpoint to resume;
    a run already there (a new run may only restart one that stopped before its first checkpoint, with
    the same settings); files that are not an acf run."""
    runfolder.check_free(run)
    ckpt = run / CHECKPOINT
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from")
        return
    if ckpt.exists():
        raise FileExistsError(f"{run} already holds a run; resume it with --resume or choose another --out")
    names = runfolder.contents(run)
    if not names:
        return
    if CONFIG not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"{run} is not empty and holds no acf run ({shown}); choose another --out")
    diff = config_diff(asdict(read_run_config(run)), cfg)
    if diff:
        raise FileExistsError(f"{run} holds a run that stopped before its first checkpoint, with another "
                              f"configuration (stored, requested): {diff}; choose another --out")


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True, workers: int = 0) -> Trainer:
    """Train (or resume) the run in ``run_dir`` as its only writer (the folder's lock, held by rank 0);
    writes its files and figures; returns the trainer. ``workers``: data-loading processes (0: batches
    are cut in the training process; the batches are the same either way). The folder is created only
    once the data and the model have been built, so a run that fails validation leaves nothing behind."""
    run_dir = Path(run_dir)
    _check_folder(run_dir, cfg, resume)
    trainer = Trainer(cfg, run_dir, workers)
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.lock(run_dir, "acf train") if main else contextlib.nullcontext():
        if main:
            _check_folder(run_dir, cfg, resume)  # again, now as the folder's only writer
        if resume:
            trainer.load(run_dir / CHECKPOINT)
        if main:
            warning = {"warning": uncertified_warning(cfg.attention)} if uncertified_warning(cfg.attention) else {}
            runfolder.write_text(run_dir / CONFIG, json.dumps(
                {"train": asdict(cfg), "model": trainer.model.cfg.to_dict(), "world_size": trainer.world, **warning},
                indent=1, default=str))
            if resume:  # a run killed between its checkpoint and metrics writes gets its rows back
                _write_metrics(run_dir, trainer.history)
        trainer.run(progress)
        if main:
            from .figures import write_figures

            write_figures(trainer)
        distributed.barrier()
    return trainer
