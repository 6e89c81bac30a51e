"""The examples in docstrings run, and say what they claim (River-style docs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("ia.core", "ia.schemas", "ia.features", "ia.decisions", "ia.actuators")
EXTRA = ("ia.bench.webhook_sink", "ia.offline.evaluate")


def modules() -> list[str]:
    names = list(EXTRA)
    for pkg in PACKAGES:
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__,
                                                        f"{pkg}.")]
    return sorted(names)


def test_some_modules_carry_examples() -> None:
    finder = doctest.DocTestFinder()
    with_examples = [n for n in modules()
                     if any(t.examples for t in finder.find(importlib.import_module(n)))]
    assert len(with_examples) >= 4, with_examples


@pytest.mark.parametrize("name", modules())
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
