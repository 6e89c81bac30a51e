"""The ``ia`` command: one click group; each noun's commands live in their own module."""

from ia.cli.main import main

__all__ = ["main"]
