"""The package as users install it: every package folder listed, one import namespace,
and the import layers of ``.importlinter`` kept."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAPPING = {pkg: folder for pkg, folder in
           PYPROJECT["tool"]["setuptools"]["package-dir"].items() if pkg}
LAYER_FOLDERS = set(MAPPING.values())


def _package_folders() -> dict[str, Path]:
    """Import name -> folder, for every folder with an ``__init__.py`` that installs."""
    found: dict[str, Path] = {}
    roots = {"ia": ROOT / "ia", **{pkg: ROOT / folder for pkg, folder in MAPPING.items()}}
    for name, top in roots.items():
        for init in top.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(top).parts
            found[".".join((name, *rel))] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = set(_package_folders())
    assert folders - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - folders == set(), "listed packages without an __init__.py"


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_a_layer_folder_by_its_bare_name() -> None:
    sources = [p for folder in ("ia", "tests", "examples", *sorted(LAYER_FOLDERS))
               for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_roots(p) & LAYER_FOLDERS)
                 for p in sources if _imported_roots(p) & LAYER_FOLDERS}
    assert offenders == {}, "import these as ia.<name>"


def test_import_layers_are_kept() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in run.stdout


def test_live_processes_start_without_the_embedded_runtime() -> None:
    # click is not checked here: Faust itself imports it.
    code = ("import sys, ia.streams.worker, ia.streams.actuator, ia.streams.app, "
            "ia.streams.audit; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith(('ia.runtime', 'ia.cli', 'ia.offline', 'ia.sim', 'ia.bench'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "[]"
