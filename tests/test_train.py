"""Training loop: run folder, exact resume, non-finite loss, config mismatch, hybrid task, CLI."""
import json

import pytest
import torch

from acf.cli import main
from acf.train import NonFiniteLossError, TrainConfig, Trainer, train

TINY = dict(data="digits", heads=2, steps=4, batch_size=16, eval_every=2, eval_size=16, n_exact_eval=2, warmup=2)


def test_run_folder_and_metrics(tmp_path):
    trainer = train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "metrics.json", "checkpoint.pt", "samples.png",
                 "reconstructions.png", "convergence.png"):
        assert (run / name).stat().st_size > 0, name
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "step,train_bpd,test_bpd,test_acc,seconds,lipschitz_max" and len(rows) == 3
    assert all(0 < h["lipschitz_max"] < 1 and 0 < h["test_bpd"] < 16 for h in trainer.history)
    assert json.loads((run / "config.json").read_text())["model"]["input_shape"] == [1, 8, 8]
    assert not list(run.glob("*.tmp"))  # atomic writes leave no temporary files


def test_resume_matches_uninterrupted_run(tmp_path):
    full = train(TrainConfig(**TINY), tmp_path / "full", progress=False)
    half = TrainConfig(**{**TINY, "steps": 2})
    train(half, tmp_path / "split", progress=False)
    resumed = train(TrainConfig(**TINY), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == full.step == 4
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["step"] for h in resumed.history] == [2, 4]  # no duplicated or lost metric rows


def test_non_finite_loss_keeps_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(**TINY)
    train(TrainConfig(**{**TINY, "steps": 2}), run, progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    original = Trainer.objective

    def poisoned(self, model, x, y):
        loss, bpd, z = original(self, model, x, y)
        return loss * float("nan"), bpd, z

    monkeypatch.setattr(Trainer, "objective", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg, run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_another_configuration(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 2}), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="another configuration.*'lr'"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(TrainConfig(**TINY), tmp_path / "empty", resume=True, progress=False)


def test_hybrid_task_reports_accuracy(tmp_path):
    trainer = train(TrainConfig(**{**TINY, "task": "hybrid", "arch": "iresnet"}), tmp_path / "run", progress=False)
    acc = trainer.history[-1]["test_acc"]
    assert acc is not None and 0.0 <= acc <= 1.0


def test_bad_training_configuration():
    with pytest.raises(ValueError, match="task must be"):
        TrainConfig(task="regression")
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        TrainConfig(data="svhn")
    with pytest.raises(ValueError, match="no labels"):
        TrainConfig(data="celeba64", task="hybrid")


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", "digits", "--heads", "2", "--steps", "2", "--batch-size", "16", "--eval-every", "2",
            "--eval-size", "16", "--n-exact-eval", "2", "--out", str(out)]
    assert main(args) == 0
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert f"outputs in {out}" in text and "test bits/dim" in text
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 4
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2  # clear error, exit code 2


def test_two_process_data_parallel_run(tmp_path):
    """torchrun with 2 CPU processes (gloo): the run completes, rank 0 writes the run folder, and the
    ranks end with identical parameters and spectral-norm buffers (checked inside the run)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "acf",
           "train", "--data", "digits", "--heads", "2", "--steps", "4", "--batch-size", "16", "--eval-every", "2",
           "--eval-size", "16", "--n-exact-eval", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == [2, 4]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
