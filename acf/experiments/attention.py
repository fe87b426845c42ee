"""``attention``: does certified attention earn its place in a contractive flow? A paired protocol.

Stage A, scikit-learn's 8x8 digits (64 dimensions, so test bits/dim are computed with the exact
log-determinant: no estimator noise in the comparison), a Residual Flow of 4 residual blocks (2 stages
of 2, the first at full resolution). Arms (``ARMS_A``):

* ``baseline``: no attention; ``baseline-wide``: the same with ``hidden`` raised until it has at least
  the parameters of the largest certified attention arm (the parameter-matched baseline);
* ``residual`` (the paper's form, eq. 13 normalised), ``quadrature`` and ``gated``: L2-tight attention
  joined to the flow in each form (``acf.models.ATTENTION_FORMS``);
* the **positive control**: the branches' convolutions all 1x1 (``kernel_size=1``), so that nothing but
  the squeeze mixes positions, without and with attention: attention must help there, or it is broken;
* the **uncertified reference**: affine coupling flows (``acf.layers.coupling``) with a convolutional
  conditioner, without and with dot-product attention (output projection starting at zero): whether
  attention has anything to add on this data when no certificate constrains it.

Every arm is trained with the same seeds; seed ``s`` fixes the data order, the dequantisation noise
and every initialisation the arms share, so differences are paired by seed. Each run is evaluated at
the steps ``Scale.protocol_steps`` (the convergence checkpoints) and ``baseline-wide`` also at equal
wall-clock: the steps it takes in the time an attention arm takes for its last checkpoint, from step
times measured side by side (``step_seconds``). At each evaluation: test bits/dim of the EMA weights,
the same with every attention path zeroed (the knock-out), the attention's weight and share, the pull
``r`` (``measurements.attention_pull``) and the largest certified block bound.

Stage B, MNIST-5k at 28x28 (the CPU preset: attention at the 14x14 and 7x7 stages): the attention arm
with the best paired difference at equal wall-clock in stage A against its own parameter-matched
baseline; the estimator's evaluation draws fixed by seed (common random numbers).

The decision rule (``verdict``): success if, at equal wall-clock, the 95% interval of the paired
difference against the parameter-matched baseline lies below -0.005 bits/dim, the attention's share is
at least 1e-2 and knocking it out costs at least the gain; "not at this scale" needs the positive
control to pass, equivalence (TOST at +-0.005) of the quadrature and gated forms, and the uncertified
reference to say whether attention helps without a certificate.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
import torch

from .. import runfolder
from ..evaluate import bits_per_dim_per_image, load_run, run_test_set
from ..layers.attention import attention_ablated
from ..layers.block import ContractiveBlock
from ..layers.flow import uniform_dequantize
from ..layers.logdet import LogdetEstimator
from ..train import TrainConfig, build_for
from ..data import load_dataset, to_float
from .measurements import attention_pull, attention_shares, attention_weights
from .runs import (DEFAULT_OUT, EXPERIMENT_SETTINGS, Context, Experiment, PathLike, Scale, ensure_run, finish,
                   get_scale, locate, run_key, run_path, start)
from .attention_stats import EQUIVALENCE, best_attention_arm, equal_time_step, interval, last_step, paired, verdict
from .tables import group, markdown_table

NAME = "attention"
MEASURED = "attention_measurements.json"  # per run folder: the measurements at each evaluated step

# Stage A: (arm, role, training settings over STAGE_A_SETTINGS); "baseline-wide" gets its hidden width
# from the parameter count of the attention arms (``widened``).
# The certified attention of the new forms: L2-tight with a logit range of 2 and positional embeddings
# (measured in pilot runs: with the default range 0.5, or without positions, attention did not help
# even in the positive control; with both it did).
ATTENTIVE = {"attention": "l2-tight", "delta_max": 2.0, "model": {"positional": True}}
ARMS_A: tuple[tuple[str, str, dict], ...] = (
    ("baseline", "baseline", {}),
    ("baseline-wide", "baseline", {}),
    ("residual", "attention", {"attention": "l2-tight", "attention_form": "residual"}),  # as shipped before
    ("quadrature", "attention", {**ATTENTIVE, "attention_form": "quadrature"}),
    ("gated", "attention", {**ATTENTIVE, "attention_form": "gated"}),
    ("control", "control", {"model": {"kernel_size": 1}}),
    ("control+gated", "control", {**ATTENTIVE, "attention_form": "gated", "model": {"kernel_size": 1, "positional": True}}),
    ("coupling", "reference", {"arch": "coupling"}),
    ("coupling+attention", "reference", {"arch": "coupling", "attention": "dot"}),
)
# attention_form: the arms without attention (and the coupling reference) keep the form they were keyed
# with, every experiment's (EXPERIMENT_SETTINGS); the attention arms name theirs.
EXPERIMENT_FORM = EXPERIMENT_SETTINGS["attention_form"]  # eq. 13, as in every experiment
NO_CLIPPING = EXPERIMENT_SETTINGS["max_grad_norm"]  # as in every experiment
STAGE_A_SETTINGS = dict(data="digits", task="density", arch="resflow", preset="cpu", model={"squeeze_first": False},
                        batch_size=32, lr=2e-3, warmup=50, lr_schedule="constant", max_grad_norm=NO_CLIPPING,
                        ema_decay=0.99, eval_size=64, attention_form=EXPERIMENT_FORM)
STAGE_TEXT = {"A": "8x8 digits, exact log-det", "B": "MNIST-5k 28x28, the estimator with common random numbers"}
STAGE_B_SETTINGS = dict(data="mnist5k", task="density", arch="resflow", preset="cpu", batch_size=32, lr=2e-3, warmup=50,
                        lr_schedule="constant", max_grad_norm=NO_CLIPPING, ema_decay=0.99, eval_size=64,
                        attention_form=EXPERIMENT_FORM)


@dataclass(frozen=True)
class Arm:
    stage: str
    name: str
    role: str   # "baseline", "attention", "control" or "reference"
    cfg: TrainConfig  # seed 0; the steps of the last checkpoint


def _merge(base: dict, extra: dict) -> dict:
    out = {**base, **extra}
    out["model"] = {**base.get("model", {}), **extra.get("model", {})}
    return out


def param_count(cfg: TrainConfig) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in build_for(cfg).parameters())


def widened(cfg: TrainConfig, target: int) -> TrainConfig:
    """``cfg`` with the smallest ``hidden`` whose model has at least ``target`` parameters."""
    hidden = cfg.model.get("hidden", build_for(cfg).cfg.hidden)
    while True:
        wide = dataclasses.replace(cfg, model={**cfg.model, "hidden": hidden})
        if param_count(wide) >= target:
            return wide
        hidden += 1


def stage_arms(stage: str, settings: dict, arms: tuple[tuple[str, str, dict], ...], steps: int) -> list[Arm]:
    """The arms of a stage at seed 0, ``baseline-wide`` matched to the largest certified attention arm."""
    built = [Arm(stage, name, role, TrainConfig(**_merge(settings, extra), steps=steps, eval_every=steps))
             for name, role, extra in arms]
    target = max(param_count(a.cfg) for a in built if a.role == "attention")
    return [dataclasses.replace(a, cfg=widened(a.cfg, target)) if a.name == "baseline-wide" else a for a in built]


# ---------------------------------------------------------------------------------------------
# Step times, side by side
# ---------------------------------------------------------------------------------------------

def step_seconds(cfgs: dict[str, TrainConfig], steps: int = 12, warmup: int = 3) -> dict[str, float]:
    """Median seconds of a training step of each configuration, measured round-robin in one process on
    one thread (so that the machine's load falls on all of them alike)."""
    from ..train import Trainer  # the trainer's own step: data, dequantisation, estimator, optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainers = {name: Trainer(cfg, Path("/nonexistent")) for name, cfg in cfgs.items()}
        times: dict[str, list[float]] = {name: [] for name in cfgs}
        for i in range(warmup + steps):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                tr.train_step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Measurements of a trained run at one step
# ---------------------------------------------------------------------------------------------

def _exact(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ContractiveBlock):
            m.estimator = LogdetEstimator(method="exact")


def measure(run: Path, exact: bool, images: int) -> dict:
    """Test bits/dim of a run's EMA model (``exact``: exact log-dets; else the evaluation estimator with
    draws fixed by seed 0), the knock-out, and the attention's weight, share and pull."""
    model = load_run(run, "cpu")
    test = run_test_set(model.train_config)
    if exact:
        _exact(model)
    bpd = bits_per_dim_per_image(model, test, images)
    row = {"test_bpd": float(bpd.mean()), "test_images": len(bpd),
           "lipschitz_max": max(model.lipschitz_bounds(), default=None)}
    weights = attention_weights(model)
    if weights:
        with attention_ablated(model):
            knocked = bits_per_dim_per_image(model, test, images)
        torch.manual_seed(0)
        x = uniform_dequantize(to_float(test[slice(0, min(64, len(test)))][0]))
        shares = attention_shares(model, x)
        train = load_dataset(model.train_config.data, model.train_config.data_root, "train")
        bs = min(64, images)
        pulls = attention_pull(model, to_float(train[slice(0, 4 * bs)][0]), batches=4, batch_size=bs)
        rs = [p["r"] for p in pulls if p["r"] is not None]
        row.update(knockout_cost=float((knocked - bpd).mean()), attention_weight=statistics.fmean(weights),
                   attention_weight_max=max(weights, key=abs), attention_share=statistics.fmean(shares),
                   pull_r=statistics.fmean(rs) if rs else None, pull_r_max=max(rs) if rs else None,
                   pull_s=statistics.fmean(p["s"] for p in pulls) if pulls else None)
    return row


def run_segments(root: Path, cfg: TrainConfig, steps: list[int], exact: bool, images: int) -> list[dict]:
    """Train ``cfg`` to each of ``steps`` in turn (one run, extended) and measure it at each; measurements
    are kept in the run folder (``MEASURED``), so a resumed protocol neither retrains nor remeasures."""
    torch.set_num_threads(1)
    rows = []
    for k in sorted(set(steps)):
        cfg_k = dataclasses.replace(cfg, steps=k, eval_every=max(steps))
        path = locate(root, NAME, run_key(cfg_k))
        cache = runfolder.read_json(path / MEASURED) if (path / MEASURED).exists() else {}
        if str(k) not in cache:
            rec = ensure_run(root, NAME, cfg_k, progress=False)
            if rec.status != "ok":
                rows.append({"step": k, "status": rec.status, "run": run_path(rec, root)})
                break
            with runfolder.lock(rec.path, "acf experiment attention"):
                cache[str(k)] = {"train_seconds": rec.final.get("seconds"), **measure(rec.path, exact, images)}
                runfolder.write_text(rec.path / MEASURED, json.dumps(cache, indent=1))
        rows.append({"step": k, "status": "ok", "run": str(path.relative_to(root)), **cache[str(k)]})
    return rows


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------

def _tasks(arms: list[Arm], seeds: int, checkpoints: tuple[int, ...], eq_steps: dict[str, int]) -> list[tuple]:
    """(arm, seed, steps) for every run; seed-major, so that an interrupted protocol has whole pairs."""
    out = []
    for seed in range(seeds):
        for arm in arms:
            steps = list(checkpoints) + (list(eq_steps.values()) if arm.name == "baseline-wide" else [])
            out.append((arm, seed, steps))
    return out


def _execute(ctx: Context, tasks: list[tuple], exact: bool, images: int, jobs: int) -> list[dict]:
    rows = []
    ident = [{"stage": a.stage, "arm": a.name, "role": a.role, "seed": s} for a, s, _ in tasks]
    calls = [(ctx.root, dataclasses.replace(a.cfg, seed=s), steps, exact, images) for a, s, steps in tasks]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(run_segments, *zip(*calls)))
    else:
        results = [run_segments(*c) for c in calls]
    for head, result in zip(ident, results):
        rows += [{**head, **r} for r in result]
    return rows


