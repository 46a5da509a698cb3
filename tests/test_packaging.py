"""The installed layout and the layers: core <- adapters <- application, one way, no cycles.

* **core** (``mixmatch_plugin/`` but ``app/``): the method; imports no framework, no adapter, no application code.
* **adapters** (``adapters/``, installed as ``mixmatch_plugin.adapters``): NNI, Torch-Pruning, Optuna, and
  depth-and-width pruning; may import the core, never the application.
* **application** (``mixmatch_plugin/app/`` and ``mixmatch_plugin/__main__.py``): the command, the demo,
  training, data, plots, reports; may import both.
* ``benchmarks/`` sits on top of all three and is not installed: nothing in the package imports it.

Imports inside functions and under ``TYPE_CHECKING`` count: every ``import`` statement of every module is read.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("nni", "torch_pruning", "optuna")
MAX_PARAMETERS = 10


def _declared_packages() -> tuple[set[str], dict[str, str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = {p.strip() for p in cfg["options"]["packages"].replace(",", "\n").split() if p.strip()}
    mapping = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines())
    )
    return packages, mapping


def test_every_package_folder_is_installed() -> None:
    # A folder with __init__.py that setup.cfg does not list is missing from a regular (non-editable)
    # install: the wheel once shipped without mixmatch_plugin.cli, so the `mixmatch` command broke.
    packages, mapping = _declared_packages()
    found = set()
    for dotted, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((dotted, *rel)))
    assert found, "no package folders found"
    assert found - packages == set(), "add these to setup.cfg [options] packages"
    # listed without __init__.py: data-only folders (the rules' YAML files), which must exist
    for extra in packages - found:
        folder = ROOT / extra.replace(".", "/")
        assert folder.is_dir() and any(folder.iterdir()), f"setup.cfg lists {extra}, which does not exist"


# ---------------------------------------------------------------------------------------- the import graph
def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package)."""
    out = {}
    for folder, dotted in (("mixmatch_plugin", "mixmatch_plugin"), ("adapters", "mixmatch_plugin.adapters")):
        for f in sorted((root / folder).rglob("*.py")):
            parts = f.relative_to(root / folder).with_suffix("").parts
            package = parts[-1] == "__init__"
            out[".".join((dotted, *(parts[:-1] if package else parts)))] = (f, package)
    return out


def imports(root: Path = ROOT) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """``(importer, imported module, line, names)`` for every import statement, relative ones resolved.

    ``from P import n`` where ``P.n`` is a module counts as an import of ``P.n``.
    """
    mods = modules(root)
    out = []
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(name, a.name, node.lineno, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append((name, sub if sub in mods else base, node.lineno, (a.name,)))
    return out


def layer(module: str) -> str:
    if module == "mixmatch_plugin.__main__" or module.startswith("mixmatch_plugin.app"):
        return "app"
    if module.startswith("mixmatch_plugin.adapters"):
        return "adapters"
    if module.split(".")[0] in FRAMEWORKS:
        return "framework"
    if module.split(".")[0] == "benchmarks":
        return "benchmarks"
    return "core" if module.startswith("mixmatch_plugin") else "outside"


ALLOWED = {"core": {"core"}, "adapters": {"core", "adapters", "framework"}, "app": {"core", "adapters", "app"}}


def layer_violations(root: Path = ROOT) -> list[str]:
    return [f"{src}:{line} imports {dst} ({layer(src)} -> {layer(dst)})" for src, dst, line, _ in imports(root)
            if layer(dst) != "outside" and layer(dst) not in ALLOWED[layer(src)]]


def cycles(root: Path = ROOT) -> list[list[str]]:
    """The import cycles between the package's modules (strongly connected components of two or more)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for src, dst, _, _ in imports(root):
        if dst in mods and dst != src:
            graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def private_imports(root: Path = ROOT) -> list[str]:
    """``_names`` imported from another module of the package."""
    return [f"{src}:{line} imports {n} from {dst}" for src, dst, line, names in imports(root)
            for n in names if n.startswith("_") and not n.startswith("__") and layer(dst) in ALLOWED]


def test_the_layers_import_one_way_only() -> None:
    assert len(modules()) > 40
    assert layer_violations() == []
    # the graph is not empty: the adapters do import the core and their frameworks, the application both
    kinds = {(layer(s), layer(d)) for s, d, _, _ in imports()}
    assert {("adapters", "core"), ("adapters", "framework"), ("app", "core"), ("app", "adapters")} <= kinds


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_no_private_name_is_imported_from_another_module() -> None:
    assert private_imports() == []


def test_importing_the_core_and_the_application_loads_no_framework() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import mixmatch_plugin as mm, mixmatch_plugin.app, mixmatch_plugin.app.cli\n"
        "for pkg in (mm, mixmatch_plugin.app, mixmatch_plugin.app.cli):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        if m.name not in ('adapters', 'app', '__main__'): importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ narrow interfaces
def _public_callables() -> list[tuple[str, object]]:
    """Public functions and methods defined in the package's modules (the CLI's commands excepted)."""
    out = []
    for info in pkgutil.walk_packages(importlib.import_module("mixmatch_plugin").__path__, "mixmatch_plugin."):
        if info.name.startswith("mixmatch_plugin.app.cli") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                out.append((f"{info.name}.{name}", obj))
            elif inspect.isclass(obj):
                out += [(f"{info.name}.{name}.{m}", f) for m, f in vars(obj).items()
                        if not m.startswith("_") and inspect.isfunction(f)]
    return out


def test_no_public_function_takes_more_than_ten_parameters() -> None:
    found = _public_callables()
    assert len(found) > 100
    wide = {}
    for name, fn in found:
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]  # type: ignore[arg-type]
        if len(params) > MAX_PARAMETERS:
            wide[name] = len(params)
    assert wide == {}
