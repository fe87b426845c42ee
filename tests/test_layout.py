"""The layout of the project: no import cycle among acf's modules (imports inside functions counted), no
module of acf/ over 450 lines, setup.py compiling every C++ source and depending on every header, and
pyproject.toml installing every package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# The package's source folders: acf/, and kernels/ installed as acf.kernels (pyproject.toml).
ROOTS = {"acf": REPO / "acf", "acf.kernels": REPO / "kernels"}


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by its dotted name: ``(file, is a package)``."""
    found = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            found[".".join((prefix, *(parts[:-1] if is_package else parts)))] = (path, is_package)
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The modules of the package that module ``name`` imports anywhere in its source: at module level, in
    functions, under ``if TYPE_CHECKING``. Relative imports are resolved; ``from P import x`` imports the
    module ``P.x`` when there is one, else ``P`` (a name defined in P, or P's ``__init__``)."""
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found |= {".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
                elif target in MODULES:
                    found.add(target)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_every_kind_of_import():
    """The reader of the graph: relative imports at every level, imports inside functions (the figures of a
    run, the Triton kernels, `acf info`), package-level names and submodules named by ``from P import``."""
    assert {"acf.ops.l2_attention_passes", "acf.ops.backends", "acf._ext", "acf._checks",
            "acf.kernels.l2_attention"} <= imports("acf.ops.l2_attention")
    assert "acf.figures" in imports("acf.train.trainer")  # inside Trainer.write_figures
    assert "acf.ops.info" in imports("acf.cli")  # inside cmd_info
    assert {"acf.runfolder", "acf.distributed"} <= imports("acf.train.trainer")  # from .. import runfolder, ...
    assert "acf.data" in imports("acf.cli") and "acf.train" in imports("acf.cli")  # names of a package
    assert "acf.evaluate" in imports("acf")  # acf.__getattr__ imports load_run on first use


def test_no_import_cycle():
    """No module imports (at any depth, from any function) one that imports it back: layers stay layers,
    and a module can be read, tested and imported without the ones above it."""
    graph = {name: imports(name) for name in MODULES}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(n for n, (p, _) in MODULES.items() if p.is_relative_to(REPO / "acf")))
def test_no_module_over_450_lines(name):
    path = MODULES[name][0]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines, more than {MAX_LINES}: split it by concern"


def _setup_constant(name: str) -> list[str]:
    """A module-level list of ``setup.py``, read without running it."""
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"setup.py defines no {name}")


def test_setup_compiles_every_cpp_file_and_depends_on_every_header():
    """A header setup.py does not list is not a dependency of the build: editing it would leave a stale
    acf._C behind."""
    csrc = lambda pattern: sorted(str(p.relative_to(REPO)) for p in (REPO / "csrc").glob(pattern))  # noqa: E731
    assert sorted(_setup_constant("CPU_SOURCES")) == csrc("*.cpp")
    assert sorted(_setup_constant("HEADERS")) == csrc("*.h")


def test_pyproject_installs_every_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted(name for name, (_, is_package) in MODULES.items() if is_package)
    assert sorted(config["packages"]) == packages
    assert config["package-dir"] == {prefix: str(root.relative_to(REPO)) for prefix, root in ROOTS.items()}
    assert config["dynamic"]["version"] == {"attr": "acf._version.__version__"}
