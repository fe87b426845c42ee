"""Every experiment of ``acf experiment`` runs at scale micro and writes plausible CSV / PNG / MD / JSON."""
import hashlib
import json
import math
import re
from dataclasses import asdict, replace

import pytest
import torch

from acf import experiments as ex
from acf.experiments.runs import KEY_OMITS
from acf.cli import main
from acf.train import NonFiniteLossError, TrainConfig

pytestmark = [pytest.mark.filterwarnings("ignore:residual branch is not certified:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_VARIANTS = len(ex.CONVERGENCE_VARIANTS)


@pytest.fixture(scope="module")
def out(tmp_path_factory, one_thread):
    """All experiments at scale micro, once."""
    root = tmp_path_factory.mktemp("experiments")
    ex.run_experiment("all", root, "micro", progress=False)
    return root


def test_registry_and_scales_carry_the_names_the_command_line_offers():
    """acf experiment --help lists acf.experiment_names without importing the experiments: the registry is
    built from those names, each module's experiment carries its own, and the scales are the ones named."""
    from acf.experiment_names import EXPERIMENT_NAMES, SCALES

    assert list(ex.EXPERIMENTS) == list(EXPERIMENT_NAMES)
    assert all(e.name == name and e.run.__module__ == f"acf.experiments.{name}" for name, e in ex.EXPERIMENTS.items())
    assert list(ex.SCALES) == list(SCALES)
    rows = re.split(r"^=+ +=+$", ex.__doc__, flags=re.MULTILINE)[2]  # the body of its table
    table = re.findall(r"^``([a-z]+)``\s", rows, re.MULTILINE)
    assert table == list(EXPERIMENT_NAMES)  # the package's docstring describes each, in the same order


def outputs(root, name):
    folder = root / name
    for suffix in ("csv", "md", "png", "json"):
        assert (folder / f"{name}.{suffix}").stat().st_size > 0, f"{name}.{suffix} missing or empty"
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((folder / f"{name}.json").read_text())
    assert meta["scale"]["name"] == "micro" and meta["wall_seconds"] >= 0
    assert {"platform", "cpu_count", "torch", "date"} <= set(meta["machine"])
    return ex.read_csv(folder / f"{name}.csv"), (folder / f"{name}.md").read_text(), meta


def table_rows(md):
    """Data rows of the markdown table (header and separator excluded)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return lines[2:]


def finite(values):
    return all(v is not None and math.isfinite(v) for v in values)


def test_convergence(out):
    rows, md, meta = outputs(out, "convergence")
    assert {"variant", "arch", "attention", "heads", "seed", "step", "train_bpd", "test_bpd", "train_seconds",
            "lipschitz_max", "status", "run_wall_seconds", "reused", "run"} <= set(rows[0])
    s = ex.MICRO
    assert len(rows) == N_VARIANTS * s.seeds * (s.steps // s.eval_every)
    assert {r["variant"] for r in rows} == {v.label for v in ex.CONVERGENCE_VARIANTS}
    assert finite(r["test_bpd"] for r in rows) and all(0 < r["test_bpd"] < 16 for r in rows)
    assert all(r["status"] == "ok" and r["lipschitz_max"] < 1 for r in rows)
    assert all((r["gamma_max_abs"] is None) == (r["attention"] == "none") for r in rows)
    assert all((r["attention_share"] is None) == (r["attention"] == "none") for r in rows)
    assert all(r["attention_share"] >= 0 for r in rows if r["attention"] != "none")
    assert len(table_rows(md)) == N_VARIANTS and "Table 1" in md and "convergence.csv" in md
    assert "± SE" in md and "(n=1)" in md
    assert meta["runs_trained"] + meta["runs_reused"] == N_VARIANTS * s.seeds


def test_heads_reuses_the_convergence_runs(out):
    rows, md, _ = outputs(out, "heads")
    assert [(r["attention"], r["heads"]) for r in rows] == [(a, h) for a in ("l2", "l2-tight") for h in ex.MICRO.heads]
    for four in (r for r in rows if r["heads"] == 4):
        assert four["reused"] == 1 and four["run"].startswith("convergence/runs/")
    assert finite(r["test_bpd"] for r in rows) and len(table_rows(md)) == 2 * len(ex.MICRO.heads)


def test_awgn(out):
    rows, md, meta = outputs(out, "awgn")
    assert len(rows) == N_VARIANTS * len(ex.MICRO.awgn_sigmas)
    assert {"variant", "seed", "sigma", "bits_per_dim", "reconstruction_error"} <= set(rows[0])
    assert finite(r["bits_per_dim"] for r in rows)
    assert all(r["reconstruction_error"] < 1e-3 for r in rows)
    assert meta["runs_trained"] == 0 and len(table_rows(md)) == len(rows)


def test_dot(out):
    rows, md, _ = outputs(out, "dot")
    assert {r["attention"] for r in rows} == {"l2", "dot"} and {r["gamma"] for r in rows} == {"trained", "set to 1"}
    value = {(r["attention"], r["gamma"], r["measurement"], r["input_scale"]): r["value"] for r in rows}
    assert value[("l2", "trained", "certified_bound_max", None)] < 1
    assert math.isinf(value[("dot", "trained", "certified_bound_max", None)])
    for att in ("l2", "dot"):
        assert value[(att, "trained", "nonfinite_loss", None)] in (0, 1)
        for gamma in ("trained", "set to 1"):
            for s in ex.MICRO.dot_scales:
                for meas in ("block_inversion_error", "jacobian_norm_max", "block_converged_fraction"):
                    assert (att, gamma, meas, s) in value
    l2 = [r["value"] for r in rows if r["attention"] == "l2" and r["measurement"] != "certified_bound_max"]
    assert finite(l2)
    assert all(value[("l2", g, "block_converged_fraction", s)] == 1 for g in ("trained", "set to 1")
               for s in ex.MICRO.dot_scales)
    assert "gamma set to 1" in md and len(table_rows(md)) == len({(r["measurement"], r["input_scale"]) for r in rows})


def test_classification(out):
    rows, md, _ = outputs(out, "classification")
    assert len(rows) == len(ex.MICRO.classification_data) * 3 * ex.MICRO.seeds
    assert {r["attention"] for r in rows} == {"none", "l2", "l2-tight"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and finite(r["test_bpd"] for r in rows)
    assert len(table_rows(md)) == len(ex.MICRO.classification_data) * 3


def test_tight_sweeps_the_logit_range(out):
    rows, md, _ = outputs(out, "tight")
    s = ex.MICRO
    default = TrainConfig().delta_max
    assert [r["delta_max"] for r in rows] == [None] * s.seeds + [d for d in s.deltas + (default,) for _ in range(s.seeds)]
    assert [r["gamma_init"] for r in rows[-s.seeds:]] == [1.0] * s.seeds  # attention switched on from the start
    assert all(r["reused"] == 1 for r in rows if r["delta_max"] is None)  # the convergence runs
    assert all(r["f_196"] > 1 and r["attention_share"] >= 0 for r in rows if r["delta_max"] is not None)
    assert all(r["attention_share"] > 0 for r in rows[-s.seeds:])
    assert len(table_rows(md)) == len(s.deltas) + 1 and "paired" in md


def test_long_runs_every_architecture_with_and_without_l2_tight(out):
    rows, md, meta = outputs(out, "long")
    s = ex.MICRO
    assert meta["scale"]["steps"] == s.long_steps and meta["runs_trained"] == 6 * s.seeds
    assert {(r["arch"], r["attention"]) for r in rows} == {(a, t) for a in ("iresnet", "resflow", "idensenet")
                                                           for t in ("none", "l2-tight")}
    assert max(r["step"] for r in rows) == s.long_steps and len(table_rows(md)) == 6


def test_interpolation(out):
    rows, md, _ = outputs(out, "interpolation")
    assert len(rows) == N_VARIANTS * ex.MICRO.interp_pairs
    assert all(r["endpoint_error"] < 2 / 255 for r in rows)  # the ends decode to the test images
    assert all(r["path_ratio"] >= 1 - 1e-6 for r in rows)
    assert len(table_rows(md)) == N_VARIANTS


def test_one_registry_in_run_order():
    """One entry per experiment module, in the order ``all`` runs them; each knows its table."""
    assert list(ex.EXPERIMENTS) == ["convergence", "heads", "awgn", "dot", "classification", "interpolation",
                                    "tight", "long", "attention"]
    for name, entry in ex.EXPERIMENTS.items():
        module = getattr(ex, name)
        assert entry is module.EXPERIMENT and entry.name == module.NAME == name
        assert entry.run is module.run and entry.markdown is module.markdown


def test_run_key_ignores_settings_added_at_their_old_value():
    """A setting added after runs were keyed changes no existing key at the value those runs used;
    any other value is another run."""
    cfg = ex.train_config(ex.MICRO, ex.Variant("resflow", None), seed=0)
    assert {k: getattr(cfg, k) for k in KEY_OMITS} == KEY_OMITS
    older = {k: v for k, v in asdict(cfg).items() if k != "steps" and k not in KEY_OMITS}
    digest = hashlib.sha1(json.dumps(older, sort_keys=True, default=str).encode()).hexdigest()[:8]
    assert ex.run_key(cfg).endswith(digest)
    assert ex.run_key(replace(cfg, lr_schedule="cosine")) != ex.run_key(cfg)
    assert ex.run_key(replace(cfg, max_grad_norm=1.0)) != ex.run_key(cfg)


def test_rerun_reuses_every_run(out):
    ex.convergence.run(out, "micro", progress=False)
    meta = json.loads((out / "convergence" / "convergence.json").read_text())
    assert meta["runs_trained"] == 0 and meta["runs_reused"] == N_VARIANTS


def test_cli_route(out, capsys):
    assert main(["experiment", "heads", "--scale", "micro", "--out", str(out), "--quiet"]) == 0
    assert "heads.csv" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["experiment", "nope", "--scale", "micro", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "convergence" in err
    assert main(["experiment", "heads", "--scale", "micro", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "seeds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "heads").exists()


def test_interrupted_run_resumes_and_extends(tmp_path):
    cfg = ex.train_config(ex.MICRO, ex.Variant("resflow", None), seed=0)
    first = ex.ensure_run(tmp_path, "x", replace(cfg, steps=1), progress=False)
    assert first.steps_done == 1 and not first.reused
    second = ex.ensure_run(tmp_path, "x", cfg, progress=False)  # same key: resumed, not restarted
    assert second.path == first.path and second.steps_done == 2 and [h["step"] for h in second.history] == [1, 2]
    with pytest.raises(ValueError, match="more than the 1 requested"):
        ex.ensure_run(tmp_path, "x", replace(cfg, steps=1), progress=False)


def test_nonfinite_run_is_recorded_once(tmp_path, monkeypatch):
    calls = []

    def blow_up(cfg, path, resume, progress):
        calls.append(path)
        path.mkdir(parents=True, exist_ok=True)
        raise NonFiniteLossError("non-finite loss (nan) at step 1")

    monkeypatch.setattr(ex.runs, "train", blow_up)  # what ensure_run calls
    cfg = ex.train_config(ex.MICRO, ex.Variant("resflow", "dot"), seed=0)
    rec = ex.ensure_run(tmp_path, "dot", cfg, progress=False)
    assert rec.status == "nonfinite" and "nan" in rec.message and rec.history == []
    again = ex.ensure_run(tmp_path, "dot", cfg, progress=False)
    assert again.reused and again.status == "nonfinite" and len(calls) == 1


def test_table_helpers():
    assert ex.mean_std([1.0, 3.0]) == "2.0000 ± 1.4142"
    assert ex.mean_std([2.0]) == "2.0000"
    assert ex.mean_std([1.0, float("inf"), None]) == "1.0000 (1/2 finite)"
    assert ex.mean_std([]) == "n/a"
    with pytest.raises(ValueError, match="unknown scale"):
        ex.get_scale("huge")


def test_jacobian_norm_of_a_linear_map():
    a = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    norms = ex.jacobian_norm(lambda t: t @ a.T, x, iters=200)
    assert torch.allclose(norms, torch.linalg.matrix_norm(a, 2).expand(3), rtol=1e-6)


def test_results_page_is_filled_from_the_runs(out, tmp_path):
    """``acf experiment report --page``: generated blocks take the tables of the CSVs, prose stays."""
    page = tmp_path / "RESULTS.md"
    begin, end = ex._marker("heads")
    page.write_text(f"# Results\n\nprose before\n\n{begin}\nstale numbers\n{end}\n\nprose after\n")
    assert main(["experiment", "report", "--out", str(out), "--page", str(page)]) == 0
    text = page.read_text()
    assert "stale numbers" not in text and "prose before" in text and "prose after" in text
    assert (out / "heads" / "heads.md").read_text().splitlines()[-1].strip() in text
    assert "### " in text and "results/heads/heads.png" in text
    long_begin, long_end = ex._marker("long")  # a folder without their results: the blocks stay
    page.write_text(f"{begin}\nkept\n{end}\n{long_begin}\nkept too\n{long_end}\n")
    assert ex.fill_results_page(page, tmp_path / "none")[1] == ["heads", "long"]
    assert "kept\n" in page.read_text() and "kept too" in page.read_text()
    page.write_text(f"{begin}\nno end marker\n")
    with pytest.raises(ValueError, match="no matching"):
        ex.fill_results_page(page, out)
    assert main(["experiment", "report", "--out", str(out)]) == 2  # --page is required


def test_attention_protocol(out):
    rows, md, meta = outputs(out, "attention")
    arms = {name for name, _, _ in ex.attention.ARMS_A}
    stage_a = [r for r in rows if r["stage"] == "A"]
    assert {r["arm"] for r in stage_a} == arms and all(r["status"] == "ok" for r in rows)
    assert {r["arm"] for r in rows if r["stage"] == "B"} == {"baseline-wide", ex.attention.best_attention_arm(rows)}
    assert finite(r["test_bpd"] for r in rows) and all(0 < r["test_bpd"] < 16 for r in rows)
    params = {r["arm"]: r["params"] for r in stage_a}
    assert params["baseline-wide"] >= max(params[a] for a in ("residual", "quadrature", "gated"))
    assert params["baseline-wide"] > params["baseline"]
    for r in rows:  # the knock-out and the attention columns exactly where there is attention
        assert (r.get("knockout_cost") is None) == (r["role"] == "baseline" or r["arm"] in ("control", "coupling",
                                                                                            "coupling+attention"))
    assert any(r["equal_time_for"] for r in rows if r["arm"] == "baseline-wide")
    coupling = [r for r in stage_a if r["arm"].startswith("coupling")]
    assert coupling and all(r["lipschitz_max"] is None for r in coupling)  # no certificate, none needed
    assert all(r["lipschitz_max"] < 1 for r in stage_a if r not in coupling)
    assert "positive control" in md and "uncertified reference" in md and "equal wall-clock" in md
    assert meta["runs_trained"] + meta["runs_reused"] >= 0
