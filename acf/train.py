"""Training loop of the main job: ``acf train`` (density or hybrid), with resumable run folders.

A run folder holds ``config.json``, ``checkpoint.pt`` (written atomically: a temporary file, then
``os.replace``), ``metrics.csv`` / ``metrics.json`` (rewritten from the history kept in the
checkpoint, so a resumed run never duplicates or loses rows), and PNG figures. Everything random
(batch order: a permutation per epoch from ``epoch_seed(seed, epoch)``; dequantisation noise,
roulette draws and probes: the global torch generator, saved in the checkpoint) is reproducible,
so a run resumed from a checkpoint ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .block import CertificateError, certified_bounds
from .data import DATASETS, epoch_seed, load_dataset, to_float
from .flow import bits_per_dim, standard_normal_logprob, uniform_dequantize
from .logdet import LogdetEstimator
from .models import ACFModel, build_model

METRIC_FIELDS = ("step", "train_bpd", "test_bpd", "test_acc", "seconds", "lipschitz_max")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (``acf train --help`` lists them)."""

    data: str = "mnist5k"
    data_root: Optional[str] = None
    arch: str = "resflow"
    attention: Optional[str] = "l2"
    heads: int = 4
    preset: str = "cpu"
    task: str = "density"            # or "hybrid": bits/dim + cross-entropy of a linear head on z
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 100
    eval_size: int = 200             # test images per evaluation (n_exact_eval terms: costly)
    n_exact: int = 2                 # roulette: exact terms in training
    n_exact_eval: int = 20           # ... and in evaluation
    lam: float = 2.0                 # Poisson rate of the roulette
    grad: str = "neumann"            # log-det gradient: neumann, memory_efficient, backprop
    logit_alpha: float = 1e-6

    def __post_init__(self) -> None:
        if self.task not in ("density", "hybrid"):
            raise ValueError(f"task must be 'density' or 'hybrid', got {self.task!r}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        if self.task == "hybrid" and DATASETS[self.data].n_classes == 0:
            raise ValueError(f"data set {self.data!r} has no labels: it cannot train a hybrid model")
        for name in ("steps", "batch_size", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def build_for(cfg: TrainConfig) -> ACFModel:
    """The model a training config describes."""
    info = DATASETS[cfg.data]
    est = LogdetEstimator(method="roulette", n_exact=cfg.n_exact, n_exact_eval=cfg.n_exact_eval, lam=cfg.lam,
                          grad=cfg.grad)
    return build_model(cfg.arch, cfg.attention, cfg.heads, info.input_shape, preset=cfg.preset,
                       n_classes=info.n_classes if cfg.task == "hybrid" else None, estimator=est,
                       logit_alpha=cfg.logit_alpha)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_metrics(run: Path, history: list[dict]) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(history)
    _atomic_write(run / "metrics.csv", write_csv)
    _atomic_write(run / "metrics.json", lambda tmp: tmp.write_text(json.dumps(history, indent=1)))


class Trainer:
    """State of one run: model, EMA copy, optimizer, step, history; ``run()`` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = torch.device(cfg.device)
        self.rank, self.world = distributed.init(self.device)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.train_set = load_dataset(cfg.data, cfg.data_root, "train")
        self.test_set = load_dataset(cfg.data, cfg.data_root, "test")
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(self.train_set)} training images")
        self.model = build_for(cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
        self.step, self.history, self.seconds = 0, [], 0.0
        self.ema: Optional[ACFModel] = None
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # own dequantisation noise and probes per rank

    # ---- data ---------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``: epoch ``e`` visits the training set in the order of ``epoch_seed(seed, e)``."""
        per_epoch = len(self.train_set) // self.cfg.batch_size
        epoch, i = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
        idx = torch.randperm(len(self.train_set), generator=gen)[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        images, labels = self.train_set[idx[self.rank::self.world]]  # this rank's share of the global batch
        return to_float(images).to(self.device), labels.to(self.device)

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
        x, y = self.batch(self.step)
        if self.ema is None:  # data-dependent ActNorm initialisation on the first batch, then the EMA copy
            with torch.no_grad():
                self.model(uniform_dequantize(x))
            distributed.broadcast_state(self.model)
            self.ema = copy.deepcopy(self.model).eval()
        loss, bpd, _ = self.objective(self.model, x, y)
        if not distributed.all_ranks(bool(torch.isfinite(loss))):
            raise NonFiniteLossError(f"non-finite loss ({float(loss.detach())}) at step {self.step + 1}; the last good "
                                     f"checkpoint in {self.run_dir} is unchanged")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.model)
        self.opt.step()
        self.sched.step()
        distributed.broadcast_state(self.model)  # keeps the spectral-norm u/v identical across ranks
        self._update_ema()
        self.step += 1
        return float(bpd.detach().mean())

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
    def certified_lipschitz(self) -> float:
        """Largest certified ``Lip(g)`` of the evaluated model (EMA, eval mode): the exact (Lanczos)
        norms of the maps it applies. Raises ``CertificateError`` naming the block if one reaches 1
        (the run then stops, its last checkpoint intact)."""
        try:
            return max(certified_bounds(self.evaluated_model()).values())
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
        state = self.state()  # collective: every rank takes part
        if distributed.is_main():
            _atomic_write(self.run_dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
        distributed.barrier()

    def load(self, path: Path) -> None:
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        diff = {k: (ckpt["config"].get(k), v) for k, v in asdict(self.cfg).items()
                if k != "steps" and ckpt["config"].get(k) != v}  # a resumed run may be extended
        if diff:
            raise ValueError(f"{path} was written by a run with another configuration (stored, requested): {diff}")
        self.model.load_state_dict(ckpt["model"])
        if ckpt["ema"] is not None:
            self.ema = copy.deepcopy(self.model).eval()
            self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["sched"])
        self.step, self.seconds, self.history = ckpt["step"], ckpt["seconds"], ckpt["history"]
        if ckpt.get("world_size", 1) == self.world:  # exact continuation needs every rank's generator
            torch.set_rng_state(ckpt["rng"][self.rank])

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        main = distributed.is_main()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", disable=not (progress and main))
        recent: list[float] = []
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            recent.append(self.train_step())
            self.seconds += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(bpd=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}")
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                if main:  # rank 0 evaluates and writes; the others wait in save()
                    test_bpd, acc = self.evaluate(self.cfg.eval_size)
                    self.history.append({"step": self.step, "train_bpd": sum(recent) / len(recent),
                                         "test_bpd": test_bpd, "test_acc": acc, "seconds": round(self.seconds, 2),
                                         "lipschitz_max": self.certified_lipschitz()})
                    if progress:
                        bar.write(f"step {self.step}: test bits/dim {test_bpd:.4f}"
                                  + (f", accuracy {acc:.4f}" if acc is not None else ""))
                    _write_metrics(self.run_dir, self.history)
                recent = []
                self.save()
        bar.close()
        if not distributed.parameters_agree(self.model):
            raise RuntimeError("data-parallel ranks ended with different parameters")
        return self.history[-1] if self.history else {}


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> Trainer:
    """Train (or resume) the run in ``run_dir``; writes its files and figures; returns the trainer."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it with --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    if resume:
        trainer.load(ckpt)
    if distributed.is_main():
        _atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(
            {"train": asdict(cfg), "model": trainer.model.cfg.to_dict(), "world_size": trainer.world},
            indent=1, default=str)))
    trainer.run(progress)
    if distributed.is_main():
        from .figures import write_figures

        write_figures(trainer)
    distributed.barrier()
    return trainer


def config_from_dict(values: dict) -> TrainConfig:
    """A ``TrainConfig`` from a dict (e.g. a run's config.json), ignoring unknown keys."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
