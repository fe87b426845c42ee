"""Working with a finished (or checkpointed) run: loading it (``load_run``, also ``acf.load_run``), test
bits/dim, samples, reconstructions and latent interpolations (paper section 4.4), each written into
the run folder."""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
import warnings
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from . import runfolder
from ._checks import check_int, resolve_device
from .data import ImageDataset, load_dataset, to_float
from .figures import save_figure, save_grid, save_run_samples
from .layers.flow import bits_per_dim, uniform_dequantize
from .models import ACFModel
from .runfolder import CHECKPOINT, CONFIG, SAMPLE_TEMPERATURES
from .train.config import TrainConfig, build_for, read_run_config

def _require_run(run: Path) -> None:
    for f in (run / CONFIG, run / CHECKPOINT):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; {run} is not a run folder written by `acf train`")


def load_run(run: Union[str, Path], device: Union[str, torch.device] = "auto") -> ACFModel:
    """The EMA model of the run in the folder ``run`` (written by ``acf train``), in eval mode on
    ``device`` (``"auto"``: CUDA when available, else the CPU), whatever device it was trained on; its
    validated training settings are ``model.train_config`` (a ``TrainConfig``), its test set
    ``run_test_set(model.train_config)``. The checkpoint is loaded safely (tensors and plain data
    only), and its weights must be finite. Refused with one error naming the file and the field: a
    CUDA ``device`` on a machine without CUDA, a config.json whose "model" section was edited (the
    "train" section defines the model), a damaged checkpoint or one that does not fit. For example::

        model = acf.load_run("runs/20260101-120000-resflow-l2-mnist5k")
        x, log_prob = model.sample(16, temperature=0.7, return_log_prob=True)
    """
    run, device = Path(run), resolve_device(device)
    _require_run(run)
    cfg = read_run_config(run)
    model = build_for(cfg)
    runfolder.check_model_section(run / CONFIG, model.cfg.to_dict())
    model = model.to(device)
    ckpt = runfolder.load_checkpoint(run / CHECKPOINT, device)
    try:
        model.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise runfolder.RunFolderError(f"{run / CHECKPOINT} does not fit the model of {run / CONFIG}: "
                                       f"{' '.join(str(exc).split())[:300]}") from None
    model.train_config = cfg
    return model.eval()


def run_test_set(cfg: TrainConfig) -> ImageDataset:
    """The test split of the data set a run was trained on."""
    return load_dataset(cfg.data, cfg.data_root, "test")


@contextlib.contextmanager
def open_run(run: Path, device: str, holder: str) -> Iterator[tuple[ACFModel, ImageDataset]]:
    """``load_run`` (the model and its test set) for a command that writes into the run folder: it holds
    the folder's lock (so that no training or other command writes meanwhile) and has checked the folder
    is writable before the caller computes anything. ``device`` is the command's ``--device``."""
    run = Path(run)
    resolve_device(device, "--device")  # named as the option the user gave
    _require_run(run)
    with runfolder.lock(run, holder):
        model = load_run(run, device)
        yield model, run_test_set(model.train_config)


