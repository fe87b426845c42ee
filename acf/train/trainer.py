"""The training loop: ``Trainer`` (one run's model, EMA copy, optimizer, step and history) and ``train``,
which trains or resumes the run in a folder as its only writer (see ``acf.train``)."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed, runfolder
from .._checks import NonFiniteError, check_int, first_non_finite, resolve_device
from ..data import endless_batches, load_dataset, make_loader, to_float
from ..errors import ACFError
from ..layers.block import CertificateError, ContractiveBlock, certified_bounds, truncated_series, uncertified_warning
from ..layers.flow import bits_per_dim, uniform_dequantize
from ..models import ACFModel
from ..runfolder import CHECKPOINT, CONFIG, SAMPLE_TEMPERATURES
from .config import DECAY_FRACTION, TASKS_WITH_LABELS, TrainConfig, build_for, config_diff
from .folder import check_folder

METRIC_FIELDS = ("step", "train_bpd", "test_bpd", "test_acc", "seconds", "lipschitz_max")
EVALUATION_SEED = 0  # the evaluations' own random stream (Trainer.evaluate)
# The end of a run checks that the evaluation's exact log-det terms cover the series (Trainer.series_shortfall):
# on this many test images, against this many times the terms, warning above this many bits/dim.
SERIES_CHECK_IMAGES, SERIES_CHECK_FACTOR, SERIES_TOLERANCE = 64, 10, 0.005


class NonFiniteLossError(ACFError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) over ``cfg.lr``: a linear warm-up over
    ``cfg.warmup`` steps, then 1 (``"constant"``), ``(1 + cos(pi t)) / 2`` with ``t`` the fraction of
    the remaining steps done (``"cosine"``), or 1 until the last ``DECAY_FRACTION`` of the steps and a
    linear fall towards 0 over them (``"decay"``). A run extended by ``--resume --steps`` continues on
    the schedule of its new length."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup:
        return warm
    if cfg.lr_schedule == "decay":
        tail = max(1, round(DECAY_FRACTION * cfg.steps))
        return min(1.0, (cfg.steps - step) / tail)
    t = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _write_metrics(run: Path, history: list[dict]) -> None:
    """``metrics.csv`` and ``metrics.json`` from the history the checkpoint holds (written after it)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")  # per-block bounds: JSON only
    writer.writeheader()
    writer.writerows(history)
    runfolder.write_text(run / "metrics.csv", text.getvalue())
    runfolder.write_text(run / "metrics.json", json.dumps(history, indent=1))


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
    def objective(self, model: ACFModel, x: torch.Tensor, y: torch.Tensor, training: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, bits/dim per sample, z)`` on a batch of ``[0, 1]`` images (dequantised here). A conditional
        model trains on the joint ``log p(x, y)`` and is evaluated (``training=False``) on the marginal ``p(x)``."""
        z, logdet = model(uniform_dequantize(x))
        component = y if self.cfg.task == "conditional" and training else None
        bpd = bits_per_dim(model.prior_log_prob(z, component) + logdet, model.dims)
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
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
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
        """Test bits/dim (and, for tasks trained with labels, accuracy) of the EMA model on the first ``n`` test images.
        The dequantisation noise and log-det draws come from a generator of their own, seeded with
        ``EVALUATION_SEED`` at every evaluation: evaluating never moves the training's random stream (so
        ``eval_every`` does not change the trajectory), and every evaluation draws the same noise."""
        with self._evaluation_stream():
            return self._evaluate(n)

    @contextlib.contextmanager
    def _evaluation_stream(self) -> Iterator[None]:
        """The global random stream seeded with ``EVALUATION_SEED`` inside, the training's restored after."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(EVALUATION_SEED)
            yield

    def _evaluate(self, n: Optional[int]) -> tuple[float, Optional[float]]:
        model = self.evaluated_model()
        n = len(self.test_set) if n is None else min(n, len(self.test_set))
        bpds, correct = [], 0
        for start in range(0, n, self.cfg.batch_size):
            images, labels = self.test_set[slice(start, min(start + self.cfg.batch_size, n))]
            x, y = to_float(images).to(self.device), labels.to(self.device)
            _, bpd, z = self.objective(model, x, y, training=False)
            bpds.append(bpd)
            if self.cfg.task in TASKS_WITH_LABELS:
                correct += int((model.classify(z).argmax(1) == y).sum())
        acc = correct / n if self.cfg.task in TASKS_WITH_LABELS else None
        return float(torch.cat(bpds).mean()), acc

    @torch.no_grad()
    def series_shortfall(self) -> Optional[float]:
        """Bits/dim by which the first ``k = n_exact_eval`` terms of every block's log-det series (eq. 6)
        read below ``SERIES_CHECK_FACTOR * k`` terms, on the first test images (same noise and probes):
        the part of the series the evaluation leaves to the roulette's rare long draws, which an average
        over a test set misses when the trained Jacobians approach their bound. None when no block
        estimates its log-det by the roulette."""
        model = self.evaluated_model()
        if not any(m.estimator.method == "roulette" for m in model.modules() if isinstance(m, ContractiveBlock)):
            return None
        images, _ = self.test_set[slice(0, min(SERIES_CHECK_IMAGES, len(self.test_set)))]
        x = to_float(images).to(self.device)
        reads = []
        for terms in self._series_terms():
            with self._evaluation_stream(), truncated_series(model, terms):
                reads.append(float(model.bits_per_dim(uniform_dequantize(x)).mean()))
        return reads[1] - reads[0]

    def _series_terms(self) -> tuple[int, int]:
        """The terms ``series_shortfall`` compares: the evaluation's exact ones (at least 1), and
        ``SERIES_CHECK_FACTOR`` times as many."""
        k = max(1, self.cfg.n_exact_eval)
        return k, SERIES_CHECK_FACTOR * k

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
                        if self.step == self.cfg.steps:
                            self._check_series(bar)
                    recent = []
                    self.save()
        if not distributed.parameters_agree(self.model):
            raise RuntimeError("data-parallel ranks ended with different parameters")
        return self.history[-1] if self.history else {}

    def _check_series(self, bar: tqdm) -> None:
        """A warning when ``series_shortfall`` exceeds the tolerance (nothing is stored: a run stopped and
        resumed keeps the checkpoint of the uninterrupted run)."""
        gap = self.series_shortfall()
        if gap is not None and gap > SERIES_TOLERANCE:
            k, more = self._series_terms()
            bar.write(f"warning: the test bits/dim may read low: on the first {SERIES_CHECK_IMAGES} test images, "
                      f"{k} terms of the log-det series read {gap:.3f} bits/dim below {more} terms (the trained "
                      f"blocks approach their Lipschitz bound); `acf evaluate {self.run_dir} --n-exact {more}` "
                      f"evaluates with more terms")

    # ---- figures ------------------------------------------------------------------------------
    @torch.no_grad()
    def write_figures(self, n: int = 16) -> None:
        """``samples.png`` (``n`` per temperature of ``SAMPLE_TEMPERATURES``) and for a conditional model
        ``class_samples.png`` (``acf.figures.save_run_samples``), ``reconstructions.png`` (top:
        test images, bottom: f^-1(f(x))), ``convergence.png`` and ``lipschitz.png`` of the evaluated model."""
        from ..figures import save_convergence, save_grid, save_lipschitz, save_run_samples  # matplotlib: only here

        run, cfg, model = self.run_dir, self.cfg, self.evaluated_model()
        name = f"{cfg.arch} + {cfg.attention or 'no'} attention on {cfg.data}, step {self.step}"
        save_run_samples(model, run, n, SAMPLE_TEMPERATURES, f": {name}", cfg.task == "conditional", on_fail="warn")
        images, _ = self.test_set[slice(0, 8)]
        x = uniform_dequantize(to_float(images).to(self.device))
        z, _ = model(x)
        x_rec = model.inverse(z)
        err = float((x_rec - x).abs().max())
        save_grid(torch.cat([x, x_rec]), run / "reconstructions.png", 2, f"reconstructions (max error {err:.1e})")
        if self.history:
            save_convergence(self.history, run / "convergence.png", name)
            if any(h.get("lipschitz_max") is not None for h in self.history):  # a coupling flow has no bounds
                save_lipschitz(self.history, run / "lipschitz.png", f"certified bounds: {name}")


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True, workers: int = 0) -> Trainer:
    """Train (or resume) the run in ``run_dir`` as its only writer (the folder's lock, held by rank 0);
    writes its files and figures; returns the trainer. ``workers``: data-loading processes (0: batches
    are cut in the training process; the batches are the same either way). The folder is created only
    once the data and the model have been built, so a run that fails validation leaves nothing behind."""
    run_dir = Path(run_dir)
    check_folder(run_dir, cfg, resume)
    trainer = Trainer(cfg, run_dir, workers)
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.lock(run_dir, "acf train") if main else contextlib.nullcontext():
        if main:
            check_folder(run_dir, cfg, resume)  # again, now as the folder's only writer
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
            trainer.write_figures()
        distributed.barrier()
    return trainer
