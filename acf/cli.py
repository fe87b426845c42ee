"""Command-line interface: ``acf <command>`` (also ``python -m acf``).

Errors a user can cause or meet (``USER_ERRORS``: ACF's own errors, the ``ValueError``/``TypeError`` of
validation, I/O's ``OSError``, running out of GPU memory) end the command with one line and exit code 2;
``ACF_TRACEBACK=1`` (or ``acf --traceback <command>``) prints their traceback too. Any other exception
is a bug: it keeps its traceback (exit code 1). Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._checks import check_int, resolve_device
from .data import DATASETS, load_dataset
from .errors import ACFError
from .experiment_names import EXPERIMENT_NAMES, SCALES
from .layers.attention import ATTENTIONS, HEAD_LAYOUTS
from .layers.block import uncertified_warning
from .layers.flow import bits_per_dim, uniform_dequantize
from .layers.logdet import GRADS
from .models import ARCHS, ATTENTION_FORMS, PRESETS, build_model
from .train import (CONTINUATION_SETTINGS, DECAY_FRACTION, LR_SCHEDULES, SAMPLE_TEMPERATURES, TASKS, TrainConfig,
                    read_config_file, read_run_config, train)


def synthetic_images(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """8-bit-valued images in [0, 1]: random soft blobs on a dark background."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    centers = torch.rand(n, 2, generator=gen) * 1.2 - 0.6
    width = 0.15 + 0.25 * torch.rand(n, generator=gen)
    d2 = (xx - centers[:, 0, None, None]) ** 2 + (yy - centers[:, 1, None, None]) ** 2
    img = torch.exp(-d2 / width[:, None, None] ** 2).unsqueeze(1).expand(n, c, h, w)
    return torch.round(img * 255) / 255