@torch.no_grad()
def bits_per_dim_per_image(model: ACFModel, test: ImageDataset, n: Optional[int] = None, probes: int = 1,
                           batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Test bits/dim of each of the first ``n`` test images with the unbiased estimator (the model's
    evaluation settings), averaged over ``probes`` independent draws; the dequantisation noise and the
    estimator's draws come from ``seed`` (the same for any model: common random numbers)."""
    check_int(probes, "probes", minimum=1)
    if n is not None:
        check_int(n, "number of test images n", minimum=1)
    n = len(test) if n is None else min(n, len(test))
    per_image = []
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream as it was
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            images, _ = test[slice(start, min(start + batch_size, n))]
            x = to_float(images).to(next(model.parameters()).device)
            per_image.append(torch.stack([model.bits_per_dim(uniform_dequantize(x)) for _ in range(probes)]).mean(0))
    return torch.cat(per_image)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (NaN for one value)."""
    return float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def evaluate_bits_per_dim(model: ACFModel, test: ImageDataset, n: Optional[int] = None, probes: int = 1,
                          batch_size: int = 64, seed: int = 0) -> tuple[float, float]:
    """Mean test bits/dim (``bits_per_dim_per_image``); returns ``(mean, standard error over images)``."""
    return mean_and_se(bits_per_dim_per_image(model, test, n, probes, batch_size, seed))


@torch.no_grad()
def interpolations(model: ACFModel, test: ImageDataset, pairs: int = 4, steps: int = 8) -> torch.Tensor:
    """Images decoded from ``z = (1 - t) z_a + t z_b`` between consecutive test images (rows = pairs)."""
    check_int(pairs, "pairs", minimum=1)
    check_int(steps, "steps", minimum=2)
    if 2 * pairs > len(test):
        raise ValueError(f"pairs={pairs} needs {2 * pairs} test images; the test set has {len(test)}")
    images, _ = test[slice(0, 2 * pairs)]
    x = uniform_dequantize(to_float(images).to(next(model.parameters()).device))
    z, _ = model(x)
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype).view(1, -1, 1)
    path = (1 - t) * z[0::2].unsqueeze(1) + t * z[1::2].unsqueeze(1)  # (pairs, steps, D)
    return model.inverse(path.reshape(pairs * steps, -1)).clamp(0, 1)


def write_samples(run: Path, model: ACFModel, n: int = 16, temperatures: Sequence[float] = SAMPLE_TEMPERATURES
                  ) -> list[Path]:
    """``samples.png``: ``n`` samples at each temperature, one labelled row block per temperature; for a
    class-conditional run also ``class_samples.png``, a row per class (``acf.figures.save_run_samples``)."""
    by_class = model.train_config is not None and model.train_config.task == "conditional"
    return save_run_samples(model, Path(run), n, temperatures, "", by_class)


@torch.no_grad()
def write_reconstructions(run: Path, model: ACFModel, test: ImageDataset, n: int = 8) -> tuple[Path, float]:
    check_int(n, "number of images n", minimum=1)
    images, _ = test[slice(0, n)]
    x = uniform_dequantize(to_float(images).to(next(model.parameters()).device))
    z, _ = model(x)
    x_rec = model.inverse(z)
    err = float((x_rec - x).abs().max())
    out = Path(run) / "reconstructions.png"
    save_grid(torch.cat([x, x_rec]), out, 2, f"reconstructions (max error {err:.1e})")
    return out, err


def write_interpolations(run: Path, model: ACFModel, test: ImageDataset, pairs: int = 4, steps: int = 8) -> Path:
    out = Path(run) / "interpolations.png"
    save_grid(interpolations(model, test, pairs, steps), out, pairs, "latent interpolation between test pairs")
    return out


def count_nonconverged(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``fn()`` (without autograd) and how many block inversions in it reported non-convergence."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", RuntimeWarning)
        out = fn()
    return out, sum("did not converge" in str(w.message) for w in caught)


@torch.no_grad()
def awgn_robustness(model: ACFModel, test: ImageDataset, sigmas: Sequence[float], n: int = 64,
                    seed: int = 0) -> list[dict]:
    """Additive white Gaussian noise analysis (paper section 4). For each ``sigma``: the first ``n``
    test images plus ``N(0, sigma^2)`` noise, re-quantised to 8 bits (so that bits/dim stays the
    discrete likelihood of valid images; clipping continuous values to the edge of ``[0, 1]``
    instead piles mass where the logit transform's log-det is largest and *lowers* bits/dim), then
    dequantised; their bits/dim, ``max |f^-1(f(x)) - x|``, the block inversions
    that did not converge and the fraction of pixels the noise changed. One noise draw, scaled by
    each sigma (common random numbers across sigmas and models)."""
    check_int(n, "number of test images n", minimum=1)
    gen = torch.Generator().manual_seed(seed)
    images = to_float(test[slice(0, min(n, len(test)))][0])
    noise, dequant = torch.randn(images.shape, generator=gen), torch.rand(images.shape, generator=gen)
    rows = []
    for sigma in sigmas:
        pixels = torch.round((images + sigma * noise) * 255).clamp(0, 255)
        x = (pixels + dequant) / 256
        torch.manual_seed(seed)  # the same log-det probes for every sigma
        z, logdet = model(x)
        x_rec, bad = count_nonconverged(lambda: model.inverse(z))
        rows.append({"sigma": sigma, "bits_per_dim": float(bits_per_dim(model.prior_log_prob(z) + logdet,
                                                                          model.dims).mean()),
                     "reconstruction_error": float((x_rec - x).abs().max()), "nonconverged_blocks": bad,
                     "changed_pixels": float((pixels != torch.round(images * 255)).float().mean())})
    return rows


def write_awgn(run: Path, rows: list[dict]) -> tuple[Path, Path]:
    """``perturb.csv`` and ``perturb.png`` (bits/dim and reconstruction error against sigma)."""
    import csv

    import matplotlib.pyplot as plt

    run = Path(run)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    runfolder.write_text(run / "perturb.csv", text.getvalue())
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    sig = [r["sigma"] for r in rows]
    a.plot(sig, [r["bits_per_dim"] for r in rows], marker="o")
    a.set_xlabel("noise sigma")
    a.set_ylabel("bits/dim")
    b.semilogy(sig, [max(r["reconstruction_error"], 1e-12) for r in rows], marker="o")
    b.set_xlabel("noise sigma")
    b.set_ylabel("max reconstruction error")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("additive white Gaussian noise")
    save_figure(fig, run / "perturb.png")
    return run / "perturb.csv", run / "perturb.png"
