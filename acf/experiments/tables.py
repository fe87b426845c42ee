"""The tables of the experiments: CSV written and read back, mean ± std cells, markdown tables, the
attention columns several tables share, and a mean-with-band plot over seeds."""
from __future__ import annotations

import csv
import math
import statistics
import warnings
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np


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


def read_csv(path: Union[str, Path]) -> list[dict]:
    """A CSV written by ``write_csv``, with numbers parsed (empty cells are ``None``)."""
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _finite(values: Iterable) -> tuple[list[float], int]:
    vals = [float(v) for v in values if v is not None]
    return [v for v in vals if math.isfinite(v)], len(vals)


def _mean_spread(values: Iterable, spec: str, standard_error: bool) -> tuple[str, list[float], int]:
    """``"mean"`` or ``"mean ± spread"`` (sample std, or std / sqrt(n)) of the finite values, the finite
    values and how many were given; a sign in ``spec`` goes on the mean only."""
    finite, total = _finite(values)
    if not finite:
        return ("non-finite" if total else "n/a"), finite, total
    text = format(statistics.fmean(finite), spec)
    if len(finite) > 1:
        spread = statistics.stdev(finite) / (math.sqrt(len(finite)) if standard_error else 1.0)
        text += " ± " + format(spread, spec.lstrip("+"))
    return text, finite, total


def mean_std(values: Iterable, spec: str = ".4f") -> str:
    """``"mean ± std"`` (sample std) of the finite values, ``"mean"`` for one, noting any non-finite."""
    text, finite, total = _mean_spread(values, spec, standard_error=False)
    return text + (f" ({len(finite)}/{total} finite)" if finite and len(finite) < total else "")


def mean_se(values: Iterable, spec: str = "+.4f") -> str:
    """``"mean ± standard error (n)"`` of the finite values: how a paired difference is reported."""
    text, finite, total = _mean_spread(values, spec, standard_error=True)
    if not finite:
        return text
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


def plot_series(ax, xs: Sequence[float], groups: Sequence[Sequence[float]], label: str, **kw) -> None:
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


def attention_cells(runs: list[dict]) -> list[str]:
    """``max |gamma|`` and the attention's share of its layer's output, mean ± std over seeds."""
    if runs[0]["attention"] == "none":
        return ["", ""]
    return [mean_std((r["gamma_max_abs"] for r in runs), ".1e"),
            mean_std((r.get("attention_share") for r in runs), ".1e")]


ATTENTION_HEADER = ["attention max |gamma|", "attention share"]
ATTENTION_NOTE = ("Attention max |gamma|: the largest learnt weight of an attention layer, out = (X + gamma F / L) "
                  "/ (1 + |gamma|); near 0 the layer is the identity. Attention share: ||gamma F / L|| / ||X|| on "
                  "test images at the layer's actual input, averaged over the model's attention layers.")