def cmd_demo(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, "--device")
    torch.manual_seed(args.seed)
    shape = (1, args.size, args.size)
    attention = None if args.attention == NONE_WORDS["attention"] else args.attention
    flow = build_model(args.arch, attention, args.heads, shape, preset="cpu", blocks_per_scale=args.blocks,
                       hidden=args.hidden, growth=args.hidden // 2, logit_alpha=0.05).to(device)
    # Give the attention a visible weight (gamma = 0 makes it the identity at initialisation).
    for name, p in flow.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    x = uniform_dequantize(synthetic_images(args.batch, shape, args.seed)).to(device)
    t0 = time.perf_counter()
    flow.train()
    flow(x)  # data-dependent ActNorm initialisation
    flow.eval()
    with torch.no_grad():
        z, logdet = flow(x)
        logp = flow.log_prob(x)
        x_rec = flow.inverse(z, tol=1e-6)
    elapsed = time.perf_counter() - t0
    dims = x[0].numel()
    bounds = flow.lipschitz_bounds()
    print(f"ACF demo: {args.arch} + {args.attention} attention ({args.heads} heads), "
          f"{len(bounds)} residual blocks, input {tuple(x.shape)} on {device}")
    print(f"  log-likelihood      {logp.mean():.2f} nats/image  ({bits_per_dim(logp, dims).mean():.3f} bits/dim, untrained)")
    print(f"  log-det (mean)      {logdet.mean():.2f}")
    print(f"  Lipschitz bounds    max {max(bounds):.4f} (all < 1: {all(b < 1 for b in bounds)})")
    print(f"  reconstruction      max |f^-1(f(x)) - x| = {(x_rec - x).abs().max():.2e}")
    print(f"  time                {elapsed:.1f} s")
    return 0


# What `acf train --resume` takes from the command line (--epochs sets steps): the continuation settings.
RESUME_OPTIONS = CONTINUATION_SETTINGS
# `acf train`'s defaults where they differ from TrainConfig's (the library's): the device.
TRAIN_DEFAULTS = {"device": "auto"}


def _model_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--model``: the value read as JSON (``64``, ``false``, ``[0, 1]``), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resumed_config(run: Path, stored: TrainConfig, given: dict) -> TrainConfig:
    """The configuration ``stored`` in ``run`` with the options ``--resume`` takes from the command line
    (``RESUME_OPTIONS``); any other option given with a value that differs from the stored one is refused."""
    differ = [f"{_flag(k)} {v} (stored: {getattr(stored, k)})" for k, v in given.items()
              if k not in RESUME_OPTIONS and v != getattr(stored, k)]
    if differ:
        raise ValueError(f"--resume continues {run} with the settings of its config.json and takes only "
                         f"{', '.join(map(_flag, RESUME_OPTIONS))} (or --epochs) from the command line; "
                         f"these differ from the stored run: {'; '.join(differ)}")
    return dataclasses.replace(stored, **{k: given[k] for k in RESUME_OPTIONS if k in given})


def cmd_train(args: argparse.Namespace) -> int:
    import datetime

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if "model" in given:
        given["model"] = dict(given["model"])
    if "attention_scales" in given:
        given["attention_scales"] = tuple(given["attention_scales"])
    for name, word in NONE_WORDS.items():
        if given.get(name) == word:
            given[name] = None
    if args.config and args.resume:
        raise ValueError("--config and --resume exclude each other: --resume continues a run with the settings "
                         "of its config.json")
    # Settings: the resumed run's, or the --config file's, or the defaults; then the command line's.
    base = (read_run_config(Path(args.resume)) if args.resume else
            read_config_file(Path(args.config), TRAIN_DEFAULTS) if args.config else TrainConfig(**TRAIN_DEFAULTS))
    if args.epochs is not None:
        check_int(args.epochs, "--epochs", minimum=1)
        data, root, batch = (given.get(k, getattr(base, k)) for k in ("data", "data_root", "batch_size"))
        given["steps"] = args.epochs * (len(load_dataset(data, root, "train")) // batch)
    if args.resume:
        run = Path(args.resume)
        cfg = _resumed_config(run, base, given)
        taken = [f"{_flag(k)} {given[k]}" for k in RESUME_OPTIONS if k in given]
        note = f"; from the command line: {', '.join(taken)}" if taken else ""
        what = f"resuming {run} with the settings of its config.json{note}"
    else:
        cfg = dataclasses.replace(base, **given)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = Path(args.out) if args.out else Path("runs") / f"{stamp}-{cfg.arch}-{cfg.attention or 'none'}-{cfg.data}"
        what = str(run) + (f" (settings from {args.config}, then the command line)" if args.config else "")
    from . import distributed

    if os.environ.get("RANK", "0") == "0":
        print(f"acf train: {cfg.arch} + {cfg.attention or 'no'} attention on {cfg.data}, {cfg.steps} steps on "
              f"{resolve_device(cfg.device, '--device')} -> {what}")
        if uncertified_warning(cfg.attention):
            print(uncertified_warning(cfg.attention), file=sys.stderr)
    args.interrupt_hint = f"; {run} keeps its last checkpoint (if any): continue with acf train --resume {run}"
    trainer = train(cfg, run, resume=bool(args.resume), workers=args.workers)
    if not distributed.is_main():
        return 0
    last = trainer.history[-1]
    print(f"done in {last['seconds']:.0f} s of training: test bits/dim {last['test_bpd']:.4f}"
          + (f", accuracy {last['test_acc']:.4f}" if last.get("test_acc") is not None else ""))
    print(f"outputs in {run}: " + " ".join(sorted(p.name for p in Path(run).iterdir() if not p.name.startswith("."))))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import runfolder
    from .evaluate import bits_per_dim_per_image, mean_and_se, open_run
    from .layers.attention import attention_ablated, attention_layers

    with open_run(args.run, args.device, f"acf {args.command}") as (model, test):
        if args.ablate_attention and not attention_layers(model):
            raise ValueError(f"--ablate-attention: the model of {args.run} has no attention layer")
        for m in model.modules():  # more exact log-det terms than in training
            if hasattr(m, "estimator"):
                m.estimator = dataclasses.replace(m.estimator, n_exact_eval=args.n_exact)
        bpd = bits_per_dim_per_image(model, test, args.n, args.probes)
        mean, se = mean_and_se(bpd)
        result = {"test_bpd": mean, "standard_error": se, "images": len(bpd), "probes": args.probes,
                  "n_exact": args.n_exact}
        if args.ablate_attention:  # the same images, dequantisation and estimator draws: a paired difference
            with attention_ablated(model):
                knocked = bits_per_dim_per_image(model, test, args.n, args.probes)
            result["test_bpd_without_attention"], result["standard_error_without_attention"] = mean_and_se(knocked)
            result["knockout_cost"], result["knockout_cost_standard_error"] = mean_and_se(knocked - bpd)
        out = Path(args.run) / "evaluation.json"
        runfolder.write_text(out, json.dumps(result, indent=1))
    print(f"{model.train_config.data} test bits/dim {mean:.4f} +- {se:.4f} (standard error over {result['images']} images, "
          f"{args.probes} probe(s), {args.n_exact} exact terms) -> {out}")
    if args.ablate_attention:
        print(f"without attention (every attention path zeroed): {result['test_bpd_without_attention']:.4f}; knocking "
              f"attention out costs {result['knockout_cost']:+.4f} +- {result['knockout_cost_standard_error']:.4f} "
              f"bits/dim (paired over the same images and draws)")
    return 0


def cmd_figure(args: argparse.Namespace) -> int:
    from .evaluate import open_run, write_interpolations, write_reconstructions, write_samples

    with open_run(args.run, args.device, f"acf {args.command}") as (model, test):
        if args.command == "sample":
            out = " ".join(str(p) for p in write_samples(args.run, model, args.n, args.temperature))
        elif args.command == "reconstruct":
            out, err = write_reconstructions(args.run, model, test, args.n)
            print(f"max |f^-1(f(x)) - x| = {err:.2e}")
        else:
            out = write_interpolations(args.run, model, test, args.pairs, args.steps)
    print(f"wrote {out}")
    return 0


def cmd_perturb(args: argparse.Namespace) -> int:
    from .evaluate import awgn_robustness, open_run, write_awgn

    if any(s < 0 for s in args.sigma):
        raise ValueError(f"noise levels must be >= 0, got {args.sigma}")
    with open_run(args.run, args.device, f"acf {args.command}") as (model, test):
        rows = awgn_robustness(model, test, args.sigma, args.n)
        for r in rows:
            print(f"sigma {r['sigma']:<6g} bits/dim {r['bits_per_dim']:.4f}  reconstruction error "
                  f"{r['reconstruction_error']:.2e}")
        csv_path, png_path = write_awgn(args.run, rows)
    print(f"wrote {csv_path} and {png_path}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import fill_results_page, run_experiment

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.name != "report":
        folders = run_experiment(args.name, args.out, args.scale, args.seeds, progress=not args.quiet, jobs=args.jobs)
        for folder in folders:
            print(f"{folder.name}: {folder / folder.name}.csv .md .png .json")
        print(f"acf experiment {args.name} --scale {args.scale}: done in {time.perf_counter() - t0:.0f} s")
    if args.page:
        page, missing = fill_results_page(args.page, args.out)
        print(f"filled {page} from {args.out}" + (f"; no results yet for {', '.join(missing)} (their blocks are "
                                                   f"left as they were)" if missing else ""))
    elif args.name == "report":
        raise ValueError("acf experiment report needs --page (the markdown page to fill)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .ops.info import format_backend_info

    print(format_backend_info())
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, except where it has none (``None``) or is a flag's off."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


NONE_WORDS = {"attention": "none", "max_grad_norm": "none", "eval_size": "all"}  # on the command line: None
ATTENTION_FLAG_CHOICES = [*ATTENTIONS, NONE_WORDS["attention"]]
ATTENTION_HELP = ("attention layer in each branch; dot is an UNCERTIFIED ablation: not Lipschitz, its blocks are NOT "
                  "guaranteed invertible")
DEVICE_HELP = "auto: CUDA when available, else the CPU; or cpu, cuda, cuda:1, ..."


def _number_or(kind: type, word: str):
    """An argparse type: a number of ``kind`` (int or float), or ``word`` (the setting's None: ``NONE_WORDS``)."""
    def parse(text: str) -> object:
        try:
            return word if text.strip().lower() == word else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} or {word}, "
                                             f"got {text!r}") from None
    return parse


def _train_options(tr: argparse.ArgumentParser) -> None:
    """The options of ``acf train``. Their parser defaults stay ``None`` (so that ``cmd_train`` knows
    which were given: they override ``--config`` and are checked against the stored run by
    ``--resume``); the help shows the value used when an option is not given."""
    used = {**vars(TrainConfig()), **TRAIN_DEFAULTS}

    def option(*flags: str, parser: object = tr, help: str = "", **kw: object) -> None:
        action = parser.add_argument(*flags, help=help, **kw)
        if used.get(action.dest) not in (None, {}):  # None, {}: nothing set (the help says what then)
            action.help = f"{help} (default: {used[action.dest]})".strip()

    option("--config", metavar="FILE.json", help="settings from a JSON file: a run's config.json or an object of "
           "training settings; options given here override it")
    option("--data", choices=sorted(DATASETS), help="data set")
    option("--data-root", dest="data_root", help="folder of a file-based data set")
    option("--arch", choices=ARCHS, help="residual branch (coupling: the uncertified affine-coupling reference)")
    option("--attention", choices=ATTENTION_FLAG_CHOICES, help=ATTENTION_HELP)
    option("--attention-form", dest="attention_form", choices=list(ATTENTION_FORMS),
           help="how attention joins the flow: residual (eq. 13, normalised), quadrature ([eta1 X; eta2 A] into "
                "the next convolution) or gated (attention blocks of their own)")
    option("--attention-scales", dest="attention_scales", type=int, nargs="+", metavar="STAGE",
           help="stages with attention, 0 = the first (full resolution unless squeezed); default: all")
    option("--gamma-init", dest="gamma_init", type=float,
           help="attention: initial weight of the attention path (default: the form's: "
                + ", ".join(f"{k} {v:g}" for k, v in ATTENTION_FORMS.items()) + "; residual: |gamma_init| <= 1e6)")
    option("--delta-max", dest="delta_max", type=float, help="l2-tight: logit range Delta")
    option("--ball-radius", dest="ball_radius", type=float,
           help="l2-tight: token ball radius, in units of sqrt(channels per head)")
    option("--head-layout", dest="head_layout", choices=HEAD_LAYOUTS, help="l2-tight: head layout")
    option("--heads", type=int, help="attention heads")
    option("--preset", choices=sorted(PRESETS), help="model size")
    option("--model", nargs="+", metavar="KEY=VALUE", type=_model_setting,
           help="other model settings over the preset's (ModelConfig fields, values in JSON), e.g. hidden=64 "
                "squeeze_first=false")
    option("--task", choices=tuple(TASKS), help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    group = tr.add_mutually_exclusive_group()
    option("--steps", parser=group, type=int, help="training steps (with --resume: extends the run)")
    option("--epochs", parser=group, type=int, help="... or passes over the training set")
    option("--batch-size", dest="batch_size", type=int, help="global batch (data-parallel: split over the processes)")
    option("--lr", type=float, help="Adam learning rate")
    option("--warmup", type=int, help="linear learning-rate warm-up steps")
    option("--lr-schedule", dest="lr_schedule", choices=LR_SCHEDULES,
           help="learning rate after the warm-up: constant; cosine, towards 0 at the end; or decay, constant "
                f"and then linearly to 0 over the last {DECAY_FRACTION * 100:g}%% of the steps")
    option("--max-grad-norm", dest="max_grad_norm", type=_number_or(float, NONE_WORDS["max_grad_norm"]), metavar="NORM",
           help="clip the gradient's global norm to NORM before each optimizer step; none: never clip")
    option("--ema-decay", dest="ema_decay", type=float, help="EMA of the weights (what is evaluated)")
    option("--seed", type=int, help="seed of the model, the batch order and the noise")
    option("--device", help=DEVICE_HELP)
    option("--eval-every", dest="eval_every", type=int, help="steps between evaluations (and checkpoints)")
    option("--eval-size", dest="eval_size", type=_number_or(int, NONE_WORDS["eval_size"]), metavar="N",
           help="the first N test images per evaluation; all: the whole test set")
    option("--n-exact", dest="n_exact", type=int, help="roulette: exact log-det terms in training")
    option("--n-exact-eval", dest="n_exact_eval", type=int, help="... and in evaluation")
    option("--lam", type=float, help="roulette: Poisson rate (0 < lam <= 1000, the cap on the terms of a draw)")
    option("--grad", choices=GRADS, help="log-det gradient")
    tr.add_argument("--workers", type=int, default=0,
                    help="data-loading worker processes (0: in the training process; the batches are the same)")
    where = tr.add_mutually_exclusive_group()
    where.add_argument("--out", help="run folder, new or empty (default: runs/<time>-<arch>-<attention>-<data>)")
    where.add_argument("--resume", metavar="RUN", help="continue the run in RUN where it stopped, with the settings "
                                                      "of its config.json; only --steps / --epochs and --device "
                                                      "may change")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acf", description="Attentive Contractive Flows")
    parser.add_argument("--traceback", action="store_true",
                        help=f"on an error, print its traceback too (also: {TRACEBACK_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, func: object) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    def run_command(name: str, text: str, func: object) -> argparse.ArgumentParser:
        """A command on a run folder: its model on ``--device``."""
        p = command(name, text, func)
        p.add_argument("run", help="run folder written by acf train")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        return p

    demo = command("demo", "build a small ACF, print its log-likelihood, invert it", cmd_demo)
    demo.add_argument("--arch", choices=ARCHS, default="resflow", help="residual branch")
    demo.add_argument("--attention", choices=ATTENTION_FLAG_CHOICES, default="l2", help=ATTENTION_HELP)
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--size", type=int, default=16, help="image side (divisible by 4)")
    demo.add_argument("--blocks", type=int, default=2, help="residual blocks per scale")
    demo.add_argument("--hidden", type=int, default=32, help="hidden channels of a branch")
    demo.add_argument("--batch", type=int, default=8, help="images")
    demo.add_argument("--seed", type=int, default=0, help="seed")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    default = TrainConfig()
    _train_options(command("train", f"train a model (default: {default.arch} without attention on {default.data}, "
                                    f"preset {default.preset}, {default.steps} steps of batch {default.batch_size})",
                           cmd_train))
    ev = run_command("evaluate", "test bits/dim of a run (unbiased estimator, standard error)", cmd_evaluate)
    ev.add_argument("--n-exact", dest="n_exact", type=int, default=20, help="exact log-det terms")
    ev.add_argument("--probes", type=int, default=1, help="independent estimates per image")
    ev.add_argument("--n", type=int, help="test images (default: all)")
    ev.add_argument("--ablate-attention", dest="ablate_attention", action="store_true",
                    help="also evaluate with every attention path zeroed (the knock-out: what attention contributes)")
    sm = run_command("sample", "samples.png from the run's EMA model: a row block per temperature (and "
                               "class_samples.png, a row per class, for a class-conditional run)", cmd_figure)
    sm.add_argument("--n", type=int, default=16, help="samples per temperature")
    sm.add_argument("--temperature", type=float, nargs="+", default=list(SAMPLE_TEMPERATURES),
                    help="one or more temperatures (standard deviations of z)")
    rc = run_command("reconstruct", "reconstructions.png: test images and f^-1(f(x))", cmd_figure)
    rc.add_argument("--n", type=int, default=8, help="test images")
    it = run_command("interpolate", "interpolations.png: latent interpolation between test pairs", cmd_figure)
    it.add_argument("--pairs", type=int, default=4, help="pairs of test images (rows)")
    it.add_argument("--steps", type=int, default=8, help="images per pair, end points included")
    pt = run_command("perturb", "AWGN robustness: bits/dim and reconstruction error against noise level", cmd_perturb)
    pt.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
                    help="noise levels (standard deviations on the [0, 1] scale)")
    pt.add_argument("--n", type=int, default=64, help="test images")
    ex = command("experiment", "run a paper experiment (or all): CSV, PNG, markdown table, JSON", cmd_experiment)
    ex.add_argument("name", help=", ".join(EXPERIMENT_NAMES) + ", all, or report (only fill --page from the results "
                                                                "already in --out)")
    ex.add_argument("--scale", choices=list(SCALES), default="reduced",
                    help="; ".join(f"{name}: {what}" for name, what in SCALES.items()))
    ex.add_argument("--out", default=os.path.join("runs", "experiments"),
                    help="output folder; finished runs in it are reused")
    ex.add_argument("--seeds", type=int, help="number of seeds (default: the scale's)")
    ex.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ex.add_argument("--jobs", type=int, default=1, help="training processes side by side (one thread each), for the "
                                                       "experiments that run many short runs (attention)")
    ex.add_argument("--quiet", action="store_true", help="no progress bars")
    ex.add_argument("--page", help="afterwards, fill this markdown page's generated blocks (docs/RESULTS.md)")
    command("info", "versions, active backends (Triton, extension, reference) and device", cmd_info)
    return parser


def describe(exc: BaseException) -> str:
    """One line saying what went wrong (an ``OSError`` as its reason and file, without the errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# Failures a user can cause or meet: ACF's own errors (a run folder in use, a checkpoint refused, a bound
# that reached 1, a diverging training, data files missing or malformed), bad settings (the ValueError and
# TypeError of validation), I/O (OSError: permissions, a full disk) and running out of GPU memory. They end
# the command with one line and exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ACFError, ValueError, TypeError, OSError, torch.cuda.OutOfMemoryError)
TRACEBACK_ENV = "ACF_TRACEBACK"  # =1: user errors print their traceback too (as does acf --traceback)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("acf: interrupted", file=sys.stderr)
        return 130
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"acf {args.command}: interrupted{getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.traceback or os.environ.get(TRACEBACK_ENV, "").strip() in ("1", "true", "yes"):
            traceback.print_exc()
        print(f"acf {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
