"""Check the import layers of ``.importlinter`` on the package as users install it.

The layer folders (``schemas/``, ``features/``, ...) become ``ia.schemas``,
``ia.features``, ... only through the ``package-dir`` mapping in ``pyproject.toml``, so
import-linter, which reads the source tree, would not see them. This copies the source
into the installed shape (the same mapping, read from ``pyproject.toml``) in a temporary
directory and runs ``lint-imports`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def installed_tree(target: Path) -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    shutil.copytree(ROOT / "ia", target / "ia", ignore=IGNORE)
    for package, folder in mapping.items():
        if package:
            shutil.copytree(ROOT / folder, target / Path(*package.split(".")), ignore=IGNORE)


def main() -> int:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="ia-layers-") as tmp:
        installed_tree(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        return subprocess.call([str(lint_imports), "--no-cache", str(ROOT / ".importlinter")],
                               cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
