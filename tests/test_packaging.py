"""The installed layout and the core/adapters boundary."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("nni", "torch_pruning", "optuna")


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
    # install: the wheel once shipped without mixmatch_plugin.app.cli, so the `mixmatch` command broke.
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


def _framework_imports(path: Path) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        hits += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    return hits


def test_the_core_never_imports_a_framework_directly() -> None:
    files = sorted((ROOT / "mixmatch_plugin").rglob("*.py"))
    assert len(files) > 20
    assert [h for f in files for h in _framework_imports(f)] == []
    # the adapters do import them: the check above is not vacuous
    assert any(_framework_imports(f) for f in (ROOT / "adapters").rglob("*.py"))


def test_importing_the_core_and_its_commands_loads_no_framework() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import mixmatch_plugin as mm\n"
        "import mixmatch_plugin.app.cli, benchmarks.run, mixmatch_plugin.adapters.depth_width\n"
        "for pkg in (mm, mixmatch_plugin.app.cli):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        if m.name not in ('adapters', '__main__'): importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
