"""The paper's claims, each put to a test on data we ship: ``acf experiment NAME``.

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
``tight``          the logit range of L2-tight attention in Residual Flow, against no attention
``long``           each architecture without and with L2-tight attention, trained longer
``attention``      whether certified attention earns its place: the residual, quadrature and
                   gated forms against a parameter-matched baseline at equal steps and equal
                   wall-clock, paired by seed, with a positive control and an uncertified reference
=================  ===========================================================================

Each experiment is a module of this package (``convergence.py`` ... ``long.py``) with its ``NAME``,
``run(out, scale, seeds, progress)`` (train, measure, write the outputs), ``markdown(ctx, rows)`` (its
table from the CSV's rows) and, except ``interpolation``, ``plot(rows, path)``; ``EXPERIMENTS`` below is
the one registry, built from the names of ``acf.experiment_names`` in the order ``all`` runs them. Shared: ``runs.py`` (scales, variants, training runs,
an experiment's start and finish), ``tables.py`` (CSV and markdown), ``measurements.py`` (measurements of trained models).

Each writes ``<out>/<name>/<name>.csv`` (one row per run or measurement, with every identifying
column), ``<name>.png``, ``<name>.md`` (a markdown table computed from the CSV as written: mean ± std
over seeds) and ``<name>.json`` (settings, wall time, machine). Training runs live in
``<out>/<owner>/runs/<key>/`` (ordinary ``acf train`` run folders; ``<key>`` names the variant and
hashes the training configuration except ``steps``). A run that already finished with the same
configuration is reused wherever it lies under ``<out>`` (so ``heads``, ``awgn``, ``dot``, ``tight`` and
``interpolation`` reuse ``convergence``'s runs), an interrupted one is resumed (raising ``steps``
extends finished runs), and one that stopped on a non-finite loss is recorded as such and not
retrained. The ``.gitignore`` pattern ``runs/`` keeps run folders (checkpoints) out of git wherever
``--out`` points, so only the tables are committed.

Scales: ``micro`` (seconds; what the tests run), ``reduced`` (a 2-core CPU within a session: the
constants of ``REDUCED`` in ``runs.py``, the settings of our published tables) and ``full`` (longer
runs, many hours on a CPU). Re-run everything with::

    acf experiment all --scale reduced --out results/experiments
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Union

import matplotlib

matplotlib.use("Agg")  # before any submodule imports pyplot: no display

from .convergence import CONVERGENCE_VARIANTS  # noqa: E402,F401
from .measurements import attention_shares, block_input, jacobian_norm  # noqa: E402,F401
from .runs import (DEFAULT_OUT, FULL, MICRO, REDUCED, SCALES, Context, Experiment, PathLike,  # noqa: E402,F401
                   RunRecord, Scale, Variant, ensure_run, get_scale, machine_info, run_key, train_config)
from .tables import markdown_table, mean_se, mean_std, read_csv, write_csv  # noqa: E402,F401

from ..experiment_names import EXPERIMENT_NAMES  # noqa: E402

# The registry: the module of each name of EXPERIMENT_NAMES (acf/experiment_names.py, which the command line
# reads without importing this package), in that order.
EXPERIMENTS: dict[str, Experiment] = {name: importlib.import_module(f".{name}", __name__).EXPERIMENT
                                      for name in EXPERIMENT_NAMES}


def run_experiment(name: str, out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced",
                   seeds: Optional[int] = None, progress: bool = True, jobs: int = 1) -> list[Path]:
    """Run experiment ``name`` (or ``"all"``, in registry order) and return the output folders; ``jobs``:
    training processes of the experiments that train runs in parallel (``Experiment.parallel``)."""
    if name != "all" and name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}, all")
    names = list(EXPERIMENTS) if name == "all" else [name]
    s = get_scale(scale, seeds)  # fail on a bad scale before any work
    return [EXPERIMENTS[n].run(out, s, None, progress, **({"jobs": jobs} if EXPERIMENTS[n].parallel else {}))
            for n in names]


def _marker(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} (generated by `acf experiment report`) -->", f"<!-- END {name} -->"


def rewrite_table(out: PathLike, name: str) -> Path:
    """Regenerate experiment ``name``'s markdown table from its CSV and JSON (no training, no
    measuring: the numbers are the CSV's; the JSON's wall time and machine stay)."""
    folder = Path(out) / name
    meta = json.loads((folder / f"{name}.json").read_text())
    scale = Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["scale"].items()})
    ctx = Context(name, Path(out), scale, False, 0.0, [], meta["machine"].get("date"))
    path = folder / f"{name}.md"
    path.write_text(EXPERIMENTS[name].markdown(ctx, read_csv(folder / f"{name}.csv")) + "\n")
    return path


def has_results(out: PathLike, name: str) -> bool:
    """Whether ``out`` holds experiment ``name``'s CSV and JSON (what its generated section is made of)."""
    return all((Path(out) / name / f"{name}{suffix}").exists() for suffix in (".csv", ".json"))


def generated_section(out: PathLike, name: str) -> str:
    """Experiment ``name``'s table (regenerated from its CSV) under ``out``, headings demoted below the
    page's sections, with the wall time and machine of its JSON and links to its CSV and figure."""
    folder = Path(out) / name
    if not has_results(out, name):
        raise FileNotFoundError(f"{folder / name}.csv or .json: not found; run `acf experiment {name} --out {out}` "
                                f"first")
    meta = json.loads((folder / f"{name}.json").read_text())
    text = rewrite_table(out, name).read_text().strip()
    text = "\n".join("###" + line[1:] if line.startswith("#") else line for line in text.splitlines())
    m = meta["machine"]
    return (f"{text}\n\nWall time {meta['wall_seconds'] / 60:.1f} min ({meta['runs_trained']} runs trained, "
            f"{meta['runs_reused']} reused) on {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, commit {m['git_commit'] or '?'} ({m['date']}). "
            f"Data: [`{name}.csv`](results/{name}/{name}.csv); figure:\n\n![{name}](results/{name}/{name}.png)")


def fill_results_page(page: PathLike, out: PathLike) -> tuple[Path, list[str]]:
    """Replace every ``<!-- BEGIN name ... -->`` ... ``<!-- END name -->`` block of ``page`` with the
    generated section of experiment ``name`` (so the page's numbers come from the runs). Returns the
    page and the experiments whose block was left as it was because ``out`` holds no results for them."""
    page = Path(page)
    if not page.exists():
        raise FileNotFoundError(f"{page}: results page not found")
    text, missing = page.read_text(), []
    for name in EXPERIMENTS:
        begin, end = _marker(name)
        if begin in text:
            if end not in text:
                raise ValueError(f"{page}: '{begin}' has no matching '{end}'")
            if not has_results(out, name):
                missing.append(name)
                continue
            head, rest = text.split(begin, 1)
            text = head + begin + "\n" + generated_section(out, name) + "\n" + end + rest.split(end, 1)[1]
    page.write_text(text)
    return page, missing
