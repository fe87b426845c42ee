"""``dot`` (paper sections 1 and 3): plain dot-product attention is not Lipschitz; inversion, log-det
and training measured against L2 attention in the same model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
import torch

from ..runfolder import CHECKPOINT
from ..data import ImageDataset
from ..evaluate import count_nonconverged
from ..models import ACFModel
from .convergence import CONVERGENCE_VARIANTS
from .measurements import (ATTENTION_TYPES, batch_of_test_images, block_input, block_inversion, first_attention_block,
                     jacobian_norm, load_trained, logdet_error)
from .runs import (DEFAULT_OUT, Context, Experiment, PathLike, RunRecord, Scale, Variant, finish, is_numeric_blowup,
                   run_path, start, train_config)
from .tables import group, markdown_table, mean_std, plot_series

NAME = "dot"


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


def _measure_model(model: ACFModel, test: ImageDataset, scale: Scale) -> list[tuple[Optional[float], str, float]]:
    """``(input scale, measurement, value)`` of the whole-model inverse and of the first attention
    block at growing input scale."""
    x = batch_of_test_images(test, scale.dot_images)
    try:
        with torch.no_grad():
            z, _ = model(x)
        x_rec, bad = count_nonconverged(lambda: model.inverse(z))
        err = float((x_rec - x).abs().max())
    except ValueError as exc:  # a layer met non-finite values: no inverse to speak of
        if not is_numeric_blowup(exc):
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


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Plain dot-product attention in Residual Flow against L2 attention in the same model (the paper's
    premise: dot-product self-attention is not Lipschitz, so it cannot be used naively). Measured:
    training stability, inversion error and fixed-point convergence, the log-det estimator against the
    exact log-det, and the Jacobian norm of the branch, at the data's scale and scaled up; on the
    trained weights, then with every attention gamma set to 1 (the attention at full weight: with the
    trained gamma, usually small after a short run, the attention barely enters g)."""
    ctx = start(NAME, out, scale, seeds, progress)
    rows = []
    for att in ("l2", "dot"):
        v = Variant("resflow", att)
        for seed in range(ctx.scale.seeds):
            rec = ctx.run("convergence" if v in CONVERGENCE_VARIANTS else "dot", train_config(ctx.scale, v, seed))
            ident = {"attention": att, "seed": seed, "status": rec.status, "run": run_path(rec, ctx.root)}
            loaded = load_trained(rec) if (rec.path / CHECKPOINT).exists() else None
            facts = _training_facts(rec, loaded[0] if loaded else None)
            rows += [{**ident, "gamma": "trained", "measurement": k, "input_scale": None, "value": val}
                     for k, val in facts.items()]
            for label, value in DOT_GAMMAS if loaded else ():
                if value is not None:
                    _set_gamma(loaded[0], value)
                torch.manual_seed(seed)
                rows += [{**ident, "gamma": label, "measurement": k, "input_scale": s, "value": val}
                         for s, k, val in _measure_model(*loaded, ctx.scale)]
    return finish(ctx, rows, markdown, plot)


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


def markdown(ctx: Context, rows: list[dict]) -> str:
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


def plot(rows: list[dict], path: Path) -> None:
    panels = (("block_inversion_error", "block inversion error (relative)", True),
              ("jacobian_norm_max", "max ||J_g||_2", True), ("logdet_abs_error", "log-det |estimate - exact|", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (meas, label, log) in zip(axes, panels):
        for (gamma, att), arows in group([r for r in rows if r["measurement"] == meas], "gamma", "attention").items():
            scales = sorted({r["input_scale"] for r in arows})
            series = [[next((r["value"] for r in g if r["input_scale"] == s), float("nan")) for s in scales]
                      for g in group(arows, "seed").values()]
            plot_series(ax, scales, series, f"{att}, gamma {gamma}", marker="o",
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


EXPERIMENT = Experiment(NAME, run, markdown)