def _stage(ctx: Context, stage: str, arms: list[Arm], seeds: int, exact: bool, images: int, jobs: int) -> list[dict]:
    checkpoints = ctx.scale.protocol_steps
    times_path = ctx.folder / f"step_seconds_{stage}.json"
    if times_path.exists():
        times = json.loads(times_path.read_text())
    else:
        times = step_seconds({a.name: a.cfg for a in arms}, steps=ctx.scale.timing_steps)
        times_path.write_text(json.dumps(times, indent=1))
    wide = times["baseline-wide"]
    eq_steps = {a.name: round(checkpoints[-1] * times[a.name] / wide) for a in arms if a.role == "attention"}
    rows = _execute(ctx, _tasks(arms, seeds, checkpoints, eq_steps), exact, images, jobs)
    params = {a.name: param_count(a.cfg) for a in arms}
    hidden = {a.name: build_for(a.cfg).cfg.hidden for a in arms}
    for r in rows:
        r.update(step_seconds=times[r["arm"]], params=params[r["arm"]], hidden=hidden[r["arm"]],
                 equal_time_for=",".join(n for n, k in eq_steps.items() if k == r["step"] and r["arm"] == "baseline-wide"))
    return rows


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True, jobs: int = 2) -> Path:
    """Stage A on the 8x8 digits, then stage B on MNIST-5k with the best attention arm of stage A, each run
    trained to the scale's ``protocol_steps`` (their last is the arms' length)."""
    s = get_scale(scale, seeds)
    if seeds is not None:
        s = dataclasses.replace(s, protocol_seeds=(seeds, seeds))
    steps = s.protocol_steps[-1]
    ctx = start(NAME, out, dataclasses.replace(s, steps=steps, batch_size=STAGE_A_SETTINGS["batch_size"]), seeds,
                progress)
    seeds_a, seeds_b = s.protocol_seeds
    arms = stage_arms("A", STAGE_A_SETTINGS, ARMS_A, steps)
    rows = _stage(ctx, "A", arms, seeds_a, exact=True, images=s.protocol_images, jobs=jobs)
    if seeds_b > 0:  # a scale with no stage-B seeds stops after stage A
        best = best_attention_arm(rows)
        b_arms = [(n, role, extra) for n, role, extra in ARMS_A if n in ("baseline-wide", best)]
        arms_b = stage_arms("B", STAGE_B_SETTINGS, tuple(b_arms), steps)
        rows += _stage(ctx, "B", arms_b, seeds_b, exact=False, images=s.protocol_images_b, jobs=jobs)
    return finish(ctx, rows, markdown, plot)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def _cell(diffs: list[float]) -> str:
    mean, low, high = interval(diffs)
    if math.isnan(low):
        return "n/a" if not diffs else f"{mean:+.4f} (n=1)"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n={len(diffs)})"


