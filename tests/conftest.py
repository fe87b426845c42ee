import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter runs the kernels without a GPU; it must be chosen before Triton is first
    # imported (importing torch's compiler stack can import it), so here, before any test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The markers of pytest.ini, defined here once: ``gpu`` items are skipped without CUDA, ``needs_ext``
    items without acf._C and its CPU kernels."""
    from acf.ops.l2_attention import cpu_kernels_available

    skips = {"gpu": None if torch.cuda.is_available() else "needs a CUDA device",
             "needs_ext": None if cpu_kernels_available() else "acf._C (with its CPU kernels) not built"}
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny tensors run faster on one, a busy 2-core machine is ~10x
    slower on two, and runs compared bit for bit with a subprocess (OMP_NUM_THREADS=1) must reduce
    in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """A tiny run trained by ``acf train`` with its default device (2 steps of L2 attention on the 8x8
    digits), shared by the tests of the command line, of loading a run and of its figures; a test that
    changes it works on a copy."""
    from acf.cli import main

    out = tmp_path_factory.mktemp("cli_run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for the training only
    try:
        assert main(["train", "--data", "digits", "--attention", "l2", "--heads", "2", "--batch-size", "16",
                     "--eval-every", "2", "--eval-size", "16", "--n-exact-eval", "2", "--warmup", "2", "--steps", "2",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def pytest_terminal_summary(terminalreporter):
    """The compile tests' reports (registers, stack, spills per GPU kernel), at the end of the run."""
    import sys

    compile_report = sys.modules.get("gpu_compile")
    for title, lines in getattr(compile_report, "REPORT", []):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