def _mean(rows: list[dict], key: str, spec: str = ".4f") -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return format(statistics.fmean(vals), spec) if vals else ""


def verdict_lines(v: dict) -> list[str]:
    """The decision, one line per attention arm and per check."""
    lines = []
    for key, d in v.items():
        if "success" in d:
            low, high = d["interval"]
            lines.append(f"- {key}: {'**success**' if d['success'] else 'no success'}; 95% CI at equal wall-clock "
                         f"[{low:+.4f}, {high:+.4f}], equivalent within ±{EQUIVALENCE} (TOST): {d['equivalent']}, "
                         f"share {d['share']:.2e}, knock-out cost {d['knockout']:+.4f}")
    c, r = v["control"], v["reference"]
    lines.append(f"- positive control (1x1 branches, gated attention against none): "
                 f"{'passes' if c['passes'] else 'does not pass'} ({_cell(c['diffs'])})")
    lines.append(f"- uncertified reference (coupling flow, attention against none): attention "
                 f"{'helps' if r['attention_helps'] else 'does not help'} ({_cell(r['diffs'])})")
    return lines


def markdown(ctx: Context, rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    sc = ctx.scale
    parts = [f"# Attention the flow learns to use: the paired protocol\n\nQuestion: does certified attention, joined "
             f"to the flow in the residual (paper), quadrature or gated form, lower bits/dim against a parameter-matched "
             f"baseline at equal wall-clock? With a positive control and an uncertified reference.\n\nScale "
             f"`{sc.name}`: every run {sc.steps} Adam steps of batch {sc.batch_size} (evaluated at steps "
             f"{', '.join(map(str, sc.protocol_steps))}), "
             + " and ".join(f"seeds 0-{max(r['seed'] for r in rows if r['stage'] == st)} (stage {st})"
                            for st in sorted({r["stage"] for r in rows}))
             + f"; test bits/dim of the EMA weights. Generated by `acf experiment "
             f"attention --scale {sc.name}` from `attention.csv` ({(ctx.date or datetime.date.today().isoformat())[:10]})."]
    for stage in sorted({r["stage"] for r in rows}):
        srows = [r for r in rows if r["stage"] == stage]
        arms = list(dict.fromkeys(r["arm"] for r in srows))
        parts.append(f"\n\n**Stage {stage}**, {STAGE_TEXT[stage]}: the last checkpoint of every arm, paired by seed.\n\n")
        body = []
        for arm in arms:
            last = [r for r in srows if r["arm"] == arm and r["step"] == last_step(srows, stage, arm)]
            role = last[0]["role"]
            base = {"attention": "baseline-wide", "control": "control", "reference": "coupling"}.get(role)
            same = paired(srows, stage, arm, None, baseline=base) if base and base != arm else []
            eq = equal_time_step(srows, stage, arm)
            at_eq = paired(srows, stage, arm, None, base_step=eq) if role == "attention" and eq else []
            body.append([arm, role, last[0]["params"], f"{last[0]['step_seconds'] * 1000:.0f}", len(last),
                         _mean(last, "test_bpd"), _cell(same) if same else "", _cell(at_eq) if at_eq else "",
                         _mean(last, "knockout_cost", "+.4f"), _mean(last, "attention_weight", ".3g"),
                         _mean(last, "attention_share", ".2e"), _mean(last, "pull_r", ".3g"),
                         _mean(last, "lipschitz_max", ".3f")])
        parts.append(markdown_table(
            ["arm", "role", "parameters", "ms / step", "seeds", "test bpd", "Δ vs its baseline, same steps [95% CI]",
             "Δ vs baseline-wide, equal wall-clock [95% CI]", "knock-out cost", "attention weight",
             "attention share", "pull r", "max certified Lip(g)"], body))
        steps = sorted({r["step"] for r in srows if not r.get("equal_time_for")})
        curve = [[arm] + [_mean([r for r in srows if r["arm"] == arm and r["step"] == k and not r.get("equal_time_for")],
                                "test_bpd") for k in steps] for arm in arms]
        parts.append(f"\n\nTest bits/dim at each checkpoint (mean over seeds), stage {stage}:\n\n"
                     + markdown_table(["arm"] + [f"step {k}" for k in steps], curve))
    parts.append("\n\nThe decision rule (`acf.experiments.attention`):\n\n" + "\n".join(verdict_lines(verdict(rows))))
    parts.append("\n\nΔ < 0: the arm has lower bits/dim than its baseline (attention arms: `baseline-wide`; the "
                 "control: `control`; the coupling reference: `coupling`). Knock-out cost: bits/dim with every "
                 "attention path zeroed minus bits/dim as trained (same images and draws). Attention weight: gamma "
                 "(residual), eta2 (quadrature), the gate (gated). Share: the attention part's norm over the "
                 "identity part's at the layer (gated: ||g(x) - g(x) without attention|| / ||x|| of the block). Pull r: |dL/d(attention)| / "
                 "|dL/d(identity)| at the layer (residual form: r < 1 with the identity pulling means gamma = 0 "
                 "is a local minimum).")
    return "".join(parts)


def plot(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r.get("status", "ok") == "ok" and r.get("test_bpd") is not None]
    stages = sorted({r["stage"] for r in rows})
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        srows = [r for r in rows if r["stage"] == stage and not r.get("equal_time_for")]
        for arm, runs in group(srows, "arm").items():
            steps = sorted({r["step"] for r in runs})
            ax.plot(steps, [statistics.fmean(r["test_bpd"] for r in runs if r["step"] == k) for k in steps],
                    marker="o", label=arm[0])
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("test bits/dim (mean over seeds)")
        ax.set_title(f"stage {stage}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


EXPERIMENT = Experiment(NAME, run, markdown, parallel=True)
